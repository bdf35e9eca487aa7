"""Serving benchmark in the style of vLLM's benchmark_serving, on the bundled model (CPU here).

Usage: .venv/bin/python bench/serving.py [--requests 64] [--rates 4,16,inf] [--output-len 32]
Requests arrive as a Poisson process at each rate (inf: all at once) with prompts of 8-64 tokens and
greedy outputs of --output-len/4 to 2x--output-len tokens (EOS ignored only by chance: the bundled
model rarely emits it). The same engine runs in three modes — continuous
batching (32 sequences), static batching (batches of 32 run to completion) and sequential (batch 1) —
and transformers' batched ``generate`` runs the same weights as a peer. Prints TTFT / TPOT / E2E P50
and P99, throughput, goodput (TTFT < 1 s and TPOT < 100 ms), and the ratios the targets name:
throughput at 32 concurrent requests against sequential (target ≥ 6×) and the spread (std) of
end-to-end latency against static batching at equal load (target ≥ 67 % lower).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from prometheus_client import CollectorRegistry

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from inference_core.engine import Delta, Engine, EngineConfig, SamplingParams  # noqa: E402
from inference_core.telemetry import BusyTracker, Metrics  # noqa: E402
from inference_core.tokenizer import TextTokenizer  # noqa: E402
from inference_core.weights import load_model, make_tiny_checkpoint  # noqa: E402

TTFT_SLO, TPOT_SLO = 1.0, 0.1


@dataclass
class Sample:
    ttft: float
    tpot: float
    e2e: float
    tokens: int


def make_engine(model_dir: Path, mode: str, seqs: int) -> Engine:
    reg = CollectorRegistry()
    busy = BusyTracker()
    log = logging.getLogger(f"bench-{mode}-{seqs}")
    log.disabled = True
    cfg = EngineConfig(max_num_seqs=seqs, max_num_batched_tokens=2048, mode=mode)  # type: ignore[arg-type]
    return Engine(load_model(model_dir), TextTokenizer.from_dir(model_dir), Metrics(reg, busy), log, busy, None, cfg)


async def one(engine: Engine, ids: list[int], out_len: int, delay: float) -> Sample:
    await asyncio.sleep(delay)
    t0 = time.perf_counter()
    rid = engine.submit(ids, SamplingParams(max_tokens=out_len, temperature=0.0))
    first = 0.0
    n = 0
    async for item in engine.stream(rid):
        if isinstance(item, Delta):
            if not first:
                first = time.perf_counter()
        else:
            n = len(item.token_ids)
    end = time.perf_counter()
    first = first or end
    return Sample(first - t0, (end - first) / max(n - 1, 1), end - t0, n)


def workload(n: int, rng: random.Random, vocab: int, out_len: int) -> tuple[list[list[int]], list[int]]:
    """Prompts of 8-64 tokens and output lengths spread around ``out_len`` (as real traffic varies)."""
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(8, 64))] for _ in range(n)]
    return prompts, [rng.randint(max(1, out_len // 4), out_len * 2) for _ in range(n)]


def arrivals(n: int, rate: float, rng: random.Random) -> list[float]:
    if math.isinf(rate):
        return [0.0] * n
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def run(engine: Engine, prompts: list[list[int]], delays: list[float], out_lens: list[int]
        ) -> tuple[list[Sample], float]:
    async def main() -> tuple[list[Sample], float]:
        t0 = time.perf_counter()
        res = await asyncio.gather(*(one(engine, p, n, d) for p, d, n in zip(prompts, delays, out_lens, strict=True)))
        return list(res), time.perf_counter() - t0

    return asyncio.run(main())


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q))


def report(name: str, samples: list[Sample], wall: float) -> dict[str, float]:
    toks = sum(s.tokens for s in samples)
    good = sum(1 for s in samples if s.ttft < TTFT_SLO and s.tpot < TPOT_SLO)
    e2e = [s.e2e for s in samples]
    row = {"tput": toks / wall, "goodput": good / wall, "std": statistics.pstdev(e2e)}
    ttft = [s.ttft * 1000 for s in samples]
    tpot = [s.tpot * 1000 for s in samples]
    print(f"  {name:12s} {row['tput']:8.1f} tok/s  goodput {row['goodput']:5.2f} req/s  "
          f"TTFT p50/p99 {pct(ttft, 50):6.0f}/{pct(ttft, 99):6.0f} ms  TPOT p50/p99 {pct(tpot, 50):5.1f}/"
          f"{pct(tpot, 99):5.1f} ms  E2E p50/p99 {pct(e2e, 50):5.2f}/{pct(e2e, 99):5.2f} s  std {row['std']:5.2f} s",
          flush=True)
    return row


def transformers_peer(model_dir: Path, prompts: list[list[int]], out_lens: list[int], batch: int) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    t0 = time.perf_counter()
    toks = 0
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        out_len = max(out_lens[i:i + batch])  # a batch runs until its longest request is done
        width = max(len(p) for p in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for b, p in enumerate(chunk):  # left padding, as batched generation needs
            ids[b, width - len(p):] = torch.tensor(p)
            mask[b, width - len(p):] = 1
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=out_len, do_sample=False,
                                 pad_token_id=0)
        toks += sum(out_lens[i:i + batch])  # useful tokens only; the rest of each row is waste
    return toks / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--rates", default="16,64,inf")
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model_dir = make_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="bench-model-")) / "tiny", seed=0)
    vocab = TextTokenizer.from_dir(model_dir).vocab_size
    rng = random.Random(args.seed)
    prompts, out_lens = workload(args.requests, rng, vocab, args.output_len)
    engines = {"continuous": make_engine(model_dir, "continuous", 32), "static": make_engine(model_dir, "static", 32),
               "sequential": make_engine(model_dir, "continuous", 1)}
    run(engines["continuous"], prompts[:4], [0.0] * 4, [4] * 4)  # warm-up
    rows: dict[tuple[str, float], dict[str, float]] = {}
    for rate_s in args.rates.split(","):
        rate = float(rate_s)
        delays = arrivals(args.requests, rate, random.Random(args.seed + 1))
        print(f"rate {rate_s} req/s, {args.requests} requests, output up to {args.output_len} tokens:", flush=True)
        for name, eng in engines.items():
            samples, wall = run(eng, prompts, delays, out_lens)
            rows[(name, rate)] = report(name, samples, wall)
    for eng in engines.values():
        eng.shutdown()
    peer = transformers_peer(model_dir, prompts, out_lens, 32)
    print(f"  {'transformers generate (batch 32, all at once)':s}: {peer:8.1f} tok/s")
    inf = float("inf")
    if ("continuous", inf) in rows:
        print(f"throughput at 32 concurrent, continuous / sequential: "
              f"{rows[('continuous', inf)]['tput'] / rows[('sequential', inf)]['tput']:.1f}x (target >= 6x); "
              f"continuous / transformers generate: {rows[('continuous', inf)]['tput'] / peer:.2f}x")
    mid = sorted(r for r in (float(x) for x in args.rates.split(",")) if not math.isinf(r))
    for rate in mid:
        c, s = rows[("continuous", rate)]["std"], rows[("static", rate)]["std"]
        print(f"latency std at {rate:g} req/s: continuous {c:.2f}s vs static {s:.2f}s: "
              f"{100 * (1 - c / s):.0f}% lower (target >= 67%)")


if __name__ == "__main__":
    main()
