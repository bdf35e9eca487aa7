"""Probe: how fast could a decode step's 16-row product be with the weights packed at load?

Usage: .venv/bin/python bench/packed_probe.py [--shape 0.5b|1.5b] [--layers 12] [--rows 16]
``linear_bf16`` sums each output along K in a register and reduces it at the end of a block. This probe
compiles the other classic shape of a GEMM micro-kernel: the weights packed once into VNNI order (per 16
output columns, each pair of k side by side), 8 activation rows by 3 blocks of 16 columns in 24
accumulators, each activation pair broadcast, no horizontal reductions. It times both over ``--layers``
layers' matrices (streamed from memory as in a step) and over one matrix repeated (in cache), in the same
run, and checks the probe against float32. Not a target, and not the served path: the probe writes
float32 without bias or the int8 variant. It measures the headroom for that kernel (see
docs/benchmarks.md, "Why the llama.cpp targets ...") before the work of packing the weights at load.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.nn import functional as F
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.checkpoints import SHAPES  # noqa: E402
from bench.cpu_peak import layer_shapes, rate  # noqa: E402
from inference_core import kernels  # noqa: E402
from inference_core.model.config import ModelConfig  # noqa: E402

SRC = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
// w [N, K] bf16 -> [N/16][K/2][16][2]: per 16 output columns, each pair of k side by side (VNNI order)
torch::Tensor pack(const torch::Tensor& w) {
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(N % 16 == 0 && K % 2 == 0, "out-features a multiple of 16, in-features even");
  auto out = torch::empty({N / 16, K / 2, 16, 2}, w.options());
  const uint16_t* W = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  uint16_t* O = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(0, N / 16, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t nb = b0; nb < b1; ++nb)
      for (int64_t kp = 0; kp < K / 2; ++kp)
        for (int c = 0; c < 16; ++c) {
          O[((nb * (K / 2) + kp) * 16 + c) * 2 + 0] = W[(nb * 16 + c) * K + 2 * kp];
          O[((nb * (K / 2) + kp) * 16 + c) * 2 + 1] = W[(nb * 16 + c) * K + 2 * kp + 1];
        }
  });
  return out;
}
// MR activation rows by NB blocks of 16 output columns: MR x NB accumulators, each holding 16 outputs, so no
// horizontal reduction; per pair of k, NB weight loads and MR broadcasts of an activation pair.
template <int MR, int NB>
inline void tile(const int32_t* x, int64_t ldx, const uint16_t* wp, int64_t K, int64_t kstride, float* out, int64_t ldo,
                 const char* pf, int64_t pfb) {
  __m512 acc[MR][NB];
  for (int m = 0; m < MR; ++m) for (int j = 0; j < NB; ++j) acc[m][j] = _mm512_setzero_ps();
  for (int64_t kp = 0; kp < K / 2; ++kp) {
    if (pf && (kp & 1) == 0)
      for (int j = 0; j < NB; ++j) {
        _mm_prefetch(pf + j * pfb + kp * 64, _MM_HINT_T1);
        _mm_prefetch(pf + j * pfb + kp * 64 + 64, _MM_HINT_T1);
      }
    __m512bh w[NB];
    for (int j = 0; j < NB; ++j) w[j] = (__m512bh)_mm512_loadu_si512(wp + j * kstride + kp * 32);
    for (int m = 0; m < MR; ++m) {
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(x[m * ldx + kp]);
      for (int j = 0; j < NB; ++j) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], xb, w[j]);
    }
  }
  for (int m = 0; m < MR; ++m) for (int j = 0; j < NB; ++j) _mm512_storeu_ps(out + m * ldo + j * 16, acc[m][j]);
}
torch::Tensor packed_linear(const torch::Tensor& x, const torch::Tensor& wp, int64_t N) {
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(M <= 16 && M % 8 == 0, "8 or 16 rows");
  auto out = torch::empty({M, N}, x.options().dtype(at::kFloat));
  const int32_t* X = reinterpret_cast<const int32_t*>(x.data_ptr<at::BFloat16>());
  const uint16_t* W = reinterpret_cast<const uint16_t*>(wp.data_ptr<at::BFloat16>());
  float* O = out.data_ptr<float>();
  const int64_t NB = 3, nt = N / 16, kstride = K * 16;  // elements per packed column block
  const int64_t tiles = (nt + NB - 1) / NB;
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t j0 = t * NB, nb = std::min<int64_t>(NB, nt - j0);
      const char* pf = t + 1 < t1 ? reinterpret_cast<const char*>(W + (j0 + NB) * kstride) : nullptr;
      for (int64_t m0 = 0; m0 < M; m0 += 8) {
        const char* p = m0 == 0 ? pf : nullptr;  // the next tile, fetched by the first pass
        const int32_t* xm = X + m0 * (K / 2);
        const uint16_t* wt = W + j0 * kstride;
        float* o = O + m0 * N + j0 * 16;
        if (nb == 3) tile<8, 3>(xm, K / 2, wt, K, kstride, o, N, p, kstride * 2);
        else if (nb == 2) tile<8, 2>(xm, K / 2, wt, K, kstride, o, N, p, kstride * 2);
        else tile<8, 1>(xm, K / 2, wt, K, kstride, o, N, p, kstride * 2);
      }
    }
  });
  return out;
}
"""



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1.5b")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--rows", type=int, choices=(8, 16), default=16)
    args = ap.parse_args()
    ker = kernels.load()
    if ker is None:
        raise SystemExit(f"no CPU kernel here: {kernels.status()}")
    mod = cpp_extension.load_inline("bench_packed_probe", [SRC], functions=["pack", "packed_linear"],
                                    extra_cflags=["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16",
                                                  "-fopenmp"], extra_ldflags=["-fopenmp"])
    torch.manual_seed(0)
    w, x = torch.randn(80, 96).bfloat16(), torch.randn(args.rows, 96).bfloat16()
    err = (mod.packed_linear(x, mod.pack(w), 80) - F.linear(x.float(), w.float())).abs().max().item()
    assert err < 1e-3, f"the probe's product is off by {err}"
    shapes = layer_shapes(ModelConfig.from_file(SHAPES[args.shape]() / "config.json"))
    xs = {k: torch.randn(args.rows, k).bfloat16() for k, _ in shapes}
    ws = [torch.randn(n, k).bfloat16() for _ in range(args.layers) for k, n in shapes]
    packed = [mod.pack(t) for t in ws]
    flop = sum(2.0 * args.rows * t.numel() for t in ws)
    pairs = list(zip(ws, packed, strict=True))
    for _ in range(2):  # twice, alternating: the machine drifts
        ours = rate(lambda: [ker.linear_bf16(xs[t.shape[1]], t, None) for t in ws], flop) / 1e9
        probe = rate(lambda: [mod.packed_linear(xs[t.shape[1]], p, t.shape[0]) for t, p in pairs], flop) / 1e9
        print(f"{args.shape}, {args.layers} layers' matrices streamed, {args.rows} rows: linear_bf16 {ours:.0f} "
              f"GFLOP/s, packed probe {probe:.0f} GFLOP/s ({probe / ours:.2f}x)")
    k = shapes[0][0]
    one, one_packed = ws[0], packed[0]
    flop1 = 20 * 2.0 * args.rows * one.numel()
    ours = rate(lambda: [ker.linear_bf16(xs[k], one, None) for _ in range(20)], flop1) / 1e9
    probe = rate(lambda: [mod.packed_linear(xs[k], one_packed, one.shape[0]) for _ in range(20)], flop1) / 1e9
    print(f"one {one.shape[0]} x {one.shape[1]} matrix repeated, in cache: linear_bf16 {ours:.0f} GFLOP/s, "
          f"packed probe {probe:.0f} GFLOP/s ({probe / ours:.2f}x)")


if __name__ == "__main__":
    main()
