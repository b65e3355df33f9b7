// Training-mode BatchNorm + ReLU kernels (see batchnorm.h); compiled once per ISA.
// Channels are innermost, so every channel loop vectorises; rows are split across threads.
// Each kernel is a template over the stored activation type (float or bfloat16 bits).
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "batchnorm.h"
#include "isa_variant.h"

namespace mtk {
namespace MTK_ISA {
namespace {
// Below this many values a parallel region costs more than it saves.
constexpr int64_t kParallelValues = 1 << 16;

int threads_for(int64_t values, int requested) { return values >= kParallelValues ? std::max(1, requested) : 1; }

// The normalised, scaled and shifted input before the ReLU: one expression for the forward
// pass and the backward mask, so both round (and contract) it the same way; V is float or a
// vector of floats.
template <typename V>
inline V affine(V x, V scale, V shift) {
  return x * scale + shift;
}
inline float relu_affine(float x, float scale, float shift) { return std::max(affine(x, scale, shift), 0.0f); }

// One 2x2 window of the pooled layers at x (channel c; the other three inputs `right`,
// `down` and `down + right` values on): the maximum of the four ReLU outputs as stored in
// T, chosen as PyTorch's max-pool does (the first of equal maxima; a NaN over anything),
// with its input x and pre-ReLU value. Comparing stored values keeps the unfused layers'
// choice where bfloat16 rounding makes two outputs equal.
struct WindowMax {
  float y, x, pre_relu;
  int index;

  // Value k replaces the maximum so far where PyTorch's max-pool takes it: strictly
  // greater, or a NaN. Two selects, not one on `greater || nan`: GCC vectorises no loop
  // around that condition.
  void consider(float y_k, float x_k, float pre_k, int k) {
    take_if(y_k > y, y_k, x_k, pre_k, k);
    take_if(y_k != y_k, y_k, x_k, pre_k, k);
  }
  void take_if(bool take, float y_k, float x_k, float pre_k, int k) {
    y = take ? y_k : y;
    x = take ? x_k : x;
    pre_relu = take ? pre_k : pre_relu;
    index = take ? k : index;
  }
};

template <typename T>
inline WindowMax window_max(const T* x, int64_t c, int64_t right, int64_t down, float scale, float shift) {
  const float x0 = widen(x[c]), x1 = widen(x[c + right]), x2 = widen(x[c + down]), x3 = widen(x[c + down + right]);
  const float p0 = affine(x0, scale, shift), p1 = affine(x1, scale, shift), p2 = affine(x2, scale, shift),
              p3 = affine(x3, scale, shift);
  WindowMax m{round_trip<T>(std::max(p0, 0.0f)), x0, p0, 0};
  m.consider(round_trip<T>(std::max(p1, 0.0f)), x1, p1, 1);
  m.consider(round_trip<T>(std::max(p2, 0.0f)), x2, p2, 2);
  m.consider(round_trip<T>(std::max(p3, 0.0f)), x3, p3, 3);
  return m;
}

// Two per-channel double sums over rows: each thread reduces one contiguous block of rows
// into accumulators of its own (never sharing a cache line with another thread's), copies
// them into its slot, and the slots are added in thread order (deterministic).
// thread_fn(begin, end, a, b) adds rows [begin, end) into a and b (zeroed, `channels` each).
template <typename ThreadFn>
void reduce_threads(int64_t rows, int64_t channels, int num_threads, double* out_a, double* out_b,
                    ThreadFn thread_fn) {
  const int threads = threads_for(rows * channels, num_threads);
  std::vector<double> partial(static_cast<size_t>(threads) * 2 * channels, 0.0);
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), n = omp_get_num_threads();
    std::vector<double> local(2 * channels, 0.0);
    thread_fn(rows * t / n, rows * (t + 1) / n, local.data(), local.data() + channels);
    std::copy(local.begin(), local.end(), partial.begin() + static_cast<size_t>(t) * 2 * channels);
  }
  std::fill(out_a, out_a + channels, 0.0);
  std::fill(out_b, out_b + channels, 0.0);
  for (int t = 0; t < threads; ++t) {
    const double* a = partial.data() + static_cast<size_t>(t) * 2 * channels;
    for (int64_t c = 0; c < channels; ++c) {
      out_a[c] += a[c];
      out_b[c] += a[channels + c];
    }
  }
}

// reduce_threads one row at a time: row_fn(r, a, b) adds row r into a and b.
template <typename RowFn>
void reduce_rows(int64_t rows, int64_t channels, int num_threads, double* out_a, double* out_b, RowFn row_fn) {
  reduce_threads(rows, channels, num_threads, out_a, out_b, [&](int64_t begin, int64_t end, double* a, double* b) {
    for (int64_t r = begin; r < end; ++r) row_fn(r, a, b);
  });
}

// The unpooled reductions keep per-thread partial sums, one pair of vectors per kLanes
// channels, in float32 for bfloat16 activations (a square of 8 significant bits is exact,
// and kRowBlock values carry at most kRowBlock - 1 roundings of 2^-24) and in double for
// float32 ones, and add them into the thread's double sums every kRowBlock rows. Rows of at
// most kShortRowBytes are summed kRowGroup at a time in registers before the sums go back
// to memory; longer rows one at a time, in order. Measured on 2-core Zen 4, bfloat16, batch
// 128, against per-value double sums in memory one row at a time (statistics pass; backward
// reduction): 0.45 -> 0.16 and 0.7 -> 0.33 ms at 64 channels 24x24, 1.7 -> 0.4 and 1.9 ->
// 0.8 ms at 32 channels 48x48 (groups of 4 rows); 2.0 -> 1.3-1.6 and 2.8 -> 2.2-2.5 ms at 256
// channels 24x24 (single rows: groups of 4, eight interleaved streams from memory, took
// 2.5 and 4.0 ms).
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX2__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif
constexpr int64_t kRowGroup = 4, kRowBlock = 64, kShortRowBytes = 128;
typedef float Floats __attribute__((vector_size(kLanes * sizeof(float))));
typedef double Doubles __attribute__((vector_size(kLanes * sizeof(double))));
typedef uint16_t Halves __attribute__((vector_size(kLanes * sizeof(uint16_t))));
typedef uint32_t Words __attribute__((vector_size(kLanes * sizeof(uint32_t))));

// The first `count` (<= kLanes) values at p, widened to float32; the other lanes are zero.
inline Floats load_lanes(const float* p, int count) {
  Floats v = {};
  std::memcpy(&v, p, count * sizeof(float));
  return v;
}
inline Floats load_lanes(const uint16_t* p, int count) {
#if defined(__AVX512F__)
  // One zero-extending load; GCC lowers the generic conversion below to two halves and an
  // insert, which made the bfloat16 widening most of these loops' instructions.
  if (count == kLanes) {
    return reinterpret_cast<Floats>(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(p))), 16));
  }
