"""Log-rule evaluation at scale: 200 rules over N indexed lines, the total query time of one evaluation
cycle from Elasticsearch and from the local store's two query paths, same lines, same rules, same instant.

Usage: .venv/bin/python bench/log_rules.py [--lines 1000000] [--rules 200]
Starts its own Elasticsearch node (scripts/elasticsearch.sh on a free port) and stops it after. Lines
are bulk-indexed directly (the shipper's throughput is bench/shipping.py's business); the rules mix
every rule type with filters and query keys, over 5- to 30-minute windows.

The candidates for the local store, side by side: SQLite alone (JSON rows, a time index: what a process
other than sentinel's reads) and SQLite with the DuckDB column index beside it (what sentinel answers log
rules from). Printed: insertion rate, the cycle's time per rule, the ratio to Elasticsearch, size on disk.
A cycle is timed after one untimed cycle over every rule (flatline and spike learn their groups on their
first evaluation), as every evaluation after sentinel's first.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from elasticsearch import Elasticsearch, helpers  # noqa: E402
from served import local_elasticsearch  # noqa: E402

from sentinel.logstore.elasticsearch import ElasticsearchLogStore, ElasticsearchSink, index_for  # noqa: E402
from sentinel.logstore.local import LocalLogStore  # noqa: E402
from sentinel.rules.logtypes import LogRuleType, log_query  # noqa: E402
from sentinel.rules.sources import LogRuleSource  # noqa: E402

T_END = 1795900000.0


def events(n: int, seed: int = 0) -> list[tuple[float, dict[str, object]]]:
    rng = random.Random(seed)
    span = 3600.0  # one hour of traffic
    out = []
    for i in range(n):
        ts = T_END - span + span * i / n
        cuda = "CUDA error: an illegal memory access" if rng.random() < 0.002 else None
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts * 1000) % 1000:03d}Z"
        out.append((ts, {"@timestamp": stamp,
                         "replica": f"replica-{rng.randrange(8)}", "level": "error" if cuda else "info",
                         "cuda_error": cuda, "inference_time": round(rng.lognormvariate(5, 0.6), 2),
                         "batch_size": rng.randint(1, 32), "finish_reason": rng.choice(["stop", "length", "abort"]),
                         "message": "inference request failed" if cuda else "inference request completed",
                         "event.id": f"{seed}-{i}"}))
    return out


def rules(n: int, seed: int = 1) -> list[LogRuleType]:
    rng = random.Random(seed)
    kinds = [
        lambda: log_query(type="any", filter=[{"exists": "cuda_error"}], timeframe=rng.choice([300, 600]),
                         query_key="replica"),
        lambda: log_query(type="frequency", filter=[{"term": {"level": "error"}}], num_events=rng.randint(2, 20),
                         timeframe=rng.choice([600, 1800]), query_key="replica"),
        lambda: log_query(type="metric_aggregation", metric_agg_key="inference_time", metric_agg_type="percentiles",
                         percentile_range=99, max_threshold=rng.choice([500, 800]), timeframe=300, query_key="replica"),
        lambda: log_query(type="metric_aggregation", metric_agg_key="batch_size", metric_agg_type="avg",
                         min_threshold=rng.randint(5, 20), timeframe=600),
        lambda: log_query(type="spike", filter=[{"range": {"inference_time": {"gt": rng.choice([300, 500])}}}],
                         spike_height=2, timeframe=300, query_key="replica"),
        lambda: log_query(type="flatline", threshold=rng.randint(10, 100), timeframe=300, query_key="replica"),
        lambda: log_query(type="percentage_match", match_bucket_filter=[{"term": {"finish_reason": "abort"}}],
                         max_percentage=rng.choice([20, 40]), timeframe=900, query_key="replica"),
        lambda: log_query(type="new_term", fields=["finish_reason"], timeframe=300, terms_window_size=3000),
        lambda: log_query(type="any", filter=[{"wildcard": {"message": "*failed"}},
                                             {"terms": {"replica": ["replica-1", "replica-2"]}}], timeframe=1800),
    ]
    return [kinds[i % len(kinds)]() for i in range(n)]


def cycle(src: LogRuleSource, qs: list[LogRuleType]) -> tuple[float, int]:
    t0 = time.perf_counter()
    fired = sum(len(src.query(q, T_END)) for q in qs)
    return time.perf_counter() - t0, fired


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=1_000_000)
    ap.add_argument("--rules", type=int, default=200)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="log-rules-bench-"))
    with local_elasticsearch(heap="2g") as url:
        es = Elasticsearch(url, request_timeout=300)
        ElasticsearchSink(es, work / "cp.db").ensure_template()
        data = events(args.lines)
        t0 = time.perf_counter()
        helpers.bulk(es, ({"_index": index_for(ts), "_id": d["event.id"], "_source": d} for ts, d in data),
                     chunk_size=2000)
        es.indices.refresh(index="deepseek-inference-*")
        es.indices.forcemerge(index="deepseek-inference-*", max_num_segments=1)
        t_index = time.perf_counter() - t0
        es_bytes = int(es.indices.stats(index="deepseek-inference-*")["_all"]["primaries"]["store"]["size_in_bytes"])
        stores = {}
        for name, indexed in (("sqlite", False), ("sqlite+duckdb", True)):
            db = work / f"{name}.db"
            store = LocalLogStore(db, column_index=indexed)
            t0 = time.perf_counter()
            for i in range(0, len(data), 50_000):
                store.add(data[i:i + 50_000])
            size = db.stat().st_size + sum(p.stat().st_size for p in work.glob(f"{name}.db-wal")) + \
                (db.with_suffix(".duckdb").stat().st_size if indexed else 0)
            stores[name] = (store, time.perf_counter() - t0, size)
        qs = rules(args.rules)
        sources = {"elasticsearch": LogRuleSource(ElasticsearchLogStore(es, 60)),
                   **{name: LogRuleSource(store) for name, (store, _, _) in stores.items()}}
        times, fired = {}, {}
        for name, src in sources.items():
            cycle(src, qs)  # untimed: warms caches, and flatline and spike rules learn their groups
            times[name], fired[name] = cycle(src, qs)
        n = args.rules
        print(f"{args.lines:,} lines, {n} rules of 9 kinds; one evaluation cycle, per rule:")
        print(f"  elasticsearch   {1000 * times['elasticsearch'] / n:7.1f} ms/rule  indexed at "
              f"{args.lines / t_index:9,.0f} lines/s  {es_bytes / 2**20:6.0f} MiB  samples {fired['elasticsearch']}")
        for name, (_, t_add, size) in stores.items():
            print(f"  {name:15s} {1000 * times[name] / n:7.1f} ms/rule  added at {args.lines / t_add:9,.0f} "
                  f"lines/s  {size / 2**20:6.0f} MiB  samples {fired[name]}  "
                  f"{times[name] / times['elasticsearch']:.2f}x Elasticsearch's time")
        print(json.dumps({"lines": args.lines, "rules": n, "es_cycle_s": round(times["elasticsearch"], 3),
                          "sqlite_cycle_s": round(times["sqlite"], 3),
                          "duckdb_cycle_s": round(times["sqlite+duckdb"], 3),
                          "duckdb_vs_es": round(times["sqlite+duckdb"] / times["elasticsearch"], 2),
                          "sizes_mib": {"elasticsearch": round(es_bytes / 2**20),
                                        **{k: round(v[2] / 2**20) for k, v in stores.items()}}}))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
