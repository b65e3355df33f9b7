// Masked multi-task loss (papers' equations 1-3) on raw CPU buffers.
//
// The extension deliberately takes plain pointers and sizes instead of at::Tensor:
// it does not link libtorch, so one build survives torch upgrades. The Python side
// (mtkernels/ops/multitask_loss.py) checks dtype, device, contiguity and shapes.
#pragma once
#include <cstdint>

namespace mtk {

enum class DType : int { f32 = 0, f16 = 1, bf16 = 2 };
enum class LossKind : int { ce = 0, svm = 1 };

struct LossProblem {
  const void* logits;          // [rows, width] in `dtype`, unit column stride
  DType dtype;
  int64_t rows;
  int64_t width;               // sum of classes over tasks
  int64_t row_stride;          // elements between consecutive logits rows (>= width)
  const int64_t* labels;       // [rows, num_tasks], -1 = unlabelled
  int64_t num_tasks;
  const int64_t* class_offsets;  // [num_tasks + 1], first column of each task
  const float* task_scale;     // [num_tasks]: mu_t / N ("mean"), mu_t ("sum"), 1 ("none")
  LossKind kind;
  float margin;                // squared-hinge margin (kind == svm)
  bool reduce;                 // true: loss = sum_t scale_t sum_i l_it, else loss[i, t] = l_it
  float* loss;                 // [1] if reduce else [rows, num_tasks]
  void* grad;                  // [rows, width] in `dtype`, or nullptr to skip the gradient
  int num_threads;
};

// Returns how many labels were out of range (< -1 or >= C_t); those entries are
// treated as unlabelled, so the result is defined and the caller decides to raise.
using LossForwardFn = int64_t (*)(const LossProblem&);

namespace baseline { int64_t multitask_loss_forward(const LossProblem&); }
namespace avx2 { int64_t multitask_loss_forward(const LossProblem&); }
namespace avx512 { int64_t multitask_loss_forward(const LossProblem&); }

}  // namespace mtk