#endif
  Halves h = {};
  std::memcpy(&h, p, count * sizeof(uint16_t));
  return reinterpret_cast<Floats>(__builtin_convertvector(h, Words) << 16);
}

template <typename T>
using LaneSums = std::conditional_t<std::is_same_v<T, float>, Doubles, Floats>;

// Rows [first, first + Rows) added into the partial sums (one pair of vectors per kLanes
// channels): visit(r, c, count, sum_a, sum_b) adds the `count` channels from c of row r.
template <int64_t Rows, typename Sums, typename Visit>
void sweep_rows(int64_t first, int64_t channels, Sums* sums_a, Sums* sums_b, Visit& visit) {
  const auto step = [&](int64_t c, int count) {
    Sums a = sums_a[c / kLanes], b = sums_b[c / kLanes];
    for (int64_t k = 0; k < Rows; ++k) visit(first + k, c, count, a, b);
    sums_a[c / kLanes] = a;
    sums_b[c / kLanes] = b;
  };
  int64_t c = 0;
  for (; c + kLanes <= channels; c += kLanes) step(c, kLanes);
  if (c < channels) step(c, int(channels - c));
}

template <typename T, typename Visit>
void reduce_rows_vectorised(int64_t rows, int64_t channels, int num_threads, double* out_a, double* out_b,
                            Visit visit) {
  using Sums = LaneSums<T>;
  reduce_threads(rows, channels, num_threads, out_a, out_b, [&](int64_t begin, int64_t end, double* a, double* b) {
    const int64_t vectors = (channels + kLanes - 1) / kLanes;
    const bool short_rows = channels * int64_t(sizeof(T)) <= kShortRowBytes;
    std::vector<Sums> partial(2 * vectors);
    Sums *sums_a = partial.data(), *sums_b = sums_a + vectors;
    for (int64_t r0 = begin; r0 < end; r0 += kRowBlock) {
      std::fill(partial.begin(), partial.end(), Sums{});
      const int64_t r1 = std::min(end, r0 + kRowBlock);
      int64_t r = r0;
      if (short_rows) {
        for (; r + kRowGroup <= r1; r += kRowGroup) sweep_rows<kRowGroup>(r, channels, sums_a, sums_b, visit);
      }
      for (; r < r1; ++r) sweep_rows<1>(r, channels, sums_a, sums_b, visit);
      for (int64_t v = 0; v < vectors; ++v) {
        const Doubles da = __builtin_convertvector(sums_a[v], Doubles), db = __builtin_convertvector(sums_b[v], Doubles);
        for (int64_t k = 0; k < kLanes && v * kLanes + k < channels; ++k) {
          a[v * kLanes + k] += da[k];
          b[v * kLanes + k] += db[k];
        }
      }
    }
  });
}

