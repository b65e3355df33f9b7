// Direct 3x3 convolution (stride 1, padding 1) of bfloat16 NHWC activations with float32
// accumulation, + bias (+ ReLU) (+ 2x2 max-pool), for the reduced-precision layer chain.
#pragma once
#include <cstdint>

#include "element.h"

namespace mtk {

// Output channels per weight block: one 512-bit register of float32 accumulators.
constexpr int64_t kBf16Block = 16;

// src is the zero-bordered input: [N, H + 2, W + 2, C_in] bfloat16, C_in even (an odd channel
// count is padded with a zero channel), so no tap needs a bounds check. The weight is packed
// in the pair layout of the bf16 dot-product instructions, per block of kBf16Block output
// channels: weight[b][ky * 3 + kx][ci / 2][j][ci % 2] = w[b * kBf16Block + j][ci][ky][kx].
// dst is [N, OH + 2 * dst_pad, OW + 2 * dst_pad, C_out] of dst_element (bfloat16 rounded to
// nearest even, or float32), with OH x OW = H x W, or H / 2 x W / 2 with pool (H and W even);
// dst_pad = 1 writes the interior of the next such conv's zero-bordered input and leaves its
// border alone. Per output value: act(bias + sum of the 9 * C_in products) in float32, then the
// pool's maximum; NaN propagates through the ReLU and the pool as in PyTorch.
struct Conv3x3Bf16Problem {
  const uint16_t* src;
  const uint16_t* weight;
  const float* bias;  // [C_out]
  void* dst;
  int64_t batch, height, width, in_channels, out_channels;  // out_channels a multiple of kBf16Block
  int64_t dst_pad;
  bool relu, pool;
  Element dst_element;  // float32 or bfloat16
  int num_threads;
};

using Conv3x3Bf16Fn = void (*)(const Conv3x3Bf16Problem&);

// baseline / avx2 / avx512 compute the products in float32 from the widened bfloat16 values;
// avx512bf16 runs the AVX512-BF16 dot-product instruction (vdpbf16ps).
#define MTK_DECLARE_CONV3X3_BF16(isa) \
  namespace isa {                      \
  void conv3x3_bf16_nhwc(const Conv3x3Bf16Problem&); \
  }
MTK_DECLARE_CONV3X3_BF16(baseline)
MTK_DECLARE_CONV3X3_BF16(avx2)
MTK_DECLARE_CONV3X3_BF16(avx512)
MTK_DECLARE_CONV3X3_BF16(avx512bf16)
#undef MTK_DECLARE_CONV3X3_BF16

}  // namespace mtk
