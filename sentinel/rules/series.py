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
        raise SeriesError(f"cannot parse series {text!r}")
    labels: dict[str, str] = {}
    body = (m["labels"] or "").strip().rstrip(",")
    pos = 0
    while pos < len(body):
        lm = _LABEL.match(body, pos)
        if lm is None or lm.end() == pos:
            raise SeriesError(f"cannot parse labels in {text!r} at {body[pos:]!r}")
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
                raise SeriesError(f"cannot parse value {tok!r} in {text!r}") from exc
    return out


def format_value(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(v)


def go_float(v: float) -> str:
    """How Go's ``%v`` prints a float64 (what ``{{ $value }}`` renders): strconv's 'g' with the
    shortest digits, in e-notation when the decimal exponent is below -4 or at least 6 (1e+06)."""
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if v == 0:
        return "-0" if math.copysign(1, v) < 0 else "0"
    r = repr(v)
    mant, _, e = r.partition("e")
    sign = "-" if mant.startswith("-") else ""
    mant = mant.lstrip("-")
    whole, _, frac = mant.partition(".")
    digits = (whole + frac).lstrip("0")
    lead_zeros = len(whole + frac) - len((whole + frac).lstrip("0"))
    exp = len(whole) - 1 - lead_zeros + (int(e) if e else 0)
    digits = digits.rstrip("0") or "0"
    if exp < -4 or exp >= 6:
        head = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
        return f"{sign}{head}e{'-' if exp < 0 else '+'}{abs(exp):02d}"
    if exp < 0:
        return f"{sign}0.{'0' * (-exp - 1)}{digits}"
    if len(digits) <= exp + 1:
        return f"{sign}{digits}{'0' * (exp + 1 - len(digits))}"
    return f"{sign}{digits[:exp + 1]}.{digits[exp + 1:]}"
