// NHWC float32 kernels for the fused inference path; compiled once per ISA like the loss
// kernel (MTK_ISA names the namespace). Channels are innermost, so the channel loops
// vectorise; OpenMP splits output rows across threads for large batches.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "conv.h"
#include "float_ops.h"
#include "isa_variant.h"


namespace mtk {
namespace MTK_ISA {
namespace {
// Below this many output values a parallel region costs more than it saves.
constexpr int64_t kParallelOutputs = 1 << 16;
}  // namespace

namespace {

// uint8 (quantized) activations pass through the same templates unchanged.
using mtk::narrow;
using mtk::widen;
inline uint8_t widen(uint8_t v) { return v; }
inline void narrow(uint8_t* dst, uint8_t v) { *dst = v; }

inline float pool_max(float a, float b) { return max_nan(a, b); }
inline uint8_t pool_max(uint8_t a, uint8_t b) { return std::max(a, b); }

// out[c] = max(max of the four window values at c, floor) for c < C: scalar, for the tail
// and the variants without AVX-512.
template <typename T, typename Value>
void pool_channels_scalar(const T* a, const T* b, T* out, int64_t begin, int64_t C, Value floor) {
  for (int64_t c = begin; c < C; ++c) {
    const Value m = pool_max(pool_max(widen(a[c]), widen(a[C + c])), pool_max(widen(b[c]), widen(b[C + c])));
    narrow(out + c, std::max(m, floor));
  }
}

#ifdef __AVX512F__
// vmaxps returns its second operand when either is NaN: a NaN in the first is put back.
inline __m512 max_nan16(__m512 a, __m512 b) {
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q), _mm512_max_ps(a, b), a);
}
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(uint16_t* p, __m512 v) {
  const __m512i bits = _mm512_srli_epi32(_mm512_castps_si512(v), 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(bits));
}

template <typename T>
void pool_channels(const T* a, const T* b, T* out, int64_t C, float floor) {
  const __m512 low = _mm512_set1_ps(floor);
  int64_t c = 0;
  for (; c + 16 <= C; c += 16) {
    const __m512 m = max_nan16(max_nan16(load16(a + c), load16(a + C + c)), max_nan16(load16(b + c), load16(b + C + c)));
    store16(out + c, max_nan16(m, low));  // NaN stays NaN under the ReLU floor, as in PyTorch
  }
  pool_channels_scalar<T, float>(a, b, out, c, C, floor);
}

template <>
void pool_channels<uint8_t>(const uint8_t* a, const uint8_t* b, uint8_t* out, int64_t C, float) {
  int64_t c = 0;
  for (; c + 64 <= C; c += 64) {
    const auto load = [](const uint8_t* p) { return _mm512_loadu_si512(p); };
    const __m512i m = _mm512_max_epu8(_mm512_max_epu8(load(a + c), load(a + C + c)),
                                      _mm512_max_epu8(load(b + c), load(b + C + c)));
    _mm512_storeu_si512(out + c, m);
  }
  pool_channels_scalar<uint8_t, uint8_t>(a, b, out, c, C, uint8_t(0));
}
#else
template <typename T>
void pool_channels(const T* a, const T* b, T* out, int64_t C, float floor) {
  using Value = decltype(widen(T()));
  pool_channels_scalar<T, Value>(a, b, out, 0, C, floor < 0 ? std::numeric_limits<Value>::lowest() : Value(0));
}
#endif

template <typename T>
void maxpool2x2(const MaxPoolProblem& p) {
  const int64_t out_h = p.height / 2, out_w = p.width / 2, C = p.channels;
  const int64_t rows = p.batch * out_h;
  const bool parallel = p.num_threads > 1 && rows * out_w * C >= kParallelOutputs;
  const T* src = static_cast<const T*>(p.src);
  T* dst = static_cast<T*>(p.dst);
  // uint8 activations are quantized ReLU outputs already: ReLU is the identity there.
  const float floor = p.relu ? 0.0f : -std::numeric_limits<float>::infinity();
#pragma omp parallel for num_threads(p.num_threads) if (parallel) schedule(static)
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t n = row / out_h, y = row % out_h;
    const T* top = src + ((n * p.height + 2 * y) * p.width) * C;
    const T* bottom = top + p.width * C;
    T* out = dst + row * out_w * C;
    for (int64_t x = 0; x < out_w; ++x) pool_channels<T>(top + 2 * x * C, bottom + 2 * x * C, out + x * C, C, floor);
  }
}

