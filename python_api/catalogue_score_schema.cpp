// The schema of `catalogue_score`, a fragment of the `mtkernels` library (schemas.cpp holds the
// other ops): scoring every (user, item) pair from a multi-task network's factorised first layer.
// Kept in its own file so that ops added to schemas.cpp in parallel merge without conflicts.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(mtkernels, m) {
  // ---- catalogue_score (mtkernels.ops.catalogue_score; layout:
  // mtkernels.reference.catalogue_score.CatalogueScoreParams) ----
  // user_part [U, E*H_1 + T*E] and item_part [N, E*H_1 + T*E] float32: the first expert layer's
  // pre-activations (E blocks of H_1 columns) then the gate logits (T blocks of E), bias in
  // item_part; the deeper expert layers [E, H_l, H_l-1] + [E, H_l] (possibly none); gate_mask
  // [T, E] bool; towers [T, G_k, G_k-1] + [T, G_k], last G = 1; transforms "sigmoid"/"identity".
  // Returns [U, N, T]. CPU only, inference only (no autograd).
  m.def(
      "catalogue_score(Tensor user_part, Tensor item_part, Tensor[] expert_weights, Tensor[] expert_biases, "
      "Tensor gate_mask, Tensor[] tower_weights, Tensor[] tower_biases, str[] transforms) -> Tensor");
}