// v rounded to T (narrow's rounding, lane by lane) and its first `count` lanes stored at
// p; returns v as stored, widened again.
inline Floats store_lanes(float* p, Floats v, int count) {
  std::memcpy(p, &v, count * sizeof(float));
  return v;
}
inline Floats store_lanes(uint16_t* p, Floats v, int count) {
  const Words stored = bfloat16_bits(reinterpret_cast<Words>(v), v != v);
  const Halves halves = __builtin_convertvector(stored, Halves);
  std::memcpy(p, &halves, count * sizeof(uint16_t));
  return reinterpret_cast<Floats>(stored << 16);
}

template <typename T>
void stats(const BnStatsProblem& p) {
  const int64_t C = p.channels;
  const T* x = static_cast<const T*>(p.x);
  const auto add = [](LaneSums<T>& sum, LaneSums<T>& sum_sq, Floats value) {
    const auto v = __builtin_convertvector(value, LaneSums<T>);
    sum += v;
    sum_sq += v * v;
  };
  if (p.residual == nullptr) {
    reduce_rows_vectorised<T>(p.rows, C, p.num_threads, p.sum, p.sum_sq,
                              [&](int64_t r, int64_t c, int count, LaneSums<T>& sum, LaneSums<T>& sum_sq) {
                                add(sum, sum_sq, load_lanes(x + r * C + c, count));
                              });
    return;
  }
  const T* residual = static_cast<const T*>(p.residual);
  T* total = static_cast<T*>(p.total);
  reduce_rows_vectorised<T>(p.rows, C, p.num_threads, p.sum, p.sum_sq,
                            [&](int64_t r, int64_t c, int count, LaneSums<T>& sum, LaneSums<T>& sum_sq) {
                              const int64_t at = r * C + c;
                              add(sum, sum_sq, store_lanes(total + at, load_lanes(x + at, count) +
                                                                           load_lanes(residual + at, count),
                                                           count));
                            });
}

template <typename T>
void relu_forward(const BnReluForwardProblem& p) {
  const int64_t C = p.channels;
#pragma omp parallel for num_threads(threads_for(p.rows * C, p.num_threads)) schedule(static)
  for (int64_t r = 0; r < p.rows; ++r) {
    const T* x = static_cast<const T*>(p.x) + r * C;
    T* y = static_cast<T*>(p.y) + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) narrow(y + c, relu_affine(widen(x[c]), p.scale[c], p.shift[c]));
  }
}

// The backward kernels read dy whatever the ReLU mask: loaded under the mask's condition,
// GCC emitted masked loads and the bfloat16 loops ran 2.5x slower.
template <typename T>
void relu_backward_reduce(const BnReluBackwardReduceProblem& p) {
  using Sums = LaneSums<T>;
  const int64_t C = p.channels;
  const T *dy = static_cast<const T*>(p.dy), *x = static_cast<const T*>(p.x);
  reduce_rows_vectorised<T>(p.rows, C, p.num_threads, p.sum_g, p.sum_gx,
                            [&](int64_t r, int64_t c, int count, Sums& sum_g, Sums& sum_gx) {
                              const Floats xc = load_lanes(x + r * C + c, count);
                              const Floats gy = load_lanes(dy + r * C + c, count);
                              const Floats pre = affine(xc, load_lanes(p.scale + c, count),
                                                        load_lanes(p.shift + c, count));
                              const Floats g = pre > Floats{} ? gy : Floats{};
                              const Sums wide_g = __builtin_convertvector(g, Sums);
                              sum_g += wide_g;
                              sum_gx += wide_g * __builtin_convertvector(xc - load_lanes(p.mean + c, count), Sums);
                            });
}

