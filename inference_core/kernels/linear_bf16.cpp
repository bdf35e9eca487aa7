// y = x @ w.T (+ b) for bf16 on x86-64 CPUs with AVX512-BF16, for the few rows a decode step has.
//
// A single-stream decode step multiplies one activation row by every weight matrix: the work is reading
// the weights once (memory bound). The library path reaches about half the memory bandwidth for such
// shapes; this kernel streams eight weight rows at a time, multiplies them with every activation row
// with VDPBF16PS (pairs of bf16 products summed into fp32), and rounds the fp32 sums to bf16 at the end.
// It accepts up to 16 rows; the Python side sends it only the shapes where it measured faster.
// Layout: x [M, K] bf16 contiguous, w [N, K] bf16 contiguous (nn.Linear's), b [N] bf16 or none.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int R = 8;  // weight rows per block

// 32 int8 weights widened to bf16 (exact for -127..127), in order.
inline __m512bh widen_int8(__m256i q) {
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q)));
  const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1)));
  return _mm512_cvtne2ps_pbh(hi, lo);
}

// 32 weights of a row from k on as bf16: bf16 weights as they are, int8 ones (Q) widened.
template <bool Q>
inline __m512bh load_w(const void* row, int64_t k) {
  if constexpr (Q) {
    return widen_int8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const int8_t*>(row) + k)));
  } else {
    return (__m512bh)_mm512_loadu_si512(static_cast<const uint16_t*>(row) + k);
  }
}
template <bool Q>
inline __m512bh load_w_mask(const void* row, int64_t k, __mmask32 mask) {
  if constexpr (Q) {
    return widen_int8(_mm256_maskz_loadu_epi8(mask, static_cast<const int8_t*>(row) + k));
  } else {
    return (__m512bh)_mm512_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(row) + k);
  }
}

// Prefetch into L2 the ``bytes`` of a block that step ``i`` of its loop over k will read (see block()).
inline void prefetch_step(const char* next, int64_t i, int64_t bytes) {
  for (int64_t off = 0; off < bytes; off += 64) _mm_prefetch(next + i * bytes + off, _MM_HINT_T1);
}

// One fp32 activation row by R int8 weight rows, in fp32 (products and sums as exact as VDPBF16PS's):
// sign-extend and convert 16 weights, one FMA. Cheaper per weight than widening to bf16 for VDPBF16PS,
// which left the one-row int8 product compute-bound on this project's 2-core machines.
inline void block_i8(const float* x, int64_t K, const int8_t* const* wrow, float out[R], const char* next) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    if (next != nullptr) prefetch_step(next, k / 16, R * 16);  // as block(): two blocks on
    const __m512 xv = _mm512_loadu_ps(x + k);
    for (int r = 0; r < R; ++r) {
      const __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(wrow[r] + k))));
      acc[r] = _mm512_fmadd_ps(wv, xv, acc[r]);
    }
  }
  if (k < K) {
    const __mmask16 mask = (__mmask16)((1u << (K - k)) - 1);
    const __m512 xv = _mm512_maskz_loadu_ps(mask, x + k);
    for (int r = 0; r < R; ++r)
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, wrow[r] + k))),
                               xv, acc[r]);
  }
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
}

// One activation row by R int8 weight rows with VPDPBUSD (AVX512-VNNI), 64 weights per instruction. The row
// was quantized to 16 bits (x16 = round(x / sx), |x16| <= 32767) and offset to u = x16 + 32768, split into its
// high and low bytes (hi, lo: unsigned, as VPDPBUSD's first operand wants). Per weight row the products are
// integers: A = sum(w * hi), B = sum(w * lo), C = sum(w) (against a vector of ones), so that
// sum(w * x16) = 256 A + B - 32768 C exactly (in int64; |A| <= 255 * 127 * K fits int32 for K < 66,000).
// Four instructions per 64 weights where widening to fp32 took twelve: the one-row product becomes
// memory-bound on 2 cores instead of compute-bound. ``hi``/``lo`` hold K bytes padded to a multiple of 64.
inline void block_vnni(const uint8_t* hi, const uint8_t* lo, int64_t K, const int8_t* const* wrow, int64_t out[R],
                       const char* next) {
  __m512i a[R], b[R], c[R];
  for (int r = 0; r < R; ++r) a[r] = b[r] = c[r] = _mm512_setzero_si512();
  const __m512i ones = _mm512_set1_epi8(1);
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    if (next != nullptr) prefetch_step(next, k / 64, R * 64);  // as block(): two blocks on
    const __m512i h = _mm512_loadu_si512(hi + k), l = _mm512_loadu_si512(lo + k);
    for (int r = 0; r < R; ++r) {
      const __m512i w = _mm512_loadu_si512(wrow[r] + k);
      a[r] = _mm512_dpbusd_epi32(a[r], h, w);
      b[r] = _mm512_dpbusd_epi32(b[r], l, w);
      c[r] = _mm512_dpbusd_epi32(c[r], ones, w);
    }
  }
  if (k < K) {
    const __mmask64 mask = (__mmask64)((~0ull) >> (64 - (K - k)));
    const __m512i h = _mm512_loadu_si512(hi + k), l = _mm512_loadu_si512(lo + k);
    for (int r = 0; r < R; ++r) {
      const __m512i w = _mm512_maskz_loadu_epi8(mask, wrow[r] + k);  // beyond K: zero weights, zero products
      a[r] = _mm512_dpbusd_epi32(a[r], h, w);
      b[r] = _mm512_dpbusd_epi32(b[r], l, w);
      c[r] = _mm512_dpbusd_epi32(c[r], ones, w);
    }
  }
  for (int r = 0; r < R; ++r)
    out[r] = 256 * static_cast<int64_t>(_mm512_reduce_add_epi32(a[r])) + _mm512_reduce_add_epi32(b[r]) -
             32768 * static_cast<int64_t>(_mm512_reduce_add_epi32(c[r]));
}

// bf16 -> fp32 is the bits shifted up by 16; ``k`` masks the lanes read (a row's tail)
inline __m512 load_bf16_mask(const uint16_t* p, __mmask16 k) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p)), 16));
}
inline __mmask16 tail_mask(int64_t left) { return left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1); }

// The activation row for block_vnni: its scale sx (amax / 32767; 1 for a zero row) and the high and low bytes
// of x / sx rounded to even and offset by 32768, in ``hi``/``lo`` (zero-padded to a multiple of 64). False
// where the row holds an infinity or a NaN (the caller keeps the fp32 path, which propagates them).
inline bool quantize_row16(const uint16_t* x, int64_t K, std::vector<uint8_t>& hi, std::vector<uint8_t>& lo,
                           float& sx) {
  __m512 amax = _mm512_setzero_ps();
  const __m512i exp = _mm512_set1_epi32(0x7F800000);
  for (int64_t i = 0; i < K; i += 16) {
    const __m512 f = load_bf16_mask(x + i, tail_mask(K - i));  // 16 values at a time, the tail masked
    const __m512i e = _mm512_and_si512(_mm512_castps_si512(f), exp);  // all exponent bits set: a NaN or an infinity
    if (_mm512_cmpeq_epi32_mask(e, exp) != 0) return false;
    amax = _mm512_max_ps(amax, _mm512_abs_ps(f));
  }
  const float top = _mm512_reduce_max_ps(amax);
  sx = top > 0.0f ? top / 32767.0f : 1.0f;
  const int64_t padded = (K + 63) / 64 * 64;
  hi.assign(padded, 0);
  lo.assign(padded, 0);
  const __m512 s = _mm512_set1_ps(sx), lim = _mm512_set1_ps(32767.0f), nlim = _mm512_set1_ps(-32767.0f);
  const __m512i offset = _mm512_set1_epi32(32768), low = _mm512_set1_epi32(255);
  for (int64_t i = 0; i < K; i += 16) {
    // x / sx rounded to even (as std::nearbyint), clamped, offset to 0..65535: its high and low bytes
    const __mmask16 m = tail_mask(K - i);
    const __m512 q = _mm512_roundscale_ps(_mm512_div_ps(load_bf16_mask(x + i, m), s),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512i v = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_min_ps(lim, _mm512_max_ps(nlim, q))), offset);
    _mm512_mask_cvtepi32_storeu_epi8(hi.data() + i, m, _mm512_srli_epi32(v, 8));
    _mm512_mask_cvtepi32_storeu_epi8(lo.data() + i, m, _mm512_and_si512(v, low));
  }
  return true;
}

