"""Log shipping into a real Elasticsearch (the integ-test distribution, started by
scripts/elasticsearch.sh): the index template's mappings, daily indices, redaction before anything
leaves the process, and nothing lost or duplicated across an outage or a kill -9 of the shipper."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from elasticsearch import Elasticsearch

from sentinel.logstore.elasticsearch import ElasticsearchSink, LogStoreUnavailable, index_for
from sentinel.logstore.shipper import LogSource, Shipper
from tests.conftest import ElasticsearchNode

pytestmark = pytest.mark.integration


def line(i: int, day: str = "2026-11-28") -> str:
    return json.dumps({"@timestamp": f"{day}T10:00:{i % 60:02d}.000Z", "level": "info", "message": "inference request "
                       f"completed for user a.b{i}@example.com on 2026-11-28", "service.name": "deepseek-inference",
                       "request_id": f"r{i}", "inference_time": 12.5 + i, "batch_size": 3, "cuda_error": None,
                       "prompt_tokens": 7, "completion_tokens": 16}) + "\n"


def count(es: Elasticsearch, source: str | None = None) -> int:
    es.indices.refresh(index="deepseek-inference-*")
    q = {"term": {"replica": source}} if source else {"match_all": {}}
    return int(es.count(index="deepseek-inference-*", query=q)["count"])


def test_template_daily_indices_and_redaction(elasticsearch: ElasticsearchNode, tmp_path: Path) -> None:
    es = Elasticsearch(elasticsearch.url)
    log = tmp_path / "inference.log"
    log.write_text("".join(line(i) for i in range(10)) + line(10, "2026-11-29") + "not json\n")
    sink = ElasticsearchSink(es, tmp_path / "ship.db")
    shipper = Shipper(sink, [LogSource("replica-a", log, {"replica": "replica-a"})])
    assert shipper.run_once() == 11 and shipper.bad_lines == 1
    assert count(es, "replica-a") == 11
    assert es.indices.exists(index=index_for(1795910400.0))  # 2026-11-29
    assert es.count(index="deepseek-inference-2026.11.28", query={"term": {"replica": "replica-a"}})["count"] == 10
    props = es.indices.get_mapping(index="deepseek-inference-2026.11.28")["deepseek-inference-2026.11.28"][
        "mappings"]["properties"]
    assert props["@timestamp"]["type"] == "date" and props["inference_time"]["type"] == "float"
    # batch_size is the engine's mean sequences per step (3.74 is not 3): float, as the local store keeps it
    assert props["batch_size"]["type"] == "float" and props["cuda_error"]["type"] == "keyword"
    assert props["service"]["properties"]["name"]["type"] == "keyword" and props["request_id"]["type"] == "keyword"
    hit = es.search(index="deepseek-inference-*", query={"term": {"request_id": "r3"}})["hits"]["hits"][0]["_source"]
    assert "example.com" not in json.dumps(hit) and "<email>" in hit["message"] and "XXXX-XX-XX" in hit["message"]
    assert hit["@timestamp"].startswith("2026-11-28")  # the timestamp itself is never redacted
    # the P99 the seed's rule asks for is an aggregation the distribution answers
    agg = es.search(index="deepseek-inference-*", size=0, query={"term": {"replica": "replica-a"}},
                    aggs={"p99": {"percentiles": {"field": "inference_time", "percents": [99]}}})
    assert 21.0 < agg["aggregations"]["p99"]["values"]["99.0"] <= 22.5
    # on-call's view: `sentinel logs query` against the same indices
    from typer.testing import CliRunner

    from sentinel.cli import app

    r = CliRunner().invoke(app, ["logs", "query", "--elasticsearch-url", elasticsearch.url, "--filter", "request_id=r3",
                                 "--filter", '{"range": {"inference_time": {"gt": 15}}}', "--since", "1000d", "--json"])
    assert r.exit_code == 0, r.output
    [doc] = [json.loads(x) for x in r.output.splitlines()]
    assert doc["request_id"] == "r3" and doc["replica"] == "replica-a"


def test_an_outage_loses_nothing_and_duplicates_nothing(elasticsearch: ElasticsearchNode, tmp_path: Path) -> None:
    es = Elasticsearch(elasticsearch.url)
    log = tmp_path / "inference.log"
    src = [LogSource("replica-b", log, {"replica": "replica-b"})]
    with log.open("w") as fh:
        fh.writelines(line(i) for i in range(50))
    shipper = Shipper(ElasticsearchSink(es, tmp_path / "ship.db"), src)
    shipper.run_once()
    elasticsearch.stop()
    try:
        with log.open("a") as fh:  # the replica keeps logging while the store is down
            fh.writelines(line(i) for i in range(50, 120))
        with pytest.raises(LogStoreUnavailable):
            shipper.run_once()
        before = shipper.sink.checkpoint("replica-b")  # type: ignore[attr-defined]
        assert before is not None and before["offset"] == sum(len(line(i)) for i in range(50))
    finally:
        elasticsearch.start()
    es = Elasticsearch(elasticsearch.url)
    fresh = Shipper(ElasticsearchSink(es, tmp_path / "ship.db"), src)  # as after a restart
    fresh.run_once()
    assert count(es, "replica-b") == 120
    # a batch sent twice (a crash between the bulk request and the checkpoint) overwrites itself
    again = Shipper(ElasticsearchSink(es, tmp_path / "replayed.db"), src)
    assert again.run_once() == 120 and count(es, "replica-b") == 120


SHIP_LOOP = """
import sys, time
from pathlib import Path
from elasticsearch import Elasticsearch
from sentinel.logstore.elasticsearch import ElasticsearchSink
from sentinel.logstore.shipper import LogSource, Shipper
s = Shipper(ElasticsearchSink(Elasticsearch(sys.argv[1]), Path(sys.argv[2])),
            [LogSource("replica-c", Path(sys.argv[3]), {"replica": "replica-c"})])
