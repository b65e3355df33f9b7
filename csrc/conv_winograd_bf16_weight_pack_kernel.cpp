// The bfloat16 Winograd convolution's weight (conv_winograd_bf16.h) from a float32 or bfloat16
// weight of any strides, compiled once per ISA: taps rounded to bfloat16, U = G g G^T per filter
// in float32, rounded to bfloat16, written straight into the pair layout, one pair row (16
// output x 2 input channels: 64 contiguous bytes per element) at a time. Training packs every
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
// One pair row of the layout: 16 output channels x 2 input channels, each a lane of the
// loops below, which the compiler vectorises (per filter, scalar, with 16 scattered stores,
// a 256 x 256 layer took 1.7 ms).
constexpr int kLanes = 2 * kBf16Block;
// Below this many filters a parallel region costs more than it saves.
constexpr int64_t kParallelFilters = 4096;

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
  const int64_t element_stride = ins / 2 * kLanes, pairs = ins / 2;
  const bool parallel = p.num_threads > 1 && outs * ins >= kParallelFilters;
#pragma omp parallel for num_threads(p.num_threads) if (parallel) schedule(static)
  for (int64_t row = 0; row < outs / kBf16Block * pairs; ++row) {
    const int64_t block = row / pairs, pair = row % pairs;
    // g[tap][lane]: lane 2 j + s holds filter (16 block + j, 2 pair + s), each tap rounded to
    // bfloat16 (as training computes from a bfloat16 copy of its float32 weight)
    float g[9][kLanes];
    for (int lane = 0; lane < kLanes; ++lane) {
      const T* taps = src + (block * kBf16Block + lane / 2) * stride_o + (2 * pair + lane % 2) * stride_i;
      for (int r = 0; r < 3; ++r)
        for (int k = 0; k < 3; ++k) g[3 * r + k][lane] = widen(taps[r * p.stride_row + k * p.stride_column]);
    }
    for (int t = 0; t < 9; ++t)
      for (int lane = 0; lane < kLanes; ++lane) g[t][lane] = round_trip<uint16_t>(g[t][lane]);
    // G g, then (G g) G^T; G's rows are [1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1].
    // Each sum has at most three terms, in two stages: at most gamma_4 of |G||g||G^T|.
    float gg[4][3][kLanes], u[kElements][kLanes];
    for (int k = 0; k < 3; ++k)
      for (int lane = 0; lane < kLanes; ++lane) {
        const float g0 = g[k][lane], g1 = g[3 + k][lane], g2 = g[6 + k][lane], outer = 0.5f * (g0 + g2);
        gg[0][k][lane] = g0;
        gg[1][k][lane] = outer + 0.5f * g1;
        gg[2][k][lane] = outer - 0.5f * g1;
        gg[3][k][lane] = g2;
      }
    for (int i = 0; i < 4; ++i)
      for (int lane = 0; lane < kLanes; ++lane) {
        const float outer = 0.5f * (gg[i][0][lane] + gg[i][2][lane]);
        u[4 * i][lane] = gg[i][0][lane];
        u[4 * i + 1][lane] = outer + 0.5f * gg[i][1][lane];
        u[4 * i + 2][lane] = outer - 0.5f * gg[i][1][lane];
        u[4 * i + 3][lane] = gg[i][2][lane];
      }
    static constexpr int kFlip[4] = {3, 1, 2, 0};
    uint16_t* out = p.dst + block * kElements * element_stride + pair * kLanes;
    for (int a = 0; a < 4; ++a)
      for (int b = 0; b < 4; ++b) {
        const float* values = p.flipped_transposed ? u[4 * kFlip[a] + kFlip[b]] : u[4 * a + b];
        for (int lane = 0; lane < kLanes; ++lane) narrow(out + (4 * a + b) * element_stride + lane, values[lane]);
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
