"""Alertmanager's label-set fingerprint: FNV-1a 64 over sorted names and values, each followed by 0xFF."""

from __future__ import annotations

from collections.abc import Mapping

_OFFSET = 0xCBF29CE484222325
_PRIME = 0x100000001B3
_MASK = 0xFFFFFFFFFFFFFFFF
_SEP = 0xFF


def fingerprint_int(labels: Mapping[str, str]) -> int:
    h = _OFFSET
    for name in sorted(labels):
        for part in (name, labels[name]):
            for byte in part.encode():
                h = ((h ^ byte) * _PRIME) & _MASK
            h = ((h ^ _SEP) * _PRIME) & _MASK
    return h


def fingerprint(labels: Mapping[str, str]) -> str:
    """The fingerprint as Alertmanager prints it (``%016x``)."""
    return f"{fingerprint_int(labels):016x}"
