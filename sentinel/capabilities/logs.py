"""Log shipping and the log store: the replicas' JSON lines go to Elasticsearch (``logs.elasticsearch_url``)
or to the local store, and log rules are answered from there. In a cluster Filebeat ships and sentinel
only reads."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from sentinel import logstore
from sentinel.capabilities import Clock
from sentinel.capabilities.replicas import log_source
from sentinel.logstore.elasticsearch import ElasticsearchLogStore, ElasticsearchSink, LogStoreUnavailable
from sentinel.logstore.local import LocalLogStore
from sentinel.logstore.shipper import Shipper, Sink
from sentinel.metrics import SentinelMetrics
from sentinel.rules.sources import LogCounter, LogRuleSource
from sentinel.settings import Settings
from sentinel.supervisor import ReplicaSpec

log = logging.getLogger(__name__)


class LogShipping:
    name = "logs"

    def __init__(self, settings: Settings, state_dir: Path, metrics: SentinelMetrics, specs: list[ReplicaSpec],
                 ship: bool = True) -> None:
        self.settings = settings
        self.state_dir = state_dir
        self.metrics = metrics
        self.specs = specs
        self.ship_locally = ship  # False in a cluster: Filebeat ships
        self.local: LocalLogStore | None = None
        self.es_sink: ElasticsearchSink | None = None
        self.shipper: Shipper | None = None
        self.counter: LogCounter | None = None
        self.reader: Any = None  # what runbooks read recent lines from
        self._store_up = True

    @property
    def settle_s(self) -> float:
        return 1.0 if self.settings.logs.elasticsearch_url else 0.0  # Elasticsearch shows new documents within 1 s

    def start(self, clock: Clock) -> None:
        lg = self.settings.logs
        sink: Sink
        store = logstore.open(self.settings, db=self.state_dir / "logs.db", writer=True)
        if isinstance(store, ElasticsearchLogStore):  # Elasticsearch: shipped there, log rules answered from it
            sink = self.es_sink = ElasticsearchSink(store.client, self.state_dir / "shipper.db")
            self.counter = self.reader = store
        else:
            # the column index (DuckDB) answers log rules; this process is the one that writes the store
            local = self.local = store
            sink = self.counter = self.reader = local
            # Elasticsearch's retention is the cluster's business (ILM, curator); the local store's is ours
            clock.every(600, lambda: local.prune(time.time() - lg.retention), "prune")
        if self.ship_locally:
            self.shipper = Shipper(sink, [log_source(sp) for sp in self.specs])
            clock.every(lg.ship_interval, self.ship, "ship", now=True)

    def visible_until(self) -> float:
        """Every line written before this time can be counted by a log rule."""
        if self.shipper is None:  # Filebeat ships: allow it one shipping interval
            return time.time() - self.settings.logs.ship_interval - self.settle_s
        return self.shipper.visible_until(self.settle_s)

    def rule_source(self) -> LogRuleSource:
        assert self.counter is not None, "logs used before they started"
        return LogRuleSource(self.counter, self.visible_until,
                             slack_s=self.settings.logs.ship_interval + 2.0 + self.settle_s)

    def add(self, specs: list[ReplicaSpec]) -> None:
        """After a scale-out: ship the new replicas' logs too (a removed replica's file is shipped to its end)."""
        if self.shipper is not None:
            known = {src.name for src in self.shipper.sources}
            self.shipper.sources.extend(log_source(sp) for sp in specs if sp.name not in known)

    def ship(self) -> None:
        shipper = self.shipper
        assert shipper is not None
        try:
            self.metrics.log_events.inc(shipper.run_once())
        except LogStoreUnavailable as exc:  # the offsets stay; the next run catches up
            if self._store_up:  # said once per outage
                log.warning("log store unavailable, shipping paused: %s", exc)
            self._store_up = False
            self.metrics.log_store_up.set(0)
            return
        if not self._store_up:
            log.info("log store reachable again, shipping resumed")
        self._store_up = True
        self.metrics.log_store_up.set(1)

    def stop(self) -> None:
        for db in (self.local, self.es_sink):
            if db is not None:
                db.close()
        self.local = self.es_sink = None
