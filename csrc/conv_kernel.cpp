// NHWC float32 kernels for the fused inference path; compiled once per ISA like the loss
// kernel (MTK_ISA names the namespace). Channels are innermost, so the channel loops
// vectorise; OpenMP splits output rows across threads for large batches.
#include <omp.h>

#include <algorithm>
#include <limits>
#include <vector>

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

void winograd_input_nhwc(const WinogradInputProblem& p) {
  const int64_t H = p.height, W = p.width, C = p.channels;
  const int64_t tiles_h = (H + 1) / 2, tiles_w = (W + 1) / 2, tiles = p.batch * tiles_h * tiles_w;
  const int64_t plane = tiles * C;  // distance between the 16 transformed planes
  const bool parallel = p.num_threads > 1 && 16 * plane >= kParallelOutputs;
#pragma omp parallel num_threads(p.num_threads) if (parallel)
  {
    // One zero row stands in for every out-of-image pixel, so the channel loop has no branches.
    std::vector<float> zeros(C, 0.0f);
#pragma omp for schedule(static)
    for (int64_t tile = 0; tile < tiles; ++tile) {
      const int64_t n = tile / (tiles_h * tiles_w), t = tile % (tiles_h * tiles_w);
      const int64_t y0 = 2 * (t / tiles_w) - 1, x0 = 2 * (t % tiles_w) - 1;
      const float* d[4][4];
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) {
          const int64_t y = y0 + i, x = x0 + j;
          d[i][j] = (y >= 0 && y < H && x >= 0 && x < W) ? p.src + ((n * H + y) * W + x) * C : zeros.data();
        }
      float* out = p.dst + tile * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        float r[4][4];  // B^T d: rows combined
        for (int j = 0; j < 4; ++j) {
          r[0][j] = d[0][j][c] - d[2][j][c];
          r[1][j] = d[1][j][c] + d[2][j][c];
          r[2][j] = d[2][j][c] - d[1][j][c];
          r[3][j] = d[1][j][c] - d[3][j][c];
        }
        for (int i = 0; i < 4; ++i) {  // (B^T d) B: columns combined
          out[(4 * i + 0) * plane + c] = r[i][0] - r[i][2];
          out[(4 * i + 1) * plane + c] = r[i][1] + r[i][2];
          out[(4 * i + 2) * plane + c] = r[i][2] - r[i][1];
          out[(4 * i + 3) * plane + c] = r[i][1] - r[i][3];
        }
      }
    }
  }
}

void winograd_output_nhwc(const WinogradOutputProblem& p) {
  const int64_t H = p.height, W = p.width, C = p.channels;
  const int64_t tiles_h = (H + 1) / 2, tiles_w = (W + 1) / 2, tiles = p.batch * tiles_h * tiles_w;
  const int64_t plane = tiles * C;
  const bool parallel = p.num_threads > 1 && 16 * plane >= kParallelOutputs;
  const float floor = p.relu ? 0.0f : -std::numeric_limits<float>::infinity();
#pragma omp parallel num_threads(p.num_threads) if (parallel)
  {
    // Outputs past an odd edge go to a scratch row, so the channel loop has no branches.
    std::vector<float> scratch(C);
#pragma omp for schedule(static)
    for (int64_t tile = 0; tile < tiles; ++tile) {
      const int64_t n = tile / (tiles_h * tiles_w), t = tile % (tiles_h * tiles_w);
      const int64_t ty = t / tiles_w, tx = t % tiles_w;
      const float* m = p.src + tile * C;
      float* o[2][2];
      if (p.pool) {
        o[0][0] = p.dst + ((n * (H / 2) + ty) * (W / 2) + tx) * C;
      } else {
        for (int i = 0; i < 2; ++i)
          for (int j = 0; j < 2; ++j) {
            const int64_t y = 2 * ty + i, x = 2 * tx + j;
            o[i][j] = (y < H && x < W) ? p.dst + ((n * H + y) * W + x) * C : scratch.data();
          }
      }
      float *o00 = o[0][0], *o01 = o[0][1], *o10 = o[1][0], *o11 = o[1][1];
      const float* bias = p.bias;
      // Plain scalars and two separate loops: the compiler vectorises these across channels.
#define MTK_WINOGRAD_BLOCK                                                                       \
  const float a0 = m[c] + m[4 * plane + c] + m[8 * plane + c];                                   \
  const float a1 = m[plane + c] + m[5 * plane + c] + m[9 * plane + c];                           \
  const float a2 = m[2 * plane + c] + m[6 * plane + c] + m[10 * plane + c];                      \
  const float a3 = m[3 * plane + c] + m[7 * plane + c] + m[11 * plane + c];                      \
  const float b0 = m[4 * plane + c] - m[8 * plane + c] - m[12 * plane + c];                      \
  const float b1 = m[5 * plane + c] - m[9 * plane + c] - m[13 * plane + c];                      \
  const float b2 = m[6 * plane + c] - m[10 * plane + c] - m[14 * plane + c];                     \
  const float b3 = m[7 * plane + c] - m[11 * plane + c] - m[15 * plane + c];                     \
  const float y00 = a0 + a1 + a2, y01 = a1 - a2 - a3, y10 = b0 + b1 + b2, y11 = b1 - b2 - b3;
      if (p.pool) {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          MTK_WINOGRAD_BLOCK
          // the bias is the same for the 4 outputs and ReLU is monotonic: pool first
          o00[c] = std::max(std::max(std::max(y00, y01), std::max(y10, y11)) + bias[c], floor);
        }
      } else {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          MTK_WINOGRAD_BLOCK
          o00[c] = std::max(y00 + bias[c], floor);
          o01[c] = std::max(y01 + bias[c], floor);
          o10[c] = std::max(y10 + bias[c], floor);
          o11[c] = std::max(y11 + bias[c], floor);
        }
      }
#undef MTK_WINOGRAD_BLOCK
    }
  }
}

}  // namespace MTK_ISA
}  // namespace mtk
