"""What ``sentinel up`` runs, one capability per module, each owning its own start and stop.

The daemon (``sentinel/daemon.py``) only wires them: it builds each in order, hands it what the earlier
ones provide, starts it, and stops the started ones in reverse. Periodic work goes through one
:class:`Clock`: a capability adds its jobs in ``start`` and the clock runs them once everything has
started (and stops first, so no job runs while the capabilities below it are being stopped).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from apscheduler.events import EVENT_JOB_MAX_INSTANCES, EVENT_JOB_MISSED
from apscheduler.executors.pool import ThreadPoolExecutor as APThreadPool
from apscheduler.schedulers.background import BackgroundScheduler

Audit = Callable[..., None]  # audit(kind, subject, **detail): one line of the persisted audit log


@dataclass
class Service:
    """One line of ``sentinel up``'s table and of ``up.json``."""
    name: str
    url: str
    pid: int | None
    detail: str = ""


class Capability(Protocol):
    name: str

    def start(self, clock: Clock) -> None: ...

    def stop(self) -> None:
        """Idempotent, and safe after a ``start`` that failed half-way."""


class Clock:
    """The daemon's one scheduler (APScheduler): a thread pool for housekeeping and a bounded one for rule
    evaluation, so query concurrency has a ceiling. Jobs coalesce and never overlap themselves."""

    def __init__(self, max_concurrent_evaluations: int) -> None:
        self.scheduler = BackgroundScheduler(
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 5},
            executors={"default": APThreadPool(4), "eval": APThreadPool(max_concurrent_evaluations)})

    def every(self, seconds: float, fn: Callable[..., Any], job_id: str, *, now: bool = False,
              executor: str = "default", first: float | None = None, args: Sequence[Any] = ()) -> None:
        """Run ``fn(*args)`` every ``seconds``: the first time at once when ``now``, at the Unix time
        ``first`` when given, else one interval from now. ``executor="eval"``: the bounded rule pool."""
        start = now_dt() if now else datetime.fromtimestamp(first, UTC) if first is not None else None
        self.scheduler.add_job(fn, "interval", seconds=seconds, id=job_id, executor=executor, args=list(args),
                               **({"next_run_time": start} if start is not None else {}))

    def jobs(self, prefix: str = "") -> dict[str, float]:
        """The jobs whose id starts with ``prefix``, with their intervals in seconds."""
        return {job.id: job.trigger.interval.total_seconds() for job in self.scheduler.get_jobs()
                if job.id.startswith(prefix)}

    def cancel(self, job_id: str) -> None:
        """Stop a job (a no-op when there is none)."""
        if self.scheduler.get_job(job_id) is not None:
            self.scheduler.remove_job(job_id)

    def reschedule(self, job_id: str, seconds: float) -> None:
        self.scheduler.reschedule_job(job_id, trigger="interval", seconds=seconds)

    def on_missed(self, callback: Callable[[str], None]) -> None:
        """``callback(job_id)`` when a run is skipped: its previous run still running, or past its grace time."""
        self.scheduler.add_listener(lambda ev: callback(ev.job_id), EVENT_JOB_MISSED | EVENT_JOB_MAX_INSTANCES)

    def start(self) -> None:
        self.scheduler.start()

    def stop(self) -> None:
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)


def now_dt() -> datetime:
    return datetime.now(UTC)
