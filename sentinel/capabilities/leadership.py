"""Who acts: in a cluster, the holder of a coordination Lease (client-go's leader election), so two
sentinels never notify or act twice; alone, always this one."""

from __future__ import annotations

from typing import Any

from kubernetes.client import ApiClient

from sentinel.capabilities import Audit, Clock
from sentinel.kube import identity as kube_identity
from sentinel.kube.lease import LeaderElector
from sentinel.settings import Settings


class Leadership:
    name = "leadership"

    def __init__(self, settings: Settings, api: ApiClient | None, audit: Audit) -> None:
        self.settings = settings
        self.audit = audit
        k = settings.kubernetes
        self.elector = None if api is None else LeaderElector(
            api, k.namespace, k.lease_name, kube_identity(k), k.lease_duration, k.renew_deadline, k.retry_period,
            on_change=self._changed)

    @property
    def leading(self) -> bool:
        return self.elector is None or self.elector.leading

    def _changed(self, leading: bool) -> None:
        self.audit("leadership", self.settings.kubernetes.lease_name, leading=leading,
                   identity=self.elector.identity if self.elector else None)

    def start(self, clock: Clock) -> None:
        if self.elector is not None:
            self.elector.start()

    def status(self) -> dict[str, Any] | None:
        e = self.elector
        if e is None:
            return None
        return {"identity": e.identity, "leading": e.leading, "holder": e.holder,
                "lease": self.settings.kubernetes.lease_name, "lastError": e.last_error}

    def stop(self) -> None:
        if self.elector is not None:
            self.elector.stop()  # releases the lease: a follower takes over at once
