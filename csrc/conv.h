// NHWC float32 helpers for the fused inference path (raw buffers, no libtorch).
#pragma once
#include <cstdint>

#include "element.h"

namespace mtk {

// dst[n, y, x, c] = max over the 2x2 window at (2y, 2x) of src[n, :, :, c] (2x2 / stride 2
// max-pool; an odd last row / column is dropped, as max_pool2d(2, 2) does), optionally
// followed by ReLU (max(relu(x)) = relu(max(x)), so a conv without a fused ReLU pays no extra
// pass). float32 and bfloat16 propagate NaN as PyTorch does; uint8 is a quantized activation.
struct MaxPoolProblem {
  const void* src;
  void* dst;
  int64_t batch, height, width, channels;
  bool relu;
  Element element;
  int num_threads;
};

// dst[i] = clamp(round_half_even(src[i] * inv_scale) + zero_point, 0, 255) for float32 or
// bfloat16 src: the uint8 activation of a quantized layer. NaN gives zero_point (a NaN
// input is flagged per image by the caller, not carried through integer arithmetic).
struct QuantizeProblem {
  const void* src;
  uint8_t* dst;
  int64_t count;
  float inv_scale;
  int zero_point;
  Element element;
  int num_threads;
};

// 3x3 convolution, stride 1, zero padding 1, of a one-channel image, + bias, optional
// ReLU: dst[n, y, x, co] = act(bias[co] + sum_{ky,kx} src[n, y+ky-1, x+kx-1] w[ky*3+kx, co]).
struct Conv3x3SingleChannelProblem {
  const float* src;     // [N, H, W]
  const float* weight;  // [9, C_out]
  const float* bias;    // [C_out]
  float* dst;           // [N, H, W, C_out]
  int64_t batch, height, width, out_channels;
  bool relu;
  int num_threads;
};

// Winograd F(2x2, 3x3) for a 3x3 / stride 1 / padding 1 convolution, in three steps: the
// input transform (here), 16 GEMMs V[k] @ U[k] (PyTorch's bmm), the output transform (here).
// Tiles: the 2x2 output blocks of each image, row-major, ceil(H/2) x ceil(W/2) per image.
//
// Input: V[k][tile][c] = (B^T d B)[k], d the 4x4 input patch at (2ty - 1, 2tx - 1), zero
// outside the image; k = 4 * row + column of the 4x4 transformed patch.
struct WinogradInputProblem {
  const float* src;  // [N, H, W, C]
  float* dst;        // [16, tiles, C]
  int64_t batch, height, width, channels;
  int num_threads;
};
// The same problem also describes the adjoint of the output transform below, for the
// weight gradient: dst[k][tile][c] = (A dy A^T)[k], dy the tile's 2x2 block of src (zero
// past an odd edge); no bias, ReLU or pool.

// Output: y = A^T m A + bias per tile (optional ReLU), m[k] = M[k][tile][c]. With pool, the
// 2x2 block's maximum is written, one value per tile (the 2x2 / stride 2 max-pool, which
// needs H and W even); otherwise the block, clipped at odd edges.
struct WinogradOutputProblem {
  const float* src;   // [16, tiles, C]
  const float* bias;  // [C]
  float* dst;         // [N, H, W, C], or [N, H / 2, W / 2, C] with pool
  int64_t batch, height, width, channels;
  bool relu, pool;
  int num_threads;
};

// The whole layer in one pass per chunk of images: the input transform into the scratch v,
// then, per block of kWinogradBlock output channels and a few tiles, the 16 GEMMs in
// registers and the output transform (as above) straight to dst, so the GEMM output never
// goes through memory and U is read once per chunk. U is packed per channel block:
// u[b][k][ci][j] = U[k][ci][b * kWinogradBlock + j], zero past C_out.
constexpr int64_t kWinogradBlock = 32;
struct WinogradConvProblem {
  const float* src;   // [N, H, W, C_in]
  const float* u;     // [ceil(C_out / kWinogradBlock), 16, C_in, kWinogradBlock]
  const float* bias;  // [C_out]
  float* v;           // scratch: [16, images_per_chunk * tiles per image, C_in]
  float* dst;         // [N, H, W, C_out], or [N, H / 2, W / 2, C_out] with pool
  int64_t batch, height, width, in_channels, out_channels, images_per_chunk;
  bool relu, pool;
  int num_threads;
};

// Grouped linear layer for small batches: dst[n, g * out + o] = act(bias[g * out + o] +
// sum_i src[n, g * in + i] * weight[g][o][i]). Each weight row is read once and dotted with
// every row of the batch, so a batch-1 layer streams its weights once (groups > 1: the
// equal branch layers of a multi-task head side by side).
struct GroupedLinearProblem {
  const float* src;     // [N, groups * in]
  const float* weight;  // [groups, out, in]
  const float* bias;    // [groups * out]
  float* dst;           // [N, groups * out]
  int64_t batch, groups, in_features, out_features;
  bool relu;
  int num_threads;
};

using MaxPoolFn = void (*)(const MaxPoolProblem&);
using QuantizeFn = void (*)(const QuantizeProblem&);
using Conv3x3SingleChannelFn = void (*)(const Conv3x3SingleChannelProblem&);
using WinogradInputFn = void (*)(const WinogradInputProblem&);
using WinogradOutputFn = void (*)(const WinogradOutputProblem&);
using WinogradConvFn = void (*)(const WinogradConvProblem&);
using GroupedLinearFn = void (*)(const GroupedLinearProblem&);

#define MTK_DECLARE_CONV(isa)                                          \
  namespace isa {                                                      \
  void maxpool2x2_nhwc(const MaxPoolProblem&);                         \
  void quantize_u8(const QuantizeProblem&);                            \
  void conv3x3_single_channel_nhwc(const Conv3x3SingleChannelProblem&); \
  void winograd_input_nhwc(const WinogradInputProblem&);               \
  void winograd_output_nhwc(const WinogradOutputProblem&);             \
  void winograd_output_adjoint_nhwc(const WinogradInputProblem&);      \
  void winograd_conv3x3_one_pass_nhwc(const WinogradConvProblem&);              \
  void grouped_linear(const GroupedLinearProblem&);                              \
  }
MTK_DECLARE_CONV(baseline)
MTK_DECLARE_CONV(avx2)
MTK_DECLARE_CONV(avx512)
#undef MTK_DECLARE_CONV

}  // namespace mtk
