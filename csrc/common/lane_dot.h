// A dot product the compiler vectorises, shared by the CPU training-op kernels (gated_mixture,
// expert_gate_mixture), so both sum in the same order and agree bit for bit.
#pragma once

#include <cstdint>

namespace mtkernels {

constexpr int64_t kDotLanes = 8;

// <a, b> over n elements in kDotLanes independent partial sums, which the compiler vectorises (one
// running sum would be a serial chain: float addition is not associative, so it may not reorder it).
template <typename scalar_t, typename acc_t>
acc_t lane_dot(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, int64_t n) {
  acc_t lanes[kDotLanes] = {};
  int64_t j = 0;
  for (; j + kDotLanes <= n; j += kDotLanes)
    for (int64_t l = 0; l < kDotLanes; ++l) lanes[l] += static_cast<acc_t>(a[j + l]) * static_cast<acc_t>(b[j + l]);
  acc_t total = 0;
  for (int64_t l = 0; l < kDotLanes; ++l) total += lanes[l];
  for (; j < n; ++j) total += static_cast<acc_t>(a[j]) * static_cast<acc_t>(b[j]);
  return total;
}

}  // namespace mtkernels
