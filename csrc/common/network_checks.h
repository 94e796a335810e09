// Checks of the expert / tower / transform parameters that multi_task_score and catalogue_score
// share (mtkernels.reference.multi_task_score.MultiTaskScoreParams is the layout), so both ops
// reject the same bad input with the same message. `check_like(t, name)` checks a weight's dtype
// and device against the op's main input.
#pragma once

#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace mtkernels {

// weights[l] [E, H_l, fan_in of layer l], biases[l] [E, H_l]; layer 0 reads `fan_in` columns, which
// `first_fan_in` describes in messages, and is called H_{first_index}. On return fan_in is the
// last width; the result is H_first .. H_last.
template <typename CheckLike>
std::vector<int64_t> check_expert_layers(at::TensorList weights, at::TensorList biases, int64_t experts,
                                         int64_t& fan_in, int64_t first_index, const char* first_fan_in,
                                         CheckLike check_like) {
  TORCH_CHECK_VALUE(weights.size() == biases.size(), "params.expert_biases must have one tensor per ",
                    first_index == 1 ? "" : "deeper ", "expert layer (", weights.size(), "), got ", biases.size());
  std::vector<int64_t> sizes;
  for (size_t l = 0; l < weights.size(); ++l) {
    const std::string name = "params.expert_weights[" + std::to_string(l) + "]";
    const at::Tensor& w = weights[l];
    TORCH_CHECK_VALUE(w.dim() == 3 && w.size(0) == experts && w.size(2) == fan_in, name, " must have shape [E=",
                      experts, ", H_", static_cast<int64_t>(l) + first_index, ", ", fan_in, "] (in_features = ",
                      l == 0 ? first_fan_in : "the previous layer width", "), got ", w.sizes());
    check_like(w, name);
    const std::string bname = "params.expert_biases[" + std::to_string(l) + "]";
    check_like(biases[l], bname);
    TORCH_CHECK_VALUE(biases[l].sizes() == at::IntArrayRef({experts, w.size(1)}), bname, " must have shape [",
                      experts, ", ", w.size(1), "], got ", biases[l].sizes());
    sizes.push_back(w.size(1));
    fan_in = w.size(1);
  }
  return sizes;
}

// tower_weights[k] [T, G_k, G_{k-1}] (G_0 = fan_in, G_K = 1), tower_biases[k] [T, G_k]: G_1 .. G_K.
template <typename CheckLike>
std::vector<int64_t> check_tower_layers(at::TensorList weights, at::TensorList biases, int64_t tasks, int64_t fan_in,
                                        CheckLike check_like) {
  TORCH_CHECK_VALUE(!weights.empty(), "params.tower_weights must be a non-empty sequence of tensors");
  TORCH_CHECK_VALUE(weights.size() == biases.size(), "params.tower_biases must have one tensor per tower layer (",
                    weights.size(), "), got ", biases.size());
  std::vector<int64_t> sizes;
  for (size_t k = 0; k < weights.size(); ++k) {
    const std::string name = "params.tower_weights[" + std::to_string(k) + "]";
    const at::Tensor& w = weights[k];
    const bool last = k + 1 == weights.size();
    TORCH_CHECK_VALUE(w.dim() == 3 && w.size(0) == tasks && w.size(2) == fan_in && (!last || w.size(1) == 1), name,
                      " must have shape [T=", tasks, ", G_", k + 1, ", ", fan_in, "]",
                      last ? ", out_features 1 in the last layer" : "", ", got ", w.sizes());
    check_like(w, name);
    const std::string bname = "params.tower_biases[" + std::to_string(k) + "]";
    check_like(biases[k], bname);
    TORCH_CHECK_VALUE(biases[k].sizes() == at::IntArrayRef({tasks, w.size(1)}), bname, " must have shape [", tasks,
                      ", ", w.size(1), "], got ", biases[k].sizes());
    sizes.push_back(w.size(1));
    fan_in = w.size(1);
  }
  return sizes;
}

// One output transform per task, "sigmoid" (true) or "identity" (false).
inline std::vector<bool> check_transforms(const std::vector<std::string>& transforms, int64_t tasks) {
  TORCH_CHECK_VALUE(static_cast<int64_t>(transforms.size()) == tasks, "params.transforms must be a sequence of T=",
                    tasks, " strings, got ", transforms.size());
  std::vector<bool> sigmoid;
  for (size_t t = 0; t < transforms.size(); ++t) {
    TORCH_CHECK_VALUE(transforms[t] == "sigmoid" || transforms[t] == "identity", "params.transforms[", t,
                      "] must be 'sigmoid' or 'identity', got '", transforms[t], "'");
    sigmoid.push_back(transforms[t] == "sigmoid");
  }
  return sigmoid;
}

}  // namespace mtkernels
