// relu_dropout: ReLU then inverted dropout in one pass, with a counter-based keep decision, so
// that neither a mask tensor nor a random stream has to be stored for the backward.
//
// Element i (the row-major index in x's logical shape) is kept when
//   hash(i, seed) >= threshold,   threshold = min(round(p * 2^32), 2^32 - 1),
// and kept values are scaled by 2^32 / (2^32 - threshold). hash is two rounds of MurmurHash3's
// 32-bit finaliser (Appleby): h = fmix32(fmix32(lo(i) + lo(seed)) ^ (hi(i) + hi(seed))), in
// unsigned 32-bit arithmetic. It depends only on (i, seed): any thread split gives the same mask,
// and mtkernels.reference.relu_dropout computes the same bits with int64 torch ops.
//
// The backward needs only the output y: y > 0 exactly where ReLU passed and the element was kept,
// so dx = dy * scale where y > 0, else 0.
#pragma once

#include <cstdint>

namespace mtkernels {

inline uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85ebca6bu;
  h ^= h >> 13;
  h *= 0xc2b2ae35u;
  h ^= h >> 16;
  return h;
}

inline uint32_t dropout_hash(uint32_t index_lo, uint32_t index_hi, uint32_t seed_lo, uint32_t seed_hi) {
  return fmix32(fmix32(index_lo + seed_lo) ^ (index_hi + seed_hi));
}

// The drop threshold on the 32-bit hash and the scale of kept values for drop probability p.
inline uint32_t dropout_threshold(double p) {
  double t = p * 4294967296.0;
  if (!(t > 0.0)) return 0u;
  if (t >= 4294967295.0) return 4294967295u;
  return static_cast<uint32_t>(t + 0.5);
}

inline double dropout_scale(uint32_t threshold) {
  return 4294967296.0 / (4294967296.0 - static_cast<double>(threshold));
}

// No FP trap semantics here: with them GCC will not if-convert the compare-and-select below, and a
// branch on a random keep decision mispredicts about every other element (~4 ms instead of ~0.3 ms
// for 2048 x 256 floats).
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")

// One row of relu_dropout, elements base .. base + cols - 1 of the row-major index (shared by
// relu_dropout and expert_gate_mixture): branch-free selects over restrict pointers, so the compiler
// vectorises the hash and the select.
template <typename scalar_t>
inline void relu_dropout_row(const scalar_t* __restrict__ in, scalar_t* __restrict__ out, int64_t cols, uint64_t base,
                             uint32_t threshold, uint32_t seed_lo, uint32_t seed_hi, scalar_t scale) {
  if ((base >> 32) == ((base + static_cast<uint64_t>(cols) - 1) >> 32)) {  // no 2^32 boundary inside the row
    const uint32_t lo = static_cast<uint32_t>(base), hi = static_cast<uint32_t>(base >> 32);
    for (int64_t c = 0; c < cols; ++c) {
      const uint32_t h = dropout_hash(lo + static_cast<uint32_t>(c), hi, seed_lo, seed_hi);
      const scalar_t v = in[c] * scale;  // computed unconditionally: a conditional FP op blocks if-conversion
      out[c] = ((h >= threshold) & !(in[c] <= scalar_t(0))) ? v : scalar_t(0);  // "not <= 0" keeps NaN, as torch.relu
    }
    return;
  }
  for (int64_t c = 0; c < cols; ++c) {
    const uint64_t i = base + static_cast<uint64_t>(c);
    const uint32_t h = dropout_hash(static_cast<uint32_t>(i), static_cast<uint32_t>(i >> 32), seed_lo, seed_hi);
    const scalar_t v = in[c] * scale;
    out[c] = ((h >= threshold) & !(in[c] <= scalar_t(0))) ? v : scalar_t(0);
  }
}

#pragma GCC pop_options

}  // namespace mtkernels
