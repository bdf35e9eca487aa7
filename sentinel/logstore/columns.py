"""The local store's column index: the same events in DuckDB, by column, for log rules' counts and
aggregations.

The local store (``local.py``) keeps events as JSON in SQLite: the durable copy, written exactly once with
the shipper's offsets, readable by any process (the CLI's ``logs query``, ``diagnose``) while sentinel
runs. Scanning a window of JSON rows is what made a rule cost hundreds of milliseconds at a million lines.
This index, kept beside it by the process that ships (DuckDB allows one writing process per file), holds
the same rows by column: the fields Elasticsearch's index template maps (``MAPPINGS``) each as a type code,
a string and a number, the rest read from the JSON. It is fed after each committed batch and caught up
from SQLite by id on open, so it can always be rebuilt from the store, and it answers exactly as the
SQLite queries do (same types, same missing-field semantics; ``tests/unit/test_column_index.py``).

Field names reach SQL only as bound JSON paths or as the names of the fixed columns; values only as
bound parameters.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import duckdb

from sentinel.logstore.elasticsearch import MAPPINGS
from sentinel.logstore.sql import label_of, tree_sql
from sentinel.rules.filters import LogFilter

# type codes: what SQLite's json_type says of a value, in the classes the queries need
MISSING, TEXT, INTEGER, REAL, BOOLEAN, OTHER = 0, 1, 2, 3, 4, 5
OPS = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<="}
SCHEMA_VERSION = 1


def _mapped(props: Mapping[str, Any], prefix: str = "") -> list[str]:
    out = []
    for name, spec in props.items():
        if "properties" in spec:
            out += _mapped(spec["properties"], f"{prefix}{name}.")
        elif name != "@timestamp":
            out.append(prefix + name)
    return out


FIELDS: tuple[str, ...] = tuple(_mapped(MAPPINGS["properties"]))
COLUMN = {name: f"f{i}" for i, name in enumerate(FIELDS)}  # fixed column names, never the field's own


def split(value: Any) -> tuple[int, str | None, float | None]:
    """(type code, text, number) of one JSON value, as SQLite's json_type / json_extract see it."""
    if value is None:
        return MISSING, None, None
    if isinstance(value, bool):
        return BOOLEAN, None, 1.0 if value else 0.0
    if isinstance(value, int):
        return INTEGER, None, float(value)
    if isinstance(value, float):
        return (REAL, None, value) if math.isfinite(value) else (OTHER, json.dumps(value), None)
    if isinstance(value, str):
        return TEXT, value, None
    return OTHER, json.dumps(value, separators=(",", ":"), ensure_ascii=False), None


def _path(field: str) -> str:
    return '$."' + field.replace('"', '') + '"'


class _Field:
    """SQL for one field's type code (``t``), text (``s``) and number (``n``): its columns, or expressions
    over the JSON. Every ``?`` in them is the field's JSON path (``params``)."""

    def __init__(self, name: str) -> None:
        col = COLUMN.get(name)
        self.path = _path(name)
        if col is not None:
            self.t, self.s, self.n = f"{col}_t", f"{col}_s", f"{col}_n"
            return
        jt = "json_type(doc, ?)"
        self.t = (f"(CASE {jt} WHEN 'VARCHAR' THEN {TEXT} WHEN 'UBIGINT' THEN {INTEGER} WHEN 'BIGINT' THEN {INTEGER} "
                  f"WHEN 'DOUBLE' THEN {REAL} WHEN 'BOOLEAN' THEN {BOOLEAN} WHEN 'OBJECT' THEN {OTHER} "
                  f"WHEN 'ARRAY' THEN {OTHER} ELSE {MISSING} END)")
        self.s = (f"(CASE {jt} WHEN 'VARCHAR' THEN json_extract_string(doc, ?) WHEN 'OBJECT' THEN "
                  f"json_extract(doc, ?)::VARCHAR WHEN 'ARRAY' THEN json_extract(doc, ?)::VARCHAR END)")
        self.n = (f"(CASE WHEN {jt} IN ('UBIGINT', 'BIGINT', 'DOUBLE') THEN json_extract(doc, ?)::DOUBLE "
                  f"WHEN {jt} = 'BOOLEAN' THEN json_extract(doc, ?)::BOOLEAN::DOUBLE END)")

    def params(self, sql: str) -> list[Any]:
        return [self.path] * sql.count("?")

    def key(self) -> str:
        """Two group-by columns, as SQLite groups json_extract's values: text (and objects, as JSON text) by
        text, numbers and booleans by value; missing or null in neither."""
        return (f"(CASE WHEN {self.t} IN ({TEXT}, {OTHER}) THEN {self.s} END), "
                f"(CASE WHEN {self.t} IN ({INTEGER}, {REAL}, {BOOLEAN}) THEN {self.n} END)")

    def number(self) -> str:
        """The value where it is a number (integer or real), else NULL."""
        return f"(CASE WHEN {self.t} IN ({INTEGER}, {REAL}) THEN {self.n} END)"


