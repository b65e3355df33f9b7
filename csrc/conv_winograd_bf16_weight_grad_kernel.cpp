// Weight gradient of the bfloat16 Winograd convolution (conv_winograd_bf16.h), compiled once
// per ISA: 16 GEMMs d U[e] += V[e]^T d M[e] whose long dimension, the one summed over, is the
// batch's tiles. The tiles are taken kBlockTiles at a time; their V and d M are transformed
// into a per-thread buffer with the tiles in pairs, the layout of the bf16 dot-product
// instruction (v[e][t / 2][c][t % 2]), so each instruction sums two tiles' products for 16
// output channels. Each thread sums its tiles into its own float32 d U; the threads' sums are
// added at the end, where each filter's G^T d U G is taken. Against oneDNN's direct weight
// gradient this takes 16 products per tile where the direct one takes 36.
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

constexpr int kElements = 16;
// Tiles per transform block. From 32 to 128 tiles made little difference (BKNet's layers at
// batch 128) once the groups below were padded; d U is read and written once per block.
constexpr int64_t kBlockTiles = 96;
// Each group of 16 channels' pairs is padded by one cache line: at power-of-two strides (64
// tiles) the streams fell into the same level-1 cache sets and the 32- and 64-channel layers
// ran 1.3-1.5x slower.
constexpr int64_t kGroupPad = 32;
constexpr int kRows = 8;  // input channels per register block (x NB blocks of 16 output channels)
constexpr int64_t kParallelMacs = int64_t(1) << 20;

// store(4 * i + j, (B^T d B)[i][j]) for the 4x4 patch d whose row r, column c is load(r, c):
// the rows' differences and sums first, then the columns', as conv_winograd_bf16_kernel.cpp
// computes V. That kernel keeps its own copy of these lines, with its loads and stores inline:
// through this helper it measured 4-20% slower on BKNet's 32-channel layers at batch 128.
template <typename Load, typename Store>
void input_transform(Load load, Store store) {
  typename Unit::Acc rows[4][4];  // B^T d
  for (int j = 0; j < 4; ++j) {
    const auto d0 = load(0, j), d1 = load(1, j), d2 = load(2, j), d3 = load(3, j);
    rows[0][j] = Unit::sub(d0, d2);
    rows[1][j] = Unit::add(d1, d2);
    rows[2][j] = Unit::sub(d2, d1);
    rows[3][j] = Unit::sub(d1, d3);
  }
  for (int i = 0; i < 4; ++i) {
    store(4 * i, Unit::sub(rows[i][0], rows[i][2]));
    store(4 * i + 1, Unit::add(rows[i][1], rows[i][2]));
    store(4 * i + 2, Unit::sub(rows[i][2], rows[i][1]));
    store(4 * i + 3, Unit::sub(rows[i][1], rows[i][3]));
  }
}

struct Tiles {
  int64_t tiles_w, per_image, count;
  explicit Tiles(const ConvWinogradBf16WeightGradProblem& p)
      : tiles_w(p.width / 2), per_image((p.height / 2) * (p.width / 2)), count(p.batch * per_image) {}
};

// Tile `tile`'s 16 transforms, channels c .. c + 15 stored in slot tile % 2 of the pair at
// v + e * e_stride + (c / 16) * group_stride: V of x's patch (zero outside the image).
void transform_input(const ConvWinogradBf16WeightGradProblem& p, const Tiles& g, int64_t tile, uint16_t* v,
                     int64_t e_stride, int64_t group_stride) {
  const int64_t n = tile / g.per_image, ty = tile % g.per_image / g.tiles_w, tx = tile % g.tiles_w;
  const int64_t row = p.width * p.in_channels, y0 = 2 * ty - 1, x0 = 2 * tx - 1;
  const uint16_t* image = p.src + n * p.height * row;
  for (int64_t c = 0; c < p.in_channels; c += kBf16Block) {
    input_transform(
        [&](int r, int col) {
          const int64_t y = y0 + r, x = x0 + col;
          return (y < 0 || y >= p.height || x < 0 || x >= p.width) ? Unit::zero()
                                                                 : Unit::load(image + y * row + x * p.in_channels + c);
        },
        [&](int e, const auto& value) {
          Unit::store_slot(v + e * e_stride + c / kBf16Block * group_stride, value, tile % 2);
        });
  }
}

