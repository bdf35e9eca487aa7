"""The evaluator's own alerts about the rules: a rule whose datasource query fails (the meta-alert), and a
datasource every one of whose rules fails (one cause, one page: the default inhibition mutes the per-rule
alerts it explains). Their samples are the rules' health."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from sentinel.alerts.internal import InternalRule
from sentinel.alerts.state import Sample

if TYPE_CHECKING:
    from sentinel.rules.runtime import RuleRuntime

META_ALERT = "SentinelRuleEvaluationFailing"
DATASOURCE_DOWN_ALERT = "SentinelDatasourceDown"


def health_rules(runtimes: Callable[[], Iterable[RuleRuntime]], meta_for: float) -> list[InternalRule]:
    def failing(now: float) -> list[Sample]:
        return [Sample({"rule_group": rt.group.group.name, "rule": rt.rule.name, "datasource": rt.datasource}, 1.0)
                for rt in runtimes() if rt.health == "err"]

    def down(now: float) -> list[Sample]:
        by_source: dict[str, list[bool]] = {}
        for rt in runtimes():
            by_source.setdefault(rt.datasource, []).append(rt.health == "err")
        return [Sample({"datasource": ds}, float(len(errs))) for ds, errs in by_source.items() if errs and all(errs)]

    return [
        InternalRule("sentinel-meta-internal", {
            "alert": META_ALERT, "for": meta_for, "labels": {"severity": "warning"},
            "annotations": {"summary": "rule {{ $labels.rule }} (group {{ $labels.rule_group }}) cannot be evaluated: "
                            "its {{ $labels.datasource }} query fails; its alerts keep their last state"}}, failing),
        InternalRule("sentinel-datasource-internal", {
            "alert": DATASOURCE_DOWN_ALERT, "for": meta_for, "labels": {"severity": "page"},
            "annotations": {"summary": "every {{ $labels.datasource }} rule fails ({{ $value }} rules): the "
                            "{{ $labels.datasource }} datasource is down or unreachable; alerts keep their last state",
                            "description": "`sentinel alerts` and /api/v1/rules show each rule's last error"}}, down),
    ]
