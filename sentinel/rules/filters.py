"""Log filters: one condition on a log event in Elasticsearch's query language (the subset both log stores
answer alike), a Lucene ``query_string`` parsed into a tree of them, and the filters back as one Lucene
query (what Grafana's Elasticsearch datasource takes)."""

from __future__ import annotations

import re
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, PrivateAttr, field_validator, model_validator

from sentinel.rules import querystring

FIELD_NAME = re.compile(r"^[A-Za-z_@][A-Za-z0-9_.@-]*$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Scalar = str | int | float | bool


class Range(Strict):
    """Bounds on a field (numbers compare as numbers, strings as strings, as in Elasticsearch)."""

    gt: float | str | None = None
    gte: float | str | None = None
    lt: float | str | None = None
    lte: float | str | None = None

    @model_validator(mode="after")
    def _some(self) -> Range:
        if all(getattr(self, k) is None for k in ("gt", "gte", "lt", "lte")):
            raise ValueError("a range needs at least one of: gt, gte, lt, lte")
        return self

    def bounds(self) -> list[tuple[str, float | str]]:
        return [(k, v) for k in ("gt", "gte", "lt", "lte") if (v := getattr(self, k)) is not None]


class LogFilter(Strict):
    """One condition on a log event, in Elasticsearch's query language (the subset both stores answer
    alike): the field ``exists`` (non-null), equals a ``term``, is one of ``terms``, is within a
    ``range``, matches a ``wildcard`` (``*`` any characters, ``?`` one character; case-sensitive), or a
    Lucene ``query_string`` (``cuda_error:* AND NOT replica:0``; see ``sentinel/rules/querystring.py``),
    which parses into a tree of the others. Several fields in one filter must all match."""

    exists: str | None = None
    term: dict[str, Scalar] | None = None
    terms: dict[str, list[Scalar]] | None = None
    range: dict[str, Range] | None = None
    wildcard: dict[str, str] | None = None
    query_string: str | None = None

    KINDS: ClassVar[tuple[str, ...]] = ("exists", "term", "terms", "range", "wildcard", "query_string")
    _tree: FilterNode | None = PrivateAttr(None)

    @field_validator("query_string", mode="before")
    @classmethod
    def _query_form(cls, v: Any) -> Any:
        if isinstance(v, dict):  # ElastAlert's form: query_string: {query: "..."}
            if set(v) != {"query"}:
                raise ValueError("query_string takes a string, or {query: <string>}")
            return v["query"]
        return v

    @model_validator(mode="after")
    def _one(self) -> LogFilter:
        given = [k for k in self.KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"a filter needs exactly one of: {', '.join(self.KINDS)}")
        kind = given[0]
        if kind == "query_string":
            assert self.query_string is not None
            self._tree = _build(querystring.parse(self.query_string))
            return self
        fields = [self.exists] if kind == "exists" else list(getattr(self, kind).keys())
        if kind != "exists" and not fields:
            raise ValueError(f"{kind}: name a field")
        for f in fields:
            if not f or not FIELD_NAME.match(f):
                raise ValueError(f"invalid field name {f!r}")
        for values in (self.terms or {}).values():
            if not values:
                raise ValueError("terms: give at least one value")
        for pattern in (self.wildcard or {}).values():
            if any(c in pattern for c in "[]\\"):
                raise ValueError(f"wildcard {pattern!r}: only * and ? are special; [, ] and \\ are not allowed")
        return self

    @property
    def tree(self) -> FilterNode | None:
        """A ``query_string`` as a tree of the other kinds; None for the other kinds."""
        return self._tree


# A parsed query_string: ("and" | "or", [nodes]), ("not", node) or ("leaf", LogFilter).
FilterNode = tuple[str, Any]


def _build(node: querystring.Node) -> FilterNode:
    kind, arg = node
    if kind == "leaf":
        return ("leaf", LogFilter.model_validate(arg))
    if kind == "not":
        return ("not", _build(arg))
    return (kind, [_build(n) for n in arg])


_LUCENE_SPECIAL = re.compile(r'([+\-=&|><!(){}\[\]^"~*?:\\/ ])')


def _lucene_value(v: Scalar) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _lucene_field(name: str) -> str:
    return _LUCENE_SPECIAL.sub(r"\\\1", name)


def lucene(filters: list[LogFilter]) -> str:
    """The filters as one Lucene query string (Elasticsearch's ``query_string``, what Grafana's
    Elasticsearch datasource takes): the same events as the query DSL sentinel sends (tested on a real
    Elasticsearch). All filters must match; an empty list matches everything (``*``)."""
    parts: list[str] = []
    for f in filters:
        if f.query_string is not None:
            parts.append(f"({f.query_string})")
        elif f.exists is not None:
            parts.append(f"_exists_:{_lucene_field(f.exists)}")
        elif f.term is not None:
            parts.extend(f"{_lucene_field(k)}:{_lucene_value(v)}" for k, v in f.term.items())
        elif f.terms is not None:
            parts.extend(f"{_lucene_field(k)}:({' OR '.join(_lucene_value(x) for x in vs)})"
                         for k, vs in f.terms.items())
        elif f.range is not None:
            for k, r in f.range.items():
                lo = r.gte if r.gte is not None else r.gt
                hi = r.lte if r.lte is not None else r.lt
                left = "[" if r.gte is not None or lo is None else "{"
                right = "]" if r.lte is not None or hi is None else "}"
                lo_s = "*" if lo is None else _lucene_value(lo)
                hi_s = "*" if hi is None else _lucene_value(hi)
                parts.append(f"{_lucene_field(k)}:{left}{lo_s} TO {hi_s}{right}")
        elif f.wildcard is not None:
            for k, pattern in f.wildcard.items():
                escaped = "".join(c if c in "*?" else _LUCENE_SPECIAL.sub(r"\\\1", c) for c in pattern)
                parts.append(f"{_lucene_field(k)}:{escaped}")
    if not parts:
        return "*"
    return " AND ".join(parts) if len(parts) > 1 else parts[0]
