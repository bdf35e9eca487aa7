"""Tails JSON log files into a log store: checkpointed by inode and offset, rotation-aware, redacted.

A file rotated away between two runs is found again by its inode and read to its end before the new
file, so no line is lost or read twice across rotations and restarts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from inference_core.redaction import redact

log = logging.getLogger(__name__)
MAX_BATCH_BYTES = 4 * 2**20



def event_id(source: str, inode: int, offset: int, line: bytes) -> str:
    """The same line at the same place always gets the same id (ECS ``event.id``): a store that is sent
    a batch twice — after a crash between the write and the checkpoint — keeps one copy."""
    h = hashlib.sha256(f"{source}\0{inode}\0{offset}\0".encode())
    h.update(line)
    return h.hexdigest()[:32]


def parse_timestamp(raw: Any, default: float) -> float:
    if isinstance(raw, int | float):
        return float(raw)
    if isinstance(raw, str):
        try:
            return datetime.fromisoformat(raw.replace("Z", "+00:00")).timestamp()
        except ValueError:
            pass
    return default


class Sink(Protocol):
    def add(self, events: Sequence[tuple[float, Mapping[str, Any]]],
            checkpoint: tuple[str, Mapping[str, Any]] | None = None) -> None: ...

    def checkpoint(self, source: str) -> dict[str, Any] | None: ...


@dataclass(frozen=True)
class LogSource:
    """A log file to tail; ``fields`` are added to every event (e.g. ``replica``)."""

    name: str
    path: Path
    fields: Mapping[str, str] = field(default_factory=dict)


class Shipper:
    def __init__(self, sink: Sink, sources: list[LogSource], clock: Callable[[], float] = time.time) -> None:
        self.sink = sink
        self.sources = sources
        self.clock = clock
        self.bad_lines = 0
        self.shipped = 0
        self.synced_at = 0.0  # every line written before this time has been handed to the store
        self.backlog: dict[str, int] = {}  # per source: bytes written but not yet handed to the store
        self._runs: deque[tuple[float, float]] = deque(maxlen=16)  # (start, end) of complete runs

    def run_once(self) -> int:
        """Ship every source to its end; an error (the store down) propagates and ``synced_at`` stays."""
        start = self.clock()
        n = 0
        for src in list(self.sources):
            n += self._ship(src)
        ping = getattr(self.sink, "ping", None)
        if n == 0 and ping is not None:  # nothing to ship: still find out whether the store is there
            ping()
        self.synced_at = start
        self._runs.append((start, self.clock()))
        return n

    def visible_until(self, settle_s: float = 0.0) -> float:
        """Every line written before the returned time can be found in the store: it was handed over by a
        run that ended at least ``settle_s`` ago (the store's refresh interval, 1 s for Elasticsearch)."""
        now = self.clock()
        return max((start for start, end in self._runs if end + settle_s <= now), default=0.0)

    def _ship(self, src: LogSource) -> int:
        cp = self.sink.checkpoint(src.name) or {}
        try:
            st = os.stat(src.path)
        except FileNotFoundError:
            return 0
        n = 0
        if cp.get("inode") not in (None, st.st_ino):
            rotated = self._find_inode(src.path.parent, int(cp["inode"]))
            if rotated is not None:
                n += self._read(src, rotated, int(cp.get("offset", 0)))
            cp = {"inode": st.st_ino, "offset": 0}
            self.sink.add([], (src.name, cp))
        offset = int(cp.get("offset", 0))
        if offset > st.st_size:  # truncated in place
            offset = 0
        self.backlog[src.name] = st.st_size - offset  # stays if the store fails during this run
        return n + self._read(src, src.path, offset)

    @staticmethod
    def _find_inode(folder: Path, inode: int) -> Path | None:
        for p in folder.iterdir():
            try:
                if p.stat().st_ino == inode:
                    return p
            except OSError:
                continue
        return None

    def _read(self, src: LogSource, path: Path, offset: int) -> int:
        """Ship complete lines of ``path`` from ``offset``; checkpoint after each batch."""
        total = 0
        with path.open("rb") as fh:
            fh.seek(offset)
            while True:
                chunk = fh.read(MAX_BATCH_BYTES)
                if not chunk:
                    break
                end = chunk.rfind(b"\n")
                if end < 0:
                    break
                inode = os.fstat(fh.fileno()).st_ino
                events = []
                pos = offset
                for line in chunk[: end + 1].split(b"\n")[:-1]:
                    event = self._parse(line, src, event_id(src.name, inode, pos, line))
                    pos += len(line) + 1
                    if event:
                        events.append(event)
                offset += end + 1
                self.sink.add(events, (src.name, {"inode": inode, "offset": offset}))
                total += len(events)
                fh.seek(offset)
            if path == src.path:
                self.backlog[src.name] = max(0, os.fstat(fh.fileno()).st_size - offset)
        self.shipped += total
        return total

    def _parse(self, line: bytes, src: LogSource, eid: str) -> tuple[float, dict[str, Any]] | None:
        if not line.strip():
            return None
        try:
            doc = json.loads(line)
            if not isinstance(doc, dict):
                raise ValueError("not a JSON object")
        except ValueError:
            self.bad_lines += 1
            log.warning("%s: skipped a line that is not a JSON object", src.path)
            return None
        doc = redact(doc)
        doc.update(src.fields)
        doc["event.id"] = eid
        return parse_timestamp(doc.get("@timestamp"), self.clock()), doc
