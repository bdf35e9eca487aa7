"""deploy/filebeat.yml: generated from the shipper's redaction list, kept in step, and its patterns
give Filebeat (Go's regexp, RE2) the same redaction as sentinel's shipper (Python's re)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from inference_core.redaction import redact
from sentinel.generate.filebeat import render
from tests.conftest import ROOT

SAMPLES = [
    "user a.b@example.org on 2026-11-28 id 11010519491231002X ssn 123-45-6789 card 4111 1111 1111 1111",
    "call +86 138 0013 8000 or 13800138000 or +1 (415) 555-2671; took 512 ms for 16384 tokens at 10:00",
    "CUDA error: an illegal memory access was encountered (request 7f3a, 2026-11-28T10:00:00Z)",
    "card 4111-1111-1111-1111 and order 1234567 and x99999999999999999999y",
]

GO_PROGRAM = """package main

import (
	"encoding/json"
	"fmt"
	"os"
	"regexp"
)

type rule struct{ Pattern, Replacement string }

func main() {
	var in struct {
		Rules   []rule
		Samples []string
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	out := []string{}
	for _, s := range in.Samples {
		for _, r := range in.Rules {
			s = regexp.MustCompile(r.Pattern).ReplaceAllLiteralString(s, r.Replacement)
		}
		out = append(out, s)
	}
	b, _ := json.Marshal(out)
	fmt.Println(string(b))
}
"""


def test_checked_in_filebeat_yml_is_in_step() -> None:
    assert (ROOT / "deploy" / "filebeat.yml").read_text() == render(), "stale: run `sentinel deploy filebeat`"


def test_it_keeps_the_seeds_input_and_ships_to_the_daily_indices() -> None:
    doc = yaml.safe_load((ROOT / "deploy" / "filebeat.yml").read_text())
    [inp] = doc["filebeat.inputs"]
    assert inp["paths"] == ["/var/log/deepseek/*.log"] and inp["fields"] == {"service": "deepseek-inference"}
    assert doc["output.elasticsearch"]["index"] == "deepseek-inference-%{+yyyy.MM.dd}"


def test_go_regexp_redacts_as_the_shipper_does(tmp_path: Path) -> None:
    go = shutil.which("go")
    if go is None:
        pytest.skip("Go is not installed: Filebeat's regexp dialect cannot be checked here")
    doc = yaml.safe_load((ROOT / "deploy" / "filebeat.yml").read_text())
    rules = [{"Pattern": f["pattern"], "Replacement": f["replacement"]}
             for f in doc["processors"][0]["replace"]["fields"] if f["field"] == "message"]
    src = tmp_path / "main.go"
    src.write_text(GO_PROGRAM)
    r = subprocess.run([go, "run", str(src)], input=json.dumps({"Rules": rules, "Samples": SAMPLES}),
                       capture_output=True, text=True, timeout=120, env={**os.environ, "GO111MODULE": "off"})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [redact({"message": s})["message"] for s in SAMPLES]
