"""Runs a runbook's steps in order, each with its timeout and condition; never raises for a check."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

from sentinel.runbooks.base import REGISTRY, SEVERITY, Context, Finding, Status
from sentinel.runbooks.model import Runbook, Step


@dataclass
class StepResult:
    runbook: str
    step: str
    check: str
    finding: Finding
    seconds: float


@dataclass
class Report:
    title: str
    started_at: float
    results: list[StepResult] = field(default_factory=list)
    alert_labels: dict[str, str] = field(default_factory=dict)

    @property
    def status(self) -> Status:
        worst = max((SEVERITY[r.finding.status] for r in self.results), default=0)
        return {0: Status.OK, 1: Status.WARN, 2: Status.FAIL}[worst]

    @property
    def exit_code(self) -> int:
        return SEVERITY[self.status]

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.results)

    def to_dict(self) -> dict[str, object]:
        return {
            "title": self.title, "status": self.status.value, "started_at": self.started_at,
            "seconds": round(self.seconds, 3), "alert_labels": self.alert_labels,
            "results": [{"runbook": r.runbook, "step": r.step, "check": r.check, "status": r.finding.status.value,
                         "summary": r.finding.summary, "remedy": r.finding.remedy, "seconds": round(r.seconds, 3),
                         "evidence": r.finding.evidence} for r in self.results],
        }


Progress = Callable[[str, StepResult | None], None]  # (step label, result or None when starting)


def _run_one(step: Step, ctx: Context, pool: ThreadPoolExecutor) -> Finding:
    chk = REGISTRY[step.check]
    fut = pool.submit(chk.run, step.typed_params(), ctx)
    try:
        return fut.result(timeout=step.timeout)
    except FutureTimeout:
        return Finding(Status.FAIL, f"check did not finish within {step.timeout:g}s",
                       remedy="the probe itself hung: the subsystem it reads is likely wedged")
    except Exception as exc:  # a check's bug becomes a visible finding, never a crash of the runner
        return Finding(Status.FAIL, f"check crashed: {type(exc).__name__}: {exc}")


def run(runbooks: Iterable[Runbook], ctx: Context, title: str, progress: Progress | None = None,
        dedupe: bool = False) -> Report:
    """Run every step of ``runbooks`` in order. With ``dedupe``, a check with identical parameters
    runs once even when several runbooks list it (``diagnose --all``)."""
    report = Report(title, time.time(), alert_labels=dict(ctx.alert_labels))
    seen: set[tuple[str, str]] = set()
    pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="check")
    try:
        for rb in runbooks:
            done: dict[str, Status] = {}
            for step in rb.steps:
                key = (step.check, step.typed_params().model_dump_json())
                if dedupe and key in seen and step.when is None:
                    continue
                seen.add(key)
                label = f"{rb.name}/{step.id}"
                if progress:
                    progress(label, None)
                t0 = time.perf_counter()
                if step.when is not None and done.get(step.when.step) not in step.when.status:
                    got = done.get(step.when.step)
                    wanted = "/".join(s.value for s in step.when.status)
                    finding = Finding(Status.SKIPPED, f"condition not met: {step.when.step} was "
                                      f"{got.value if got else 'not run'}, not {wanted}")
                else:
                    finding = _run_one(step, ctx, pool)
                result = StepResult(rb.name, step.id, step.check, finding, time.perf_counter() - t0)
                done[step.id] = finding.status
                report.results.append(result)
                if progress:
                    progress(label, result)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return report
