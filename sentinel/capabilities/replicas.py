"""The inference replicas sentinel watches and acts on: local child processes it supervises (with their
liveness probe), or, in a cluster, a Deployment's pods reached through the Kubernetes API."""

from __future__ import annotations

import logging
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from inference_core.client import ReplicaError
from inference_core.telemetry import open_nvml
from sentinel.alerts.internal import InternalRule
from sentinel.alerts.state import Sample
from sentinel.capabilities import Clock, Service
from sentinel.errors import ServiceError
from sentinel.hostplan import fmt_bytes
from sentinel.kube import api_client
from sentinel.kube.actuator import KubernetesActuator
from sentinel.logstore.shipper import LogSource
from sentinel.netutil import free_port, port_in_use
from sentinel.process import ChildRegistry
from sentinel.settings import Settings
from sentinel.supervisor import ReplicaSpec, Supervisor

if TYPE_CHECKING:
    from sentinel.hostplan import HostPlan

log = logging.getLogger(__name__)
Liveness = Callable[[float, list[Sample]], None]  # (now, replicas failing their probe) -> the evaluator


def bundled_model_dir(state_dir: Path) -> Path:
    """The bundled model, generated once with a fixed seed (no download), in a child process: the daemon
    itself never loads torch (it would hold some 700 MiB more for its whole life)."""
    d = state_dir / "models" / "deepseek-tiny"
    if not (d / "config.json").exists():
        code = "import sys; from pathlib import Path; from inference_core.model.weights import make_tiny_checkpoint; " \
               "make_tiny_checkpoint(Path(sys.argv[1]), seed=0)"
        p = subprocess.run([sys.executable, "-c", code, str(d)], capture_output=True, text=True, check=False)
        if p.returncode != 0 or not (d / "config.json").exists():
            raise ServiceError(f"generating the bundled model in {d} failed: {p.stderr.strip()[-2000:]}")
    return d


def host_plan(settings: Settings, model_dir: Path, gpus: int) -> HostPlan:
    """The plan of this host for ``replicas.count`` .. ``replicas.max_count`` replicas of ``model_dir``
    (``sentinel/hostplan.py``); ServiceError, naming the numbers, when they do not fit."""
    from inference_core.sizing import flag_value, parse_bytes, replica_footprint
    from sentinel.hostplan import Host, plan_host

    r = settings.replicas
    args = list(r.engine_args)
    try:
        footprint = replica_footprint(model_dir, args)
        given = flag_value(args, "--memory-limit")
        limit = parse_bytes(given) if given else None
    except (OSError, ValueError, KeyError) as exc:
        raise ServiceError(f"cannot plan replicas of {model_dir}: {type(exc).__name__}: {exc}") from exc
    es = settings.logs.elasticsearch_url
    local_es = es is not None and (urlsplit(es).hostname or "") in ("127.0.0.1", "localhost", "::1")
    return plan_host(Host.read(gpus=gpus), footprint, count=r.count, max_count=r.max_count,
                     local_elasticsearch=local_es, local_prometheus=settings.prometheus.url is None,
                     memory_limit=limit, shared_cores=r.cpu_sets == "shared")


def log_source(spec: ReplicaSpec) -> LogSource:
    return LogSource(spec.name, spec.log_dir / "inference.log", {"replica": spec.name})


UNRESPONSIVE_ALERT = "InferenceReplicaUnresponsive"


def liveness_rule() -> InternalRule:
    """A local replica that exited or whose engine stopped making progress (sentinel's own probe of /health,
    the engine's liveness, not the HTTP thread's): restarted as a crash is, through the remediator. Its
    samples are pushed by the probe (``LocalReplicas.probe``)."""
    return InternalRule("sentinel-liveness-internal", {
        "alert": UNRESPONSIVE_ALERT, "labels": {"severity": "page"},
        "annotations": {"summary": "{{ $labels.replica }} {{ $labels.problem }} ({{ $value }} probes in a row): "
                        "sentinel restarts it",
                        "description": "sentinel probes each replica's /health; an engine whose step loop has "
                        "work but made no step for --stall-timeout, or a process that exited, is restarted"},
        "sentinel": {"remediation": "restart"}})