inline uint8_t quantize_one(float v, float inv_scale, float zero) {
  const float q = std::nearbyint(v * inv_scale) + zero;
  return uint8_t(q != q ? zero : std::min(std::max(q, 0.0f), 255.0f));
}

template <typename T>
void quantize_range(const T* src, uint8_t* dst, int64_t begin, int64_t end, float inv_scale, float zero) {
  int64_t i = begin;
#ifdef __AVX512F__
  const __m512 scale = _mm512_set1_ps(inv_scale), shift = _mm512_set1_ps(zero);
  const __m512 low = _mm512_setzero_ps(), high = _mm512_set1_ps(255.0f);
  for (; i + 16 <= end; i += 16) {
    __m512 q = _mm512_roundscale_ps(_mm512_mul_ps(load16(src + i), scale), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q = _mm512_add_ps(q, shift);
    q = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(q, q, _CMP_UNORD_Q), q, shift);
    q = _mm512_min_ps(_mm512_max_ps(q, low), high);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm512_cvtusepi32_epi8(_mm512_cvtps_epi32(q)));
  }
#endif
  for (; i < end; ++i) dst[i] = quantize_one(widen(src[i]), inv_scale, zero);
}

template <typename T>
void quantize(const QuantizeProblem& p) {
  const T* src = static_cast<const T*>(p.src);
  const int threads = p.num_threads > 1 && p.count >= 4 * kParallelOutputs ? p.num_threads : 1;
  const int64_t chunk = (p.count + threads - 1) / threads;
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
  for (int t = 0; t < threads; ++t)
    quantize_range(src, p.dst, t * chunk, std::min(p.count, (t + 1) * chunk), p.inv_scale, float(p.zero_point));
}

}  // namespace

void maxpool2x2_nhwc(const MaxPoolProblem& p) {
  switch (p.element) {
    case Element::float32: return maxpool2x2<float>(p);
    case Element::bfloat16: return maxpool2x2<uint16_t>(p);
    case Element::uint8: return maxpool2x2<uint8_t>(p);
  }
}

void quantize_u8(const QuantizeProblem& p) {
  if (p.element == Element::bfloat16) return quantize<uint16_t>(p);
  quantize<float>(p);
}

void conv3x3_single_channel_nhwc(const Conv3x3SingleChannelProblem& p) {
  const int64_t H = p.height, W = p.width, C = p.out_channels;
  const int64_t rows = p.batch * H;
  const bool parallel = p.num_threads > 1 && rows * W * C >= kParallelOutputs;
#pragma omp parallel for num_threads(p.num_threads) if (parallel) schedule(static)
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t n = row / H, y = row % H;
    const float* image = p.src + n * H * W;
    float* out = p.dst + row * W * C;
    for (int64_t x = 0; x < W; ++x) {
      float taps[9];
      for (int ky = 0; ky < 3; ++ky)
        for (int kx = 0; kx < 3; ++kx) {
          const int64_t iy = y + ky - 1, ix = x + kx - 1;
          taps[ky * 3 + kx] = (iy >= 0 && iy < H && ix >= 0 && ix < W) ? image[iy * W + ix] : 0.0f;
        }
      float* o = out + x * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        float acc = p.bias[c];
        for (int k = 0; k < 9; ++k) acc += taps[k] * p.weight[k * C + c];
        o[c] = p.relu ? std::max(acc, 0.0f) : acc;
      }
    }
  }
}

