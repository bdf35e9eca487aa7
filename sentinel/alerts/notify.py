"""Notifications: Alertmanager webhook v4 payloads, delivered from the outbox at least once.

Delivery follows Alertmanager's webhook notifier: 2xx is done; 5xx, 429 and network errors are
retried with exponential backoff; any other 4xx is final. Each delivery carries an
``Idempotency-Key`` header that stays the same across retries.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from sentinel.alerts.notification import Notification
from sentinel.state.outbox import Outbox, OutboxItem

log = logging.getLogger(__name__)
# what a receiver is sent for a queued notification: its body rendered with the configuration of the moment
Renderer = Callable[[str, Notification], Any]
Queued = tuple[OutboxItem, Notification, float]  # a queued row, its notification, when it may be tried


def sign(key_id: str, key: bytes, body: bytes, now: float) -> dict[str, str]:
    """Headers that let a receiver check a request came from sentinel, unaltered and recent:
    ``X-Sentinel-Timestamp`` (Unix seconds) and ``X-Sentinel-Signature: keyid=<id>,sha256=<hex>``, the
    HMAC-SHA256 of ``<timestamp>.<body>`` (the verifier is in docs/operators-guide.md)."""
    ts = str(int(now))
    mac = hmac.new(key, ts.encode() + b"." + body, hashlib.sha256).hexdigest()
    return {"X-Sentinel-Timestamp": ts, "X-Sentinel-Signature": f"keyid={key_id},sha256={mac}"}


class Dispatcher:
    """Drains the outbox: one queue per receiver, the receivers concurrently; within a receiver, each group's
    notifications in order and up to ``lanes_per_receiver`` groups at once (Alertmanager, too, notifies
    each group on its own).

    A slow or dead receiver delays only its own queue. Within a group the head goes first (a firing never
    overtakes into second place behind its own resolution), and before sending, an alert that a later
    notification of the same receiver and group carries again is dropped from the earlier one: after an
    outage only the newest state of each alert is delivered, as Alertmanager does. A queued row names its
    receiver; the URL is the receiver's at send time (``urls``), so a changed URL applies to what is queued.
    2xx is done; 5xx, 429 and network errors are retried with exponential backoff (the queue waits); any
    other 4xx is final.
    """

    def __init__(self, store: Outbox, client: httpx.Client, clock: Callable[[], float] = time.time,
                 max_backoff_s: float = 300.0, give_up_after_s: float = 3600.0,
                 on_result: Callable[[str, str], None] | None = None, max_receivers: int = 16,
                 signing: Mapping[str, tuple[str, bytes]] | None = None, urls: Mapping[str, str] | None = None,
                 lanes_per_receiver: int = 8, render: Renderer | None = None) -> None:
        self.store = store
        self.render: Renderer = render or (lambda receiver, n: n.render(receiver))
        self.urls = dict(urls or {})
        self.signing = dict(signing or {})  # receiver name -> (key id, key): from the settings, never stored
        self.client = client
        self.clock = clock
        self.max_backoff_s = max_backoff_s
        self.give_up_after_s = give_up_after_s
        self.on_result = on_result or (lambda receiver, outcome: None)
        self._pool = ThreadPoolExecutor(max_workers=max_receivers, thread_name_prefix="notify")
        self._lanes: dict[str, ThreadPoolExecutor] = {}  # per receiver: its groups delivered concurrently
        self.lanes_per_receiver = lanes_per_receiver
        self._busy: set[str] = set()
        self._lock = threading.Lock()

    def run_once(self, wait: bool = True) -> int:
        """Start a delivery round for every receiver with pending notifications that is not already in
        one; with ``wait``, wait for this round and return how many were delivered (the daemon does not
        wait: a slow receiver must not hold up the next round of the others)."""
        futures = []
        for receiver in self.store.pending_receivers():
            with self._lock:
                if receiver in self._busy:
                    continue
                self._busy.add(receiver)
            futures.append(self._pool.submit(self._drain, receiver))
        return sum(f.result() for f in futures) if wait else 0

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for pool in self._lanes.values():
            pool.shutdown(wait=False, cancel_futures=True)

    def _drain(self, receiver: str) -> int:
        """Deliver ``receiver``'s queue, a page at a time, until it is empty or a group's head must wait.
        The groups (lanes) of a page go concurrently, each in order."""
        try:
            sent = 0
            while True:
                queue = self.store.queue(receiver, limit=500)
                if not queue:
                    return sent
                lanes: dict[str, list[Queued]] = {}  # each row read into its typed notification once
                for item, next_at in queue:
                    note = Notification.from_json(item.payload)
                    lanes.setdefault(note.group_key, []).append((item, note, next_at))
                if len(lanes) == 1:
                    results = [self._drain_lane(receiver, next(iter(lanes.values())))]
                else:
                    with self._lock:
                        pool = self._lanes.get(receiver)
                        if pool is None:
                            pool = self._lanes[receiver] = ThreadPoolExecutor(
                                max_workers=self.lanes_per_receiver, thread_name_prefix=f"notify-{receiver}"[:15])
                    results = list(pool.map(lambda lane: self._drain_lane(receiver, lane), lanes.values()))
                sent += sum(n for n, _ in results)
                if any(blocked for _, blocked in results):
                    return sent  # what waits is tried again next round
        except Exception:  # a bug here must not stop delivery for good: logged, retried next round
            log.exception("delivery to %s failed", receiver)
            return 0
        finally:
            with self._lock:
                self._busy.discard(receiver)

    def _drain_lane(self, receiver: str, queue: list[Queued]) -> tuple[int, bool]:
        """One group's notifications, in order: (sent, whether the head must wait)."""
        last: dict[tuple[str, str], int] = {}
        for item, queued, _ in queue:
            for k in queued.keys():
                last[k] = item.id
        sent = 0
        for item, queued, next_at in queue:
            drop = {k for k in queued.keys() if last[k] != item.id}
            note = queued.without(drop) if drop else queued
            if drop:
                self.store.supersede(item.id, None if note is None else note.to_json())
            if note is None:
                self.on_result(receiver, "superseded")
                continue
            if next_at > self.clock():
                return sent, True  # the head is backing off: the rest of its group waits, in order
            outcome = self._deliver(item, note)
            if outcome == "retry":
                return sent, True
            sent += outcome == "sent"
        return sent, False

    def _deliver(self, item: OutboxItem, note: Notification) -> str:
        """One POST of ``note`` rendered for its receiver: "sent", "retry" (5xx, 429, network; the queue waits)
        or "failed" (any other 4xx)."""
        body = json.dumps(self.render(item.receiver, note), separators=(",", ":")).encode()
        headers = {"Idempotency-Key": item.key, "Content-Type": "application/json"}
        if item.receiver in self.signing:
            key_id, key = self.signing[item.receiver]
            headers.update(sign(key_id, key, body, self.clock()))
        url = self.urls.get(item.receiver) or item.url
        if not url:
            log.error("notification to %s dropped: no such receiver is configured any more", item.receiver)
            self.store.mark_failed(item.id, "receiver not configured", self.clock())
            self.on_result(item.receiver, "failed")
            return "failed"
        try:
            resp = self.client.post(url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            self._retry(item, f"{type(exc).__name__}: {exc}")
            return "retry"
        if resp.is_success:
            self.store.mark_sent(item.id, self.clock())
            self.on_result(item.receiver, "sent")
            return "sent"
        error = f"HTTP {resp.status_code}: {resp.text[:200]}"
        if resp.status_code >= 500 or resp.status_code == 429:
            self._retry(item, error)
            return "retry"
        log.error("notification to %s refused, not retrying: %s", item.receiver, error)
        self.store.mark_failed(item.id, error, self.clock())
        self.on_result(item.receiver, "failed")
        return "failed"

    def _retry(self, item: OutboxItem, error: str) -> None:
        now = self.clock()
        if now - item.created_at > self.give_up_after_s:
            log.error("notification to %s expired undelivered after %d attempts (SentinelNotificationUndeliverable "
                      "tells the other receivers): %s", item.receiver, item.attempts + 1, error)
            self.store.mark_failed(item.id, error, now, "expired")
            self.on_result(item.receiver, "expired")
            return
        delay = min(self.max_backoff_s, 2.0 ** min(item.attempts, 16))
        log.warning("notification to %s failed (attempt %d), retrying in %.0fs: %s", item.receiver,
                    item.attempts + 1, delay, error)
        self.store.mark_retry(item.id, now + delay, error)
        self.on_result(item.receiver, "retry")
