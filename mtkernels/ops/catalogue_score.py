"""`catalogue_score`: every (user, item) pair's task scores from a factorised first layer.

`split_first_layer` turns `MultiTaskScoreParams` (from `pack_multi_task_params`) into the first
expert/gate layer as one ``[E*H_1 + T*E, D]`` linear map and the `CatalogueScoreParams` of the rest;
the caller applies the first layer to user columns and item columns separately (once per user,
once per item) and `catalogue_score` scores all their pairs. The native CPU kernel
(torch.ops.mtkernels.catalogue_score) runs for float32 CPU tensors, the pure-PyTorch reference
otherwise (there is no CUDA kernel: on a GPU the reference runs, as for `multi_task_score_pack`).
"""

from __future__ import annotations

from typing import Tuple

import torch

from .._extension import NATIVE, has_kernel
from ..reference.catalogue_score import CatalogueScoreParams
from ..reference.catalogue_score import catalogue_score as _reference
from ..reference.multi_task_score import MultiTaskScoreParams

__all__ = ["CatalogueScoreParams", "split_first_layer", "catalogue_score"]


def split_first_layer(params: MultiTaskScoreParams) -> Tuple[torch.Tensor, torch.Tensor, CatalogueScoreParams]:
    """Split `MultiTaskScoreParams` into its first layer and the rest.

    Returns:
        ``(weight [E*H_1 + T*E, D], bias [E*H_1 + T*E], rest)``: rows ``e*H_1 .. (e+1)*H_1`` are
        expert e's first layer, rows ``E*H_1 + t*E + e`` task t's gate logit for expert e (zero
        for experts the task may not use); ``rest`` is the `CatalogueScoreParams` of the deeper
        expert layers, the gate mask, the towers and the transforms. Copies of the first layer
        (tensors of params, for the rest).

    Raises:
        TypeError: params is not a `MultiTaskScoreParams`.
    """
    if not isinstance(params, MultiTaskScoreParams):
        raise TypeError(f"params must be a MultiTaskScoreParams, got {type(params).__name__}")
    first_weight, first_bias = params.expert_weights[0], params.expert_biases[0]
    num_experts, hidden, width = first_weight.shape
    weight = torch.cat([first_weight.reshape(num_experts * hidden, width), params.gate_weight.reshape(-1, width)])
    bias = torch.cat([first_bias.reshape(-1), params.gate_bias.reshape(-1)])
    rest = CatalogueScoreParams(
        expert_weights=tuple(params.expert_weights[1:]),
        expert_biases=tuple(params.expert_biases[1:]),
        gate_mask=params.gate_mask,
        tower_weights=tuple(params.tower_weights),
        tower_biases=tuple(params.tower_biases),
        transforms=tuple(params.transforms),
    )
    return weight, bias, rest


_NATIVE = {}


def _native(user_part: torch.Tensor, item_part: torch.Tensor) -> bool:
    if not (isinstance(user_part, torch.Tensor) and isinstance(item_part, torch.Tensor)):
        return False
    if user_part.dtype != torch.float32 or user_part.device.type != "cpu":
        return False
    found = _NATIVE.get("cpu")
    if found is None:
        found = _NATIVE["cpu"] = has_kernel("catalogue_score", "cpu")
    return found


def catalogue_score(user_part: torch.Tensor, item_part: torch.Tensor, params: CatalogueScoreParams) -> torch.Tensor:
    """Scores ``[U, N, T]`` of all U x N (user, item) pairs from the factorised first layer.

    ``out[u, n, t] = transform_t(tower_t(sum_e g_te * expert_e(relu(a[experts]))))`` with
    ``a = user_part[u] + item_part[n]`` and ``g_t = softmax(a[gate logits of task t])`` over the
    experts ``params.gate_mask[t]`` allows: the network of `mtkernels.ops.multi_task_score`
    (Shared-Bottom, MMoE: Ma et al., KDD 2018; a single-level PLE/CGC layer: Tang et al., RecSys
    2020) with its first layer split into a user part and an item part, the split that two-tower
    retrieval makes exact. The native CPU kernel adds the parts per block of about 72 pairs and
    runs the rest on the packed micro-kernel of `multi_task_score`, so the ``[U*N, E*H_1 + T*E]``
    activations are never materialised; it runs on ``torch.get_num_threads()`` threads.
    Measured speed: benchmarks/fusion_ml100k.py (the fused recommendation).

    Inference only, no autograd.

    Args:
        user_part: ``[U, E*H_1 + T*E]``, the first layer applied to each user's columns (the other
            columns zero, no bias), float32 for the native kernel (float64, bfloat16, float16 and
            non-CPU tensors run on the reference).
        item_part: ``[N, E*H_1 + T*E]``, the first layer applied to each item's (and context)
            columns, bias included; user_part's dtype and device.
        params: `CatalogueScoreParams` (from `split_first_layer`), user_part's dtype and device.

    Returns:
        ``[U, N, T]`` in user_part's dtype: probabilities for "sigmoid" tasks, raw values for
        "identity" tasks. U = 0 or N = 0 gives an empty tensor.

    Raises:
        ValueError: a shape or device that does not fit the layout, an empty gate_mask row, an
            unknown transform (the message names the argument).
        TypeError: a non-tensor part, dtypes that differ from user_part's, a non-bool gate_mask.
        RuntimeError: grad mode is on and a part or a parameter requires grad.
    """
    if not isinstance(params, CatalogueScoreParams):
        raise TypeError(f"params must be a CatalogueScoreParams, got {type(params).__name__}")
    tensors = [user_part, item_part, *params.expert_weights, *params.expert_biases, *params.tower_weights,
               *params.tower_biases]
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
        raise RuntimeError("catalogue_score is inference-only (no autograd): call it under torch.no_grad() or "
                           "torch.inference_mode()")
    if _native(user_part, item_part):
        return torch.ops.mtkernels.catalogue_score.default(
            user_part, item_part, params.expert_weights, params.expert_biases, params.gate_mask,
            params.tower_weights, params.tower_biases, params.transforms,
        )
    return _reference(user_part, item_part, params)


if NATIVE and hasattr(torch.ops.mtkernels, "catalogue_score"):

    @torch.library.register_fake("mtkernels::catalogue_score")
    def _(user_part, item_part, expert_weights, expert_biases, gate_mask, tower_weights, tower_biases, transforms):
        torch._check(user_part.dim() == 2, lambda: "user_part must be a 2-D tensor [U, E*H_1 + T*E]")
        torch._check(item_part.dim() == 2, lambda: "item_part must be a 2-D tensor [N, E*H_1 + T*E]")
        torch._check(gate_mask.dim() == 2, lambda: "params.gate_mask must be a 2-D tensor [T, E]")
        return user_part.new_empty((user_part.shape[0], item_part.shape[0], gate_mask.shape[0]))