template <typename T, bool GradAdd>
void apply_input_grad(const BnReluBackwardApplyProblem& p) {
  const int64_t C = p.channels;
  const float *scale = p.scale, *shift = p.shift, *gain = p.p, *offset = p.q, *slope = p.s;
#pragma omp parallel for num_threads(threads_for(p.rows * C, p.num_threads)) schedule(static)
  for (int64_t r = 0; r < p.rows; ++r) {
    const T *__restrict dy = static_cast<const T*>(p.dy) + r * C, *__restrict x = static_cast<const T*>(p.x) + r * C;
    const T* __restrict add = GradAdd ? static_cast<const T*>(p.grad_add) + r * C : nullptr;
    T* __restrict dx = static_cast<T*>(p.dx) + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const float xc = widen(x[c]), gy = widen(dy[c]);
      const float g = affine(xc, scale[c], shift[c]) > 0.0f ? gy : 0.0f;
      const float grad = gain[c] * g + offset[c] - slope[c] * xc;
      narrow(dx + c, GradAdd ? grad + widen(add[c]) : grad);
    }
  }
}

template <typename T>
void relu_backward_apply(const BnReluBackwardApplyProblem& p) {
  if (p.grad_add != nullptr) return apply_input_grad<T, true>(p);
  apply_input_grad<T, false>(p);
}

// The pooled layers visit x one row of windows at a time: image n, output row oh.
struct WindowRows {
  int64_t count, out_h, out_w, right, down;  // right, down: value offsets in x

  explicit WindowRows(const Pool2x2& pool, int64_t channels)
      : count(pool.images * (pool.height / 2)), out_h(pool.height / 2), out_w(pool.width / 2),
        right(channels), down(pool.width * channels) {}
  int64_t x_offset(int64_t r, const Pool2x2& pool) const {
    return ((r / out_h) * pool.height + 2 * (r % out_h)) * down;
  }
};

template <typename T>
void relu_pool_forward(const BnReluForwardProblem& p) {
  const int64_t C = p.channels;
  const WindowRows rows(p.pool, C);
  const float *scale = p.scale, *shift = p.shift;
#pragma omp parallel for num_threads(threads_for(p.rows * C, p.num_threads)) schedule(static)
  for (int64_t r = 0; r < rows.count; ++r) {
    for (int64_t ow = 0; ow < rows.out_w; ++ow) {
      const T* x = static_cast<const T*>(p.x) + rows.x_offset(r, p.pool) + 2 * ow * C;
      T* y = static_cast<T*>(p.y) + (r * rows.out_w + ow) * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) narrow(y + c, window_max(x, c, rows.right, rows.down, scale[c], shift[c]).y);
    }
  }
}

template <typename T>
void relu_pool_backward_reduce(const BnReluBackwardReduceProblem& p) {
  const int64_t C = p.channels;
  const WindowRows rows(p.pool, C);
  const float *scale = p.scale, *shift = p.shift, *mean = p.mean;
  reduce_rows(rows.count, C, p.num_threads, p.sum_g, p.sum_gx, [&](int64_t r, double* sum_g, double* sum_gx) {
    for (int64_t ow = 0; ow < rows.out_w; ++ow) {
      const T* __restrict x = static_cast<const T*>(p.x) + rows.x_offset(r, p.pool) + 2 * ow * C;
      const T* __restrict dy = static_cast<const T*>(p.dy) + (r * rows.out_w + ow) * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const WindowMax m = window_max(x, c, rows.right, rows.down, scale[c], shift[c]);
        const float gy = widen(dy[c]);
        const float g = m.pre_relu > 0.0f ? gy : 0.0f;
        sum_g[c] += g;
        sum_gx[c] += static_cast<double>(g) * (m.x - mean[c]);
      }
    }
  });
}