// MB activation rows by RB weight rows: RB*MB accumulators (<= 16 of the 32 vector registers).
// ``pf``: where this call's part of the weight block two on starts (null: none), and ``pf_step`` its bytes per
// step of k: each step prefetches (into L2) that much, so the block is in the cache before it is used. The
// caller splits the block between its calls (see gemv_rows). Short rows (K = 896: 1.8 KiB in bf16) are too
// short a stream for the hardware prefetcher to ramp up on: without this, those shapes read at 55-60 % of
// the long-row shapes' rate (24 GB/s against 43 on a 2-core AVX512-BF16 host), and they are most of a Qwen2
// decode step (q/k/v, o, gate/up and the 152k-row head all have K = hidden).
template <int MB, int RB, bool Q>
inline void block(const uint16_t* x, int64_t K, const void* const* wrow, float out[R][4], const char* pf,
                  int64_t pf_step) {
  __m512 acc[RB][MB];
  for (int r = 0; r < RB; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    if (pf != nullptr) prefetch_step(pf, k / 32, pf_step);
    __m512bh xv[MB];
    for (int m = 0; m < MB; ++m) xv[m] = (__m512bh)_mm512_loadu_si512(x + m * K + k);
    for (int r = 0; r < RB; ++r) {
      const __m512bh wv = load_w<Q>(wrow[r], k);
      for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], wv, xv[m]);
    }
  }
  if (k < K) {
    const __mmask32 mask = (__mmask32)((1ull << (K - k)) - 1);
    __m512bh xv[MB];
    for (int m = 0; m < MB; ++m) xv[m] = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + m * K + k);
    for (int r = 0; r < RB; ++r) {
      const __m512bh wv = load_w_mask<Q>(wrow[r], k, mask);
      for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], wv, xv[m]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int m = 0; m < MB; ++m) out[r][m] = _mm512_reduce_add_ps(acc[r][m]);
}


// bf16 → fp32 (times ``mul``), a dot product and y += a * x, over D floats; AVX512 when D % 16 == 0.
inline void to_f32(const uint16_t* src, float* dst, int64_t D, float mul, bool vec) {
  if (vec) {
    const __m512 m = _mm512_set1_ps(mul);
    for (int64_t d = 0; d < D; d += 16) {
      __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + d)));
      _mm512_storeu_ps(dst + d, _mm512_mul_ps(_mm512_castsi512_ps(_mm512_slli_epi32(w, 16)), m));
    }
    return;
  }
  for (int64_t d = 0; d < D; ++d) {
    uint32_t u = static_cast<uint32_t>(src[d]) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    dst[d] = f * mul;
  }
}

inline float dot(const float* a, const float* b, int64_t D, bool vec) {
  if (vec) {
    __m512 s = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) s = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), _mm512_loadu_ps(b + d), s);
    return _mm512_reduce_add_ps(s);
  }
  float s = 0.0f;
  for (int64_t d = 0; d < D; ++d) s += a[d] * b[d];
  return s;
}

inline void axpy(float a, const float* x, float* y, int64_t D, bool vec) {
  if (vec) {
    const __m512 av = _mm512_set1_ps(a);
    for (int64_t d = 0; d < D; d += 16)
      _mm512_storeu_ps(y + d, _mm512_fmadd_ps(av, _mm512_loadu_ps(x + d), _mm512_loadu_ps(y + d)));
    return;
  }
  for (int64_t d = 0; d < D; ++d) y[d] += a * x[d];
}

}  // namespace

namespace {

// The bias as contiguous bf16 (kept alive by ``keep``), or null where there is none.
const at::BFloat16* bias_bf16(const c10::optional<torch::Tensor>& b, int64_t N, torch::Tensor& keep) {
  if (!b.has_value() || !b->defined()) return nullptr;
  keep = b->to(at::kBFloat16).contiguous();
  TORCH_CHECK(keep.numel() == N, "bias has ", keep.numel(), " elements, expected ", N);
  return keep.data_ptr<at::BFloat16>();
}

// Per-row scales as fp32 (weight-only int8), kept alive by ``keep``.
const float* scales_f32(const torch::Tensor& scale, int64_t N, torch::Tensor& keep) {
  keep = scale.to(at::kFloat).contiguous();
  TORCH_CHECK(keep.numel() == N, "scale has ", keep.numel(), " elements, expected ", N);
  return keep.data_ptr<float>();
}

// y = x @ w^T (* scale) + b for 1..16 rows with VDPBF16PS: bf16 weights, or int8 ones (Q) widened on the fly.
template <bool Q>
torch::Tensor gemv_rows(const torch::Tensor& x_in, const torch::Tensor& w, const torch::Tensor* scale,
                        const c10::optional<torch::Tensor>& b) {
  TORCH_CHECK(x_in.scalar_type() == at::kBFloat16, "bf16 activations only");
  TORCH_CHECK(w.scalar_type() == (Q ? at::kChar : at::kBFloat16), Q ? "int8 weights" : "bf16 weights");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && x_in.device().is_cpu() && w.device().is_cpu(),
              "w must be a contiguous 2-d CPU tensor");
  const int64_t K = w.size(1), N = w.size(0);
  TORCH_CHECK(x_in.size(-1) == K, "x's last dimension (", x_in.size(-1), ") != w's in-features (", K, ")");
  auto x = x_in.reshape({-1, K}).contiguous();
  const int64_t M = x.size(0);
  TORCH_CHECK(M >= 1 && M <= 16, "1..16 rows (got ", M, ")");
  std::vector<int64_t> shape(x_in.sizes().begin(), x_in.sizes().end());
  shape.back() = N;
  auto out = torch::empty({M, N}, x.options());
  const uint16_t* X = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const char* W = static_cast<const char*>(w.data_ptr());
  const int64_t row_bytes = K * (Q ? 1 : 2);
  at::BFloat16* O = out.data_ptr<at::BFloat16>();
  torch::Tensor bias_keep, scale_keep;
  const at::BFloat16* B = bias_bf16(b, N, bias_keep);
  const float* S = Q ? scales_f32(*scale, N, scale_keep) : nullptr;
  // one int8 row: VPDPBUSD over the row quantized to 16 bits (block_vnni), or, for a row with an infinity or a
  // NaN, fp32 FMAs (block_i8) that carry them through
  std::vector<uint8_t> xhi, xlo;
  float sx = 1.0f;
  const bool vnni = Q && M == 1 && quantize_row16(X, K, xhi, xlo, sx);
  std::vector<float> xf(Q && M == 1 && !vnni ? K : 0);  // the one row in fp32 for block_i8
  for (size_t k = 0; k < xf.size(); ++k) xf[k] = static_cast<float>(x.data_ptr<at::BFloat16>()[k]);
  const int64_t nblocks = (N + R - 1) / R;
  // the prefetch's split of a block (see below): bytes per group of activation rows, per step of k
  const int64_t share = R * row_bytes / ((M + 3) / 4), steps = std::max<int64_t>(1, K / 32);
  const int64_t whole = (share + steps - 1) / steps, half = (share / 2 + steps - 1) / steps;
  at::parallel_for(0, nblocks, 8, [&](int64_t b0, int64_t b1) {
    float acc[R][4];
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t n0 = blk * R;
      const int rows = static_cast<int>(std::min<int64_t>(R, N - n0));
      const void* wrow[R];
      for (int r = 0; r < R; ++r) wrow[r] = W + (n0 + std::min(r, rows - 1)) * row_bytes;  // short tail: repeat
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int mb = static_cast<int>(std::min<int64_t>(4, M - m0));
        const uint16_t* xm = X + m0 * K;
        // the weight block two on (its rows are contiguous: one run of bytes), fetched while this one computes.
        // Each group of four activation rows fetches its share, and each of its block calls half of
        // that where it takes the block as two halves of four weight rows. The first group fetching all of it
        // issued more prefetches at once than the L2's miss queue holds, and the stream fell behind (5-12 %
        // slower at 8 to 16 rows on 1.5B-shaped matrices streamed from memory).
        const char* next = blk + 2 < b1 ? W + (n0 + 2 * R) * row_bytes : nullptr;
        const char* pf = next ? next + (m0 / 4) * share : nullptr;
        const char* pf2 = pf ? pf + share / 2 : nullptr;
        if (vnni) {
          int64_t dot[R];
          block_vnni(xhi.data(), xlo.data(), K, reinterpret_cast<const int8_t* const*>(wrow), dot, next);
          for (int r = 0; r < R; ++r) acc[r][0] = static_cast<float>(dot[r]) * sx;
        } else if (Q && M == 1) {
          float one[R];
          block_i8(xf.data(), K, reinterpret_cast<const int8_t* const*>(wrow), one, next);
          for (int r = 0; r < R; ++r) acc[r][0] = one[r];
        } else {
          switch (mb) {  // eight weight rows at once for one or two activation rows, four rows for more
            case 1: block<1, 8, Q>(xm, K, wrow, acc, pf, whole); break;
            case 2: block<2, 8, Q>(xm, K, wrow, acc, pf, whole); break;
            case 3:
              block<3, 4, Q>(xm, K, wrow, acc, pf, half);
              block<3, 4, Q>(xm, K, wrow + 4, acc + 4, pf2, half);
              break;
            default:
              block<4, 4, Q>(xm, K, wrow, acc, pf, half);
              block<4, 4, Q>(xm, K, wrow + 4, acc + 4, pf2, half);
              break;
          }
        }
        for (int r = 0; r < rows; ++r) {
          const float bias = B ? static_cast<float>(B[n0 + r]) : 0.0f;
          const float mul = Q ? S[n0 + r] : 1.0f;
          for (int m = 0; m < mb; ++m) O[(m0 + m) * N + n0 + r] = at::BFloat16(acc[r][m] * mul + bias);
        }
      }
    }
  });
  return out.view(shape);
}

}  // namespace

torch::Tensor linear_bf16(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& b) {
  return gemv_rows<false>(x, w, nullptr, b);
}

