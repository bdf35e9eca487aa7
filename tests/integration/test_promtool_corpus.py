"""promtool's own test corpus, run through promtool and through sentinel: the same verdict for every file.

The corpus is `cmd/promtool/testdata` of Prometheus v2.42.0 (commit 225c611, Apache-2.0; LICENSE and NOTICE
beside it), the version Debian's `promtool` is built from, so no file needs a newer promtool than the one
installed. It was written by Prometheus's authors, not here; the files are vendored unchanged.

- Every `.yml` file goes through `promtool check rules` and `sentinel rules check`: the same exit status
  (accepted or rejected), and for accepted rule files the same number of duplicate-rule lint findings.
  Configuration and service-discovery files are in the corpus for promtool's other commands; both tools
  reject them as rule files, and that is compared too.
- Every file with `tests:` goes through `promtool test rules` and `sentinel rules test`: the same exit
  status, and for failing files the same failures: which alert or expression at which time, which rule at
  which evaluation, which rule file did not parse, which input series did not parse.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from sentinel.cli import app
from tests.conftest import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.skipif(
    shutil.which("promtool") is None or shutil.which("prometheus") is None,
    reason="prometheus/promtool are not installed (apt-get install prometheus)")]

CORPUS = ROOT / "tests" / "fixtures" / "promtool-v2.42.0"
FILES = sorted(CORPUS.glob("*.yml"))
TEST_FILES = [f for f in FILES if isinstance(d := yaml.safe_load(f.read_text()), dict) and "tests" in d]

# What a failure is about, in both tools' words
FAILURE = [
    re.compile(r"alertname: (?P<what>\S+), time: (?P<time>\S+),"),
    re.compile(r'expr: "(?P<what>(?:[^"\\]|\\.)*)", time: (?P<time>[^,\s]+)'),
    re.compile(r"rule: (?P<what>\S+), time: (?P<time>[^,\s]+), err:"),
    re.compile(r'group "(?P<what>[^"]+)", rule (?P<time>\d+), "[^"]*": could not parse expression'),
]


def failures(text: str) -> list[tuple[int, str, str]]:
    """Each failure as (kind, subject, time); an input series that does not parse is one kind of its own."""
    out = []
    for line in text.splitlines():
        for kind, pattern in enumerate(FAILURE):
            m = pattern.search(line)
            if m:
                out.append((kind, m["what"], m["time"]))
                break
        else:
            if "parse error" in line:
                out.append((len(FAILURE), "input series", ""))
    return sorted(out)


def promtool(*args: str) -> tuple[int, str]:
    r = subprocess.run(["promtool", *args], cwd=CORPUS, capture_output=True, text=True, timeout=600, check=False)
    return r.returncode, r.stdout + r.stderr


def sentinel(*args: str, at: Path = CORPUS) -> tuple[int, str]:
    here = os.getcwd()
    os.chdir(at)
    try:
        res = CliRunner().invoke(app, list(args))
    finally:
        os.chdir(here)
    return res.exit_code, res.output


def test_the_corpus_is_complete() -> None:
    """The vendored files are the whole testdata directory (35 files, 31 of them YAML, 9 with tests) and
    its license."""
    assert len(list(CORPUS.iterdir())) == 35 + 2 and len(FILES) == 31 and len(TEST_FILES) == 9
    assert (CORPUS / "LICENSE").read_text().lstrip().startswith("Apache License")


@pytest.mark.parametrize("path", FILES, ids=[f.name for f in FILES])
def test_rules_check_gives_promtools_verdict(path: Path) -> None:
    p_rc, p_out = promtool("check", "rules", path.name)
    s_rc, s_out = sentinel("rules", "check", path.name)
    assert (s_rc == 0) == (p_rc == 0), f"promtool rc {p_rc}:\n{p_out}\nsentinel rc {s_rc}:\n{s_out}"
    if p_rc == 0:
        m = re.search(r"lint error (\d+) duplicate rule", p_out)
        p_lints = int(m[1]) if m else 0
        m = re.search(r"(\d+) lint problem", s_out)
        s_lints = int(m[1]) if m else 0
        assert s_lints == p_lints, f"promtool:\n{p_out}\nsentinel:\n{s_out}"
    else:
        assert s_rc == 1 and path.name in s_out  # an error naming the file (and line, see test_rules_check)


@pytest.mark.parametrize("path", TEST_FILES, ids=[f.name for f in TEST_FILES])
def test_rules_test_gives_promtools_verdict(path: Path) -> None:
    p_rc, p_out = promtool("test", "rules", path.name)
    s_rc, s_out = sentinel("rules", "test", path.name)
    assert (s_rc == 0) == (p_rc == 0), f"promtool rc {p_rc}:\n{p_out}\nsentinel rc {s_rc}:\n{s_out}"
    if p_rc != 0:
        expected = failures(p_out)
        assert expected, f"no failure recognised in promtool's output:\n{p_out}"
        assert failures(s_out) == expected, f"promtool:\n{p_out}\nsentinel:\n{s_out}"


def test_scalar_rules_and_bare_numbers_as_promtool_reads_them(tmp_path: Path) -> None:
    """`expr: 1` and `values: 1` are strings to promtool (Go's YAML puts a scalar's text into a string
    field); a scalar result is a one-sample vector without labels, and a sample without `labels` matches it.
    A test whose expectation is wrong still fails: the numbers are not waved through."""
    (tmp_path / "r.yml").write_text("groups:\n- name: g\n  rules:\n  - record: one\n    expr: 1\n"
                                    "  - alert: Always\n    expr: 2\n    labels: {severity: 3}\n")
    doc = {"rule_files": ["r.yml"], "evaluation_interval": "1m", "tests": [{
        "input_series": [{"series": "x", "values": 1}],
        "alert_rule_test": [{"eval_time": "1m", "alertname": "Always",
                             "exp_alerts": [{"exp_labels": {"severity": 3}}]}],
        "promql_expr_test": [{"expr": 1, "eval_time": "1m", "exp_samples": [{"value": 1}]},
                             {"expr": "one", "eval_time": "1m", "exp_samples": [{"labels": "one", "value": 1}]},
                             {"expr": "x", "exp_samples": [{"labels": "x", "value": 1}]}]}]}
    (tmp_path / "t.yml").write_text(yaml.safe_dump(doc))
    assert sentinel("rules", "test", "t.yml", at=tmp_path)[0] == 0
    assert promtool("test", "rules", str(tmp_path / "t.yml"))[0] == 0
    doc["tests"][0]["promql_expr_test"][0]["exp_samples"][0]["value"] = 2
    (tmp_path / "t.yml").write_text(yaml.safe_dump(doc))
    rc, out = sentinel("rules", "test", "t.yml", at=tmp_path)
    assert rc == 1 and 'expr: "1", time: 1m,' in out and "exp: {} 2E+00" in out and "got: {} 1E+00" in out
