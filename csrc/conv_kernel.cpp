// NHWC float32 kernels for the fused inference path; compiled once per ISA like the loss
// kernel (MTK_ISA names the namespace). Channels are innermost, so the channel loops
// vectorise; OpenMP splits output rows across threads for large batches.
#include <omp.h>

#include <algorithm>

#include "conv.h"
#include "isa_variant.h"


namespace mtk {
namespace MTK_ISA {
namespace {
// Below this many output values a parallel region costs more than it saves.
constexpr int64_t kParallelOutputs = 1 << 16;
}  // namespace

void maxpool2x2_nhwc(const MaxPoolProblem& p) {
  const int64_t out_h = p.height / 2, out_w = p.width / 2, C = p.channels;
  const int64_t rows = p.batch * out_h;
  const bool parallel = p.num_threads > 1 && rows * out_w * C >= kParallelOutputs;
#pragma omp parallel for num_threads(p.num_threads) if (parallel) schedule(static)
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t n = row / out_h, y = row % out_h;
    const float* top = p.src + ((n * p.height + 2 * y) * p.width) * C;
    const float* bottom = top + p.width * C;
    float* out = p.dst + row * out_w * C;
    for (int64_t x = 0; x < out_w; ++x) {
      const float *a = top + 2 * x * C, *b = bottom + 2 * x * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) out[x * C + c] = std::max(std::max(a[c], a[C + c]), std::max(b[c], b[C + c]));
    }
  }
}

void conv3x3_single_channel_nhwc(const Conv3x3SingleChannelProblem& p) {
  const int64_t H = p.height, W = p.width, C = p.out_channels;
  const int64_t rows = p.batch * H;
  const bool parallel = p.num_threads > 1 && rows * W * C >= kParallelOutputs;
#pragma omp parallel for num_threads(p.num_threads) if (parallel) schedule(static)
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t n = row / H, y = row % H;
    const float* image = p.src + n * H * W;
    float* out = p.dst + row * W * C;
    for (int64_t x = 0; x < W; ++x) {
      float taps[9];
      for (int ky = 0; ky < 3; ++ky)
        for (int kx = 0; kx < 3; ++kx) {
          const int64_t iy = y + ky - 1, ix = x + kx - 1;
          taps[ky * 3 + kx] = (iy >= 0 && iy < H && ix >= 0 && ix < W) ? image[iy * W + ix] : 0.0f;
        }
      float* o = out + x * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        float acc = p.bias[c];
        for (int k = 0; k < 9; ++k) acc += taps[k] * p.weight[k * C + c];
        o[c] = p.relu ? std::max(acc, 0.0f) : acc;
      }
    }
  }
}

}  // namespace MTK_ISA
}  // namespace mtk
