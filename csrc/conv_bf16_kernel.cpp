// Direct bfloat16 convolution (conv_bf16.h), compiled once per ISA. An output tile of
// 2 rows x 6 columns x 32 channels (3 columns x 64 channels on maps narrower than 6) keeps its
// 24 float32 accumulators in registers over all K * K * C_in / 2 input-channel pairs: per pair,
// 2 weight vectors are loaded and each of the 12 pixels' pair is broadcast, for 24 dot
// products. The pool takes the maximum of the tile's 2x2 windows straight from the
// accumulators, so the unpooled output is never stored.
#include <immintrin.h>
#include <omp.h>

#include <cstdint>
#include <cstring>

#include "bf16_unit.h"
#include "conv_bf16.h"
#include "isa_variant.h"

namespace mtk {
namespace MTK_ISA {
namespace {

// Below this many multiply-adds a parallel region costs more than it saves.
constexpr int64_t kParallelMacs = int64_t(1) << 20;
constexpr int kTileRows = 2, kTileColumns = 6;
// Half of a core's level-2 cache (1 MB on the CPUs measured).
constexpr int64_t kImagesOuterWeightBytes = int64_t(512) << 10;

// Strides (in elements) of the problem's buffers, and the output's size.
struct Geometry {
  int64_t channels, in_row, in_image, pairs, taps, tap_stride, block_stride;
  int64_t kernel, stride, pad, out_h, out_w;  // out_h x out_w: the conv's output, before the pool
  int64_t dst_row, dst_image, dst_origin;  // dst_origin: the offset of output pixel (0, 0)
  explicit Geometry(const ConvBf16Problem& p) {
    kernel = p.kernel_size;
    stride = p.stride;
    pad = (kernel - 1) / 2;
    channels = p.in_channels;
    in_row = (p.width + 2 * pad) * channels;
    in_image = (p.height + 2 * pad) * in_row;
    pairs = channels / 2;
    taps = kernel * kernel;
    tap_stride = pairs * 2 * kBf16Block;
    block_stride = taps * tap_stride;
    out_h = (p.height - 1) / stride + 1;
    out_w = (p.width - 1) / stride + 1;
    const int64_t rows = p.pool ? out_h / 2 : out_h, columns = p.pool ? out_w / 2 : out_w;
    dst_row = (columns + 2 * p.dst_pad) * p.out_channels;
    dst_image = (rows + 2 * p.dst_pad) * dst_row;
    dst_origin = p.dst_pad * (dst_row + p.out_channels);
  }
};

// Which rows / columns of a tile a tap skips, as bits: kFirst (the tile's first row or column
// reads the zero border for this tap) and kLast (its last one does).
constexpr int kFirst = 1, kLast = 2;

template <int N, int SKIP>
constexpr bool skipped(int i) {
  return ((SKIP & kFirst) && i == 0) || ((SKIP & kLast) && i == N - 1);
}

// acc += one tap's products over all input-channel pairs, for the tile's pixels that read
// inside the image: a tap on the border skips the row or column that would read only zeros
// (on BKNet's 6x6 maps that is 21% of the products). Inlined, so that the accumulators stay in
// registers (through a call they went to memory, at half the speed).
template <int ROWS, int COLS, int NB, int SKIP_ROWS, int SKIP_COLS>
[[gnu::always_inline]] inline void accumulate(typename Unit::Acc (&acc)[ROWS][COLS][NB], const Geometry& g,
                                              const uint16_t* tap_in, const uint16_t* tap_w) {
  const int64_t row_step = g.stride * g.in_row, column_step = g.stride * g.channels;
  for (int64_t cp = 0; cp < g.pairs; ++cp) {
    typename Unit::Weights wv[NB];
    for (int b = 0; b < NB; ++b) wv[b] = Unit::load_weights(tap_w + b * g.block_stride + cp * 2 * kBf16Block);
    for (int r = 0; r < ROWS; ++r) {
      if (skipped<ROWS, SKIP_ROWS>(r)) continue;
      for (int c = 0; c < COLS; ++c) {
        if (skipped<COLS, SKIP_COLS>(c)) continue;
        const uint16_t* pair = tap_in + r * row_step + c * column_step + 2 * cp;
        for (int b = 0; b < NB; ++b) Unit::dot(acc[r][c][b], pair, wv[b]);
      }
    }
  }
}

template <int ROWS, int COLS, int NB, int SKIP_ROWS>
[[gnu::always_inline]] inline void accumulate_columns(typename Unit::Acc (&acc)[ROWS][COLS][NB], const Geometry& g,
                                                      const uint16_t* tap_in, const uint16_t* tap_w,
                                                      int skip_columns) {
  switch (skip_columns) {
    case 0: return accumulate<ROWS, COLS, NB, SKIP_ROWS, 0>(acc, g, tap_in, tap_w);
    case kFirst: return accumulate<ROWS, COLS, NB, SKIP_ROWS, kFirst>(acc, g, tap_in, tap_w);
    case kLast: return accumulate<ROWS, COLS, NB, SKIP_ROWS, kLast>(acc, g, tap_in, tap_w);
    default: return accumulate<ROWS, COLS, NB, SKIP_ROWS, kFirst | kLast>(acc, g, tap_in, tap_w);
  }
}

// The skip bits of the output span first .. first + count - 1 (rows or columns) for a tap at
// offset k: which of its ends read outside the input's extent.
inline int skips(const Geometry& g, int64_t first, int64_t count, int64_t k, int64_t extent) {
  const int64_t begin = first * g.stride + k - g.pad, end = (first + count - 1) * g.stride + k - g.pad;
  return (begin < 0 ? kFirst : 0) | (end >= extent ? kLast : 0);
}

// Output rows y .. y + ROWS - 1, columns x .. x + COLS - 1, channels co .. co + NB * 16 - 1 of
// image n; with POOL (ROWS = 2, COLS even) their 2x2 maxima at row y / 2, columns x / 2 ...
template <int ROWS, int COLS, int NB, bool POOL, typename Out>
void tile(const ConvBf16Problem& p, const Geometry& g, int64_t n, int64_t y, int64_t x, int64_t co) {
  typename Unit::Acc acc[ROWS][COLS][NB];
  for (int b = 0; b < NB; ++b) {
    const typename Unit::Acc bias = Unit::load_bias(p.bias + co + b * kBf16Block);
    for (int r = 0; r < ROWS; ++r)
      for (int c = 0; c < COLS; ++c) acc[r][c][b] = bias;
  }
  // Output (y, x)'s window starts at (stride y, stride x) of the (zero-bordered) input.
  const uint16_t* in = p.src + n * g.in_image + y * g.stride * g.in_row + x * g.stride * g.channels;
  const uint16_t* w = p.weight + (co / kBf16Block) * g.block_stride;
  for (int64_t tap = 0; tap < g.taps; ++tap) {
    const int64_t ky = tap / g.kernel, kx = tap % g.kernel;
    const uint16_t* tap_in = in + ky * g.in_row + kx * g.channels;
    const uint16_t* tap_w = w + tap * g.tap_stride;
    const int skip_columns = skips(g, x, COLS, kx, p.width);
    switch (skips(g, y, ROWS, ky, p.height)) {
      case 0: accumulate_columns<ROWS, COLS, NB, 0>(acc, g, tap_in, tap_w, skip_columns); break;
      case kFirst: accumulate_columns<ROWS, COLS, NB, kFirst>(acc, g, tap_in, tap_w, skip_columns); break;
      case kLast: accumulate_columns<ROWS, COLS, NB, kLast>(acc, g, tap_in, tap_w, skip_columns); break;
      default: accumulate_columns<ROWS, COLS, NB, kFirst | kLast>(acc, g, tap_in, tap_w, skip_columns);
    }
  }
  Out* dst = static_cast<Out*>(p.dst) + n * g.dst_image + g.dst_origin + co;
  if constexpr (POOL) {
    static_assert(ROWS == 2 && COLS % 2 == 0, "a pooled tile covers whole 2x2 windows");
    Out* row = dst + (y / 2) * g.dst_row + (x / 2) * p.out_channels;
    for (int c = 0; c < COLS / 2; ++c)
      for (int b = 0; b < NB; ++b) {
        typename Unit::Acc m = Unit::max(Unit::max(acc[0][2 * c][b], acc[0][2 * c + 1][b]),
                                         Unit::max(acc[1][2 * c][b], acc[1][2 * c + 1][b]));
        Unit::store(row + c * p.out_channels + b * kBf16Block, p.relu ? Unit::relu(m) : m);
      }
  } else {
    for (int r = 0; r < ROWS; ++r) {
      Out* row = dst + (y + r) * g.dst_row + x * p.out_channels;
      for (int c = 0; c < COLS; ++c)
        for (int b = 0; b < NB; ++b)
          Unit::store(row + c * p.out_channels + b * kBf16Block, p.relu ? Unit::relu(acc[r][c][b]) : acc[r][c][b]);
    }
  }
}

// One band of ROWS output rows across the whole width: full tiles, then the narrower tails.
// Four channel blocks (maps narrower than a 6-column tile) take tiles of 3 columns (2 with a
// pool): 24 (16) accumulators again.
template <int ROWS, int NB, bool POOL, typename Out>
void band(const ConvBf16Problem& p, const Geometry& g, int64_t n, int64_t y, int64_t co) {
  constexpr int kFull = NB < 4 ? kTileColumns : POOL ? 2 : 3;
  int64_t x = 0;
  for (; x + kFull <= g.out_w; x += kFull) tile<ROWS, kFull, NB, POOL, Out>(p, g, n, y, x, co);
  for (; x + 2 <= g.out_w; x += 2) tile<ROWS, 2, NB, POOL, Out>(p, g, n, y, x, co);
  if constexpr (!POOL) {
    if (x < g.out_w) tile<ROWS, 1, NB, POOL, Out>(p, g, n, y, x, co);
  }
}

template <int NB, bool POOL, typename Out>
void conv(const ConvBf16Problem& p) {
  const Geometry g(p);
  const int64_t bands = (g.out_h + kTileRows - 1) / kTileRows;  // pool: out_h is even
  const int64_t group = NB * kBf16Block, items = (p.out_channels / group) * p.batch * bands;
  const int64_t macs = p.batch * g.out_h * g.out_w * p.out_channels * g.taps * p.in_channels;
  const bool parallel = p.num_threads > 1 && macs >= kParallelMacs;
  // Images outermost where the whole weight stays in each core's cache: a thread then reads
  // its images once, for all output channels. Else output-channel groups outermost, so that
  // each thread's share of the weights stays in its cache.
  const int64_t groups = p.out_channels / group, weight_bytes = p.out_channels * g.taps * p.in_channels * 2;
  const bool images_outer = p.batch >= p.num_threads && weight_bytes <= kImagesOuterWeightBytes;
#pragma omp parallel for num_threads(p.num_threads) if (parallel) schedule(static)
  for (int64_t item = 0; item < items; ++item) {
    int64_t n, co;
    if (images_outer) {
      n = item / (groups * bands);
      co = item / bands % groups * group;
    } else {
      co = item / (p.batch * bands) * group;
      n = item / bands % p.batch;
    }
    const int64_t y = item % bands * kTileRows;
    if (y + kTileRows <= g.out_h) {
      band<kTileRows, NB, POOL, Out>(p, g, n, y, co);
    } else if constexpr (!POOL) {
      band<1, NB, POOL, Out>(p, g, n, y, co);
    }
  }
}

}  // namespace

// Two channel blocks a tile (2 x 6 pixels); four where the map is narrower than 6 columns,
// whose few pixels would leave tiles of 2 to 8 accumulators waiting on the dot product's
// latency (ResNet's 3x3 maps).
void conv_bf16_nhwc(const ConvBf16Problem& p) {
  const int64_t out_w = (p.width - 1) / p.stride + 1;
  with_pool_and_output(p, [&](auto pool, auto out) {
    constexpr bool kPool = decltype(pool)::value;
    using Out = decltype(out);
    if (out_w < kTileColumns && p.out_channels % (4 * kBf16Block) == 0) return conv<4, kPool, Out>(p);
    if (p.out_channels % (2 * kBf16Block) == 0) return conv<2, kPool, Out>(p);
    conv<1, kPool, Out>(p);
  });
}

}  // namespace MTK_ISA
}  // namespace mtk