// Weight-only int8 for a decode step's single row: half the bytes of bf16 cross the memory bus.
torch::Tensor linear_int8(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale,
                          const c10::optional<torch::Tensor>& b) {
  return gemv_rows<true>(x, q, &scale, b);
}

// ---- AMX: a decode step's batch and small prefill chunks (2..512 rows) ------------------------------------
// With more than one activation row, VDPBF16PS needs a register per (row, weight row) pair and falls behind
// the memory; oneDNN's AMX kernels reach about half the bandwidth here because they repack the weights on
// each call. This one needs no repacking: it computes y^T = w @ x^T, so the weight is the left operand and
// its rows load straight into tiles (16 weight rows x 32 bf16 per tile, stride K), while x^T is packed once
// per call into the right operand's pair-interleaved (VNNI) layout. Each thread takes groups of 64 output
// features (four weight tiles, for up to 16 rows) or 32 (two): per 32-wide step of K, each x^T tile is
// loaded once per weight tile pair. With more than 32 rows, a group's weight rows are read from memory for
// the first pair of row tiles and from the cache for the others (a group of 32 rows of w is 56 KiB at
// K=896, 304 KiB at K=4864), so the weights still cross the memory bus once per call.

namespace {

struct TileConfig {
  uint8_t palette_id = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

inline void tiles_16x64() {  // all eight tiles 16 rows of 64 bytes: 16x32 bf16, 16x16 pairs, 16x16 fp32
  TileConfig c;
  for (int t = 0; t < 8; ++t) { c.rows[t] = 16; c.colsb[t] = 64; }
  _tile_loadconfig(&c);
}

}  // namespace

// Whether this process may use AMX tiles (Linux grants the tile state on request: ARCH_REQ_XCOMP_PERM).
bool amx_ready() {
  static const bool ok = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return ok;
}

namespace {

// QUANT: w holds int8 rows with one scale per row (weight-only int8): each 16x32 block is widened to bf16
// (exact for -127..127) in a per-thread buffer just before its tile load, and the sums are scaled per row.
template <bool QUANT>
torch::Tensor amx_linear(const torch::Tensor& x_in, const torch::Tensor& w, const torch::Tensor* scale,
                         const c10::optional<torch::Tensor>& b) {
  TORCH_CHECK(x_in.scalar_type() == at::kBFloat16, "bf16 activations only");
  TORCH_CHECK(w.scalar_type() == (QUANT ? at::kChar : at::kBFloat16), QUANT ? "int8 weights" : "bf16 weights");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && x_in.device().is_cpu() && w.device().is_cpu(),
              "w must be a contiguous 2-d CPU tensor");
  const int64_t K = w.size(1), N = w.size(0);
  TORCH_CHECK(x_in.size(-1) == K, "x's last dimension (", x_in.size(-1), ") != w's in-features (", K, ")");
  TORCH_CHECK(K % 32 == 0 && N % 16 == 0, "in-features must be a multiple of 32 and out-features of 16 (got ",
              K, ", ", N, ")");
  auto x = x_in.reshape({-1, K}).contiguous();
  const int64_t M = x.size(0);
  TORCH_CHECK(M >= 1 && M <= 512, "1..512 rows (got ", M, ")");
  TORCH_CHECK(amx_ready(), "this CPU or kernel does not grant AMX tiles");
  std::vector<int64_t> shape(x_in.sizes().begin(), x_in.sizes().end());
  shape.back() = N;
  const int64_t MB = (M + 15) / 16, KB = K / 32, NB = N / 16;
  // x^T as the right operand: per 16 rows and 32-wide step of K, a tile of [16 pairs along K][16 rows] u32
  std::vector<uint32_t> xp(MB * KB * 256, 0u);
  const uint32_t* X32 = reinterpret_cast<const uint32_t*>(x.data_ptr<at::BFloat16>());
  at::parallel_for(0, MB * KB, 64, [&](int64_t t0, int64_t t1) {  // one 16x16 block of pairs at a time
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t mt = t / KB, kb = t % KB;
      uint32_t* dst = xp.data() + t * 256;
      for (int64_t m = mt * 16; m < std::min(M, mt * 16 + 16); ++m)
        for (int64_t j = 0; j < 16; ++j) dst[j * 16 + m % 16] = X32[m * (K / 2) + kb * 16 + j];
    }
  });
  const uint32_t* XP = xp.data();
  auto out = torch::empty({M, N}, x.options());
  const char* W = static_cast<const char*>(w.data_ptr());
  torch::Tensor bias_keep, scale_keep;
  const float* S = QUANT ? scales_f32(*scale, N, scale_keep) : nullptr;
  const at::BFloat16* B = bias_bf16(b, N, bias_keep);
  at::BFloat16* O = out.data_ptr<at::BFloat16>();
  const int64_t stride = QUANT ? 64 : K * 2;  // a weight tile's row stride: staged int8, or w itself
  const __m512i column = _mm512_mullo_epi32(
      _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi32(16));
  // an accumulator tile [16 features][16 rows] fp32 -> out[row][features], bias added, rounded to bf16
  auto emit = [&](float (*cb)[16], int64_t nb, int64_t mb) {
    const int64_t rows = std::min<int64_t>(16, M - mb * 16);
    const __m512 bias = B ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
                                _mm256_loadu_si256(reinterpret_cast<const __m256i*>(B + nb * 16))), 16))
                          : _mm512_setzero_ps();
    const __m512 mul = QUANT ? _mm512_loadu_ps(S + nb * 16) : _mm512_set1_ps(1.0f);
    for (int64_t m = 0; m < rows; ++m) {
      const __m512 v = _mm512_fmadd_ps(_mm512_i32gather_ps(column, &cb[0][m], 4), mul, bias);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(O + (mb * 16 + m) * N + nb * 16),
                          (__m256i)_mm512_cvtneps_pbh(v));
    }
  };
  const int64_t G = MB == 1 ? 4 : 2;  // weight tiles (16 features each) per group
  // Software prefetch, PD steps of K (64 bytes of each weight row) ahead: a group's tiles read 32-64 rows
  // side by side, more streams than the hardware prefetchers follow. Measured over the 0.5B shape's
  // layer weights (~1 GB), 16 and 32 rows: 8.7 -> 10.7 and 8.6 -> 10.4 GB/s (PD 8: 10.6 and 9.4).
  constexpr int64_t PD = 4;
  at::parallel_for(0, (NB + G - 1) / G, 1, [&](int64_t g0, int64_t g1) {
    tiles_16x64();
    alignas(64) float cb[16][16];
    alignas(64) uint16_t stage[4][16 * 32];
    // weight tile (nb, kb): 16 rows of w from row nb*16, 32 columns from kb*32
    auto wt = [&](int64_t nb, int64_t kb) -> const void* {
      if constexpr (!QUANT) {
        return W + (nb * 16 * K + kb * 32) * 2;
      } else {
        uint16_t* dst = stage[nb & 3];
        const int8_t* src = reinterpret_cast<const int8_t*>(W) + nb * 16 * K + kb * 32;
        for (int r = 0; r < 16; ++r) _mm512_storeu_si512(dst + r * 32, (__m512i)load_w<true>(src + r * K, 0));
        return dst;
      }
    };
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t nb0 = g * G, nbs = std::min<int64_t>(G, NB - nb0);
      if (MB == 1 && nbs == 4) {  // tiles: 0-3 sums, 4 x^T, 5-7 weights
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
        for (int64_t kb = 0; kb < KB; ++kb) {
          if constexpr (!QUANT) {  // 64 weight rows stream side by side: fetch each row's line PD steps ahead
            if (kb + PD < KB) {
              const char* p = W + (nb0 * 16 * K + (kb + PD) * 32) * 2;
              for (int r = 0; r < 64; ++r) _mm_prefetch(p + r * K * 2, _MM_HINT_T0);
            }
          }
          _tile_loadd(4, XP + kb * 256, 64);
          _tile_loadd(5, wt(nb0, kb), stride);
          _tile_dpbf16ps(0, 5, 4);
          _tile_loadd(6, wt(nb0 + 1, kb), stride);
          _tile_dpbf16ps(1, 6, 4);
          _tile_loadd(7, wt(nb0 + 2, kb), stride);
          _tile_dpbf16ps(2, 7, 4);
          _tile_loadd(5, wt(nb0 + 3, kb), stride);
          _tile_dpbf16ps(3, 5, 4);
        }
        _tile_stored(0, cb, 64); emit(cb, nb0, 0);
        _tile_stored(1, cb, 64); emit(cb, nb0 + 1, 0);
        _tile_stored(2, cb, 64); emit(cb, nb0 + 2, 0);
        _tile_stored(3, cb, 64); emit(cb, nb0 + 3, 0);
      } else if (nbs == 2) {  // tiles: 0-3 sums (2 weight tiles x 2 row tiles), 4-5 x^T, 6-7 weights
        for (int64_t mb = 0; mb < MB; mb += 2) {  // the group's weights come from the cache after the first pair
          const uint32_t* x0 = XP + mb * KB * 256;
          if (mb + 1 < MB) {
            const uint32_t* x1 = x0 + KB * 256;
            _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
            for (int64_t kb = 0; kb < KB; ++kb) {
              if constexpr (!QUANT) {  // the first row-tile pair streams the group's 32 weight rows
                if (mb == 0 && kb + PD < KB) {
                  const char* p = W + (nb0 * 16 * K + (kb + PD) * 32) * 2;
                  for (int r = 0; r < 32; ++r) _mm_prefetch(p + r * K * 2, _MM_HINT_T0);
                }
              }
              _tile_loadd(4, x0 + kb * 256, 64);
              _tile_loadd(5, x1 + kb * 256, 64);
              _tile_loadd(6, wt(nb0, kb), stride);
              _tile_dpbf16ps(0, 6, 4);
              _tile_dpbf16ps(1, 6, 5);
              _tile_loadd(7, wt(nb0 + 1, kb), stride);
              _tile_dpbf16ps(2, 7, 4);
              _tile_dpbf16ps(3, 7, 5);
            }
            _tile_stored(0, cb, 64); emit(cb, nb0, mb);
            _tile_stored(1, cb, 64); emit(cb, nb0, mb + 1);
            _tile_stored(2, cb, 64); emit(cb, nb0 + 1, mb);
            _tile_stored(3, cb, 64); emit(cb, nb0 + 1, mb + 1);
          } else {  // an odd last row tile
            _tile_zero(0); _tile_zero(2);
            for (int64_t kb = 0; kb < KB; ++kb) {
              _tile_loadd(4, x0 + kb * 256, 64);
              _tile_loadd(6, wt(nb0, kb), stride);
              _tile_dpbf16ps(0, 6, 4);
              _tile_loadd(7, wt(nb0 + 1, kb), stride);
              _tile_dpbf16ps(2, 7, 4);
            }
            _tile_stored(0, cb, 64); emit(cb, nb0, mb);
            _tile_stored(2, cb, 64); emit(cb, nb0 + 1, mb);
          }
        }
      } else {  // the last, short group: one weight tile at a time
        for (int64_t j = 0; j < nbs; ++j) {
          for (int64_t mb = 0; mb < MB; ++mb) {
            const uint32_t* x0 = XP + mb * KB * 256;
            _tile_zero(0);
            for (int64_t kb = 0; kb < KB; ++kb) {
              _tile_loadd(6, wt(nb0 + j, kb), stride);
              _tile_loadd(4, x0 + kb * 256, 64);
              _tile_dpbf16ps(0, 6, 4);
            }
            _tile_stored(0, cb, 64); emit(cb, nb0 + j, mb);
          }
        }
      }
    }
    _tile_release();
  });
  return out.view(shape);
}

}  // namespace

