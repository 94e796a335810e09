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

}  // namespace mtkernels::fast_math
