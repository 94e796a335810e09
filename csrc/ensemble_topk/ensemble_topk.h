// Argument checks of mtkernels::ensemble_topk shared by the CPU and CUDA kernels, so both reject
// the same bad input with the same message (ARCHITECTURE.md §3.3). The per-item checks of
// exclude_indices stay in each kernel: they read the indices where they live.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string_view>

#include "common/checks.h"

namespace mtkernels {

// Transform codes of the schema's `int[] transforms` (mtkernels/ops/ensemble_topk.py).
enum Transform : int64_t { kIdentity = 0, kSigmoid = 1, kLogSigmoid = 2 };

// Everything but the exclusions' contents: mode, k, the sources' dtype, shape and device, one
// finite weight and one known transform per source, rrf_c, exclusions given together.
inline void check_ensemble_topk_args(at::TensorList scores, at::ArrayRef<double> weights, int64_t k,
                                     at::IntArrayRef transforms,
                                     const std::optional<at::Tensor>& exclude_offsets,
                                     const std::optional<at::Tensor>& exclude_indices,
                                     std::string_view mode_name, double rrf_c) {
  TORCH_CHECK_VALUE(mode_name == "weighted" || mode_name == "rrf",
                    "mode must be one of ('weighted', 'rrf'), got '", mode_name, "'");
  TORCH_CHECK_VALUE(k >= 0, "k must be >= 0, got ", k);
  const auto num_sources = static_cast<int64_t>(scores.size());
  TORCH_CHECK_VALUE(num_sources >= 1, "scores must hold at least one source (S >= 1), got none");
  const at::Tensor& first = scores[0];
  for (int64_t s = 0; s < num_sources; ++s) {
    const at::Tensor& source = scores[s];
    TORCH_CHECK_TYPE(source.scalar_type() == at::kFloat || source.scalar_type() == at::kHalf ||
                         source.scalar_type() == at::kBFloat16 ||
                         source.scalar_type() == at::kDouble,
                     "scores[", s, "] must be float32, float16, bfloat16 or float64, got ",
                     source.scalar_type());
    TORCH_CHECK_TYPE(source.scalar_type() == first.scalar_type(),
                     "all sources must have the same dtype: scores[0] is ", first.scalar_type(),
                     ", scores[", s, "] is ", source.scalar_type());
    TORCH_CHECK_VALUE(source.dim() == 2, "scores[", s, "] must be a [B, N] tensor, got shape ",
                      source.sizes());
    TORCH_CHECK_VALUE(source.sizes() == first.sizes(),
                      "all sources must have the same shape [B, N]: scores[0] is ", first.sizes(),
                      ", scores[", s, "] is ", source.sizes());
    TORCH_CHECK_VALUE(source.device() == first.device(),
                      "all sources must be on the same device: scores[0] is on ", first.device(),
                      ", scores[", s, "] on ", source.device());
  }
  TORCH_CHECK_VALUE(static_cast<int64_t>(weights.size()) == num_sources,
                    "weights must have one entry per source (S=", num_sources, "), got ",
                    weights.size());
  TORCH_CHECK_VALUE(static_cast<int64_t>(transforms.size()) == num_sources,
                    "transforms must have one entry per source (S=", num_sources, "), got ",
                    transforms.size());
  for (int64_t s = 0; s < num_sources; ++s) {
    TORCH_CHECK_VALUE(std::isfinite(weights[s]), "weights must be finite, got ", weights[s],
                      " at position ", s);
    TORCH_CHECK_VALUE(transforms[s] >= kIdentity && transforms[s] <= kLogSigmoid, "transforms[", s,
                      "] must be a code 0 (identity), 1 (sigmoid) or 2 (log_sigmoid), got ",
                      transforms[s]);
  }
  TORCH_CHECK_VALUE(std::isfinite(rrf_c) && rrf_c >= 0, "rrf_c must be a finite number >= 0, got ",
                    rrf_c);
  TORCH_CHECK_VALUE(exclude_offsets.has_value() == exclude_indices.has_value(),
                    "exclude_offsets and exclude_indices must be given together (or neither)");
}

// The exclusions' dtypes, dims and device, and the CSR offsets: B + 1 entries from 0 to
// len(exclude_indices), non-decreasing. Returns the offsets as contiguous int64 on the host (a
// copy from the device for CUDA: B + 1 values are few, and the copy synchronises once).
inline at::Tensor checked_exclusion_offsets(const at::Tensor& offsets_in,
                                            const at::Tensor& indices_in,
                                            const at::Device& device, int64_t batch_size) {
  check_index_dtype(offsets_in, "exclude_offsets");
  check_index_dtype(indices_in, "exclude_indices");
  check_dim(offsets_in, 1, "exclude_offsets");
  check_dim(indices_in, 1, "exclude_indices");
  TORCH_CHECK_VALUE(offsets_in.device() == device && indices_in.device() == device,
                    "exclude_offsets and exclude_indices must be on the device of scores (", device,
                    "), got ", offsets_in.device(), " and ", indices_in.device());
  TORCH_CHECK_VALUE(offsets_in.numel() == batch_size + 1, "exclude_offsets must have B+1=",
                    batch_size + 1, " entries, got ", offsets_in.numel());
  at::Tensor offsets = offsets_in.to(at::kLong).cpu().contiguous();
  const int64_t* o = offsets.const_data_ptr<int64_t>();
  const int64_t nnz = indices_in.numel();
  TORCH_CHECK_VALUE(o[0] == 0 && o[batch_size] == nnz,
                    "exclude_offsets must start at 0 and end at len(exclude_indices)=", nnz,
                    ", got ", o[0], " and ", o[batch_size]);
  for (int64_t b = 0; b < batch_size; ++b) {
    TORCH_CHECK_VALUE(o[b] <= o[b + 1], "exclude_offsets must be non-decreasing");
  }
  return offsets;
}

}  // namespace mtkernels
