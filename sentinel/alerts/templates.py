"""Prometheus annotation templates: ``{{ $labels.x }}``, ``{{ $value | humanize }}`` and friends.

Covers the actions users copy into annotations: variables (``$labels``, ``$value``,
``$externalLabels``, ``.Labels``/``.Value``), string and number literals, pipelines and prefix calls of
``humanize``, ``humanize1024``, ``humanizeDuration``, ``humanizePercentage``, ``printf``, ``toUpper``,
``toLower``, ``title``. A template that fails renders as Prometheus does:
``<error expanding template: ...>``, never an exception.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

ACTION = re.compile(r"{{-?\s*(.*?)\s*-?}}", re.S)


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


class TemplateError(ValueError):
    """A template action cannot be parsed or evaluated."""


def humanize(v: float) -> str:
    if v == 0 or math.isnan(v) or math.isinf(v):
        return f"{v:.4g}"
    prefixes = ["", "k", "M", "G", "T", "P", "E", "Z", "Y"]
    small = ["", "m", "u", "n", "p", "f", "a", "z", "y"]
    if abs(v) >= 1:
        i = 0
        while abs(v) >= 1000 and i < len(prefixes) - 1:
            v /= 1000
            i += 1
        return f"{v:.4g}{prefixes[i]}"
    i = 0
    while abs(v) < 1 and i < len(small) - 1:
        v *= 1000
        i += 1
    return f"{v:.4g}{small[i]}"


def humanize1024(v: float) -> str:
    if abs(v) <= 1:
        return f"{v:.4g}"
    prefixes = ["", "ki", "Mi", "Gi", "Ti", "Pi", "Ei", "Zi", "Yi"]
    i = 0
    while abs(v) >= 1024 and i < len(prefixes) - 1:
        v /= 1024
        i += 1
    return f"{v:.4g}{prefixes[i]}"


def humanize_duration(v: float) -> str:
    if math.isnan(v) or math.isinf(v):
        return f"{v:.4g}"
    if v == 0:
        return "0s"
    if abs(v) >= 1:
        sign = "-" if v < 0 else ""
        v = abs(v)
        days, rem = divmod(int(v), 86400)
        hours, rem = divmod(rem, 3600)
        minutes, _ = divmod(rem, 60)
        seconds = v % 60
        if days:
            return f"{sign}{days}d {hours}h {minutes}m {int(seconds)}s"
        if hours:
            return f"{sign}{hours}h {minutes}m {int(seconds)}s"
        if minutes:
            return f"{sign}{minutes}m {int(seconds)}s"
        return f"{sign}{seconds:.4g}s"
    for unit, scale in (("ms", 1e3), ("us", 1e6), ("ns", 1e9), ("ps", 1e12), ("fs", 1e15), ("as", 1e18)):
        if abs(v) * scale >= 1:
            return f"{v * scale:.4g}{unit}"
    return f"{v * 1e18:.4g}as"


def humanize_percentage(v: float) -> str:
    return f"{v * 100:.4g}%"


def _printf(fmt: object, *args: object) -> str:
    if not isinstance(fmt, str):
        raise TemplateError("printf: format must be a string")
    py = re.sub(r"%v", "%s", fmt)
    try:
        return py % args
    except (TypeError, ValueError) as exc:
        raise TemplateError(f"printf: {exc}") from exc


def _num(v: object) -> float:
    try:
        return float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise TemplateError(f"cannot convert {v!r} to a number") from exc


FUNCS: dict[str, Callable[..., str]] = {
    "humanize": lambda v: humanize(_num(v)),
    "humanize1024": lambda v: humanize1024(_num(v)),
    "humanizeDuration": lambda v: humanize_duration(_num(v)),
    "humanizePercentage": lambda v: humanize_percentage(_num(v)),
    "printf": _printf,
    "toUpper": lambda s: str(s).upper(),
    "toLower": lambda s: str(s).lower(),
    "title": lambda s: str(s).title(),
}


class GoMap(dict[str, str]):
    """A label map as Go's text/template prints one: ``map[a:1 b:2]``, keys sorted."""

    def __str__(self) -> str:
        return "map[" + " ".join(f"{k}:{v}" for k, v in sorted(self.items())) + "]"


