// Scalar float16 / bfloat16 <-> float32 conversions written with integer bit operations only, so that
// simple loops over them vectorize on any x86/ARM target without F16C or torch headers.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace multiverse::cpu {

inline float bits_to_f32(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
inline uint32_t f32_to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

// IEEE half -> float. Normal and subnormal halves are rebuilt by placing the half's exponent and
// mantissa bits in a float and rescaling by 2^-112 (exponent bias difference 127 - 15); inf/NaN keep
// their top exponent because the rescale would overflow -> handled by the explicit branch.
inline float half_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;  // exponent + mantissa
  if (em >= 0x7c00u) return bits_to_f32(sign | 0x7f800000u | (em & 0x3ffu) << 13);  // inf / NaN
  // em << 13 puts the 5-bit exponent at bits 23..27; times 2^112 fixes the bias (subnormals included).
  return bits_to_f32(sign | f32_to_bits(bits_to_f32(em << 13) * bits_to_f32(0x77800000u)));
}

// float -> IEEE half, round to nearest even; overflow -> inf, NaN stays NaN.
inline uint16_t f32_to_half(float f) {
  const uint32_t x = f32_to_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN
  if (ax >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520 rounds to inf
  if (ax < 0x38800000u) {
    // Result is subnormal (or zero): add 0.5 so the FPU rounds the mantissa at the half's lsb (2^-24).
    const float r = bits_to_f32(ax) + 0.5f;
    return static_cast<uint16_t>(sign | (f32_to_bits(r) - 0x3f000000u));
  }
  // Normal: rebias exponent (-112 << 23) and round the 13 dropped bits to nearest even.
  const uint32_t odd = (ax >> 13) & 1u;
  ax += 0xc8000fffu + odd;  // == (-(112 << 23)) + 0xfff + odd  (mod 2^32)
  return static_cast<uint16_t>(sign | (ax >> 13));
}

inline float bf16_to_f32(uint16_t h) { return bits_to_f32(static_cast<uint32_t>(h) << 16); }

// float -> bfloat16, round to nearest even; NaN stays NaN.
inline uint16_t f32_to_bf16(float f) {
  const uint32_t x = f32_to_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

// fp8 -> float, exact (every fp8 value is a float). Written with integer operations and one int -> float
// conversion, never a multiply of a float subnormal (which DAZ/FTZ modes would flush to 0).
//
// e4m3fn (torch.float8_e4m3fn): S EEEE MMM, bias 7. E = 0: subnormal M * 2^-9; E = 1..15:
// (1 + M/8) * 2^(E-7), except S.1111.111 = NaN (no inf: 1111.110 = 448 is the largest finite value).
// A normal value is rebuilt in float bits by placing EEEE MMM at bits 26..20 (exponent field E,
// mantissa M << 20) and adding the bias difference (127 - 7) << 23 to the exponent field.
inline float fp8_e4m3_to_f32(uint8_t b) {
  const uint32_t sign = static_cast<uint32_t>(b & 0x80u) << 24;
  const uint32_t em = b & 0x7fu;  // exponent + mantissa
  if (em == 0x7fu) return bits_to_f32(sign | 0x7fc00000u);  // NaN
  if (em < 0x08u) return bits_to_f32(sign | f32_to_bits(static_cast<float>(em) * 0x1p-9f));  // 0, subnormal
  return bits_to_f32(sign | ((em << 20) + (120u << 23)));
}

// e5m2 (torch.float8_e5m2): S EEEEE MM, bias 15, IEEE-like: E = 0 subnormal M * 2^-16, E = 31 inf (M = 0)
// or NaN. It is the top byte of an IEEE half. Normal: EEEEE MM at bits 27..21, + (127 - 15) << 23; inf/NaN:
// + (255 - 31) << 23 instead, which gives the all-ones float exponent with the mantissa bits kept.
inline float fp8_e5m2_to_f32(uint8_t b) {
  const uint32_t sign = static_cast<uint32_t>(b & 0x80u) << 24;
  const uint32_t em = b & 0x7fu;
  if (em >= 0x7cu) return bits_to_f32(sign | ((em << 21) + (224u << 23)));  // inf / NaN
  if (em < 0x04u) return bits_to_f32(sign | f32_to_bits(static_cast<float>(em) * 0x1p-16f));  // 0, subnormal
  return bits_to_f32(sign | ((em << 21) + (112u << 23)));
}

// Element type tags: storage type + conversions, used as template parameters by the kernels.
struct F32 {
  using T = float;
  static float load(T v) { return v; }
  static T store(float f) { return f; }
};
struct F16 {
  using T = uint16_t;
  static float load(T v) { return half_to_f32(v); }
  static T store(float f) { return f32_to_half(f); }
};
struct BF16 {
  using T = uint16_t;
  static float load(T v) { return bf16_to_f32(v); }
  static T store(float f) { return f32_to_bf16(f); }
};
// fp8 KV-cache element types (read only: the kernels dequantize them at the load, times the scale).
struct FP8E4M3 {
  using T = uint8_t;
  static float load(T v) { return fp8_e4m3_to_f32(v); }
};
struct FP8E5M2 {
  using T = uint8_t;
  static float load(T v) { return fp8_e5m2_to_f32(v); }
};
template <class E> inline constexpr bool kIsFp8 = std::is_same_v<E, FP8E4M3> || std::is_same_v<E, FP8E5M2>;

}  // namespace multiverse::cpu
