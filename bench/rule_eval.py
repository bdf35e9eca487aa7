"""Rule evaluation at scale: sentinel against Prometheus's own rule engine, on the same live data.

Usage: .venv/bin/python bench/rule_eval.py [--rules 1000] [--replicas 40] [--cycles 5]
A synthetic exporter serves the inference metrics of many replicas; a real Prometheus scrapes it
every second and evaluates the exported rules itself (`prometheus_rule_group_last_duration_seconds`).
sentinel evaluates the same rules (the default pack's PromQL rules, copied over label sets to the
requested count) through the HTTP API with its state machine and SQLite persistence. Prints both
cycle times, their ratio, and sentinel's CPU per cycle (its own process and Prometheus's share).
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sentinel.alerts.store import Store  # noqa: E402
from sentinel.netutil import free_port  # noqa: E402
from sentinel.prometheus import PromQLSource  # noqa: E402
from sentinel.promserver import PrometheusServer, ScrapeTarget  # noqa: E402
from sentinel.rules.evaluator import Evaluator  # noqa: E402
from sentinel.rules.export import render  # noqa: E402
from sentinel.rules.model import Group, LoadedGroup, Rule, load_rules  # noqa: E402
from sentinel.supervisor import ChildRegistry  # noqa: E402

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Exporter:
    """Counters and gauges of ``n`` replicas, moving a little on every scrape."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.count = [0.0] * n
        self.rng = random.Random(0)
        self.lock = threading.Lock()
        exporter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                body = exporter.render().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def render(self) -> str:
        out = []
        with self.lock:
            for i in range(self.n):
                r = f'replica="replica-{i}"'
                self.count[i] += self.rng.randint(5, 15)
                c = self.count[i]
                for le in BUCKETS:
                    frac = min(1.0, 0.2 + le * 2)
                    out.append(f'model_inference_latency_seconds_bucket{{{r},le="{le}"}} {c * frac:.0f}')
                    out.append(f'inference_time_to_first_token_seconds_bucket{{{r},le="{le}"}} {c * frac:.0f}')
                out.append(f'model_inference_latency_seconds_bucket{{{r},le="+Inf"}} {c:.0f}')
                out.append(f'inference_time_to_first_token_seconds_bucket{{{r},le="+Inf"}} {c:.0f}')
                out.append(f"inference_time_to_first_token_seconds_count{{{r}}} {c:.0f}")
                out.append(f'gpu_utilization{{{r},device="0"}} {self.rng.uniform(50, 99):.1f}')
                out.append(f'memory_usage_bytes{{{r},device="0"}} {self.rng.uniform(60, 90):.1f}')
                out.append(f'memory_limit_bytes{{{r},device="0"}} 100')
                out.append(f"inference_num_requests_waiting{{{r}}} {self.rng.randint(0, 40)}")
                out.append(f"inference_kv_cache_usage_perc{{{r}}} {self.rng.uniform(0.5, 1.0):.3f}")
        return "\n".join(out) + "\n"


def build_groups(n_rules: int, per_group: int, interval: float) -> list[LoadedGroup]:
    pack = [r for g in load_rules(ROOT / "rules") for r in g.group.rules if r.kind == "promql" and r.alert]
    rules = []
    for i in range(n_rules):
        base = pack[i % len(pack)]
        rules.append(Rule.model_validate({**base.model_dump(by_alias=True, exclude={"sentinel"}),
                                          "alert": f"{base.alert}_{i}", "for": "0s",
                                          "labels": {**base.labels, "copy": str(i)}}))
    return [LoadedGroup(file="bench.yaml", group=Group(name=f"g{j}", interval=interval,
                                                       rules=rules[j:j + per_group]))
            for j in range(0, len(rules), per_group)]


