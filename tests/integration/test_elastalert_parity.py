"""ElastAlert2 as a peer: the same log lines, the same rules, the same matches.

One generated hour of three replicas' request logs is shipped by sentinel's own shipper into the real
Elasticsearch. ElastAlert2 (installed by the set-up in its own virtual environment, var/elastalert2: it pins
an older elasticsearch client) runs every rule over that hour with ``--start/--end``, alerting through its
``debug`` alerter with ``realert: 0``, so every match lands in its writeback index. sentinel runs the same
rules over the same hour with ``sentinel logs test-rule`` (both stores: Elasticsearch and the local store
fed the same lines). The matches must agree per rule and key, each within one evaluation step (30 s).

ElastAlert2 2.19.0 is the newest release that installs on Python 3.11 (later ones need a newer Python).
The integration-test Elasticsearch has no ``rest-root`` module, so ``GET /`` (where ElastAlert2 reads the
server's version) is not served: the wrapper gives it the version instead (``elastalert_shim.py``).

How the two tools' matches line up, and the deliberate differences (each with its reason):
- ElastAlert2 matches events; sentinel evaluates windows at steps. An ElastAlert2 match at time ``ts`` is
  the sentinel match of the same key at the first step at or after ``ts``; a run of sentinel evaluations
  matching one key (an episode) must hold an ElastAlert2 match within one step of it.
- ``any``, ``frequency``: ElastAlert2 matches at the event that completes the count; sentinel at the next
  evaluation, whose window (``timeframe`` back) still holds the events. ElastAlert2 empties a frequency
  key's window after a match; sentinel keeps the key firing while the window holds ``num_events``: an
  alert is a state (as a PromQL rule), and the page is sent once per episode (``realert`` spaces them).
- ``flatline``, ``spike``: the same memory of groups (see ``LogRuleSource``); ElastAlert2 judges silence
  at the end of each query segment (``buffer_time`` = the step here), as sentinel at each step.
- ``metric_aggregation``, ``percentage_match``: ElastAlert2 aggregates over consecutive ``buffer_time``
  segments; sentinel over ``timeframe`` back from each evaluation, sliding by the group's interval, as
  every PromQL rule and ElastAlert2's own frequency window do. With ``timeframe`` equal to the interval
  (as here) the windows are ElastAlert2's; with a longer ``timeframe`` sentinel's overlap, which answers
  sooner and never splits a burst across two segments. That is the reason for the choice.
- ``new_term``: ElastAlert2 learns the terms of ``terms_window_size`` before ``--start`` once, at start;
  sentinel asks the store at each evaluation for the window before. Both find the same new terms here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from sentinel.cli import app
from sentinel.logstore.elasticsearch import ElasticsearchSink
from sentinel.logstore.local import LocalLogStore
from sentinel.logstore.shipper import LogSource, Shipper
from sentinel.rules.logtest import evaluations
from sentinel.rules.model import load_rule_file
from sentinel.rules.sources import LogRuleSource
from tests.conftest import ROOT, ElasticsearchNode

EA_PYTHON = ROOT / "var" / "elastalert2" / "bin" / "python"
pytestmark = [pytest.mark.integration, pytest.mark.skipif(
    not EA_PYTHON.exists() and os.environ.get("CI") != "true",
    reason="ElastAlert2 is not set up (var/elastalert2): run scripts/setup.sh")]

T0 = 1_792_051_200.0  # 2026-10-15T08:00:00Z: a day no other test writes logs for
HOUR = 3600
STEP = 30


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def lines() -> dict[str, list[dict[str, Any]]]:
    """An hour of three replicas, built so that each rule below has matches and non-matches:
    - r0: a line every 5 s; three CUDA errors in 15 s from +10m05s, one alone at +30m05s; slow from +45m
      to +50m (p99 above 600 ms);
    - r1: a line every 5 s, silent from +20m to +40m (flatline; a dip, then a spike against an empty
      reference when it returns);
    - r2: a line every 10 s; a burst of one a second from +30m to +31m (spike); silent from +45m to +48m;
      half its requests cut by length from +20m to +25m (percentage_match); model v2 from +35m (new_term)."""
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)

    def add(replica: str, t: int, i: int, **extra: Any) -> None:
        slow = replica == "r0" and 2700 <= t < 3000
        cut = replica == "r2" and 1200 <= t < 1500
        # one second past each tick: no line sits on a window's edge (which side of --start it falls on)
        doc = {"@timestamp": iso(T0 + t + 1), "level": "info", "message": "inference request completed",
               "request_id": f"{replica}-{t}", "inference_time": float(700 + (i * 13) % 500 if slow
                                                                      else 100 + (i * 37) % 300),
               "batch_size": 1 + (i % 7) / 2, "model": "v2" if replica == "r2" and t >= 2100 else "v1",
               "finish_reason": "length" if (i % 2 == 0 if cut else i % 10 == 0) else "stop"}
        doc.update(extra)
        out[replica].append(doc)

    for i, t in enumerate(range(0, HOUR, 5)):
        cuda = {"cuda_error": "CUDA error: an illegal memory access was encountered", "level": "error",
                "message": "inference request failed"} if t in (605, 610, 615, 1805) else {}
        add("r0", t, i, **cuda)
        if not 1200 <= t < 2400:
            add("r1", t, i)
    times = sorted({*range(0, HOUR, 10), *range(1800, 1860)} - set(range(2700, 2880)))
    for i, t in enumerate(times):
        add("r2", t, i)
    return out


# Each rule: (name, sentinel's log query, ElastAlert2's rule body). Both say the same thing in their syntax.
RULES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("AnyCuda", {"type": "any", "filter": [{"exists": "cuda_error"}], "timeframe": "30s", "query_key": "replica"},
     {"type": "any", "filter": [{"exists": {"field": "cuda_error"}}], "query_key": "replica"}),
    ("FrequentErrors", {"type": "frequency", "filter": [{"term": {"level": "error"}}], "num_events": 3,
                        "timeframe": "1m", "query_key": "replica"},
     {"type": "frequency", "filter": [{"term": {"level": "error"}}], "num_events": 3, "timeframe": {"minutes": 1},
      "query_key": "replica"}),
    ("Flatline", {"type": "flatline", "threshold": 3, "timeframe": "1m", "query_key": "replica"},
     {"type": "flatline", "threshold": 3, "timeframe": {"minutes": 1}, "query_key": "replica"}),
    ("FlatlineForget", {"type": "flatline", "threshold": 3, "timeframe": "1m", "query_key": "replica",
                        "forget_keys": True},
     {"type": "flatline", "threshold": 3, "timeframe": {"minutes": 1}, "query_key": "replica", "forget_keys": True}),
    ("SpikeUp", {"type": "spike", "spike_height": 3, "spike_type": "up", "threshold_cur": 1, "timeframe": "2m",
                 "query_key": "replica"},
     {"type": "spike", "spike_height": 3, "spike_type": "up", "threshold_cur": 1, "timeframe": {"minutes": 2},
      "query_key": "replica"}),
    ("DipWithThresholds", {"type": "spike", "spike_height": 3, "spike_type": "down", "threshold_ref": 10,
                           "timeframe": "2m", "query_key": "replica"},
     {"type": "spike", "spike_height": 3, "spike_type": "down", "threshold_ref": 10, "timeframe": {"minutes": 2},
      "query_key": "replica"}),
    ("SpikeBoth", {"type": "spike", "spike_height": 1.5, "spike_type": "both", "timeframe": "2m"},
     {"type": "spike", "spike_height": 1.5, "spike_type": "both", "timeframe": {"minutes": 2}}),
    ("NewModel", {"type": "new_term", "fields": ["model"], "timeframe": "30s", "terms_window_size": "1d"},
     {"type": "new_term", "fields": ["model"], "terms_window_size": {"days": 1}}),
    ("P99Slow", {"type": "metric_aggregation", "metric_agg_key": "inference_time", "metric_agg_type": "percentiles",
                 "percentile_range": 99, "max_threshold": 600, "timeframe": "30s", "query_key": "replica"},
     {"type": "metric_aggregation", "metric_agg_key": "inference_time", "metric_agg_type": "percentiles",
      "percentile_range": 99, "max_threshold": 600, "query_key": "replica", "buffer_time": {"seconds": STEP}}),
    ("CutByLength", {"type": "percentage_match", "match_bucket_filter": [{"term": {"finish_reason": "length"}}],
                     "max_percentage": 30, "timeframe": "30s", "query_key": "replica"},
     {"type": "percentage_match", "match_bucket_filter": [{"term": {"finish_reason": "length"}}],
      "max_percentage": 30, "query_key": "replica", "buffer_time": {"seconds": STEP}}),
]


Matches = dict[str, set[tuple[str, int]]]  # rule -> {(key, seconds after T0)}


def _key(rule: dict[str, Any], fields: dict[str, Any]) -> str:
    """The group a match is about: the query_key's value, a new_term's term, or "" for the whole stream."""
    if rule["type"] == "new_term":
        return str(fields.get(rule["fields"][0], ""))
    return str(fields.get("replica", fields.get("key", ""))) if rule.get("query_key") else ""


def elastalert(work: Path, es_url: str) -> Matches:
    rules = work / "elastalert-rules"
    rules.mkdir()
    for name, _, body in RULES:
        (rules / f"{name}.yaml").write_text(yaml.safe_dump({
            "name": name, "index": "deepseek-inference-*", "timestamp_field": "@timestamp",
            "realert": {"minutes": 0}, "alert": ["debug"], **body}))
    host, port = es_url.removeprefix("http://").rsplit(":", 1)
    config = work / "elastalert.yaml"
    config.write_text(yaml.safe_dump({"rules_folder": str(rules), "run_every": {"seconds": STEP},
                                      "buffer_time": {"seconds": STEP}, "es_host": host, "es_port": int(port),
                                      "writeback_index": "elastalert-parity", "alert_time_limit": {"days": 1}}))
    r = subprocess.run([str(EA_PYTHON), str(Path(__file__).with_name("elastalert_shim.py")), "--config", str(config),
                        "--start", iso(T0), "--end", iso(T0 + HOUR), "--es-version", "8.17.4"],
                       capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    bodies = {name: body for name, _, body in RULES}
    out: Matches = defaultdict(set)
    for line in r.stdout.splitlines():
        found = json.loads(line)
        m = found["match"]
        at = datetime.fromisoformat(str(m["_detected_at"]).replace("Z", "+00:00")).timestamp()
        out[found["rule"]].add((_key(bodies[found["rule"]], m), round(at - T0)))
    return out


def sentinel(work: Path, *store: str) -> Matches:
    path = work / "sentinel-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "parity", "interval": f"{STEP}s", "rules": [
        {"alert": name, "log": q} for name, q, _ in RULES]}]}))
    res = CliRunner().invoke(app, ["logs", "test-rule", str(path), "--start", iso(T0 + STEP), "--end", iso(T0 + HOUR),
                                   "--json", *store])
    assert res.exit_code == 0, res.output
    queries = {name: q for name, q, _ in RULES}
    out: Matches = defaultdict(set)
    for line in res.output.splitlines():
        m = json.loads(line)
        at = datetime.fromisoformat(m["at"].replace("Z", "+00:00")).timestamp()
        out[m["rule"]].add((_key(queries[m["rule"]], m["labels"]), round(at - T0)))
    return out


@pytest.fixture(scope="module")
def runs(elasticsearch: ElasticsearchNode, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Matches, ...]]:
    if not EA_PYTHON.exists():
        pytest.fail("ElastAlert2 is not set up (var/elastalert2): run scripts/setup.sh")
    from elasticsearch import Elasticsearch

    work = tmp_path_factory.mktemp("elastalert-parity")
    sources = []
    for replica, docs in lines().items():
        path = work / f"{replica}.log"
        path.write_text("".join(json.dumps(d) + "\n" for d in docs))
        sources.append(LogSource(replica, path, {"replica": replica}))
    es = Elasticsearch(elasticsearch.url)
    Shipper(ElasticsearchSink(es, work / "ship.db"), sources).run_once()  # sentinel's own shipper, both stores
    es.indices.refresh(index="deepseek-inference-*")
    Shipper(LocalLogStore(work / "logs.db"), sources).run_once()
    indexed = LocalLogStore(work / "indexed.db", column_index=True)  # the daemon's local store: DuckDB columns
    Shipper(indexed, sources).run_once()
    yield (elastalert(work, elasticsearch.url),
           sentinel(work, "--store", "es", "--elasticsearch-url", elasticsearch.url),
           sentinel(work, "--store", "local", "--db", str(work / "logs.db")),
           with_column_index(work, indexed))
    shutil.rmtree(work, ignore_errors=True)


def with_column_index(work: Path, store: LocalLogStore) -> Matches:
    """The same evaluations as ``logs test-rule``, from the column-indexed store the daemon uses."""
    queries = {name: q for name, q, _ in RULES}
    out: Matches = defaultdict(set)
    for name, at, matches in evaluations(load_rule_file(work / "sentinel-rules.yml"), LogRuleSource(store),
                                         T0 + STEP, T0 + HOUR):
        for m in matches:
            out[name].add((_key(queries[name], m.labels), round(at - T0)))
    return out


def episodes(found: set[tuple[str, int]]) -> list[tuple[str, int, int]]:
    """sentinel's matches of one key at consecutive steps, as (key, first, last)."""
    out: list[tuple[str, int, int]] = []
    for key, t in sorted(found):
        if out and out[-1][0] == key and out[-1][2] == t - STEP:
            out[-1] = (key, out[-1][1], t)
        else:
            out.append((key, t, t))
    return out


