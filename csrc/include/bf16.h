// bfloat16 stored as raw uint16 bits (numpy has no bfloat16; the Python side passes
// torch bfloat16 tensors viewed as int16). Conversions match PyTorch's c10::BFloat16:
// widening is exact, narrowing rounds to nearest even and keeps NaN a quiet NaN.
#pragma once
#include <cstdint>
#include <cstring>

namespace pyfastscan {

struct bf16 { uint16_t bits; };

// Accumulator type: float for float and bf16, double for double.
template <typename T> struct acc_type { using type = float; };
template <> struct acc_type<double> { using type = double; };

inline float widen(bf16 v) {
  uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline float widen(float v) { return v; }
inline double widen(double v) { return v; }

template <typename T> inline T narrow(typename acc_type<T>::type v) { return v; }
template <> inline bf16 narrow<bf16>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{0x7fc0};  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);                              // round to nearest even
  return bf16{static_cast<uint16_t>(u >> 16)};
}

}  // namespace pyfastscan
