// Shared SIMD helpers of the CPU kernels (forward: tree_attention_fwd_impl.h, backward:
// tree_attention_bwd_impl.h): vector types, loads/stores, FMA, broadcast, exp, and cache-row loads with
// dtype conversion (fp32/fp16/bf16 -> fp32). The one definition of each; there is no other copy.
//
// Compiled once per ISA: a per-ISA kernel unit (kernels_*.cpp, through
// kernels_isa_unit.h) includes this after its target pragma with MV_LEVEL defined (see isa_kernels.h
// for the levels). Everything here has internal linkage (each ISA unit has its own copy, compiled for
// its target) and uses no std containers (see isa_kernels.h).
#pragma once

#ifndef MV_LEVEL
#error "define MV_LEVEL before including simd.h (a per-ISA kernel unit does, see kernels_isa_unit.h)"
#endif

namespace multiverse::cpu {
namespace {

#define MV_INL inline __attribute__((always_inline))
#define MV_STR_(x) #x
#define MV_UNROLL(n) _Pragma(MV_STR_(GCC unroll n))

// Floats per native vector of this ISA build.
#if MV_LEVEL >= 2
constexpr int W = 16;  // zmm
#elif MV_LEVEL == 1
constexpr int W = 8;   // ymm
#else
constexpr int W = 4;   // xmm (SSE2 on x86-64; the portable vector extension elsewhere)
#endif

template <int N> struct VT;
template <> struct VT<4> {
  typedef float V __attribute__((vector_size(16)));
  typedef float U __attribute__((vector_size(16), aligned(4)));
  typedef int32_t I __attribute__((vector_size(16)));
  typedef int32_t IU __attribute__((vector_size(16), aligned(4)));
  typedef uint32_t UI __attribute__((vector_size(16)));
  typedef uint8_t B __attribute__((vector_size(4)));  // 4 bytes (fp8 elements)
};
template <> struct VT<8> {
  typedef float V __attribute__((vector_size(32)));
  typedef float U __attribute__((vector_size(32), aligned(4)));
  typedef int32_t I __attribute__((vector_size(32)));
  typedef int32_t IU __attribute__((vector_size(32), aligned(4)));
  typedef uint32_t UI __attribute__((vector_size(32)));
  typedef uint8_t B __attribute__((vector_size(8)));  // 8 bytes (fp8 elements)
};
template <> struct VT<16> {
  typedef float V __attribute__((vector_size(64)));
  typedef float U __attribute__((vector_size(64), aligned(4)));
  typedef int32_t I __attribute__((vector_size(64)));
  typedef int32_t IU __attribute__((vector_size(64), aligned(4)));
  typedef uint32_t UI __attribute__((vector_size(64)));
  typedef uint8_t B __attribute__((vector_size(16)));  // 16 bytes (fp8 elements)
};

template <int N> MV_INL typename VT<N>::V vld(const float* p) {
  return *reinterpret_cast<const typename VT<N>::U*>(p);
}
template <int N> MV_INL void vst(float* p, typename VT<N>::V v) { *reinterpret_cast<typename VT<N>::U*>(p) = v; }

// a * b + c, fused where the ISA has FMA (explicit: ISO C++ modes do not contract a * b + c).
template <class V> MV_INL V vfma(V a, V b, V c) {
#if MV_LEVEL >= 1
  if constexpr (sizeof(V) == 64) {
    return (V)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
  } else if constexpr (sizeof(V) == 32) {
    return (V)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
  } else {
    return (V)_mm_fmadd_ps((__m128)a, (__m128)b, (__m128)c);
  }
#else
  return a * b + c;
#endif
}

// Broadcast (V{} + x would cost a scalar add: 0 + x is not x for x = -0).
template <class V> MV_INL V vbcast(float x) {
#if MV_LEVEL >= 1
  if constexpr (sizeof(V) == 64) {
    return (V)_mm512_set1_ps(x);
  } else if constexpr (sizeof(V) == 32) {
    return (V)_mm256_set1_ps(x);
  } else {
    return (V)_mm_set1_ps(x);
  }
#else
  V v{};  // (initialised: GCC cannot see the loop writes every lane)
  for (int i = 0; i < static_cast<int>(sizeof(V) / 4); ++i) v[i] = x;
  return v;
#endif
}

MV_INL int imin(int a, int b) { return a < b ? a : b; }
MV_INL int imax(int a, int b) { return a > b ? a : b; }

// exp(x) for x <= 0 (scores minus their max), any vector width: 2^(x log2 e) split into 2^n * 2^f,
// f in [-1/2, 1/2], 2^f by its degree-6 Taylor polynomial (relative error < 2e-7), 2^n added into the
// exponent bits; x is clamped at -87 (callers select exact zeros for masked entries).
template <class V, class I> MV_INL V vexp(V x) {
  const V lo = V{} - 87.0f;
  x = x < lo ? lo : x;
  const V t = x * 1.44269504088896341f;
  const V n = (t + 12582912.0f) - 12582912.0f;  // + 1.5 * 2^23 rounds to an integer
  const V f = (t - n) * 0.693147180559945309f;
  V q = V{} + 1.0f / 720;
  q = vfma(q, f, V{} + 1.0f / 120);
  q = vfma(q, f, V{} + 1.0f / 24);
  q = vfma(q, f, V{} + 1.0f / 6);
  q = vfma(q, f, V{} + 0.5f);
  q = vfma(q, f, V{} + 1.0f);
  q = vfma(q, f, V{} + 1.0f);
  const I ni = __builtin_convertvector(n, I);
  return (V)((I)q + (ni << 23));
}

// tanh(x), any x, any vector width (the logit soft-cap, s = c tanh(s0 / c)): sign(x) (1 - e) / (1 + e)
// with e = exp(-2|x|) (vexp's range), and x (1 - x^2 / 3 + 2 x^4 / 15 - 17 x^6 / 315) for |x| < 1/16
// where 1 - e would cancel. Absolute error < 3e-7 everywhere, relative < 4e-6; +-Inf -> +-1, NaN -> NaN.
template <class V, class I> MV_INL V vtanh(V x) {
  const I sign_bit = I{} + static_cast<int32_t>(0x80000000u);
  const I sign = (I)x & sign_bit;
  const V ax = (V)((I)x & ~sign_bit);
  const V e = vexp<V, I>(V{} - (ax + ax));
  const V big = (V{} + 1.0f - e) / (V{} + 1.0f + e);
  const V x2 = x * x;
  V poly = vfma(x2, V{} - 17.0f / 315, V{} + 2.0f / 15);
  poly = vfma(poly, x2, V{} - 1.0f / 3);
  poly = vfma(poly, x2, V{} + 1.0f);
  const V small = (V)((I)(poly * ax) | sign);
  return ax < 0.0625f ? small : (V)((I)big | sign);
}

// ---------------------------------------------------------------------------------- cache-row loads
// N fp8 bytes -> N floats, exact: fp8_e4m3_to_f32 / fp8_e5m2_to_f32 (convert.h, which explain the bit
// layouts) on vectors. The bytes are widened to 32-bit lanes (widen_u8); a normal
// value is its exponent + mantissa bits shifted into the float's fields plus the bias difference, a
// subnormal (exponent field 0) the integer mantissa times 2^-9 (e4m3) / 2^-16 (e5m2) (an int -> float
// conversion: no float subnormal is ever formed, so DAZ/FTZ cannot flush it), then the special values
// (e4m3: S.1111.111 NaN; e5m2: exponent 31, inf / NaN) and the sign bit.
// N bytes zero-extended to N 32-bit lanes (GCC 12 scalarises __builtin_convertvector of a byte vector:
// byte by byte through general registers, so x86 uses vpmovzxbd / SSE2 unpacks).
template <int N> MV_INL typename VT<N>::UI widen_u8(const uint8_t* src) {
  using U = typename VT<N>::UI;
#if MV_LEVEL >= 2
  if constexpr (N == 16) {
    return (U)_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
  } else
#endif
#if MV_LEVEL >= 1
  if constexpr (N == 8) {
    return (U)_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src)));
  } else
