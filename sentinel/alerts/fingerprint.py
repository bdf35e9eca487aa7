"""Alertmanager's label-set fingerprint: FNV-1a 64 over sorted names and values, each followed by 0xFF."""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache

_OFFSET = 0xCBF29CE484222325
_PRIME = 0x100000001B3
_MASK = 0xFFFFFFFFFFFFFFFF
_SEP = 0xFF


@lru_cache(maxsize=1 << 16)
def _fnv(items: tuple[tuple[str, str], ...]) -> int:
    h = _OFFSET
    for name, value in items:
        for part in (name, value):
            for byte in part.encode():
                h = ((h ^ byte) * _PRIME) & _MASK
            h = ((h ^ _SEP) * _PRIME) & _MASK
    return h


def fingerprint_int(labels: Mapping[str, str]) -> int:
    """The same label sets come back every evaluation: the hash is kept for the last 65,536 of them."""
    return _fnv(tuple(sorted(labels.items())))


def fingerprint(labels: Mapping[str, str]) -> str:
    """The fingerprint as Alertmanager prints it (``%016x``)."""
    return f"{fingerprint_int(labels):016x}"
