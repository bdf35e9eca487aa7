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
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int R = 8;  // weight rows per block

// MB activation rows by RB weight rows: RB*MB accumulators (<= 16 of the 32 vector registers).
template <int MB, int RB>
inline void block(const uint16_t* x, int64_t K, const uint16_t* const* wrow, float out[R][4]) {
  __m512 acc[RB][MB];
  for (int r = 0; r < RB; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512bh xv[MB];
    for (int m = 0; m < MB; ++m) xv[m] = (__m512bh)_mm512_loadu_si512(x + m * K + k);
    for (int r = 0; r < RB; ++r) {
      __m512bh wv = (__m512bh)_mm512_loadu_si512(wrow[r] + k);
      for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], wv, xv[m]);
    }
  }
  if (k < K) {
    const __mmask32 mask = (__mmask32)((1ull << (K - k)) - 1);
    __m512bh xv[MB];
    for (int m = 0; m < MB; ++m) xv[m] = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + m * K + k);
    for (int r = 0; r < RB; ++r) {
      __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(mask, wrow[r] + k);
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

torch::Tensor linear_bf16(const torch::Tensor& x_in, const torch::Tensor& w, const c10::optional<torch::Tensor>& b) {
  TORCH_CHECK(x_in.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "bf16 tensors only");
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
  const uint16_t* W = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  at::BFloat16* O = out.data_ptr<at::BFloat16>();
  torch::Tensor bc;
  const at::BFloat16* B = nullptr;
  if (b.has_value() && b->defined()) {
    bc = b->to(at::kBFloat16).contiguous();
    TORCH_CHECK(bc.numel() == N, "bias has ", bc.numel(), " elements, expected ", N);
    B = bc.data_ptr<at::BFloat16>();
  }
  const int64_t nblocks = (N + R - 1) / R;
  at::parallel_for(0, nblocks, 8, [&](int64_t b0, int64_t b1) {
    float acc[R][4];
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t n0 = blk * R;
      const int rows = static_cast<int>(std::min<int64_t>(R, N - n0));
      const uint16_t* wrow[R];
      for (int r = 0; r < R; ++r) wrow[r] = W + (n0 + std::min(r, rows - 1)) * K;  // short tail: repeat a row
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int mb = static_cast<int>(std::min<int64_t>(4, M - m0));
        const uint16_t* xm = X + m0 * K;
        switch (mb) {  // eight weight rows at once for one or two activation rows, four rows for more
          case 1: block<1, 8>(xm, K, wrow, acc); break;
          case 2: block<2, 8>(xm, K, wrow, acc); break;
          case 3: block<3, 4>(xm, K, wrow, acc); block<3, 4>(xm, K, wrow + 4, acc + 4); break;
          default: block<4, 4>(xm, K, wrow, acc); block<4, 4>(xm, K, wrow + 4, acc + 4); break;
        }
        for (int r = 0; r < rows; ++r) {
          const float bias = B ? static_cast<float>(B[n0 + r]) : 0.0f;
          for (int m = 0; m < mb; ++m) O[(m0 + m) * N + n0 + r] = at::BFloat16(acc[r][m] + bias);
        }
      }
    }
  });
  return out.view(shape);
}

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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear_bf16", &linear_bf16, "x @ w.T + b in bf16 for 1..16 rows (AVX512-BF16)");
  m.def("paged_decode_attention", &paged_decode_attention,
        "one query per sequence over its keys and values in the paged pool, read through its slots (bf16)");
}
