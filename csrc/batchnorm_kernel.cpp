// Training-mode BatchNorm + ReLU kernels (see batchnorm.h); compiled once per ISA.
// Channels are innermost, so every channel loop vectorises; rows are split across threads.
// Each kernel is a template over the stored activation type (float or bfloat16 bits).
#include <omp.h>

#include <algorithm>
#include <vector>

#include "batchnorm.h"
#include "isa_variant.h"

namespace mtk {
namespace MTK_ISA {
namespace {
// Below this many values a parallel region costs more than it saves.
constexpr int64_t kParallelValues = 1 << 16;

int threads_for(int64_t values, int requested) { return values >= kParallelValues ? std::max(1, requested) : 1; }

// The backward kernels read dy whatever the ReLU mask: loaded under the mask's condition,
// GCC emitted masked loads and the bfloat16 loops ran 2.5x slower.

// The normalised, scaled and shifted input before the ReLU: one expression for the forward
// pass and the backward mask, so both round (and contract) it the same way.
inline float affine(float x, float scale, float shift) { return x * scale + shift; }

// Two per-channel double sums over rows: each thread reduces one contiguous block of rows
// into accumulators of its own (never sharing a cache line with another thread's), copies
// them into its slot, and the slots are added in thread order (deterministic).
template <typename RowFn>
void reduce_rows(int64_t rows, int64_t channels, int num_threads, double* out_a, double* out_b, RowFn row_fn) {
  const int threads = threads_for(rows * channels, num_threads);
  std::vector<double> partial(static_cast<size_t>(threads) * 2 * channels, 0.0);
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), n = omp_get_num_threads();
    const int64_t begin = rows * t / n, end = rows * (t + 1) / n;
    std::vector<double> local(2 * channels, 0.0);
    double *a = local.data(), *b = a + channels;
    for (int64_t r = begin; r < end; ++r) row_fn(r, a, b);
    std::copy(local.begin(), local.end(), partial.begin() + static_cast<size_t>(t) * 2 * channels);
  }
  std::fill(out_a, out_a + channels, 0.0);
  std::fill(out_b, out_b + channels, 0.0);
  for (int t = 0; t < threads; ++t) {
    const double* a = partial.data() + static_cast<size_t>(t) * 2 * channels;
    for (int64_t c = 0; c < channels; ++c) {
      out_a[c] += a[c];
      out_b[c] += a[channels + c];
    }
  }
}

template <typename T>
void stats(const BnStatsProblem& p) {
  const int64_t C = p.channels;
  reduce_rows(p.rows, C, p.num_threads, p.sum, p.sum_sq, [&](int64_t r, double* sum, double* sum_sq) {
    const T* x = static_cast<const T*>(p.x) + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const double v = widen(x[c]);
      sum[c] += v;
      sum_sq[c] += v * v;
    }
  });
}

template <typename T>
void relu_forward(const BnReluForwardProblem& p) {
  const int64_t C = p.channels;
#pragma omp parallel for num_threads(threads_for(p.rows * C, p.num_threads)) schedule(static)
  for (int64_t r = 0; r < p.rows; ++r) {
    const T* x = static_cast<const T*>(p.x) + r * C;
    T* y = static_cast<T*>(p.y) + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) narrow(y + c, std::max(affine(widen(x[c]), p.scale[c], p.shift[c]), 0.0f));
  }
}

template <typename T>
void relu_backward_reduce(const BnReluBackwardReduceProblem& p) {
  const int64_t C = p.channels;
  const float *scale = p.scale, *shift = p.shift, *mean = p.mean;
  reduce_rows(p.rows, C, p.num_threads, p.sum_g, p.sum_gx, [&](int64_t r, double* sum_g, double* sum_gx) {
    const T *__restrict dy = static_cast<const T*>(p.dy) + r * C, *__restrict x = static_cast<const T*>(p.x) + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const float xc = widen(x[c]), gy = widen(dy[c]);
      const float g = affine(xc, scale[c], shift[c]) > 0.0f ? gy : 0.0f;
      sum_g[c] += g;
      sum_gx[c] += static_cast<double>(g) * (xc - mean[c]);
    }
  });
}

template <typename T>
void relu_backward_apply(const BnReluBackwardApplyProblem& p) {
  const int64_t C = p.channels;
  const float *scale = p.scale, *shift = p.shift, *gain = p.p, *offset = p.q, *slope = p.s;
#pragma omp parallel for num_threads(threads_for(p.rows * C, p.num_threads)) schedule(static)
  for (int64_t r = 0; r < p.rows; ++r) {
    const T *__restrict dy = static_cast<const T*>(p.dy) + r * C, *__restrict x = static_cast<const T*>(p.x) + r * C;
    T* __restrict dx = static_cast<T*>(p.dx) + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const float xc = widen(x[c]), gy = widen(dy[c]);
      const float g = affine(xc, scale[c], shift[c]) > 0.0f ? gy : 0.0f;
      narrow(dx + c, gain[c] * g + offset[c] - slope[c] * xc);
    }
  }
}

// The kernel for the problem's element type: float32 or bfloat16 (uint8 is not an
// activation these layers see).
template <typename Problem, typename Float, typename Bf16>
void by_element(const Problem& p, Float float_kernel, Bf16 bf16_kernel) {
  if (p.element == Element::bfloat16) return bf16_kernel(p);
  float_kernel(p);
}
}  // namespace

void bn_stats(const BnStatsProblem& p) { by_element(p, stats<float>, stats<uint16_t>); }
void bn_relu_forward(const BnReluForwardProblem& p) { by_element(p, relu_forward<float>, relu_forward<uint16_t>); }
void bn_relu_backward_reduce(const BnReluBackwardReduceProblem& p) {
  by_element(p, relu_backward_reduce<float>, relu_backward_reduce<uint16_t>);
}
void bn_relu_backward_apply(const BnReluBackwardApplyProblem& p) {
  by_element(p, relu_backward_apply<float>, relu_backward_apply<uint16_t>);
}

}  // namespace MTK_ISA
}  // namespace mtk
