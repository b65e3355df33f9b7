// Run-time choice of the kernel variant: the best instruction set this CPU and OS
// support, optionally lowered with MTKERNELS_ISA=baseline|avx2|avx512.
#pragma once
#include <map>
#include <string>

#include "multitask_loss.h"

namespace mtk {

enum class Isa : int { baseline = 0, avx2 = 1, avx512 = 2 };

std::map<std::string, bool> cpu_features();
bool isa_supported(Isa isa);
Isa isa_from_name(const std::string& name);  // throws std::invalid_argument
const char* isa_name(Isa isa);
Isa active_isa();
void set_active_isa(Isa isa);  // throws std::invalid_argument if unsupported here
LossForwardFn loss_forward_kernel();

}  // namespace mtk
