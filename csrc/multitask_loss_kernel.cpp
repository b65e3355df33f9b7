// CPU kernel for the masked multi-task loss: one pass over the logits computes the
// loss and the gradient together, so backward only scales the stored gradient.
//
// This file is compiled once per instruction set (see CMakeLists.txt); MTK_ISA names
// the namespace. Rows are processed in tiles converted once to float32 and stored
// column-major, so all arithmetic vectorises across rows (see Scratch).
#include <omp.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#include "float_ops.h"
#include "isa_variant.h"
#include "multitask_loss.h"


namespace mtk {
namespace MTK_ISA {
namespace {

// Floats per tile: the tile's logits and gradient stay in L1/L2.
constexpr int64_t kTileElements = 4096;
// A single cross-entropy task at least this wide runs row by row (cross_entropy_rows)
// instead of in column-major tiles. Measured at N = 4096 (AVX-512, 2 threads): 16-bit rows
// win from 128 classes (1.1x there, 4x at 2048: their tiles load through gathers), float32
// rows from 2048 (1.3x; level with the tiles' AVX-512 transpose from 256 to 1024).
constexpr int64_t kRowMajorClassesF32 = 2048, kRowMajorClasses16 = 128;
// Below this many logits, starting OpenMP threads costs more than it saves.
constexpr int64_t kParallelElements = 1 << 15;

inline int64_t element_bytes(DType dtype) { return dtype == DType::f32 ? 4 : 2; }

inline float bf16_to_float(uint16_t bits) {
  const uint32_t u = uint32_t(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint32_t quiet_nan = (u >> 16) | 0x40u;
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  // to nearest, ties to even
  return uint16_t((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}

// v if keep else +0.0, as a bit mask: GCC vectorises this where it keeps a ternary on
// floats as a branch, and it yields an exact 0 even when v is inf or NaN.
inline float keep_if(bool keep, float v) {
  int32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  bits &= -int32_t(keep);
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

// exp(x) for x <= 0, written without library calls so the loops vectorise on every
// ISA. Cody-Waite reduction + degree-6 polynomial (Cephes expf), max error about
// 2 ulp; results below 2^-125 flush to 0.
inline float exp_nonpositive(float x) {
  const float xc = std::min(std::max(x, -87.0f), 0.0f);
  const float n = float(int32_t(xc * 1.44269504088896341f - 0.5f));  // round(), xc <= 0
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const int32_t bits = (int32_t(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return keep_if(x >= -87.0f, p * two_n);
}

// log(x) for x >= 1 (a softmax denominator after max-shift), vectorisable: split x =
// m * 2^e with m in [sqrt(1/2), sqrt(2)), then a degree-9 polynomial in m - 1
// (Cephes logf), max error about 2 ulp.
inline float log_at_least_one(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  int32_t e = ((bits >> 23) & 0xff) - 126;
  int32_t mbits = (bits & 0x007fffff) | 0x3f000000;  // mantissa in [0.5, 1)
  float m;
  std::memcpy(&m, &mbits, sizeof m);
  const bool small = m < 0.707106781186547524f;
  e -= small ? 1 : 0;
  m = small ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float p = 7.0376836292e-2f;
  p = p * m - 1.1514610310e-1f;
  p = p * m + 1.1676998740e-1f;
  p = p * m - 1.2420140846e-1f;
  p = p * m + 1.4249322787e-1f;
  p = p * m - 1.6668057665e-1f;
  p = p * m + 2.0000714765e-1f;
  p = p * m - 2.4999993993e-1f;
  p = p * m + 3.3333331174e-1f;
  const float fe = float(e);
  float y = p * m * z;
  y += fe * -2.12194440e-4f;
  y += -0.5f * z;
  return m + y + fe * 0.693359375f;
}

// One tile of rows, stored column-major (x[j * R + r]) so that all arithmetic runs across
// rows: it vectorises for 2 classes as well as 1024. R is padded to a multiple of kLanes;
// padding rows hold logits 0 and label -1, so they contribute nothing and are not stored.
constexpr int kLanes = 16;

struct Scratch {
  std::vector<float> x, g;       // [W][R] logits, then exp / hinge / gradient
  std::vector<int32_t> label;    // [T][R] resolved labels, -1 = no contribution
  std::vector<int32_t> label_at; // [T][R] label's index in the task's [C][R] block
  std::vector<float> loss;       // [R] loss of the current task

  void reserve(int64_t rows, int64_t width, int64_t tasks) {
    x.resize(rows * width);
    g.resize(rows * width);
    label.resize(rows * tasks);
    label_at.resize(rows * tasks);
    loss.resize(rows);
  }
};

struct TileResult {
  double loss = 0.0;
  int64_t invalid = 0;
};

// Rows innermost: strided gathers / scatters that vectorise where the ISA has them.
template <class Load>
void load_tile(const LossProblem& p, int64_t row0, int64_t rows, int64_t R, float* xt, Load load) {
  const int64_t stride = p.row_stride, base = row0 * stride;
  for (int64_t j = 0; j < p.width; ++j) {
#pragma omp simd
    for (int64_t r = 0; r < rows; ++r) xt[j * R + r] = load(base + r * stride + j);
    for (int64_t r = rows; r < R; ++r) xt[j * R + r] = 0.0f;
  }
}

template <class Store>
void store_tile(const LossProblem& p, int64_t row0, int64_t rows, int64_t R, const float* gt, Store store) {
  const int64_t W = p.width, base = row0 * W;
  for (int64_t j = 0; j < W; ++j)
#pragma omp simd
    for (int64_t r = 0; r < rows; ++r) store(base + r * W + j, gt[j * R + r]);
}

#if defined(__AVX512F__)
// In-register transpose of a 16x16 float block (v[i] = row i in, column i out); it is its
// own inverse. Unpack within 128-bit lanes, then two rounds of 128-bit lane shuffles.
inline void transpose16x16(__m512 v[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // u[4i + m], 128-bit lane k: column 4k + m of rows 4i..4i+3
    u[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    u[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int m = 0; m < 4; ++m) {
    const __m512 a = _mm512_shuffle_f32x4(u[m], u[4 + m], 0x88), b = _mm512_shuffle_f32x4(u[m], u[4 + m], 0xDD);
    const __m512 c = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], 0x88), d = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], 0xDD);
    v[m] = _mm512_shuffle_f32x4(a, c, 0x88);
    v[8 + m] = _mm512_shuffle_f32x4(a, c, 0xDD);
    v[4 + m] = _mm512_shuffle_f32x4(b, d, 0x88);
    v[12 + m] = _mm512_shuffle_f32x4(b, d, 0xDD);
  }
}

inline __mmask16 first_lanes(int64_t n) { return __mmask16((1u << std::min<int64_t>(n, 16)) - 1u); }

// float32 rows -> column-major tile, 16x16 blocks through registers instead of gathers.
void load_tile_f32_avx512(const LossProblem& p, int64_t row0, int64_t rows, int64_t R, float* xt) {
  const float* src = static_cast<const float*>(p.logits);
  for (int64_t r0 = 0; r0 < R; r0 += 16)
    for (int64_t c0 = 0; c0 < p.width; c0 += 16) {
      const __mmask16 cols = first_lanes(p.width - c0);
      __m512 v[16];
      for (int i = 0; i < 16; ++i)
        v[i] = r0 + i < rows ? _mm512_maskz_loadu_ps(cols, src + (row0 + r0 + i) * p.row_stride + c0)
                             : _mm512_setzero_ps();
      transpose16x16(v);
      for (int64_t c = 0; c < std::min<int64_t>(16, p.width - c0); ++c) _mm512_storeu_ps(xt + (c0 + c) * R + r0, v[c]);
    }
}

void store_tile_f32_avx512(const LossProblem& p, int64_t row0, int64_t rows, int64_t R, const float* gt) {
  float* dst = static_cast<float*>(p.grad);
  for (int64_t r0 = 0; r0 < R; r0 += 16)
    for (int64_t c0 = 0; c0 < p.width; c0 += 16) {
      const int64_t ncols = std::min<int64_t>(16, p.width - c0);
      __m512 v[16];
      for (int64_t c = 0; c < 16; ++c) v[c] = c < ncols ? _mm512_loadu_ps(gt + (c0 + c) * R + r0) : _mm512_setzero_ps();
      transpose16x16(v);
      for (int64_t i = 0; i < std::min<int64_t>(16, rows - r0); ++i)
        _mm512_mask_storeu_ps(dst + (row0 + r0 + i) * p.width + c0, first_lanes(ncols), v[i]);
    }
}
#endif

void load_tile(const LossProblem& p, int64_t row0, int64_t rows, int64_t R, float* xt) {
  switch (p.dtype) {
    case DType::f32: {
#if defined(__AVX512F__)
      load_tile_f32_avx512(p, row0, rows, R, xt);
#else
      const float* src = static_cast<const float*>(p.logits);
      load_tile(p, row0, rows, R, xt, [src](int64_t i) { return src[i]; });
#endif
      break;
    }
    case DType::f16: {
      const _Float16* src = static_cast<const _Float16*>(p.logits);
      load_tile(p, row0, rows, R, xt, [src](int64_t i) { return float(src[i]); });
      break;
    }
    case DType::bf16: {
      const uint16_t* src = static_cast<const uint16_t*>(p.logits);
      load_tile(p, row0, rows, R, xt, [src](int64_t i) { return bf16_to_float(src[i]); });
      break;
    }
  }
}

void store_tile(const LossProblem& p, int64_t row0, int64_t rows, int64_t R, const float* gt) {
  switch (p.dtype) {
    case DType::f32: {
#if defined(__AVX512F__)
      store_tile_f32_avx512(p, row0, rows, R, gt);
#else
      float* dst = static_cast<float*>(p.grad);
      store_tile(p, row0, rows, R, gt, [dst](int64_t i, float v) { dst[i] = v; });
#endif
      break;
    }
    case DType::f16: {
      _Float16* dst = static_cast<_Float16*>(p.grad);
      store_tile(p, row0, rows, R, gt, [dst](int64_t i, float v) { dst[i] = _Float16(v); });
      break;
    }
    case DType::bf16: {
      uint16_t* dst = static_cast<uint16_t*>(p.grad);
      store_tile(p, row0, rows, R, gt, [dst](int64_t i, float v) { dst[i] = float_to_bf16(v); });
      break;
    }
  }
}

// The task functions walk the tile kLanes rows at a time with the class loop outside
// the lane loop: the per-row accumulators are fixed-size local arrays that stay in
// registers (GCC does not vectorise the outer row loop of a class loop by itself).
// Sums over classes accumulate in double: a float sum near 1 (a peaked softmax) loses
// up to half an ulp per added term, and 64 such terms put the gradient 5-10 ulp off
// eager's (found by the property test at 1030 classes).

// Softmax cross-entropy of one task; fills loss[r], and g with d(scale * loss)/dz.
template <bool kWantGrad>
void cross_entropy_task(const float* xt, float* gt, const int32_t* y, const int32_t* y_at, int64_t R,
                        int64_t classes, float scale, float* loss) {
  for (int64_t r0 = 0; r0 < R; r0 += kLanes) {
    const float* x = xt + r0;
    float* g = gt + r0;
    float run_max[kLanes], coef[kLanes];
    double run_sum[kLanes];
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) {
      run_max[l] = x[l];
      run_sum[l] = 0.0;
    }
    for (int64_t j = 1; j < classes; ++j)
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) run_max[l] = max_nan(run_max[l], x[j * R + l]);
    for (int64_t j = 0; j < classes; ++j)
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) {
        const float e = exp_nonpositive(x[j * R + l] - run_max[l]);
        g[j * R + l] = e;
        run_sum[l] += e;
      }
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) {
      const bool valid = y[r0 + l] >= 0;
      const float sum = float(run_sum[l]);
      loss[r0 + l] = keep_if(valid, log_at_least_one(sum) + run_max[l] - xt[y_at[r0 + l]]);
      // A NaN or +inf logit (run_max NaN or inf), or a row of -inf, makes the row's softmax
      // NaN in the reference: max - max is NaN exactly then, 0 otherwise. An unlabelled row
      // stays exactly 0 (keep_if selects, it does not multiply).
      coef[l] = keep_if(valid, scale / sum + (run_max[l] - run_max[l]));
    }
    if (!kWantGrad) continue;
    for (int64_t j = 0; j < classes; ++j)
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) g[j * R + l] = g[j * R + l] * coef[l] - keep_if(y[r0 + l] == j, scale);
  }
}

// Squared hinge sum_{j != y} max(0, z_j - z_y + margin)^2 of one task.
template <bool kWantGrad>
void squared_hinge_task(const float* xt, float* gt, const int32_t* y, const int32_t* y_at, int64_t R,
                        int64_t classes, float scale, float margin, float* loss) {
  for (int64_t r0 = 0; r0 < R; r0 += kLanes) {
    const float* x = xt + r0;
    float* g = gt + r0;
    float shift[kLanes], coef[kLanes], label_grad[kLanes];
    double hinge_sum[kLanes], hinge_sq[kLanes];
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) {
      shift[l] = xt[y_at[r0 + l]] - margin;
      hinge_sum[l] = 0.0;
      hinge_sq[l] = 0.0;
    }
    for (int64_t j = 0; j < classes; ++j)
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) {
        const int32_t label = y[r0 + l];
        const float h = keep_if(label != j && label >= 0, std::max(x[j * R + l] - shift[l], 0.0f));
        g[j * R + l] = h;
        hinge_sum[l] += h;
        hinge_sq[l] += double(h) * h;
      }
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) {
      loss[r0 + l] = float(hinge_sq[l]);
      coef[l] = keep_if(y[r0 + l] >= 0, 2.0f * scale);
      label_grad[l] = -coef[l] * float(hinge_sum[l]);
    }
    if (!kWantGrad) continue;
    for (int64_t j = 0; j < classes; ++j)
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) {
        const bool is_label = y[r0 + l] == j;
        g[j * R + l] = keep_if(!is_label, coef[l] * g[j * R + l]) + keep_if(is_label, label_grad[l]);
      }
  }
}

