"""Single-stream decode on the served path: ``python -m inference_core.server`` with default flags,
driven over HTTP, against transformers' ``generate`` on the same weights in the same dtype, and against
the memory-bandwidth bound (every weight read once per token) — all measured in one run.

Usage: .venv/bin/python bench/decode.py [--tokens 64] [--runs 3] [--prompt-len 32] [--shape 0.5b|1.5b]
                                       [--concurrency 16]
The checkpoint is Qwen2.5-0.5B's geometry in bf16 (494 M parameters), or with ``--shape 1.5b``
DeepSeek-R1-Distill-Qwen-1.5B's (1.78 B; ``bench/checkpoints.py``, made locally once).
Decode rate = tokens after the first / time from the first to the last token (prefill
excluded on both sides). Bandwidth is the read rate of summing a 512 MiB tensor, measured just before
each of our runs (the machine is shared: its bandwidth drifts over minutes).
Also printed: time to /ready, the server's peak RSS and the memory plan it printed at start; and
``--concurrency`` streams at once with uniform requests (the same prompt length, exactly ``--tokens`` each,
so static batching loses nothing to padding): ours over HTTP against transformers' ``generate`` on the
batch of the same prompts, tokens generated / wall time from the requests' start to the last token (the
prefill included on both sides; target >= 2x).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from checkpoints import SHAPES  # noqa: E402
from served import Served, stream_completion  # noqa: E402


def read_bandwidth(nbytes: int = 512 * 2**20, reps: int = 5) -> float:
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    x.sum()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    return nbytes / min(times)


def rate(times: list[float]) -> float:
    return (len(times) - 1) / (times[-1] - times[0])


class Clock:
    """A transformers streamer that records when each generated token arrives."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True  # the first call carries the prompt
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@torch.inference_mode()
def theirs(model: torch.nn.Module, prompt: list[int], n: int) -> list[float]:
    clock = Clock()
    ids = torch.tensor([prompt])
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,  # type: ignore[operator]
                   do_sample=False, streamer=clock, pad_token_id=0)
    return clock.times


@torch.inference_mode()
def theirs_batch(model: torch.nn.Module, prompts: list[list[int]], n: int) -> float:
    """Tokens per second of one ``generate`` over the batch (prompts of one length: no padding)."""
    ids = torch.tensor(prompts)
    t0 = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,  # type: ignore[operator]
                   do_sample=False, pad_token_id=0)
    return n * len(prompts) / (time.perf_counter() - t0)