// The same for d M = A d y A^T of the tile's 2x2 block of the output gradient, with
// A = [[1, 0], [1, 1], [1, -1], [0, -1]].
void transform_grad(const ConvWinogradBf16WeightGradProblem& p, const Tiles& g, int64_t tile, uint16_t* m,
                    int64_t e_stride, int64_t group_stride) {
  const int64_t n = tile / g.per_image, ty = tile % g.per_image / g.tiles_w, tx = tile % g.tiles_w;
  const int64_t row = p.width * p.out_channels;
  const uint16_t* block = p.grad + n * p.height * row + 2 * ty * row + 2 * tx * p.out_channels;
  for (int64_t c = 0; c < p.out_channels; c += kBf16Block) {
    typename Unit::Acc t[2][4];  // d y A^T
    for (int a = 0; a < 2; ++a) {
      const auto g0 = Unit::load(block + a * row + c), g1 = Unit::load(block + a * row + p.out_channels + c);
      t[a][0] = g0;
      t[a][1] = Unit::add(g0, g1);
      t[a][2] = Unit::sub(g0, g1);
      t[a][3] = Unit::sub(Unit::zero(), g1);
    }
    uint16_t* out = m + c / kBf16Block * group_stride;
    for (int j = 0; j < 4; ++j) {  // A (d y A^T)
      Unit::store_slot(out + j * e_stride, t[0][j], tile % 2);
      Unit::store_slot(out + (4 + j) * e_stride, Unit::add(t[0][j], t[1][j]), tile % 2);
      Unit::store_slot(out + (8 + j) * e_stride, Unit::sub(t[0][j], t[1][j]), tile % 2);
      Unit::store_slot(out + (12 + j) * e_stride, Unit::sub(Unit::zero(), t[1][j]), tile % 2);
    }
  }
}

// du[ci][co] += sum over the pairs of v[pair][ci][.] . m[pair][co][.] for one element. v and
// m hold each group of 16 channels' pairs one after the other (group_stride apart), so a
// register block reads both as two contiguous streams.
template <int NB>
void accumulate(const uint16_t* v, const uint16_t* m, int64_t pairs, int64_t group_stride, int64_t c_in,
                int64_t c_out, float* du) {
  for (int64_t ci = 0; ci < c_in; ci += kRows)
    for (int64_t co = 0; co < c_out; co += NB * kBf16Block) {
      typename Unit::Acc acc[kRows][NB];
      for (int r = 0; r < kRows; ++r)
        for (int b = 0; b < NB; ++b) acc[r][b] = Unit::load(du + (ci + r) * c_out + co + b * kBf16Block);
      const uint16_t* x = v + ci / kBf16Block * group_stride + 2 * (ci % kBf16Block);
      const uint16_t* w = m + co / kBf16Block * group_stride;
      for (int64_t pair = 0; pair < pairs; ++pair) {
        typename Unit::Weights wv[NB];
        for (int b = 0; b < NB; ++b) wv[b] = Unit::load_weights(w + b * group_stride + 2 * kBf16Block * pair);
        const uint16_t* row = x + 2 * kBf16Block * pair;
        for (int r = 0; r < kRows; ++r)
          for (int b = 0; b < NB; ++b) Unit::dot(acc[r][b], row + 2 * r, wv[b]);
      }
      for (int r = 0; r < kRows; ++r)
        for (int b = 0; b < NB; ++b) Unit::store(du + (ci + r) * c_out + co + b * kBf16Block, acc[r][b]);
    }
}