namespace {

// Tiles of Winograd F(2x2, 3x3): the 2x2 output blocks of each image, row-major.
struct TileGrid {
  int64_t height, width, tiles_h, tiles_w;
  TileGrid(int64_t h, int64_t w) : height(h), width(w), tiles_h((h + 1) / 2), tiles_w((w + 1) / 2) {}
  int64_t per_image() const { return tiles_h * tiles_w; }
};

// The 16 values (B^T d B)[k] of every channel of one tile, plane k at out + k * plane;
// ``zeros`` (C of them) stands in for every out-of-image pixel, so the channel loop has no branches.
inline void input_tile(const float* src, const TileGrid& g, int64_t tile, int64_t C, const float* zeros, float* out,
                       int64_t plane) {
  const int64_t n = tile / g.per_image(), t = tile % g.per_image();
  const int64_t y0 = 2 * (t / g.tiles_w) - 1, x0 = 2 * (t % g.tiles_w) - 1;
  const float* d[4][4];
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j) {
      const int64_t y = y0 + i, x = x0 + j;
      d[i][j] = (y >= 0 && y < g.height && x >= 0 && x < g.width) ? src + ((n * g.height + y) * g.width + x) * C
                                                                  : zeros;
    }
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    float r[4][4];  // B^T d: rows combined
    for (int j = 0; j < 4; ++j) {
      r[0][j] = d[0][j][c] - d[2][j][c];
      r[1][j] = d[1][j][c] + d[2][j][c];
      r[2][j] = d[2][j][c] - d[1][j][c];
      r[3][j] = d[1][j][c] - d[3][j][c];
    }
    for (int i = 0; i < 4; ++i) {  // (B^T d) B: columns combined
      out[(4 * i + 0) * plane + c] = r[i][0] - r[i][2];
      out[(4 * i + 1) * plane + c] = r[i][1] + r[i][2];
      out[(4 * i + 2) * plane + c] = r[i][2] - r[i][1];
      out[(4 * i + 3) * plane + c] = r[i][1] - r[i][3];
    }
  }
}

// The 16 values (A dy A^T)[k] of every channel of one tile, dy its 2x2 block of src (``zeros``
// past an odd edge), plane k at out + k * plane.
inline void output_adjoint_tile(const float* src, const TileGrid& g, int64_t tile, int64_t C, const float* zeros,
                                float* out, int64_t plane) {
  const int64_t n = tile / g.per_image(), t = tile % g.per_image();
  const int64_t y0 = 2 * (t / g.tiles_w), x0 = 2 * (t % g.tiles_w);
  const float* d[2][2];
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) {
      const int64_t y = y0 + i, x = x0 + j;
      d[i][j] = (y < g.height && x < g.width) ? src + ((n * g.height + y) * g.width + x) * C : zeros;
    }
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    float r[4][2];  // A dy: rows of A are (1, 0), (1, 1), (1, -1), (0, -1)
    for (int j = 0; j < 2; ++j) {
      r[0][j] = d[0][j][c];
      r[1][j] = d[0][j][c] + d[1][j][c];
      r[2][j] = d[0][j][c] - d[1][j][c];
      r[3][j] = -d[1][j][c];
    }
    for (int i = 0; i < 4; ++i) {  // (A dy) A^T
      out[(4 * i + 0) * plane + c] = r[i][0];
      out[(4 * i + 1) * plane + c] = r[i][0] + r[i][1];
      out[(4 * i + 2) * plane + c] = r[i][0] - r[i][1];
      out[(4 * i + 3) * plane + c] = -r[i][1];
    }
  }
}

// Where one tile's outputs go, from channel c0 of a [N, H, W, C] (or pooled [N, H/2, W/2, C])
// output: the pooled value at o[0], or the 2x2 block, positions past an odd edge sent to scratch.
struct TileOutput {
  float* o[2][2];
  TileOutput(float* dst, const TileGrid& g, int64_t tile, int64_t C, int64_t c0, bool pool, float* scratch) {
    const int64_t n = tile / g.per_image(), t = tile % g.per_image();
    const int64_t ty = t / g.tiles_w, tx = t % g.tiles_w;
    if (pool) {
      o[0][0] = o[0][1] = o[1][0] = o[1][1] = dst + ((n * (g.height / 2) + ty) * (g.width / 2) + tx) * C + c0;
      return;
    }
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j) {
        const int64_t y = 2 * ty + i, x = 2 * tx + j;
        o[i][j] = (y < g.height && x < g.width) ? dst + ((n * g.height + y) * g.width + x) * C + c0 : scratch;
      }
  }
};