#endif
#if defined(MULTIVERSE_X86_ISAS) && defined(__SSE2__)
  if constexpr (N == 4) {
    int32_t w;
    __builtin_memcpy(&w, src, 4);
    const __m128i z = _mm_setzero_si128();
    return (U)_mm_unpacklo_epi16(_mm_unpacklo_epi8(_mm_cvtsi32_si128(w), z), z);
  } else
#endif
  {
    typename VT<N>::B b;
    __builtin_memcpy(&b, src, N);
    return __builtin_convertvector(b, U);
  }
}

template <class E, int N> MV_INL typename VT<N>::V fp8_to_f32_vec(const uint8_t* src) {
  using V = typename VT<N>::V;
  using I = typename VT<N>::I;
  using U = typename VT<N>::UI;
  const U x = widen_u8<N>(src);
  const U sign = (x & 0x80u) << 24;
  const U em = x & 0x7fu;  // exponent + mantissa
  U r;
  if constexpr (std::is_same_v<E, FP8E4M3>) {
    const U sub = (U)(__builtin_convertvector((I)em, V) * 0x1p-9f);
    r = em < 0x08u ? sub : (em << 20) + (120u << 23);
    r = em == 0x7fu ? U{} + 0x7fc00000u : r;
  } else {
    static_assert(std::is_same_v<E, FP8E5M2>, "fp8 element type");
    const U sub = (U)(__builtin_convertvector((I)em, V) * 0x1p-16f);
    r = em < 0x04u ? sub : (em << 21) + (em >= 0x7cu ? U{} + (224u << 23) : U{} + (112u << 23));
  }
  return (V)(r | sign);
}

