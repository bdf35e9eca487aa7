"""Child processes sentinel starts: stop them (SIGTERM to the process group, then SIGKILL), remember their
pids on disk, make them die with sentinel (``ChildRegistry.start_keeper``: the keeper process kills them the
moment sentinel exits, ``kill -9`` included), and keep a child service running (``ChildWatchdog``: restart
with backoff, give up on a crash loop)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


def stop_process(proc: subprocess.Popen[bytes], name: str, timeout_s: float = 10.0) -> None:
    """SIGTERM the child's process group, then SIGKILL after ``timeout_s``."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        log.warning("%s (pid %d) ignored SIGTERM for %.0fs; killing", name, proc.pid, timeout_s)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
    except ProcessLookupError:
        pass


class ChildRegistry:
    """Pids of the children sentinel started, on disk, so a later start can reap leftovers."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._keeper: subprocess.Popen[bytes] | None = None
        self._keeper_fd: int | None = None  # the pipe's write end: closed when this process exits

    def start_keeper(self) -> int:
        """Start the keeper (``sentinel/keeper.py``): when this process exits, however, it kills every child
        still in the registry. Returns its pid."""
        read, write = os.pipe()  # both ends non-inheritable (PEP 446): no other child holds the write end
        try:
            self._keeper = subprocess.Popen([sys.executable, "-m", "sentinel.keeper", str(self.path)], stdin=read,
                                            stdout=subprocess.DEVNULL, start_new_session=True)
        except OSError:
            os.close(write)
            raise
        finally:
            os.close(read)
        self._keeper_fd = write
        return self._keeper.pid

    def stop_keeper(self) -> None:
        """A clean stop: the keeper kills what is left in the registry (nothing, after a stop) and exits."""
        if self._keeper_fd is not None:
            os.close(self._keeper_fd)
            self._keeper_fd = None
        if self._keeper is not None:
            try:
                self._keeper.wait(5)
            except subprocess.TimeoutExpired:
                self._keeper.kill()
            self._keeper = None

    def kill_all(self) -> list[str]:
        """SIGKILL every child in the registry now (a stop that overran its deadline)."""
        from sentinel.keeper import reap

        return reap(self.path)

    def _read(self) -> dict[str, int]:
        try:
            return {k: int(v) for k, v in json.loads(self.path.read_text()).items()}
        except (OSError, ValueError):
            return {}

    def set(self, name: str, pid: int | None) -> None:
        with self._lock:
            pids = self._read()
            if pid is None:
                pids.pop(name, None)
            else:
                pids[name] = pid
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(pids))
            tmp.replace(self.path)

    def reap_leftovers(self) -> list[str]:
        """Kill process groups left by a sentinel that died without cleaning up (and whose keeper could not
        kill them: it was killed too)."""
        reaped = self.kill_all()
        with self._lock:
            self.path.unlink(missing_ok=True)
        return reaped


class ChildWatchdog:
    """Keeps a child service that sentinel started (Prometheus) running: when its process has exited (a
    crash, ``kill -9``), says so in the log and restarts it, with backoff (1 s, 2 s, 4 s ... 60 s); after
    ``max_restarts`` restarts within ``window_s`` it stops trying and says that a human is needed (a crash
    loop is not fixed by more restarts). ``on_event(outcome, detail)`` is told each step (for the audit and
    metrics)."""

    def __init__(self, name: str, proc: Callable[[], subprocess.Popen[bytes] | None], restart: Callable[[], None],
                 on_event: Callable[[str, dict[str, object]], None] = lambda outcome, detail: None,
                 clock: Callable[[], float] = time.monotonic, max_restarts: int = 5, window_s: float = 600.0) -> None:
        self.name = name
        self.proc = proc
        self.restart = restart
        self.on_event = on_event
        self.clock = clock
        self.max_restarts = max_restarts
        self.window_s = window_s
        self.restarts: list[float] = []
        self.next_try = 0.0
        self.gave_up = False
        self._lock = threading.Lock()

    def check(self) -> str | None:
        """One look: None while the child runs; else what was done ('restarted', 'waiting', 'gave-up',
        'restart-failed')."""
        with self._lock:
            p = self.proc()
            if p is None or p.poll() is None:
                return None
            now = self.clock()
            if now < self.next_try:
                return "waiting"
            recent = [t for t in self.restarts if now - t < self.window_s]
            if len(recent) >= self.max_restarts:
                if not self.gave_up:
                    self.gave_up = True
                    log.error("%s keeps exiting (%d restarts in %.0fs, last exit code %s): not restarting it again; "
                              "a human is needed", self.name, len(recent), self.window_s, p.returncode)
                    self.on_event("gave-up", {"exit_code": p.returncode, "restarts": len(recent)})
                return "gave-up"
            log.error("%s (pid %d) exited with code %s; restarting it (attempt %d)", self.name, p.pid, p.returncode,
                      len(recent) + 1)
            self.restarts = [*recent, now]
            self.next_try = now + min(60.0, 2.0 ** len(recent))
            try:
                self.restart()
            except Exception as exc:  # noqa: BLE001 - reported, tried again after the backoff
                log.error("restarting %s failed: %s", self.name, exc)
                self.on_event("restart-failed", {"exit_code": p.returncode, "error": str(exc)})
                return "restart-failed"
            new = self.proc()
            log.warning("%s restarted (pid %s)", self.name, new.pid if new is not None else "?")
            self.on_event("restarted", {"exit_code": p.returncode, "pid": new.pid if new is not None else None})
            return "restarted"
