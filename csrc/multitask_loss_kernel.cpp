// CPU kernel for the masked multi-task loss: one pass over the logits computes the
// loss and the gradient together, so backward only scales the stored gradient.
//
// This file is compiled once per instruction set (see CMakeLists.txt); MTK_ISA names
// the namespace. Rows are processed in tiles: each tile is converted to float32 once,
// the per-segment scalars (max, label score, sums) are computed per (row, task), and
// the element-wise parts (exp, hinge, gradient) run as flat loops over the whole tile
// so they vectorise even when a task has only two classes.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "multitask_loss.h"

#ifndef MTK_ISA
#error "MTK_ISA must name the instruction-set variant being compiled"
#endif

namespace mtk {
namespace MTK_ISA {
namespace {

// Floats per tile: the tile's logits, gradient and segment indices stay in L1/L2.
constexpr int64_t kTileElements = 4096;
// Below this many logits, starting OpenMP threads costs more than it saves.
constexpr int64_t kParallelElements = 1 << 15;

inline float bf16_to_float(uint16_t bits) {
  const uint32_t u = uint32_t(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
  return uint16_t(u >> 16);
}

void load_floats(const void* base, DType dtype, int64_t offset, float* dst, int64_t n) {
  switch (dtype) {
    case DType::f32:
      std::memcpy(dst, static_cast<const float*>(base) + offset, n * sizeof(float));
      break;
    case DType::f16: {
      const _Float16* src = static_cast<const _Float16*>(base) + offset;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) dst[j] = float(src[j]);
      break;
    }
    case DType::bf16: {
      const uint16_t* src = static_cast<const uint16_t*>(base) + offset;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) dst[j] = bf16_to_float(src[j]);
      break;
    }
  }
}

void store_floats(const float* src, void* base, DType dtype, int64_t offset, int64_t n) {
  switch (dtype) {
    case DType::f32:
      std::memcpy(static_cast<float*>(base) + offset, src, n * sizeof(float));
      break;
    case DType::f16: {
      _Float16* dst = static_cast<_Float16*>(base) + offset;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) dst[j] = _Float16(src[j]);
      break;
    }
    case DType::bf16: {
      uint16_t* dst = static_cast<uint16_t*>(base) + offset;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) dst[j] = float_to_bf16(src[j]);
      break;
    }
  }
}

// exp(x) for x <= 0, written without library calls so the flat loops vectorise on
// every ISA. Cody-Waite reduction + degree-6 polynomial (Cephes expf), max error
// about 2 ulp; results below 2^-125 flush to 0.
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
  return x < -87.0f ? 0.0f : p * two_n;
}

struct Scratch {
  std::vector<float> x;             // tile logits in float32
  std::vector<float> out;           // tile gradient (or exp / hinge before scaling)
  std::vector<int32_t> segment_of;  // flat element -> (row_in_tile * T + task)
  std::vector<float> seg_shift;     // per segment: max (ce) or label score - margin (svm)
  std::vector<float> seg_scale;     // per segment: gradient factor, 0 when masked
  std::vector<int64_t> seg_label;   // per segment: label if valid, else -1
  std::vector<float> seg_label_grad;  // per segment (svm): d loss / d z_label
};

struct TileResult {
  double loss = 0.0;
  int64_t invalid = 0;
};

// The label if it names a class of the task, else -1 (unlabelled); counts bad labels.
inline int64_t resolve_label(int64_t label, int64_t classes, int64_t* invalid) {
  if (label >= 0 && label < classes) return label;
  if (label != -1) ++*invalid;
  return -1;
}