template <typename T>
void relu_pool_backward_apply(const BnReluBackwardApplyProblem& p) {
  const int64_t C = p.channels, H = p.pool.height, W = p.pool.width;
  const WindowRows rows(p.pool, C);
  const float *scale = p.scale, *shift = p.shift, *gain = p.p, *offset = p.q, *slope = p.s;
  // dx of values in no window (an odd last column or row): no gradient reaches them.
  const auto ungraded = [&](int64_t first, int64_t count) {
    const T* __restrict x = static_cast<const T*>(p.x) + first;
    T* __restrict dx = static_cast<T*>(p.dx) + first;
    for (int64_t i = 0; i < count; i += C) {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) narrow(dx + i + c, offset[c] - slope[c] * widen(x[i + c]));
    }
  };
#pragma omp parallel for num_threads(threads_for(p.rows * C, p.num_threads)) schedule(static)
  for (int64_t r = 0; r < rows.count; ++r) {
    const int64_t first = rows.x_offset(r, p.pool);
    for (int64_t ow = 0; ow < rows.out_w; ++ow) {
      const int64_t at = first + 2 * ow * C;
      const T* __restrict x = static_cast<const T*>(p.x) + at;
      const T* __restrict dy = static_cast<const T*>(p.dy) + (r * rows.out_w + ow) * C;
      T* __restrict dx = static_cast<T*>(p.dx) + at;
      const int64_t right = rows.right, down = rows.down;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const WindowMax m = window_max(x, c, right, down, scale[c], shift[c]);
        const float gy = widen(dy[c]);
        const float g = m.pre_relu > 0.0f ? gy : 0.0f;
        const float g0 = m.index == 0 ? g : 0.0f, g1 = m.index == 1 ? g : 0.0f, g2 = m.index == 2 ? g : 0.0f,
                    g3 = m.index == 3 ? g : 0.0f;
        narrow(dx + c, gain[c] * g0 + offset[c] - slope[c] * widen(x[c]));
        narrow(dx + right + c, gain[c] * g1 + offset[c] - slope[c] * widen(x[right + c]));
        narrow(dx + down + c, gain[c] * g2 + offset[c] - slope[c] * widen(x[down + c]));
        narrow(dx + down + right + c, gain[c] * g3 + offset[c] - slope[c] * widen(x[down + right + c]));
      }
    }
    if (W % 2) {
      ungraded(first + (W - 1) * C, C);
      ungraded(first + rows.down + (W - 1) * C, C);
    }
  }
  if (H % 2) {
#pragma omp parallel for num_threads(threads_for(p.pool.images * W * C, p.num_threads)) schedule(static)
    for (int64_t n = 0; n < p.pool.images; ++n) ungraded(((n + 1) * H - 1) * rows.down, rows.down);
  }
}

// The kernel for the problem's element type: float32 or bfloat16 (uint8 is not an
// activation these layers see).
template <typename Problem, typename Float, typename Bf16>
void by_element(const Problem& p, Float float_kernel, Bf16 bf16_kernel) {
  if (p.element == Element::bfloat16) return bf16_kernel(p);
  float_kernel(p);
}

// Unpooled or pooled, float32 or bfloat16.
template <typename Problem>
void by_layout(const Problem& p, void (*plain_f)(const Problem&), void (*plain_b)(const Problem&),
               void (*pooled_f)(const Problem&), void (*pooled_b)(const Problem&)) {
  if (p.pool.images > 0) return by_element(p, pooled_f, pooled_b);
  by_element(p, plain_f, plain_b);
}
}  // namespace

void bn_stats(const BnStatsProblem& p) { by_element(p, stats<float>, stats<uint16_t>); }
void bn_relu_forward(const BnReluForwardProblem& p) {
  by_layout(p, relu_forward<float>, relu_forward<uint16_t>, relu_pool_forward<float>, relu_pool_forward<uint16_t>);
}
void bn_relu_backward_reduce(const BnReluBackwardReduceProblem& p) {
  by_layout(p, relu_backward_reduce<float>, relu_backward_reduce<uint16_t>, relu_pool_backward_reduce<float>,
            relu_pool_backward_reduce<uint16_t>);
}
void bn_relu_backward_apply(const BnReluBackwardApplyProblem& p) {
  by_layout(p, relu_backward_apply<float>, relu_backward_apply<uint16_t>, relu_pool_backward_apply<float>,
            relu_pool_backward_apply<uint16_t>);
}

}  // namespace MTK_ISA
}  // namespace mtk
