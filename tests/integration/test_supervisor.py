"""The local supervisor as an actuator: restart and scale out real inference_core replicas."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from sentinel.errors import RemediationError
from sentinel.netutil import free_port
from sentinel.process import ChildRegistry
from sentinel.supervisor import ReplicaSpec, Supervisor

pytestmark = pytest.mark.integration


def test_scale_out_up_to_the_limit_then_refuse(tmp_path: Path, tiny_model_dir: Path) -> None:
    seen: list[list[str]] = []
    spec = ReplicaSpec("replica-0", free_port(), tiny_model_dir, tmp_path / "run" / "replica-0" / "logs")
    sup = Supervisor([spec], tmp_path / "run", ChildRegistry(tmp_path / "children.json"), 60, max_replicas=2,
                     on_change=lambda specs: seen.append([s.name for s in specs]))
    stages: list[tuple[str, str]] = []
    sup.start_all(lambda name, stage: stages.append((name, stage)))  # sentinel up's progress display
    assert stages and {name for name, _ in stages} == {"replica-0"}  # the process takes a second to start
    assert all(s.startswith(("starting the process", "checking the files", "loading", "planning memory"))
               for _, s in stages), stages
    try:
        evidence = sup.act("scale_out", "replica-0")
        assert "started replica-1" in evidence and seen == [["replica-0", "replica-1"]]
        new = sup.replicas["replica-1"]
        assert httpx.get(f"{new.spec.url}/ready").status_code == 200
        assert new.spec.log_dir == tmp_path / "run" / "replica-1" / "logs"
        # the scale-out is verified by the replica it started, not the one that asked: here the asker is
        # gone (a broken or overloaded replica would not answer either) and the verification holds at once
        sup.replicas["replica-0"].stop(2.0)
        t0 = time.monotonic()
        assert sup.verify("replica-0", 30, "scale_out") and time.monotonic() - t0 < 5
        assert not sup.verify("replica-0", 1, "restart")
        with pytest.raises(RemediationError, match="max_count=2"):
            sup.act("scale_out", "replica-1")
        with pytest.raises(RemediationError, match="unknown replica"):
            sup.act("restart", "../replica-0")
        pids = [r.pid for r in sup.replicas.values()]
    finally:
        sup.stop_all()
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()


def test_scale_in_removes_the_newest_and_rolls_back_when_the_targets_cannot_change(tmp_path: Path,
                                                                                   tiny_model_dir: Path) -> None:
    """Scale-in takes the replica out of the scrape targets before stopping it (its absence pages no one),
    picks the newest healthy one, keeps the last; a failing target update rolls back with nothing stopped. A
    scale-out whose target update fails stops the replica it started (all or nothing)."""
    seen: list[list[str]] = []
    fail = [False]

    def on_change(specs: list[ReplicaSpec]) -> None:
        if fail[0]:
            fail[0] = False  # the rollback's own update succeeds
            raise RuntimeError("Prometheus did not reload")
        seen.append([s.name for s in specs])

    spec = ReplicaSpec("replica-0", free_port(), tiny_model_dir, tmp_path / "run" / "replica-0" / "logs")
    sup = Supervisor([spec], tmp_path / "run", ChildRegistry(tmp_path / "children.json"), 60, max_replicas=3,
                     on_change=on_change)
    sup.start_all()
    try:
        sup.act("scale_out", "replica-0")
        assert sup.capacity() == (2, 1)  # removing one leaves one healthy
        new_pid = sup.replicas["replica-1"].pid
        fail[0] = True
        with pytest.raises(RemediationError, match="scale-in of replica-1 rolled back"):
            sup.act("scale_in", "replica-0")
        assert set(sup.replicas) == {"replica-0", "replica-1"} and sup.replicas["replica-1"].healthy()
        assert seen[-1] == ["replica-0", "replica-1"]  # the targets were put back
        evidence = sup.act("scale_in", "replica-0")
        assert "stopped replica-1" in evidence and "drained" in evidence and "1 replicas" in evidence
        assert seen[-1] == ["replica-0"] and set(sup.replicas) == {"replica-0"}
        assert new_pid is not None and (not Path(f"/proc/{new_pid}").exists()
                                        or "zombie" in Path(f"/proc/{new_pid}/status").read_text().lower())
        assert sup.verify("replica-1", 5)  # the removed target: every remaining replica serves
        with pytest.raises(RemediationError, match="one replica left"):
            sup.act("scale_in", "replica-0")
        fail[0] = True
        with pytest.raises(RemediationError, match="scale-out rolled back"):
            sup.act("scale_out", "replica-0")
        assert set(sup.replicas) == {"replica-0"} and seen[-1] == ["replica-0"]
    finally:
        sup.stop_all()


def test_a_restart_drains_first_so_requests_in_flight_finish(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Restart = drain → stop → start → ready: a long request running when the restart begins completes
    (it is not cut), requests arriving meanwhile get 503 (retryable), and the evidence says it drained."""
    import threading

    token = "drain-admin-token-0123456789"
    spec = ReplicaSpec("replica-0", free_port(), tiny_model_dir, tmp_path / "run" / "replica-0" / "logs",
                       admin_token=token)
    sup = Supervisor([spec], tmp_path / "run", ChildRegistry(tmp_path / "children.json"), 60)
    sup.start_all()
    try:
        url = sup.replicas["replica-0"].spec.url
        got: list[httpx.Response] = []
        body = {"model": "deepseek-tiny", "prompt": "The cluster", "max_tokens": 300, "min_tokens": 300,
                "temperature": 0}
        long = threading.Thread(target=lambda: got.append(httpx.post(f"{url}/v1/completions", json=body, timeout=120)))
        long.start()
        deadline = time.time() + 10
        while "inference_requests_running 1.0" not in httpx.get(f"{url}/metrics").text and time.time() < deadline:
            time.sleep(0.05)
        evidence = sup.act("restart", "replica-0")
        long.join(60)
        [resp] = got
        assert resp.status_code == 200, resp.text  # finished before the process was stopped
        assert resp.json()["usage"]["completion_tokens"] == 300
        assert "drained in" in evidence, evidence
        assert httpx.get(f"{url}/ready").status_code == 200  # the new process serves
    finally:
        sup.stop_all()


