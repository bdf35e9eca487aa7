"""Log shipping into Elasticsearch: sentinel's shipper (read, parse, redact, id, bulk, checkpoint)
against a plain ``elasticsearch.helpers.bulk`` of the same documents, in the same run, on the same
local node (scripts/elasticsearch.sh, started here on a free port and stopped after).

Usage: .venv/bin/python bench/shipping.py [--lines 100000]
Target: shipper lines/s >= 0.8x plain bulk.
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

from sentinel.logstore.elasticsearch import ElasticsearchSink, index_for  # noqa: E402
from sentinel.logstore.shipper import LogSource, Shipper, parse_timestamp  # noqa: E402


def lines(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    t0 = 1795900000.0
    for i in range(n):
        cuda = "CUDA error: an illegal memory access was encountered" if rng.random() < 0.01 else None
        doc = {"@timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t0 + i * 0.01)) + ".000Z",
               "level": "error" if cuda else "info", "message": "inference request completed",
               "service.name": "deepseek-inference", "request_id": f"{rng.getrandbits(128):032x}-0",
               "inference_time": round(rng.uniform(20, 900), 3), "batch_size": rng.randint(1, 32),
               "cuda_error": cuda, "prompt_tokens": rng.randint(5, 500), "completion_tokens": rng.randint(1, 256),
               "finish_reason": rng.choice(["stop", "length"]), "cached_tokens": 0, "ttft_ms": 12.5,
               "preemptions": 0}
        out.append(json.dumps(doc))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=100_000)
    args = ap.parse_args()
    with local_elasticsearch() as url:
        es = Elasticsearch(url, request_timeout=120)
        data = lines(args.lines)
        work = Path(tempfile.mkdtemp(prefix="ship-bench-"))
        log = work / "inference.log"
        log.write_text("\n".join(data) + "\n")
        ElasticsearchSink(es, work / "warm.db").ensure_template()
        es.indices.create(index="plain-bulk", settings={"number_of_shards": 1, "number_of_replicas": 0})

        # the peer: the same documents, already parsed, one bulk stream, ids left to Elasticsearch
        docs = [json.loads(x) for x in data]
        t0 = time.perf_counter()
        ok, _ = helpers.bulk(es, ({"_index": "plain-bulk", "_source": d} for d in docs), chunk_size=500)
        plain = time.perf_counter() - t0
        # ours: from the file, redacted, with ids and checkpoints
        shipper = Shipper(ElasticsearchSink(es, work / "ship.db"), [LogSource("bench", log, {"replica": "r0"})])
        t0 = time.perf_counter()
        shipped = shipper.run_once()
        ours = time.perf_counter() - t0
        es.indices.refresh(index="deepseek-inference-*,plain-bulk")
        n_ours = es.count(index="deepseek-inference-*")["count"]
        assert ok == shipped == n_ours == args.lines, (ok, shipped, n_ours)
        print(f"{args.lines} lines: plain helpers.bulk {args.lines / plain:,.0f} lines/s ({plain:.1f} s); "
              f"sentinel's shipper {args.lines / ours:,.0f} lines/s ({ours:.1f} s), redaction on")
        print(f"ratio shipper / plain bulk: {plain / ours:.2f}x (target >= 0.8x); first index "
              f"{index_for(parse_timestamp(docs[0]['@timestamp'], 0))}")
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
