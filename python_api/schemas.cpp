// Every op schema of the `mtkernels` namespace, in one block: this file is the contract between
// the kernels (csrc/<op>/cpu|cuda, registered with TORCH_LIBRARY_IMPL) and Python (mtkernels/ops).
// The contracts are in ARCHITECTURE.md §3 and the docstrings of mtkernels.ops.
#include <torch/library.h>

TORCH_LIBRARY(mtkernels, m) {
  // ---- embedding_bags: fused multi-table pooled lookup (ARCHITECTURE §3.1) ----
  // Forward. `sparse` is read by the backward only (row-sparse instead of dense table grads).
  m.def(
      "embedding_bags(Tensor[] weights, Tensor indices, Tensor offsets, int[] feature_table, "
      "str pooling, Tensor? per_sample_weights, bool sparse) -> Tensor");
  // Dense gradient of every table.
  m.def(
      "embedding_bags_backward(Tensor grad_output, Tensor[] weights, Tensor indices, "
      "Tensor offsets, int[] feature_table, str pooling, Tensor? per_sample_weights) -> Tensor[]");
  // Row-sparse gradient of every table: (unique rows ascending [U_t] int64, row grads [U_t, D_t]).
  m.def(
      "embedding_bags_backward_sparse(Tensor grad_output, Tensor[] weights, Tensor indices, "
      "Tensor offsets, int[] feature_table, str pooling, Tensor? per_sample_weights) "
      "-> (Tensor[], Tensor[])");
  // Gradient of the per-sample weights [L].
  m.def(
      "embedding_bags_per_sample_weights_backward(Tensor grad_output, Tensor[] weights, "
      "Tensor indices, Tensor offsets, int[] feature_table) -> Tensor");
  // Fused backward + optimizer ("sgd" | "rowwise_adagrad"): updates the touched rows of the
  // tables (and the row-wise accumulators) in place.
  m.def(
      "embedding_bags_fused_update(Tensor(a!)[] weights, Tensor(b!)[] accumulators, "
      "Tensor grad_output, Tensor indices, Tensor offsets, int[] feature_table, str pooling, "
      "Tensor? per_sample_weights, str optimizer, float lr, float eps) -> ()");

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
  // Inference only (no autograd). Layout: mtkernels.reference.multi_task_score.MultiTaskScoreParams
  // (expert layer l [E, H_l, H_l-1] + bias [E, H_l]; gates [T, E, D] + [T, E] under a [T, E] bool
  // mask; tower layer k [T, G_k, G_k-1] + [T, G_k], last G = 1; transforms "sigmoid"/"identity").
  m.def(
      "multi_task_score(Tensor x, Tensor[] expert_weights, Tensor[] expert_biases, Tensor gate_weight, "
      "Tensor gate_bias, Tensor gate_mask, Tensor[] tower_weights, Tensor[] tower_biases, "
      "str[] transforms) -> Tensor");
  // CPU only: the weights packed once into the kernel's 16-column panels (a float32 buffer), and
  // the same scoring reading them, so a serving loop does not repack per call.
  m.def(
      "multi_task_score_pack(Tensor[] expert_weights, Tensor[] expert_biases, Tensor gate_weight, "
      "Tensor gate_bias, Tensor gate_mask, Tensor[] tower_weights, Tensor[] tower_biases, "
      "str[] transforms) -> Tensor");
  m.def(
      "multi_task_score_packed(Tensor x, Tensor[] expert_weights, Tensor[] expert_biases, Tensor gate_weight, "
      "Tensor gate_bias, Tensor gate_mask, Tensor[] tower_weights, Tensor[] tower_biases, "
      "str[] transforms, Tensor packed) -> Tensor");

  // ---- end multi_task_score ----

  // ---- relu_dropout: ReLU + inverted dropout, mask from a counter-based hash (training path) ----
  // y = relu(x) * keep(i, seed) / (1 - p'), p' = round(p * 2^32) / 2^32; keep(i, seed) is the
  // hash of csrc/relu_dropout/relu_dropout.h over x's row-major index i. The backward reads y only
  // (dx = dy / (1 - p') where y > 0), so no mask is stored. float32 / float64.
  m.def("relu_dropout(Tensor x, float p, int seed) -> Tensor");
  m.def("relu_dropout_backward(Tensor grad_output, Tensor result, float p) -> Tensor");

  // ---- end relu_dropout ----

  // ---- gated_mixture: MMoE/PLE gates and expert mixture (training path) ----
  // logits [B, T, E] (-inf: expert not allowed), expert_outputs [B, E, H] -> (mixed [B, T, H],
  // weights [B, T, E] = softmax(logits, -1)); mixed[b, t] = sum_e weights[b, t, e] * expert_outputs[b, e].
  m.def("gated_mixture(Tensor logits, Tensor expert_outputs) -> (Tensor mixed, Tensor weights)");
  // (grad_logits [B, T, E], grad_expert_outputs [B, E, H]); grad_weights may be None.
  m.def(
      "gated_mixture_backward(Tensor grad_mixed, Tensor? grad_weights, Tensor weights, "
      "Tensor expert_outputs) -> (Tensor, Tensor)");

  // ---- end gated_mixture ----

  // ---- expert_gate_mixture: relu_dropout of the experts' layer + gated_mixture, one op (training path) ----
  // z [B, E*H + G*E] (E experts' pre-activations [B, E*H], then G gates' logits [B, G*E], the output
  // of one GEMM without its bias) and that GEMM's bias [E*H + G*E] or None; with u = z + bias:
  // -> (mixed [B, G, H], hidden [B, E, H] = relu_dropout(u[:, :E*H], p, seed),
  // weights [B, G, E] = softmax of each gate's logits); mixed[b, g] = sum_e weights[b, g, e] hidden[b, e].
  m.def("expert_gate_mixture(Tensor z, Tensor? bias, int num_experts, int num_gates, float p, int seed) "
        "-> (Tensor mixed, Tensor hidden, Tensor weights)");
  // (grad_z [B, E*H + G*E], grad_bias [E*H + G*E] = column sums of grad_z when bias_grad, else [0]);
  // grad_hidden and grad_weights may be None.
  m.def(
      "expert_gate_mixture_backward(Tensor grad_mixed, Tensor? grad_hidden, Tensor? grad_weights, Tensor hidden, "
      "Tensor weights, float p, bool bias_grad) -> (Tensor grad_z, Tensor grad_bias)");

  // ---- end expert_gate_mixture ----
}
