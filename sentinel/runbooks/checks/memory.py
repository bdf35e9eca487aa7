"""Host memory: headroom, commit, huge pages, and fragmentation from /proc/buddyinfo."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field

from sentinel.runbooks.base import Context, Finding, Params, Status, check


class MemoryParams(Params):
    min_available_pct: float = Field(20.0, ge=0, le=100, description="warn below (the seed's 20 % headroom)")
    fail_available_pct: float = Field(10.0, ge=0, le=100)
    order: int = Field(9, ge=0, le=10, description="block order for the fragmentation index (9: 2 MiB)")
    max_unusable_index: float = Field(0.9, ge=0, le=1)


def read_meminfo(proc: Path) -> dict[str, int]:
    """/proc/meminfo in bytes (values in kB are converted; HugePages_* are counts)."""
    out = {}
    for line in (proc / "meminfo").read_text().splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if not parts:
            continue
        value = int(parts[0])
        out[name.strip()] = value * 1024 if len(parts) > 1 and parts[1] == "kB" else value
    return out


def read_buddyinfo(proc: Path) -> dict[str, list[int]]:
    """Free block counts per order, per ``node N zone Z``."""
    zones = {}
    for line in (proc / "buddyinfo").read_text().splitlines():
        head, _, counts = line.partition("zone")
        fields = counts.split()
        if not fields:
            continue
        zones[f"{head.strip().rstrip(',').lower()} zone {fields[0]}"] = [int(x) for x in fields[1:]]
    return zones


def unusable_index(counts: list[int], order: int) -> float:
    """Share of free memory unusable for an allocation of ``2**order`` pages (Gorman's unusable index)."""
    total = sum(n << i for i, n in enumerate(counts))
    if total == 0:
        return 1.0
    usable = sum(n << i for i, n in enumerate(counts) if i >= order)
    return (total - usable) / total


@check("memory", MemoryParams)
def memory_check(p: MemoryParams, ctx: Context) -> Finding:
    """MemAvailable against MemTotal, Committed_AS against CommitLimit, huge pages, fragmentation."""
    mi = read_meminfo(ctx.proc)
    total, avail = mi["MemTotal"], mi.get("MemAvailable", mi.get("MemFree", 0))
    avail_pct = 100.0 * avail / total
    page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
    zones = read_buddyinfo(ctx.proc)
    width = max((len(c) for c in zones.values()), default=11)
    merged = [sum(c[i] for c in zones.values() if i < len(c)) for i in range(width)]
    frag = unusable_index(merged, p.order)
    try:
        overcommit = int((ctx.proc / "sys/vm/overcommit_memory").read_text().strip())
    except (OSError, ValueError):
        overcommit = None
    evidence = {
        "mem_total_bytes": total, "mem_available_bytes": avail, "available_pct": round(avail_pct, 1),
        "committed_as_bytes": mi.get("Committed_AS"), "commit_limit_bytes": mi.get("CommitLimit"),
        "overcommit_memory": overcommit, "hugepages_total": mi.get("HugePages_Total"),
        "hugepages_free": mi.get("HugePages_Free"), "hugepage_size_bytes": mi.get("Hugepagesize"),
        "free_blocks_per_order": merged, "block_bytes": page << p.order,
        f"unusable_index_order_{p.order}": round(frag, 3),
    }
    problems: list[tuple[Status, str, str]] = []
    if avail_pct < p.fail_available_pct:
        problems.append((Status.FAIL, f"only {avail_pct:.1f}% of memory available",
                         "free memory or move replicas; the next large allocation (model load, KV cache) may fail"))
    elif avail_pct < p.min_available_pct:
        problems.append((Status.WARN, f"{avail_pct:.1f}% of memory available (< {p.min_available_pct:g}% headroom)",
                         "keep 20% headroom: reduce batch size / KV cache or add memory"))
    committed, limit = mi.get("Committed_AS", 0), mi.get("CommitLimit", 0)
    if overcommit == 2 and limit and committed > 0.95 * limit:
        problems.append((Status.WARN, f"Committed_AS at {100 * committed / limit:.0f}% of CommitLimit with strict "
                         "overcommit", "raise vm.overcommit_ratio or free memory; allocations will fail at the limit"))
    if mi.get("HugePages_Total") and mi.get("HugePages_Free") == 0:
        problems.append((Status.WARN, "all reserved huge pages are in use", "reserve more huge pages"))
    if frag > p.max_unusable_index:
        problems.append((Status.WARN, f"memory fragmented: {100 * frag:.0f}% of free memory is unusable for "
                         f"{(page << p.order) // 1024} KiB blocks",
                         "large contiguous allocations may fail or stall in compaction: "
                         "echo 1 > /proc/sys/vm/compact_memory, or restart the process holding fragmented memory"))
    if not problems:
        return Finding(Status.OK, f"{avail_pct:.1f}% available; unusable index (order {p.order}) {frag:.2f}",
                       evidence)
    worst = max(problems, key=lambda x: x[0] == Status.FAIL)
    return Finding(worst[0], "; ".join(x[1] for x in problems), evidence, " / ".join(x[2] for x in problems))
