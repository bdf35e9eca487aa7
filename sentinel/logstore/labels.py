"""Group labels from field values, the same in every store."""

from __future__ import annotations

from typing import Any


def label_of(value: Any) -> str:
    """A group's label from a field's value, as Elasticsearch prints a bucket key: "" when missing, whole
    numbers without a fraction (``2.0`` and ``2`` are one group in SQLite; JSON booleans are 1 and 0)."""
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
