"""Children die with sentinel: the keeper kills what the registry names when sentinel's end of its pipe
closes (as it does when sentinel exits, kill -9 included), and a stop that overruns its deadline kills every
child. Real processes; a child is recognised by its command line, so a stand-in names `inference_core`."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from sentinel.process import ChildRegistry

CHILD = [sys.executable, "-c", "import time; time.sleep(120)", "inference_core.server (stand-in)"]


def alive(p: subprocess.Popen[bytes]) -> bool:
    return p.poll() is None


def wait_dead(p: subprocess.Popen[bytes], timeout_s: float = 5.0) -> bool:
    try:
        p.wait(timeout_s)
        return True
    except subprocess.TimeoutExpired:
        return False


def test_the_keeper_kills_registered_children_when_sentinel_goes_and_spares_others(tmp_path: Path) -> None:
    reg = ChildRegistry(tmp_path / "children.json")
    ours = subprocess.Popen(CHILD, start_new_session=True)
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    try:
        reg.set("replica-0", ours.pid)
        reg.set("not-ours", stranger.pid)  # a reused pid whose command line is not one of ours: never killed
        reg.start_keeper()
        time.sleep(0.5)
        assert alive(ours)
        t0 = time.monotonic()
        reg.stop_keeper()  # the pipe closes, as it does when this process exits
        assert wait_dead(ours) and time.monotonic() - t0 < 5
        assert alive(stranger)
    finally:
        for p in (ours, stranger):
            p.kill()
            p.wait()


def test_the_keeper_acts_on_kill_9_of_the_process_that_started_it(tmp_path: Path) -> None:
    """A stand-in sentinel starts the keeper and a child, then is killed with SIGKILL: the child follows."""
    code = ("import subprocess, sys, time; from pathlib import Path; from sentinel.process import ChildRegistry; "
            f"reg = ChildRegistry(Path({str(tmp_path / 'children.json')!r})); reg.start_keeper(); "
            f"p = subprocess.Popen({CHILD!r}, start_new_session=True); reg.set('replica-0', p.pid); "
            "print(p.pid, flush=True); time.sleep(120)")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, cwd=Path(__file__).parents[2])
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and Path(f"/proc/{child}").exists() and \
            "zombie" not in Path(f"/proc/{child}/status").read_text().lower():
        time.sleep(0.05)
    gone = not Path(f"/proc/{child}").exists() or "zombie" in Path(f"/proc/{child}/status").read_text().lower()
    if not gone:
        os.kill(child, 9)
    assert gone, "the child outlived a kill -9 of the process that started it by more than 5 s"


def test_a_stop_past_its_deadline_kills_every_child(tmp_path: Path) -> None:
    from sentinel.daemon import Daemon
    from sentinel.settings import Settings

    class Stuck:
        name = "stuck"
        release = threading.Event()

        def stop(self) -> None:  # a part that does not stop (a worker blocked on a loaded host)
            self.release.wait(30)

    d = Daemon(Settings(state_dir=tmp_path))
    child = subprocess.Popen(CHILD, start_new_session=True)
    try:
        d.children.set("replica-0", child.pid)
        d.started = [Stuck()]  # type: ignore[list-item]
        t0 = time.monotonic()
        assert d.stop(timeout_s=1.0) is False
        assert time.monotonic() - t0 < 3
        assert wait_dead(child)
    finally:
        Stuck.release.set()
        child.kill()
        child.wait()