template <bool kWantGrad>
void task_loss(const LossProblem& p, int64_t t, int64_t R, Scratch& s) {
  const int64_t lo = p.class_offsets[t], classes = p.class_offsets[t + 1] - lo;
  const float* xt = s.x.data() + lo * R;
  float* gt = s.g.data() + lo * R;
  const int32_t* y = s.label.data() + t * R;
  const int32_t* y_at = s.label_at.data() + t * R;
  if (p.kind == LossKind::ce)
    cross_entropy_task<kWantGrad>(xt, gt, y, y_at, R, classes, p.task_scale[t], s.loss.data());
  else
    squared_hinge_task<kWantGrad>(xt, gt, y, y_at, R, classes, p.task_scale[t], p.margin, s.loss.data());
}

TileResult process_tile(const LossProblem& p, int64_t row0, int64_t rows, Scratch& s) {
  TileResult res;
  const int64_t R = (rows + kLanes - 1) / kLanes * kLanes;
  load_tile(p, row0, rows, R, s.x.data());
  for (int64_t t = 0; t < p.num_tasks; ++t) {
    const int64_t classes = p.class_offsets[t + 1] - p.class_offsets[t];
    int32_t* y = s.label.data() + t * R;
    int32_t* y_at = s.label_at.data() + t * R;
    const int64_t* labels = p.labels + row0 * p.num_tasks + t;
    int64_t invalid = 0;
#pragma omp simd reduction(+ : invalid)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t raw = labels[r * p.num_tasks];  // clamped so it fits int32, still invalid
      const int32_t label = int32_t(raw < -2 ? -2 : (raw > classes ? classes : raw));
      const bool valid = label >= 0 && label < classes;
      invalid += (!valid && label != -1) ? 1 : 0;
      y[r] = valid ? label : -1;
      y_at[r] = (valid ? label : 0) * int32_t(R) + int32_t(r);  // class 0 stands in for masked rows
    }
    for (int64_t r = rows; r < R; ++r) {
      y[r] = -1;
      y_at[r] = int32_t(r);
    }
    res.invalid += invalid;
  }
  const bool want_grad = p.grad != nullptr;
  for (int64_t t = 0; t < p.num_tasks; ++t) {
    if (want_grad)
      task_loss<true>(p, t, R, s);
    else
      task_loss<false>(p, t, R, s);
    if (p.reduce) {
      double task_sum = 0.0;
#pragma omp simd reduction(+ : task_sum)
      for (int64_t r = 0; r < R; ++r) task_sum += s.loss[r];
      res.loss += double(p.task_scale[t]) * task_sum;
    } else {
      for (int64_t r = 0; r < rows; ++r) p.loss[(row0 + r) * p.num_tasks + t] = s.loss[r];
    }
  }
  if (want_grad) store_tile(p, row0, rows, R, s.g.data());
  return res;
}

