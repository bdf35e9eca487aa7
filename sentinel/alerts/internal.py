"""sentinel's own alerting rules as data: an ``InternalRule`` is a rule definition (what a rule file would
say) and the source of its samples. Each is owned by the package that knows its source: delivery's
undeliverable notifications here, the evaluator's rule health in ``sentinel.rules.internal``, the
remediation ladder's escalations and approvals in ``sentinel.remediation.internal``, the replicas' liveness
in ``sentinel.capabilities.replicas``. The evaluator evaluates them all the same way."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sentinel.alerts.state import Sample

if TYPE_CHECKING:
    from sentinel.state.outbox import Outbox

# Samples at an evaluation time.
Source = Callable[[float], list[Sample]]

UNDELIVERABLE_ALERT = "SentinelNotificationUndeliverable"
UNDELIVERABLE_WINDOW_S = 3600.0


@dataclass(frozen=True)
class InternalRule:
    """``spec``: the rule as a rule file would define it (``alert``, ``for``, ``labels``, ``annotations``,
    ``sentinel``), without ``expr``. ``source``: its samples at a time, read at each meta evaluation; None
    where its owner pushes them (``Evaluator.push``), as the liveness probe does."""

    group: str
    spec: Mapping[str, Any]
    source: Source | None = None

    @property
    def alert(self) -> str:
        return str(self.spec["alert"])


def undeliverable(store: Outbox) -> InternalRule:
    """Notifications that could not be delivered in the last hour, said to the receivers that can still hear."""
    def source(now: float) -> list[Sample]:
        return [Sample({"receiver": rcv}, float(n))
                for rcv, (n, _) in store.undelivered(now - UNDELIVERABLE_WINDOW_S).items()]

    return InternalRule("sentinel-delivery-internal", {
        "alert": UNDELIVERABLE_ALERT, "labels": {"severity": "page"},
        "annotations": {"summary": "{{ $value }} notification(s) to receiver {{ $labels.receiver }} could not be "
                        "delivered in the last hour (refused, or expired undelivered)",
                        "description": "`sentinel alerts` shows each receiver's queue and its last error"}}, source)