torch::Tensor linear_amx(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& b) {
  return amx_linear<false>(x, w, nullptr, b);
}

// Weight-only int8 (inference_core.quantize's Int8Linear): y = (x @ q^T) * scale + b, q [N, K] int8.
torch::Tensor linear_int8_amx(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale,
                              const c10::optional<torch::Tensor>& b) {
  return amx_linear<true>(x, q, &scale, b);
}

// ---- fused elementwise steps of a layer (bf16 in and out, fp32 inside) ------------------------------------
// A decode step's matrix products are a few dozen calls; the elementwise work between them (RMSNorm, the
// rotary embedding, SiLU times the up projection) is a dozen small torch ops per layer, each a pass over
// memory plus dispatch. These do each in one pass and round where torch's bf16 ops round, so RMSNorm and
// the rotary embedding give torch's bits and SiLU differs only where its exp does (within a bf16 ulp).

namespace {

inline __m512 load_bf16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(
      reinterpret_cast<const __m256i*>(p))), 16));
}
inline __m512 round_bf16(__m512 v) {  // to bf16 and back (round to nearest even, as torch's conversions)
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
}
inline void store_bf16(uint16_t* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v));
}
inline void store_bf16_mask(uint16_t* p, __m512 v, __mmask16 k) {
  _mm256_mask_storeu_epi16(p, k, (__m256i)_mm512_cvtneps_pbh(v));
}

// A 16x16 block of 32-bit lanes transposed in registers: o[j] holds column j of the rows r[0..15].
inline void transpose16(__m512 r[16], __m512 o[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int j = 0; j < 4; ++j) {  // r[4i+j] now holds, in 128-bit lane L, column 4L+j of rows 4i..4i+3
    const __m512 u0 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x44), u1 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xEE);
    const __m512 v0 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x44);
    const __m512 v1 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xEE);
    o[j] = _mm512_shuffle_f32x4(u0, v0, 0x88);
    o[4 + j] = _mm512_shuffle_f32x4(u0, v0, 0xDD);
    o[8 + j] = _mm512_shuffle_f32x4(u1, v1, 0x88);
    o[12 + j] = _mm512_shuffle_f32x4(u1, v1, 0xDD);
  }
}

// e^x for fp32 lanes: 2^n * e^r with |r| <= ln2/2 and a degree-6 polynomial (relative error ~1e-7, far
// below bf16's); arguments are clamped to where fp32 neither overflows nor underflows past zero.
inline __m512 exp_ps(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.7f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

const uint16_t* bf16_ptr(const torch::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>()); }
uint16_t* bf16_mut(torch::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>()); }

}  // namespace

// transformers' Qwen2/Llama RMSNorm in bf16: w * bf16(x * rsqrt(mean(x^2) + eps)), over the last dimension.
torch::Tensor rms_norm_bf16(const torch::Tensor& x_in, const torch::Tensor& w, double eps) {
  TORCH_CHECK(x_in.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "bf16 tensors only");
  const int64_t H = x_in.size(-1);
  TORCH_CHECK(w.dim() == 1 && w.numel() == H, "weight of ", w.numel(), " for rows of ", H);
  auto x = x_in.contiguous();
  auto wc = w.contiguous();
  auto out = torch::empty_like(x);
  const int64_t rows = x.numel() / H;
  const uint16_t* X = bf16_ptr(x);
  const uint16_t* Wt = bf16_ptr(wc);
  uint16_t* O = bf16_mut(out);
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint16_t* xr = X + r * H;
      __m512 acc = _mm512_setzero_ps();
      for (int64_t i = 0; i < H; i += 16) {
        const __m512 v = load_bf16_mask(xr + i, tail_mask(H - i));
        acc = _mm512_fmadd_ps(v, v, acc);
      }
      const float inv = 1.0f / std::sqrt(_mm512_reduce_add_ps(acc) / static_cast<float>(H) + static_cast<float>(eps));
      const __m512 s = _mm512_set1_ps(inv);
      for (int64_t i = 0; i < H; i += 16) {
        const __mmask16 k = tail_mask(H - i);
        const __m512 v = round_bf16(_mm512_mul_ps(load_bf16_mask(xr + i, k), s));
        store_bf16_mask(O + r * H + i, _mm512_mul_ps(load_bf16_mask(Wt + i, k), v), k);
      }
    }
  });
  return out;
}

namespace {

// rows x n of bf16(bf16(silu(gate)) * up): gate row r at G + r * gs, up row r at U + r * us, out dense.
void silu_mul_rows(const uint16_t* G, int64_t gs, const uint16_t* U, int64_t us, uint16_t* O, int64_t rows,
                   int64_t n) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const int64_t per_row = (n + 15) / 16;
  at::parallel_for(0, rows * per_row, 1024, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r = b / per_row, i = (b % per_row) * 16;
      const __mmask16 k = tail_mask(n - i);
      const __m512 g = load_bf16_mask(G + r * gs + i, k);
      const __m512 silu = round_bf16(_mm512_div_ps(g, _mm512_add_ps(one, exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g)))));
      store_bf16_mask(O + r * n + i, _mm512_mul_ps(silu, load_bf16_mask(U + r * us + i, k)), k);
    }
  });
}

}  // namespace

// SwiGLU's middle: bf16(bf16(silu(gate)) * up), elementwise.
torch::Tensor silu_mul_bf16(const torch::Tensor& gate_in, const torch::Tensor& up_in) {
  TORCH_CHECK(gate_in.scalar_type() == at::kBFloat16 && up_in.scalar_type() == at::kBFloat16, "bf16 tensors only");
  TORCH_CHECK(gate_in.sizes() == up_in.sizes(), "gate and up differ in shape");
  auto gate = gate_in.contiguous(), up = up_in.contiguous();
  auto out = torch::empty_like(gate);
  silu_mul_rows(bf16_ptr(gate), 0, bf16_ptr(up), 0, bf16_mut(out), 1, gate.numel());
  return out;
}

// The same over a fused gate/up projection's rows [..., 2I], gate in the first half of each, up in the
// second: out [..., I].
torch::Tensor silu_mul_halves_bf16(const torch::Tensor& gu_in) {
  TORCH_CHECK(gu_in.scalar_type() == at::kBFloat16 && gu_in.dim() >= 1 && gu_in.size(-1) % 2 == 0,
              "bf16 [..., 2I] only");
  auto gu = gu_in.contiguous();
  const int64_t n = gu.size(-1) / 2, rows = n ? gu.numel() / (2 * n) : 0;
  auto sizes = gu.sizes().vec();
  sizes.back() = n;
  auto out = torch::empty(sizes, gu.options());
  const uint16_t* G = bf16_ptr(gu);
  silu_mul_rows(G, 2 * n, G + n, 2 * n, bf16_mut(out), rows, n);
  return out;
}