// n consecutive logits of one row as float32 (the row kernels' working copy).
void load_floats(DType dtype, const void* src, int64_t first, int64_t n, float* out) {
  switch (dtype) {
    case DType::f32:
      std::memcpy(out, static_cast<const float*>(src) + first, n * sizeof(float));
      return;
    case DType::f16: {
      const _Float16* in = static_cast<const _Float16*>(src) + first;
#if defined(__AVX512F__)
      for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 lanes = first_lanes(n - j);
        _mm512_mask_storeu_ps(out + j, lanes, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lanes, in + j)));
      }
#else
      for (int64_t j = 0; j < n; ++j) out[j] = float(in[j]);
#endif
      return;
    }
    case DType::bf16: {
      const uint16_t* in = static_cast<const uint16_t*>(src) + first;
#if defined(__AVX512F__)
      for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 lanes = first_lanes(n - j);
        const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes, in + j));
        _mm512_mask_storeu_ps(out + j, lanes, _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16)));
      }
#else
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) out[j] = bf16_to_float(in[j]);
#endif
      return;
    }
  }
}

// The inverse of load_floats, rounding to nearest even.
void store_floats(DType dtype, void* dst, int64_t first, int64_t n, const float* in) {
  switch (dtype) {
    case DType::f32:
      std::memcpy(static_cast<float*>(dst) + first, in, n * sizeof(float));
      return;
    case DType::f16: {
      _Float16* out = static_cast<_Float16*>(dst) + first;
#if defined(__AVX512F__)
      for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 lanes = first_lanes(n - j);
        const __m256i half = _mm512_cvtps_ph(_mm512_maskz_loadu_ps(lanes, in + j), _MM_FROUND_TO_NEAREST_INT);
        _mm256_mask_storeu_epi16(out + j, lanes, half);
      }
#else
      for (int64_t j = 0; j < n; ++j) out[j] = _Float16(in[j]);
#endif
      return;
    }
    case DType::bf16: {
      uint16_t* out = static_cast<uint16_t*>(dst) + first;
#if defined(__AVX512F__)
      const __m512i bias = _mm512_set1_epi32(0x7fff), one = _mm512_set1_epi32(1), quiet = _mm512_set1_epi32(0x40);
      for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 lanes = first_lanes(n - j);
        const __m512 v = _mm512_maskz_loadu_ps(lanes, in + j);
        const __m512i u = _mm512_castps_si512(v), high = _mm512_srli_epi32(u, 16);
        const __m512i rounded = _mm512_srli_epi32(
            _mm512_add_epi32(u, _mm512_add_epi32(bias, _mm512_and_si512(high, one))), 16);
        const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);  // as float_to_bf16
        const __m512i bits = _mm512_mask_blend_epi32(nan, rounded, _mm512_or_si512(high, quiet));
        _mm256_mask_storeu_epi16(out + j, lanes, _mm512_cvtepi32_epi16(bits));
      }
