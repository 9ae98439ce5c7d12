// Feature element types of the core and their float conversions.
//
// The core never includes torch headers, so 16-bit floats are plain 16-bit
// storage structs here; the adapters reinterpret torch's bfloat16/half buffers
// as these. Conversions are exact bit manipulations that behave identically on
// the host and the device, so CPU tests cover the GPU arithmetic.
#pragma once

#include <cstdint>
#include <cstring>

#include "tokcore/common/macros.h"

namespace tokcore {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

// Bytes per element.
inline int64_t dtype_size(DType d) { return d == DType::kFloat64 ? 8 : d == DType::kFloat32 ? 4 : 2; }

struct bf16_t { uint16_t bits; };
struct f16_t { uint16_t bits; };

TOKCORE_HD float bits_to_float(uint32_t u) {
#if TOKCORE_DEVICE_CODE && defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

TOKCORE_HD uint32_t float_to_bits(float f) {
#if TOKCORE_DEVICE_CODE && defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

TOKCORE_HD float bf16_to_float(bf16_t v) { return bits_to_float(uint32_t(v.bits) << 16); }

// Round to nearest even, NaN kept quiet (same rule as torch's c10::BFloat16).
TOKCORE_HD bf16_t float_to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{uint16_t((u >> 16) | 0x40u)};
  uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);
  return bf16_t{uint16_t((u + rounding) >> 16)};
}

// IEEE half <-> float by bit manipulation (subnormals, infinities and NaN included).
TOKCORE_HD float f16_to_float(f16_t v) {
  uint32_t h = v.bits;
  uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (mant << 13));
  if (exp == 0) {
    if (mant == 0) return bits_to_float(sign);
    // subnormal: value = mant * 2^-24
    float f = float(mant) * (1.0f / 16777216.0f);
    return sign ? -f : f;
  }
  return bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

TOKCORE_HD f16_t float_to_f16(float f) {
  uint32_t u = float_to_bits(f);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return f16_t{uint16_t(sign | 0x7e00u)};         // NaN
  if (abs >= 0x477ff000u) return f16_t{uint16_t(sign | 0x7c00u)};        // overflow -> inf
  if (abs < 0x38800000u) {                                              // subnormal or zero
    // value * 2^24 rounded to nearest even gives the subnormal mantissa
    float a = bits_to_float(abs) * 16777216.0f;
    uint32_t m = uint32_t(a);
    float rem = a - float(m);
    if (rem > 0.5f || (rem == 0.5f && (m & 1u))) ++m;
    return f16_t{uint16_t(sign | m)};
  }
  uint32_t exp = (abs >> 23) - 112u;
  uint32_t mant = abs & 0x7fffffu;
  uint32_t h = (exp << 10) | (mant >> 13);
  uint32_t rest = mant & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // may carry into exp: correct
  return f16_t{uint16_t(sign | h)};
}

// Accumulator type: float32 for every feature type except float64.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };
template <typename T> using acc_t = typename Acc<T>::type;

TOKCORE_HD float to_acc(float v) { return v; }
TOKCORE_HD double to_acc(double v) { return v; }
TOKCORE_HD float to_acc(bf16_t v) { return bf16_to_float(v); }
TOKCORE_HD float to_acc(f16_t v) { return f16_to_float(v); }

template <typename T> TOKCORE_HD T from_acc(acc_t<T> v);
template <> TOKCORE_HD float from_acc<float>(float v) { return v; }
template <> TOKCORE_HD double from_acc<double>(double v) { return v; }
template <> TOKCORE_HD bf16_t from_acc<bf16_t>(float v) { return float_to_bf16(v); }
template <> TOKCORE_HD f16_t from_acc<f16_t>(float v) { return float_to_f16(v); }

// Calls f with a null pointer of the storage type named by `dtype`: the one
// place where a runtime dtype becomes a template argument.
template <typename F>
inline void dispatch_float_types(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: f(static_cast<float*>(nullptr)); break;
    case DType::kFloat64: f(static_cast<double*>(nullptr)); break;
    case DType::kBFloat16: f(static_cast<bf16_t*>(nullptr)); break;
    case DType::kFloat16: f(static_cast<f16_t*>(nullptr)); break;
  }
}

}  // namespace tokcore