// Greedy sampling's pick: each row's index of its maximum, the first where it ties, and the first NaN where
// a row holds one (torch.argmax's choice). logits [M, V] bf16 -> [M] int64. Lane by lane over 16 columns
// at a time (a strictly greater value replaces, so each lane keeps its first maximum), then across lanes.
torch::Tensor argmax_bf16(const torch::Tensor& logits_in) {
  TORCH_CHECK(logits_in.scalar_type() == at::kBFloat16 && logits_in.dim() == 2 && logits_in.size(1) > 0,
              "bf16 logits [M, V] only");
  auto logits = logits_in.contiguous();
  const int64_t M = logits.size(0), V = logits.size(1);
  auto out = torch::empty({M}, logits.options().dtype(at::kLong));
  const uint16_t* L = bf16_ptr(logits);
  int64_t* O = out.data_ptr<int64_t>();
  at::parallel_for(0, M, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint16_t* row = L + r * V;
      __m512 best = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
      __m512i where = _mm512_set1_epi32(-1);
      __mmask16 nan = 0;
      __m512i col = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
      const __m512i step = _mm512_set1_epi32(16);
      for (int64_t i = 0; i < V; i += 16) {
        const __mmask16 k = tail_mask(V - i);
        const __m512 v = load_bf16_mask(row + i, k);
        nan |= _mm512_mask_cmp_ps_mask(k, v, v, _CMP_UNORD_Q);
        const __mmask16 gt = _mm512_mask_cmp_ps_mask(k, v, best, _CMP_GT_OQ) |
                             (_mm512_mask_cmp_ps_mask(k, v, best, _CMP_EQ_OQ) &
                              _mm512_cmpeq_epi32_mask(where, _mm512_set1_epi32(-1)));  // -inf rows: the first
        best = _mm512_mask_mov_ps(best, gt, v);
        where = _mm512_mask_mov_epi32(where, gt, col);
        col = _mm512_add_epi32(col, step);
      }
      if (nan) {
        int64_t i = 0;
        while (!std::isnan(static_cast<float>(c10::BFloat16(row[i], c10::BFloat16::from_bits())))) ++i;
        O[r] = i;
        continue;
      }
      const float m = _mm512_reduce_max_ps(best);
      const __mmask16 top = _mm512_cmp_ps_mask(best, _mm512_set1_ps(m), _CMP_EQ_OQ) &
                            _mm512_cmpneq_epi32_mask(where, _mm512_set1_epi32(-1));
      O[r] = _mm512_mask_reduce_min_epi32(top, where);
    }
  });
  return out;
}

// The rotary embedding in place on q [N, H, D] and k [N, K, D] with cos, sin [N, 1, D] (bf16), rounding as
// torch's x * cos + rotate_half(x) * sin does in bf16: each product, then the sum.
void rope_bf16_(torch::Tensor& q, torch::Tensor& k, const torch::Tensor& cos_in, const torch::Tensor& sin_in) {
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 &&
              cos_in.scalar_type() == at::kBFloat16 && sin_in.scalar_type() == at::kBFloat16, "bf16 tensors only");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && q.is_contiguous() && k.is_contiguous(), "contiguous q, k [N, heads, D]");
  const int64_t N = q.size(0), H = q.size(1), KH = k.size(1), D = q.size(2);
  TORCH_CHECK(k.size(0) == N && k.size(2) == D && D % 2 == 0, "q and k differ");
  auto cs = cos_in.reshape({-1, D}).contiguous(), sn = sin_in.reshape({-1, D}).contiguous();
  TORCH_CHECK(cs.size(0) == N && sn.size(0) == N, "cos and sin need one row per token");
  const int64_t half = D / 2;
  const uint16_t* C = bf16_ptr(cs);
  const uint16_t* S = bf16_ptr(sn);
  uint16_t* Q = bf16_mut(q);
  uint16_t* Kp = bf16_mut(k);
  TORCH_CHECK(D <= 1024, "head dim ", D, " above 1024");
  at::parallel_for(0, N * (H + KH), 64, [&](int64_t i0, int64_t i1) {
    alignas(64) uint16_t lo[512], hi[512];
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t t = i / (H + KH), h = i % (H + KH);
      uint16_t* x = h < H ? Q + (t * H + h) * D : Kp + (t * KH + (h - H)) * D;
      const uint16_t* c = C + t * D;
      const uint16_t* s = S + t * D;
      std::memcpy(lo, x, half * 2);
      std::memcpy(hi, x + half, half * 2);
      for (int64_t j = 0; j < half; j += 16) {  // first half: x1*c - x2*s; second: x2*c + x1*s
        const __mmask16 m = tail_mask(half - j);
        const __m512 x1 = load_bf16_mask(lo + j, m), x2 = load_bf16_mask(hi + j, m);
        const __m512 c1 = load_bf16_mask(c + j, m), c2 = load_bf16_mask(c + half + j, m);
        const __m512 s1 = load_bf16_mask(s + j, m), s2 = load_bf16_mask(s + half + j, m);
        const __m512 a = _mm512_add_ps(round_bf16(_mm512_mul_ps(x1, c1)),
                                       round_bf16(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), x2), s1)));
        const __m512 b = _mm512_add_ps(round_bf16(_mm512_mul_ps(x2, c2)), round_bf16(_mm512_mul_ps(x1, s2)));
        store_bf16_mask(x + j, a, m);
        store_bf16_mask(x + half + j, b, m);
      }
    }
  });
}

