// multi_task_score: input checks and the network's dimensions, shared by every backend so each
// rejects the same bad input with the same message (ARCHITECTURE §3.2; the layout is
// mtkernels.reference.multi_task_score.MultiTaskScoreParams, whose Python checks say the same).
#pragma once

#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "common/checks.h"
#include "common/network_checks.h"

namespace mtkernels {

struct MultiTaskScoreDims {
  int64_t rows = 0;     // M
  int64_t width = 0;    // D
  int64_t experts = 0;  // E
  int64_t tasks = 0;    // T
  std::vector<int64_t> expert_sizes;  // H_1..H_L
  std::vector<int64_t> tower_sizes;   // G_1..G_K (G_K = 1)
  std::vector<bool> sigmoid;          // per task: "sigmoid" (true) or "identity"
};

inline void check_tensor_like_x(const at::Tensor& t, const at::Tensor& x, const std::string& name) {
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), name, " must have x's dtype ", x.scalar_type(),
                   ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == x.device(), name, " must be on x's device ", x.device(), ", got ",
                    t.device());
}

inline void check_shape(const at::Tensor& t, at::IntArrayRef shape, const std::string& name) {
  TORCH_CHECK_VALUE(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
}

inline MultiTaskScoreDims check_multi_task_score_inputs(
    const at::Tensor& x, at::TensorList expert_weights, at::TensorList expert_biases,
    const at::Tensor& gate_weight, const at::Tensor& gate_bias, const at::Tensor& gate_mask,
    at::TensorList tower_weights, at::TensorList tower_biases,
    const std::vector<std::string>& transforms) {
  MultiTaskScoreDims d;
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble ||
                       x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
                   "x must be a float32, float64, bfloat16 or float16 tensor, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 2, "x must be a 2-D tensor [M, D], got shape ", x.sizes());
  d.rows = x.size(0);
  d.width = x.size(1);
  TORCH_CHECK_TYPE(gate_mask.scalar_type() == at::kBool, "params.gate_mask must be a bool tensor, got ",
                   gate_mask.scalar_type());
  TORCH_CHECK_VALUE(gate_mask.dim() == 2 && gate_mask.size(0) >= 1 && gate_mask.size(1) >= 1,
                    "params.gate_mask must have shape [T, E] with T, E >= 1, got ", gate_mask.sizes());
  d.tasks = gate_mask.size(0);
  d.experts = gate_mask.size(1);
  TORCH_CHECK_VALUE(!expert_weights.empty(), "params.expert_weights must be a non-empty sequence of tensors");
  TORCH_CHECK_VALUE(!expert_biases.empty(), "params.expert_biases must be a non-empty sequence of tensors");
  const at::Tensor& first = expert_weights[0];
  TORCH_CHECK_VALUE(first.dim() != 3 || first.size(0) == d.experts,
                    "params.gate_mask [T, E] and params.expert_weights[0] [E, H_1, D] must agree on the "
                    "number of experts E, got ", d.experts, " and ", first.size(0));
  const auto like = [&](const at::Tensor& t, const std::string& name) { check_tensor_like_x(t, x, name); };
  int64_t fan_in = d.width;
  d.expert_sizes =
      check_expert_layers(expert_weights, expert_biases, d.experts, fan_in, /*first_index=*/1, "D of x", like);
  check_tensor_like_x(gate_weight, x, "params.gate_weight");
  check_shape(gate_weight, {d.tasks, d.experts, d.width}, "params.gate_weight");
  check_tensor_like_x(gate_bias, x, "params.gate_bias");
  check_shape(gate_bias, {d.tasks, d.experts}, "params.gate_bias");
  TORCH_CHECK_VALUE(gate_mask.device() == x.device(), "params.gate_mask must be on x's device ", x.device(),
                    ", got ", gate_mask.device());
  d.tower_sizes = check_tower_layers(tower_weights, tower_biases, d.tasks, fan_in, like);
  d.sigmoid = check_transforms(transforms, d.tasks);
  return d;
}

}  // namespace mtkernels
