"""The shipper and the local log store, on real files: rotation, checkpoints, redaction, queries."""

from __future__ import annotations

import json
from pathlib import Path

from sentinel.logstore.local import LocalLogStore
from sentinel.logstore.shipper import LogSource, Shipper, redact
from sentinel.rules.filters import LogFilter
from sentinel.rules.logtypes import log_query
from sentinel.rules.sources import LogRuleSource


def line(ts: str, **fields: object) -> str:
    return json.dumps({"@timestamp": ts, **fields}) + "\n"


def test_ship_query_rotate_and_resume(tmp_path: Path) -> None:
    log = tmp_path / "inference.log"
    store = LocalLogStore(tmp_path / "logs.db")
    src = LogSource("replica-0", log, {"replica": "replica-0"})
    log.write_text(line("2026-01-01T00:00:01Z", cuda_error=None)
                   + line("2026-01-01T00:00:02Z", cuda_error="CUDA error: x")
                   + "not json\n" + '{"partial": ')
    ship = Shipper(store, [src])
    assert ship.run_once() == 2 and ship.bad_lines == 1
    # rotation: the old file moves away with one more complete line; a new file starts
    with log.open("a") as fh:
        fh.write('true}\n')
    log.rename(tmp_path / "inference.log.1")
    log.write_text(line("2026-01-01T00:00:03Z", cuda_error="CUDA error: y"))
    assert ship.run_once() == 2  # the rest of the rotated file, then the new one
    assert Shipper(store, [src]).run_once() == 0  # a new shipper resumes from the checkpoint: nothing twice
    t0 = 1767225600.0  # 2026-01-01T00:00:00Z
    q = [LogFilter(exists="cuda_error")]
    assert store.count(q, t0, t0 + 10, ["replica"]) == [({"replica": "replica-0"}, 2)]
    assert store.count(q, t0 + 2.5, t0 + 10, []) == [({}, 1)]
    assert store.count([LogFilter(term={"replica": "replica-1"})], t0, t0 + 10) == []


def test_log_rule_source_any_and_frequency(tmp_path: Path) -> None:
    store = LocalLogStore(tmp_path / "logs.db")
    store.add([(100.0, {"cuda_error": "e", "replica": "a"}), (101.0, {"cuda_error": "e", "replica": "a"}),
               (102.0, {"cuda_error": "e", "replica": "b"}), (103.0, {"cuda_error": None, "replica": "c"})])
    src = LogRuleSource(store)
    anyq = log_query(type="any", filter=[LogFilter(exists="cuda_error")], timeframe=60, query_key=["replica"])
    assert sorted((s.labels["replica"], s.value) for s in src.query(anyq, 110)) == [("a", 2.0), ("b", 1.0)]
    freq = log_query({**anyq.model_dump(), "type": "frequency", "num_events": 2})
    assert [s.labels for s in src.query(freq, 110)] == [{"replica": "a"}]
    assert src.query(anyq, 200) == []  # outside the timeframe


def test_field_names_never_reach_sql(tmp_path: Path) -> None:
    store = LocalLogStore(tmp_path / "logs.db")
    store.add([(1.0, {"a": "x"})])
    evil = "a') OR 1=1 --"
    assert store.count([], 0, 10, [evil]) == [({evil: ""}, 1)]  # treated as a (missing) JSON key
    assert store.count([LogFilter.model_construct(exists=evil, term=None)], 0, 10) == []


def test_redaction_follows_the_seed() -> None:
    doc = redact({"@timestamp": "2026-01-01T00:00:00Z", "message": "born 1990-04-01, mail a.b@example.com", "n": 3})
    assert doc == {"@timestamp": "2026-01-01T00:00:00Z", "message": "born XXXX-XX-XX, mail <email>", "n": 3}