TileResult process_tile(const LossProblem& p, int64_t row0, int64_t tile_rows, Scratch& s) {
  const int64_t W = p.width, T = p.num_tasks, n = tile_rows * W;
  const int64_t* off = p.class_offsets;
  float* x = s.x.data();
  float* out = s.out.data();
  const int32_t* seg_of = s.segment_of.data();
  TileResult res;

  if (p.row_stride == W) {
    load_floats(p.logits, p.dtype, row0 * W, x, n);
  } else {
    for (int64_t r = 0; r < tile_rows; ++r)
      load_floats(p.logits, p.dtype, (row0 + r) * p.row_stride, x + r * W, W);
  }

  // Per-segment scalars.
  for (int64_t r = 0; r < tile_rows; ++r) {
    for (int64_t t = 0; t < T; ++t) {
      const int64_t seg = r * T + t, lo = off[t], classes = off[t + 1] - lo;
      const int64_t y = resolve_label(p.labels[(row0 + r) * T + t], classes, &res.invalid);
      const float* z = x + r * W + lo;
      s.seg_label[seg] = y;
      if (p.kind == LossKind::ce) {
        float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
        for (int64_t j = 0; j < classes; ++j) m = std::max(m, z[j]);
        s.seg_shift[seg] = m;
      } else {
        s.seg_shift[seg] = y >= 0 ? z[y] - p.margin : 0.0f;
      }
    }
  }

  // Element-wise over the whole tile: exp(z - max) or max(0, z - z_y + margin).
  const float* shift = s.seg_shift.data();
  if (p.kind == LossKind::ce) {
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) out[k] = exp_nonpositive(x[k] - shift[seg_of[k]]);
  } else {
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) out[k] = std::max(x[k] - shift[seg_of[k]], 0.0f);
  }

  // Per-segment loss and gradient factor.
  for (int64_t r = 0; r < tile_rows; ++r) {
    for (int64_t t = 0; t < T; ++t) {
      const int64_t seg = r * T + t, lo = off[t], classes = off[t + 1] - lo;
      const int64_t y = s.seg_label[seg];
      float* e = out + r * W + lo;
      float loss = 0.0f;
      if (y < 0) {
        s.seg_scale[seg] = 0.0f;
      } else if (p.kind == LossKind::ce) {
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < classes; ++j) sum += e[j];
        loss = std::log(sum) + shift[seg] - x[r * W + lo + y];
        s.seg_scale[seg] = p.task_scale[t] / sum;
      } else {
        e[y] = 0.0f;  // the true class has no hinge term
        float sum = 0.0f, sum_sq = 0.0f;
#pragma omp simd reduction(+ : sum, sum_sq)
        for (int64_t j = 0; j < classes; ++j) {
          sum += e[j];
          sum_sq += e[j] * e[j];
        }
        loss = sum_sq;
        s.seg_scale[seg] = 2.0f * p.task_scale[t];
        s.seg_label_grad[seg] = -2.0f * p.task_scale[t] * sum;
      }
      if (p.reduce)
        res.loss += double(p.task_scale[t]) * double(loss);
      else
        p.loss[(row0 + r) * T + t] = loss;
    }
  }
  if (p.grad == nullptr) return res;

  const float* scale = s.seg_scale.data();
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) out[k] *= scale[seg_of[k]];
  for (int64_t r = 0; r < tile_rows; ++r) {
    for (int64_t t = 0; t < T; ++t) {
      const int64_t seg = r * T + t, y = s.seg_label[seg];
      if (y < 0) continue;
      float& g = out[r * W + off[t] + y];
      g = p.kind == LossKind::ce ? g - p.task_scale[t] : s.seg_label_grad[seg];
    }
  }
  store_floats(out, p.grad, p.dtype, row0 * W, n);
  return res;
}

}  // namespace

int64_t multitask_loss_forward(const LossProblem& p) {
  const int64_t W = p.width, T = p.num_tasks;
  const int64_t tile_rows = std::max<int64_t>(1, kTileElements / W);
  const int64_t num_tiles = (p.rows + tile_rows - 1) / tile_rows;
  std::vector<int32_t> column_task(W);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = p.class_offsets[t]; j < p.class_offsets[t + 1]; ++j) column_task[j] = int32_t(t);

  const bool parallel = p.num_threads > 1 && p.rows * W >= kParallelElements;
  const int threads = parallel ? std::min<int64_t>(p.num_threads, num_tiles) : 1;
  // Per-thread partial sums added in thread order: the reduced loss is bitwise
  // reproducible for a given thread count.
  std::vector<double> partial_loss(threads, 0.0);
  std::vector<int64_t> partial_invalid(threads, 0);

#pragma omp parallel num_threads(threads) if (parallel)
  {
    Scratch s;
    s.x.resize(tile_rows * W);
    s.out.resize(tile_rows * W);
    s.segment_of.resize(tile_rows * W);
    s.seg_shift.resize(tile_rows * T);
    s.seg_scale.resize(tile_rows * T);
    s.seg_label.resize(tile_rows * T);
    s.seg_label_grad.resize(tile_rows * T);
    for (int64_t r = 0; r < tile_rows; ++r)
      for (int64_t j = 0; j < W; ++j) s.segment_of[r * W + j] = int32_t(r * T + column_task[j]);

    const int tid = omp_get_thread_num();
#pragma omp for schedule(static)
    for (int64_t tile = 0; tile < num_tiles; ++tile) {
      const int64_t row0 = tile * tile_rows;
      const TileResult r = process_tile(p, row0, std::min(tile_rows, p.rows - row0), s);
      partial_loss[tid] += r.loss;
      partial_invalid[tid] += r.invalid;
    }
  }

  double total = 0.0;
  int64_t invalid = 0;
  for (int i = 0; i < threads; ++i) {
    total += partial_loss[i];
    invalid += partial_invalid[i];
  }
  if (p.reduce) p.loss[0] = float(total);
  return invalid;
}

}  // namespace MTK_ISA
}  // namespace mtk
