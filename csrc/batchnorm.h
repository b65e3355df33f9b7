// Training-mode BatchNorm + ReLU over channels-last activations viewed as [rows, channels]
// (rows = N * H * W), float32 or bfloat16 (`element`, for every activation and activation
// gradient of a problem; the per-channel terms stay float32). Arithmetic is float32; batch
// statistics and gradient reductions accumulate in double, bfloat16 ones in float32 over
// blocks of at most 64 rows first (see batchnorm_kernel.cpp); each reduction splits rows
// into one fixed block per thread and adds the blocks in order, so results do not depend
// on scheduling. bfloat16 results are rounded to nearest even once, at the store.
#pragma once
#include <cstdint>

#include "element.h"

namespace mtk {

// A 2x2 / stride 2 max-pool (floor mode, PyTorch's nn.MaxPool2d(2, 2)) after the ReLU,
// over x viewed as [images, height, width, channels] (rows = images * height * width);
// images == 0: no pool. With a pool, y and dy are the pooled
// [images, height / 2, width / 2, channels]: x's values that are no window's maximum (or
// in no window) get no gradient through the ReLU, as in the unfused layers.
struct Pool2x2 {
  int64_t images = 0, height = 0, width = 0;
};

// sum[c] = sum_r x[r, c], sum_sq[c] = sum_r x[r, c]^2. With a residual, the statistics are
// those of x + residual (added in float32 and rounded once to the element type, as
// PyTorch's add), which is written to `total`: a residual network's sum and the next
// BatchNorm's statistics in one pass.
struct BnStatsProblem {
  const void* x;
  int64_t rows, channels;
  double* sum;
  double* sum_sq;
  Element element;
  int num_threads;
  const void* residual = nullptr;
  void* total = nullptr;
};

// y[r, c] = max(0, x[r, c] * scale[c] + shift[c]), then pooled with `pool`.
struct BnReluForwardProblem {
  const void* x;
  const float* scale;
  const float* shift;
  void* y;
  int64_t rows, channels;
  Pool2x2 pool;
  Element element;
  int num_threads;
};

// With g = dy where the forward's x * scale + shift > 0 (the ReLU passed it) else 0 (and,
// with a pool, dy of x's window where x is its maximum, else 0):
// sum_g[c] = sum_r g, sum_gx[c] = sum_r g * (x - mean[c]). The mask is recomputed from x
// with the forward's own expression, so the output need not be read (or kept).
struct BnReluBackwardReduceProblem {
  const void* dy;
  const void* x;
  const float* scale;
  const float* shift;
  const float* mean;
  int64_t rows, channels;
  Pool2x2 pool;
  double* sum_g;
  double* sum_gx;
  Element element;
  int num_threads;
};

// dx[r, c] = p[c] * g + q[c] - s[c] * x[r, c] (+ grad_add[r, c] where given: the gradient
// that reaches x through a residual connection, added before the one rounding), g as
// above: the BatchNorm input gradient with its per-channel terms folded into three
// coefficients. grad_add is for unpooled problems only.
struct BnReluBackwardApplyProblem {
  const void* dy;
  const void* x;
  const float* scale;
  const float* shift;
  const float* p;
  const float* q;
  const float* s;
  void* dx;
  int64_t rows, channels;
  Pool2x2 pool;
  Element element;
  int num_threads;
  const void* grad_add = nullptr;
};

// A training step's forward: the batch statistics of x (x + residual, written to total,
// where a residual is given), mean and biased variance (double, rounded once to float32),
// the per-channel scale and shift (double, rounded once), and y = relu(x * scale + shift)
// (then pooled). Composed in C++ (batchnorm_step.cpp) so the per-channel work costs no
// framework calls.
struct BnReluStepForward {
  const void* x;
  const void* residual;  // nullptr for none
  void* total;
  const float* weight;
  const float* bias;
  double eps;
  void* y;
  float* mean;
  float* var;
  int64_t rows, channels;
  Pool2x2 pool;
  Element element;
  int num_threads;
};

// Its backward from the saved mean and variance: dx (plus grad_add where given: unpooled
// only), d weight and d bias (float32), through the reduction and apply kernels above.
struct BnReluStepBackward {
  const void* dy;
  const void* x;
  const void* grad_add;  // nullptr for none
  const float* weight;
  const float* bias;
  const float* mean;
  const float* var;
  double eps;
  void* dx;
  float* grad_weight;
  float* grad_bias;
  int64_t rows, channels;
  Pool2x2 pool;
  Element element;
  int num_threads;
};

void bn_relu_step_forward(const BnReluStepForward& p);
void bn_relu_step_backward(const BnReluStepBackward& p);

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
