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
#include <cstdint>

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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear_bf16", &linear_bf16, "x @ w.T + b in bf16 for 1..16 rows (AVX512-BF16)");
}