@dataclass(frozen=True)
class Context:
    labels: Mapping[str, str]
    value: float
    external_labels: Mapping[str, str]

    def operand(self, tok: str) -> object:
        if tok in ("$labels", ".Labels"):
            return GoMap(self.labels)
        if tok in ("$externalLabels", ".ExternalLabels"):
            return GoMap(self.external_labels)
        if tok.startswith(("$labels.", ".Labels.")):
            return self.labels.get(tok.split(".", 2)[-1] if tok.startswith(".") else tok[8:], "")
        if tok.startswith("$externalLabels."):
            return self.external_labels.get(tok[16:], "")
        if tok in ("$value", ".Value"):
            return self.value
        if re.fullmatch(r"-?\d+(\.\d+)?([eE][-+]?\d+)?", tok):
            return float(tok) if any(c in tok for c in ".eE") else int(tok)
        raise TemplateError(f'undefined variable or function "{tok}"')


TOKEN = re.compile(r'\s*(?:"((?:[^"\\]|\\.)*)"|`([^`]*)`|(\S+))')


def _tokens(cmd: str) -> list[tuple[bool, str]]:
    """Split a command into (is_string_literal, text) tokens."""
    out: list[tuple[bool, str]] = []
    pos = 0
    cmd = cmd.rstrip()
    while pos < len(cmd):
        m = TOKEN.match(cmd, pos)
        if m is None or m.end() == pos:
            raise TemplateError(f"unterminated quoted string in {cmd!r}")
        if m.group(1) is not None:
            out.append((True, bytes(m.group(1), "utf-8").decode("unicode_escape")))
        elif m.group(2) is not None:
            out.append((True, m.group(2)))
        else:
            if m.group(3).startswith(('"', "`")):
                raise TemplateError(f"unterminated quoted string in {cmd!r}")
            out.append((False, m.group(3)))
        pos = m.end()
    return out


def _call(tokens: list[tuple[bool, str]], ctx: Context, piped: list[object]) -> object:
    (head_is_str, head), rest = tokens[0], tokens[1:]
    if not head_is_str and head in FUNCS:
        args = [text if is_str else ctx.operand(text) for is_str, text in rest]
        return FUNCS[head](*args, *piped)
    if rest or piped:
        raise TemplateError(f"can't give argument to non-function {head}")
    return head if head_is_str else ctx.operand(head)


def _split_pipeline(action: str) -> list[str]:
    parts, cur, quote = [], "", ""
    for ch in action:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"`":
            quote = ch
        elif ch == "|":
            parts.append(cur)
            cur = ""
            continue
        cur += ch
    return [*parts, cur]


def _evaluate(action: str, ctx: Context) -> str:
    if not action or action.startswith("/*"):
        return ""
    result: list[object] = []
    for i, cmd in enumerate(_split_pipeline(action)):
        tokens = _tokens(cmd)
        if not tokens:
            raise TemplateError("missing command in pipeline")
        result = [_call(tokens, ctx, result if i else [])]
    out = result[0]
    if isinstance(out, float):
        return go_float(out)
    return str(out)


def expand(template: str, labels: Mapping[str, str], value: float,
           external_labels: Mapping[str, str] | None = None) -> str:
    """Expand one annotation or label template; errors come back as visible text."""
    ctx = Context(labels, value, external_labels or {})
    try:
        if template.count("{{") != template.count("}}"):
            raise TemplateError("unclosed action")
        return ACTION.sub(lambda m: _evaluate(m.group(1), ctx), template)
    except (TemplateError, TypeError) as exc:
        return f"<error expanding template: {exc}>"


def check(template: str) -> str | None:
    """A parse-time check of a template: the error text, or None when it expands."""
    out = expand(template, {}, 0.0)
    return out if out.startswith("<error expanding template:") else None