#else
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) out[j] = float_to_bf16(in[j]);
#endif
      return;
    }
  }
}

// max_nan over x[0..n): NaN if any is NaN. A reduction(max) loop would not vectorise
// (std::max is not commutative in NaN), so it runs in kMaxLanes independent lanes, enough
// accumulators to hide the latency of the compare and select.
float max_of(const float* x, int64_t n) {
  constexpr int kMaxLanes = 64;
  float lane[kMaxLanes];
  float m = x[0];
  int64_t j = 0;
  if (n >= kMaxLanes) {
#pragma omp simd
    for (int l = 0; l < kMaxLanes; ++l) lane[l] = x[l];
    for (j = kMaxLanes; j + kMaxLanes <= n; j += kMaxLanes)
#pragma omp simd
      for (int l = 0; l < kMaxLanes; ++l) lane[l] = max_nan(lane[l], x[j + l]);
    for (int l = 0; l < kMaxLanes; ++l) m = max_nan(m, lane[l]);
  }
  for (; j < n; ++j) m = max_nan(m, x[j]);
  return m;
}

// Replaces x[j] by exp(x[j] - m) (m = max_of(x)) and returns their sum, accumulated in
// double (see the task functions).
double exponentials_and_sum(float* x, int64_t n, float m) {
  double sum = 0.0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    x[j] = exp_nonpositive(x[j] - m);
    sum += x[j];
  }
  return sum;
}

