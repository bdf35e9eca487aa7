"""The CPU's bf16 dot-product peak, and how near the linear kernels come to it.

Usage: .venv/bin/python bench/cpu_peak.py [--shape 0.5b|1.5b] [--rows 16]
Compiles a register-only loop of VDPBF16PS (AVX512-BF16: 32 bf16 products summed into 16 fp32 lanes, 64
FLOP an instruction) over 24 independent accumulators, runs it on every thread torch uses, and prints the
GFLOP/s: the ceiling for any bf16 kernel on this CPU without AMX. Then a decode step's linear layers at
``--rows`` rows, on the shape's matrices as the model holds them (every layer's, so the weights stream from
memory as in a step): ``linear_bf16`` (ours) and torch's ``F.linear`` (oneDNN, what transformers runs), and
oneDNN on a 128-token prefill, each as GFLOP/s and as a share of the peak. Not a target: the physics that
bench/decode.py's and bench/serving.py's ratios against transformers are read against.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.checkpoints import SHAPES  # noqa: E402
from inference_core import kernels  # noqa: E402
from inference_core.model.config import ModelConfig  # noqa: E402

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

// FLOP per second of VDPBF16PS on every thread: 24 accumulators (more than its latency times its throughput),
// operands in registers, nothing read from memory.
double dpbf16_peak(int64_t iters) {
  const int64_t threads = at::get_num_threads();
  std::vector<float> sink(threads);
  const auto t0 = std::chrono::steady_clock::now();
  at::parallel_for(0, threads, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      __m512 acc[24];
      for (int i = 0; i < 24; ++i) acc[i] = _mm512_set1_ps(static_cast<float>(i) * 1e-9f);
      __m512bh x = (__m512bh)_mm512_set1_epi16(0x3f80), y = (__m512bh)_mm512_set1_epi16(0x3f80);
      for (int64_t n = 0; n < iters; ++n) {
#pragma GCC unroll 24
        for (int i = 0; i < 24; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], x, y);
        __asm__ volatile("" : "+v"(x));  // the compiler may not fold the loop away
      }
      float s = 0.0f;
      for (int i = 0; i < 24; ++i) s += _mm512_reduce_add_ps(acc[i]);
      sink[t] = s;
    }
  });
  const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  TORCH_CHECK(sink[0] > 0.0f, "the loop did not run");
  return static_cast<double>(threads) * iters * 24 * 64 / dt;
}
"""


def layer_shapes(cfg: ModelConfig) -> list[tuple[int, int]]:
    """(in, out) of a decoder layer's matrices as the model runs them: q/k/v fused, o, gate/up fused, down."""
    h, i, hd = cfg.hidden_size, cfg.intermediate_size, cfg.hidden_size // cfg.num_attention_heads
    qkv = h + 2 * cfg.num_key_value_heads * hd
    return [(h, qkv), (h, h), (h, 2 * i), (i, h)]


def rate(fn: object, flop: float, reps: int = 5) -> float:
    fn()  # type: ignore[operator]
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - t0)
    return flop / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1.5b")
    ap.add_argument("--rows", type=int, default=16)
    args = ap.parse_args()
    mod = kernels.load()
    if mod is None:
        raise SystemExit(f"no CPU kernel here: {kernels.status()}")
    peak_mod = cpp_extension.load_inline("bench_dpbf16_peak", [SOURCE], functions=["dpbf16_peak"],
                                         extra_cflags=["-O2", "-mavx512f", "-mavx512bw", "-mavx512bf16", "-fopenmp"],
                                         extra_ldflags=["-fopenmp"])
    peak = max(peak_mod.dpbf16_peak(5_000_000) for _ in range(3))
    cfg = ModelConfig.from_file(SHAPES[args.shape]() / "config.json")
    torch.manual_seed(0)
    weights = [torch.randn(n, k).bfloat16() for _ in range(cfg.num_hidden_layers) for k, n in layer_shapes(cfg)]
    gb = sum(w.numel() * 2 for w in weights) / 1e9
    print(f"VDPBF16PS peak, {torch.get_num_threads()} threads: {peak / 1e9:.0f} GFLOP/s")
    print(f"{args.shape}: {cfg.num_hidden_layers} layers' matrices, {gb:.2f} GB of bf16, streamed once per pass")
    for name, rows, fn in (("linear_bf16 (ours)", args.rows, lambda x, w: mod.linear_bf16(x, w, None)),
                           ("F.linear (oneDNN)", args.rows, F.linear), ("F.linear (oneDNN), prefill", 128, F.linear)):
        xs = {k: torch.randn(rows, k).bfloat16() for k, _ in layer_shapes(cfg)}
        flop = sum(2.0 * rows * w.numel() for w in weights)
        r = rate(lambda f=fn, xs=xs: [f(xs[w.shape[1]], w) for w in weights], flop)  # type: ignore[misc]
        print(f"  {name}, {rows} rows: {r / 1e9:.0f} GFLOP/s, {100 * r / peak:.0f}% of the peak "
              f"({gb / (flop / r):.1f} GB/s of weights)")
    k, n = layer_shapes(cfg)[0]  # one q/k/v matrix over and over: from the cache, no memory stream
    w, x = weights[0], torch.randn(args.rows, k).bfloat16()
    r = rate(lambda: [mod.linear_bf16(x, w, None) for _ in range(20)], 20 * 2.0 * args.rows * k * n)
    print(f"  linear_bf16 (ours), {args.rows} rows, one {n} x {k} matrix ({w.numel() * 2 / 2**20:.1f} MiB) repeated, "
          f"in cache: {r / 1e9:.0f} GFLOP/s, {100 * r / peak:.0f}% of the peak")


if __name__ == "__main__":
    main()
