// Every op schema of the `mtkernels` namespace, in one block: this file is the contract between
// the kernels (csrc/<op>/cpu|cuda, registered with TORCH_LIBRARY_IMPL) and Python (mtkernels/ops).
// The contracts are in ARCHITECTURE.md §3 and the docstrings of mtkernels.ops.
#include <torch/library.h>

TORCH_LIBRARY(mtkernels, m) {
  // ---- embedding_bags: fused multi-table pooled lookup (ARCHITECTURE §3.1) ----

  // ---- end embedding_bags ----

  // ---- ensemble_topk: fused score fusion and per-row top-k (ARCHITECTURE §3.3) ----

  // ---- end ensemble_topk ----

  // ---- multi_task_score: fused experts, gates and task towers (ARCHITECTURE §3.2) ----
  // Inference only (no autograd). Layout: mtkernels.reference.multi_task_score.MultiTaskScoreParams
  // (expert layer l [E, H_l, H_l-1] + bias [E, H_l]; gates [T, E, D] + [T, E] under a [T, E] bool
  // mask; tower layer k [T, G_k, G_k-1] + [T, G_k], last G = 1; transforms "sigmoid"/"identity").
  m.def(
      "multi_task_score(Tensor x, Tensor[] expert_weights, Tensor[] expert_biases, Tensor gate_weight, "
      "Tensor gate_bias, Tensor gate_mask, Tensor[] tower_weights, Tensor[] tower_biases, "
      "str[] transforms) -> Tensor");

  // ---- end multi_task_score ----
}
