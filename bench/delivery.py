"""A burst of alerts into sentinel's inbound Alertmanager webhook, out to two receivers, one of them slow;
the same alerts, at the same pace, into a real Alertmanager (the peer) with the same routing tree and
receivers of the same speed.

sentinel runs as users run it (`sentinel up`, with its replica and Prometheus); the burst arrives as
Alertmanager webhook bodies (version 4) on POST /api/v1/alertmanager/webhook, the relay routes every alert
to the fast receiver one group per alert (group_by: ['...']) and to the slow receiver (1 s per request)
grouped by alertname. Then the same alerts are sent resolved. Printed: accepted alerts/s, delivered
alerts/s to the fast receiver, how long the slow one took, sentinel's peak RSS, notifications lost (an
alert, firing or resolved, that never reached a receiver: must be 0) and duplicated beyond the
idempotency key (the same alert and status in two requests with different keys: must be 0), and the
ratio of delivered/s to Alertmanager's.

Usage: .venv/bin/python bench/delivery.py [--alerts 4000] [--seconds 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import yaml  # noqa: E402

from sentinel.alerts.fingerprint import fingerprint  # noqa: E402
from sentinel.amserver import AlertmanagerServer  # noqa: E402
from sentinel.netutil import free_port  # noqa: E402
from sentinel.supervisor import ChildRegistry  # noqa: E402

TOKEN = "bench-delivery-token-0123456789"
SLOW_S = 1.0
ROUTE: dict[str, Any] = {
    "receiver": "fast", "group_by": ["..."], "group_wait": "1s", "group_interval": "2s", "repeat_interval": "4h",
    "routes": [{"receiver": "slow", "group_by": ["alertname"], "continue": True}, {"receiver": "fast"}],
}


class Sink:
    """Records what each receiver got: (time, idempotency key, [(fingerprint, status)], group key) per
    request."""

    def __init__(self) -> None:
        self.got: dict[str, list[tuple[float, str, list[tuple[str, str]], str]]] = {}
        self.lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                name = self.path.strip("/")  # the system and the receiver: s/fast, am/slow
                if name.endswith("slow"):
                    time.sleep(SLOW_S)
                alerts = [(a.get("fingerprint") or fingerprint(a["labels"]), a["status"]) for a in body["alerts"]
                          if a["labels"].get("alertname", "").startswith("Burst")]
                with sink.lock:
                    sink.got.setdefault(name, []).append((time.time(), self.headers.get("Idempotency-Key", ""), alerts,
                                                          body.get("groupKey", "")))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def seen(self, name: str, status: str) -> set[str]:
        with self.lock:
            return {fp for _, _, alerts, _ in self.got.get(name, []) for fp, st in alerts if st == status}

    def last(self, name: str) -> float:
        with self.lock:
            return max((t for t, _, a, _ in self.got.get(name, []) if a), default=0.0)

    def duplicates(self, name: str) -> int:
        """Notifications that said again exactly what an earlier one of the same group said (the same alerts
        in the same states) under another idempotency key. (A group's notification carries all its alerts,
        so an alert in two notifications of a group that changed in between is not a duplicate.)"""
        with self.lock:
            keys: dict[tuple[str, tuple[tuple[str, str], ...]], set[str]] = {}
            for _, key, alerts, group in self.got.get(name, []):
                if alerts:
                    keys.setdefault((group, tuple(sorted(alerts))), set()).add(key)
        return sum(len(k) - 1 for k in keys.values())


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def alerts(n: int, t0: float, status: str, ends: float) -> list[dict[str, Any]]:
    return [{"status": status, "labels": {"alertname": f"Burst{i % 10}", "replica": f"r{i}", "severity": "warning"},
             "annotations": {"summary": f"burst alert {i}"}, "startsAt": rfc3339(t0),
             "endsAt": rfc3339(ends) if status == "resolved" else "0001-01-01T00:00:00Z"} for i in range(n)]


def burst(send: Any, items: list[dict[str, Any]], seconds: float, per_request: int = 100) -> float:
    """Send ``items`` in requests of ``per_request`` spread over ``seconds``; returns the accept rate."""
    chunks = [items[i:i + per_request] for i in range(0, len(items), per_request)]
    gap = seconds / max(1, len(chunks))
    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        futures = []
        for i, chunk in enumerate(chunks):
            delay = t0 + i * gap - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            futures.append(pool.submit(send, chunk))
        for f in futures:
            f.result()
    return len(items) / (time.perf_counter() - t0)


def wait_all(sink: Sink, name: str, status: str, want: set[str], timeout: float) -> float | None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if want <= sink.seen(name, status):
            return sink.last(name)
        time.sleep(0.2)
    return None


def run_sentinel(work: Path, sink: Sink) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    cfg = {
        "state_dir": str(work / "state"),
        "api": {"token": TOKEN, "rate_limit": 0},  # one Alertmanager sends the whole burst: no per-client limit
        "alerting": {"receivers": [{"name": "fast", "url": f"{sink.url}/s/fast"},
                                   {"name": "slow", "url": f"{sink.url}/s/slow"}], "route": ROUTE},
    }
    (work / "sentinel.yaml").write_text(yaml.safe_dump(cfg))
    out = (work / "sentinel.out").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "sentinel.cli", "up", "-c", str(work / "sentinel.yaml")],
                            stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    up = work / "state" / "up.json"
    deadline = time.time() + 240
    while not up.exists():
        if proc.poll() is not None or time.time() > deadline:
            raise SystemExit(f"sentinel did not start: see {work / 'sentinel.out'}")
        time.sleep(0.5)
    return proc, json.loads(up.read_text())


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(name: str, send: Any, sink: Sink, prefix: str, n: int, seconds: float) -> dict[str, float]:
    t0 = time.time()
    firing = alerts(n, t0, "firing", 0)
    want = {fingerprint(a["labels"]) for a in firing}
    accepted = burst(send, firing, seconds)
    done = wait_all(sink, f"{prefix}fast", "firing", want, 300)
    slow_done = wait_all(sink, f"{prefix}slow", "firing", want, 300)
    t1 = time.time()
    accepted_r = burst(send, alerts(n, t0, "resolved", t1), seconds)
    done_r = wait_all(sink, f"{prefix}fast", "resolved", want, 300)
    lost = sum(len(want - sink.seen(f"{prefix}{r}", s)) for r in ("fast", "slow") for s in ("firing",)) + \
        len(want - sink.seen(f"{prefix}fast", "resolved"))
    out = {"accepted/s": min(accepted, accepted_r),
           "delivered/s": n / (done - t0) if done else 0.0,
           "resolved delivered/s": n / (done_r - t1) if done_r else 0.0,
           "slow receiver s": (slow_done - t0) if slow_done else float("inf"),
           "lost": lost, "duplicated": sink.duplicates(f"{prefix}fast") + sink.duplicates(f"{prefix}slow")}
    print(f"{name}: " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in out.items()),
          flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--alerts", type=int, default=4000)
    ap.add_argument("--seconds", type=float, default=2.0, help="the burst is spread over this long")
    args = ap.parse_args()
    sink = Sink()
    with tempfile.TemporaryDirectory(prefix="bench-delivery-") as tmp:
        work = Path(tmp)
        proc, up = run_sentinel(work, sink)
        try:
            client = httpx.Client(timeout=60, headers={"Authorization": f"Bearer {TOKEN}"})
            hook = f"{up['api']}/api/v1/alertmanager/webhook"

            def send_sentinel(chunk: list[dict[str, Any]]) -> None:
                r = client.post(hook, json={"version": "4", "status": chunk[0]["status"], "receiver": "bench",
                                            "groupKey": "{}:{}", "alerts": chunk})
                r.raise_for_status()

            ours = measure("sentinel", send_sentinel, sink, "s/", args.alerts, args.seconds)
            rss = peak_rss_mib(up["pid"])
            print(f"sentinel peak RSS: {rss:.0f} MiB", flush=True)
        finally:
            proc.terminate()
            proc.wait(60)
        am = AlertmanagerServer(work / "am", free_port(), {
            "route": ROUTE,
            "receivers": [{"name": r, "webhook_configs": [{"url": f"{sink.url}/am/{r}", "send_resolved": True}]}
                          for r in ("fast", "slow")],
        }, ChildRegistry(work / "children.json"))
        am.start()
        try:
            am_client = httpx.Client(timeout=60)

            def send_am(chunk: list[dict[str, Any]]) -> None:
                body = [{"labels": a["labels"], "annotations": a["annotations"], "startsAt": a["startsAt"],
                         **({"endsAt": a["endsAt"]} if a["status"] == "resolved" else {})} for a in chunk]
                am_client.post(f"{am.url}/api/v2/alerts", json=body).raise_for_status()

            theirs = measure("alertmanager", send_am, sink, "am/", args.alerts, args.seconds)
        finally:
            am.stop()
    ratio = ours["delivered/s"] / theirs["delivered/s"] if theirs["delivered/s"] else float("nan")
    print(f"delivered/s sentinel/alertmanager: {ratio:.2f}x; lost {ours['lost']}, duplicated {ours['duplicated']} "
          "(both must be 0)")
    return 0 if ours["lost"] == 0 and ours["duplicated"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
