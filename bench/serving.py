"""Serving benchmark on the served path, in the style of vLLM's benchmark_serving: the server
(``python -m inference_core.server``, default flags) on the 0.5B-shaped bf16 checkpoint (or, with
``--shape 1.5b``, DeepSeek-R1-Distill-Qwen-1.5B's geometry), driven over HTTP, against transformers'
batched ``generate`` on the same weights, all measured in one run.

Usage: .venv/bin/python bench/serving.py [--requests 32] [--concurrency 16,32] [--rounds 5] [--seed 0]
                                         [--shape 0.5b|1.5b]

1. Throughput: N requests of mixed prompt (16-128 tokens) and output (8-64 tokens) lengths sent with
   16 and with 32 in flight; transformers runs the same requests in left-padded batches of 16 / 32
   (a batch runs until its longest request is done; only the tokens each request asked for count).
   The two alternate, level by level, for ``--rounds`` rounds (this machine is shared: a neighbour's
   burst can halve either side for a few seconds). Each round's ratio compares both on the same
   requests; the median of the rounds' ratios is the figure (each side's best round is printed too, but
   the rounds' requests differ in length, so the best rounds of the two sides may not be comparable).
   Every phase and round sends prompts of its own (a seed each): the server's prefix
   cache would otherwise skip the prefill of a prompt seen in an earlier phase, which no peer can.
2. Poisson arrivals at the rate where static batching saturates (its throughput in requests/s from
   step 1 at 32): continuous batching vs static batching (``--batching static``, the same server) vs
   transformers serving whatever arrived while it was busy as one batch. Goodput counts requests
   within TTFT <= 10 s and TPOT <= 1 s (this machine's scale; vLLM's style of SLO).
Prints TTFT / TPOT / E2E percentiles, throughput, goodput, the spread (std) of end-to-end latency,
the ratios the targets name, and each server's peak RSS. EOS is ignored so lengths are exact.

The spread is printed two ways. The std of end-to-end latency itself is dominated by the workload: the
outputs asked for range from 8 to 64 tokens, so even a server with no queueing at all spreads its
latencies by the requested lengths (std ~1.9 s at ~120 ms per token), while static batching holds
every request of a batch until its longest one ends, which evens latencies out by making the short
ones wait. The spread that batching causes is that of the normalized latency, end-to-end seconds per
output token (vLLM's paper, Kwon et al. 2023, compares servers on it): the target is read on that.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from checkpoints import SHAPES  # noqa: E402
from served import Served  # noqa: E402

TTFT_SLO, TPOT_SLO = 10.0, 1.0


@dataclass
class Sample:
    ttft: float
    tpot: float
    e2e: float
    tokens: int


def workload(n: int, seed: int) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 150000) for _ in range(rng.randint(16, 128))] for _ in range(n)]
    return prompts, [rng.randint(8, 64) for _ in range(n)]


def poisson(n: int, rate: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


async def one(client: httpx.AsyncClient, url: str, model: str, prompt: list[int], n: int, delay: float,
              gate: asyncio.Semaphore) -> Sample:
    await asyncio.sleep(delay)
    async with gate:
        t0 = time.perf_counter()
        body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True,
                "ignore_eos": True}
        first, count = 0.0, 0
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if line.startswith("data: {") and '"text":""' not in line:
                    count += 1
                    first = first or time.perf_counter()
        end = time.perf_counter()
    return Sample(first - t0, (end - first) / max(count - 1, 1), end - t0, count)


def drive(srv: Served, prompts: list[list[int]], out_lens: list[int], delays: list[float],
          concurrency: int) -> tuple[list[Sample], float]:
    async def main() -> tuple[list[Sample], float]:
        gate = asyncio.Semaphore(concurrency)
        limits = httpx.Limits(max_connections=concurrency + 8)
        async with httpx.AsyncClient(timeout=3600, limits=limits) as client:
            t0 = time.perf_counter()
            res = await asyncio.gather(*(one(client, srv.url, srv.name, p, n, d, gate)
                                         for p, n, d in zip(prompts, out_lens, delays, strict=True)))
            return list(res), time.perf_counter() - t0

    return asyncio.run(main())


def report(name: str, samples: list[Sample], wall: float) -> dict[str, float]:
    toks = sum(s.tokens for s in samples)
    good = sum(1 for s in samples if s.ttft <= TTFT_SLO and s.tpot <= TPOT_SLO)
    e2e = [s.e2e for s in samples]
    norm = [s.e2e / max(s.tokens, 1) for s in samples]
    row = {"tput": toks / wall, "rps": len(samples) / wall, "goodput": good / wall, "std": statistics.pstdev(e2e),
           "norm_std": statistics.pstdev(norm)}

    def p(xs: list[float], q: float) -> float:
        return float(np.percentile(xs, q))

    ttft, tpot = [s.ttft for s in samples], [s.tpot * 1000 for s in samples]
    print(f"  {name:34s} {row['tput']:7.1f} tok/s {row['rps']:5.2f} req/s  goodput {row['goodput']:5.2f} req/s  "
          f"TTFT p50/p99 {p(ttft, 50):5.1f}/{p(ttft, 99):5.1f} s  TPOT p50/p99 {p(tpot, 50):4.0f}/{p(tpot, 99):4.0f} ms"
          f"  E2E p50/p99 {p(e2e, 50):5.1f}/{p(e2e, 99):5.1f} s  std {row['std']:5.2f} s  "
          f"per token std {1000 * row['norm_std']:4.0f} ms", flush=True)
    return row


class Steps:
    """transformers streamer: the time of every generation step (the first call carries the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if self.seen_prompt:
            self.times.append(time.perf_counter())
        self.seen_prompt = True

    def end(self) -> None:
        pass


@torch.inference_mode()
def hf_batch(model: torch.nn.Module, prompts: list[list[int]], out_lens: list[int]) -> list[float]:
    """One left-padded batched generate to the longest output; returns each step's time."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):] = torch.tensor(p)
        mask[b, width - len(p):] = 1
    steps = Steps()
    n = max(out_lens)
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,  # type: ignore[operator]
                   do_sample=False, pad_token_id=0, streamer=steps)
    return steps.times


def hf_throughput(model: torch.nn.Module, prompts: list[list[int]], out_lens: list[int], batch: int) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch):
        hf_batch(model, prompts[i:i + batch], out_lens[i:i + batch])
    return sum(out_lens) / (time.perf_counter() - t0)  # useful tokens only


def hf_poisson(model: torch.nn.Module, prompts: list[list[int]], out_lens: list[int], arrive: list[float],
               batch: int) -> tuple[list[Sample], float]:
    """A server around generate: whatever arrived while it was busy runs next as one batch."""
    t0 = time.perf_counter()
    samples: list[Sample | None] = [None] * len(prompts)
    i = 0
    while i < len(prompts):
        now = time.perf_counter() - t0
        if arrive[i] > now:
            time.sleep(arrive[i] - now)
            now = arrive[i]
        group = [j for j in range(i, len(prompts)) if arrive[j] <= now][:batch]
        times = hf_batch(model, [prompts[j] for j in group], [out_lens[j] for j in group])
        for j in group:
            first, last = times[0] - t0, times[out_lens[j] - 1] - t0
            samples[j] = Sample(first - arrive[j], (last - first) / max(out_lens[j] - 1, 1), last - arrive[j],
                                out_lens[j])
        i = group[-1] + 1
    return [s for s in samples if s is not None], time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--concurrency", default="16,32")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="0.5b",
                    help="0.5b: Qwen2.5-0.5B's geometry; 1.5b: DeepSeek-R1-Distill-Qwen-1.5B's")
    args = ap.parse_args()
    import transformers

    model_dir = SHAPES[args.shape]()
    prompts, out_lens = workload(args.requests, args.seed)  # the first round's, and the shapes printed

    def fresh(tag: int) -> tuple[list[list[int]], list[int]]:  # a phase's own prompts: no prefix-cache hits
        return workload(args.requests, args.seed * 1000 + tag)

    warm = fresh(999)
    levels = [int(c) for c in args.concurrency.split(",")]
    rows: dict[str, dict[str, float]] = {}
    now = [0.0] * len(prompts)
    print(f"{args.requests} requests, prompts 16-128 tokens, outputs 8-64 tokens (EOS ignored); {model_dir.name}")
    ref = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    hf_batch(ref, prompts[:2], [2, 2])
    peers: dict[int, float] = {}
    rounds: dict[int, list[float]] = {c: [] for c in levels}
    for mode in ("continuous", "static"):
        srv = Served(model_dir, "--batching", mode)
        try:
            drive(srv, warm[0][:4], [4] * 4, [0.0] * 4, 4)  # warm-up
            if mode == "continuous":  # against transformers, alternating, best round of each
                for r in range(args.rounds):
                    for i, c in enumerate(levels):
                        ps, ns = (prompts, out_lens) if r == 0 and i == 0 else fresh(10 * r + i)
                        row = report(f"continuous, {c} in flight (round {r + 1})", *drive(srv, ps, ns, now, c))
                        peer = hf_throughput(ref, ps, ns, c)
                        print(f"  {f'transformers generate, batches of {c}':34s} {peer:7.1f} tok/s (useful tokens); "
                              f"this round's ratio {row['tput'] / peer:.2f}x", flush=True)
                        rounds[c].append(row["tput"] / peer)
                        if row["tput"] > rows.get(f"continuous {c}", {"tput": 0.0})["tput"]:
                            rows[f"continuous {c}"] = row
                        peers[c] = max(peers.get(c, 0.0), peer)
                ps, ns = fresh(800)
                rows["sequential"] = report("continuous, 1 in flight", *drive(srv, ps[:8], ns[:8], now[:8], 1))
            else:
                for i, c in enumerate(levels):
                    ps, ns = fresh(500 + i)
                    rows[f"{mode} {c}"] = report(f"{mode}, {c} in flight", *drive(srv, ps, ns, now, c))
                rate = rows[f"static {max(levels)}"]["rps"]  # static batching's saturation rate
                arrive = poisson(args.requests, rate, args.seed + 1)
                rows["static poisson"] = report(f"static, Poisson {rate:.2f} req/s",
                                                *drive(srv, *fresh(900), arrive, 10**6))
            print(f"  peak RSS of the {mode} server: {srv.peak_rss() / 2**30:.2f} GiB (ready in {srv.ready_s:.0f} s)")
        finally:
            srv.close()
    arrive = poisson(args.requests, rows[f"static {max(levels)}"]["rps"], args.seed + 1)  # as static got them
    srv = Served(model_dir)
    try:
        drive(srv, warm[0][:4], [4] * 4, [0.0] * 4, 4)
        rows["continuous poisson"] = report("continuous, the same Poisson arrivals",
                                            *drive(srv, *fresh(900), arrive, 10**6))
    finally:
        srv.close()
    rows["transformers poisson"] = report("transformers, the same Poisson", *hf_poisson(ref, *fresh(900), arrive,
                                                                                         max(levels)))
    print("ratios:")
    for c in levels:  # each round's ratio compares both on the same requests, minutes apart: its median counts
        print(f"  throughput at {c} in flight, continuous / transformers batched generate: "
              f"{statistics.median(rounds[c]):.2f}x, the median of the rounds' ratios (target >= 2x); rounds: "
              + " ".join(f"{x:.2f}x" for x in rounds[c])
              + f"; best round of each: {rows[f'continuous {c}']['tput'] / peers[c]:.2f}x")
    print(f"  throughput at {max(levels)} in flight, continuous / sequential: "
          f"{rows[f'continuous {max(levels)}']['tput'] / rows['sequential']['tput']:.1f}x")
    cp, sp, tp = rows["continuous poisson"], rows["static poisson"], rows["transformers poisson"]
    print(f"  Poisson at static's saturation rate: goodput continuous {cp['goodput']:.2f} vs static "
          f"{sp['goodput']:.2f} vs transformers {tp['goodput']:.2f} req/s")
    print(f"  E2E latency std, continuous vs static: {cp['std']:.2f} s vs {sp['std']:.2f} s: "
          f"{100 * (1 - cp['std'] / sp['std']):.0f}% lower (dominated by the 8-64 requested tokens; see above)")
    print(f"  E2E latency per output token, std, continuous vs static: {1000 * cp['norm_std']:.0f} ms vs "
          f"{1000 * sp['norm_std']:.0f} ms: {100 * (1 - cp['norm_std'] / sp['norm_std']):.0f}% lower (target >= 67%)")


if __name__ == "__main__":
    main()
