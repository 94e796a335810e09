// What every embedding_bags kernel (forward, backward, fused update) shares: the input checks and
// the derived layout (batch size, column of each feature), so all of them reject the same bad
// input with the same message (ARCHITECTURE.md §3.1).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <vector>

#include "common/checks.h"

namespace mtkernels {
namespace embedding_bags {

enum class Pooling { kSum, kMean };

inline Pooling parse_pooling(c10::string_view pooling) {
  if (pooling == "sum") return Pooling::kSum;
  if (pooling == "mean") return Pooling::kMean;
  TORCH_CHECK_VALUE(false, "pooling must be 'sum' or 'mean', got '", std::string(pooling), "'");
}

// Validated metadata of one call. Tables are addressed through raw pointers with their row
// stride; the column stride is 1 (checked).
struct Layout {
  int64_t num_features = 0;
  int64_t batch_size = 0;
  int64_t total_dim = 0;
  int64_t max_dim = 0;
  std::vector<int64_t> feature_table;  // [F]
  std::vector<int64_t> column;         // [F] first output column of each feature
  std::vector<int64_t> num_rows;       // [T]
  std::vector<int64_t> dim;            // [T]
};

// Checks shapes, dtypes and devices (metadata only) and derives the layout. `weights` must have
// unit column stride (callers make them contiguous, or reject them when updating in place).
inline Layout check_inputs(const at::TensorList& weights, const at::Tensor& indices,
                           const at::Tensor& offsets, at::IntArrayRef feature_table,
                           const c10::optional<at::Tensor>& per_sample_weights, Pooling pooling) {
  TORCH_CHECK_VALUE(!weights.empty(), "weights must hold at least one table");
  const auto dtype = weights[0].scalar_type();
  Layout layout;
  for (size_t t = 0; t < weights.size(); ++t) {
    const auto& w = weights[t];
    TORCH_CHECK_VALUE(w.dim() == 2, "weights[", t, "] must be a 2-D table, got shape ", w.sizes());
    check_float_dtype(w, "weights");
    TORCH_CHECK_TYPE(w.scalar_type() == dtype, "all tables must have one dtype: weights[0] is ",
                     dtype, ", weights[", t, "] is ", w.scalar_type());
    check_same_device(w, "weights", indices, "indices");
    layout.num_rows.push_back(w.size(0));
    layout.dim.push_back(w.size(1));
  }
  check_index_dtype(indices, "indices");
  check_index_dtype(offsets, "offsets");
  TORCH_CHECK_TYPE(indices.scalar_type() == offsets.scalar_type(),
                   "indices and offsets must have one dtype, got ", indices.scalar_type(), " and ",
                   offsets.scalar_type(), " (mtkernels.ops.embedding_bags widens a mixed pair)");
  check_dim(indices, 1, "indices");
  check_same_device(offsets, "offsets", indices, "indices");
  TORCH_CHECK_VALUE(offsets.dim() == 1 && offsets.numel() >= 1,
                    "offsets must be a non-empty 1-D tensor (F*B+1 entries), got shape ",
                    offsets.sizes());
  layout.num_features = static_cast<int64_t>(feature_table.size());
  TORCH_CHECK_VALUE(layout.num_features > 0, "feature_table must name at least one feature");
  TORCH_CHECK_VALUE((offsets.numel() - 1) % layout.num_features == 0,
                    "offsets must have F*B+1 entries for F=", layout.num_features,
                    " features (every feature the same batch size), got ", offsets.numel());
  layout.batch_size = (offsets.numel() - 1) / layout.num_features;
  for (int64_t f = 0; f < layout.num_features; ++f) {
    const int64_t t = feature_table[f];
    TORCH_CHECK_VALUE(t >= 0 && t < static_cast<int64_t>(weights.size()), "feature_table[", f,
                      "]=", t, " is not a table id in [0, ", weights.size(), ")");
    layout.feature_table.push_back(t);
    layout.column.push_back(layout.total_dim);
    layout.total_dim += layout.dim[t];
    layout.max_dim = std::max(layout.max_dim, layout.dim[t]);
  }
  if (per_sample_weights.has_value()) {
    const auto& psw = *per_sample_weights;
    TORCH_CHECK_VALUE(pooling == Pooling::kSum,
                      "per_sample_weights is only supported with pooling='sum' (sum only), got 'mean'");
    TORCH_CHECK_VALUE(psw.dim() == 1 && psw.numel() == indices.numel(),
                      "per_sample_weights must be 1-D with len(indices)=", indices.numel(),
                      " entries, got shape ", psw.sizes());
    TORCH_CHECK_TYPE(psw.scalar_type() == dtype, "per_sample_weights must have the tables' dtype ",
                     dtype, ", got ", psw.scalar_type());
    check_same_device(psw, "per_sample_weights", indices, "indices");
  }
  return layout;
}

// offsets[0] == 0, offsets[-1] == len(indices), non-decreasing: one serial pass over F*B+1
// entries (tens of microseconds next to milliseconds of gathers), before any index is read.
template <typename index_t>
void check_offsets(const index_t* offsets, int64_t num_offsets, int64_t num_indices) {
  TORCH_CHECK_VALUE(offsets[0] == 0 && static_cast<int64_t>(offsets[num_offsets - 1]) == num_indices,
                    "offsets must start at 0 and end at len(indices)=", num_indices, ", got ",
                    static_cast<int64_t>(offsets[0]), " and ",
                    static_cast<int64_t>(offsets[num_offsets - 1]));
  for (int64_t i = 1; i < num_offsets; ++i) {
    TORCH_CHECK_VALUE(offsets[i] >= offsets[i - 1], "offsets must be non-decreasing, got offsets[",
                      i - 1, "]=", static_cast<int64_t>(offsets[i - 1]), " > offsets[", i,
                      "]=", static_cast<int64_t>(offsets[i]));
  }
}

// The message for the first out-of-range index (the smallest bad position): names the feature
// (found from offsets) and the position.
template <typename index_t>
[[noreturn]] inline void raise_bad_index(const Layout& layout, const index_t* indices,
                                         const index_t* offsets, int64_t position) {
  int64_t feature = 0;
  while (feature + 1 < layout.num_features &&
         static_cast<int64_t>(offsets[(feature + 1) * layout.batch_size]) <= position) {
    ++feature;
  }
  const int64_t table = layout.feature_table[feature];
  TORCH_CHECK_INDEX(false, "feature ", feature, ": index ", static_cast<int64_t>(indices[position]),
                    " at position ", position, " is out of range for table ", table, " with ",
                    layout.num_rows[table], " rows");
  __builtin_unreachable();
}


// The fused update's own arguments: the optimizer name (returns true for "rowwise_adagrad") and
// tables that can be written in place.
inline bool check_fused_optimizer(c10::string_view optimizer, const at::TensorList& weights) {
  const bool adagrad = optimizer == "rowwise_adagrad";
  TORCH_CHECK_VALUE(adagrad || optimizer == "sgd", "optimizer must be 'sgd' or 'rowwise_adagrad', got '",
                    std::string(optimizer), "'");
  for (size_t t = 0; t < weights.size(); ++t) {
    // the update writes through the table's own storage: no copies
    TORCH_CHECK_VALUE(weights[t].dim() != 2 || weights[t].size(1) <= 1 || weights[t].stride(1) == 1,
                      "weights[", t, "] must have contiguous rows (stride(1) == 1) to be updated in place");
  }
  return adagrad;
}

// Row-wise Adagrad keeps one contiguous float32 accumulator [num_rows[t]] per table.
inline void check_accumulators(const at::TensorList& accumulators, const at::TensorList& weights,
                               const Layout& layout) {
  TORCH_CHECK_VALUE(accumulators.size() == weights.size(), "rowwise_adagrad needs one accumulator per table (",
                    weights.size(), "), got ", accumulators.size());
  for (size_t t = 0; t < accumulators.size(); ++t) {
    const auto& acc = accumulators[t];
    TORCH_CHECK_TYPE(acc.scalar_type() == at::kFloat, "accumulators[", t, "] must be float32, got ",
                     acc.scalar_type());
    TORCH_CHECK_VALUE(acc.dim() == 1 && acc.size(0) == layout.num_rows[t] && acc.is_contiguous(),
                      "accumulators[", t, "] must be a contiguous [", layout.num_rows[t],
                      "] tensor, got shape ", acc.sizes());
    check_same_device(acc, "accumulators", weights[t], "weights");
  }
}

}  // namespace embedding_bags
}  // namespace mtkernels
