// Training-mode BatchNorm + ReLU over channels-last float32 activations viewed as
// [rows, channels] (rows = N * H * W). Batch statistics and gradient reductions
// accumulate in double; each reduction splits rows into one fixed block per thread and
// adds the blocks in order, so results do not depend on scheduling.
#pragma once
#include <cstdint>

namespace mtk {

// sum[c] = sum_r x[r, c], sum_sq[c] = sum_r x[r, c]^2.
struct BnStatsProblem {
  const float* x;
  int64_t rows, channels;
  double* sum;
  double* sum_sq;
  int num_threads;
};

// y[r, c] = max(0, x[r, c] * scale[c] + shift[c]).
struct BnReluForwardProblem {
  const float* x;
  const float* scale;
  const float* shift;
  float* y;
  int64_t rows, channels;
  int num_threads;
};

// With g = dy where the forward's x * scale + shift > 0 (the ReLU passed it) else 0:
// sum_g[c] = sum_r g, sum_gx[c] = sum_r g * (x - mean[c]). The mask is recomputed from x
// with the forward's own expression, so the output need not be read (or kept).
struct BnReluBackwardReduceProblem {
  const float* dy;
  const float* x;
  const float* scale;
  const float* shift;
  const float* mean;
  int64_t rows, channels;
  double* sum_g;
  double* sum_gx;
  int num_threads;
};

// dx[r, c] = p[c] * g + q[c] - s[c] * x[r, c], g as above: the BatchNorm input gradient
// with its per-channel terms folded into three coefficients.
struct BnReluBackwardApplyProblem {
  const float* dy;
  const float* x;
  const float* scale;
  const float* shift;
  const float* p;
  const float* q;
  const float* s;
  float* dx;
  int64_t rows, channels;
  int num_threads;
};

using BnStatsFn = void (*)(const BnStatsProblem&);
using BnReluForwardFn = void (*)(const BnReluForwardProblem&);
using BnReluBackwardReduceFn = void (*)(const BnReluBackwardReduceProblem&);
using BnReluBackwardApplyFn = void (*)(const BnReluBackwardApplyProblem&);

#define MTK_DECLARE_BATCHNORM(isa)                                      \
  namespace isa {                                                       \
  void bn_stats(const BnStatsProblem&);                                 \
  void bn_relu_forward(const BnReluForwardProblem&);                    \
  void bn_relu_backward_reduce(const BnReluBackwardReduceProblem&);     \
  void bn_relu_backward_apply(const BnReluBackwardApplyProblem&);       \
  }
MTK_DECLARE_BATCHNORM(baseline)
MTK_DECLARE_BATCHNORM(avx2)
MTK_DECLARE_BATCHNORM(avx512)
#undef MTK_DECLARE_BATCHNORM

}  // namespace mtk
