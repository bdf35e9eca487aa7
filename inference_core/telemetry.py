"""Prometheus metrics and JSON request logs for the inference core.

Every metric is created against an injected registry so tests never touch globals.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

SERVICE_NAME = "deepseek-inference"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class BusyTracker:
    """Share of wall time the engine spent computing over a sliding window (the CPU's utilization)."""

    def __init__(self, window_s: float = 15.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self.clock = clock
        self._spans: deque[tuple[float, float]] = deque()
        self._lock = threading.Lock()

    def record(self, start: float, end: float) -> None:
        with self._lock:
            self._spans.append((start, end))

    def ratio(self) -> float:
        now = self.clock()
        lo = now - self.window_s
        with self._lock:
            while self._spans and self._spans[0][1] < lo:
                self._spans.popleft()
            busy = sum(min(e, now) - max(s, lo) for s, e in self._spans if e > lo)
        return max(0.0, min(1.0, busy / self.window_s))


def memory_limit_bytes(proc_root: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """The cgroup v2 memory.max when set, else MemTotal."""
    try:
        raw = (cgroup_root / "memory.max").read_text().strip()
        if raw != "max":
            return int(raw)
    except (OSError, ValueError):
        pass
    for line in (proc_root / "meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{proc_root}/meminfo has no MemTotal")


def rss_bytes(proc_root: Path = Path("/proc"), pid: int | str = "self") -> int:
    for line in (proc_root / str(pid) / "status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def open_nvml(nvml: Any = None) -> Any:
    """The pynvml module, initialised, or None where there is no NVIDIA driver (or no nvidia-ml-py)."""
    try:
        if nvml is None:
            import pynvml

            nvml = pynvml
        nvml.nvmlInit()
        return nvml
    except Exception:  # NVMLError_LibraryNotFound and friends: no GPU here, report the CPU instead
        return None


class DeviceCollector(Collector):
    """``gpu_utilization`` (only where NVML reads a GPU) and ``memory_usage_bytes`` / ``memory_limit_bytes`` per
    device (NVML, else the process on the CPU), and ``inference_engine_busy_percent``, the engine's busy ratio,
    on every machine: a CPU's busy ratio is never published as GPU utilization."""

    def __init__(self, busy: BusyTracker, proc_root: Path = Path("/proc"), nvml: Any = None,
                 limit: int | None = None) -> None:
        self.busy = busy
        self.proc_root = proc_root
        self.limit = min(memory_limit_bytes(proc_root), limit) if limit else memory_limit_bytes(proc_root)
        self.nvml = open_nvml(nvml)

    def collect(self) -> Iterable[Metric]:
        busy = GaugeMetricFamily("inference_engine_busy_percent",
                                 "Share of the last 15 s the inference engine spent running steps, in percent.")
        busy.add_metric([], 100.0 * self.busy.ratio())
        yield busy
        if self.nvml is not None:
            yield from self._collect_nvml()
            return
        yield from self._collect_cpu()

    def _collect_nvml(self) -> Iterable[Metric]:
        nv = self.nvml
        util = GaugeMetricFamily("gpu_utilization", "GPU utilization in percent per device (NVML).",
                                 labels=["device"])
        mem = GaugeMetricFamily("memory_usage_bytes", "Memory used per device (NVML).", labels=["device"])
        lim = GaugeMetricFamily("memory_limit_bytes", "Memory per device (NVML); headroom = 1 - usage/limit.",
                                labels=["device"])
        for i in range(nv.nvmlDeviceGetCount()):
            h = nv.nvmlDeviceGetHandleByIndex(i)
            info = nv.nvmlDeviceGetMemoryInfo(h)
            util.add_metric([str(i)], float(nv.nvmlDeviceGetUtilizationRates(h).gpu))
            mem.add_metric([str(i)], float(info.used))
            lim.add_metric([str(i)], float(info.total))
        yield from (util, mem, lim)

    def _collect_cpu(self) -> Iterable[Metric]:
        mem = GaugeMetricFamily("memory_usage_bytes", "Memory used per device (CPU: process RSS).",
                                labels=["device"])
        mem.add_metric(["cpu"], float(rss_bytes(self.proc_root)))
        yield mem
        lim = GaugeMetricFamily("memory_limit_bytes", "Memory limit per device (CPU: --memory-limit, the cgroup "
                                "limit or MemTotal); headroom = 1 - usage/limit.", labels=["device"])
        lim.add_metric(["cpu"], float(self.limit))
        yield lim


class Metrics:
    """The inference core's metrics, all on one registry."""

    def __init__(self, registry: CollectorRegistry, busy: BusyTracker, memory_limit: int | None = None) -> None:
        self.registry = registry
        self.latency = Histogram(
            "model_inference_latency_seconds", "End-to-end latency of an inference request.",
            buckets=LATENCY_BUCKETS, registry=registry)
        self.ttft = Histogram("inference_time_to_first_token_seconds", "Time from request start to its first token.",
                              buckets=LATENCY_BUCKETS, registry=registry)
        self.tpot = Histogram("inference_time_per_output_token_seconds", "Time per output token after the first.",
                              buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0),
                              registry=registry)
        self.queue_time = Histogram("inference_request_queue_time_seconds",
                                    "Time a request waited before it was first scheduled (vLLM's "
                                    "request_queue_time_seconds).", buckets=LATENCY_BUCKETS, registry=registry)
        self.preemptions = Counter("inference_num_preemptions_total", "Sequences preempted (recomputed later) "
                                   "because the KV cache was full.", registry=registry)
        self.kv_cache_usage = Gauge("inference_kv_cache_usage_perc", "KV cache usage, 0-1 (tokens held / capacity).",
                                    registry=registry)
        self.requests = Counter("inference_requests_total", "Inference requests by outcome.",
                                ["status"], registry=registry)
        self.cuda_errors = Counter("cuda_errors_total", "CUDA errors raised by the forward pass.",
                                   registry=registry)
        self.batch_size = Histogram("inference_batch_size", "Sequences per forward step.",
                                    buckets=BATCH_BUCKETS, registry=registry)
        self.prompt_tokens = Counter("inference_prompt_tokens_total", "Prompt tokens processed.",
                                     registry=registry)
        self.generation_tokens = Counter("inference_generation_tokens_total", "Tokens generated.",
                                         registry=registry)
        self.requests_running = Gauge("inference_num_requests_running", "Requests in the engine.",
                                      registry=registry)
        self.requests_waiting = Gauge("inference_num_requests_waiting", "Requests queued.",
                                      registry=registry)
        self.model_info = Info("inference_model", "The model this replica serves (1; the labels say which).",
                               registry=registry)
        self.model_load_failed = Gauge(
            "inference_model_load_failed", "1 while the model failed to load (the replica serves nothing; /health "
            "says why, e.g. a file that does not match the integrity manifest).", registry=registry)
        self.model_load = Gauge("model_load_seconds", "Seconds the model took to load (seed budget: 90 s).",
                                registry=registry)
        self.healthy = Gauge("inference_healthy", "1 when the replica is healthy, 0 after a CUDA error.",
                             registry=registry)
        self.prefix_cache_queries = Counter(
            "inference_prefix_cache_queries_tokens", "Prompt tokens looked up in the prefix cache.", registry=registry)
        self.prefix_cache_hits = Counter(
            "inference_prefix_cache_hits_tokens", "Prompt tokens found in the prefix cache (not computed again).",
            registry=registry)
        self.prefix_cache_hit_rate = Gauge(
            "inference_prefix_cache_hit_rate", "Prefix cache hits / queries (tokens) since start.", registry=registry)
        self.kv_cache_blocks = Gauge("inference_kv_cache_blocks", "Blocks in the paged KV cache.", registry=registry)
        self.kv_cache_block_size = Gauge("inference_kv_cache_block_size_tokens", "Tokens per KV cache block.",
                                         registry=registry)
        self.kv_cache_bytes = Gauge("inference_kv_cache_bytes", "Memory taken by the KV cache.", registry=registry)
        self.max_model_len = Gauge("inference_max_model_len_tokens", "The longest sequence served (prompt + output).",
                                   registry=registry)
        registry.register(DeviceCollector(busy, limit=memory_limit))
        ProcessCollector(registry=registry)


class JsonFormatter(logging.Formatter):
    """One JSON object per line in the field names the ELK pipeline and sentinel's log rules read."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "@timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "message": record.getMessage(),
            "service.name": SERVICE_NAME,
        }
        doc.update(getattr(record, "fields", {}))
        return json.dumps(doc, separators=(",", ":"))


def request_logger(log_dir: Path | None, max_bytes: int = 50 * 2**20, backups: int = 5) -> logging.Logger:
    """A logger writing JSON lines to ``log_dir/inference.log`` with size-based rotation."""
    logger = logging.getLogger(f"inference_core.requests.{os.getpid()}.{id(log_dir)}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    handler: logging.Handler
    if log_dir is None:
        handler = logging.StreamHandler()
    else:
        log_dir.mkdir(parents=True, exist_ok=True)
        handler = RotatingFileHandler(log_dir / "inference.log", maxBytes=max_bytes, backupCount=backups)
    handler.setFormatter(JsonFormatter())
    logger.handlers = [handler]
    return logger
