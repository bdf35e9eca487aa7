"""Where a decode step goes: the served model's step, broken down by operator (torch.profiler).

Usage: .venv/bin/python bench/step_profile.py [--shape 0.5b|1.5b] [--rows 1] [--int8] [--steps 30]
Loads the bench checkpoint as the server does (memory map, huge pages, the CPU kernels, int8 when asked),
runs ``--rows`` sequences of 256 cached tokens through ``--steps`` decode steps of the model runner (the
forward pass and the sampling of the engine's step, without the scheduler or HTTP), and prints the step's
time (with the whole-stack ``decode_layers`` call the server uses, and with the layers' own forward), the
weights' bandwidth bound (bytes read per step / the host's measured read bandwidth), and the operators
that take the time, by self CPU time, with how many calls per step: torch's and the CPU kernels' (each
kernel call recorded under its name; the breakdown runs the layers' forward, whose kernels are the ones
``decode_layers`` calls in one go). Not a target: a map for the work that chases bench/decode.py's and
bench/peers.py's.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.checkpoints import SHAPES  # noqa: E402
from bench.decode import read_bandwidth  # noqa: E402
from inference_core import kernels  # noqa: E402
from inference_core.engine.runner import ModelRunner, weights_bytes  # noqa: E402
from inference_core.engine.types import EngineConfig  # noqa: E402
from inference_core.kv_cache import SeqChunk  # noqa: E402
from inference_core.model.quantize import quantize_int8  # noqa: E402
from inference_core.model.weights import load_model  # noqa: E402
from inference_core.sampling import SamplingParams, sample_batch  # noqa: E402

CONTEXT = 256


class Recorded:
    """The CPU kernels' module with each call recorded for the profiler under the kernel's name."""

    def __init__(self, module: Any) -> None:
        self._module = module

    def __getattr__(self, name: str) -> Any:
        fn = getattr(self._module, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            with record_function(f"kernel::{name}"):
                return fn(*args, **kwargs)
        return call if callable(fn) else fn


def record_kernels(model: torch.nn.Module) -> None:
    mod = kernels.load()
    if mod is None:
        return
    kernels.FastLinear.kernel = Recorded(mod)
    for m in [*model.modules(), *kernels.fused_modules(model)]:
        for attr in ("int8_kernel", "decode_kernel", "fused_kernel"):
            if vars(m).get(attr) is not None:
                vars(m)[attr] = Recorded(mod)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="0.5b")
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--int8", action="store_true")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--top", type=int, default=18)
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    model = load_model(SHAPES[args.shape]())
    if args.int8:
        quantize_int8(model)
    bs = 16
    # the prompt, then three rounds of steps (timed twice and profiled once), each after 3 warm-up steps
    blocks_per_seq = (CONTEXT + 3 * (args.steps + 3) + bs - 1) // bs
    runner = ModelRunner(model, EngineConfig(num_kv_blocks=blocks_per_seq * args.rows, block_size=bs))
    while runner.layout_pending:  # the server moves them while it serves; here before timing
        runner.relayout_step()
    cache = runner.allocate(blocks_per_seq * args.rows)
    tables = [list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)) for i in range(args.rows)]
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, vocab, (CONTEXT,), generator=g).tolist() for _ in range(args.rows)]
    with torch.inference_mode():
        for p, t in zip(prompts, tables, strict=True):
            runner.run([SeqChunk(p, 0, t, True)], cache)
    params = [SamplingParams(temperature=0.0) for _ in range(args.rows)]
    pos = [CONTEXT] * args.rows
    last = [p[-1] for p in prompts]

    def step() -> None:
        with torch.inference_mode():
            logits = runner.run([SeqChunk([last[i]], pos[i], tables[i], True) for i in range(args.rows)], cache)
            ids, _ = sample_batch(logits, params, [None] * args.rows, [frozenset()] * args.rows)
        for i in range(args.rows):
            last[i], pos[i] = ids[i], pos[i] + 1

    def timed() -> float:
        for _ in range(3):
            step()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        return (time.perf_counter() - t0) / args.steps

    per_step = timed()
    model.decode_plan = False  # the layers' own forward from here on
    layers_step = timed()
    # a step reads every weight once except the embedding table (one row each); a tied head reads it whole
    embed, head = (next(iter([*m.buffers(), *m.parameters()])) for m in (model.model.embed_tokens, model.lm_head))
    wbytes = weights_bytes(model) - embed.nbytes + (head.nbytes if head.data_ptr() == embed.data_ptr() else 0)
    bw = read_bandwidth()
    print(f"{args.shape} {'int8' if args.int8 else 'bf16'}, {args.rows} row(s), {torch.get_num_threads()} threads: "
          f"step {per_step * 1e3:.2f} ms ({args.rows / per_step:.1f} tok/s); weights read {wbytes / 1e6:.0f} MB at "
          f"{bw / 1e9:.1f} GB/s: bound {wbytes / bw * 1e3:.2f} ms ({100 * wbytes / bw / per_step:.0f}% of it)")
    print(f"the same step through the layers' own forward: {layers_step * 1e3:.2f} ms "
          f"({layers_step / per_step:.2f}x the one-call step's time)")
    record_kernels(model)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    events.sort(key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    print(f"profiled: {total / args.steps / 1e3:.2f} ms of operator time per step (profiler overhead included)")
    print(f"{'operator':<44} {'ms/step':>8} {'share':>6} {'calls/step':>10}")
    for e in events[:args.top]:
        print(f"{e.key[:44]:<44} {e.self_cpu_time_total / args.steps / 1e3:8.3f} "
              f"{100 * e.self_cpu_time_total / total:5.1f}% {e.count / args.steps:10.1f}")


if __name__ == "__main__":
    main()
