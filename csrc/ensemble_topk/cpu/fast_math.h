// Float32 exp, sigmoid and log-sigmoid written as straight-line arithmetic so that the compiler
// vectorises the loops that call them (AVX2/AVX-512 with -march=native, SSE2 otherwise): no
// branches, no libm calls. NaN in gives NaN out (the top-k relies on it to skip NaN scores).
//
// exp follows the classic Cephes expf scheme (range reduction by ln 2 split in two constants, a
// degree-6 polynomial, the power of two built in the exponent bits) with the round-to-integer done
// by the 1.5 * 2^23 "magic shift", as in many SIMD math libraries (e.g. the approach described in
// SLEEF's and Eigen's float exp); log follows Cephes logf. Error about 1-2 ulp on the ranges used.
#pragma once

#include <bit>
#include <cstdint>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace mtkernels::fast_math {

#if defined(__GNUC__)
#define MTK_INLINE inline __attribute__((always_inline))
#else
#define MTK_INLINE inline
#endif

// exp(x) for x clamped to [-87.3, 88.3], so the power of two stays a normal float
// (exp(-inf) gives about 1.2e-38 instead of 0, exp(+inf) about 2.2e38 instead of inf).
MTK_INLINE float exp(float x) {
  // Written so that a NaN passes both comparisons unchanged.
  x = x > 88.3f ? 88.3f : x;
  x = x < -87.3f ? -87.3f : x;
  constexpr float kShift = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float t = x * 1.44269504088896341f + kShift;
  const float n = t - kShift;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  // The low mantissa bits of t hold n; move n + 127 into the exponent field.
  const uint32_t scale_bits = (std::bit_cast<uint32_t>(t) + 127u) << 23;
  return p * std::bit_cast<float>(scale_bits);
}

// log(u) for u in [1, 2] (the only range log_sigmoid needs).
MTK_INLINE float log_1_to_2(float u) {
  // Bring the mantissa into [sqrt(1/2), sqrt(2)): above sqrt(2), halve it and count one power of 2.
  const bool upper = u > 1.41421356237f;
  const float m = upper ? u * 0.5f : u;
  const float e = upper ? 1.0f : 0.0f;
  const float f = m - 1.0f;
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  y = y + e * -2.12194440e-4f;
  y = y - 0.5f * z;
  return (f + y) + e * 0.693359375f;
}

MTK_INLINE float sigmoid(float x) { return 1.0f / (1.0f + exp(-x)); }

// log(sigmoid(x)) = min(x, 0) - log1p(exp(-|x|)), the overflow-free form PyTorch uses too.
MTK_INLINE float log_sigmoid(float x) {
  const float a = x < 0.0f ? -x : x;  // |x|, NaN kept
  const float e = exp(-a);            // in (0, 1]
  const float u = 1.0f + e;
  // log1p(e) = log(u) * e / (u - 1) corrects the rounding of 1 + e (Goldberg's trick); when
  // 1 + e rounds to 1, log1p(e) = e to float precision.
  const float denominator = u - 1.0f;
  const float log1p_e = denominator == 0.0f ? e : log_1_to_2(u) * (e / denominator);
  const float negative_part = x > 0.0f ? 0.0f : x;  // min(x, 0) with NaN kept
  return negative_part - log1p_e;
}

#if defined(__AVX2__) && defined(__FMA__)
#define MTK_HAVE_AVX2 1
// The same functions on 8 lanes, operation for operation (so lanes and scalar tails agree).
// Comparisons are written so that NaN lanes stay NaN: _mm256_min/max_ps return the second operand
// when either is NaN, so the input goes second.
namespace avx2 {

MTK_INLINE __m256 exp(__m256 x) {
  x = _mm256_min_ps(_mm256_set1_ps(88.3f), x);
  x = _mm256_max_ps(_mm256_set1_ps(-87.3f), x);
  const __m256 shift = _mm256_set1_ps(12582912.0f);
  const __m256 t = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), shift);
  const __m256 n = _mm256_sub_ps(t, shift);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
  const __m256i scale_bits =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(scale_bits));
}

MTK_INLINE __m256 log_1_to_2(__m256 u) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 upper = _mm256_cmp_ps(u, _mm256_set1_ps(1.41421356237f), _CMP_GT_OQ);
  const __m256 m = _mm256_blendv_ps(u, _mm256_mul_ps(u, _mm256_set1_ps(0.5f)), upper);
  const __m256 e = _mm256_and_ps(upper, one);
  const __m256 f = _mm256_sub_ps(m, one);
  const __m256 z = _mm256_mul_ps(f, f);
  __m256 y = _mm256_set1_ps(7.0376836292e-2f);
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(-1.1514610310e-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.1676998740e-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(-1.2420140846e-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.4249322787e-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(-1.6668057665e-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(2.0000714765e-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(-2.4999993993e-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(3.3333331174e-1f));
  y = _mm256_mul_ps(_mm256_mul_ps(y, f), z);
  y = _mm256_fmadd_ps(e, _mm256_set1_ps(-2.12194440e-4f), y);
  y = _mm256_fnmadd_ps(_mm256_set1_ps(0.5f), z, y);
  return _mm256_fmadd_ps(e, _mm256_set1_ps(0.693359375f), _mm256_add_ps(f, y));
}

MTK_INLINE __m256 sigmoid(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 minus_x = _mm256_xor_ps(x, _mm256_set1_ps(-0.0f));
  return _mm256_div_ps(one, _mm256_add_ps(one, exp(minus_x)));
}

MTK_INLINE __m256 log_sigmoid(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 minus_abs = _mm256_or_ps(x, _mm256_set1_ps(-0.0f));  // -|x|, NaN kept
  const __m256 e = exp(minus_abs);
  const __m256 u = _mm256_add_ps(one, e);
  const __m256 denominator = _mm256_sub_ps(u, one);
  const __m256 corrected = _mm256_mul_ps(log_1_to_2(u), _mm256_div_ps(e, denominator));
  const __m256 rounds_to_one = _mm256_cmp_ps(denominator, _mm256_setzero_ps(), _CMP_EQ_OQ);
  const __m256 log1p_e = _mm256_blendv_ps(corrected, e, rounds_to_one);
  const __m256 negative_part = _mm256_min_ps(_mm256_setzero_ps(), x);
  return _mm256_sub_ps(negative_part, log1p_e);
}

}  // namespace avx2
#endif

}  // namespace mtkernels::fast_math