print("ready", flush=True)
while True:
    s.run_once()
    time.sleep(0.01)
"""


def test_kill_9_of_the_shipper_mid_stream(elasticsearch: ElasticsearchNode, tmp_path: Path) -> None:
    es = Elasticsearch(elasticsearch.url)
    log = tmp_path / "inference.log"
    log.touch()
    proc = subprocess.Popen([sys.executable, "-c", SHIP_LOOP, elasticsearch.url, str(tmp_path / "ship.db"), str(log)],
                            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    written = 0
    with log.open("a") as fh:
        for _ in range(40):  # keep writing while it ships; kill it in the middle
            fh.writelines(line(written + i) for i in range(25))
            fh.flush()
            written += 25
            time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    with log.open("a") as fh:
        fh.writelines(line(written + i) for i in range(100))
    written += 100
    source = LogSource("replica-c", log, {"replica": "replica-c"})
    restarted = Shipper(ElasticsearchSink(es, tmp_path / "ship.db"), [source])
    restarted.run_once()
    assert count(es, "replica-c") == written == 1100


def test_log_rules_answer_the_same_from_both_stores(elasticsearch: ElasticsearchNode, tmp_path: Path) -> None:
    """The same lines shipped to the local store and to Elasticsearch: every rule gives the same samples
    at every evaluation time (ElastAlert's any and frequency, filters, query_key, window edges)."""
    from sentinel.logstore.elasticsearch import ElasticsearchLogStore
    from sentinel.logstore.local import LocalLogStore
    from sentinel.rules.logtypes import log_query
    from sentinel.rules.sources import LogRuleSource

    t0 = 1795900000.0  # 2026-11-28T...Z
    sources = []
    for r in range(3):
        path = tmp_path / f"replica-{r}.log"
        with path.open("w") as fh:
            for i in range(60):
                ts = t0 + i * 5 + r  # one line every 5 s per replica, offset by the replica
                cuda = "CUDA error: an illegal memory access" if (i + r) % 7 == 0 else None
                fh.write(json.dumps({"@timestamp": datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")
                                     .replace("+00:00", "Z"), "level": "error" if cuda else "info",
                                     "cuda_error": cuda, "batch_size": i % 4, "finish_reason": "length" if i % 3
                                     else "stop", "message": "inference request failed" if cuda
                                     else "inference request completed", "inference_time": 40.0 + (i * 37) % 600})
                         + "\n")
        sources.append(LogSource(f"replica-{r}", path, {"replica": f"replica-{r}", "host.name": "h"}))
    local = LocalLogStore(tmp_path / "logs.db")
    Shipper(local, sources).run_once()
    indexed = LocalLogStore(tmp_path / "indexed.db", column_index=True)  # the daemon's: DuckDB columns
    Shipper(indexed, sources).run_once()
    es = Elasticsearch(elasticsearch.url)
    Shipper(ElasticsearchSink(es, tmp_path / "ship.db"), sources).run_once()
    es.indices.refresh(index="deepseek-inference-*")
    a, b, c = LogRuleSource(local), LogRuleSource(ElasticsearchLogStore(es)), LogRuleSource(indexed)
    rules = [log_query(type="any", filter=[{"exists": "cuda_error"}], timeframe=60, query_key=["replica"]),
             log_query(type="frequency", filter=[{"term": {"level": "error"}}], timeframe=120, num_events=2,
                      query_key=["replica", "host.name"]),
             log_query(type="any", filter=[{"term": {"batch_size": 3}}, {"term": {"finish_reason": "stop"}}],
                      timeframe=30),
             log_query(type="frequency", timeframe=45, num_events=20, query_key=["batch_size"]),
             log_query(type="any", filter=[{"exists": "no_such_field"}], timeframe=300),
             log_query(type="frequency", filter=[{"range": {"inference_time": {"gt": 500}}}], timeframe=60,
                      num_events=2, query_key="replica"),
             log_query(type="any", filter=[{"range": {"batch_size": {"gte": 2, "lt": 3.5}}},
                                          {"terms": {"finish_reason": ["stop", "abort"]}}], timeframe=40),
             log_query(type="any", filter=[{"wildcard": {"message": "*fail?d"}}], timeframe=90,
                      query_key=["replica"]),
             log_query(type="any", filter=[{"wildcard": {"message": "inference*"}}, {"term": {"level": "info"}}],
                      timeframe=20, query_key=["finish_reason"]),
             log_query(type="flatline", filter=[{"term": {"level": "error"}}], threshold=2, timeframe=30,
                      query_key="replica"),
             log_query(type="spike", filter=[{"range": {"inference_time": {"gt": 300}}}], spike_height=1.5,
                      timeframe=25, query_key="replica"),
             log_query(type="percentage_match", match_bucket_filter=[{"term": {"finish_reason": "stop"}}],
                      max_percentage=30, timeframe=40, query_key="replica", query_delay=5),
             log_query(type="new_term", fields=["batch_size", "finish_reason"], timeframe=30, terms_window_size=60),
             log_query(type="change", compare_key="level", timeframe=35, query_key="replica"),
             # query_string: the Lucene subset, the same in both stores (NOT on a missing field holds in both)
             log_query(type="any", filter=[{"query_string": "cuda_error:* AND NOT replica:replica-1"}], timeframe=60,
                      query_key="replica"),
             log_query(type="frequency", filter=[{"query_string": {"query": "batch_size:3 OR (finish_reason:stop AND "
                                                                        "inference_time:[100 TO 400})"}}],
                      timeframe=45, num_events=2, query_key="replica"),
             log_query(type="any", filter=[{"query_string": "NOT _exists_:cuda_error AND batch_size:(0 OR 2) AND "
                                                           "message:inference\\ request*"}], timeframe=30),
             log_query(type="any", filter=[{"query_string": "-cuda_error:\"CUDA error: an illegal memory access\" AND "
                                                           "inference_time:>=600"}], timeframe=60),
             log_query(type="frequency",
                      filter=[{"query_string": "level:error || (batch_size:<1 && !finish_reason:stop)"}],
                      timeframe=40, num_events=3, query_key=["replica"])]
    checked = 0
    hits: dict[int, int] = {}
    for q in rules:
        for at in [t0 + k * 17.5 for k in range(20)] + [t0 + 60.0, t0 + 61.0]:  # on and off the line times
            want = sorted((sorted(s.labels.items()), s.value) for s in a.query(q, at))
            assert sorted((sorted(s.labels.items()), s.value) for s in b.query(q, at)) == want, (q, at)
            assert sorted((sorted(s.labels.items()), s.value) for s in c.query(q, at)) == want, (q, at)
            checked += bool(want)
            hits[id(q)] = hits.get(id(q), 0) + bool(want)
    assert checked > 30  # most evaluations found something: the comparison is not of empty sets
    assert all(hits.get(id(q)) for q in rules if any(f.query_string for f in q.filter)), hits
    metric_rules = [
        log_query(type="metric_aggregation", metric_agg_key="inference_time", metric_agg_type="percentiles",
                 percentile_range=99, max_threshold=500.7, timeframe=60, query_key="replica"),  # the seed's P99
        log_query(type="metric_aggregation", metric_agg_key="inference_time", metric_agg_type="percentiles",
                 percentile_range=50, min_threshold=300.7, timeframe=90),
        # 16 lines per replica in 80 s: t-digest interpolates between ranks; HDR's rank rounds (p/100 * n + 0.5)
        # where a ceiling would not
        log_query(type="metric_aggregation", metric_agg_key="inference_time", metric_agg_type="percentiles",
                 percentile_range=90, min_threshold=10_000, timeframe=80, query_key="replica"),
        log_query(type="metric_aggregation", metric_agg_key="inference_time", metric_agg_type="percentiles",
                 percentile_range=90, min_threshold=10_000, timeframe=80, query_key="replica",
                 percentiles_method="hdr"),
        log_query(type="metric_aggregation", metric_agg_key="inference_time", metric_agg_type="percentiles",
                 percentile_range=99, max_threshold=500.7, timeframe=60, query_key="replica",
                 percentiles_method="hdr"),
        log_query(type="metric_aggregation", metric_agg_key="inference_time", metric_agg_type="avg",
                 max_threshold=300.0, timeframe=45, query_key=["replica", "finish_reason"]),
        log_query(type="metric_aggregation", metric_agg_key="batch_size", metric_agg_type="max",
                 min_threshold=3, timeframe=30, query_key="replica"),
        log_query(type="metric_aggregation", metric_agg_key="inference_time", metric_agg_type="sum",
                 max_threshold=1000, timeframe=20, filter=[{"term": {"level": "info"}}]),
        log_query(type="metric_aggregation", metric_agg_key="cuda_error", metric_agg_type="cardinality",
                 max_threshold=0, timeframe=120),
        log_query(type="metric_aggregation", metric_agg_key="batch_size", metric_agg_type="value_count",
                 min_threshold=5, timeframe=60, query_key="replica"),
    ]
    fired = 0
    for q in metric_rules:
        for at in [t0 + k * 17.5 for k in range(20)]:
            want = {tuple(sorted(s.labels.items())): s.value for s in a.query(q, at)}
            got = {tuple(sorted(s.labels.items())): s.value for s in b.query(q, at)}
            columns = {tuple(sorted(s.labels.items())): s.value for s in c.query(q, at)}
            assert columns.keys() == want.keys() and all(columns[k] == pytest.approx(v, rel=1e-12)
                                                         for k, v in want.items()), (q, at)
            assert set(got) == set(want), (q, at, want, got)
            for k, v in want.items():
                # t-digest: exact below 2,000 values; HDR percentiles: 3 significant digits
                tolerance = 2e-3 if q.percentiles_method == "hdr" and q.metric_agg_type == "percentiles" else 1e-9
                assert got[k] == pytest.approx(v, rel=tolerance), (q, at, k)
            fired += len(want)
    assert fired > 40

    # The Lucene query a dashboard's logs panel sends (sentinel.rules.model.lucene) finds exactly the lines the
    # rule's query DSL finds, in the real Elasticsearch, for every filter above and the escaping cases.
    from sentinel.rules.filters import LogFilter, lucene
    extra = [[{"wildcard": {"message": "inference request*"}}], [{"term": {"message": "inference request completed"}}],
             [{"terms": {"replica": ["replica-0", "replica-2"]}}, {"range": {"inference_time": {"lte": 77}}}],
             [{"range": {"batch_size": {"gt": 1}}}], [{"query_string": "-level:info"}, {"exists": "cuda_error"}],
             [{"term": {"host.name": "h"}}]]
    lucene_hits = 0
    for filters in [q.filter for q in rules if q.filter] + [[LogFilter.model_validate(f) for f in fs] for fs in extra]:
        dsl = es.count(index="deepseek-inference-*", query=ElasticsearchLogStore._query(filters, 0, t0 + 10_000))
        text = es.count(index="deepseek-inference-*", query={"bool": {"filter": [
            {"range": {"@timestamp": {"gt": 0, "lte": int((t0 + 10_000) * 1000), "format": "epoch_millis"}}},
            {"query_string": {"query": lucene(filters)}}]}})
        assert text["count"] == dsl["count"], (lucene(filters), text["count"], dsl["count"])
        lucene_hits += dsl["count"] > 0
    assert lucene_hits >= 15