namespace {

// Scores of RG query heads against 16 keys whose bf16 pairs lie transposed in kt[p][16] (p: pair of dims):
// VDPBF16PS with each head's pair broadcast, so no horizontal sums; the products are exact, sums in fp32.
template <int RG>
inline void pair_scores(const uint32_t* kt, const uint32_t* q32, int64_t P, float* out, int64_t stride, float sc) {
  __m512 acc[RG];
  for (int r = 0; r < RG; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t p = 0; p < P; ++p) {
    const __m512bh k = (__m512bh)_mm512_load_si512(kt + p * 16);
    for (int r = 0; r < RG; ++r)
      acc[r] = _mm512_dpbf16_ps(acc[r], k, (__m512bh)_mm512_set1_epi32(static_cast<int>(q32[r * P + p])));
  }
  for (int r = 0; r < RG; ++r) _mm512_storeu_ps(out + r * stride, _mm512_mul_ps(acc[r], _mm512_set1_ps(sc)));
}

// The weighted sum of the values for RG query heads, DV x 16 dims, in registers: each value row is read
// and widened once for the RG heads; acc [RG][DV * 16] receives the sums.
template <int RG, int DV>
inline void value_sums(const uint16_t* VP, const int64_t* slot, int64_t KH, int64_t kh, int64_t n,
                       const float* score, int64_t npad, float* acc) {
  __m512 a[RG][DV];
  for (int r = 0; r < RG; ++r)
    for (int d = 0; d < DV; ++d) a[r][d] = _mm512_setzero_ps();
  for (int64_t t = 0; t < n; ++t) {
    const uint16_t* v = VP + (slot[t] * KH + kh) * DV * 16;
    __m512 vv[DV];
    for (int d = 0; d < DV; ++d) vv[d] = load_bf16(v + d * 16);
    for (int r = 0; r < RG; ++r) {
      const __m512 w = _mm512_set1_ps(score[r * npad + t]);
      for (int d = 0; d < DV; ++d) a[r][d] = _mm512_fmadd_ps(w, vv[d], a[r][d]);
    }
  }
  for (int r = 0; r < RG; ++r)
    for (int d = 0; d < DV; ++d) _mm512_storeu_ps(acc + r * DV * 16 + d * 16, a[r][d]);
}

// paged_decode_attention for head dims that are multiples of 32 (64 and 128 in every supported model).
// Per sequence and kv head: keys 16 at a time are gathered through their slots and transposed into pairs,
// so each query head's 16 scores are one run of VDPBF16PS (the scalar path reduces every dot product);
// the softmax is vectorized (its exp as exp_ps) and normalized once at the end; the values are summed in
// fp32, each read once for all the query heads that share it.
void paged_attention_pairs(const uint16_t* Q, const uint16_t* KP, const uint16_t* VP, const int64_t* SL,
                           const int64_t* LN, at::BFloat16* O, int64_t B, int64_t H, int64_t KH, int64_t D,
                           int64_t W, float sc) {
  const int64_t rep = H / KH, P = D / 2;
  at::parallel_for(0, B * KH, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> score, acc(rep * D);
    alignas(64) uint32_t kt[128 * 16];  // up to D = 256: 128 pairs x 16 keys
    alignas(64) float vrow[256];
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / KH, kh = i % KH, n = LN[b], npad = (n + 15) / 16 * 16;
      const int64_t* slot = SL + b * W;
      const uint32_t* q32 = reinterpret_cast<const uint32_t*>(Q + (b * H + kh * rep) * D);  // rep rows of P pairs
      score.resize(rep * npad);
      for (int64_t t0 = 0; t0 < n; t0 += 16) {
        const int64_t cnt = std::min<int64_t>(16, n - t0);
        for (int64_t c = 0; c < P; c += 16) {  // 16 pairs of dims at a time: a 16x16 block of u32
          __m512 rows[16], cols[16];
          for (int j = 0; j < 16; ++j)
            rows[j] = j < cnt ? _mm512_loadu_ps(reinterpret_cast<const float*>(KP + (slot[t0 + j] * KH + kh) * D) + c)
                              : _mm512_setzero_ps();
          transpose16(rows, cols);
          for (int j = 0; j < 16; ++j) _mm512_store_ps(reinterpret_cast<float*>(kt + (c + j) * 16), cols[j]);
        }
        float* out = score.data() + t0;
        int64_t r = 0;
        for (; r + 4 <= rep; r += 4) pair_scores<4>(kt, q32 + r * P, P, out + r * npad, npad, sc);
        for (; r + 2 <= rep; r += 2) pair_scores<2>(kt, q32 + r * P, P, out + r * npad, npad, sc);
        for (; r < rep; ++r) pair_scores<1>(kt, q32 + r * P, P, out + r * npad, npad, sc);
      }
      float inv[64];  // 1 / the softmax's sum per query head (rep <= 64)
      for (int64_t r = 0; r < rep; ++r) {
        float* sr = score.data() + r * npad;
        __m512 mx = _mm512_set1_ps(-INFINITY);
        for (int64_t t = 0; t < n; t += 16)
          mx = _mm512_mask_max_ps(mx, tail_mask(n - t), mx, _mm512_loadu_ps(sr + t));
        const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
        __m512 sum = _mm512_setzero_ps();
        for (int64_t t = 0; t < n; t += 16) {
          const __m512 e = _mm512_maskz_mov_ps(tail_mask(n - t), exp_ps(_mm512_sub_ps(_mm512_loadu_ps(sr + t), m)));
          _mm512_storeu_ps(sr + t, e);
          sum = _mm512_add_ps(sum, e);
        }
        inv[r] = 1.0f / _mm512_reduce_add_ps(sum);
      }
      int64_t r0 = 0;  // the weighted sum in registers for head dims 64 and 128, groups of heads at a time
      if (D == 64) {
        for (; r0 + 4 <= rep; r0 += 4) value_sums<4, 4>(VP, slot, KH, kh, n, score.data() + r0 * npad, npad, acc.data() + r0 * D);
        for (; r0 + 2 <= rep; r0 += 2) value_sums<2, 4>(VP, slot, KH, kh, n, score.data() + r0 * npad, npad, acc.data() + r0 * D);
        for (; r0 < rep; ++r0) value_sums<1, 4>(VP, slot, KH, kh, n, score.data() + r0 * npad, npad, acc.data() + r0 * D);
      } else if (D == 128) {
        for (; r0 + 2 <= rep; r0 += 2) value_sums<2, 8>(VP, slot, KH, kh, n, score.data() + r0 * npad, npad, acc.data() + r0 * D);
        for (; r0 < rep; ++r0) value_sums<1, 8>(VP, slot, KH, kh, n, score.data() + r0 * npad, npad, acc.data() + r0 * D);
      }
      std::fill(acc.begin() + r0 * D, acc.end(), 0.0f);
      for (int64_t t = 0; t < n && r0 < rep; ++t) {  // other head dims: each value read once, in fp32
        const uint16_t* v = VP + (slot[t] * KH + kh) * D;
        for (int64_t d = 0; d < D; d += 16) _mm512_store_ps(vrow + d, load_bf16(v + d));
        for (int64_t r = r0; r < rep; ++r) {
          const __m512 w = _mm512_set1_ps(score[r * npad + t]);
          float* a = acc.data() + r * D;
          for (int64_t d = 0; d < D; d += 16)
            _mm512_storeu_ps(a + d, _mm512_fmadd_ps(w, _mm512_load_ps(vrow + d), _mm512_loadu_ps(a + d)));
        }
      }
      for (int64_t r = 0; r < rep; ++r) {
        const __m512 s = _mm512_set1_ps(inv[r]);
        uint16_t* o = reinterpret_cast<uint16_t*>(O + (b * H + kh * rep + r) * D);
        for (int64_t d = 0; d < D; d += 16) store_bf16(o + d, _mm512_mul_ps(_mm512_loadu_ps(acc.data() + r * D + d), s));
      }
    }
  });
}

}  // namespace

// Decode attention through the block tables: one query token per sequence attends to its cached keys and
// values where they lie in the paged pool, with no copy of a sequence's cache (the library path gathers
// every sequence's keys and values into a padded [B, T, K, D] tensor per layer per step).
// q [B, H, D] bf16; k_pool, v_pool [S, K, D] bf16 (S slots); slots [B, W] int64 (each sequence's slots in
// order, padded); lens [B] int64 (keys per sequence, <= W). Grouped-query attention: head h reads kv head
// h / (H / K). Scores and the weighted sum in fp32; softmax with the max subtracted; out [B, H, D] bf16.
torch::Tensor paged_decode_attention(const torch::Tensor& q_in, const torch::Tensor& k_pool,
                                     const torch::Tensor& v_pool, const torch::Tensor& slots_in,
                                     const torch::Tensor& lens_in, double scale) {
  TORCH_CHECK(q_in.scalar_type() == at::kBFloat16 && k_pool.scalar_type() == at::kBFloat16 &&
              v_pool.scalar_type() == at::kBFloat16, "bf16 tensors only");
  TORCH_CHECK(q_in.dim() == 3 && k_pool.dim() == 3 && v_pool.dim() == 3, "q [B, H, D], pools [S, K, D]");
  TORCH_CHECK(k_pool.is_contiguous() && v_pool.is_contiguous() && k_pool.sizes() == v_pool.sizes(),
              "contiguous key and value pools of one shape");
  auto q = q_in.contiguous();
  auto slots = slots_in.to(at::kLong).contiguous();
  auto lens = lens_in.to(at::kLong).contiguous();
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), S = k_pool.size(0), KH = k_pool.size(1);
  TORCH_CHECK(k_pool.size(2) == D, "head dims differ: q ", D, ", pool ", k_pool.size(2));
  TORCH_CHECK(KH >= 1 && H % KH == 0, "query heads (", H, ") not a multiple of kv heads (", KH, ")");
  TORCH_CHECK(slots.dim() == 2 && slots.size(0) == B && lens.numel() == B, "slots [B, W] and lens [B]");
  const int64_t W = slots.size(1), rep = H / KH;
  const int64_t* SL = slots.data_ptr<int64_t>();
  const int64_t* LN = lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(LN[b] >= 1 && LN[b] <= W, "sequence ", b, " has ", LN[b], " keys; slots hold ", W);
    for (int64_t t = 0; t < LN[b]; ++t)
      TORCH_CHECK(SL[b * W + t] >= 0 && SL[b * W + t] < S, "slot ", SL[b * W + t], " outside the pool of ", S);
  }
  auto out = torch::empty({B, H, D}, q.options());
  const uint16_t* Q = reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>());
  const uint16_t* KP = reinterpret_cast<const uint16_t*>(k_pool.data_ptr<at::BFloat16>());
  const uint16_t* VP = reinterpret_cast<const uint16_t*>(v_pool.data_ptr<at::BFloat16>());
  at::BFloat16* O = out.data_ptr<at::BFloat16>();
  const float sc = static_cast<float>(scale);
  if (D % 32 == 0 && D <= 256 && rep <= 64) {
    paged_attention_pairs(Q, KP, VP, SL, LN, O, B, H, KH, D, W, sc);
    return out;
  }
  const bool vec = D % 16 == 0;  // head dims of 64 and 128: AVX512 throughout; others: the scalar loops
  at::parallel_for(0, B * KH, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> qf(rep * D), row(D), acc(rep * D), score;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / KH, kh = i % KH, n = LN[b];
      for (int64_t r = 0; r < rep; ++r) to_f32(Q + (b * H + kh * rep + r) * D, qf.data() + r * D, D, sc, vec);
      score.resize(rep * n);
      for (int64_t t = 0; t < n; ++t) {  // scores: each key read once for all the query heads that share it
        to_f32(KP + (SL[b * W + t] * KH + kh) * D, row.data(), D, 1.0f, vec);
        for (int64_t r = 0; r < rep; ++r) score[r * n + t] = dot(qf.data() + r * D, row.data(), D, vec);
      }
      for (int64_t r = 0; r < rep; ++r) {
        float* sr = score.data() + r * n;
        float mx = sr[0];
        for (int64_t t = 1; t < n; ++t) mx = std::max(mx, sr[t]);
        float sum = 0.0f;
        for (int64_t t = 0; t < n; ++t) { sr[t] = std::exp(sr[t] - mx); sum += sr[t]; }
        const float inv = 1.0f / sum;
        for (int64_t t = 0; t < n; ++t) sr[t] *= inv;
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t t = 0; t < n; ++t) {  // the weighted sum: each value read once
        to_f32(VP + (SL[b * W + t] * KH + kh) * D, row.data(), D, 1.0f, vec);
        for (int64_t r = 0; r < rep; ++r) axpy(score[r * n + t], row.data(), acc.data() + r * D, D, vec);
      }
      for (int64_t r = 0; r < rep; ++r)
        for (int64_t d = 0; d < D; ++d) O[(b * H + kh * rep + r) * D + d] = at::BFloat16(acc[r * D + d]);
    }
  });
  return out;
}

