"""Leader election with a coordination.k8s.io/v1 Lease, as client-go's ``leaderelection`` package does it.

Every ``retry_period`` each candidate runs ``try_acquire_or_renew``:

- no Lease: create it, holding it (a create conflict means another candidate won);
- held by someone else whose record was last seen changing less than ``lease_duration`` ago: follow. As
  client-go, expiry is judged by when *this* process observed the record change, not by the holder's
  ``renewTime``, so clocks that disagree between nodes do not matter;
- otherwise (ours, expired, or released): write it with our identity, ``renewTime`` now, and on a change of
  holder ``acquireTime`` now and ``leaseTransitions`` + 1. The write is a replace carrying the
  ``resourceVersion`` read, so of two candidates writing at once one gets 409 Conflict and follows.

A leader that has not renewed for ``renew_deadline`` steps down at once (it may be partitioned; the Lease
will expire for the others after ``lease_duration``). ``release`` on a clean stop empties the holder, as
client-go's ``ReleaseOnCancel``, so a follower takes over at its next try instead of after the expiry.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

log = logging.getLogger(__name__)


def _now_utc() -> datetime:
    return datetime.now(UTC)


class LeaderElector:
    def __init__(self, api: k8s.ApiClient, namespace: str, name: str, identity: str, lease_duration_s: float = 15.0,
                 renew_deadline_s: float = 10.0, retry_period_s: float = 2.0,
                 on_change: Callable[[bool], None] = lambda leading: None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.leases = k8s.CoordinationV1Api(api)
        self.namespace, self.name, self.identity = namespace, name, identity
        self.lease_duration_s, self.renew_deadline_s, self.retry_period_s = (lease_duration_s, renew_deadline_s,
                                                                              retry_period_s)
        self.on_change = on_change
        self.clock = clock
        self._leading = False
        self._observed: tuple[object, ...] | None = None  # the holder's record as last read
        self._observed_at = 0.0
        self._renewed_at = 0.0
        self.holder: str | None = None
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def leading(self) -> bool:
        """True only while the last successful renewal is within ``renew_deadline``."""
        if self._leading and self.clock() - self._renewed_at > self.renew_deadline_s:
            self._set(False, f"could not renew the lease within {self.renew_deadline_s:.0f}s")
        return self._leading

    def _set(self, leading: bool, why: str) -> None:
        if leading == self._leading:
            return
        self._leading = leading
        (log.warning if not leading else log.info)("%s %s the lease %s/%s: %s", self.identity,
                                                    "holds" if leading else "no longer holds", self.namespace,
                                                    self.name, why)
        self.on_change(leading)

    def _spec(self, old: k8s.V1LeaseSpec | None, now: datetime) -> k8s.V1LeaseSpec:
        ours = old is not None and old.holder_identity == self.identity
        transitions = (old.lease_transitions or 0) if old is not None else 0
        return k8s.V1LeaseSpec(
            holder_identity=self.identity, lease_duration_seconds=max(1, round(self.lease_duration_s)),
            acquire_time=old.acquire_time if ours and old is not None and old.acquire_time else now,
            renew_time=now, lease_transitions=transitions if ours or old is None else transitions + 1)

    def try_acquire_or_renew(self) -> bool:
        """One round; returns whether this candidate leads afterwards."""
        now = _now_utc()
        try:
            try:
                lease = self.leases.read_namespaced_lease(self.name, self.namespace)
            except ApiException as exc:
                if exc.status != 404:
                    raise
                body = k8s.V1Lease(api_version="coordination.k8s.io/v1", kind="Lease",
                                   metadata=k8s.V1ObjectMeta(name=self.name, namespace=self.namespace),
                                   spec=self._spec(None, now))
                try:
                    self.leases.create_namespaced_lease(self.namespace, body)
                except ApiException as exc2:
                    if exc2.status == 409:  # another candidate created it first
                        return self._follow("another candidate created the lease first")
                    raise
                return self._renewed("created the lease")
            spec = lease.spec or k8s.V1LeaseSpec()
            record = (spec.holder_identity, spec.lease_duration_seconds, spec.acquire_time, spec.renew_time,
                      spec.lease_transitions)
            if record != self._observed:
                self._observed, self._observed_at = record, self.clock()
            self.holder = spec.holder_identity or None
            held_by_other = bool(spec.holder_identity) and spec.holder_identity != self.identity
            duration = float(spec.lease_duration_seconds or self.lease_duration_s)
            if held_by_other and self._observed_at + duration > self.clock():
                return self._follow(f"held by {spec.holder_identity}")
            version = (lease.metadata or k8s.V1ObjectMeta()).resource_version  # the write is conditional on it
            body = k8s.V1Lease(api_version="coordination.k8s.io/v1", kind="Lease",
                               metadata=k8s.V1ObjectMeta(name=self.name, namespace=self.namespace,
                                                         resource_version=version),
                               spec=self._spec(spec, now))
            try:
                self.leases.replace_namespaced_lease(self.name, self.namespace, body)
            except ApiException as exc:
                if exc.status == 409:  # someone wrote it since we read it
                    return self._follow("lost a concurrent update of the lease")
                raise
            return self._renewed("renewed" if not held_by_other else f"took over from {spec.holder_identity}")
        except Exception as exc:  # noqa: BLE001 - the API unreachable: keep leading until the renew deadline
            self.last_error = f"{type(exc).__name__}: {str(exc)[:300]}"
            log.warning("lease %s/%s: %s", self.namespace, self.name, self.last_error)
            return self.leading

    def _renewed(self, why: str) -> bool:
        self._renewed_at = self.clock()
        self.holder = self.identity
        self.last_error = None
        self._set(True, why)
        return True

    def _follow(self, why: str) -> bool:
        self.last_error = None
        self._set(False, why)
        return False

    def release(self) -> None:
        """Give the lease up (a clean stop): holder emptied, duration 1 s, so a follower takes over at once."""
        if not self._leading:
            return
        try:
            lease = self.leases.read_namespaced_lease(self.name, self.namespace)
            if lease.spec is None or lease.spec.holder_identity != self.identity:
                return
            lease.spec.holder_identity = None
            lease.spec.lease_duration_seconds = 1
            lease.spec.renew_time = _now_utc()
            self.leases.replace_namespaced_lease(self.name, self.namespace, lease)
        except Exception as exc:  # noqa: BLE001 - then the others wait for the expiry
            log.warning("could not release the lease %s/%s: %s", self.namespace, self.name, exc)
        finally:
            self._set(False, "released on stop")

    # -- the loop -----------------------------------------------------------------------------------------
    def start(self) -> None:
        def loop() -> None:
            while not self._stop.is_set():
                self.try_acquire_or_renew()
                self._stop.wait(self.retry_period_s)

        self._thread = threading.Thread(target=loop, name="lease", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.release()
