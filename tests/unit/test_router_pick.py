"""The router's choice of replica, without servers: least outstanding work first, ties round-robin."""

from __future__ import annotations

from collections import Counter

from prometheus_client import CollectorRegistry

from sentinel.router import Router, Upstream


def _router(*names: str) -> Router:
    router = Router(lambda: [], CollectorRegistry())
    for name in names:
        router.upstreams[name] = Upstream(name, f"http://127.0.0.1/{name}", ready=True)
    return router


def test_idle_replicas_take_turns_so_a_new_one_gets_work_under_light_load() -> None:
    """One client at a time against idle replicas: each is picked in turn (before, the lowest name always won
    the tie, so a replica added by a scale-out served nothing until the others were busy)."""
    router = _router("replica-0", "replica-1", "replica-2")
    picks = Counter(router.pick(set()).name for _ in range(30))  # type: ignore[union-attr]
    assert picks == {"replica-0": 10, "replica-1": 10, "replica-2": 10}


def test_least_outstanding_work_wins_and_excluded_or_unready_never_do() -> None:
    router = _router("replica-0", "replica-1", "replica-2")
    router.upstreams["replica-0"].tokens = 50
    router.upstreams["replica-1"].pending = 10
    assert {router.pick(set()).name for _ in range(6)} == {"replica-2"}  # type: ignore[union-attr]
    router.upstreams["replica-2"].in_flight = 1  # equal tokens: fewer open requests wins
    router.upstreams["replica-1"].pending = 0
    assert router.pick(set()).name == "replica-1"  # type: ignore[union-attr]
    assert router.pick({"replica-1"}).name == "replica-2"  # type: ignore[union-attr]
    router.upstreams["replica-2"].ready = False
    assert router.pick({"replica-1"}).name == "replica-0"  # type: ignore[union-attr]
    assert router.pick({"replica-0", "replica-1"}) is None