// y = A^T m A + bias for `count` channels of one tile (m's planes `plane` apart), then ReLU
// (floor 0) or none (floor -inf), and with pool the maximum of the 2x2 block.
inline void output_tile(const float* m, int64_t plane, int64_t count, const float* bias, float floor, bool pool,
                        const TileOutput& out) {
  float *o00 = out.o[0][0], *o01 = out.o[0][1], *o10 = out.o[1][0], *o11 = out.o[1][1];
  // Plain scalars and two separate loops: the compiler vectorises these across channels.
#define MTK_WINOGRAD_BLOCK                                                                       \
  const float a0 = m[c] + m[4 * plane + c] + m[8 * plane + c];                                   \
  const float a1 = m[plane + c] + m[5 * plane + c] + m[9 * plane + c];                           \
  const float a2 = m[2 * plane + c] + m[6 * plane + c] + m[10 * plane + c];                      \
  const float a3 = m[3 * plane + c] + m[7 * plane + c] + m[11 * plane + c];                      \
  const float b0 = m[4 * plane + c] - m[8 * plane + c] - m[12 * plane + c];                      \
  const float b1 = m[5 * plane + c] - m[9 * plane + c] - m[13 * plane + c];                      \
  const float b2 = m[6 * plane + c] - m[10 * plane + c] - m[14 * plane + c];                     \
  const float b3 = m[7 * plane + c] - m[11 * plane + c] - m[15 * plane + c];                     \
  const float y00 = a0 + a1 + a2, y01 = a1 - a2 - a3, y10 = b0 + b1 + b2, y11 = b1 - b2 - b3;
  if (pool) {
#pragma omp simd
    for (int64_t c = 0; c < count; ++c) {
      MTK_WINOGRAD_BLOCK
      // the bias is the same for the 4 outputs and ReLU is monotonic: pool first
      o00[c] = std::max(max_nan(max_nan(y00, y01), max_nan(y10, y11)) + bias[c], floor);
    }
  } else {
#pragma omp simd
    for (int64_t c = 0; c < count; ++c) {
      MTK_WINOGRAD_BLOCK
      o00[c] = std::max(y00 + bias[c], floor);
      o01[c] = std::max(y01 + bias[c], floor);
      o10[c] = std::max(y10 + bias[c], floor);
      o11[c] = std::max(y11 + bias[c], floor);
    }
  }
#undef MTK_WINOGRAD_BLOCK
}

inline float relu_floor(bool relu) { return relu ? 0.0f : -std::numeric_limits<float>::infinity(); }

// The GEMM of the one-pass Winograd convolution works on register tiles of kGemmRows tiles x
// kWinogradBlock output channels, as kGemmRows * kBlockVectors vector accumulators: 12 of
// AVX-512's 32 registers, 12 of AVX2's 16, 8 of SSE's 16.
#if defined(__AVX512F__)
constexpr int kVectorWidth = 16, kGemmRows = 6;
#elif defined(__AVX2__)
constexpr int kVectorWidth = 8, kGemmRows = 3;
#else
constexpr int kVectorWidth = 4, kGemmRows = 1;
#endif
typedef float FloatVector __attribute__((vector_size(kVectorWidth * sizeof(float))));
constexpr int kBlockVectors = int(kWinogradBlock) / kVectorWidth;