def test_gpu_reset_stops_every_replica_runs_the_tool_and_starts_them_again(
        tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The approved GPU reset (the driver refuses while a process holds the GPU): every replica stopped, the
    tool run as an argument list, every replica started again; a failing tool is reported with the replicas
    back. nvidia-smi is tests/fixtures/bin/fake-nvidia-smi here (there is no GPU)."""
    from tests.conftest import ROOT

    argv_file, out = tmp_path / "argv", tmp_path / "out.txt"
    out.write_text("GPU 00000000:3B:00.0 was successfully reset.\n")
    monkeypatch.setenv("FAKE_SMI_ARGV", str(argv_file))
    monkeypatch.setenv("FAKE_SMI_OUTPUT", str(out))
    specs = [ReplicaSpec(f"replica-{i}", free_port(), tiny_model_dir, tmp_path / "run" / f"replica-{i}" / "logs")
             for i in range(2)]
    sup = Supervisor(specs, tmp_path / "run", ChildRegistry(tmp_path / "children.json"), 60,
                     gpu_reset=[str(ROOT / "tests" / "fixtures" / "bin" / "fake-nvidia-smi"), "--gpu-reset"])
    sup.start_all()
    try:
        before = {n: r.pid for n, r in sup.replicas.items()}
        evidence = sup.act("reset_gpu", "replica-0")
        assert "successfully reset" in evidence and "2 replicas started again" in evidence
        assert argv_file.read_text().split() == ["--gpu-reset"]
        after = {n: r.pid for n, r in sup.replicas.items()}
        assert all(after[n] != before[n] for n in before) and all(r.healthy() for r in sup.replicas.values())
        monkeypatch.setenv("FAKE_SMI_EXIT", "3")
        with pytest.raises(RemediationError, match="GPU reset failed .* exited 3"):
            sup.act("reset_gpu", "replica-0")
        assert all(r.healthy() for r in sup.replicas.values())  # back, whatever the tool said
    finally:
        sup.stop_all()
