// A training step's BatchNorm + ReLU (batchnorm.h): statistics, per-channel coefficients and
// the passes over the activations. The coefficients are computed in double and rounded
// once to float32; forward and backward take scale and shift from one function, so the
// backward recomputes the forward's ReLU mask bit for bit.
#include <cmath>
#include <vector>

#include "batchnorm.h"
#include "cpu_dispatch.h"

namespace mtk {
namespace {

// scale = weight / sqrt(var + eps), shift = bias - mean * scale: y = relu(x * scale + shift).
void scale_shift(const float* weight, const float* bias, const float* mean, const float* var, double eps,
                 int64_t channels, float* scale, float* shift) {
  for (int64_t c = 0; c < channels; ++c) {
    const double s = double(weight[c]) * (1.0 / std::sqrt(double(var[c]) + eps));
    scale[c] = float(s);
    shift[c] = float(double(bias[c]) - double(mean[c]) * s);
  }
}

}  // namespace

void bn_relu_step_forward(const BnReluStepForward& p) {
  const int64_t C = p.channels;
  std::vector<double> sums(2 * C);
  kernels().bn_stats(BnStatsProblem{p.x, p.rows, C, sums.data(), sums.data() + C, p.element, p.num_threads,
                                    p.residual, p.total});
  for (int64_t c = 0; c < C; ++c) {
    const double mean = sums[c] / p.rows, var = sums[C + c] / p.rows - mean * mean;
    p.mean[c] = float(mean);
    p.var[c] = float(var < 0.0 ? 0.0 : var);  // rounding can take it below zero; a NaN stays
  }
  std::vector<float> coefficients(2 * C);
  float *scale = coefficients.data(), *shift = scale + C;
  scale_shift(p.weight, p.bias, p.mean, p.var, p.eps, C, scale, shift);
  kernels().bn_relu_forward(BnReluForwardProblem{p.residual ? p.total : p.x, scale, shift, p.y, p.rows, C, p.pool,
                                                 p.element, p.num_threads});
}

void bn_relu_step_backward(const BnReluStepBackward& p) {
  const int64_t C = p.channels;
  const double rows = double(p.rows);
  std::vector<float> coefficients(4 * C);
  float *scale = coefficients.data(), *shift = scale + C, *offset = shift + C, *slope = offset + C;
  scale_shift(p.weight, p.bias, p.mean, p.var, p.eps, C, scale, shift);
  std::vector<double> sums(2 * C);
  const double *sum_g = sums.data(), *sum_gx = sum_g + C;
  kernels().bn_relu_backward_reduce(BnReluBackwardReduceProblem{p.dy, p.x, scale, shift, p.mean, p.rows, C, p.pool,
                                                                sums.data(), sums.data() + C, p.element,
                                                                p.num_threads});
  // dx = w invstd (g - sum_g / n - (x - mean) invstd^2 sum_gx / n) = scale g + offset - slope x:
  // the gain on g, w invstd, is the forward's scale
  for (int64_t c = 0; c < C; ++c) {
    const double invstd = 1.0 / std::sqrt(double(p.var[c]) + p.eps);
    const double g = double(p.weight[c]) * invstd, k = invstd * invstd * sum_gx[c] / rows;
    offset[c] = float(g * (k * double(p.mean[c]) - sum_g[c] / rows));
    slope[c] = float(g * k);
    p.grad_weight[c] = float(sum_gx[c] * invstd);
    p.grad_bias[c] = float(sum_g[c]);
  }
  kernels().bn_relu_backward_apply(BnReluBackwardApplyProblem{p.dy, p.x, scale, shift, scale, offset, slope, p.dx,
                                                              p.rows, C, p.pool, p.element, p.num_threads,
                                                              p.grad_add});
}

}  // namespace mtk
