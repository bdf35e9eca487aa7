"""What both SQL paths of the local store (SQLite's JSON rows, the DuckDB column index) share: a
query_string's tree as SQL, and group labels from field values (the same in every store)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sentinel.rules.filters import FilterNode, LogFilter

Sql = tuple[str, list[Any]]


def tree_sql(node: FilterNode, leaf: Callable[[LogFilter], Sql]) -> Sql:
    """A parsed query_string (``("and" | "or", [nodes])``, ``("not", node)``, ``("leaf", filter)``) as one
    condition, each leaf by ``leaf`` (which never yields NULL, so NOT of it is exact)."""
    kind, arg = node
    if kind == "leaf":
        return leaf(arg)
    if kind == "not":
        sql, params = tree_sql(arg, leaf)
        return f"(NOT {sql})", params
    parts = [tree_sql(n, leaf) for n in arg]
    joiner = " AND " if kind == "and" else " OR "
    return "(" + joiner.join(sql for sql, _ in parts) + ")", [p for _, ps in parts for p in ps]


def label_of(value: Any) -> str:
    """A group's label from a field's value, as Elasticsearch prints a bucket key: "" when missing, whole
    numbers without a fraction (``2.0`` and ``2`` are one group in SQLite; JSON booleans are 1 and 0)."""
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
