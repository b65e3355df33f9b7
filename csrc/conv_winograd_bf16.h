// Winograd F(2x2, 3x3) convolution of bfloat16 NHWC activations (3x3, padding 1, stride 1) with
// float32 accumulation, + bias (+ ReLU) (+ 2x2 max-pool): 16 products per 2x2 output tile and
// input channel where the direct conv (conv_bf16.h) takes 36, for large batches.
#pragma once
#include <cstdint>

#include "conv_bf16.h"

namespace mtk {

// The problem is conv_bf16's (ConvBf16Problem) with kernel_size 3, stride 1, an even height
// and width, and in_channels a multiple of kBf16Block. Each 4x4 input patch d (of the
// zero-bordered src, at even coordinates) is transformed to V = B^T d B in float32 and rounded
// to bfloat16; the weight holds U = G g G^T rounded to bfloat16, in conv_bf16's pair layout
// with the 16 elements of U as its taps:
// weight[b][4 * i + j][ci / 2][c][ci % 2] = U[b * kBf16Block + c][ci][i][j].
// Per element, the products of V and U are summed over the input channels in float32 (M), and
// the 2x2 output tile is A^T M A + bias, in float32. The tile is the pool's 2x2 window.
// A non-finite input makes exactly the outputs whose 3x3 windows hold it non-finite; an inf
// there may come out as NaN (the transforms subtract it from itself).
// The weight gradient of that conv by Winograd: d U[e][ci][co] = the sum over every 2x2 tile
// of the batch of V[e][ci] d M[e][co], V = B^T d B of the tile's 4x4 input patch (of src, zero
// outside it) and d M = A d y A^T of its 2x2 block of the output gradient, each computed in
// float32 and rounded to bfloat16 like the forward's V; the products are summed in float32,
// and d weight = G^T d U G per filter in float32 (two stages of at most 3 additions). d bias
// is the plain sum of d y (not computed here).
struct ConvWinogradBf16WeightGradProblem {
  const uint16_t* src;   // x: [N, H, W, C_in] bfloat16, no border
  const uint16_t* grad;  // d y: [N, H, W, C_out] bfloat16
  float* grad_weight;    // [C_out, C_in, 3, 3], overwritten
  int64_t batch, height, width, in_channels, out_channels;  // H, W even; channels multiples of kBf16Block
  int num_threads;
};
// The kernel returns whether every d weight it wrote is finite.
using ConvWinogradBf16WeightGradFn = bool (*)(const ConvWinogradBf16WeightGradProblem&);

// The weight of the conv above from a float32 or bfloat16 weight g [C_out, C_in, 3, 3] (any
// strides): each tap rounded to bfloat16 (as training computes from a bfloat16 copy of its
// float32 weight), U = G g G^T in float32 (each sum of at most three terms, in two stages),
// rounded to bfloat16, in the pair layout. flipped_transposed: the weight of the input
// gradient's conv instead, whose filter (i, o) is g's filter (o, i) flipped
// ([C_in / kBf16Block, 16, C_out / 2, kBf16Block, 2]).
struct ConvWinogradBf16WeightPackProblem {
  const void* src;  // g, `element` (float32 or bfloat16)
  int64_t stride_out, stride_in, stride_row, stride_column;  // of src, in elements
  uint16_t* dst;    // the packed weight, overwritten
  int64_t out_channels, in_channels;  // multiples of kBf16Block
  Element element;
  bool flipped_transposed;
  int num_threads;
};
using ConvWinogradBf16WeightPackFn = void (*)(const ConvWinogradBf16WeightPackProblem&);

#define MTK_DECLARE_CONV_WINOGRAD_BF16(isa)          \
  namespace isa {                                     \
  void conv_winograd_bf16_nhwc(const ConvBf16Problem&); \
  bool conv_winograd_bf16_weight_grad_nhwc(const ConvWinogradBf16WeightGradProblem&); \
  void conv_winograd_bf16_weight_pack(const ConvWinogradBf16WeightPackProblem&); \
  }
MTK_DECLARE_CONV_WINOGRAD_BF16(baseline)
MTK_DECLARE_CONV_WINOGRAD_BF16(avx2)
MTK_DECLARE_CONV_WINOGRAD_BF16(avx512)
MTK_DECLARE_CONV_WINOGRAD_BF16(avx512bf16)
#undef MTK_DECLARE_CONV_WINOGRAD_BF16

}  // namespace mtk
