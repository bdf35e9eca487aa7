"""Series selectors and promtool's expanding value notation, as in `promtool test rules` input files."""

from __future__ import annotations

import math
import re

_SERIES = re.compile(r"^\s*(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)?\s*(?:\{(?P<labels>.*)\})?\s*$", re.S)
_LABEL = re.compile(r'\s*(?P<k>[a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"(?P<v>(?:[^"\\]|\\.)*)"\s*(?:,|$)')
STALE = "stale"  # a stale marker (the unit-test runner writes it as a gap)


class SeriesError(ValueError):
    """A series selector or a values string cannot be parsed."""


def parse_series(text: str) -> dict[str, str]:
    """``name{a="b"}`` or ``{__name__="name", a="b"}`` → labels including ``__name__``."""
    m = _SERIES.match(text)
    if m is None or (m["name"] is None and m["labels"] is None):
        raise SeriesError(f"parse error: not a series: {text!r}")
    labels: dict[str, str] = {}
    body = (m["labels"] or "").strip().rstrip(",")
    pos = 0
    while pos < len(body):
        lm = _LABEL.match(body, pos)
        if lm is None or lm.end() == pos:
            raise SeriesError(f"parse error: bad labels in {text!r} at {body[pos:]!r}")
        labels[lm["k"]] = bytes(lm["v"], "utf-8").decode("unicode_escape")
        pos = lm.end()
    if m["name"]:
        labels["__name__"] = m["name"]
    return labels


_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|[-+]?Inf|NaN"
_EXPAND = re.compile(rf"^(?P<a>{_NUM})(?:(?P<op>[-+])(?P<b>{_NUM}))?x(?P<n>\d+)$")


def _num(s: str) -> float:
    return float(s.replace("Inf", "inf"))


def expand_values(text: str) -> list[float | str | None]:
    """promtool's notation: ``a+bxn`` (n+1 values), ``a-bxn``, ``axn``, ``_``, ``_xn``, ``stale``, numbers.

    ``None`` is a missing sample; ``STALE`` a stale marker.
    """
    out: list[float | str | None] = []
    for tok in text.split():
        if tok == "_":
            out.append(None)
        elif tok == "stale":
            out.append(STALE)
        elif m := re.fullmatch(r"_x(\d+)", tok):
            out.extend([None] * int(m[1]))
        elif m := _EXPAND.match(tok):
            a, n = _num(m["a"]), int(m["n"])
            b = _num(m["b"]) * (-1 if m["op"] == "-" else 1) if m["b"] else 0.0
            out.extend(a + i * b for i in range(n + 1))
        else:
            try:
                out.append(_num(tok))
            except ValueError as exc:
                raise SeriesError(f"parse error: bad value {tok!r} in {text!r}") from exc
    return out


def format_value(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(v)
