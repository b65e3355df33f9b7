// The bfloat16 Winograd convolution's weight (conv_winograd_bf16.h) from a float32 or bfloat16
// weight of any strides, compiled once per ISA: taps rounded to bfloat16, U = G g G^T per filter
// in float32, rounded to bfloat16, written straight into the pair layout. Training packs every
// step (the weight changes), where the same transform as a cast, a 16-column GEMM, a cast and
// a permuting copy in PyTorch took 1.4 ms per 256x256 layer.
#include <omp.h>

#include <cstdint>

#include "conv_winograd_bf16.h"
#include "element.h"
#include "isa_variant.h"

namespace mtk {
namespace MTK_ISA {
namespace {

constexpr int kElements = 16;
// Below this many filters a parallel region costs more than it saves.
constexpr int64_t kParallelFilters = 4096;

// u[4 i + j] = (G g G^T)[i][j] of the 3x3 filter g (tap (r, k) at g[r * row + k * column]),
// each tap rounded to bfloat16 first, in float32; G's rows are [1, 0, 0], [1/2, 1/2, 1/2],
// [1/2, -1/2, 1/2], [0, 0, 1]. Each sum has at most three terms, in two stages: at most
// gamma_4 of |G||g||G^T|.
template <typename T>
void transform(const T* g, int64_t row, int64_t column, float u[kElements]) {
  const auto tap = [&](int r, int k) { return round_trip<uint16_t>(widen(g[r * row + k * column])); };
  float gg[4][3];  // G g
  for (int k = 0; k < 3; ++k) {
    const float g0 = tap(0, k), g1 = tap(1, k), g2 = tap(2, k);
    const float outer = 0.5f * (g0 + g2);
    gg[0][k] = g0;
    gg[1][k] = outer + 0.5f * g1;
    gg[2][k] = outer - 0.5f * g1;
    gg[3][k] = g2;
  }
  for (int i = 0; i < 4; ++i) {  // (G g) G^T
    const float outer = 0.5f * (gg[i][0] + gg[i][2]);
    u[4 * i] = gg[i][0];
    u[4 * i + 1] = outer + 0.5f * gg[i][1];
    u[4 * i + 2] = outer - 0.5f * gg[i][1];
    u[4 * i + 3] = gg[i][2];
  }
}

template <typename T>
void pack(const ConvWinogradBf16WeightPackProblem& p) {
  // The packed conv's output channel o and input channel i: filter (o, i) of the weight, or
  // with flipped_transposed filter (i, o) flipped, whose U is P U P (P swaps rows and columns
  // 0 and 3: G flip(g) = P G g).
  const T* src = static_cast<const T*>(p.src);
  const int64_t outs = p.flipped_transposed ? p.in_channels : p.out_channels;
  const int64_t ins = p.flipped_transposed ? p.out_channels : p.in_channels;
  const int64_t stride_o = p.flipped_transposed ? p.stride_in : p.stride_out;
  const int64_t stride_i = p.flipped_transposed ? p.stride_out : p.stride_in;
  const int64_t pair_block = 2 * kBf16Block, element_stride = ins / 2 * pair_block;
  const bool parallel = p.num_threads > 1 && outs * ins >= kParallelFilters;
#pragma omp parallel for num_threads(p.num_threads) if (parallel) schedule(static)
  for (int64_t o = 0; o < outs; ++o) {
    uint16_t* block = p.dst + o / kBf16Block * kElements * element_stride + 2 * (o % kBf16Block);
    for (int64_t i = 0; i < ins; ++i) {
      float u[kElements];
      transform(src + o * stride_o + i * stride_i, p.stride_row, p.stride_column, u);
      uint16_t* out = block + i / 2 * pair_block + i % 2;
      static constexpr int kFlip[4] = {3, 1, 2, 0};
      for (int a = 0; a < 4; ++a)
        for (int b = 0; b < 4; ++b) {
          const float value = p.flipped_transposed ? u[4 * kFlip[a] + kFlip[b]] : u[4 * a + b];
          narrow(out + (4 * a + b) * element_stride, value);
        }
    }
  }
}

}  // namespace

void conv_winograd_bf16_weight_pack(const ConvWinogradBf16WeightPackProblem& p) {
  if (p.element == Element::bfloat16) return pack<uint16_t>(p);
  pack<float>(p);
}

}  // namespace MTK_ISA
}  // namespace mtk