def cpu_of(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rules", type=int, default=1000)
    ap.add_argument("--replicas", type=int, default=40)
    ap.add_argument("--per-group", type=int, default=50)
    ap.add_argument("--cycles", type=int, default=5)
    # 1: sentinel's scheduler spreads groups over the interval by a hash of their key, as Prometheus does, so
    # groups rarely overlap; with several at once on a 2-core machine each group's time counts the others' too
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--interval", type=float, default=15.0)
    ap.add_argument("--profile", action="store_true", help="profile one more cycle (cProfile) and print its top lines")
    args = ap.parse_args()
    logging.disable(logging.WARNING)  # thousands of "alert firing" lines are not the point here
    groups = build_groups(args.rules, args.per_group, args.interval)
    exporter = Exporter(args.replicas)
    work = Path(tempfile.mkdtemp(prefix="sentinel-bench-"))
    (work / "rules.yaml").write_text(render(groups, "bench"))
    prom = PrometheusServer(work / "prom", free_port(), [ScrapeTarget("inference", f"127.0.0.1:{exporter.port}", {})],
                            1.0, ChildRegistry(work / "children.json"))
    prom.start()
    try:
        cfg = yaml.safe_load((work / "prom" / "prometheus.yml").read_text())
        cfg["rule_files"] = [str(work / "rules.yaml")]
        cfg["global"]["evaluation_interval"] = f"{int(args.interval)}s"
        (work / "prom" / "prometheus.yml").write_text(yaml.safe_dump(cfg))
        httpx.post(f"{prom.url}/-/reload", timeout=30).raise_for_status()
        print(f"{args.rules} rules in {len(groups)} groups over {args.replicas} replicas; "
              f"waiting for data and two Prometheus evaluation rounds ...", flush=True)
        time.sleep(2 * args.interval + 5)
        src = PromQLSource(prom.url, timeout_s=30)
        ev = Evaluator(Store(work / "sentinel.db"), src, None, default_interval=args.interval)
        ev.load(groups)
        assert prom.proc is not None
        walls, sums, cpus, prom_cpus = [], [], [], []
        pool = ThreadPoolExecutor(args.concurrency)

        def timed(key: str) -> float:
            t = time.perf_counter()
            ev.eval_group(key)
            return time.perf_counter() - t

        for _ in range(args.cycles):
            c0, p0, t0 = time.process_time(), cpu_of(prom.proc.pid), time.perf_counter()
            sums.append(sum(pool.map(timed, list(ev.groups))))
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
            prom_cpus.append(cpu_of(prom.proc.pid) - p0)
        if args.profile:
            import cProfile
            import pstats
            prof = cProfile.Profile()
            prof.enable()
            for key in list(ev.groups):
                ev.eval_group(key)
            prof.disable()
            pstats.Stats(prof).sort_stats("cumtime").print_stats("sentinel|httpx|sqlite|json", 30)
        prom_cycle = sum(float(line.rsplit(" ", 1)[1]) for line in httpx.get(f"{prom.url}/metrics").text.splitlines()
                         if line.startswith("prometheus_rule_group_last_duration_seconds{"))
        unhealthy = sum(1 for rt in ev.all_runtimes() if rt.health != "ok")
        active = sum(len(rt.alerts()) for rt in ev.all_runtimes())
        wall, total = statistics.median(walls), statistics.median(sums)
        cpu, pcpu = statistics.median(cpus), statistics.median(prom_cpus)
        print("Prometheus rule engine: sum of prometheus_rule_group_last_duration_seconds = "
              f"{prom_cycle * 1000:.0f} ms")
        print(f"sentinel: sum of group durations = {total * 1000:.0f} ms; cycle wall time with {args.concurrency} "
              f"groups in parallel = {wall * 1000:.0f} ms (median of {args.cycles}); {unhealthy} unhealthy rules, "
              f"{active} active alerts")
        print(f"ratio sentinel / Prometheus (sum of group durations): {total / prom_cycle:.1f}x")
        print(f"sentinel CPU per cycle: {cpu * 1000:.0f} ms ({100 * cpu / args.interval:.1f}% of one core at a "
              f"{args.interval:g}s interval); Prometheus CPU answering it: {pcpu * 1000:.0f} ms")
    finally:
        prom.stop()
        exporter.server.shutdown()


if __name__ == "__main__":
    main()
