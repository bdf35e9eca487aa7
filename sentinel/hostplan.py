"""The host as a whole: how many replicas of a checkpoint one machine holds next to what else runs there,
and what each gets (memory, CPU cores, a GPU), planned before anything starts.

``sentinel up`` reserves memory for Prometheus, a local Elasticsearch, sentinel itself and a floor of free
memory (10 % of the host: what the drills hold MemAvailable above), and divides the rest between the
replicas it may run, up to ``replicas.max_count``. On a CPU host every replica gets a disjoint set of cores
(its affinity, and torch's threads to match), so one more replica adds cores instead of sharing them; on a
GPU host, one GPU each. The host holds as many replicas as memory, cores (or GPUs) and ``max_count`` all
allow: a scale-out past that is refused as a decision ("host full"), and a start that cannot fit even
the replicas asked for is refused with the numbers.

``plan_host`` is pure arithmetic over what ``Host.read`` measured, so it is tested without a machine of
each size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from inference_core.sizing import Footprint, fmt_bytes
from sentinel.errors import ServiceError

MiB, GiB = 2**20, 2**30
PROMETHEUS_BYTES = 512 * MiB      # a single-node Prometheus scraping a few targets every few seconds
ELASTICSEARCH_BYTES = int(1.5 * GiB)  # the 1 GiB heap the test distribution runs with, plus its native memory
SENTINEL_BYTES = 512 * MiB        # the daemon, router, shipper, and the log store's DuckDB index (128 MiB cap)
FREE_FLOOR = 0.10                 # of the host's memory, never planned away: MemAvailable stays above it


@dataclass(frozen=True)
class Host:
    """What the machine has: memory (the cgroup's limit where one is set), the cores this process may
    run on, and its GPUs."""

    memory_bytes: int
    cores: tuple[int, ...]
    gpus: int = 0

    @staticmethod
    def read(proc_root: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup"), gpus: int = 0) -> Host:
        from inference_core.telemetry import memory_limit_bytes

        return Host(memory_limit_bytes(proc_root, cgroup_root), tuple(sorted(os.sched_getaffinity(0))), gpus)


def mem_available(proc_root: Path = Path("/proc")) -> int:
    """MemAvailable now, in bytes."""
    for line in (proc_root / "meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise ServiceError(f"{proc_root}/meminfo has no MemAvailable")


@dataclass(frozen=True)
class HostPlan:
    host: Host
    footprint: Footprint              # one replica's need, as estimated from its checkpoint and flags
    need_bytes: int                   # what is planned per replica (the footprint, or its --memory-limit)
    reserved: dict[str, int]          # what else the host keeps: prometheus, elasticsearch, sentinel, free floor
    slots: int                        # replicas the host holds (at most max_count)
    limited_by: str                   # what sets ``slots``
    share_bytes: int                  # each replica's memory limit (its share of what the replicas get)
    cores_per_replica: int
    core_sets: tuple[tuple[int, ...], ...] = field(default=())  # slot i runs on core_sets[i] (CPU hosts)
    memory_limit: int | None = None   # the --memory-limit the replicas were given by hand, if any

    @property
    def replica_budget(self) -> int:
        return self.host.memory_bytes - sum(self.reserved.values())

    def cores_for(self, slot: int) -> tuple[int, ...]:
        return self.core_sets[slot] if slot < len(self.core_sets) else ()

    def as_dict(self) -> dict[str, object]:
        """For ``/api/v1/status`` and ``up.json``."""
        return {"memoryBytes": self.host.memory_bytes, "cores": list(self.host.cores), "gpus": self.host.gpus,
                "reservedBytes": dict(self.reserved), "replicaNeedBytes": self.need_bytes,
                "footprintBytes": vars(self.footprint), "slots": self.slots, "limitedBy": self.limited_by,
                "replicaMemoryLimitBytes": self.share_bytes, "coreSets": [list(c) for c in self.core_sets]}

    def summary(self) -> str:
        """One short line for ``sentinel up``'s table (``describe`` has the whole plan, for the log)."""
        each = "one GPU" if self.host.gpus else (f"{self.cores_per_replica} core(s)" if self.core_sets
                                                 else "shared cores")
        kept = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in self.reserved.items())
        return (f"holds {self.slots} replica(s) ({self.limited_by}); each needs {fmt_bytes(self.need_bytes)}, "
                f"gets {fmt_bytes(self.share_bytes)} and {each}; kept: {kept}")

    def describe(self) -> str:
        kept = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in self.reserved.items())
        f = self.footprint
        where = "one GPU each" if self.host.gpus else \
            (f"{self.cores_per_replica} core(s) each" if self.core_sets else "every core shared")
        return (f"host {fmt_bytes(self.host.memory_bytes)}, {len(self.host.cores)} cores"
                + (f", {self.host.gpus} GPUs" if self.host.gpus else "") + f"; kept: {kept}. "
                f"One replica needs {fmt_bytes(self.need_bytes)} (weights {fmt_bytes(f.weights)}, KV cache "
                f"{fmt_bytes(f.kv_cache)}, activations {fmt_bytes(f.activation)}, runtime {fmt_bytes(f.runtime)}). "
                f"The host holds {self.slots} replica(s) ({self.limited_by}), {fmt_bytes(self.share_bytes)} and "
                f"{where}")