// ---- packed bf16 weights: every row count on CPUs without AMX ----------------------------------------------
// linear_bf16 sums each output along K in one register per (activation row, weight row) pair and reduces it
// at the end of a block: with 16 activation rows it holds four rows' sums at a time, reads each weight block
// four times from L1, and ran at 55-61 % of the CPU's VDPBF16PS peak on the 1.5B shape's matrices. Packed
// once at load, per 16 output features, with each pair of k side by side ([N/16][K/2][16][2], VNNI order), a
// weight vector holds 16 output features' pair at one k: the classic GEMM micro-kernel, 8 activation rows by
// 3 blocks of 16 features in 24 accumulators, each activation pair broadcast, no horizontal reduction
// (bench/packed_probe.py measured it 1.19-1.41x linear_bf16 at 16 rows). The same kernel serves one row
// (the weights read once, in three sequential streams) and prefill (each 48-feature tile's weights stay in
// the L2 while every group of 8 rows passes over them). A block of 16 rows packs in place: the matrix keeps
// its bytes, and the layers fused over adjacent matrices still view theirs.

namespace {

template <int MR, int NB>
void packed_tile(const uint16_t* x, int64_t K, const uint16_t* wp, int64_t kstride, const uint16_t* bias,
                 uint16_t* out, int64_t ldo, const char* pf, int64_t pf_block) {
  __m512 acc[MR][NB];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NB; ++j) acc[m][j] = _mm512_setzero_ps();
  const int32_t* x32 = reinterpret_cast<const int32_t*>(x);
  const int64_t pairs = K / 2;
  for (int64_t kp = 0; kp < pairs; ++kp) {
    if (pf != nullptr && (kp & 1) == 0)  // the next tile, fetched while this one computes (two lines a block)
      for (int j = 0; j < NB; ++j) {
        _mm_prefetch(pf + j * pf_block + kp * 64, _MM_HINT_T1);
        _mm_prefetch(pf + j * pf_block + kp * 64 + 64, _MM_HINT_T1);
      }
    __m512bh w[NB];
    for (int j = 0; j < NB; ++j) w[j] = (__m512bh)_mm512_loadu_si512(wp + j * kstride + kp * 32);
    for (int m = 0; m < MR; ++m) {
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(x32[m * pairs + kp]);
      for (int j = 0; j < NB; ++j) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], xb, w[j]);
    }
  }
  for (int j = 0; j < NB; ++j) {
    const __m512 bv = bias != nullptr ? load_bf16(bias + j * 16) : _mm512_setzero_ps();
    for (int m = 0; m < MR; ++m) store_bf16(out + m * ldo + j * 16, _mm512_add_ps(acc[m][j], bv));
  }
}

using PackedTile = void (*)(const uint16_t*, int64_t, const uint16_t*, int64_t, const uint16_t*, uint16_t*, int64_t,
                            const char*, int64_t);
template <int MR>
constexpr PackedTile tile_for(int nb) {
  return nb == 3 ? &packed_tile<MR, 3> : nb == 2 ? &packed_tile<MR, 2> : &packed_tile<MR, 1>;
}
PackedTile packed_kernel(int mr, int nb) {
  switch (mr) {
    case 1: return tile_for<1>(nb);
    case 2: return tile_for<2>(nb);
    case 3: return tile_for<3>(nb);
    case 4: return tile_for<4>(nb);
    case 5: return tile_for<5>(nb);
    case 6: return tile_for<6>(nb);
    case 7: return tile_for<7>(nb);
    default: return tile_for<8>(nb);
  }
}

void check_packed(const torch::Tensor& wp) {
  TORCH_CHECK(wp.scalar_type() == at::kBFloat16 && wp.dim() == 4 && wp.size(2) == 16 && wp.size(3) == 2 &&
                  wp.is_contiguous() && wp.device().is_cpu(),
              "packed weights: a contiguous bf16 CPU tensor [N/16, K/2, 16, 2] (pack_bf16_)");
}

}  // namespace

// Pack w [N, K] (bf16, contiguous, N % 16 == 0, K even) in place into [N/16][K/2][16][2]; returns that view.
torch::Tensor pack_bf16_(torch::Tensor w) {
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 && w.dim() == 2 && w.is_contiguous() && w.device().is_cpu(),
              "pack_bf16_: a contiguous bf16 [N, K] CPU matrix");
  const int64_t N = w.size(0), K = w.size(1), pairs = K / 2;
  TORCH_CHECK(N % 16 == 0 && K % 2 == 0, "pack_bf16_: out-features a multiple of 16 and even in-features, got ",
              N, " x ", K);
  uint32_t* W = reinterpret_cast<uint32_t*>(w.data_ptr<at::BFloat16>());
  at::parallel_for(0, N / 16, 1, [&](int64_t b0, int64_t b1) {
    std::vector<uint32_t> rows(16 * pairs);
    for (int64_t blk = b0; blk < b1; ++blk) {
      uint32_t* base = W + blk * 16 * pairs;
      std::memcpy(rows.data(), base, rows.size() * sizeof(uint32_t));
      for (int64_t kp0 = 0; kp0 < pairs; kp0 += 16) {  // 16 rows by 16 pairs, transposed in registers
        const __mmask16 k = tail_mask(pairs - kp0);
        __m512 r[16], o[16];
        for (int c = 0; c < 16; ++c) r[c] = _mm512_maskz_loadu_ps(k, rows.data() + c * pairs + kp0);
        transpose16(r, o);
        for (int64_t i = 0; i < std::min<int64_t>(16, pairs - kp0); ++i)
          _mm512_storeu_ps(base + (kp0 + i) * 16, o[i]);
      }
    }
  });
  return w.view({N / 16, pairs, 16, 2});
}

// The [N, K] matrix of packed weights (a new tensor): for the paths the packed kernel does not take.
torch::Tensor unpack_bf16(const torch::Tensor& wp) {
  check_packed(wp);
  const int64_t N = wp.size(0) * 16, pairs = wp.size(1);
  auto out = torch::empty({N, pairs * 2}, wp.options());
  const uint32_t* P = reinterpret_cast<const uint32_t*>(wp.data_ptr<at::BFloat16>());
  uint32_t* O = reinterpret_cast<uint32_t*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(0, N / 16, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk)
      for (int64_t kp0 = 0; kp0 < pairs; kp0 += 16) {
        const int64_t n = std::min<int64_t>(16, pairs - kp0);
        __m512 r[16], o[16];
        for (int64_t i = 0; i < 16; ++i)
          r[i] = i < n ? _mm512_loadu_ps(P + (blk * pairs + kp0 + i) * 16) : _mm512_setzero_ps();
        transpose16(r, o);
        for (int c = 0; c < 16; ++c) _mm512_mask_storeu_ps(O + (blk * 16 + c) * pairs + kp0, tail_mask(n), o[c]);
      }
  });
  return out;
}

// The rows ``ids`` of a packed matrix, [n, K] (an embedding table tied to a packed output head): row t is
// column t % 16 of block t / 16, one pair of k every 16 pairs.
torch::Tensor embedding_packed(const torch::Tensor& ids_in, const torch::Tensor& wp) {
  check_packed(wp);
  TORCH_CHECK(ids_in.scalar_type() == at::kLong && ids_in.device().is_cpu(), "int64 CPU token ids");
  const auto ids = ids_in.contiguous();
  const int64_t n = ids.numel(), rows = wp.size(0) * 16, pairs = wp.size(1);
  std::vector<int64_t> shape(ids.sizes().begin(), ids.sizes().end());
  shape.push_back(pairs * 2);
  auto out = torch::empty({n, pairs * 2}, wp.options());
  const int64_t* I = ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(I[i] >= 0 && I[i] < rows, "token id ", I[i], " is out of the table's ", rows, " rows");
  const uint32_t* P = reinterpret_cast<const uint32_t*>(wp.data_ptr<at::BFloat16>());
  uint32_t* O = reinterpret_cast<uint32_t*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(0, n, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const uint32_t* col = P + (I[i] / 16) * pairs * 16 + I[i] % 16;
      for (int64_t kp = 0; kp < pairs; ++kp) O[i * pairs + kp] = col[kp * 16];
    }
  });
  return out.view(shape);
}