// One wide cross-entropy task row by row, classes contiguous and SIMD across them. With
// thousands of classes a tile holds only 16 rows, and moving them to and from the
// column-major layout costs more than the arithmetic. Each row is converted once into
// `row` (C floats, in L2), which then holds its exponentials, then its gradient: one exp
// per logit. Returns the row losses' weighted sum; `invalid` counts out-of-range labels.
double cross_entropy_rows(const LossProblem& p, int64_t row0, int64_t rows, float* row, int64_t& invalid) {
  const int64_t C = p.width;
  const float scale = p.task_scale[0];
  double total = 0.0;
  for (int64_t r = row0; r < row0 + rows; ++r) {
    const int64_t label = p.labels[r];
    const bool valid = label >= 0 && label < C;
    invalid += (!valid && label != -1) ? 1 : 0;
    float loss = 0.0f;
    if (valid) {
      load_floats(p.dtype, p.logits, r * p.row_stride, C, row);
      const float m = max_of(row, C);
      const float label_logit = row[label];
      const double sum = exponentials_and_sum(row, C, m);
      loss = log_at_least_one(float(sum)) + m - label_logit;
      if (p.grad != nullptr) {
        // NaN exactly when the row's softmax is NaN in the reference (see cross_entropy_task).
        const float coef = scale / float(sum) + (m - m);
#pragma omp simd
        for (int64_t j = 0; j < C; ++j) row[j] = row[j] * coef - keep_if(j == label, scale);
        store_floats(p.dtype, p.grad, r * C, C, row);
      }
    } else if (p.grad != nullptr) {
      std::memset(static_cast<char*>(p.grad) + r * C * element_bytes(p.dtype), 0, C * element_bytes(p.dtype));
    }
    if (p.reduce)
      total += double(scale) * loss;
    else
      p.loss[r] = loss;
  }
  return total;
}

