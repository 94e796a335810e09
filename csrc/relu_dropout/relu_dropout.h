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

}  // namespace mtkernels
