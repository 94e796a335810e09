// Every op schema of the `mtkernels` namespace, in one block: this file is the contract between
// the kernels (csrc/<op>/cpu|cuda, registered with TORCH_LIBRARY_IMPL) and Python (mtkernels/ops).
// The contracts are in ARCHITECTURE.md §3 and the docstrings of mtkernels.ops.
#include <torch/library.h>

TORCH_LIBRARY(mtkernels, m) {
  // ---- embedding_bags: fused multi-table pooled lookup (ARCHITECTURE §3.1) ----

  // ---- end embedding_bags ----

  // ---- ensemble_topk: fused score fusion and per-row top-k (ARCHITECTURE §3.3) ----
  // scores: S tensors [B, N] (one dtype: float32, float16, bfloat16 or float64); weights: S floats;
  // transforms: S codes, 0 identity, 1 sigmoid, 2 log_sigmoid; exclusions: CSR (offsets [B+1],
  // item indices), both or neither; mode: "weighted" or "rrf". Returns values [B, k] float32 and
  // indices [B, k] int64 (tail -1/-inf when fewer than k items remain). No autograd.
  m.def(
      "ensemble_topk(Tensor[] scores, float[] weights, int k, int[] transforms, "
      "Tensor? exclude_offsets, Tensor? exclude_indices, str mode, float rrf_c) "
      "-> (Tensor values, Tensor indices)");

  // ---- end ensemble_topk ----

  // ---- multi_task_score: fused experts, gates and task towers (ARCHITECTURE §3.2) ----

  // ---- end multi_task_score ----
}
