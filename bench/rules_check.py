"""`sentinel rules check` against `promtool check rules` on one large rule file: wall time and peak memory
of each, same file, same run.

Usage: .venv/bin/python bench/rules_check.py [--groups 266] [--rules-per-group 100]
The default writes a ~5.6 MB file of 26,600 rules (a third recording rules, the rest alerts with labels
and templated annotations). Target: sentinel within 2x promtool's time and memory (issue #11).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def write_file(path: Path, groups: int, per_group: int) -> int:
    out, n = [], 0
    for g in range(groups):
        rules = []
        for r in range(per_group):
            n += 1
            if r % 3 == 0:
                rules.append({"record": f"job:metric_{n}:rate5m",
                              "expr": f'sum by (job) (rate(http_requests_total{{code="{n % 5}00"}}[5m]))'})
            else:
                rules.append({"alert": f"Alert{n}", "expr": f'rate(errors_total{{svc="s{n}"}}[5m]) > {n % 10}',
                              "for": "5m", "labels": {"severity": "page", "team": f"t{n % 7}"},
                              "annotations": {"summary": "{{ $labels.instance }} errors at {{ $value | humanize }}",
                                              "description": f"service s{n} is failing"}})
        out.append({"name": f"g{g}", "interval": "30s", "rules": rules})
    path.write_text(yaml.safe_dump({"groups": out}, sort_keys=False, width=1000))
    return n


def measure(cmd: list[str]) -> tuple[float, float, int, str]:
    """(wall seconds, peak RSS MiB, exit code, last output line) of one child process (its own rusage)."""
    with tempfile.TemporaryFile() as out:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        lines = out.read().decode(errors="replace").strip().splitlines()
    return wall, usage.ru_maxrss / 1024, p.returncode, lines[-1] if lines else ""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--groups", type=int, default=266)
    ap.add_argument("--rules-per-group", type=int, default=100)
    args = ap.parse_args()
    promtool = shutil.which("promtool")
    if promtool is None:
        sys.exit("promtool not found (apt-get install prometheus; scripts/setup.sh installs it)")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.yaml"
        n = write_file(path, args.groups, args.rules_per_group)
        size = path.stat().st_size / 1e6
        s_wall, s_mem, s_rc, s_out = measure([sys.executable, "-m", "sentinel.cli", "rules", "check", str(path)])
        p_wall, p_mem, p_rc, p_out = measure([promtool, "check", "rules", str(path)])
    if s_rc != 0 or p_rc != 0:
        sys.exit(f"a check failed: sentinel rc={s_rc} ({s_out}); promtool rc={p_rc} ({p_out})")
    print(f"{size:.1f} MB, {n:,} rules: promtool {p_wall:.2f} s, {p_mem:.0f} MiB; sentinel {s_wall:.2f} s, "
          f"{s_mem:.0f} MiB (sentinel's time includes its own promtool run for the PromQL parse)")
    print(f"ratio sentinel / promtool: time {s_wall / p_wall:.2f}x, memory {s_mem / p_mem:.2f}x (target <= 2x)")
    print(json.dumps({"rules": n, "mb": round(size, 2), "time_ratio": round(s_wall / p_wall, 3),
                      "mem_ratio": round(s_mem / p_mem, 3)}))


if __name__ == "__main__":
    main()
