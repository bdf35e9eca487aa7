"""Wall time of `sentinel diagnose --all` on this machine and the share spent per check.

Usage: .venv/bin/python bench/diagnose.py [--runs N]
Prints, per run and as medians: the command's wall time, the time inside checks, and each check's
share; the peer is the checks' own time in the same run, so the ratio shows the CLI's fixed cost
(interpreter, imports, report) against the work itself.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from inference_core.model.weights import make_tiny_checkpoint  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    state = Path(tempfile.mkdtemp(prefix="sentinel-bench-"))
    make_tiny_checkpoint(state / "models" / "deepseek-tiny", seed=0)  # so model-files and storage run for real
    walls, inside = [], []
    per_check: dict[str, list[float]] = defaultdict(list)
    for _ in range(args.runs):
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "sentinel.cli", "diagnose", "--all", "--json", "--state-dir",
                              str(state)], cwd=ROOT,
                             capture_output=True, text=True, check=False)
        walls.append(time.perf_counter() - t0)
        doc = json.loads(out.stdout)
        inside.append(sum(r["seconds"] for r in doc["results"]))
        for r in doc["results"]:
            per_check[f"{r['runbook']}/{r['step']} ({r['status']})"].append(r["seconds"])
    wall, work = statistics.median(walls), statistics.median(inside)
    print(f"sentinel diagnose --all: median wall {wall:.2f}s over {args.runs} runs "
          f"(min {min(walls):.2f}s, max {max(walls):.2f}s)")
    print(f"time inside checks: {work:.3f}s; wall / checks ratio: {wall / work:.1f}x "
          "(the rest is interpreter start, imports and rendering)")
    print(f"{'check':45s} {'median s':>9s} {'share of wall':>14s}")
    for name, secs in sorted(per_check.items(), key=lambda kv: -statistics.median(kv[1])):
        m = statistics.median(secs)
        print(f"{name:45s} {m:9.3f} {100 * m / wall:13.1f}%")
    shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    main()