def _split_sql() -> str:
    """``INSERT``: each mapped field's type code, text and number from the list of values that one
    ``json_extract(doc, [paths])`` gives (as ``split`` does in Python)."""
    cols = []
    for i in range(len(FIELDS)):
        v = f"j[{i + 1}]"
        jt = f"json_type({v})"
        cols.append(f"CASE {jt} WHEN 'VARCHAR' THEN {TEXT} WHEN 'UBIGINT' THEN {INTEGER} WHEN 'BIGINT' THEN {INTEGER} "
                    f"WHEN 'DOUBLE' THEN {REAL} WHEN 'BOOLEAN' THEN {BOOLEAN} WHEN 'OBJECT' THEN {OTHER} "
                    f"WHEN 'ARRAY' THEN {OTHER} ELSE {MISSING} END")
        cols.append(f"CASE {jt} WHEN 'VARCHAR' THEN json_extract_string({v}, '$') WHEN 'OBJECT' THEN {v}::VARCHAR "
                    f"WHEN 'ARRAY' THEN {v}::VARCHAR END")
        cols.append(f"CASE WHEN {jt} IN ('UBIGINT', 'BIGINT', 'DOUBLE') THEN {v}::DOUBLE "
                    f"WHEN {jt} = 'BOOLEAN' THEN {v}::BOOLEAN::DOUBLE END")
    names = ", ".join(f"{c}_{k}" for c in COLUMN.values() for k in "tsn")
    return (f"INSERT INTO events (id, ts, doc, {names}) SELECT id, ts, doc, {', '.join(cols)} FROM "
            f"(SELECT id, ts, doc, json_extract(doc, $4) AS j FROM "
            f"(SELECT unnest($1) AS id, unnest($2) AS ts, unnest($3) AS doc))")


_INSERT_SQL = _split_sql()


