"""``query_string``: the Lucene query syntax of Elasticsearch's ``query_string`` query, in the subset that
both log stores answer alike. It parses into a tree whose leaves are the other filter kinds, so a rule
means the same on Elasticsearch and on the local store.

Supported (this text is the rule-file reference's, docs/reference/rule-files.md):

- ``field:value`` — the exact value (``term``); an unquoted number matches the number or the same text
  (``batch_size:4`` finds ``4`` and ``"4"``, as Elasticsearch does on a numeric or a keyword field);
- ``field:"quoted value"`` — the exact text; ``*`` and ``?`` inside quotes are literal;
- ``field:val*`` / ``field:v?l`` — a ``wildcard`` (case-sensitive); ``field:*`` — the field exists;
- ``_exists_:field`` — the field exists;
- ``field:[lo TO hi]``, ``{lo TO hi}`` and mixed brackets (inclusive ``[ ]``, exclusive ``{ }``, ``*`` for
  an open end); ``field:>5``, ``>=``, ``<``, ``<=``;
- ``field:(a OR b OR c)`` — one of the values (``terms``);
- ``AND`` / ``&&``, ``OR`` / ``||``, ``NOT`` / ``!`` / a leading ``-``, parentheses; NOT binds tighter
  than AND, AND tighter than OR.

Refused with the column of the problem, rather than guessed at: a term without a field (full-text
search has no equal in the local store: write ``message:*text*``), terms side by side without AND or OR
(Lucene's default operator is a common source of surprise), ``+``, fuzzy ``~``, boosts ``^``, regular
expressions ``/.../``, and field names with wildcards.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

MAX_LENGTH = 10_000
MAX_DEPTH = 32
_FIELD = re.compile(r"[A-Za-z_@][A-Za-z0-9_.@-]*")
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
_SPECIAL = set('()[]{}:"\\')
_UNSUPPORTED = {"~": "fuzzy and proximity (~)", "^": "boosts (^)", "/": "regular expressions (/.../)",
                "+": "'+' (write AND)"}

# A parsed query: ("and", [nodes]), ("or", [nodes]), ("not", node) or ("leaf", {kind: {...}}), the leaf in
# the shape of a filter (``{"term": {"replica": "0"}}``).
Node = tuple[str, Any]


class QueryStringError(ValueError):
    def __init__(self, query: str, pos: int, message: str) -> None:
        self.pos = pos
        super().__init__(f"query_string, column {pos + 1}: {message} (in {query!r})")


@dataclass
class _Parser:
    text: str
    pos: int = 0
    depth: int = 0

    def error(self, message: str, pos: int | None = None) -> QueryStringError:
        return QueryStringError(self.text, self.pos if pos is None else pos, message)

    def skip_ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def at_end(self) -> bool:
        self.skip_ws()
        return self.pos >= len(self.text)

    def peek_op(self) -> str | None:
        """AND, OR or NOT at the current position (as a whole word, or && || !)."""
        self.skip_ws()
        rest = self.text[self.pos:]
        for op, names in (("AND", ("AND", "&&")), ("OR", ("OR", "||")), ("NOT", ("NOT", "!"))):
            for name in names:
                if rest.startswith(name):
                    after = rest[len(name):]
                    if name.isalpha() and after and not (after[0].isspace() or after[0] in "()"):
                        continue  # a word that starts with AND, e.g. ANDROID
                    return op
        return None

    def take_op(self, op: str) -> bool:
        if self.peek_op() != op:
            return False
        rest = self.text[self.pos:]
        self.pos += len(op) if rest.startswith(op) else {"AND": 2, "OR": 2, "NOT": 1}[op]
        return True

    def parse(self) -> Node:
        if not self.text.strip():
            raise self.error("the query is empty")
        if len(self.text) > MAX_LENGTH:
            raise self.error(f"the query is longer than {MAX_LENGTH} characters", 0)
        node = self.or_expr()
        if not self.at_end():
            if self.text[self.pos] == ")":
                raise self.error("')' without a matching '('")
            raise self.error("join terms with AND or OR (terms side by side are ambiguous in Lucene syntax)")
        return node

    def or_expr(self) -> Node:
        parts = [self.and_expr()]
        while self.take_op("OR"):
            parts.append(self.and_expr())
        return parts[0] if len(parts) == 1 else ("or", parts)

    def and_expr(self) -> Node:
        parts = [self.unary()]
        while self.take_op("AND"):
            parts.append(self.unary())
        return parts[0] if len(parts) == 1 else ("and", parts)

    def unary(self) -> Node:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.error(f"nested deeper than {MAX_DEPTH} levels")
        try:
            if self.take_op("NOT"):
                return ("not", self.unary())
            self.skip_ws()
            if self.text.startswith("-", self.pos):
                self.pos += 1
                return ("not", self.unary())
            return self.primary()
        finally:
            self.depth -= 1

    def primary(self) -> Node:
        self.skip_ws()
        if self.pos >= len(self.text):
            raise self.error("a term is missing at the end")
        c = self.text[self.pos]
        if c == "(":
            self.pos += 1
            node = self.or_expr()
            self.skip_ws()
            if not self.text.startswith(")", self.pos):
                raise self.error("'(' is not closed")
            self.pos += 1
            return node
        if c in _UNSUPPORTED:
            raise self.error(f"{_UNSUPPORTED[c]} is not supported")
        if self.peek_op() is not None:
            raise self.error(f"{self.peek_op()} needs a term before and after it")
        start = self.pos
        m = _FIELD.match(self.text, self.pos)
        if m is None or not self.text.startswith(":", m.end()):
            word = re.match(r"[^\s()]*", self.text[self.pos:])
            raise self.error(f"{(word.group(0) if word else c)!r} has no field: write field:value "
                             "(for text inside the message, message:*text*)", start)
        name = m.group(0)
        self.pos = m.end() + 1
        if name == "_exists_":
            self.skip_ws()
            m2 = _FIELD.match(self.text, self.pos)
            if m2 is None:
                raise self.error("_exists_ needs a field name")
            self.pos = m2.end()
            return ("leaf", {"exists": m2.group(0)})
        return self.value(name)

    def value(self, name: str) -> Node:
        if self.pos >= len(self.text) or self.text[self.pos].isspace():
            raise self.error(f"{name}: a value is missing after ':'")
        c = self.text[self.pos]
        if c == '"':
            return ("leaf", {"term": {name: self.quoted()}})
        if c in "[{":
            return self.range(name)
        if c == "(":
            return self.value_list(name)
        if c in "<>":
            op = "gte" if self.text.startswith(c + "=", self.pos) else "gt"
            self.pos += 2 if op == "gte" else 1
            if c == "<":
                op = op.replace("g", "l")
            word, _ = self.word()
            if not word:
                raise self.error(f"{name}: a bound is missing after the comparison")
            return ("leaf", {"range": {name: {op: _scalar(word)}}})
        if c in _UNSUPPORTED:
            raise self.error(f"{_UNSUPPORTED[c]} is not supported")
        word, wild = self.word()
        if word == "*" and wild:
            return ("leaf", {"exists": name})
        if wild:
            return ("leaf", {"wildcard": {name: word}})
        return _term(name, word)

    def word(self) -> tuple[str, bool]:
        """An unquoted value up to whitespace or a parenthesis, backslash escapes resolved; whether it has an
        unescaped * or ? (a wildcard). An escaped * or ? in a wildcard is refused: the stores' patterns
        have no escape."""
        out: list[str] = []
        wild = escaped_wild = False
        start = self.pos
        while self.pos < len(self.text):
            c = self.text[self.pos]
            if c.isspace() or c in "()":
                break
            if c == "\\":
                if self.pos + 1 >= len(self.text):
                    raise self.error("a backslash at the end escapes nothing")
                out.append(self.text[self.pos + 1])
                escaped_wild |= self.text[self.pos + 1] in "*?[]"
                self.pos += 2
                continue
            if c in "~^/":
                raise self.error(f"{_UNSUPPORTED[c]} is not supported; escape {c!r} with a backslash or quote "
                                 "the value")
            if c in _SPECIAL:
                raise self.error(f"{c!r} must be escaped with a backslash or the value quoted")
            if c in "*?":
                wild = True
            out.append(c)
            self.pos += 1
        if wild and escaped_wild:
            raise self.error("a literal * or ? (or [ ]) cannot be part of a wildcard pattern", start)
        return "".join(out), wild

    def quoted(self) -> str:
        start = self.pos
        self.pos += 1
        out: list[str] = []
        while self.pos < len(self.text):
            c = self.text[self.pos]
            if c == "\\" and self.pos + 1 < len(self.text):
                out.append(self.text[self.pos + 1])
                self.pos += 2
                continue
            if c == '"':
                self.pos += 1
                return "".join(out)
            out.append(c)
            self.pos += 1
        raise self.error("the quote is not closed", start)

    def bound(self) -> str:
        self.skip_ws()
        if self.text.startswith('"', self.pos):
            return self.quoted()
        m = re.compile(r"[^\s\]}]+").match(self.text, self.pos)
        if m is None:
            raise self.error("a range bound is missing")
        self.pos = m.end()
        return m.group(0)

    def range(self, name: str) -> Node:
        start = self.pos
        low_incl = self.text[self.pos] == "["
        self.pos += 1
        lo = self.bound()
        self.skip_ws()
        if not self.text.startswith("TO", self.pos):
            raise self.error(f"{name}: a range is written [low TO high]")
        self.pos += 2
        hi = self.bound()
        self.skip_ws()
        if self.pos >= len(self.text) or self.text[self.pos] not in "]}":
            raise self.error(f"{name}: the range is not closed with ] or }}", start)
        high_incl = self.text[self.pos] == "]"
        self.pos += 1
        bounds: dict[str, Any] = {}
        if lo != "*":
            bounds["gte" if low_incl else "gt"] = _scalar(lo)
        if hi != "*":
            bounds["lte" if high_incl else "lt"] = _scalar(hi)
        if not bounds:
            return ("leaf", {"exists": name})
        return ("leaf", {"range": {name: bounds}})

    def value_list(self, name: str) -> Node:
        self.pos += 1
        values: list[Any] = []
        while True:
            self.skip_ws()
            if self.text.startswith('"', self.pos):
                values.append(self.quoted())
            else:
                start = self.pos
                word, wild = self.word()
                if not word:
                    raise self.error(f"{name}: a value is missing in the list")
                if wild:
                    raise self.error(f"{name}: wildcards are not supported inside field:( ... )", start)
                values.extend(_term(name, word)[1]["terms"][name] if _NUMBER.match(word) else [word])
            self.skip_ws()
            if self.text.startswith(")", self.pos):
                self.pos += 1
                return ("leaf", {"terms": {name: values}})
            if not self.take_op("OR"):
                raise self.error(f"{name}: values inside field:( ... ) are joined with OR")


def _scalar(text: str) -> Any:
    if _NUMBER.match(text):
        f = float(text)
        return int(f) if f.is_integer() and re.fullmatch(r"[+-]?\d+", text) else f
    return text


def _term(name: str, word: str) -> Node:
    if _NUMBER.match(word):  # a number matches as a number, and as the same text (a keyword field)
        return ("leaf", {"terms": {name: [_scalar(word), word]}})
    return ("leaf", {"term": {name: word}})


def parse(query: str) -> Node:
    """Parse a query string; raises QueryStringError with the column of the first problem."""
    return _Parser(query).parse()