def ours_batch(url: str, name: str, prompts: list[list[int]], n: int) -> float:
    """Tokens per second of the prompts sent at once, each streamed on its own connection."""
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        t0 = time.perf_counter()
        streams = list(pool.map(lambda p: stream_completion(url, name, p, n), prompts))
    # exactly n tokens each (EOS ignored); a token whose text is held back (part of a UTF-8 character) streams
    # no event of its own, so the last event is the end
    return n * len(prompts) / (max(t[-1] for t in streams) - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="0.5b",
                    help="0.5b: Qwen2.5-0.5B's geometry; 1.5b: DeepSeek-R1-Distill-Qwen-1.5B's")
    ap.add_argument("--concurrency", type=int, default=16, help="streams at once for the uniform phase (0: none)")
    args = ap.parse_args()
    import transformers

    model_dir = SHAPES[args.shape]()
    weight_bytes = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    srv = Served(model_dir)
    try:
        ref = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
        rng = random.Random(0)
        prompts = [[rng.randrange(3, 150000) for _ in range(args.prompt_len)] for _ in range(args.runs)]
        ours_r, theirs_r, bw_r = [], [], []
        stream_completion(srv.url, srv.name, [5, 6, 7, 8], 4)  # warm-up
        theirs(ref, [5, 6, 7, 8], 2)
        for prompt in prompts:  # interleaved, so both see the same machine; the bandwidth too, next to each run
            bw_r.append(read_bandwidth())
            ours_r.append(rate(stream_completion(srv.url, srv.name, prompt, args.tokens)))
            theirs_r.append(rate(theirs(ref, prompt, args.tokens)))
        conc_o, conc_t = [], []
        for r in range(args.runs if args.concurrency else 0):  # uniform requests, all at once; alternating
            batch = [[rng.randrange(3, 150000) for _ in range(args.prompt_len)] for _ in range(args.concurrency)]
            conc_o.append(ours_batch(srv.url, srv.name, batch, args.tokens))
            conc_t.append(theirs_batch(ref, batch, args.tokens))
            print(f"{args.concurrency} concurrent, round {r + 1}: ours {conc_o[-1]:.1f} tok/s, transformers "
                  f"{conc_t[-1]:.1f} ({conc_o[-1] / conc_t[-1]:.2f}x)", flush=True)
        del ref
        peak, ready, layout, plan = srv.peak_rss(), srv.ready_s, srv.layout_s, srv.plan()
        srv.close()
        def served_rates(*flags: str) -> tuple[list[float], int]:
            nonlocal srv
            srv.close()
            srv = Served(model_dir, *flags)
            stream_completion(srv.url, srv.name, [5, 6, 7, 8], 4)
            return [rate(stream_completion(srv.url, srv.name, p, args.tokens)) for p in prompts], srv.peak_rss()

        # the seed's int8 on the same prompts, bracketed by bf16 before (above) and after (A-B-A: the two
        # servers cannot run side by side in this memory, and the machine's bandwidth drifts over minutes)
        int8_r, int8_peak = served_rates("--quantization", "int8")
        after_r, _ = served_rates()
        bw = statistics.median(bw_r)
        bound = bw / weight_bytes
        of_bound = statistics.median(r / (b / weight_bytes) for r, b in zip(ours_r, bw_r, strict=True))
        o, t = statistics.median(ours_r), statistics.median(theirs_r)
        print(f"checkpoint: {model_dir.name}, {weight_bytes / 2**20:.0f} MiB of bf16 weights; memory read bandwidth "
              f"{bw / 1e9:.1f} GB/s -> bound {bound:.1f} tok/s (median; measured just before each of our runs: "
              f"{', '.join(f'{b / 1e9:.1f}' for b in bw_r)} GB/s)")
        print(f"server (default flags): ready in {ready:.1f} s (weights in huge pages {layout:.1f} s after the "
              f"start, while serving); peak RSS {peak / 2**30:.2f} GiB")
        print(plan)
        print(f"single-stream decode over HTTP: ours {o:.1f} tok/s, transformers generate {t:.1f} tok/s "
              f"(median of {args.runs}; ours {', '.join(f'{x:.1f}' for x in ours_r)}; "
              f"theirs {', '.join(f'{x:.1f}' for x in theirs_r)})")
        print(f"ratio ours / transformers: {o / t:.2f}x (target >= 1.5x); ours / bandwidth bound: "
              f"{100 * of_bound:.0f}% (target >= 50%; median over the runs of each run's rate against the "
              f"bandwidth measured just before it)")
        if conc_o:
            ratios = [a / b for a, b in zip(conc_o, conc_t, strict=True)]
            print(f"{args.concurrency} concurrent, uniform requests ({args.prompt_len}-token prompts, {args.tokens} "
                  f"tokens each): ours {statistics.median(conc_o):.1f} tok/s, transformers generate on the batch "
                  f"{statistics.median(conc_t):.1f} tok/s; ratio {statistics.median(ratios):.2f}x (median of "
                  f"{len(ratios)} rounds' ratios: {', '.join(f'{x:.2f}' for x in ratios)}; target >= 2x)")
        i8, o2 = statistics.median(int8_r), statistics.median(after_r)
        print(f"--quantization int8, same prompts, between two bf16 servers: {i8:.1f} tok/s "
              f"({', '.join(f'{x:.1f}' for x in int8_r)}); bf16 before {o:.1f}, after {o2:.1f} "
              f"({', '.join(f'{x:.1f}' for x in after_r)}) tok/s; int8 / bf16 (mean of before and after): "
              f"{i8 / ((o + o2) / 2):.2f}x; int8 peak RSS {int8_peak / 2**30:.2f} GiB")
    finally:
        srv.close()


if __name__ == "__main__":
    main()
