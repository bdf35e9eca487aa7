"""`sentinel up` lifecycle: SIGTERM stops every child; after `kill -9` the next start reaps the
orphans and restores state; `--prometheus-url` uses an existing Prometheus."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from sentinel.netutil import free_port
from sentinel.process import ChildRegistry
from sentinel.promserver import PrometheusServer
from tests.conftest import ROOT
from tests.integration.test_end_to_end import wait_for

pytestmark = pytest.mark.integration


def start(state: Path, *extra: str) -> tuple[subprocess.Popen[bytes], dict[str, Any], Path]:
    log = state.parent / f"{state.name}-{time.monotonic_ns()}.out"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "sentinel.cli", "up", "--state-dir", str(state), *extra],
                                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    up_file = state / "up.json"
    def ready() -> dict[str, Any] | None:
        if not up_file.exists():
            return None
        doc: dict[str, Any] = json.loads(up_file.read_text())
        return doc if doc["pid"] == proc.pid else None  # not one left by a killed sentinel

    return proc, wait_for("sentinel up", ready, 180, proc, log), log


def gone(pid: int) -> bool:
    try:
        return "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
    except FileNotFoundError:
        return True


def test_sigterm_kill9_and_external_prometheus(tmp_path: Path, tiny_model_dir: Path) -> None:
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus is not installed (apt-get install prometheus); scripts/setup.sh installs it")
    external = PrometheusServer(tmp_path / "ext", free_port(), [], 5.0, ChildRegistry(tmp_path / "ext.json"))
    external.start()
    try:
        state = tmp_path / "state"
        proc, up, log = start(state, "--prometheus-url", external.url, "--model-dir", str(tiny_model_dir))
        assert up["prometheus"] == external.url
        assert [s["detail"] for s in up["services"] if s["name"] == "prometheus"] == ["external"]
        replica_pid = up["replicas"][0]["pid"]
        rules = wait_for("a PromQL rule evaluated against the external Prometheus", lambda: [
            r for g in httpx.get(f"{up['api']}/api/v1/rules").json()["data"]["groups"] for r in g["rules"]
            if r["name"] == "InferenceReplicaDown" and r["health"] == "ok"], 30, proc, log)
        assert rules

        # kill -9: the children die with sentinel (its keeper kills them the moment it exits)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        t0 = time.monotonic()
        wait_for("the replica to die with sentinel", lambda: gone(replica_pid), 5)
        assert time.monotonic() - t0 < 5
        wait_for("the keeper to exit once it has killed them", lambda: gone(up["keeper"]), 5)

        # kill -9 of sentinel and its keeper together: the replica is orphaned; the next start reaps it
        proc1, up1, log1 = start(state, "--prometheus-url", external.url, "--model-dir", str(tiny_model_dir))
        orphan = up1["replicas"][0]["pid"]
        subprocess.run(["kill", "-9", str(up1["keeper"]), str(proc1.pid)], check=True)
        proc1.wait(10)
        time.sleep(1)
        assert not gone(orphan)
        proc2, up2, log2 = start(state, "--prometheus-url", external.url, "--model-dir", str(tiny_model_dir))
        assert gone(orphan)
        assert "killed a leftover child of a previous sentinel: replica-0" in log2.read_text()

        # SIGTERM: a clean stop, every child gone.
        new_pid = up2["replicas"][0]["pid"]
        proc2.send_signal(signal.SIGTERM)
        assert proc2.wait(60) == 0
        assert gone(new_pid)
        assert not (state / "up.json").exists()
        assert external.proc is not None and external.proc.poll() is None  # an external Prometheus is not ours
    finally:
        external.stop()
        ChildRegistry(tmp_path / "state" / "children.json").reap_leftovers()  # if an assertion failed midway


def test_hot_reload_keeps_state_and_rejects_bad_files(tmp_path: Path, tiny_model_dir: Path) -> None:
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus is not installed (apt-get install prometheus); scripts/setup.sh installs it")
    rules = tmp_path / "rules"
    rules.mkdir()
    always = ("groups:\n  - name: g\n    interval: 1s\n    rules:\n      - alert: Always\n"
              "        expr: vector(1)\n")
    (rules / "r.yaml").write_text(always)
    token = "reload-token-0123456789"
    env_cfg = tmp_path / "s.yaml"
    env_cfg.write_text(f"api:\n  token: {token}\nalerting:\n  reload_interval: 1s\n")
    proc, up, log = start(tmp_path / "state", "--rules-dir", str(rules), "-c", str(env_cfg), "--model-dir",
                          str(tiny_model_dir))
    api = up["api"]
    try:
        def rules_now() -> dict[str, Any]:
            return {r["name"]: r for g in httpx.get(f"{api}/api/v1/rules").json()["data"]["groups"] for r in g["rules"]}

        first = wait_for("Always firing", lambda: rules_now()["Always"]["state"] == "firing" and rules_now(), 30,
                         proc, log)
        active_at = first["Always"]["alerts"][0]["activeAt"]
        # add a rule: picked up without a restart; the unchanged rule keeps its alert (same activeAt)
        (rules / "r.yaml").write_text(always + "      - alert: Also\n        expr: vector(2)\n")
        both = wait_for("the new rule", lambda: "Also" in rules_now() and rules_now(), 30, proc, log)
        assert both["Always"]["alerts"][0]["activeAt"] == active_at
        # a broken file is refused; the last good set keeps running
        (rules / "r.yaml").write_text("groups:\n  - name: g\n    rules:\n      - alert: Broken\n        for: soon\n")
        wait_for("a failed reload", lambda: "sentinel_rules_last_reload_successful 0.0" in
                 httpx.get(f"{api}/metrics").text, 30, proc, log)
        assert set(rules_now()) == {"Always", "Also"}
        assert "r.yaml:5: groups.0.rules.0.for: Value error, not a duration" in log.read_text()
        # the reload endpoint needs the token and reports the problems
        assert httpx.post(f"{api}/api/v1/rules/reload").status_code == 401
        r = httpx.post(f"{api}/api/v1/rules/reload", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 400 and "for: Value error" in r.json()["error"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
