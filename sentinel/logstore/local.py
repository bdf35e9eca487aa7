"""The local log store, used when no Elasticsearch is configured: JSON events in SQLite (WAL).

Queries take field names as bound JSON paths, never as SQL text, so no log field or alert label can
reach the SQL.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import duckdb

from sentinel.logstore.columns import ColumnIndex
from sentinel.logstore.sql import label_of, tree_sql
from sentinel.rules.filters import LogFilter

log = logging.getLogger(__name__)

RANGE_OPS = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<="}  # fixed SQL text; the bounds are bound parameters


def json_path(field: str) -> str:
    """A SQLite JSON path for a (possibly dotted) top-level field name such as ``service.name``."""
    return '$."' + field.replace('"', '') + '"'


def percentile_of(values: Sequence[float], percentile: float, method: str = "tdigest") -> float:
    """The ``percentile`` of sorted ``values`` as Elasticsearch computes it.

    ``tdigest`` (the default there): up to 2,000 values a t-digest keeps them all (``HybridDigest`` is a
    ``SortingDigest`` below 20 × compression 100) and interpolates linearly between the two ranks around
    p/100 × (n - 1) (``Dist.quantile``); past that Elasticsearch approximates (within ~1 %) and this stays exact.
    ``hdr``: HdrHistogram's rank, p/100 × n rounded, at least 1."""
    n = len(values)
    if method == "hdr":
        return values[max(1, int(percentile / 100 * n + 0.5)) - 1]
    index = percentile / 100 * (n - 1)
    if index <= 0:
        return values[0]
    if index >= n - 1:
        return values[n - 1]
    low = int(index)
    return values[low] + (index - low) * (values[low + 1] - values[low])