inline FloatVector load_vector(const float* p) {
  FloatVector v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store_vector(float* p, FloatVector v) { std::memcpy(p, &v, sizeof(v)); }

// m[r][:] = sum_c v[r * C_in + c] * u[c][:] for r < Rows: one of the 16 GEMMs for Rows tiles and
// one block of output channels (u: [C_in, kWinogradBlock]). The accumulators are loaded and
// stored one vector at a time, so none lives in memory.
template <int Rows>
void gemm_tile_rows(const float* v, int64_t c_in, const float* u, float* m) {
  FloatVector acc[Rows][kBlockVectors] = {};
  for (int64_t c = 0; c < c_in; ++c) {
    FloatVector w[kBlockVectors];
    for (int j = 0; j < kBlockVectors; ++j) w[j] = load_vector(u + c * kWinogradBlock + j * kVectorWidth);
    for (int r = 0; r < Rows; ++r) {
      const float s = v[r * c_in + c];
      for (int j = 0; j < kBlockVectors; ++j) acc[r][j] += s * w[j];
    }
  }
  for (int r = 0; r < Rows; ++r)
    for (int j = 0; j < kBlockVectors; ++j) store_vector(m + r * kWinogradBlock + j * kVectorWidth, acc[r][j]);
}

// gemm_tile_rows for 1 <= rows <= Rows rows.
template <int Rows>
void gemm_tile_rows_up_to(int rows, const float* v, int64_t c_in, const float* u, float* m) {
  if constexpr (Rows > 1) {
    if (rows < Rows) return gemm_tile_rows_up_to<Rows - 1>(rows, v, c_in, u, m);
  }
  gemm_tile_rows<Rows>(v, c_in, u, m);
}

// At most this many tiles per work item of the one-pass convolution: its GEMM output,
// 16 x tiles x kWinogradBlock floats (128 KB), stays in the L2 cache until transformed.
constexpr int64_t kMaxGroupTiles = 64;
// Planes of the GEMM output are this many floats more than a multiple of 4 KB apart: the 16
// values of a tile would otherwise fall in the same L1 cache set.
constexpr int64_t kPlanePad = 16;

// Every tile of p through `transform` (input_tile or output_adjoint_tile).
template <typename TileTransform>
void transform_tiles(const WinogradInputProblem& p, TileTransform transform) {
  const TileGrid g(p.height, p.width);
  const int64_t tiles = p.batch * g.per_image(), plane = tiles * p.channels;
  const bool parallel = p.num_threads > 1 && 16 * plane >= kParallelOutputs;
#pragma omp parallel num_threads(p.num_threads) if (parallel)
  {
    const std::vector<float> zeros(p.channels, 0.0f);
#pragma omp for schedule(static)
    for (int64_t tile = 0; tile < tiles; ++tile)
      transform(p.src, g, tile, p.channels, zeros.data(), p.dst + tile * p.channels, plane);
  }
}
}  // namespace

void winograd_input_nhwc(const WinogradInputProblem& p) { transform_tiles(p, input_tile); }

void winograd_output_adjoint_nhwc(const WinogradInputProblem& p) { transform_tiles(p, output_adjoint_tile); }

void winograd_output_nhwc(const WinogradOutputProblem& p) {
  const TileGrid g(p.height, p.width);
  const int64_t C = p.channels, tiles = p.batch * g.per_image(), plane = tiles * C;
  const bool parallel = p.num_threads > 1 && 16 * plane >= kParallelOutputs;
  const float floor = relu_floor(p.relu);
#pragma omp parallel num_threads(p.num_threads) if (parallel)
  {
    std::vector<float> scratch(C);
#pragma omp for schedule(static)
    for (int64_t tile = 0; tile < tiles; ++tile)
      output_tile(p.src + tile * C, plane, C, p.bias, floor, p.pool,
                  TileOutput(p.dst, g, tile, C, 0, p.pool, scratch.data()));
  }
}

