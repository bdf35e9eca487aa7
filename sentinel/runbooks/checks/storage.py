"""Storage: O_DIRECT 4 KiB random-read latency, sequential throughput, free space (seed: SSD < 100 µs)."""

from __future__ import annotations

import mmap
import os
import random
import shutil
import statistics
import time
from pathlib import Path

from pydantic import Field

from sentinel.runbooks.base import Context, Finding, Params, Status, check

BLOCK = 4096
SEQ_BLOCK = 2**20


class StorageParams(Params):
    path: Path | None = Field(None, description="a file or directory on the filesystem to test (default: model)")
    samples: int = Field(256, ge=8, le=100_000)
    threshold_us: float = Field(100.0, gt=0, description="the seed: SSD reads under 100 µs")
    seq_bytes: int = Field(64 * 2**20, ge=SEQ_BLOCK)
    min_free_pct: float = Field(10.0, ge=0, le=100)
    probe_bytes: int = Field(16 * 2**20, ge=BLOCK, description="size of the probe file made when none is large enough")


def _target(p: StorageParams, ctx: Context) -> Path:
    base = p.path or ctx.model_dir
    if base is None:
        raise FileNotFoundError("no path given and no model directory configured")
    return base


def _pick_file(base: Path, min_size: int) -> Path | None:
    if base.is_file():
        return base
    files = sorted((f for f in base.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size, reverse=True)
    return files[0] if files and files[0].stat().st_size >= min_size else None


def _open(path: Path) -> tuple[int, bool]:
    """Open for O_DIRECT reads; some filesystems (tmpfs, overlay) refuse it."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT), True
    except OSError:
        return os.open(path, os.O_RDONLY), False


def _drop_cache(fd: int) -> None:
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def measure(path: Path, samples: int, seq_bytes: int) -> dict[str, float | bool | int]:
    size = path.stat().st_size
    blocks = size // BLOCK
    fd, direct = _open(path)
    buf = mmap.mmap(-1, SEQ_BLOCK)  # page-aligned, as O_DIRECT needs
    view = memoryview(buf)
    rng = random.Random(0)
    lat = []
    try:
        for _ in range(samples):
            off = rng.randrange(blocks) * BLOCK
            if not direct:
                _drop_cache(fd)
            t0 = time.perf_counter_ns()
            os.preadv(fd, [view[:BLOCK]], off)
            lat.append((time.perf_counter_ns() - t0) / 1000.0)
        if not direct:
            _drop_cache(fd)
        want = min(seq_bytes, size - size % SEQ_BLOCK) or BLOCK
        step = SEQ_BLOCK if want >= SEQ_BLOCK else BLOCK
        t_seq = time.perf_counter()
        done = 0
        while done < want:
            n = os.preadv(fd, [view[:step]], done)
            if n <= 0:
                break
            done += n
        seq_s = time.perf_counter() - t_seq
    finally:
        os.close(fd)
        view.release()
        buf.close()
    qs = statistics.quantiles(lat, n=100, method="inclusive")
    return {"o_direct": direct, "file_bytes": size, "p50_us": round(statistics.median(lat), 1),
            "p99_us": round(qs[98], 1), "max_us": round(max(lat), 1), "samples": samples,
            "seq_bytes": done, "seq_mb_s": round(done / seq_s / 1e6, 1) if seq_s > 0 else 0.0}


@check("storage", StorageParams)
def storage_check(p: StorageParams, ctx: Context) -> Finding:
    """4 KiB random-read latency (O_DIRECT) P50/P99 against the threshold, throughput, free space."""
    try:
        base = _target(p, ctx)
    except FileNotFoundError as exc:
        return Finding(Status.SKIPPED, str(exc))
    if not base.exists():
        return Finding(Status.FAIL, f"{base} does not exist", remedy="check the model path and the mount")
    made = None
    target = _pick_file(base, p.probe_bytes)
    if target is None:  # nothing big enough: a probe file beside the model, removed afterwards
        folder = base if base.is_dir() else base.parent
        made = folder / f".sentinel-storage-probe-{os.getpid()}"
        try:
            with made.open("wb") as fh:
                fh.write(os.urandom(p.probe_bytes))
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            made.unlink(missing_ok=True)
            return Finding(Status.SKIPPED, f"no file of {p.probe_bytes} bytes to read and cannot write a probe: {exc}")
        target = made
    try:
        ev: dict[str, object] = {"file": str(target), **measure(target, p.samples, p.seq_bytes)}
    finally:
        if made is not None:
            made.unlink(missing_ok=True)
    usage = shutil.disk_usage(target.parent if made else target)
    free_pct = 100.0 * usage.free / usage.total
    ev.update(free_bytes=usage.free, total_bytes=usage.total, free_pct=round(free_pct, 1),
              threshold_us=p.threshold_us)
    p50, p99 = float(ev["p50_us"]), float(ev["p99_us"])  # type: ignore[arg-type]
    how = "O_DIRECT" if ev["o_direct"] else "page cache dropped before each read (O_DIRECT unsupported here)"
    summary = f"4 KiB random read P50 {p50:.0f} µs, P99 {p99:.0f} µs ({how}); {ev['seq_mb_s']} MB/s sequential; " \
              f"{free_pct:.0f}% free"
    if p50 >= p.threshold_us:
        return Finding(Status.FAIL, summary, ev, f"median read latency is over {p.threshold_us:g} µs: the model "
                       "will load slowly; move it to local NVMe SSD or check the device's health (smartctl)")
    if p99 >= p.threshold_us:
        return Finding(Status.WARN, summary, ev, f"tail read latency is over {p.threshold_us:g} µs: check for "
                       "competing I/O (iostat -x) or a degraded device")
    if free_pct < p.min_free_pct:
        return Finding(Status.WARN, summary, ev, "free space is low: logs and offload folders may fill the disk")
    return Finding(Status.OK, summary, ev)