class LocalLogStore:
    def __init__(self, path: Path, column_index: bool = False) -> None:
        """``column_index``: keep the DuckDB column index beside the file (``logs.duckdb``) and answer
        counts and aggregations from it (``columns.py``); for the one process that ships. Others read the
        SQLite file alone, as they may while sentinel runs."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(
            "CREATE TABLE IF NOT EXISTS events ("
            "  id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, doc TEXT NOT NULL);"
            "CREATE INDEX IF NOT EXISTS events_ts ON events (ts);"
            "CREATE TABLE IF NOT EXISTS checkpoints (source TEXT PRIMARY KEY, value TEXT NOT NULL);")
        self._lock = threading.Lock()
        self.index: ColumnIndex | None = None
        if column_index:
            self.index = self._open_index(path.with_suffix(".duckdb"))

    def _open_index(self, path: Path) -> ColumnIndex | None:
        """The column index, caught up with this store by id; None (answers from SQLite) if it cannot open."""
        try:
            index = ColumnIndex(path)
        except duckdb.Error as exc:  # held by another process, or unreadable: the SQLite path still answers
            log.warning("log store: column index %s unavailable (%s); log rules are answered from SQLite, "
                        "slower", path, exc)
            return None
        last = index.max_id()
        t0 = time.monotonic()
        copied = 0
        while True:
            with self._lock:
                rows = self._db.execute("SELECT id, ts, doc FROM events WHERE id > ? ORDER BY id LIMIT 50000",
                                        (last,)).fetchall()
            if not rows:
                break
            index.add(rows)
            last = rows[-1][0]
            copied += len(rows)
        if copied:
            log.info("log store: column index caught up with %d event(s) in %.1f s", copied, time.monotonic() - t0)
        return index

    def close(self) -> None:
        with self._lock:
            self._db.close()
        if self.index is not None:
            self.index.close()

    def add(self, events: Sequence[tuple[float, Mapping[str, Any]]],
            checkpoint: tuple[str, Mapping[str, Any]] | None = None) -> None:
        """Insert events and (optionally) the shipper's checkpoint in one transaction: exactly once."""
        rows = [(ts, json.dumps(doc)) for ts, doc in events]
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                before = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
                self._db.executemany("INSERT INTO events (ts, doc) VALUES (?, ?)", rows)
                if checkpoint is not None:
                    self._db.execute("INSERT OR REPLACE INTO checkpoints VALUES (?, ?)",
                                     (checkpoint[0], json.dumps(checkpoint[1])))
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        if self.index is not None and rows:
            # one writer under the lock: the batch took the ids after the sequence's value before it
            first = (before[0] if before else 0) + 1
            try:
                self.index.add([(first + i, ts, doc) for i, (ts, doc) in enumerate(rows)])
            except duckdb.Error as exc:  # the store has the lines; the index is rebuilt from it on the next open
                log.error("log store: column index write failed (%s); answering from SQLite until restart", exc)
                self.index = None

    def checkpoint(self, source: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM checkpoints WHERE source = ?", (source,)).fetchone()
        return None if row is None else dict(json.loads(row[0]))

    def search(self, filters: Iterable[LogFilter], since: float, until: float, limit: int = 100
               ) -> list[dict[str, Any]]:
        """The newest matching events in (since, until], newest first."""
        where, params = self._where(filters, since, until)
        sql = f"SELECT doc FROM events WHERE {' AND '.join(where)} ORDER BY ts DESC, id DESC LIMIT ?"
        with self._lock:
            rows = self._db.execute(sql, [*params, int(limit)]).fetchall()
        return [dict(json.loads(r[0])) for r in rows]

    def count(self, filters: Iterable[LogFilter], since: float, until: float,
              query_key: Sequence[str] = ()) -> list[tuple[dict[str, str], int]]:
        """Matching events in (since, until], grouped by the ``query_key`` fields."""
        if self.index is not None:
            return self.index.count(filters, since, until, query_key)
        where, params = self._where(filters, since, until)
        keys = ["json_extract(doc, ?)" for _ in query_key]
        sql = f"SELECT {', '.join([*keys, 'COUNT(*)'])} FROM events WHERE {' AND '.join(where)}"
        if keys:
            sql += f" GROUP BY {', '.join(str(i + 1) for i in range(len(keys)))}"
        with self._lock:
            rows = self._db.execute(sql, [*[json_path(k) for k in query_key], *params]).fetchall()
        out = []
        for row in rows:
            if row[-1] == 0:
                continue
            labels = {k: label_of(v) for k, v in zip(query_key, row[:-1], strict=True)}
            out.append((labels, int(row[-1])))
        return out

    def aggregate(self, filters: Iterable[LogFilter], since: float, until: float, query_key: Sequence[str],
                  field: str, agg: str, percentile: float | None = None, method: str = "tdigest"
                  ) -> list[tuple[dict[str, str], float]]:
        """``agg`` of ``field`` over matching events per ``query_key`` group, as Elasticsearch's metric
        aggregations: only events whose field is a number count (any non-null value for
        ``cardinality``); groups without one are left out. ``percentiles`` as the ``method`` says (see
        ``percentile_of``)."""
        if self.index is not None:
            return self.index.aggregate(filters, since, until, query_key, field, agg, percentile, method)
        where, params = self._where(filters, since, until)
        fp = json_path(field)
        if agg == "cardinality":
            where.append("json_type(doc, ?) IS NOT NULL AND json_type(doc, ?) != 'null'")
            params += [fp, fp]
        else:
            where.append("json_type(doc, ?) IN ('integer', 'real')")
            params.append(fp)
        keys = ["json_extract(doc, ?)" for _ in query_key]
        sql_agg = {"min": "MIN(v)", "max": "MAX(v)", "avg": "AVG(v)", "sum": "SUM(v)", "value_count": "COUNT(v)",
                   "cardinality": "COUNT(DISTINCT v)", "percentiles": "json_group_array(v)"}[agg]
        inner = (f"SELECT {', '.join([*[f'{k} AS k{i}' for i, k in enumerate(keys)], 'json_extract(doc, ?) AS v'])} "
                 f"FROM events WHERE {' AND '.join(where)}")
        group = [f"k{i}" for i in range(len(keys))]
        sql = f"SELECT {', '.join([*group, sql_agg])} FROM ({inner})"
        if group:
            sql += f" GROUP BY {', '.join(group)}"
        with self._lock:
            rows = self._db.execute(sql, [*[json_path(k) for k in query_key], fp, *params]).fetchall()
        out = []
        for row in rows:
            value = row[-1]
            if value is None:
                continue
            if agg == "percentiles":
                values = sorted(json.loads(value))
                if not values:
                    continue
                assert percentile is not None
                value = percentile_of(values, percentile, method)
            elif agg in ("value_count", "cardinality") and value == 0:
                continue
            labels = {k: label_of(v) for k, v in zip(query_key, row[:-1], strict=True)}
            out.append((labels, float(value)))
        return out

    @staticmethod
    def _where(filters: Iterable[LogFilter], since: float, until: float) -> tuple[list[str], list[Any]]:
        where = ["ts > ?", "ts <= ?"]
        params: list[Any] = [since, until]
        for f in filters:
            sql, p = _filter_sql(f)
            where.append(sql)
            params += p
        return where, params

    def prune(self, before: float) -> int:
        if self.index is not None:
            self.index.prune(before)
        with self._lock:
            return self._db.execute("DELETE FROM events WHERE ts < ?", (before,)).rowcount


def _filter_sql(f: LogFilter) -> tuple[str, list[Any]]:
    """One filter as a SQL condition that is 0 or 1, never NULL: a missing field fails every condition,
    so NOT of it holds, as Elasticsearch's ``must_not`` on a missing field."""
    if f.tree is not None:
        return tree_sql(f.tree, _filter_sql)
    where: list[str] = []
    params: list[Any] = []
    if f.exists is not None:
        where.append("json_type(doc, ?) IS NOT NULL AND json_type(doc, ?) != 'null'")
        params += [json_path(f.exists)] * 2
    for name, value in (f.term or {}).items():
        where.append("json_extract(doc, ?) = ?")
        params += [json_path(name), value]
    for name, values in (f.terms or {}).items():
        where.append(f"json_extract(doc, ?) IN ({', '.join('?' for _ in values)})")
        params += [json_path(name), *values]
    for name, rng in (f.range or {}).items():
        for op, bound in rng.bounds():
            # typed like the bound: numbers never compare with strings (as Elasticsearch's mapping does)
            kind = "IN ('integer', 'real')" if isinstance(bound, int | float) else "= 'text'"
            where.append(f"json_type(doc, ?) {kind} AND json_extract(doc, ?) {RANGE_OPS[op]} ?")
            params += [json_path(name), json_path(name), bound]
    for name, pattern in (f.wildcard or {}).items():
        where.append("json_type(doc, ?) = 'text' AND json_extract(doc, ?) GLOB ?")
        params += [json_path(name), json_path(name), pattern]
    return f"COALESCE(({' AND '.join(where)}), 0)", params
