"""The daemon only wires capabilities: it starts them in order and stops the started ones in reverse, the
clock first, even when a start fails half-way or a stop raises. (``sentinel up`` end to end is in
tests/integration; these capabilities are plain objects standing in for the real ones.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from sentinel.capabilities import Clock
from sentinel.daemon import Daemon
from sentinel.settings import Settings


class Part:
    def __init__(self, name: str, events: list[str], fail_start: bool = False, fail_stop: bool = False) -> None:
        self.name, self.events, self.fail_start, self.fail_stop = name, events, fail_start, fail_stop

    def start(self, clock: Clock) -> None:
        self.events.append(f"start {self.name}")
        clock.every(60, lambda: None, f"job-{self.name}")
        if self.fail_start:
            raise RuntimeError(f"{self.name} cannot start")

    def stop(self) -> None:
        self.events.append(f"stop {self.name}")
        if self.fail_stop:
            raise RuntimeError(f"{self.name} cannot stop")


def test_started_parts_stop_in_reverse_even_after_a_failed_start(tmp_path: Path) -> None:
    d = Daemon(Settings(state_dir=tmp_path))
    events: list[str] = []
    d._run(Part("replicas", events))
    d._run(Part("prometheus", events, fail_stop=True))
    with pytest.raises(RuntimeError, match="cannot start"):
        d._run(Part("logs", events, fail_start=True))
    assert {j.id for j in d.clock.scheduler.get_jobs()} == {"job-replicas", "job-prometheus", "job-logs"}
    d.stop()
    # the half-started part is stopped too; a part whose stop raises does not keep the others running
    assert events == ["start replicas", "start prometheus", "start logs", "stop logs", "stop prometheus",
                      "stop replicas"]
    d.stop()  # idempotent
    assert events.count("stop replicas") == 1


def test_the_clock_stops_before_any_part(tmp_path: Path) -> None:
    d = Daemon(Settings(state_dir=tmp_path))
    seen: list[bool] = []

    class Watch(Part):
        def stop(self) -> None:
            seen.append(d.clock.scheduler.running)

    d._run(Watch("w", []))
    d.clock.start()
    d.stop()
    assert seen == [False]


def test_the_api_port_is_held_from_the_start_and_a_taken_one_is_a_clear_error(tmp_path: Path) -> None:
    """The API's port is bound when the daemon is built (nothing started after it, a child's outbound
    connection included, can take it before the API serves); a configured port already in use is refused
    with the address, before anything starts."""
    import socket

    from sentinel.errors import ServiceError

    d = Daemon(Settings(state_dir=tmp_path / "a"))
    with socket.socket() as other, pytest.raises(OSError):
        other.bind(("127.0.0.1", d.api_port))  # held
    with pytest.raises(ServiceError, match=rf"cannot listen on 127.0.0.1:{d.api_port}"):
        Daemon(Settings(state_dir=tmp_path / "b", api={"port": d.api_port}))
    d.api_socket.close()