#if MV_LEVEL >= 1
// 8 fp16 / bf16 elements -> 8 floats, exact (F16C vcvtph2ps; bf16: the 16 bits are the float's high half).
template <class E> MV_INL __m256 cvt8_ps(const typename E::T* src) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
  if constexpr (std::is_same_v<E, F16>) {
    return _mm256_cvtph_ps(h);
  } else {
    static_assert(std::is_same_v<E, BF16>, "fp16 / bf16 elements");
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
}
#endif

// One row of D elements of E (a K/V cache row, a q / grad_out row) -> dp floats, zeros past D. An fp8
// row (kIsFp8<E>: a K/V cache row) is dequantized: float(x) * scale (one rounding, as the reference's
// cache.float() * scale); other types ignore scale.
template <class E>
MV_INL void pack_row(const typename E::T* __restrict src, float* __restrict dst, int D, int dp, float scale = 1.0f) {
  int d = 0;
  if constexpr (kIsFp8<E>) {
    using V = typename VT<W>::V;
    const V sv = vbcast<V>(scale);
    for (; d + W <= D; d += W) vst<W>(dst + d, fp8_to_f32_vec<E, W>(src + d) * sv);
    for (; d < D; ++d) dst[d] = E::load(src[d]) * scale;
  }
  if constexpr (std::is_same_v<E, F32>) {
    for (; d + W <= D; d += W) vst<W>(dst + d, vld<W>(src + d));
  }
#if MV_LEVEL >= 1
  if constexpr (std::is_same_v<E, F16>) {
#if MV_LEVEL >= 2
    for (; d + 16 <= D; d += 16)
      _mm512_storeu_ps(dst + d, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + d))));
#endif
    for (; d + 8 <= D; d += 8) _mm256_storeu_ps(dst + d, cvt8_ps<E>(src + d));
  }
  if constexpr (std::is_same_v<E, BF16>) {
#if MV_LEVEL >= 2
    for (; d + 16 <= D; d += 16) {
      const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + d)));
      _mm512_storeu_ps(dst + d, _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
    }
#endif
    for (; d + 8 <= D; d += 8) _mm256_storeu_ps(dst + d, cvt8_ps<E>(src + d));
  }
#endif
  for (; d < D; ++d) dst[d] = E::load(src[d]);
  for (; d < dp; ++d) dst[d] = 0.0f;
}

}  // namespace
}  // namespace multiverse::cpu
