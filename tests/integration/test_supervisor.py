"""The local supervisor as an actuator: restart and scale out real inference_core replicas."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from sentinel.errors import RemediationError
from sentinel.netutil import free_port
from sentinel.supervisor import ChildRegistry, ReplicaSpec, Supervisor

pytestmark = pytest.mark.integration


def test_scale_out_up_to_the_limit_then_refuse(tmp_path: Path, tiny_model_dir: Path) -> None:
    seen: list[list[str]] = []
    spec = ReplicaSpec("replica-0", free_port(), tiny_model_dir, tmp_path / "run" / "replica-0" / "logs")
    sup = Supervisor([spec], tmp_path / "run", ChildRegistry(tmp_path / "children.json"), 60, max_replicas=2,
                     on_change=lambda specs: seen.append([s.name for s in specs]))
    sup.start_all()
    try:
        evidence = sup.act("scale_out", "replica-0")
        assert "started replica-1" in evidence and seen == [["replica-0", "replica-1"]]
        new = sup.replicas["replica-1"]
        assert httpx.get(f"{new.spec.url}/ready").status_code == 200
        assert new.spec.log_dir == tmp_path / "run" / "replica-1" / "logs"
        with pytest.raises(RemediationError, match="max_count=2"):
            sup.act("scale_out", "replica-1")
        with pytest.raises(RemediationError, match="unknown replica"):
            sup.act("restart", "../replica-0")
        pids = [r.pid for r in sup.replicas.values()]
    finally:
        sup.stop_all()
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
