"""Drills with figures: `sentinel up` with two replicas behind the router, steady load from the official
`openai` client through the router (each client from its own loopback address, so the replicas' per-client
rate limits see distinct clients), then each drill of `sentinel chaos` on one replica.

Per drill it prints: time to detect (fault armed → the alert firing in sentinel), time to recover (→ the
replica serving again as a new process), the remediation's audited outcome, client requests sent and failed
from the fault until 2 s after recovery (target: 0 failed), and P99 client latency during that window
against the P99 of the 15 s before the first drill (the peer measured in the same run).

    .venv/bin/python bench/drills.py [--clients 3] [--json]

Needs Debian's Prometheus (scripts/setup.sh installs it). Takes about two minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sentinel.chaos import DRILLS, run_drill  # noqa: E402

ADMIN = "drill-admin-token-0123456789abcdef"
PLAN = [("cuda-error", "replica-0"), ("hang", "replica-1"), ("crash", "replica-0")]


def _rules(dst: Path) -> None:
    """The shipped rules with the CudaError window shortened so an episode ends within the run."""
    dst.mkdir()
    for p in (ROOT / "rules").glob("*.yaml"):
        doc = yaml.safe_load(p.read_text())
        for g in doc["groups"]:
            for r in g["rules"]:
                if r.get("alert") == "CudaError":
                    r["log"]["timeframe"] = "6s"
                    g["interval"] = "1s"
        (dst / p.name).write_text(yaml.safe_dump(doc, sort_keys=False))


def _p99(xs: list[float]) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(0.99 * (len(s) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if shutil.which("prometheus") is None:
        print("needs prometheus (apt-get install prometheus; scripts/setup.sh installs it)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="sentinel-drills-"))
    _rules(work / "rules")
    cfg = {"state_dir": str(work / "state"), "rules_dir": str(work / "rules"),
           "prometheus": {"scrape_interval": "1s"},
           "replicas": {"count": 2, "enable_faults": True, "admin_token": ADMIN,
                        "engine_args": ["--stall-timeout", "2"], "liveness_interval": "1s", "liveness_failures": 2},
           "remediation": {"cooldown": "0s", "verify_timeout": "60s"},
           "alerting": {"receivers": []}}
    (work / "sentinel.yaml").write_text(yaml.safe_dump(cfg))
    log = (work / "sentinel.out").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "sentinel.cli", "up", "-c", str(work / "sentinel.yaml")],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    up_file = work / "state" / "up.json"
    try:
        deadline = time.monotonic() + 240
        while not up_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                print((work / "sentinel.out").read_text()[-3000:], file=sys.stderr)
                return 1
            time.sleep(0.5)
        up = json.loads(up_file.read_text())
        api, router = up["api"], up["router"]
        samples: list[tuple[float, float, bool]] = []  # (start, latency, ok)
        errors: list[str] = []
        lock = threading.Lock()
        stop = threading.Event()

        def client_loop(i: int) -> None:
            # each client from its own address: the replicas' per-client rate limit (the seed's 10 requests/s)
            # applies per client, as it would to real clients behind the router
            http = httpx.Client(transport=httpx.HTTPTransport(local_address=f"127.0.0.{i + 2}"), timeout=60)
            c = openai.OpenAI(base_url=router, api_key="unused", max_retries=0, timeout=60, http_client=http)
            while not stop.is_set():
                t = time.monotonic()
                try:
                    c.completions.create(model="deepseek-tiny", prompt="The cluster is", max_tokens=16, temperature=0)
                    ok = True
                except openai.APIError as exc:
                    ok = False
                    with lock:
                        errors.append(f"{type(exc).__name__}: {str(exc)[:160]}")
                with lock:
                    samples.append((t, time.monotonic() - t, ok))

        workers = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(args.clients)]
        for w in workers:
            w.start()
        time.sleep(15)
        base_start, base_end = time.monotonic() - 15, time.monotonic()
        with lock:
            baseline = [lat for t, lat, ok in samples if base_start <= t < base_end and ok]
        base_p99 = _p99(baseline)
        rows: list[dict[str, Any]] = []
        for name, replica in PLAN:
            t0 = time.monotonic()
            res = run_drill(api, DRILLS[name], ADMIN, replica, timeout_s=120)
            end = t0 + (res.recover_s or 120) + 2
            while time.monotonic() < end:
                time.sleep(0.1)
            with lock:
                window = [(t, lat, ok) for t, lat, ok in samples if t0 <= t < end]
            p99 = _p99([lat for _, lat, ok in window if ok])
            rows.append({**res.as_dict(), "requests": len(window), "failed": sum(not ok for _, _, ok in window),
                         "p99_s": p99, "baseline_p99_s": base_p99,
                         "p99_ratio": (p99 / base_p99) if p99 and base_p99 else None})
            time.sleep(3)
        stop.set()
        for w in workers:
            w.join(60)
        metrics = httpx.get(f"{api}/metrics").text
        retries = sum(float(ln.rsplit(" ", 1)[1]) for ln in metrics.splitlines()
                      if ln.startswith("sentinel_router_retries_total{"))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()
    if args.json:
        print(json.dumps({"clients": args.clients, "router_retries": retries, "drills": rows, "errors": errors},
                         indent=2))
    else:
        print(f"{args.clients} clients through the router, two replicas; baseline P99 {base_p99:.3f}s "
              f"({len(baseline)} requests in 15 s)")
        print(f"{'drill':11} {'replica':9} {'detect':>7} {'recover':>8} {'outcome':10} {'requests':>8} {'failed':>6} "
              f"{'p99':>7} {'p99/base':>8}")
        for r in rows:
            def f(v: float | None, fmt: str = "{:.2f}s") -> str:
                return fmt.format(v) if v is not None else "-"
            print(f"{r['drill']:11} {r['replica']:9} {f(r['detect_s']):>7} {f(r['recover_s']):>8} "
                  f"{str(r['outcome']):10} {r['requests']:>8} {r['failed']:>6} {f(r['p99_s'], '{:.3f}s'):>7} "
                  f"{f(r['p99_ratio'], '{:.1f}x'):>8}")
        print(f"router retries over the run: {retries:.0f}")
        for e in sorted(set(errors)):
            print(f"  failed: {errors.count(e)} x {e}")
    failed = any(r["failed"] or r["recover_s"] is None for r in rows)
    if os.environ.get("DRILLS_KEEP"):
        print(f"work dir: {work}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
