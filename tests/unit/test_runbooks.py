"""Runbooks and checks on committed fixture files of real outputs (healthy, fragmented, failing) and
on the live machine. Stand-ins are used only for what cannot run here (NVML, a CUDA GPU)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from typer.testing import CliRunner

from inference_core.integrity import write_manifest
from sentinel.cli import app
from sentinel.errors import FileFormatError
from sentinel.rules.model import load_rules
from sentinel.runbooks.base import REGISTRY, Context, Status
from sentinel.runbooks.checks.memory import unusable_index
from sentinel.runbooks.model import check_runbook_references, load_runbook, load_runbooks
from sentinel.runbooks.report import render
from sentinel.runbooks.runner import run
from sentinel.xid import XidAction, parse_xid_lines, recommend
from tests.conftest import ROOT
from tests.unit.fake_nvml import FakeNvml

FIX = ROOT / "tests" / "fixtures"


def run_check(name: str, ctx: Context, **params: Any) -> Any:
    chk = REGISTRY[name]
    return chk.run(chk.params.model_validate(params), ctx)


# -- runbook files --------------------------------------------------------------------------------------
def test_default_runbooks_load_and_rules_reference_them() -> None:
    books = load_runbooks(ROOT / "runbooks")
    assert set(books) == {"cuda-error", "model-load", "inference-latency"}
    assert [s.check for s in books["cuda-error"].steps] == ["gpu", "nvidia_smi", "cuda", "driver_log", "service"]
    assert [s.check for s in books["model-load"].steps] == ["model_files", "storage", "memory"]
    check_runbook_references(load_rules(ROOT / "rules"), books)


@pytest.mark.parametrize(("text", "expected"), [
    ("name: r\nsteps:\n  - id: a\n    check: memroy\n", "r.yaml:4: steps.0.check: Value error, unknown check 'memroy'"),
    ("name: r\nsteps:\n  - id: a\n    check: memory\n    params:\n      order: 42\n",
     "r.yaml:6: steps.0.params.order: Input should be less than or equal to 10"),
    ("name: r\nsteps:\n  - id: a\n    check: driver_log\n    params:\n      installer_log: /etc/shadow\n",
     "r.yaml:6: steps.0.params.installer_log: Value error, '/etc/shadow': must be a path under the log root"),
    ("name: r\nsteps:\n  - id: a\n    check: memory\n    timeout: 0s\n", "r.yaml:5: steps.0.timeout"),
    ("name: r\nsteps:\n  - id: a\n    check: memory\n    when: {step: b, status: [fail]}\n",
     "when.step 'b' is not an earlier step"),
    ("name: other\nsteps:\n  - id: a\n    check: memory\n", "r.yaml:1: name: 'other' must match the file name"),
    ("name: r\nsteps: []\n", "r.yaml:2: steps: List should have at least 1 item"),
])
def test_bad_runbooks_name_file_line_field(tmp_path: Path, text: str, expected: str) -> None:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    with pytest.raises(FileFormatError) as info:
        load_runbook(p)
    assert any(expected in x for x in info.value.problems), info.value.problems


def test_conditions_timeouts_and_crashes_become_findings(tmp_path: Path) -> None:
    p = tmp_path / "r.yaml"
    p.write_text("name: r\nsteps:\n"
                 "  - {id: mem, check: memory}\n"
                 "  - {id: only-if-bad, check: memory, when: {step: mem, status: [warn, fail]}}\n"
                 "  - {id: files, check: model_files, params: {model_dir: /nonexistent}}\n")
    rep = run([load_runbook(p)], Context(proc=FIX / "proc/healthy"), "t")
    assert [r.finding.status for r in rep.results] == [Status.OK, Status.SKIPPED, Status.FAIL]
    assert "condition not met: mem was ok" in rep.results[1].finding.summary
    assert rep.exit_code == 2


# -- memory ---------------------------------------------------------------------------------------------
def test_memory_healthy_fragmented_low() -> None:
    ok = run_check("memory", Context(proc=FIX / "proc/healthy"))
    assert ok.status == Status.OK and ok.evidence["available_pct"] > 90
    frag = run_check("memory", Context(proc=FIX / "proc/fragmented"))
    assert frag.status == Status.WARN and "fragmented" in frag.summary and "compact_memory" in (frag.remedy or "")
    assert frag.evidence["unusable_index_order_9"] > 0.99
    low = run_check("memory", Context(proc=FIX / "proc/low-memory"))
    assert low.status == Status.FAIL and "8.0% of memory available" in low.summary
    assert "Committed_AS at 98% of CommitLimit" in low.summary


def test_unusable_index() -> None:
    assert unusable_index([0] * 10 + [5], 9) == 0.0
    assert unusable_index([100] + [0] * 10, 9) == 1.0
    assert unusable_index([512, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0], 9) == pytest.approx(0.5)


def test_memory_on_the_live_machine() -> None:
    """The live reading agrees with /proc/meminfo read here, and the status follows from the evidence."""
    f = run_check("memory", Context())
    info = {ln.split(":")[0]: int(ln.split()[1]) * 1024 for ln in open("/proc/meminfo") if ln.split()[-1] == "kB"}
    ev = f.evidence
    assert ev["mem_total_bytes"] == info["MemTotal"]
    assert abs(ev["available_pct"] - 100 * info["MemAvailable"] / info["MemTotal"]) < 5  # moments apart
    frag = ev["unusable_index_order_9"]
    if ev["available_pct"] < 10:
        assert f.status == Status.FAIL
    elif ev["available_pct"] < 20 or frag > 0.9:
        assert f.status in (Status.WARN, Status.FAIL)
    if f.status == Status.OK:
        assert ev["available_pct"] >= 20 and frag <= 0.9 and f"{ev['available_pct']:.1f}% available" in f.summary


# -- storage (live: real reads on this machine's disk) --------------------------------------------------
def test_storage_measures_real_latency(tmp_path: Path) -> None:
    f = run_check("storage", Context(model_dir=tmp_path), samples=64, seq_bytes=2**20, probe_bytes=2**21)
    assert f.status in (Status.OK, Status.WARN, Status.FAIL)
    assert f.evidence["p50_us"] > 0 and f.evidence["p99_us"] >= f.evidence["p50_us"]
    assert f.evidence["seq_mb_s"] > 0 and 0 <= f.evidence["free_pct"] <= 100
    assert list(tmp_path.iterdir()) == []  # the probe file is removed
    strict = run_check("storage", Context(model_dir=tmp_path), samples=16, threshold_us=0.001, probe_bytes=2**20)
    assert strict.status == Status.FAIL and "move it to local NVMe" in (strict.remedy or "")


def test_storage_without_a_path_is_skipped() -> None:
    assert run_check("storage", Context()).status == Status.SKIPPED


# -- model files ----------------------------------------------------------------------------------------
def test_model_files_manifest(tmp_path: Path, tiny_model_dir: Path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    for f in tiny_model_dir.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    ok = run_check("model_files", Context(model_dir=d))
    assert ok.status == Status.OK and ok.evidence["manifest"] == "verified"
    (d / "integrity.json").unlink()
    assert run_check("model_files", Context(model_dir=d)).status == Status.WARN
    assert run_check("model_files", Context(model_dir=d), require_manifest=True).status == Status.FAIL
    write_manifest(d)
    raw = bytearray((d / "model.safetensors").read_bytes())
    raw[-1] ^= 0xFF  # one flipped bit in the weights
    (d / "model.safetensors").write_bytes(bytes(raw))
    bad = run_check("model_files", Context(model_dir=d))
    assert bad.status == Status.FAIL and "model.safetensors: MD5" in bad.summary


# -- GPU: nvidia-smi (a fixture program standing in for the binary) and NVML (a stand-in module) -------
@pytest.mark.parametrize(("output", "code", "status", "text"), [
    ("healthy.csv", 0, Status.OK, "2 GPU(s): GPU 0 73%, GPU 1 81%"),
    ("ecc.csv", 0, Status.FAIL, "GPU 0: 2 uncorrected ECC errors"),
    ("driver-mismatch.txt", 18, Status.FAIL, "Driver/library version mismatch"),
    ("no-driver.txt", 9, Status.FAIL, "couldn't communicate with the NVIDIA driver"),
])
def test_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, output: str, code: int, status: Status,
                    text: str) -> None:
    monkeypatch.setenv("FAKE_SMI_OUTPUT", str(FIX / "nvidia-smi" / output))
    monkeypatch.setenv("FAKE_SMI_EXIT", str(code))
    monkeypatch.setenv("FAKE_SMI_ARGV", str(tmp_path / "argv"))
    f = run_check("nvidia_smi", Context(nvidia_smi=str(FIX / "bin/fake-nvidia-smi")))
    assert f.status == status and text in f.summary, f
    assert (tmp_path / "argv").read_text().splitlines() == [
        "--query-gpu=index,name,driver_version,temperature.gpu,utilization.gpu,memory.used,memory.total,"
        "ecc.errors.uncorrected.volatile.total,power.draw", "--format=csv,noheader,nounits"]
    if status == Status.FAIL and code:
        assert f.remedy and "nvidia" in f.remedy.lower()


def test_nvidia_smi_missing_is_skipped() -> None:
    f = run_check("nvidia_smi", Context(nvidia_smi="nvidia-smi-not-installed"))
    assert f.status == Status.SKIPPED and "not found" in f.summary


def test_nvml_healthy_and_failing() -> None:
    ok = run_check("gpu", Context(nvml=FakeNvml(FIX / "nvml/h100-healthy.json")))
    assert ok.status == Status.OK and "1 GPU(s) healthy (driver 550.54.15)" in ok.summary
    bad = run_check("gpu", Context(nvml=FakeNvml(FIX / "nvml/a100-remap-failure.json")))
    assert bad.status == Status.FAIL
    for text in ("GPU 0: row remapping failed", "recovery action gpu_reset", "2 uncorrected ECC",
                 "XID events: [48, 64]; recommended: reset_gpu"):
        assert text in bad.summary, bad.summary
    missing = run_check("gpu", Context(nvml=FakeNvml(None, library_missing=True)))
    assert missing.status == Status.SKIPPED and missing.summary.startswith("NVML library not found")


def test_nvml_on_this_machine_never_crashes() -> None:
    f = run_check("gpu", Context())
    assert f.status in (Status.SKIPPED, Status.OK, Status.WARN, Status.FAIL)
    if not Path("/dev/nvidia0").exists():
        assert f.status == Status.SKIPPED and "NVML library not found" in f.summary


def test_cuda_on_this_machine_and_when_expected() -> None:
    live = run_check("cuda", Context())
    if not Path("/dev/nvidia0").exists():
        assert live.status == Status.SKIPPED and live.evidence["reason"]

    def init() -> None:
        raise RuntimeError("Found no NVIDIA driver on your system. Please check that you have an NVIDIA GPU")

    # A CUDA build of torch on a node whose device nodes exist but whose driver is gone (stand-in torch).
    torch = SimpleNamespace(__version__="2.4.0+cu124", version=SimpleNamespace(cuda="12.4"),
                            cuda=SimpleNamespace(is_available=lambda: False, init=init))
    f = run_check("cuda", Context(dev=FIX / "dev/gpu", torch=torch))
    assert f.status == Status.FAIL and "Found no NVIDIA driver" in f.summary
    assert f.evidence["device_nodes"] == ["nvidia0"]


# -- driver logs and the XID catalogue -----------------------------------------------------------------
@pytest.mark.parametrize(("case", "status", "text"), [
    ("healthy", Status.OK, "no failure in the installer log; 0 XID event(s)"),
    ("xid-79", Status.FAIL, "recommended action: reboot"),
    ("xid-13-repeated", Status.FAIL, "recommended action: inspect_hardware"),
    ("nouveau", Status.FAIL, "driver installation failed"),
])
def test_driver_logs(case: str, status: Status, text: str) -> None:
    f = run_check("driver_log", Context(var_log=FIX / "var_log" / case), use_dmesg=False)
    assert f.status == status and text in f.summary, f
    if case == "nouveau":
        assert "blacklist nouveau" in (f.remedy or "")


def test_xid_catalogue() -> None:
    events = parse_xid_lines(["NVRM: Xid (PCI:0000:3b:00): 94, pid=1, name=python, Contained ECC error."])
    assert recommend(events) == XidAction.RESTART_APP
    for code, action in ((13, "restart_app"), (31, "restart_app"), (64, "reset_gpu"), (95, "reset_gpu"),
                         (119, "reset_gpu"), (120, "reset_gpu"), (79, "reboot"), (48, "ecc_workflow")):
        [e] = parse_xid_lines([f"NVRM: Xid (PCI:0000:01:00): {code}, pid=1, x"])
        assert e.info.action.value == action


# -- service ----------------------------------------------------------------------------------------------
def test_service_reads_cuda_errors_from_logs(tmp_path: Path) -> None:
    log = tmp_path / "inference.log"
    log.write_text(json.dumps({"cuda_error": None}) + "\n" + json.dumps({"cuda_error": "CUDA error: x",
                                                                          "@timestamp": "t"}) + "\n")
    f = run_check("service", Context(replica_logs=(log,)))
    assert f.status == Status.FAIL and "CUDA error: x" in f.summary
    assert run_check("service", Context()).status == Status.SKIPPED


def test_checks_that_found_nothing_to_check_say_skipped_never_ok(tmp_path: Path) -> None:
    """`sentinel diagnose --all` with nothing running said ok: "0 replica(s) healthy". Zero replicas, zero
    GPUs: skipped, with the reason; a cuda_error line in the logs still fails."""
    from sentinel.logstore.local import LocalLogStore

    quiet = run_check("service", Context(logs=LocalLogStore(tmp_path / "logs.db")))  # a state dir, nothing running
    assert quiet.status == Status.SKIPPED and quiet.summary.startswith("no replica to check"), quiet
    no_gpu = tmp_path / "no-gpu.json"  # a driver loaded, no device (a GPU node whose GPU fell off the bus)
    no_gpu.write_text(json.dumps({"driver_version": "550.54.15", "cuda_driver_version": 12040, "devices": []}))
    none = run_check("gpu", Context(nvml=FakeNvml(no_gpu)))
    assert none.status == Status.SKIPPED and "reports no GPU" in none.summary, none
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\nexit 0\n")
    smi.chmod(0o755)
    empty = run_check("nvidia_smi", Context(nvidia_smi=str(smi)))
    assert empty.status == Status.SKIPPED and empty.summary == "nvidia-smi lists no GPU", empty


# -- the CLI and reports --------------------------------------------------------------------------------
def test_diagnose_cli_all_json_and_reports(tmp_path: Path) -> None:
    cfg = tmp_path / "s.yaml"
    cfg.write_text(f"state_dir: {tmp_path / 'state'}\nrunbooks_dir: {ROOT / 'runbooks'}\nrules_dir: {ROOT / 'rules'}\n"
                   f"diagnostics:\n  proc_root: {FIX / 'proc/fragmented'}\n  var_log: {FIX / 'var_log/xid-79'}\n"
                   f"  dmesg: no-dmesg-here\n")
    runner = CliRunner()
    res = runner.invoke(app, ["diagnose", "--all", "-c", str(cfg), "--json", "--report", str(tmp_path / "r.html")])
    assert res.exit_code == 2, res.output
    doc = json.loads(res.output)
    by = {r["step"]: r for r in doc["results"]}
    assert by["driver-log"]["status"] == "fail" and by["memory"]["status"] == "warn"
    assert [r["step"] for r in doc["results"]].count("memory") == 1  # --all runs each check once
    html = (tmp_path / "r.html").read_text()
    assert "<h1>all runbooks: <span class=\"fail\">FAIL</span></h1>" in html and "GPU has fallen off" in html
    md = runner.invoke(app, ["diagnose", "model-load", "-c", str(cfg), "--report", str(tmp_path / "r.md")])
    assert md.exit_code in (1, 2) and "# model-load:" in (tmp_path / "r.md").read_text()
    unknown = runner.invoke(app, ["diagnose", "nope", "-c", str(cfg)])
    assert unknown.exit_code == 2 and "unknown runbook 'nope'" in unknown.output
    alert = runner.invoke(app, ["diagnose", "--alert", "0123456789abcdef", "-c", str(cfg)])
    assert alert.exit_code == 2 and "no alert state" in alert.output


def test_html_report_escapes_evidence() -> None:
    rep = run([], Context(), "<script>x</script>")
    assert "<script>x" not in render(rep, "html") and "&lt;script&gt;" in render(rep, "html")


def test_no_check_runs_a_shell() -> None:
    src = "\n".join(p.read_text() for p in (ROOT / "sentinel" / "runbooks" / "checks").glob("*.py"))
    assert "shell=True" not in src and "os.system" not in src and "os.popen" not in src
    assert os.access(FIX / "bin" / "fake-nvidia-smi", os.X_OK)


def test_diagnose_alert_runs_its_rules_runbook(tmp_path: Path) -> None:
    from sentinel.alerts.state import Alert, State
    from sentinel.alerts.store import Store

    state = tmp_path / "state"
    labels = {"alertname": "CudaError", "replica": "replica-0", "severity": "page"}
    alert = Alert(labels, {}, 1.0, State.FIRING, 100.0, fired_at=100.0)
    store = Store(state / "sentinel.db")
    store.save_rule_state(f"{ROOT / 'rules' / 'inference.yaml'};inference-logs;CudaError", [alert], [], 100.0)
    store.close()
    cfg = tmp_path / "s.yaml"
    cfg.write_text(f"state_dir: {state}\nrunbooks_dir: {ROOT / 'runbooks'}\nrules_dir: {ROOT / 'rules'}\n"
                   f"diagnostics:\n  var_log: {FIX / 'var_log/healthy'}\n  dmesg: no-dmesg-here\n")
    res = CliRunner().invoke(app, ["diagnose", "--alert", alert.fingerprint, "-c", str(cfg), "--json"])
    doc = json.loads(res.output)
    assert doc["title"] == "cuda-error" and doc["alert_labels"] == labels
    assert [r["step"] for r in doc["results"]] == ["nvml", "nvidia-smi", "cuda", "driver-log", "service"]
