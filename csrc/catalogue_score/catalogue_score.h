// catalogue_score: input checks and the network's dimensions, shared by every backend so each
// rejects the same bad input with the same message. The layout is
// mtkernels.reference.catalogue_score.CatalogueScoreParams, whose Python checks say the same.
#pragma once

#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "common/checks.h"

namespace mtkernels {

struct CatalogueScoreDims {
  int64_t users = 0;    // U
  int64_t items = 0;    // N
  int64_t width = 0;    // C = E*H_1 + T*E columns of the first layer's parts
  int64_t experts = 0;  // E
  int64_t tasks = 0;    // T
  int64_t first = 0;    // H_1
  std::vector<int64_t> expert_sizes;  // H_2..H_L (empty: one-layer experts)
  std::vector<int64_t> tower_sizes;   // G_1..G_K (G_K = 1)
  std::vector<bool> sigmoid;          // per task: "sigmoid" (true) or "identity"
};

inline void check_like_user_part(const at::Tensor& t, const at::Tensor& user_part, const std::string& name) {
  TORCH_CHECK_TYPE(t.scalar_type() == user_part.scalar_type(), name, " must have user_part's dtype ",
                   user_part.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == user_part.device(), name, " must be on user_part's device ",
                    user_part.device(), ", got ", t.device());
}

inline CatalogueScoreDims check_catalogue_score_inputs(
    const at::Tensor& user_part, const at::Tensor& item_part, at::TensorList expert_weights,
    at::TensorList expert_biases, const at::Tensor& gate_mask, at::TensorList tower_weights,
    at::TensorList tower_biases, const std::vector<std::string>& transforms) {
  CatalogueScoreDims d;
  TORCH_CHECK_TYPE(user_part.scalar_type() == at::kFloat, "user_part must be a float32 tensor, got ",
                   user_part.scalar_type());
  TORCH_CHECK_VALUE(user_part.dim() == 2, "user_part must be a 2-D tensor [U, E*H_1 + T*E], got shape ",
                    user_part.sizes());
  TORCH_CHECK_VALUE(item_part.dim() == 2, "item_part must be a 2-D tensor [N, E*H_1 + T*E], got shape ",
                    item_part.sizes());
  check_like_user_part(item_part, user_part, "item_part");
  TORCH_CHECK_VALUE(item_part.size(1) == user_part.size(1), "item_part must have user_part's ",
                    user_part.size(1), " columns, got ", item_part.size(1));
  d.users = user_part.size(0);
  d.items = item_part.size(0);
  d.width = user_part.size(1);
  TORCH_CHECK_TYPE(gate_mask.scalar_type() == at::kBool, "params.gate_mask must be a bool tensor, got ",
                   gate_mask.scalar_type());
  TORCH_CHECK_VALUE(gate_mask.dim() == 2 && gate_mask.size(0) >= 1 && gate_mask.size(1) >= 1,
                    "params.gate_mask must have shape [T, E] with T, E >= 1, got ", gate_mask.sizes());
  TORCH_CHECK_VALUE(gate_mask.device() == user_part.device(), "params.gate_mask must be on user_part's device ",
                    user_part.device(), ", got ", gate_mask.device());
  d.tasks = gate_mask.size(0);
  d.experts = gate_mask.size(1);
  const int64_t expert_columns = d.width - d.tasks * d.experts;
  TORCH_CHECK_VALUE(expert_columns > 0 && expert_columns % d.experts == 0,
                    "user_part and item_part must have E*H_1 + T*E columns (E=", d.experts, ", T=", d.tasks,
                    " from params.gate_mask, H_1 >= 1), got ", d.width);
  d.first = expert_columns / d.experts;
  TORCH_CHECK_VALUE(expert_weights.size() == expert_biases.size(),
                    "params.expert_biases must have one tensor per deeper expert layer (", expert_weights.size(),
                    "), got ", expert_biases.size());
  TORCH_CHECK_VALUE(!tower_weights.empty(), "params.tower_weights must be a non-empty sequence of tensors");
  TORCH_CHECK_VALUE(tower_weights.size() == tower_biases.size(),
                    "params.tower_biases must have one tensor per tower layer (", tower_weights.size(),
                    "), got ", tower_biases.size());
  int64_t fan_in = d.first;
  for (size_t l = 0; l < expert_weights.size(); ++l) {
    const std::string name = "params.expert_weights[" + std::to_string(l) + "]";
    const at::Tensor& w = expert_weights[l];
    TORCH_CHECK_VALUE(w.dim() == 3 && w.size(0) == d.experts && w.size(2) == fan_in, name,
                      " must have shape [E=", d.experts, ", H_", l + 2, ", ", fan_in, "] (in_features = ",
                      l == 0 ? "H_1 of the parts" : "the previous layer width", "), got ", w.sizes());
    check_like_user_part(w, user_part, name);
    const std::string bname = "params.expert_biases[" + std::to_string(l) + "]";
    check_like_user_part(expert_biases[l], user_part, bname);
    TORCH_CHECK_VALUE(expert_biases[l].sizes() == at::IntArrayRef({d.experts, w.size(1)}), bname,
                      " must have shape [", d.experts, ", ", w.size(1), "], got ", expert_biases[l].sizes());
    d.expert_sizes.push_back(w.size(1));
    fan_in = w.size(1);
  }
  const size_t num_layers = tower_weights.size();
  for (size_t k = 0; k < num_layers; ++k) {
    const std::string name = "params.tower_weights[" + std::to_string(k) + "]";
    const at::Tensor& w = tower_weights[k];
    const bool last = k + 1 == num_layers;
    TORCH_CHECK_VALUE(w.dim() == 3 && w.size(0) == d.tasks && w.size(2) == fan_in && (!last || w.size(1) == 1),
                      name, " must have shape [T=", d.tasks, ", G_", k + 1, ", ", fan_in, "]",
                      last ? ", out_features 1 in the last layer" : "", ", got ", w.sizes());
    check_like_user_part(w, user_part, name);
    const std::string bname = "params.tower_biases[" + std::to_string(k) + "]";
    check_like_user_part(tower_biases[k], user_part, bname);
    TORCH_CHECK_VALUE(tower_biases[k].sizes() == at::IntArrayRef({d.tasks, w.size(1)}), bname,
                      " must have shape [", d.tasks, ", ", w.size(1), "], got ", tower_biases[k].sizes());
    d.tower_sizes.push_back(w.size(1));
    fan_in = w.size(1);
  }
  TORCH_CHECK_VALUE(static_cast<int64_t>(transforms.size()) == d.tasks,
                    "params.transforms must be a sequence of T=", d.tasks, " strings, got ", transforms.size());
  for (size_t t = 0; t < transforms.size(); ++t) {
    TORCH_CHECK_VALUE(transforms[t] == "sigmoid" || transforms[t] == "identity", "params.transforms[", t,
                      "] must be 'sigmoid' or 'identity', got '", transforms[t], "'");
    d.sigmoid.push_back(transforms[t] == "sigmoid");
  }
  return d;
}

}  // namespace mtkernels
