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

  // ---- end multi_task_score ----
}
