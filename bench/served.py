"""The served path for benchmarks: ``python -m inference_core.server`` with default flags, over HTTP.

``Served`` starts the server on a free port, times how long it takes to answer /ready, and reads the
process's peak RSS (VmHWM) and the memory plan it printed. ``stream_completion`` sends one streamed
completion of token ids and returns the arrival time of every token.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sentinel.netutil import free_port  # noqa: E402


class Served:
    def __init__(self, model_dir: Path, *flags: str, timeout_s: float = 300.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.name = model_dir.name
        self.err = tempfile.TemporaryFile("w+")
        t0 = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "inference_core.server", "--model-dir", str(model_dir),
                                      "--port", str(self.port), "--log-dir", tempfile.mkdtemp(), *flags],
                                     stderr=self.err, cwd=ROOT)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}: {self.stderr()}")
            try:
                r = httpx.get(f"{self.url}/ready", timeout=2)
                if r.status_code == 200:
                    break
                if r.json().get("load_error"):
                    self.close()
                    raise RuntimeError(f"server failed to load: {r.json()['load_error']}")
            except httpx.HTTPError:
                pass
            if time.monotonic() - t0 > timeout_s:
                raise RuntimeError(f"server not ready after {timeout_s} s: {self.stderr()}")
            time.sleep(0.2)
        self.ready_s = time.monotonic() - t0
        # the server is ready before its weights have moved into huge pages (they move while it serves, ~2 s
        # at the 0.5B shape): throughput is measured from when they have, and the wait is printed
        while httpx.get(f"{self.url}/health", timeout=5).json().get("layout") == "moving":
            if time.monotonic() - t0 > timeout_s:
                raise RuntimeError(f"weights still moving into huge pages after {timeout_s} s")
            time.sleep(0.1)
        self.layout_s = time.monotonic() - t0

    def stderr(self) -> str:
        self.err.seek(0)
        return self.err.read()

    def plan(self) -> str:
        return "\n".join(line for line in self.stderr().splitlines() if line.startswith(("memory plan", "  ")))

    def peak_rss(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return 0

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def stream_completion(url: str, model: str, prompt: list[int], max_tokens: int,
                      client: httpx.Client | None = None) -> list[float]:
    """Greedy, EOS ignored (exactly ``max_tokens`` tokens); one timestamp per streamed token."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    times: list[float] = []
    c = client or httpx.Client(timeout=600)
    with c.stream("POST", f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {") and '"text":""' not in line.replace(" ", ""):
                times.append(time.perf_counter())
    return times


@contextlib.contextmanager
def local_elasticsearch(heap: str = "1g") -> Iterator[str]:
    """A fresh single-node Elasticsearch (scripts/elasticsearch.sh) on a free port; yields its URL and
    stops it (and removes its data) after."""
    port = free_port()
    run_dir = Path(tempfile.mkdtemp(prefix="sentinel-es-bench-"))
    os.chmod(run_dir, 0o755)  # the node runs as an unprivileged user when we are root
    env = {**os.environ, "ES_PORT": str(port), "ES_HOME_DIR": str(run_dir), "ES_HEAP": heap}
    script = str(ROOT / "scripts" / "elasticsearch.sh")
    subprocess.run(["bash", script, "start"], env=env, check=True)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        subprocess.run(["bash", script, "stop"], env=env, check=False)
        shutil.rmtree(run_dir, ignore_errors=True)
