"""Personal data out of log text: one module for the inference server's own log lines (with
``--log-text``) and for sentinel's log shipping (sentinel imports it; deploy/filebeat.yml carries the same
patterns)."""

from __future__ import annotations

import re
from typing import Any

# The seed's GDPR rule (dates → XXXX-XX-XX), then e-mail addresses, national ID numbers (the PRC's
# 18-character resident ID, US SSNs), phone numbers (international "+CC ..." or 11-digit mobile) and
# payment card numbers (13-19 digits, spaces or dashes allowed); every string field but @timestamp.
# RE2 syntax only (no look-around): deploy/filebeat.yml carries the same patterns to Filebeat's
# `replace` processor (Go regexp), generated from this list.
REDACTIONS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\d{4}-\d{2}-\d{2}"), "XXXX-XX-XX"),
    (re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}"), "<email>"),
    (re.compile(r"\b\d{17}[\dXx]\b"), "<national-id>"),
    (re.compile(r"\b\d{3}-\d{2}-\d{4}\b"), "<national-id>"),
    (re.compile(r"\+\d{1,3}(?:[ -]?\(?\d{1,4}\)?){2,4}\b"), "<phone>"),
    (re.compile(r"\b1[3-9]\d{9}\b"), "<phone>"),
    (re.compile(r"\b(?:\d[ -]?){12,18}\d\b"), "<card>"),
)
KEEP_UNREDACTED = frozenset({"@timestamp"})


# Every pattern needs a digit or an "@": strings without either (most fields) skip them all.
_MAYBE_PERSONAL = re.compile(r"[\d@]")


def redact_text(v: str) -> str:
    if _MAYBE_PERSONAL.search(v):
        for pattern, repl in REDACTIONS:
            v = pattern.sub(repl, v)
    return v


def redact(doc: dict[str, Any]) -> dict[str, Any]:
    """Every string field but ``@timestamp``, redacted."""
    return {k: redact_text(v) if isinstance(v, str) and k not in KEEP_UNREDACTED else v for k, v in doc.items()}
