// The Winograd F(2x2, 3x3) input transform the bfloat16 kernels share (the forward conv and the
// weight gradient), on 16 channels at a time in float32 (bf16_unit.h's Unit).
#pragma once
#include "bf16_unit.h"

namespace mtk {
namespace MTK_ISA {

// v[4 * i + j] = (B^T d B)[i][j] for the 4x4 patch d whose row r, column c is load(r, c): the
// rows' differences and sums first, then the columns', as the tests' reference computes them.
template <typename Load>
inline void input_transform(Load load, typename Unit::Acc v[16]) {
  typename Unit::Acc rows[4][4];  // B^T d
  for (int j = 0; j < 4; ++j) {
    const auto d0 = load(0, j), d1 = load(1, j), d2 = load(2, j), d3 = load(3, j);
    rows[0][j] = Unit::sub(d0, d2);
    rows[1][j] = Unit::add(d1, d2);
    rows[2][j] = Unit::sub(d2, d1);
    rows[3][j] = Unit::sub(d1, d3);
  }
  for (int i = 0; i < 4; ++i) {
    v[4 * i] = Unit::sub(rows[i][0], rows[i][2]);
    v[4 * i + 1] = Unit::add(rows[i][1], rows[i][2]);
    v[4 * i + 2] = Unit::sub(rows[i][2], rows[i][1]);
    v[4 * i + 3] = Unit::sub(rows[i][1], rows[i][3]);
  }
}

}  // namespace MTK_ISA
}  // namespace mtk
