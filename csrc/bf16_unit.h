// The arithmetic of the bfloat16 kernels (conv_bf16, conv_winograd_bf16) on 16 float32 lanes,
// in the namespace of the ISA variant being compiled: AVX512-BF16 instructions where the variant
// has them, the same values computed in float32 elsewhere.
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "conv_bf16.h"
#include "element.h"
#include "float_ops.h"
#include "isa_variant.h"

namespace mtk {
namespace MTK_ISA {

#ifdef __AVX512BF16__
// vdpbf16ps: 16 float32 accumulators, each += the dot product of a bfloat16 pair of the
// input (broadcast) and of the weights.
struct Unit {
  using Acc = __m512;
  using Weights = __m512bh;
  static Acc zero() { return _mm512_setzero_ps(); }
  static Acc load_bias(const float* b) { return _mm512_loadu_ps(b); }
  static Acc load(const float* p) { return _mm512_loadu_ps(p); }
  static Acc load(const uint16_t* p) {  // 16 bfloat16 values, widened exactly
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  }
  static Acc add(Acc a, Acc b) { return _mm512_add_ps(a, b); }
  static Acc sub(Acc a, Acc b) { return _mm512_sub_ps(a, b); }
  static Weights load_weights(const uint16_t* w) { return (__m512bh)_mm512_loadu_si512(w); }
  static void dot(Acc& acc, const uint16_t* pair, const Weights& w) {
    int32_t bits;
    std::memcpy(&bits, pair, sizeof bits);
    acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_set1_epi32(bits), w);
  }
  // vmaxps returns its second operand when either is NaN: a NaN in the first is put back.
  static Acc max(Acc a, Acc b) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q), _mm512_max_ps(a, b), a);
  }
  static Acc relu(Acc a) { return _mm512_max_ps(_mm512_setzero_ps(), a); }  // NaN: the second operand
  static void store(float* p, Acc a) { _mm512_storeu_ps(p, a); }
  static void store(uint16_t* p, Acc a) {  // round to nearest even; NaN stays NaN
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(a));
  }
  // p[2 * j + slot] = a[j] rounded: one slot of 16 bfloat16 pairs, the other left alone.
  static void store_slot(uint16_t* p, Acc a, int slot) {
    const __m512i wide = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(a));
    if (slot) return _mm512_mask_storeu_epi16(p, 0xAAAAAAAAu, _mm512_slli_epi32(wide, 16));
    _mm512_mask_storeu_epi16(p, 0x55555555u, wide);
  }
};
#else
// The same arithmetic through float32: a product of two bfloat16 values is exact in float32.
struct Unit {
  struct Acc {
    float v[kBf16Block];
  };
  struct Weights {
    float v[2 * kBf16Block];
  };
  static Acc zero() { return Acc{}; }
  template <typename T>
  static Acc load(const T* p) {
    Acc a;
    for (int j = 0; j < kBf16Block; ++j) a.v[j] = widen(p[j]);
    return a;
  }
  static Acc load_bias(const float* b) { return load(b); }
  static Acc add(const Acc& a, const Acc& b) {
    Acc out;
    for (int j = 0; j < kBf16Block; ++j) out.v[j] = a.v[j] + b.v[j];
    return out;
  }
  static Acc sub(const Acc& a, const Acc& b) {
    Acc out;
    for (int j = 0; j < kBf16Block; ++j) out.v[j] = a.v[j] - b.v[j];
    return out;
  }
  static Weights load_weights(const uint16_t* w) {
    Weights out;
    for (int j = 0; j < 2 * kBf16Block; ++j) out.v[j] = widen(w[j]);
    return out;
  }
  static void dot(Acc& acc, const uint16_t* pair, const Weights& w) {
    const float a0 = widen(pair[0]), a1 = widen(pair[1]);
    for (int j = 0; j < kBf16Block; ++j) acc.v[j] += a0 * w.v[2 * j] + a1 * w.v[2 * j + 1];
  }
  static Acc max(const Acc& a, const Acc& b) {
    Acc out;
    for (int j = 0; j < kBf16Block; ++j) out.v[j] = max_nan(a.v[j], b.v[j]);
    return out;
  }
  static Acc relu(const Acc& a) {
    Acc out;
    for (int j = 0; j < kBf16Block; ++j) out.v[j] = a.v[j] < 0.0f ? 0.0f : a.v[j];  // NaN < 0 is false
    return out;
  }
  static void store(float* p, const Acc& a) { std::memcpy(p, a.v, sizeof a.v); }
  static void store(uint16_t* p, const Acc& a) {
    for (int j = 0; j < kBf16Block; ++j) narrow(p + j, a.v[j]);
  }
  static void store_slot(uint16_t* p, const Acc& a, int slot) {
    for (int j = 0; j < kBf16Block; ++j) narrow(p + 2 * j + slot, a.v[j]);
  }
};
#endif

// kernel(pool, out) with the problem's pool flag as a std::bool_constant and a value of its
// output element's type (float or uint16_t for bfloat16): the kernels' run-time choices made
// compile-time template arguments in one place.
template <typename Kernel>
void with_pool_and_output(const ConvBf16Problem& p, Kernel&& kernel) {
  if (p.dst_element == Element::float32) {
    if (p.pool) return kernel(std::true_type{}, float{});
    return kernel(std::false_type{}, float{});
  }
  if (p.pool) return kernel(std::true_type{}, uint16_t{});
  kernel(std::false_type{}, uint16_t{});
}

}  // namespace MTK_ISA
}  // namespace mtk
