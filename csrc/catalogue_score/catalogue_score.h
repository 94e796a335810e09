// catalogue_score: input checks and the network's dimensions, shared by every backend so each
// rejects the same bad input with the same message. The layout is
// mtkernels.reference.catalogue_score.CatalogueScoreParams, whose Python checks say the same.
#pragma once

#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "common/checks.h"
#include "common/network_checks.h"

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
  const auto like = [&](const at::Tensor& t, const std::string& name) { check_like_user_part(t, user_part, name); };
  int64_t fan_in = d.first;
  d.expert_sizes =
      check_expert_layers(expert_weights, expert_biases, d.experts, fan_in, /*first_index=*/2, "H_1 of the parts", like);
  d.tower_sizes = check_tower_layers(tower_weights, tower_biases, d.tasks, fan_in, like);
  d.sigmoid = check_transforms(transforms, d.tasks);
  return d;
}

}  // namespace mtkernels
