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


def test_a_taken_default_port_moves_to_the_next_free_one_and_says_so() -> None:
    """Conventional default ports (router 8000, Prometheus 9090, the API 9095): one that is taken is replaced
    by the next free one, with a note for the up table; one set explicitly stays an error; 0 is any port."""
    import socket

    from sentinel.netutil import reserve_near

    first, note = reserve_near("127.0.0.1", 0, explicit=False)
    port = first.getsockname()[1]
    assert note == ""
    with first:
        moved, note = reserve_near("127.0.0.1", port, explicit=False)
        with moved:
            assert moved.getsockname()[1] > port and note == f"port {port} was taken: {moved.getsockname()[1]}"
        with pytest.raises(OSError):
            reserve_near("127.0.0.1", port, explicit=True)
    again, note = reserve_near("127.0.0.1", port, explicit=False)  # free again: the default itself
    with again:
        assert again.getsockname()[1] == port and note == ""
    assert isinstance(again, socket.socket)


def test_the_defaults_are_the_conventional_ports(tmp_path: Path) -> None:
    s = Settings(state_dir=tmp_path)
    assert (s.router.port, s.prometheus.port, s.api.port) == (8000, 9090, 9095)
    d = Daemon(s)
    try:
        assert d.api_port >= 9095 and ("was taken" in d.api_port_note) == (d.api_port != 9095)
    finally:
        d.api_socket.close()