def test_sentinel_gives_the_same_matches_from_elasticsearch_and_from_its_local_store(
        runs: tuple[Matches, ...]) -> None:
    _, from_es, from_local, from_columns = runs
    assert {n: sorted(v) for n, v in from_local.items()} == {n: sorted(v) for n, v in from_es.items()}
    assert {n: sorted(v) for n, v in from_columns.items()} == {n: sorted(v) for n, v in from_es.items()}


@pytest.mark.parametrize("rule", [name for name, _, _ in RULES])
def test_the_rule_matches_what_elastalert2_matches(rule: str, runs: tuple[Matches, ...]) -> None:
    """Every ElastAlert2 match has a sentinel match of the same key within one step, and every sentinel
    episode holds an ElastAlert2 match within one step of it (see the module's docstring)."""
    ea, ours = runs[0][rule], runs[1][rule]
    assert ea, f"ElastAlert2 found nothing for {rule}: the data no longer exercises it"
    missed = sorted((k, d) for k, d in ea if not any(k == k2 and abs(t - d) <= STEP for k2, t in ours))
    extra = [(k, a, b) for k, a, b in episodes(ours) if not any(k == k2 and a - STEP <= d <= b + STEP for k2, d in ea)]
    assert not missed and not extra, (f"{rule}: ElastAlert2 matched (key, +s) {missed} and sentinel did not; "
                                      f"sentinel matched (key, from, to) {extra} and ElastAlert2 did not.\n"
                                      f"ElastAlert2: {sorted(ea)}\nsentinel: {sorted(ours)}")
