// Direct convolution (3x3 with zero padding 1, or 1x1; stride 1 or 2) of bfloat16 NHWC
// activations with float32 accumulation, + bias (+ ReLU) (+ 2x2 max-pool), for the
// reduced-precision layer chain and as a per-layer candidate at small batches.
#pragma once
#include <cstdint>

#include "element.h"

namespace mtk {

// Output channels per weight block: one 512-bit register of float32 accumulators.
constexpr int64_t kBf16Block = 16;

// src is [N, H + 2 * pad, W + 2 * pad, C_in] bfloat16 with pad = (kernel_size - 1) / 2: a 3x3
// conv reads a zero-bordered input, so no tap needs a bounds check. C_in is even (an odd
// channel count is padded with a zero channel). The weight is packed in the pair layout of
// the bf16 dot-product instructions, per block of kBf16Block output channels:
// weight[b][ky * K + kx][ci / 2][j][ci % 2] = w[b * kBf16Block + j][ci][ky][kx].
// The conv's output is OH x OW = (H - 1) / stride + 1 x (W - 1) / stride + 1; with pool (OH and
// OW even) dst holds its 2x2 maxima. dst is [N, rows + 2 * dst_pad, columns + 2 * dst_pad, C_out]
// of dst_element (bfloat16 rounded to nearest even, or float32); dst_pad = 1 writes the
// interior of the next 3x3 conv's zero-bordered input and leaves its border alone. Per output
// value: act(bias + sum of the K * K * C_in products) in float32, then the pool's maximum; NaN
// propagates through the ReLU and the pool as in PyTorch. A tap that falls on the border is
// skipped, as oneDNN skips it (an inf or NaN weight there meets no zero input).
struct ConvBf16Problem {
  const uint16_t* src;
  const uint16_t* weight;
  const float* bias;  // [C_out]
  void* dst;
  int64_t batch, height, width, in_channels, out_channels;  // out_channels a multiple of kBf16Block
  int64_t kernel_size, stride;  // 1 or 3; 1 or 2
  int64_t dst_pad;
  bool relu, pool;
  Element dst_element;  // float32 or bfloat16
  int num_threads;
  // The Winograd kernel only (conv_winograd_bf16.h): src is [N, H, W, C_in] without the border,
  // and the tiles at the image's edges read outside it as zero.
  bool src_unbordered = false;
};

using ConvBf16Fn = void (*)(const ConvBf16Problem&);

// baseline / avx2 / avx512 compute the products in float32 from the widened bfloat16 values;
// avx512bf16 runs the AVX512-BF16 dot-product instruction (vdpbf16ps).
#define MTK_DECLARE_CONV_BF16(isa) \
  namespace isa {                      \
  void conv_bf16_nhwc(const ConvBf16Problem&); \
  }
MTK_DECLARE_CONV_BF16(baseline)
MTK_DECLARE_CONV_BF16(avx2)
MTK_DECLARE_CONV_BF16(avx512)
MTK_DECLARE_CONV_BF16(avx512bf16)
#undef MTK_DECLARE_CONV_BF16

}  // namespace mtk
