"""Elasticsearch as the log store's sink: an index template with explicit mappings, daily indices
``deepseek-inference-YYYY.MM.DD`` (UTC, from each event's ``@timestamp``), bulk indexing with each
event's deterministic id (``event.id``, see ``shipper.event_id``), and the shipper's offsets
checkpointed in SQLite only after Elasticsearch acknowledged the whole batch.

So a crash between the bulk request and the checkpoint re-sends a batch that overwrites itself (same
ids), and Elasticsearch being down raises ``LogStoreUnavailable`` with the offsets where they were:
nothing is lost and nothing duplicated. Queries stay within the modules the integration-test
distribution ships (the server's own query DSL and aggregations).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from elasticsearch import ApiError, Elasticsearch, TransportError, helpers

from sentinel.rules.filters import FilterNode, LogFilter

INDEX_PREFIX = "deepseek-inference"
TEMPLATE_NAME = "deepseek-inference"

# Explicit mappings for what the inference core logs (ECS names where ECS has one); other string
# fields become keywords, so nothing is analysed that a rule did not ask for.
MAPPINGS: dict[str, Any] = {
    "dynamic_templates": [{"strings_as_keywords": {"match_mapping_type": "string",
                                                   "mapping": {"type": "keyword", "ignore_above": 1024}}}],
    "properties": {
        "@timestamp": {"type": "date"},
        # keyword, so filters match the whole value as in the local store; .text for full-text search
        "message": {"type": "keyword", "ignore_above": 8191, "fields": {"text": {"type": "text"}}},
        "level": {"type": "keyword"},
        "service": {"properties": {"name": {"type": "keyword"}}},
        "host": {"properties": {"name": {"type": "keyword"}}},
        "event": {"properties": {"id": {"type": "keyword"}}},
        "replica": {"type": "keyword"},
        "request_id": {"type": "keyword"},
        "inference_time": {"type": "float"},
        "ttft_ms": {"type": "float"},
        "batch_size": {"type": "float"},  # the mean number of sequences per step: not a whole number
        "cuda_error": {"type": "keyword"},
        "error": {"type": "keyword", "ignore_above": 8191, "fields": {"text": {"type": "text"}}},
        "finish_reason": {"type": "keyword"},
        "prompt_tokens": {"type": "integer"},
        "completion_tokens": {"type": "integer"},
        "cached_tokens": {"type": "integer"},
        "preemptions": {"type": "integer"},
    },
}


class LogStoreUnavailable(RuntimeError):
    """Elasticsearch did not take the batch (down, slow, or refusing): the offsets stay where they were."""


def index_for(ts: float) -> str:
    return f"{INDEX_PREFIX}-{datetime.fromtimestamp(ts, UTC):%Y.%m.%d}"


class ElasticsearchSink:
    """The shipper's sink for Elasticsearch, with its checkpoints in a SQLite file beside sentinel's state."""

    def __init__(self, client: Elasticsearch, checkpoint_db: Path, replicas: int = 0) -> None:
        self.client = client
        checkpoint_db.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(checkpoint_db, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS checkpoints (source TEXT PRIMARY KEY, value TEXT NOT NULL)")
        self._lock = threading.Lock()
        self._template_ready = False
        self.replicas = replicas

    def ensure_template(self) -> None:
        """Install (or update) the index template; every daily index is created from it."""
        try:
            self.client.indices.put_index_template(
                name=TEMPLATE_NAME, index_patterns=[f"{INDEX_PREFIX}-*"], priority=200,
                template={"settings": {"number_of_shards": 1, "number_of_replicas": self.replicas},
                          "mappings": MAPPINGS})
        except (ApiError, TransportError) as exc:
            raise LogStoreUnavailable(f"cannot install the index template: {exc}") from exc
        self._template_ready = True

    def add(self, events: Sequence[tuple[float, Mapping[str, Any]]],
            checkpoint: tuple[str, Mapping[str, Any]] | None = None) -> None:
        if events:
            if not self._template_ready:
                self.ensure_template()
            actions = [{"_op_type": "index", "_index": index_for(ts), "_id": doc["event.id"], "_source": dict(doc)}
                       for ts, doc in events]
            try:
                ok, errors = helpers.bulk(self.client, actions, raise_on_error=False, raise_on_exception=True,
                                          max_retries=0)
            except (ApiError, TransportError, helpers.BulkIndexError) as exc:
                raise LogStoreUnavailable(f"bulk indexing failed: {exc}") from exc
            if errors:
                first = errors[0] if isinstance(errors, list) else errors
                raise LogStoreUnavailable(f"{len(errors) if isinstance(errors, list) else 1} documents refused, "
                                          f"e.g. {json.dumps(first)[:300]}")
        if checkpoint is not None:
            with self._lock:
                self._db.execute("INSERT OR REPLACE INTO checkpoints VALUES (?, ?)",
                                 (checkpoint[0], json.dumps(checkpoint[1])))

    def checkpoint(self, source: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM checkpoints WHERE source = ?", (source,)).fetchone()
        return None if row is None else dict(json.loads(row[0]))

    def ping(self) -> None:
        """Is the store reachable? Asked when there was nothing to ship, so that an idle service still
        notices Elasticsearch going away (``SentinelLogStoreDown``)."""
        try:
            self.client.options(request_timeout=5.0, max_retries=0).cluster.health()  # (no GET / in this distribution)
        except (ApiError, TransportError) as exc:
            raise LogStoreUnavailable(f"Elasticsearch unreachable: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._db.close()


class ElasticsearchLogStore:
    """Answers log rules from the daily indices with the local store's semantics (``LocalLogStore.count``):
    matching events in (since, until] by ``@timestamp``, grouped by the ``query_key`` fields (a missing
    field groups as ""), through a composite aggregation paged to the end."""

    def __init__(self, client: Elasticsearch, timeout_s: float = 10.0) -> None:
        self.client = client
        self.timeout_s = timeout_s

    @staticmethod
    def _query(filters: Iterable[LogFilter], since: float, until: float) -> dict[str, Any]:
        must: list[dict[str, Any]] = [{"range": {"@timestamp": {
            "gt": int(since * 1000), "lte": int(until * 1000), "format": "epoch_millis"}}}]
        must += [_filter_query(f) for f in filters]
        return {"bool": {"filter": must}}

    def search(self, filters: Iterable[LogFilter], since: float, until: float, limit: int = 100
               ) -> list[dict[str, Any]]:
        """The newest matching events in (since, until], newest first (as ``LocalLogStore.search``)."""
        try:
            r = self.client.options(request_timeout=self.timeout_s).search(
                index=f"{INDEX_PREFIX}-*", size=int(limit), query=self._query(list(filters), since, until),
                sort=[{"@timestamp": "desc"}], ignore_unavailable=True, allow_no_indices=True)
        except (ApiError, TransportError) as exc:
            raise LogStoreUnavailable(f"Elasticsearch query failed: {exc}") from exc
        return [dict(h["_source"]) for h in r["hits"]["hits"]]

    def aggregate(self, filters: Iterable[LogFilter], since: float, until: float, query_key: Sequence[str],
                  field: str, agg: str, percentile: float | None = None, method: str = "tdigest"
                  ) -> list[tuple[dict[str, str], float]]:
        """As ``LocalLogStore.aggregate``: a metric aggregation per ``query_key`` group."""
        query = self._query([*filters, LogFilter(exists=field)], since, until)
        metric = _metric(agg, field, percentile, method)
        out: list[tuple[dict[str, str], float]] = []
        groups: list[tuple[dict[str, str], float | None]]
        try:
            if not query_key:
                r = self._search(query, {"m": metric})
                value = _metric_value(agg, (r.get("aggregations") or {}).get("m") or {})
                groups = [({}, value)] if int(r["hits"]["total"]["value"]) else []
            else:
                groups = [(labels, _metric_value(agg, b["m"])) for labels, b in self._groups(query, query_key,
                                                                                             {"m": metric})]
        except (ApiError, TransportError) as exc:
            raise LogStoreUnavailable(f"Elasticsearch query failed: {exc}") from exc
        for labels, value in groups:
            if value is not None and not (agg in ("value_count", "cardinality") and value == 0):
                out.append((labels, value))
        return out

    def count(self, filters: Iterable[LogFilter], since: float, until: float,
              query_key: Sequence[str] = ()) -> list[tuple[dict[str, str], int]]:
        query = self._query(list(filters), since, until)
        try:
            if not query_key:
                n = int(self.client.options(request_timeout=self.timeout_s).count(
                    index=f"{INDEX_PREFIX}-*", query=query, ignore_unavailable=True, allow_no_indices=True)["count"])
                return [({}, n)] if n else []
            return [(labels, int(b["doc_count"])) for labels, b in self._groups(query, query_key)]
        except (ApiError, TransportError) as exc:
            raise LogStoreUnavailable(f"Elasticsearch query failed: {exc}") from exc

    def _search(self, query: dict[str, Any], aggs: dict[str, Any]) -> dict[str, Any]:
        r = self.client.options(request_timeout=self.timeout_s).search(
            index=f"{INDEX_PREFIX}-*", size=0, query=query, aggs=aggs, ignore_unavailable=True,
            allow_no_indices=True)
        return dict(r.body)

    def _groups(self, query: dict[str, Any], query_key: Sequence[str], sub: dict[str, Any] | None = None
                ) -> Iterator[tuple[dict[str, str], dict[str, Any]]]:
        """Every ``query_key`` group (a missing field groups as "") with its bucket, a composite
        aggregation paged to the end."""
        sources = [{k: {"terms": {"field": k, "missing_bucket": True}}} for k in query_key]
        after: dict[str, Any] | None = None
        while True:
            comp: dict[str, Any] = {"size": 1000, "sources": sources}
            if after is not None:
                comp["after"] = after
            agg = (self._search(query, {"g": {"composite": comp, **({"aggs": sub} if sub else {})}})
                   .get("aggregations") or {}).get("g") or {}
            for b in agg.get("buckets", []):
                yield {k: "" if b["key"][k] is None else _label(b["key"][k]) for k in query_key}, b
            after = agg.get("after_key")
            if not agg.get("buckets") or after is None:
                return


def _metric(agg: str, field: str, percentile: float | None, method: str = "tdigest") -> dict[str, Any]:
    if agg == "percentiles":
        # t-digest, Elasticsearch's (and so ElastAlert2's) default; or HDR at 3 digits, as the rule asks
        spec: dict[str, Any] = {"field": field, "percents": [percentile], "keyed": False}
        if method == "hdr":
            spec["hdr"] = {"number_of_significant_value_digits": 3}
        return {"percentiles": spec}
    return {agg: {"field": field}}


def _metric_value(agg: str, result: dict[str, Any]) -> float | None:
    if agg == "percentiles":
        values = result.get("values") or []
        return None if not values or values[0].get("value") is None else float(values[0]["value"])
    value = result.get("value")
    return None if value is None else float(value)


def _label(v: Any) -> str:
    """As the local store prints a JSON value: integers without a fraction, booleans lower-case."""
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _filter_query(f: LogFilter) -> dict[str, Any]:
    """One filter as an Elasticsearch query clause (the local store's ``_filter_sql``, clause for clause)."""
    if f.tree is not None:
        return _node_query(f.tree)
    must: list[dict[str, Any]] = []
    if f.exists is not None:
        must.append({"exists": {"field": f.exists}})
    for name, value in (f.term or {}).items():
        must.append({"term": {name: value}})
    for name, values in (f.terms or {}).items():
        must.append({"terms": {name: values}})
    for name, rng in (f.range or {}).items():
        must.append({"range": {name: dict(rng.bounds())}})
    for name, pattern in (f.wildcard or {}).items():
        must.append({"wildcard": {name: {"value": pattern}}})
    return must[0] if len(must) == 1 else {"bool": {"filter": must}}


def _node_query(node: FilterNode) -> dict[str, Any]:
    kind, arg = node
    if kind == "leaf":
        return _filter_query(arg)
    if kind == "not":
        return {"bool": {"must_not": [_node_query(arg)]}}
    if kind == "and":
        return {"bool": {"filter": [_node_query(n) for n in arg]}}
    return {"bool": {"should": [_node_query(n) for n in arg], "minimum_should_match": 1}}