def test_personal_data_is_redacted_and_operational_numbers_are_not() -> None:
    from sentinel.logstore.shipper import redact

    doc = redact({"@timestamp": "2026-11-28T10:00:00Z", "message": (
        "user a.b@example.org on 2026-11-28 id 11010519491231002X ssn 123-45-6789 card 4111 1111 1111 1111 "
        "call +86 138 0013 8000 or 13800138000 or +1 (415) 555-2671; took 512 ms for 16384 tokens at 10:00"),
        "inference_time": 512.5})
    assert doc["message"] == ("user <email> on XXXX-XX-XX id <national-id> ssn <national-id> card <card> "
                              "call <phone> or <phone> or <phone>; took 512 ms for 16384 tokens at 10:00")
    assert doc["@timestamp"] == "2026-11-28T10:00:00Z" and doc["inference_time"] == 512.5


def test_event_ids_are_deterministic() -> None:
    from sentinel.logstore.shipper import event_id

    a = event_id("replica-0", 42, 100, b'{"x": 1}')
    assert a == event_id("replica-0", 42, 100, b'{"x": 1}')
    assert len({a, event_id("replica-1", 42, 100, b'{"x": 1}'), event_id("replica-0", 43, 100, b'{"x": 1}'),
                event_id("replica-0", 42, 101, b'{"x": 1}'), event_id("replica-0", 42, 100, b'{"x": 2}')}) == 5


def test_logs_query_cli_shows_the_lines_behind_a_rule(tmp_path: Path) -> None:
    """`sentinel logs query --rule CudaError` against the local store: the rule's filter, newest first."""
    import json as _json
    import time as _time

    from typer.testing import CliRunner

    from sentinel.cli import app
    from sentinel.logstore.local import LocalLogStore
    from tests.conftest import ROOT

    store = LocalLogStore(tmp_path / "state" / "logs.db")
    now = _time.time()
    store.add([(now - 30, {"replica": "replica-0", "cuda_error": None, "message": "ok", "request_id": "a"}),
               (now - 20, {"replica": "replica-0", "cuda_error": "CUDA error: illegal address", "request_id": "b"}),
               (now - 10, {"replica": "replica-1", "cuda_error": "CUDA error: ECC", "request_id": "c"}),
               (now - 5000, {"replica": "replica-1", "cuda_error": "CUDA error: old", "request_id": "d"})])
    store.close()
    cfg = tmp_path / "s.yaml"
    cfg.write_text(f"state_dir: {tmp_path / 'state'}\nrules_dir: {ROOT / 'rules'}\n")
    r = CliRunner().invoke(app, ["logs", "query", "-c", str(cfg), "--rule", "CudaError", "--since", "1h", "--json"])
    assert r.exit_code == 0, r.output
    assert [_json.loads(x)["request_id"] for x in r.output.splitlines()] == ["c", "b"]
    r = CliRunner().invoke(app, ["logs", "query", "-c", str(cfg), "--filter", "replica=replica-1", "--since", "2h"])
    assert r.exit_code == 0 and "2 line(s)" in r.output and "ECC" in r.output and "old" in r.output
    r = CliRunner().invoke(app, ["logs", "query", "-c", str(cfg), "--filter", '{"range": {"x": {}}}'])
    assert r.exit_code == 2 and "at least one of" in r.output
    r = CliRunner().invoke(app, ["logs", "query", "-c", str(cfg), "--rule", "NoSuchRule"])
    assert r.exit_code == 2 and "no log rule named 'NoSuchRule'" in r.output
    r = CliRunner().invoke(app, ["logs", "query", "-c", str(cfg), "-q", "cuda_error:* AND NOT replica:replica-0",
                                 "--since", "2h", "--json"])
    assert r.exit_code == 0 and [_json.loads(x)["request_id"] for x in r.output.splitlines()] == ["c", "d"]
    r = CliRunner().invoke(app, ["logs", "query", "-c", str(cfg), "-q", "cuda_error:* replica:r0"])
    assert r.exit_code == 2 and "column 14" in r.output and "join terms with AND or OR" in r.output