// Splits [0, units) into one contiguous range per thread and runs work(first, last, loss,
// invalid) on each; the partial sums are added in range order, so the reduced loss is bitwise
// reproducible for a thread count. Below kParallelElements the work runs inline: entering an
// OpenMP region, even an `if (false)` one, cost about 4 us a call at N = 128 next to autograd.
template <class Work>
int64_t reduce_over_units(const LossProblem& p, int64_t units, Work work) {
  const bool parallel = p.num_threads > 1 && p.rows * p.width >= kParallelElements && units > 1;
  const int threads = parallel ? int(std::min<int64_t>(p.num_threads, units)) : 1;
  double total = 0.0;
  int64_t invalid = 0;
  if (threads == 1) {
    work(0, units, total, invalid);
  } else {
    std::vector<double> partial_loss(threads, 0.0);
    std::vector<int64_t> partial_invalid(threads, 0);
#pragma omp parallel num_threads(threads)
    {
      const int tid = omp_get_thread_num(), team = omp_get_num_threads();  // team may be smaller
      const int64_t per_thread = (units + team - 1) / team;
      const int64_t first = std::min(units, tid * per_thread), last = std::min(units, first + per_thread);
      work(first, last, partial_loss[tid], partial_invalid[tid]);
    }
    for (int i = 0; i < threads; ++i) {
      total += partial_loss[i];
      invalid += partial_invalid[i];
    }
  }
  if (p.reduce) p.loss[0] = float(total);
  return invalid;
}

int64_t cross_entropy_rows_forward(const LossProblem& p) {
  constexpr int64_t block = 16;  // rows per scheduling unit
  return reduce_over_units(p, (p.rows + block - 1) / block,
                           [&](int64_t first, int64_t last, double& loss, int64_t& invalid) {
    thread_local std::vector<float> row;  // reused: a fresh one would be page-faulted in each call
    row.resize(std::max<size_t>(row.size(), size_t(p.width)));
    for (int64_t b = first; b < last; ++b)
      loss += cross_entropy_rows(p, b * block, std::min(block, p.rows - b * block), row.data(), invalid);
  });
}

}  // namespace

int64_t multitask_loss_forward(const LossProblem& p) {
  const int64_t row_major_from = p.dtype == DType::f32 ? kRowMajorClassesF32 : kRowMajorClasses16;
  if (p.num_tasks == 1 && p.kind == LossKind::ce && p.width >= row_major_from) return cross_entropy_rows_forward(p);
  const int64_t W = p.width;
  // Rows per tile: a multiple of the widest SIMD (16 floats), at least 16 so wide tasks
  // still fill vectors, and at most what keeps the tile near L1/L2 size.
  const int64_t tile_rows = std::min<int64_t>(std::max<int64_t>(16, (kTileElements / W) / 16 * 16), p.rows);
  const int64_t num_tiles = (p.rows + tile_rows - 1) / tile_rows;
  return reduce_over_units(p, num_tiles, [&](int64_t first, int64_t last, double& loss, int64_t& invalid) {
    // Reused across calls: allocation and zero-fill would dominate small batches.
    thread_local Scratch s;
    s.reserve((tile_rows + kLanes - 1) / kLanes * kLanes, W, p.num_tasks);
    for (int64_t tile = first; tile < last; ++tile) {
      const int64_t row0 = tile * tile_rows;
      const TileResult r = process_tile(p, row0, std::min(tile_rows, p.rows - row0), s);
      loss += r.loss;
      invalid += r.invalid;
    }
  });
}

}  // namespace MTK_ISA
}  // namespace mtk