def plan_host(host: Host, footprint: Footprint, *, count: int, max_count: int, local_elasticsearch: bool,
              local_prometheus: bool = True, memory_limit: int | None = None, shared_cores: bool = False) -> HostPlan:
    """How many replicas fit and what each gets; ``ServiceError`` naming the numbers when not even the
    ``count`` replicas asked for fit (one, when a single replica is more than the host can hold).
    ``shared_cores`` (``replicas.cpu_sets: shared``): every replica may run on every core, and memory alone
    bounds the plan — for models too small to keep a core busy."""
    reserved = {"sentinel": SENTINEL_BYTES}
    if local_prometheus:
        reserved["prometheus"] = PROMETHEUS_BYTES
    if local_elasticsearch:
        reserved["elasticsearch"] = ELASTICSEARCH_BYTES
    reserved["free floor (10%)"] = int(FREE_FLOOR * host.memory_bytes)
    budget = host.memory_bytes - sum(reserved.values())
    need = memory_limit if memory_limit is not None else footprint.total
    want = max(count, max_count)
    by_memory = max(0, budget // need) if need > 0 else want
    if host.gpus:
        per, by_devices, unit = 0, host.gpus, f"{host.gpus} GPU(s), one per replica"
    elif shared_cores:
        per, by_devices, unit = len(host.cores), want, "cores shared"
    else:
        # cores for every replica asked for at the start; a replica more gets cores of its own, or none
        per = max(1, len(host.cores) // max(count, 1))
        by_devices, unit = len(host.cores) // per, f"{len(host.cores)} core(s), {per} per replica"
    slots = min(want, by_memory, by_devices)
    limited_by = min(((want, f"replicas.max_count={max_count}"), (by_memory, f"memory: {fmt_bytes(budget)} for "
                      f"replicas / {fmt_bytes(need)} each"), (by_devices, unit)), key=lambda bound: bound[0])[1]
    numbers = (f"the host has {fmt_bytes(host.memory_bytes)}; kept for "
               + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in reserved.items())
               + f", leaving {fmt_bytes(budget)} for replicas; one replica of this checkpoint needs {fmt_bytes(need)} "
               f"(weights {fmt_bytes(footprint.weights)}, KV cache {fmt_bytes(footprint.kv_cache)}, activations "
               f"{fmt_bytes(footprint.activation)}, runtime {fmt_bytes(footprint.runtime)})")
    if by_memory < 1:
        raise ServiceError(f"not even one replica fits this host: {numbers}. Use a smaller or int8 model "
                           "(--quantization int8 in replicas.engine_args), a smaller --kv-cache-memory, or a "
                           "bigger host")
    if slots < count:
        hint = "; replicas.cpu_sets: shared lets replicas share the cores" if limited_by == unit and not host.gpus \
            and not shared_cores else ""
        raise ServiceError(f"replicas.count={count} does not fit this host, which holds {slots} ({limited_by}): "
                           f"{numbers}{hint}")
    share = memory_limit if memory_limit is not None else max(need, budget // max(slots, 1))
    cores = host.cores
    core_sets = () if host.gpus or shared_cores else tuple(tuple(cores[i * per:(i + 1) * per]) for i in range(slots))
    return HostPlan(host, footprint, need, reserved, slots, limited_by, share, per, core_sets, memory_limit)