class LocalReplicas:
    """``replicas.count`` inference servers as supervised children (restart, drain, scale, GPU reset), and
    their liveness probe. ``on_change`` hears of every scale-out and scale-in."""

    name = "replicas"

    def __init__(self, settings: Settings, state_dir: Path, children: ChildRegistry,
                 on_change: Callable[[list[ReplicaSpec]], None], liveness: Liveness,
                 on_stage: Callable[[str, str], None] | None = None) -> None:
        self.settings = settings
        self.on_stage = on_stage  # (replica, what it is doing) while the replicas start: a progress display
        self.state_dir = state_dir
        self.children = children
        self.on_change = on_change
        self.liveness = liveness
        self.specs: list[ReplicaSpec] = []
        self.supervisor: Supervisor | None = None
        self.plan: HostPlan | None = None
        # the router proves itself to the replicas with this (then they take its X-Forwarded-For as the client)
        self.proxy_token = secrets.token_urlsafe(24) if settings.router.enabled else None
        self._failures: dict[str, tuple[int, str]] = {}

    @property
    def actuator(self) -> Supervisor:
        assert self.supervisor is not None, "replicas used before they started"
        return self.supervisor

    def start(self, clock: Clock) -> None:
        s = self.settings
        r = s.replicas
        run_dir = self.state_dir / "run"
        model_dir = (r.model_dir or bundled_model_dir(self.state_dir)).resolve()
        ports = r.ports or [free_port() for _ in range(r.count)]
        if len(ports) != r.count:
            raise ServiceError(f"replicas.ports lists {len(ports)} ports for {r.count} replicas")
        for p in ports:
            if port_in_use(p):
                raise ServiceError(f"port {p} is already in use (a stale process?)")
        # without a configured admin token, one for this run (in the replicas' environment only), so sentinel can
        # always drain a replica before restarting it
        admin = r.admin_token.get_secret_value() if r.admin_token else secrets.token_urlsafe(24)
        limits: tuple[str, ...] = ("--rate-limit", f"{r.rate_limit:g}", "--rate-burst", str(r.rate_burst))
        plan = self.plan = host_plan(s, model_dir, self.gpus())
        log.info("host plan: %s", plan.describe())
        if plan.memory_limit is None:  # each replica plans its memory within its share
            limits += ("--memory-limit", str(plan.share_bytes))

        def placement(i: int) -> dict[str, Any]:
            return {"gpu": i} if plan.host.gpus else {"cores": plan.cores_for(i)}

        self.specs = [ReplicaSpec(f"replica-{i}", port, model_dir, run_dir / f"replica-{i}" / "logs",
                                  enable_faults=r.enable_faults, admin_token=admin, proxy_token=self.proxy_token,
                                  served_model_name=r.served_model_name, engine_args=(*limits, *r.engine_args),
                                  **placement(i))
                      for i, port in enumerate(ports)]
        self.supervisor = Supervisor(self.specs, run_dir, self.children, r.start_timeout, max(r.max_count, r.count),
                                     self.on_change, [s.diagnostics.nvidia_smi, "--gpu-reset"], plan)
        self.supervisor.start_all(self.on_stage)
        clock.every(r.liveness_interval, self.probe_liveness, "liveness")

    def begin_stop(self) -> None:
        """sentinel is stopping: a restart or scale-out in flight stops waiting and starts nothing new."""
        if self.supervisor is not None:
            self.supervisor.begin_stop()

    def stop(self) -> None:
        if self.supervisor is not None:
            self.supervisor.stop_all()

    def endpoints(self) -> list[tuple[str, str]]:
        """(name, url) of each replica now: what the router routes to."""
        sup = self.supervisor
        return [] if sup is None else [(x.spec.name, x.spec.url) for x in list(sup.replicas.values())]

    def gpus(self) -> int:
        """NVIDIA GPUs on this host (0 without a driver): one per replica when there are any."""
        nvml = open_nvml()
        if nvml is None:
            return 0
        try:
            return int(nvml.nvmlDeviceGetCount())
        except Exception:  # noqa: BLE001 - a driver that cannot count its GPUs: plan for the CPU
            return 0

    def services(self) -> list[Service]:
        sup = self.supervisor
        if sup is None:
            return []
        out = []
        if self.plan is not None:
            p = self.plan
            out.append(Service("host-plan", "-", None, p.summary()))
        for x in list(sup.replicas.values()):
            where = f"GPU {x.spec.gpu}" if x.spec.gpu is not None else \
                (f"cores {','.join(map(str, x.spec.cores))}" if x.spec.cores else "any core")
            share = f", memory limit {fmt_bytes(self.plan.share_bytes)}" if self.plan is not None else ""
            out.append(Service(x.spec.name, x.spec.url, x.pid, where + share))
        return out

    def status(self) -> list[dict[str, Any]]:
        sup = self.supervisor
        return [] if sup is None else [
            {"name": x.spec.name, "url": x.spec.url, "pid": x.pid, "restarts": x.restarts, "healthy": x.healthy(),
             "logFile": str(x.spec.log_dir / "inference.log")} for x in list(sup.replicas.values())]

    def runbook_rows(self) -> list[dict[str, Any]]:
        """What a runbook may read of each replica (its URL and log file)."""
        return [{k: row[k] for k in ("name", "url", "logFile")} for row in self.status()]

    def probe_liveness(self) -> None:
        """Each local replica's /health: an exited process or an engine that stopped making progress (the
        engine's own liveness: work waiting and no step for --stall-timeout; not the HTTP thread) counts as a
        failed probe; ``liveness_failures`` in a row fire InferenceReplicaUnresponsive, whose remedy is a
        restart. A CUDA error is left to the CudaError rule (its evidence, its page); a replica being restarted
        or still loading is not probed."""
        sup = self.supervisor
        if sup is None:
            return
        failures = self._failures
        samples = []
        for r in list(sup.replicas.values()):
            name = r.spec.name
            if r.busy():
                failures.pop(name, None)
                continue
            problem = None
            if not r.alive():
                problem = "has exited"
            else:
                try:
                    if r.client.health().stalled:
                        problem = "is not making progress (engine stalled)"
                except ReplicaError:
                    problem = "does not answer /health"
            if problem is None:
                failures.pop(name, None)
                continue
            n, _ = failures.get(name, (0, problem))
            failures[name] = (n + 1, problem)
            if n + 1 >= self.settings.replicas.liveness_failures:
                samples.append(Sample({"replica": name, "problem": problem}, float(n + 1)))
        self.liveness(time.time(), samples)


class ClusterReplicas:
    """A Deployment's pods (``kubernetes.enabled``): Filebeat ships their logs, the kubelet probes them, and
    sentinel acts through the API (restart a pod, scale, cordon)."""

    name = "replicas"

    def __init__(self, settings: Settings) -> None:
        k = settings.kubernetes
        self.settings = settings
        self.api = api_client(k)
        self.actuator = KubernetesActuator(self.api, k.namespace, k.deployment, settings.replicas.min_count,
                                           settings.replicas.max_count)
        self.specs: list[ReplicaSpec] = []  # none local

    def start(self, clock: Clock) -> None:
        log.info("acting on deployment %s/%s", self.settings.kubernetes.namespace, self.settings.kubernetes.deployment)

    def stop(self) -> None:
        pass

    def services(self) -> list[Service]:
        k = self.settings.kubernetes
        return [Service(f"deployment:{k.deployment}", f"{k.api_url or 'in-cluster'}", None,
                        f"namespace {k.namespace}; leader election on lease {k.lease_name}")]

    def status(self) -> list[dict[str, Any]]:
        return [{"name": name} for name in sorted(self.actuator.targets())]

    def runbook_rows(self) -> list[dict[str, Any]]:
        return []