class ColumnIndex:
    def __init__(self, path: Path, threads: int = 2, memory_limit: str = "128MB") -> None:
        """Opens (or creates) the index; raises ``duckdb.IOException`` when another process holds it."""
        self.path = path
        self._db = duckdb.connect(str(path), config={"threads": threads, "memory_limit": memory_limit})
        cols = ", ".join(f"{c}_t UTINYINT, {c}_s VARCHAR, {c}_n DOUBLE" for c in COLUMN.values())
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR)")
        row = self._db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        if row is not None and row[0] != f"{SCHEMA_VERSION}:{','.join(FIELDS)}":
            self._db.execute("DROP TABLE IF EXISTS events")  # another layout: rebuilt from the store
        self._db.execute(f"CREATE TABLE IF NOT EXISTS events (id BIGINT, ts DOUBLE, doc VARCHAR, {cols})")
        self._db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", [f"{SCHEMA_VERSION}:{','.join(FIELDS)}"])
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def max_id(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT max(id) FROM events").fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def add(self, rows: Sequence[tuple[int, float, Mapping[str, Any] | str]]) -> None:
        """Rows (id, ts, doc as a mapping or its JSON text), ids above ``max_id``; one transaction. The
        columns are split out of the JSON by DuckDB (one parse a row, all mapped paths at once); a batch it
        cannot parse (NaN, which Python's JSON writes) is split here instead, the same way."""
        if not rows:
            return
        ids = [r[0] for r in rows]
        tss = [r[1] for r in rows]
        texts = [r[2] if isinstance(r[2], str) else json.dumps(r[2]) for r in rows]
        with self._lock:
            self._db.execute("BEGIN TRANSACTION")
            try:
                try:
                    self._db.execute(_INSERT_SQL, [ids, tss, texts, [_path(f) for f in FIELDS]])
                except duckdb.InvalidInputException:
                    self._db.execute("ROLLBACK")
                    self._db.execute("BEGIN TRANSACTION")
                    self._insert_split(ids, tss, texts)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _insert_split(self, ids: list[int], tss: list[float], texts: list[str]) -> None:
        parts: list[tuple[list[int], list[str | None], list[float | None]]] = [([], [], []) for _ in FIELDS]
        for text in texts:
            obj = json.loads(text)
            for (t, s, n), name in zip(parts, FIELDS, strict=True):
                code, sv, nv = split(obj.get(name))
                t.append(code)
                s.append(sv)
                n.append(nv)
        names = ["id", "ts", "doc", *[f"{c}_{k}" for c in COLUMN.values() for k in "tsn"]]
        columns: list[list[Any]] = [ids, tss, texts, *[list(p) for part in parts for p in part]]
        select = ", ".join(f"unnest(${i + 1})" for i in range(len(names)))
        self._db.execute(f"INSERT INTO events ({', '.join(names)}) SELECT {select}", columns)

    def prune(self, before: float) -> int:
        with self._lock:
            row = self._db.execute("DELETE FROM events WHERE ts < ?", [before]).fetchone()
        return int(row[0]) if row else 0

    def count(self, filters: Iterable[LogFilter], since: float, until: float,
              query_key: Sequence[str] = ()) -> list[tuple[dict[str, str], int]]:
        """As ``LocalLogStore.count``."""
        rows = self._grouped(filters, since, until, query_key, "COUNT(*)", [])
        return [(labels, int(v)) for labels, v in rows if v]

    def aggregate(self, filters: Iterable[LogFilter], since: float, until: float, query_key: Sequence[str],
                  field: str, agg: str, percentile: float | None = None, method: str = "tdigest"
                  ) -> list[tuple[dict[str, str], float]]:
        """As ``LocalLogStore.aggregate``: t-digest percentiles are ``quantile_cont`` (the same linear
        interpolation between ranks); HDR's rank is taken from the sorted values."""
        f = _Field(field)
        v = f.number()
        if agg == "cardinality":  # distinct as SQLite compares: text by text, numbers (and booleans) by value
            expr = (f"COUNT(DISTINCT CASE WHEN {f.t} IN ({TEXT}, {OTHER}) THEN 's' || {f.s} WHEN {f.t} IN "
                    f"({INTEGER}, {REAL}, {BOOLEAN}) THEN 'n' || CAST({f.n} AS VARCHAR) END)")
            params = f.params(expr)
        elif agg == "percentiles":
            assert percentile is not None
            if method == "hdr":  # HdrHistogram's rank: p * n rounded, at least 1
                head, tail = f"list_sort(list({v}))[greatest(1, floor(? * ", f"COUNT({v}) + 0.5))::BIGINT]"
                expr, params = head + tail, [*f.params(head[:-len("floor(? * ")]), percentile / 100, *f.params(tail)]
            else:  # t-digest below 2,000 values: linear between the ranks around p * (n - 1)
                expr, params = f"quantile_cont({v}, ?)", [*f.params(v), percentile / 100]
        else:
            expr = {"min": "MIN", "max": "MAX", "avg": "AVG", "sum": "SUM", "value_count": "COUNT"}[agg] + f"({v})"
            params = f.params(expr)
        rows = self._grouped(filters, since, until, query_key, expr, params)
        out = []
        for labels, value in rows:
            if value is None or (agg in ("value_count", "cardinality") and value == 0):
                continue
            out.append((labels, float(value)))
        return out

    def _grouped(self, filters: Iterable[LogFilter], since: float, until: float, query_key: Sequence[str],
                 expr: str, expr_params: list[Any]) -> list[tuple[dict[str, str], Any]]:
        where, params = ["ts > ?", "ts <= ?"], [since, until]
        for flt in filters:
            sql, p = _filter_sql(flt)
            where.append(sql)
            params += p
        keys = [_Field(k) for k in query_key]
        select = [k.key() for k in keys]
        sql = f"SELECT {', '.join([*select, expr])} FROM events WHERE {' AND '.join(where)}"
        all_params = [*[p for k, text in zip(keys, select, strict=True) for p in k.params(text)], *expr_params,
                      *params]
        if keys:
            sql += f" GROUP BY {', '.join(str(i + 1) for i in range(2 * len(keys)))}"  # ordinals: no parameters
        with self._lock:
            rows = self._db.execute(sql, all_params).fetchall()
        return [({k: row[2 * i] if row[2 * i] is not None else label_of(row[2 * i + 1])
                  for i, k in enumerate(query_key)}, row[-1]) for row in rows]


def _filter_sql(f: LogFilter) -> tuple[str, list[Any]]:
    """One filter as a condition that is true or false, never NULL (a missing field fails every
    condition, so NOT of it holds), clause for clause as ``local._filter_sql``."""
    if f.tree is not None:
        return tree_sql(f.tree, _filter_sql)
    where: list[str] = []
    params: list[Any] = []
    if f.exists is not None:
        fd = _Field(f.exists)
        where.append(f"{fd.t} > 0")
        params += fd.params(fd.t)
    for name, value in (f.term or {}).items():
        sql, p = _equals(_Field(name), value)
        where.append(sql)
        params += p
    for name, values in (f.terms or {}).items():
        parts = [_equals(_Field(name), v) for v in values]
        where.append("(" + " OR ".join(sql for sql, _ in parts) + ")" if parts else "false")
        params += [x for _, ps in parts for x in ps]
    for name, rng in (f.range or {}).items():
        fd = _Field(name)
        for op, bound in rng.bounds():
            if isinstance(bound, int | float):  # numbers never compare with strings, as in the SQLite path
                head = f"({fd.t} IN ({INTEGER}, {REAL}) AND {fd.n} {OPS[op]} "
                bound = float(bound)
            else:
                head = f"({fd.t} = {TEXT} AND {fd.s} {OPS[op]} "
            where.append(head + "?)")
            params += [*fd.params(head), bound]
    for name, pattern in (f.wildcard or {}).items():
        fd = _Field(name)
        head = f"({fd.t} = {TEXT} AND {fd.s} GLOB "
        where.append(head + "?)")
        params += [*fd.params(head), pattern]
    return f"COALESCE(({' AND '.join(where) or 'true'}), false)", params


def _equals(fd: _Field, value: Any) -> tuple[str, list[Any]]:
    """``json_extract(doc, path) = value`` as SQLite means it: text equals text; a number (or a boolean,
    bound as 1 or 0) equals an integer, real or boolean of that value."""
    if isinstance(value, str):
        head = f"({fd.t} = {TEXT} AND {fd.s} = "
        return head + "?)", [*fd.params(head), value]
    head = f"({fd.t} IN ({INTEGER}, {REAL}, {BOOLEAN}) AND {fd.n} = "
    return head + "?)", [*fd.params(head), float(value)]