// y = x @ w^T + b for any number of rows over packed weights (pack_bf16_): fp32 sums, rounded once to bf16
// after the bias is added (as linear_bf16).
torch::Tensor linear_packed(const torch::Tensor& x_in, const torch::Tensor& wp, const c10::optional<torch::Tensor>& b) {
  check_packed(wp);
  TORCH_CHECK(x_in.scalar_type() == at::kBFloat16 && x_in.device().is_cpu(), "bf16 CPU activations only");
  const int64_t nt = wp.size(0), N = nt * 16, K = wp.size(1) * 2;
  TORCH_CHECK(x_in.size(-1) == K, "x's last dimension (", x_in.size(-1), ") != the packed in-features (", K, ")");
  auto x = x_in.reshape({-1, K}).contiguous();
  const int64_t M = x.size(0);
  std::vector<int64_t> shape(x_in.sizes().begin(), x_in.sizes().end());
  shape.back() = N;
  auto out = torch::empty({M, N}, x.options());
  if (M == 0) return out.view(shape);
  torch::Tensor bias_keep;
  const uint16_t* B = reinterpret_cast<const uint16_t*>(bias_bf16(b, N, bias_keep));
  const uint16_t* X = bf16_ptr(x);
  const uint16_t* W = bf16_ptr(wp);
  uint16_t* O = bf16_mut(out);
  constexpr int64_t NB = 3, MR = 8;
  const int64_t kstride = K * 16, tiles = (nt + NB - 1) / NB;
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t j0 = t * NB;
      const int nb = static_cast<int>(std::min<int64_t>(NB, nt - j0));
      const char* next = t + 1 < t1 ? reinterpret_cast<const char*>(W + (j0 + NB) * kstride) : nullptr;
      const int next_nb = static_cast<int>(std::min<int64_t>(NB, nt - j0 - NB));
      for (int64_t m0 = 0; m0 < M; m0 += MR) {
        const int mr = static_cast<int>(std::min<int64_t>(MR, M - m0));
        // the first pass over the tile fetches the next one: as many blocks as it has (no read past the end)
        const char* pf = m0 == 0 && next != nullptr && next_nb == nb ? next : nullptr;
        packed_kernel(mr, nb)(X + m0 * K, K, W + j0 * kstride, kstride, B ? B + j0 * 16 : nullptr, O + m0 * N + j0 * 16,
                              N, pf, kstride * 2);
      }
    }
  });
  return out.view(shape);
}

namespace {

// One linear layer of a decode plan: bf16 weights (no scale), or weight-only int8 (with its row scales).
torch::Tensor plan_linear(const torch::Tensor& x, const std::vector<c10::optional<torch::Tensor>>& l, size_t at) {
  const auto& w = l.at(at);
  const auto& scale = l.at(at + 1);
  const auto& bias = l.at(at + 2);
  TORCH_CHECK(w.has_value(), "decode plan: a linear layer without weights");
  if (w->dim() == 4) return linear_packed(x, *w, bias);  // bf16 packed at load (pack_bf16_)
  if (scale.has_value()) return gemv_rows<true>(x, *w, &*scale, bias);
  return gemv_rows<false>(x, *w, nullptr, bias);
}

}  // namespace

// A decode step's decoder layers (Qwen2/Llama: RMSNorm, q/k/v, RoPE, paged attention, o, RMSNorm, gate/up,
// SiLU * up, down, with both residuals) in one call: the same kernels, in the same order and with the same
// roundings as the layers' Python forward takes for a batch of decodes, without a Python frame and a dozen
// dispatches per layer. x [N, hidden] bf16, one token per sequence; cos, sin [N, 1, D]. Each entry of
// ``layers`` is [ln1, qkv w, qkv scale, qkv bias, o w, o scale, o bias, ln2, gate/up w, gate/up scale,
// gate/up bias, down w, down scale, down bias, k pool, v pool] (a scale only for int8 weights, biases where
// the checkpoint has them). Returns the hidden states after the last layer.
torch::Tensor decode_layers(torch::Tensor x, const torch::Tensor& cos, const torch::Tensor& sin,
                            const std::vector<std::vector<c10::optional<torch::Tensor>>>& layers,
                            const torch::Tensor& slot_mapping, const torch::Tensor& decode_slots,
                            const torch::Tensor& decode_lens, double eps, double scale, int64_t heads,
                            int64_t kv_heads, int64_t head_dim) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "x [N, hidden] bf16");
  const int64_t n = x.size(0), qw = heads * head_dim, kw = kv_heads * head_dim;
  for (const auto& l : layers) {
    TORCH_CHECK(l.size() == 16, "decode plan: 16 entries per layer, got ", l.size());
    const auto h = rms_norm_bf16(x, *l[0], eps);
    const auto qkv = plan_linear(h, l, 1);
    auto q = qkv.slice(1, 0, qw).contiguous().view({n, heads, head_dim});
    auto k = qkv.slice(1, qw, qw + kw).contiguous().view({n, kv_heads, head_dim});
    const auto v = qkv.slice(1, qw + kw).view({n, kv_heads, head_dim});
    rope_bf16_(q, k, cos, sin);
    auto k_pool = *l[14];
    auto v_pool = *l[15];
    k_pool.index_copy_(0, slot_mapping, k);
    v_pool.index_copy_(0, slot_mapping, v);
    const auto attn = paged_decode_attention(q, k_pool, v_pool, decode_slots, decode_lens, scale);
    x = at::add(x, plan_linear(attn.reshape({n, qw}), l, 4));
    const auto h2 = rms_norm_bf16(x, *l[7], eps);
    const auto mid = silu_mul_halves_bf16(plan_linear(h2, l, 8));
    x = at::add(x, plan_linear(mid, l, 11));
  }
  return x;
}

// Weight-only int8 of a bf16 matrix, row by row, as inference_core.model.quantize._quantize_rows computes it in
// torch (the same bits): s = fp16(max(amax(|row|) / 127, 1e-6)), q = clamp(round_half_even(row / float(s)),
// -127, 127). One pass over the weights per row pair (max, then scale), all cores: the load-time quantization
// of a 0.5B model took ~1.8 s in torch's fp32 temporaries. Returns (q int8 [rows, cols], scale fp16 [rows]).
std::vector<torch::Tensor> quantize_rows_int8(const torch::Tensor& w_in) {
  TORCH_CHECK(w_in.scalar_type() == at::kBFloat16 && w_in.dim() == 2 && w_in.device().is_cpu(),
              "a bf16 [rows, cols] CPU matrix");
  auto w = w_in.contiguous();
  const int64_t R = w.size(0), C = w.size(1);
  auto q = torch::empty({R, C}, w.options().dtype(at::kChar));
  auto scale = torch::empty({R}, w.options().dtype(at::kHalf));
  const uint16_t* W = bf16_ptr(w);
  int8_t* Q = q.data_ptr<int8_t>();
  at::Half* S = scale.data_ptr<at::Half>();
  at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
    const __m512 lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
    for (int64_t r = r0; r < r1; ++r) {
      const uint16_t* row = W + r * C;
      __m512 mx = _mm512_setzero_ps();
      for (int64_t i = 0; i < C; i += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(load_bf16_mask(row + i, tail_mask(C - i))));
      float s = _mm512_reduce_max_ps(mx) / 127.0f;
      if (s < 1e-6f) s = 1e-6f;
      const at::Half sh(s);  // round to nearest even, as torch's .half()
      S[r] = sh;
      const __m512 sv = _mm512_set1_ps(static_cast<float>(sh));
      for (int64_t i = 0; i < C; i += 16) {
        const __mmask16 k = tail_mask(C - i);
        __m512 v = _mm512_roundscale_ps(_mm512_div_ps(load_bf16_mask(row + i, k), sv),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
        _mm512_mask_cvtsepi32_storeu_epi8(Q + r * C + i, k, _mm512_cvtps_epi32(v));
      }
    }
  });
  return {q, scale};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear_bf16", &linear_bf16, "x @ w.T + b in bf16 for 1..16 rows (AVX512-BF16)");
  m.def("linear_amx", &linear_amx, "x @ w.T + b in bf16 for 1..512 rows (AMX tiles, weights read in place)");
  m.def("linear_int8", &linear_int8, "x @ q.T * scale + b: int8 weights, bf16 x, 1..16 rows (AVX512-BF16)");
  m.def("linear_int8_amx", &linear_int8_amx, "x @ q.T * scale + b: int8 weights, bf16 x, 1..512 rows (AMX)");
  m.def("amx_ready", &amx_ready, "whether this process may use AMX tiles");
  m.def("rms_norm_bf16", &rms_norm_bf16, "RMSNorm as transformers' Qwen2/Llama computes it in bf16");
  m.def("silu_mul_bf16", &silu_mul_bf16, "silu(gate) * up in bf16");
  m.def("argmax_bf16", &argmax_bf16, "each row's first index of its maximum (greedy sampling), bf16");
  m.def("silu_mul_halves_bf16", &silu_mul_halves_bf16, "silu(gate) * up in bf16 over rows [gate | up]");
  m.def("rope_bf16_", &rope_bf16_, "the rotary embedding in place on q and k (bf16)");
  m.def("paged_decode_attention", &paged_decode_attention,
        "one query per sequence over its keys and values in the paged pool, read through its slots (bf16)");
  m.def("quantize_rows_int8", &quantize_rows_int8, "weight-only int8 rows and fp16 scales of a bf16 matrix");
  m.def("pack_bf16_", &pack_bf16_, "pack a bf16 [N, K] matrix in place for linear_packed; returns its 4-d view");
  m.def("unpack_bf16", &unpack_bf16, "the [N, K] matrix of packed weights (a copy)");
  m.def("embedding_packed", &embedding_packed, "rows of a packed matrix by index (a tied embedding table)");
  m.def("linear_packed", &linear_packed, "x @ w.T + b in bf16 for any rows, over packed weights (AVX512-BF16)");
  m.def("decode_layers", &decode_layers, "a decode step's decoder layers in one call (bf16 or int8 weights)");
}
