// NHWC float32 helpers for the fused inference path (raw buffers, no libtorch).
#pragma once
#include <cstdint>

namespace mtk {

// dst[n, y, x, c] = max over the 2x2 window at (2y, 2x) of src[n, :, :, c]; H, W even or
// odd (the last row / column is dropped, as max_pool2d(2, 2) does).
struct MaxPoolProblem {
  const float* src;
  float* dst;
  int64_t batch, height, width, channels;
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

using MaxPoolFn = void (*)(const MaxPoolProblem&);
using Conv3x3SingleChannelFn = void (*)(const Conv3x3SingleChannelProblem&);

#define MTK_DECLARE_CONV(isa)                                          \
  namespace isa {                                                      \
  void maxpool2x2_nhwc(const MaxPoolProblem&);                         \
  void conv3x3_single_channel_nhwc(const Conv3x3SingleChannelProblem&); \
  }
MTK_DECLARE_CONV(baseline)
MTK_DECLARE_CONV(avx2)
MTK_DECLARE_CONV(avx512)
#undef MTK_DECLARE_CONV

}  // namespace mtk