template <int NB>
bool weight_grad(const ConvWinogradBf16WeightGradProblem& p) {
  const Tiles g(p);
  const int64_t c_in = p.in_channels, c_out = p.out_channels, u_size = kElements * c_in * c_out;
  const int64_t blocks = (g.count + kBlockTiles - 1) / kBlockTiles, pairs_max = kBlockTiles / 2;
  // Per element: each group of 16 channels' pairs, [pair][channel][slot], one after the other.
  const int64_t group_stride = pairs_max * 2 * kBf16Block + kGroupPad;
  const int64_t v_stride = c_in / kBf16Block * group_stride, m_stride = c_out / kBf16Block * group_stride;
  const bool parallel = p.num_threads > 1 && g.count * kElements * c_in * c_out >= kParallelMacs;
  const int threads = parallel ? p.num_threads : 1;
  std::vector<float> partial(static_cast<size_t>(threads) * u_size);  // each thread's d U[e][ci][co], zeroed
#pragma omp parallel num_threads(threads) if (parallel)
  {
    float* du = partial.data() + omp_get_thread_num() * u_size;
    std::vector<uint16_t> v(kElements * v_stride), m(kElements * m_stride);
#pragma omp for schedule(static)
    for (int64_t block = 0; block < blocks; ++block) {
      const int64_t first = block * kBlockTiles, count = std::min(kBlockTiles, g.count - first);
      const int64_t pairs = (count + 1) / 2;
      for (int64_t t = 0; t < count; ++t) {
        transform_input(p, g, first + t, v.data() + t / 2 * 2 * kBf16Block, v_stride, group_stride);
        transform_grad(p, g, first + t, m.data() + t / 2 * 2 * kBf16Block, m_stride, group_stride);
      }
      if (count % 2) {  // the odd tile's partner: zero products
        const auto zero_partner = [&](uint16_t* buffer, int64_t groups) {
          uint16_t* last_pair = buffer + (pairs - 1) * 2 * kBf16Block;
          for (int64_t group = 0; group < kElements * groups; ++group)  // e_stride = groups x group_stride
            for (int j = 0; j < kBf16Block; ++j) last_pair[group * group_stride + 2 * j + 1] = 0;
        };
        zero_partner(v.data(), c_in / kBf16Block);
        zero_partner(m.data(), c_out / kBf16Block);
      }
      for (int e = 0; e < kElements; ++e)
        accumulate<NB>(v.data() + e * v_stride, m.data() + e * m_stride, pairs, group_stride, c_in, c_out,
                       du + e * c_in * c_out);
    }
  }
  // The threads' sums, then d weight[co][ci] = G^T d U G per filter (G's rows: [1, 0, 0],
  // [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]), 16 output channels at a time.
  bool finite = true;
#pragma omp parallel for num_threads(p.num_threads) if (parallel) schedule(static) reduction(&& : finite)
  for (int64_t ci = 0; ci < c_in; ++ci) {
    float du[kElements][kBf16Block], dug[4][3][kBf16Block];
    for (int64_t co = 0; co < c_out; co += kBf16Block) {
      for (int e = 0; e < kElements; ++e) {
        const float* first = partial.data() + (e * c_in + ci) * c_out + co;
        for (int j = 0; j < kBf16Block; ++j) du[e][j] = first[j];
        for (int t = 1; t < threads; ++t)
          for (int j = 0; j < kBf16Block; ++j) du[e][j] += first[t * u_size + j];
      }
      for (int i = 0; i < 4; ++i)  // d U G
        for (int j = 0; j < kBf16Block; ++j) {
          const float sum = 0.5f * (du[4 * i + 1][j] + du[4 * i + 2][j]);
          dug[i][0][j] = du[4 * i][j] + sum;
          dug[i][1][j] = 0.5f * (du[4 * i + 1][j] - du[4 * i + 2][j]);
          dug[i][2][j] = sum + du[4 * i + 3][j];
        }
      for (int b = 0; b < 3; ++b)  // G^T (d U G)
        for (int j = 0; j < kBf16Block; ++j) {
          const float sum = 0.5f * (dug[1][b][j] + dug[2][b][j]);
          float* taps = p.grad_weight + ((co + j) * c_in + ci) * 9;
          taps[b] = dug[0][b][j] + sum;
          taps[3 + b] = 0.5f * (dug[1][b][j] - dug[2][b][j]);
          taps[6 + b] = sum + dug[3][b][j];
          // x - x is 0 for every finite x, NaN for inf and NaN
          finite = finite && taps[b] - taps[b] == 0.0f && taps[3 + b] - taps[3 + b] == 0.0f &&
                   taps[6 + b] - taps[6 + b] == 0.0f;
        }
    }
  }
  return finite;
}

}  // namespace

bool conv_winograd_bf16_weight_grad_nhwc(const ConvWinogradBf16WeightGradProblem& p) {
  if (p.out_channels % (2 * kBf16Block) == 0) return weight_grad<2>(p);
  return weight_grad<1>(p);
}

}  // namespace MTK_ISA
}  // namespace mtk
