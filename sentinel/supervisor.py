"""Runs inference_core replicas as child processes: start, health, restart, stop.

Children get their own session so a terminal's Ctrl-C reaches sentinel only; sentinel stops them in
order. Their pids are recorded so that a sentinel killed with ``kill -9`` cleans up on its next start.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inference_core.client import ReplicaClient, ReplicaError
from sentinel.errors import RemediationError, ServiceError
from sentinel.hostplan import FREE_FLOOR, HostPlan, fmt_bytes, mem_available
from sentinel.netutil import free_port
from sentinel.process import ChildRegistry, stop_process

log = logging.getLogger(__name__)
ADMIN_TOKEN_ENV = "INFERENCE_ADMIN_TOKEN"
PROXY_TOKEN_ENV = "INFERENCE_PROXY_TOKEN"  # sentinel's router proves itself with it (X-Sentinel-Proxy)


@dataclass(frozen=True)
class ReplicaSpec:
    name: str
    port: int
    model_dir: Path
    log_dir: Path
    host: str = "127.0.0.1"
    enable_faults: bool = False
    admin_token: str | None = None
    proxy_token: str | None = None  # the router's: its X-Forwarded-For is then the client (rate limits per client)
    served_model_name: str | None = None
    engine_args: tuple[str, ...] = ()  # more server flags (an argument list, never a shell string)
    cores: tuple[int, ...] = ()  # the CPU cores it runs on (its affinity; torch's threads match); () = any
    gpu: int | None = None       # the GPU it sees (CUDA_VISIBLE_DEVICES) on a GPU host

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def argv(self) -> list[str]:
        args = [sys.executable, "-m", "inference_core.server", "--model-dir", str(self.model_dir),
                "--host", self.host, "--port", str(self.port), "--log-dir", str(self.log_dir)]
        if self.served_model_name:
            args += ["--served-model-name", self.served_model_name]
        if self.enable_faults:
            args.append("--enable-faults")
        return args + list(self.engine_args)


class Replica:
    def __init__(self, spec: ReplicaSpec, run_dir: Path, children: ChildRegistry,
                 stopping: threading.Event | None = None) -> None:
        self.spec = spec
        self.stopping = stopping or threading.Event()  # sentinel is stopping: waiting for readiness ends
        self.run_dir = run_dir
        self.children = children
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self.started_at = 0.0  # when the current incarnation started (evidence before it is about another)
        self.grace_s = 10.0  # after a start, the HTTP server may not answer yet
        self._lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def client(self) -> ReplicaClient:
        """This replica's operational API (its spec, so its address, may be replaced on a restart)."""
        return ReplicaClient(self.spec.url, timeout_s=2.0, admin_token=self.spec.admin_token)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def busy(self) -> bool:
        """Being restarted (or loading after a start): not a moment to judge its liveness."""
        return self._lock.locked() or (bool(self.started_at) and time.time() - self.started_at < self.grace_s)

    def start(self) -> None:
        if self.stopping.is_set():  # a restart that sentinel's stop overtook starts nothing new
            raise RemediationError(f"not starting {self.spec.name}: sentinel is stopping")
        env = dict(os.environ)
        if self.spec.admin_token:
            env[ADMIN_TOKEN_ENV] = self.spec.admin_token
        if self.spec.proxy_token:
            env[PROXY_TOKEN_ENV] = self.spec.proxy_token
        if self.spec.cores:  # torch's intra-op threads: one per core of its own
            env["OMP_NUM_THREADS"] = str(len(self.spec.cores))
        if self.spec.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(self.spec.gpu)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.started_at = time.time()
        out = (self.run_dir / f"{self.spec.name}.out").open("ab")
        self.proc = subprocess.Popen(self.spec.argv(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, start_new_session=True)
        out.close()
        if self.spec.cores:  # before the interpreter has started a thread: every thread it starts inherits it
            with contextlib.suppress(OSError):
                os.sched_setaffinity(self.proc.pid, self.spec.cores)
        self.children.set(self.spec.name, self.proc.pid)
        log.info("started replica %s (pid %d) on %s", self.spec.name, self.proc.pid, self.spec.url)

    def wait_healthy(self, timeout_s: float, on_stage: Callable[[str, str], None] | None = None) -> bool:
        """Ready within ``timeout_s``; False at once when the process exits or its model failed to load (it
        will not become ready: waiting out the timeout would only delay the escalation). ``on_stage`` hears
        (replica, what it is doing) while it starts: a progress display."""
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        while time.monotonic() < deadline and self.alive() and not self.stopping.is_set():
            stage = "starting the process"
            try:
                ready = self.client.ready()
                if ready.ready:
                    return True
                if ready.load_error:
                    return False
                stage = ready.stage or "loading"
            except ReplicaError:
                pass
            if on_stage is not None:
                on_stage(self.spec.name, f"{stage} ({time.monotonic() - t0:.0f}s)")
            time.sleep(0.1)
        return False

    def healthy(self) -> bool:
        try:
            return self.client.ready().ready
        except ReplicaError:
            return False

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (a graceful stop lets requests in flight finish), SIGKILL after ``timeout_s``."""
        if self.proc is not None:
            stop_process(self.proc, self.spec.name, timeout_s)
            self.children.set(self.spec.name, None)

    def drain(self, timeout_s: float) -> str:
        """Stop admitting (``/admin/drain``) and wait until the requests in flight have finished, at most
        ``timeout_s``. Only a healthy replica is drained: a failed engine (a CUDA error, a stall) finishes
        nothing, so waiting would only delay the restart."""
        if not self.spec.admin_token or not self.alive():
            return "not drained (no admin token)" if self.alive() else "not drained (not running)"
        try:
            if self.client.health().status != "ok":
                return "not drained (unhealthy: nothing in flight can finish)"
            t0 = time.monotonic()
            while True:
                left = self.client.drain(timeout_s=5).in_flight
                if left == 0:
                    return f"drained in {time.monotonic() - t0:.1f}s"
                if time.monotonic() - t0 > timeout_s:
                    return f"drain timed out after {timeout_s:.0f}s with {left} request(s) in flight"
                time.sleep(0.2)
        except ReplicaError as exc:
            return f"not drained ({type(exc).__name__}: {exc})"

    def restart(self, timeout_s: float, drain_timeout_s: float = 30.0) -> str:
        """Drain (when healthy) → stop → start → ready."""
        with self._lock:
            old = self.pid
            drained = self.drain(drain_timeout_s)
            # an engine that failed or hangs finishes nothing: no grace period to wait out
            self.stop(10.0 if drained.startswith("drained") else 2.0)
            self.start()
            self.restarts += 1
            if not self.wait_healthy(timeout_s):
                why = self.failure()
                raise RemediationError(f"replica {self.spec.name} did not become healthy within {timeout_s:.0f}s "
                                       f"after restart" + (f": {why}" if why else "") +
                                       f" (see {self.run_dir / (self.spec.name + '.out')})")
            return f"restarted {self.spec.name}: {drained}; pid {old} -> {self.pid}"

    def failure(self) -> str | None:
        """Why the replica is not healthy, in its own words (a failed load names the file that did not match)."""
        try:
            health = self.client.health(timeout_s=3)
        except ReplicaError:
            return None if self.alive() else f"{self.spec.name} is not running"
        return health.load_error or health.cuda_error or None


class Supervisor:
    """Owns the replicas; the local actuator of remediation."""

    actions = frozenset({"restart", "scale_out", "scale_in", "reset_gpu"})
    service = "local-replicas"  # the target of scale actions

    # ``replicas`` is replaced, never changed in place (copy-on-write): the router, the liveness probe and the
    # API iterate it from other threads while a scale action runs

    def __init__(self, specs: list[ReplicaSpec], run_dir: Path, children: ChildRegistry,
                 start_timeout_s: float = 120.0, max_replicas: int | None = None,
                 on_change: Callable[[list[ReplicaSpec]], None] = lambda specs: None,
                 gpu_reset: Sequence[str] = ("nvidia-smi", "--gpu-reset"), plan: HostPlan | None = None,
                 mem_available: Callable[[], int] = mem_available) -> None:
        self.gpu_reset = list(gpu_reset)  # an argument list, never a shell string
        self._stopping = threading.Event()
        self.replicas = {s.name: Replica(s, run_dir, children, self._stopping) for s in specs}
        self.run_dir = run_dir
        self.children = children
        self.start_timeout_s = start_timeout_s
        self.max_replicas = max_replicas if max_replicas is not None else len(specs)
        self.on_change = on_change
        self.plan = plan  # what the host holds: slots, each replica's cores (None: no limit but max_replicas)
        self.mem_available = mem_available
        self._scale_lock = threading.Lock()
        self._added: str | None = None  # the replica the last scale-out started (what its verification checks)

    def start_all(self, on_stage: Callable[[str, str], None] | None = None) -> None:
        for r in self.replicas.values():
            r.start()
        for r in self.replicas.values():
            if not r.wait_healthy(self.start_timeout_s, on_stage):
                raise ServiceError(f"replica {r.spec.name} did not become healthy within {self.start_timeout_s:.0f}s "
                                   f"(see {r.run_dir / (r.spec.name + '.out')})")

    @property
    def stopping(self) -> bool:
        """sentinel is stopping: an action cut short now has no outcome (the next start verifies it)."""
        return self._stopping.is_set()

    def begin_stop(self) -> None:
        self._stopping.set()

    def stop_all(self, timeout_s: float = 10.0) -> None:
        """SIGTERM every replica at once, SIGKILL what is left after ``timeout_s``; a restart or scale-out in
        flight stops waiting for its replica."""
        self._stopping.set()
        threads = [threading.Thread(target=r.stop, args=(timeout_s,), daemon=True) for r in self.replicas.values()]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout_s + 6)

    # -- capacity ------------------------------------------------------------------------------------
    def _free_slot(self) -> int | None:
        """A slot of the plan whose cores (or GPU) no running replica uses."""
        if self.plan is None:
            return None
        if not self.plan.host.gpus and not self.plan.core_sets:  # cores shared: memory alone bounds the plan
            return len(self.replicas) if len(self.replicas) < self.plan.slots else None
        used = {r.spec.cores for r in self.replicas.values()} | {r.spec.gpu for r in self.replicas.values()}
        for i in range(self.plan.slots):
            key: object = self.plan.cores_for(i) if not self.plan.host.gpus else i
            if key not in used:
                return i
        return None

    def room(self) -> str | None:
        """Why the host cannot hold one more replica now (None: it can): the plan's slots, free cores (or
        GPUs), and memory now, with the 10 % floor kept free."""
        if self.plan is None:
            return None
        p = self.plan
        if len(self.replicas) >= p.slots:
            return f"{len(self.replicas)} replicas running and this host holds {p.slots} ({p.limited_by})"
        if self._free_slot() is None:
            what = "GPU" if p.host.gpus else "cores"
            return f"no free {what}: every {what} of the plan is in use by a running replica"
        floor = int(FREE_FLOOR * p.host.memory_bytes)
        try:
            avail = self.mem_available()
        except (OSError, ServiceError) as exc:
            return f"cannot read the host's free memory: {exc}"
        if avail - p.need_bytes < floor:
            return (f"MemAvailable {fmt_bytes(avail)} minus one more replica's {fmt_bytes(p.need_bytes)} would leave "
                    f"less than the {fmt_bytes(floor)} kept free")
        return None

    # -- Actuator protocol ---------------------------------------------------------------------------
    def targets(self) -> set[str]:
        return set(self.replicas)

    def act(self, action: str, target: str) -> str:
        if action == "scale_out":  # the target of a scale action is the service (``service``)
            return self.scale_out()
        if action == "scale_in":
            return self.scale_in()
        replica = self.replicas.get(target)
        if replica is None:
            raise RemediationError(f"unknown replica {target!r}")
        if action == "restart":
            return replica.restart(self.start_timeout_s)
        if action == "reset_gpu":
            return self.reset_gpu()
        raise RemediationError(f"action {action!r} is not supported by the local supervisor")

    def reset_gpu(self) -> str:
        """``nvidia-smi --gpu-reset`` (only after a human approved it): the driver refuses while any process
        holds the GPU, so every replica on this host is stopped first and started again after, whatever the
        reset's outcome."""
        with self._scale_lock, contextlib.ExitStack() as held:
            for r in self.replicas.values():  # each replica busy meanwhile: its liveness is not judged
                held.enter_context(r._lock)
            for r in self.replicas.values():
                r.stop()
            try:
                p = subprocess.run(self.gpu_reset, capture_output=True, text=True, timeout=120, check=False)
                result = (f"{' '.join(self.gpu_reset)} exited {p.returncode}: "
                          f"{(p.stdout + p.stderr).strip()[-500:]}")
            except (OSError, subprocess.TimeoutExpired) as exc:
                p, result = None, f"{' '.join(self.gpu_reset)} could not run: {exc}"
            for r in self.replicas.values():
                r.start()
            unhealthy = [r.spec.name for r in self.replicas.values() if not r.wait_healthy(self.start_timeout_s)]
            if p is None or p.returncode != 0:
                raise RemediationError(f"GPU reset failed ({result}); replicas started again")
            if unhealthy:
                raise RemediationError(f"GPU reset done ({result}) but {unhealthy} did not become healthy")
            return f"GPU reset: {result}; {len(self.replicas)} replicas started again"

    def failure_reason(self, target: str) -> str | None:
        """Why a replica is not healthy, in its own words (a failed load names the file that did not match)."""
        r = self.replicas.get(target)
        return None if r is None else r.failure()

    def _victim(self) -> Replica:
        """The replica a scale-in removes, as a ReplicaSet picks: an unhealthy one first, then the newest."""
        return max(self.replicas.values(), key=lambda r: (not r.healthy(), r.started_at))

    def capacity(self) -> tuple[int, int]:
        """(replicas, healthy replicas left if a scale-in ran now)."""
        if not self.replicas:
            return 0, 0
        healthy = sum(r.healthy() for r in self.replicas.values())
        return len(self.replicas), healthy - int(self._victim().healthy())

    def scale_in(self, drain_timeout_s: float = 30.0) -> str:
        """Remove one replica, all or nothing: take it out of the scrape targets first (so its absence pages
        no one), then drain it and stop it. A failed step puts back what was changed and says so."""
        with self._scale_lock:
            if len(self.replicas) <= 1:
                raise RemediationError("one replica left: not scaling in")
            victim = self._victim()
            name = victim.spec.name
            rest = [r.spec for r in self.replicas.values() if r.spec.name != name]
            try:
                self.on_change(rest)
            except Exception as exc:
                self._restore_targets()
                raise RemediationError(f"scale-in of {name} rolled back: the targets could not be updated ({exc}); "
                                       f"{len(self.replicas)} replicas still serve") from exc
            drained = victim.drain(drain_timeout_s)
            try:
                victim.stop()
            except Exception as exc:
                self._restore_targets()
                raise RemediationError(f"scale-in of {name} rolled back: it could not be stopped ({exc})") from exc
            self.replicas = {n: r for n, r in self.replicas.items() if n != name}
            return f"scaled in: stopped {name} ({drained}); {len(self.replicas)} replicas"

    def _restore_targets(self) -> None:
        try:
            self.on_change([r.spec for r in self.replicas.values()])
        except Exception as exc:  # noqa: BLE001 - reported with the rollback; the next change rewrites them
            log.error("could not restore the scrape targets after a failed scale action: %s", exc)

    def scale_out(self, like: ReplicaSpec | None = None) -> str:
        """Start one more replica like ``like`` (default: the first healthy one) on a free port, up to
        ``max_replicas``."""
        with self._scale_lock:
            if like is None:
                like = next((r.spec for r in self.replicas.values() if r.healthy()),
                            next(iter(self.replicas.values())).spec)
            if len(self.replicas) >= self.max_replicas:
                raise RemediationError(f"already at replicas.max_count={self.max_replicas}: a human must add capacity")
            no_room = self.room()  # the policy asked a moment ago; the host may have changed since
            if no_room is not None:
                raise RemediationError(f"host full: {no_room}; a human must add capacity")
            i = len(self.replicas)
            while f"replica-{i}" in self.replicas:
                i += 1
            name = f"replica-{i}"
            slot = self._free_slot()
            placement: dict[str, Any] = {}
            if self.plan is not None and slot is not None:
                placement = {"gpu": slot} if self.plan.host.gpus else {"cores": self.plan.cores_for(slot)}
                placement = {k: v for k, v in placement.items() if v != ()}
            spec = dataclasses.replace(like, name=name, port=free_port(like.host),
                                       log_dir=like.log_dir.parent.parent / name / "logs", **placement)
            replica = Replica(spec, self.run_dir, self.children, self._stopping)
            replica.start()
            if not replica.wait_healthy(self.start_timeout_s):
                replica.stop()
                raise RemediationError(f"new replica {name} did not become healthy within {self.start_timeout_s:.0f}s")
            self.replicas = {**self.replicas, name: replica}  # copy-on-write: readers iterate safely
            try:
                self.on_change([r.spec for r in self.replicas.values()])
            except Exception as exc:  # a replica nobody scrapes or ships logs from is worse than none
                self.replicas = {n: r for n, r in self.replicas.items() if n != name}
                replica.stop()
                self._restore_targets()
                raise RemediationError(f"scale-out rolled back: {name} was started but could not be added to the "
                                       f"scrape targets ({exc}); it was stopped") from exc
            self._added = name
            return f"scaled out: started {name} (pid {replica.pid}) on {spec.url}; {len(self.replicas)} replicas"

    def verify(self, target: str, timeout_s: float, action: str = "restart") -> bool:
        """What the action promised: a restarted (or reset) target serves again; a scale-out's new replica
        serves (not the replica whose alert asked for it: that one may be the overloaded or a broken one, and
        waiting for it would hold the concurrency cap); after a scale-in every remaining replica serves."""
        if action == "scale_out" and self._added in self.replicas:
            return self.replicas[self._added].wait_healthy(timeout_s)
        if action == "scale_in" or target not in self.replicas:
            return all(r.wait_healthy(timeout_s) for r in list(self.replicas.values()))
        return self.replicas[target].wait_healthy(timeout_s)

    def incarnation(self, target: str) -> float | None:
        """When the target's current process started (None: unknown target)."""
        r = self.replicas.get(target)
        return r.started_at if r is not None and r.started_at else None
