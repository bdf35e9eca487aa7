"""`sentinel logs test-rule`: log rules over a past range, evaluation by evaluation (elastalert-test-rule)."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from sentinel.cli import app
from sentinel.logstore.local import LocalLogStore

T0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z

RULES = """groups:
- name: logs
  interval: 30s
  rules:
  - alert: CudaErrors
    log: {type: frequency, filter: [{exists: cuda_error}], num_events: 2, timeframe: 1m, query_key: replica}
  - alert: ReplicaSilent
    log: {type: flatline, threshold: 1, timeframe: 1m, query_key: replica}
"""


def test_matches_per_evaluation_from_the_local_store(tmp_path: Path) -> None:
    store = LocalLogStore(tmp_path / "logs.db")
    # r0 logs every 10 s for 5 minutes with two CUDA errors at +100 and +110; r1 stops after a minute
    store.add([(T0 + t, {"replica": "r0", **({"cuda_error": "illegal address"} if t in (100, 110) else {})})
               for t in range(0, 300, 10)] + [(T0 + t, {"replica": "r1"}) for t in range(0, 60, 10)])
    (tmp_path / "r.yml").write_text(RULES)
    args = ["logs", "test-rule", str(tmp_path / "r.yml"), "--store", "local", "--db", str(tmp_path / "logs.db"),
            "--start", "2027-01-15T08:00:00Z", "--end", str(T0 + 240)]
    res = CliRunner().invoke(app, [*args, "--json"])
    assert res.exit_code == 0, res.output
    got = [json.loads(line) for line in res.output.splitlines()]
    cuda = [(m["at"], m["labels"], m["value"]) for m in got if m["rule"] == "CudaErrors"]
    assert cuda == [("2027-01-15T08:02:00.000Z", {"replica": "r0"}, 2.0),
                    ("2027-01-15T08:02:30.000Z", {"replica": "r0"}, 2.0)]  # (60, 120] and (90, 150]
    silent = sorted({(m["at"], m["labels"]["replica"]) for m in got if m["rule"] == "ReplicaSilent"})
    assert silent == [(f"2027-01-15T08:0{m}:{s}.000Z", "r1") for m, s in
                      [(2, "00"), (2, "30"), (3, "00"), (3, "30"), (4, "00")]]  # (60, 120] empty onwards
    one = CliRunner().invoke(app, [*args, "--rule", "CudaErrors", "--step", "1m"])
    assert one.exit_code == 0 and "2 match(es)" not in one.output and "1 match(es)" in one.output, one.output
    bad = CliRunner().invoke(app, [*args[:-2], "--end", "yesterday"])
    assert bad.exit_code == 2 and "not a time: 'yesterday'" in bad.output
    none = CliRunner().invoke(app, [*args, "--rule", "Nope"])
    assert none.exit_code == 2 and "no log rule named 'Nope'" in none.output
