// Run-time choice of the kernel variant: the best instruction set this CPU and OS
// support, optionally lowered with MTKERNELS_ISA=baseline|avx2|avx512|avx512bf16.
#pragma once
#include <map>
#include <string>

#include "batchnorm.h"
#include "conv.h"
#include "conv_bf16.h"
#include "conv_winograd_bf16.h"
#include "gemm_conv2d.h"
#include "multitask_loss.h"

namespace mtk {

// avx512bf16 is avx512 plus the bfloat16 dot-product instruction (AVX512-BF16), which only the
// bfloat16 kernels use.
enum class Isa : int { baseline = 0, avx2 = 1, avx512 = 2, avx512bf16 = 3 };

std::map<std::string, bool> cpu_features();
bool isa_supported(Isa isa);
Isa isa_from_name(const std::string& name);  // throws std::invalid_argument
const char* isa_name(Isa isa);
Isa active_isa();
void set_active_isa(Isa isa);  // throws std::invalid_argument if unsupported here
// Every kernel of a variant, as X(name, function type). The table's fields and the code that
// fills them both come from this one list, field by name (cpu_dispatch.cpp), so two kernels
// of the same signature cannot be swapped by their position.
#define MTK_KERNELS(X)                                           \
  X(multitask_loss_forward, LossForwardFn)                      \
  X(maxpool2x2_nhwc, MaxPoolFn)                                  \
  X(quantize_u8, QuantizeFn)                                     \
  X(conv3x3_single_channel_nhwc, Conv3x3SingleChannelFn)         \
  X(winograd_input_nhwc, WinogradInputFn)                        \
  X(winograd_output_nhwc, WinogradOutputFn)                      \
  X(winograd_output_adjoint_nhwc, WinogradInputFn)               \
  X(winograd_conv3x3_one_pass_nhwc, WinogradConvFn)              \
  X(grouped_linear, GroupedLinearFn)                             \
  X(conv_bf16_nhwc, ConvBf16Fn)                                  \
  X(conv_winograd_bf16_nhwc, ConvBf16Fn)                         \
  X(conv_winograd_bf16_weight_grad_nhwc, ConvWinogradBf16WeightGradFn) \
  X(conv_winograd_bf16_weight_pack, ConvWinogradBf16WeightPackFn) \
  X(im2col_nhwc, Im2colFn)                                       \
  X(col2im_nhwc, Col2imFn)                                       \
  X(bn_stats, BnStatsFn)                                         \
  X(bn_relu_forward, BnReluForwardFn)                            \
  X(bn_relu_backward_reduce, BnReluBackwardReduceFn)             \
  X(bn_relu_backward_apply, BnReluBackwardApplyFn)

// The active variant's kernels.
struct KernelTable {
#define MTK_KERNEL_FIELD(name, type) type name = nullptr;
  MTK_KERNELS(MTK_KERNEL_FIELD)
#undef MTK_KERNEL_FIELD
};
const KernelTable& kernels();

}  // namespace mtk