void winograd_conv3x3_one_pass_nhwc(const WinogradConvProblem& p) {
  const TileGrid g(p.height, p.width);
  const int64_t c_in = p.in_channels, c_out = p.out_channels;
  const int64_t blocks = (c_out + kWinogradBlock - 1) / kWinogradBlock;
  const int64_t in_image = g.height * g.width * c_in;
  const int64_t out_image = p.pool ? (g.height / 2) * (g.width / 2) * c_out : g.height * g.width * c_out;
  const float floor = relu_floor(p.relu);
  // Even one small image is worth both threads: the layer reads all of U (up to MBs).
  const bool parallel = p.num_threads > 1 && g.per_image() * c_in * c_out >= kParallelOutputs;
#pragma omp parallel num_threads(p.num_threads) if (parallel)
  {
    // Per-thread buffers kept between calls (OpenMP's threads persist): allocating and
    // zero-filling the 130 KB GEMM output on every call shows at batch 1.
    thread_local std::vector<float> zeros, scratch, m;
    if (int64_t(zeros.size()) < c_in) zeros.resize(c_in, 0.0f);  // only ever read
    scratch.resize(kWinogradBlock);
    m.resize(16 * (kMaxGroupTiles * kWinogradBlock + kPlanePad));
    for (int64_t first = 0; first < p.batch; first += p.images_per_chunk) {
      const int64_t images = std::min(p.images_per_chunk, p.batch - first);
      const int64_t tiles = images * g.per_image(), v_plane = tiles * c_in;
      const float* src = p.src + first * in_image;
      float* dst = p.dst + first * out_image;
#pragma omp for schedule(static)
      for (int64_t tile = 0; tile < tiles; ++tile)
        input_tile(src, g, tile, c_in, zeros.data(), p.v + tile * c_in, v_plane);
      // Implicit barriers: all of v is written before the GEMMs read it, and read before the
      // next chunk overwrites it. Work items: a group of tiles x a block of output channels,
      // as few as keep every thread busy, so each thread reads its blocks of U once per chunk;
      // within an item, each of the 16 slices of U's block (C_in x 32) stays in the L1 cache
      // while the group's tiles go through it.
      int64_t groups = std::max((tiles + kMaxGroupTiles - 1) / kMaxGroupTiles, (p.num_threads + blocks - 1) / blocks);
      while ((blocks * groups) % p.num_threads && groups < tiles) ++groups;
      const int64_t group = std::min(kMaxGroupTiles, (tiles + groups - 1) / groups);
      groups = (tiles + group - 1) / group;
#pragma omp for collapse(2) schedule(static)
      for (int64_t block = 0; block < blocks; ++block)
        for (int64_t group_index = 0; group_index < groups; ++group_index) {
          const int64_t c0 = block * kWinogradBlock, first_tile = group_index * group;
          const int64_t group_tiles = std::min(group, tiles - first_tile);
          const float* u = p.u + block * 16 * c_in * kWinogradBlock;
          const int64_t m_plane = group_tiles * kWinogradBlock + kPlanePad;
          for (int k = 0; k < 16; ++k)
            for (int64_t t = 0; t < group_tiles; t += kGemmRows)
              gemm_tile_rows_up_to<kGemmRows>(int(std::min<int64_t>(kGemmRows, group_tiles - t)),
                                              p.v + k * v_plane + (first_tile + t) * c_in, c_in,
                                              u + k * c_in * kWinogradBlock,
                                              m.data() + k * m_plane + t * kWinogradBlock);
          for (int64_t t = 0; t < group_tiles; ++t)
            output_tile(m.data() + t * kWinogradBlock, m_plane,
                        std::min(kWinogradBlock, c_out - c0), p.bias + c0, floor, p.pool,
                        TileOutput(dst, g, first_tile + t, c_out, c0, p.pool, scratch.data()));
        }
    }
  }
}

namespace {
// Weight rows dotted at once with each input row: independent chains of multiply-adds (one
// row's chain waits on each add's latency, and a 2304-wide BKNet head row ran at a quarter
// of the rate its weights stream in), and each input value loaded once for all of them.
constexpr int64_t kLinearRows = 4;
}  // namespace

void grouped_linear(const GroupedLinearProblem& p) {
  const int64_t rows = p.groups * p.out_features, in = p.in_features, width_in = p.groups * in;
  const int64_t quads = (p.out_features + kLinearRows - 1) / kLinearRows;
  const bool parallel = p.num_threads > 1 && rows * in >= kParallelOutputs;
#pragma omp parallel for num_threads(p.num_threads) if (parallel) schedule(static)
  for (int64_t item = 0; item < p.groups * quads; ++item) {
    const int64_t group = item / quads, first = group * p.out_features + item % quads * kLinearRows;
    const int64_t count = std::min(kLinearRows, (group + 1) * p.out_features - first);
    // A short last quad repeats its last row: computed, not written.
    const float* w0 = p.weight + first * in;
    const float* w1 = p.weight + (first + std::min<int64_t>(1, count - 1)) * in;
    const float* w2 = p.weight + (first + std::min<int64_t>(2, count - 1)) * in;
    const float* w3 = p.weight + (first + std::min<int64_t>(3, count - 1)) * in;
    const float* x = p.src + group * in;
    for (int64_t n = 0; n < p.batch; ++n) {
      const float* xn = x + n * width_in;
      float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
      for (int64_t i = 0; i < in; ++i) {
        const float v = xn[i];
        a0 += v * w0[i];
        a1 += v * w1[i];
        a2 += v * w2[i];
        a3 += v * w3[i];
      }
      const float acc[kLinearRows] = {a0, a1, a2, a3};
      for (int64_t j = 0; j < count; ++j) {
        const float y = acc[j] + p.bias[first + j];
        p.dst[n * rows + first + j] = p.relu ? std::max(y, 0.0f) : y;
      }
    }
  }
}

}  // namespace MTK_ISA
}  // namespace mtk
