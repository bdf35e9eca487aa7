"""Samples into a Prometheus through its remote-write receiver (``--web.enable-remote-write-receiver``).

Remote write 1.0 is a protobuf ``WriteRequest`` in a snappy block. Both are small enough to write here:
the protobuf by hand (four messages, three field types) and the snappy block as literals only (a valid
block that is not compressed; Prometheus's decoder accepts any valid block). Used by ``sentinel rules
test`` to write input series, stale markers and recording-rule results into its temporary Prometheus.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence

import httpx

from sentinel.alerts.state import Sample
from sentinel.errors import DatasourceError, EvaluationError

# Prometheus's staleness marker: a NaN with this exact bit pattern (model/value.StaleNaN)
STALE_NAN = struct.unpack("<d", struct.pack("<Q", 0x7FF0000000000002))[0]
STALE_BITS = 0x7FF0000000000002

Series = tuple[Mapping[str, str], Sequence[tuple[int, float | None]]]  # labels (with __name__), (ms, value|stale)


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1  # int64 as protobuf writes it (two's complement)
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(number: int, wire: int) -> bytes:
    return _varint(number << 3 | wire)


def _bytes_field(number: int, payload: bytes) -> bytes:
    return _field(number, 2) + _varint(len(payload)) + payload


def _sample(ts_ms: int, value: float | None) -> bytes:
    """``Sample{double value = 1; int64 timestamp = 2}``; None is the staleness marker."""
    raw = struct.pack("<Q", STALE_BITS) if value is None else struct.pack("<d", value)
    return _field(1, 1) + raw + _field(2, 0) + _varint(ts_ms)


def encode(series: Iterable[Series]) -> bytes:
    """A ``WriteRequest`` protobuf: ``repeated TimeSeries timeseries = 1``, each ``repeated Label labels = 1``
    (sorted by name, as the receiver requires) and ``repeated Sample samples = 2`` (in time order)."""
    out = bytearray()
    for labels, samples in series:
        ts = bytearray()
        for name in sorted(labels):
            ts += _bytes_field(1, _bytes_field(1, name.encode()) + _bytes_field(2, labels[name].encode()))
        for t, v in samples:
            ts += _bytes_field(2, _sample(t, v))
        out += _bytes_field(1, bytes(ts))
    return bytes(out)


def snappy_block(data: bytes) -> bytes:
    """A snappy block of literal elements only: the uncompressed length as a varint, then literals of at
    most 65,536 bytes (tag 0xF4 = literal, length - 1 in the next two bytes, little-endian)."""
    out = bytearray(_varint(len(data)))
    for i in range(0, len(data), 65536):
        chunk = data[i:i + 65536]
        n = len(chunk) - 1
        if n < 60:
            out.append(n << 2)
        elif n < 256:
            out += bytes([60 << 2, n])
        else:
            out += bytes([61 << 2]) + struct.pack("<H", n)
        out += chunk
    return bytes(out)


class RemoteWriter:
    def __init__(self, url: str, client: httpx.Client | None = None) -> None:
        self.url = url.rstrip("/") + "/api/v1/write"
        self.client = client or httpx.Client(timeout=30)

    def write(self, series: Iterable[Series]) -> None:
        """Raises DatasourceError when the receiver cannot be reached or refuses the samples (a sample
        outside its out-of-order window, say)."""
        body = snappy_block(encode(series))
        try:
            r = self.client.post(self.url, content=body, headers={
                "Content-Encoding": "snappy", "Content-Type": "application/x-protobuf",
                "X-Prometheus-Remote-Write-Version": "0.1.0"})
        except httpx.HTTPError as exc:
            raise DatasourceError(f"remote write to {self.url} failed: {type(exc).__name__}: {exc}") from exc
        if r.status_code >= 300:
            raise DatasourceError(f"remote write to {self.url} refused: HTTP {r.status_code}: {r.text.strip()[:300]}")


def recorded_series(name: str, labels: Mapping[str, str], samples: Sequence[Sample]
                    ) -> list[tuple[dict[str, str], float]]:
    """A recording rule's output: each sample renamed to ``name`` with the rule's labels on top; two samples
    that end up with one label set are an error, as in Prometheus."""
    out: dict[tuple[tuple[str, str], ...], tuple[dict[str, str], float]] = {}
    for s in samples:
        lbs = {k: v for k, v in s.labels.items() if k != "__name__"}
        lbs.update(labels)
        lbs["__name__"] = name
        key = tuple(sorted(lbs.items()))
        if key in out:
            raise EvaluationError(f"recording rule {name}: vector contains metrics with the same labelset after "
                                  f"applying rule labels: {lbs}")
        out[key] = (lbs, s.value)
    return list(out.values())
