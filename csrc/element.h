// Element types of activations besides float32, and the exact conversions between them.
#pragma once
#include <cstdint>
#include <cstring>

namespace mtk {

enum class Element : int { float32 = 0, bfloat16 = 1, uint8 = 2 };

// bfloat16 is stored as the upper half of a float32, in a uint16_t: widening is exact.
inline float widen(float v) { return v; }
inline float widen(uint16_t v) {
  const uint32_t bits = uint32_t(v) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}
inline void narrow(float* dst, float v) { *dst = v; }
// The bfloat16 bits (in the low half) of a float32's `bits`: round to nearest, ties to even,
// as PyTorch's float -> bfloat16 conversion; a NaN (`is_nan`) stays a (quiet) NaN rather
// than rounding into inf. Written without branches so loops vectorise; Bits is uint32_t or a
// vector of them, with is_nan a bool or the matching vector mask.
template <typename Bits, typename Mask>
inline Bits bfloat16_bits(Bits bits, Mask is_nan) {
  const Bits rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return is_nan ? (bits >> 16) | 0x40u : rounded;
}
inline void narrow(uint16_t* dst, float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  *dst = uint16_t(bfloat16_bits(bits, v != v));
}

// v as it reads back after a store in T.
template <typename T>
inline float round_trip(float v) {
  T stored;
  narrow(&stored, v);
  return widen(stored);
}

}  // namespace mtk
