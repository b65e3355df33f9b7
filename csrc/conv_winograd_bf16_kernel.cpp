// Winograd F(2x2, 3x3) bfloat16 convolution (conv_winograd_bf16.h), compiled once per ISA.
// The 2x2 output tiles of the whole batch are numbered image by image, row by row, and taken
// 8 at a time: their input patches are transformed once (V, bfloat16, in a per-thread buffer)
// and reused for every output channel. Per element of the transform and 32 output channels,
// the 8 tiles keep their 16 float32 accumulators in registers over the input-channel pairs,
// as the direct kernel's pixels do; the sums (M) go to a small buffer, from which the output
// transform, bias, ReLU and the pool (a tile is exactly one 2x2 window) write the result once.
// Block sizes, timed interleaved in one process on BKNet's layers at batch 128 (all seven,
// summed): 6 and 8 tiles alike, 10 tiles 1-3% and 12 tiles 3-6% slower (at 12 the inner
// loop's tile pointers no longer fit in the general registers); larger blocks were slower
// still when measured before: V no longer stays in the level-1 cache (2-10% a layer).
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "bf16_unit.h"
#include "conv_winograd_bf16.h"
#include "isa_variant.h"

namespace mtk {
namespace MTK_ISA {
namespace {

constexpr int kElements = 16;  // of a transformed 4x4 patch
constexpr int kTiles = 8;      // a block: 8 tiles x 2 channel blocks = 16 accumulators
// Below this many multiply-adds a parallel region costs more than it saves.
constexpr int64_t kParallelMacs = int64_t(1) << 20;

struct Geometry {
  int64_t channels, in_row, in_image, pairs, element_stride, block_stride;
  int64_t tiles_w, tiles_per_image, tiles;
  int64_t dst_row, dst_image, dst_origin;
  explicit Geometry(const ConvBf16Problem& p) {
    channels = p.in_channels;
    const int64_t border = p.src_unbordered ? 0 : 1;
    in_row = (p.width + 2 * border) * channels;
    in_image = (p.height + 2 * border) * in_row;
    pairs = channels / 2;
    element_stride = pairs * 2 * kBf16Block;
    block_stride = kElements * element_stride;
    tiles_w = p.width / 2;
    tiles_per_image = (p.height / 2) * tiles_w;
    tiles = p.batch * tiles_per_image;
    const int64_t rows = p.pool ? p.height / 2 : p.height, columns = p.pool ? p.width / 2 : p.width;
    dst_row = (columns + 2 * p.dst_pad) * p.out_channels;
    dst_image = (rows + 2 * p.dst_pad) * dst_row;
    dst_origin = p.dst_pad * (dst_row + p.out_channels);
  }
};

// v[e][c] (e_stride apart) = (B^T d B)[e] of the 4x4 patch d whose top-left element is row y0,
// column x0 of `image`, channel c, in float32 then rounded to bfloat16. CHECKED: rows and
// columns outside the image read as zero (the edge tiles of an input without a border).
template <bool CHECKED>
void transform_patch(const ConvBf16Problem& p, const Geometry& g, const uint16_t* image, int64_t y0, int64_t x0,
                     uint16_t* v, int64_t e_stride) {
  const auto inside = [&](int64_t y, int64_t x) { return y >= 0 && y < p.height && x >= 0 && x < p.width; };
  for (int64_t c = 0; c < g.channels; c += kBf16Block) {
    typename Unit::Acc rows[4][4];  // B^T d
    for (int j = 0; j < 4; ++j) {
      const auto d = [&](int r) {
        const int64_t y = y0 + r, x = x0 + j;
        return CHECKED && !inside(y, x) ? Unit::zero() : Unit::load(image + y * g.in_row + x * g.channels + c);
      };
      const auto d0 = d(0), d1 = d(1), d2 = d(2), d3 = d(3);
      rows[0][j] = Unit::sub(d0, d2);
      rows[1][j] = Unit::add(d1, d2);
      rows[2][j] = Unit::sub(d2, d1);
      rows[3][j] = Unit::sub(d1, d3);
    }
    for (int i = 0; i < 4; ++i) {  // (B^T d) B
      uint16_t* out = v + 4 * i * e_stride + c;
      Unit::store(out, Unit::sub(rows[i][0], rows[i][2]));
      Unit::store(out + e_stride, Unit::add(rows[i][1], rows[i][2]));
      Unit::store(out + 2 * e_stride, Unit::sub(rows[i][2], rows[i][1]));
      Unit::store(out + 3 * e_stride, Unit::sub(rows[i][1], rows[i][3]));
    }
  }
}

// v[e][t][c] = (B^T d B)[e] of tile first + t's 4x4 input patch d, channel c; the block's tiles
// from count on are zero (computed, never stored).
void transform_input(const ConvBf16Problem& p, const Geometry& g, int64_t first, int64_t count, uint16_t* v) {
  const int64_t e_stride = kTiles * g.channels;
  for (int64_t t = 0; t < kTiles; ++t) {
    if (t >= count) {
      for (int e = 0; e < kElements; ++e) std::fill_n(v + e * e_stride + t * g.channels, g.channels, uint16_t(0));
      continue;
    }
    const int64_t tile = first + t, n = tile / g.tiles_per_image, in_image = tile % g.tiles_per_image;
    const int64_t ty = in_image / g.tiles_w, tx = in_image % g.tiles_w;
    const uint16_t* image = p.src + n * g.in_image;
    uint16_t* out = v + t * g.channels;
    if (!p.src_unbordered) {  // the zero border stands in for the padding
      transform_patch<false>(p, g, image, 2 * ty, 2 * tx, out, e_stride);
    } else if (ty == 0 || tx == 0 || 2 * ty + 2 == p.height || 2 * tx + 2 == p.width) {
      transform_patch<true>(p, g, image, 2 * ty - 1, 2 * tx - 1, out, e_stride);
    } else {
      transform_patch<false>(p, g, image, 2 * ty - 1, 2 * tx - 1, out, e_stride);
    }
  }
}

// m[t][b] = sum over the input channels of v[t][c] U[c][b] for one element: kTiles tiles x NB
// blocks of output channels.
template <int NB>
void multiply(const Geometry& g, const uint16_t* v, const uint16_t* w, float* m) {
  typename Unit::Acc acc[kTiles][NB];
  for (int t = 0; t < kTiles; ++t)
    for (int b = 0; b < NB; ++b) acc[t][b] = Unit::zero();
  for (int64_t cp = 0; cp < g.pairs; ++cp) {
    typename Unit::Weights wv[NB];
    for (int b = 0; b < NB; ++b) wv[b] = Unit::load_weights(w + b * g.block_stride + cp * 2 * kBf16Block);
    for (int t = 0; t < kTiles; ++t)
      for (int b = 0; b < NB; ++b) Unit::dot(acc[t][b], v + t * g.channels + 2 * cp, wv[b]);
  }
  for (int t = 0; t < kTiles; ++t)
    for (int b = 0; b < NB; ++b) Unit::store(m + (t * NB + b) * kBf16Block, acc[t][b]);
}

// The 2x2 outputs A^T M A + bias of tiles first .. first + count - 1, channels co ..
// co + NB * 16 - 1, from m[e][t][b]; ReLU, pool, store.
template <int NB, bool POOL, typename Out>
void transform_output(const ConvBf16Problem& p, const Geometry& g, int64_t first, int64_t count, const float* m,
                      int64_t co) {
  const int64_t e_stride = kTiles * NB * kBf16Block;
  Out* dst = static_cast<Out*>(p.dst) + g.dst_origin + co;
  for (int64_t t = 0; t < count; ++t) {
    const int64_t tile = first + t, n = tile / g.tiles_per_image, in_image = tile % g.tiles_per_image;
    const int64_t ty = in_image / g.tiles_w, tx = in_image % g.tiles_w;
    for (int b = 0; b < NB; ++b) {
      const float* mt = m + (t * NB + b) * kBf16Block;
      typename Unit::Acc s[2][4];  // A^T M
      for (int j = 0; j < 4; ++j) {
        const auto m0 = Unit::load(mt + j * e_stride), m1 = Unit::load(mt + (4 + j) * e_stride);
        const auto m2 = Unit::load(mt + (8 + j) * e_stride), m3 = Unit::load(mt + (12 + j) * e_stride);
        s[0][j] = Unit::add(Unit::add(m0, m1), m2);
        s[1][j] = Unit::sub(Unit::sub(m1, m2), m3);
      }
      const auto bias = Unit::load_bias(p.bias + co + b * kBf16Block);
      typename Unit::Acc y[2][2];  // (A^T M) A + bias
      for (int a = 0; a < 2; ++a) {
        y[a][0] = Unit::add(Unit::add(Unit::add(s[a][0], s[a][1]), s[a][2]), bias);
        y[a][1] = Unit::add(Unit::sub(Unit::sub(s[a][1], s[a][2]), s[a][3]), bias);
      }
      Out* image = dst + n * g.dst_image + b * kBf16Block;
      if constexpr (POOL) {
        const auto top = Unit::max(Unit::max(y[0][0], y[0][1]), Unit::max(y[1][0], y[1][1]));
        Unit::store(image + ty * g.dst_row + tx * p.out_channels, p.relu ? Unit::relu(top) : top);
      } else {
        for (int a = 0; a < 2; ++a)
          for (int c = 0; c < 2; ++c)
            Unit::store(image + (2 * ty + a) * g.dst_row + (2 * tx + c) * p.out_channels,
                        p.relu ? Unit::relu(y[a][c]) : y[a][c]);
      }
    }
  }
}

template <int NB, bool POOL, typename Out>
void conv(const ConvBf16Problem& p) {
  const Geometry g(p);
  const int64_t group = NB * kBf16Block, groups = p.out_channels / group;
  const int64_t blocks = (g.tiles + kTiles - 1) / kTiles;
  // Few blocks (small batches): each thread takes a share of the output channels too, and
  // transforms the block's input for itself.
  const int64_t splits =
      blocks >= 2 * p.num_threads ? 1 : std::min(groups, (2 * p.num_threads + blocks - 1) / blocks);
  const int64_t items = blocks * splits, m_stride = kTiles * group;
  const bool parallel = p.num_threads > 1 && g.tiles * kElements * p.in_channels * p.out_channels >= kParallelMacs;
#pragma omp parallel num_threads(p.num_threads) if (parallel)
  {
    std::vector<uint16_t> v(kElements * kTiles * g.channels);
    std::vector<float> m(kElements * m_stride);
#pragma omp for schedule(static)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t block = item / splits, split = item % splits;
      const int64_t first = block * kTiles, count = std::min<int64_t>(kTiles, g.tiles - first);
      transform_input(p, g, first, count, v.data());
      for (int64_t grp = split * groups / splits; grp < (split + 1) * groups / splits; ++grp) {
        const uint16_t* w = p.weight + grp * NB * g.block_stride;
        for (int e = 0; e < kElements; ++e)
          multiply<NB>(g, v.data() + e * kTiles * g.channels, w + e * g.element_stride, m.data() + e * m_stride);
        transform_output<NB, POOL, Out>(p, g, first, count, m.data(), grp * group);
      }
    }
  }
}

}  // namespace

void conv_winograd_bf16_nhwc(const ConvBf16Problem& p) {
  with_pool_and_output(p, [&](auto pool, auto out) {
    constexpr bool kPool = decltype(pool)::value;
    using Out = decltype(out);
    if (p.out_channels % (2 * kBf16Block) == 0) return conv<2, kPool, Out>(p);
    conv<1, kPool, Out>(p);
  });
}

}  // namespace MTK_ISA
}  // namespace mtk
