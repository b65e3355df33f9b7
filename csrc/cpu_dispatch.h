// Run-time choice of the kernel variant: the best instruction set this CPU and OS
// support, optionally lowered with MTKERNELS_ISA=baseline|avx2|avx512.
#pragma once
#include <map>
#include <string>

#include "batchnorm.h"
#include "conv.h"
#include "multitask_loss.h"

namespace mtk {

enum class Isa : int { baseline = 0, avx2 = 1, avx512 = 2 };

std::map<std::string, bool> cpu_features();
bool isa_supported(Isa isa);
Isa isa_from_name(const std::string& name);  // throws std::invalid_argument
const char* isa_name(Isa isa);
Isa active_isa();
void set_active_isa(Isa isa);  // throws std::invalid_argument if unsupported here
// The active variant's kernels.
struct KernelTable {
  LossForwardFn multitask_loss_forward;
  MaxPoolFn maxpool2x2_nhwc;
  Conv3x3SingleChannelFn conv3x3_single_channel_nhwc;
  WinogradInputFn winograd_input_nhwc;
  WinogradOutputFn winograd_output_nhwc;
  WinogradInputFn winograd_output_adjoint_nhwc;
  WinogradConvFn winograd_conv3x3_nhwc;
  LinearFn linear_rows;
  BnStatsFn bn_stats;
  BnReluForwardFn bn_relu_forward;
  BnReluBackwardReduceFn bn_relu_backward_reduce;
  BnReluBackwardApplyFn bn_relu_backward_apply;
};
const KernelTable& kernels();

}  // namespace mtk
