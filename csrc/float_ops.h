// Float helpers whose NaN behaviour matches eager PyTorch.
#pragma once

namespace mtk {

// max(a, b), NaN when either is NaN, as PyTorch's max-pool returns. std::max(a, b) and the
// maxps instruction return the other operand, which would hide a corrupt input.
inline float max_nan(float a, float b) { return (a > b || a != a) ? a : b; }

}  // namespace mtk
