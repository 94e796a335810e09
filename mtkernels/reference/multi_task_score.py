"""Reference `multi_task_score`: experts, per-task gates and towers in plain PyTorch.

The spec of ARCHITECTURE.md §3.2, written for reading, not speed: one matrix product per expert,
per gate and per tower layer, exactly as an eager MMoE (Ma et al., "Modeling Task Relationships in
Multi-task Learning with Multi-gate Mixture-of-Experts", KDD 2018) or a single-level PLE / CGC
layer (Tang et al., "Progressive Layered Extraction", RecSys 2020) computes them. It is also the
fallback when the native kernel is missing, and it defines the parameter layout
(`MultiTaskScoreParams`) that the native kernel reads.
"""

from __future__ import annotations

from typing import NamedTuple, Tuple

import torch

TRANSFORMS = ("sigmoid", "identity")


class MultiTaskScoreParams(NamedTuple):
    """The stacked weights of a multi-task scoring network (E experts, T tasks, input width D).

    Every expert has the same layer sizes ``D -> H_1 -> ... -> H_L`` (ReLU after every expert
    layer), and every task tower the same sizes ``H_L -> G_1 -> ... -> 1`` (ReLU between tower
    layers, none after the last). Weights follow `torch.nn.Linear`: ``[out_features, in_features]``.
    All tensors share one device and one floating dtype (float32, float64 or bfloat16;
    ``gate_mask`` is bool).

    Fields:
        expert_weights: L tensors, layer l ``[E, H_l, H_{l-1}]`` (``H_0 = D``).
        expert_biases: L tensors, layer l ``[E, H_l]``.
        gate_weight: ``[T, E, D]``; row ``(t, e)`` gives task t's gate logit for expert e. Rows of
            experts the task may not use are ignored (the packer leaves them zero).
        gate_bias: ``[T, E]``.
        gate_mask: ``[T, E]`` bool, the experts each task's gate mixes; every row needs at least
            one True. All True: MMoE; shared plus the task's own experts: PLE's CGC layer;
            ``E = 1``: Shared-Bottom.
        tower_weights: K tensors, layer k ``[T, G_k, G_{k-1}]`` (``G_0 = H_L``, ``G_K = 1``).
        tower_biases: K tensors, layer k ``[T, G_k]``.
        transforms: T strings, ``"sigmoid"`` (probabilities) or ``"identity"`` (ratings, logits).
    """

    expert_weights: Tuple[torch.Tensor, ...]
    expert_biases: Tuple[torch.Tensor, ...]
    gate_weight: torch.Tensor
    gate_bias: torch.Tensor
    gate_mask: torch.Tensor
    tower_weights: Tuple[torch.Tensor, ...]
    tower_biases: Tuple[torch.Tensor, ...]
    transforms: Tuple[str, ...]


def _shape_error(name: str, expected: str, tensor) -> ValueError:
    return ValueError(f"{name} must have shape {expected}, got {tuple(getattr(tensor, 'shape', ()))}")


def like_checker(ref: torch.Tensor, ref_name: str):
    """``check(t, name, shape)``: t is a tensor of ref's dtype and device with that shape."""

    def check(t, name, shape):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dtype != ref.dtype:
            raise TypeError(f"{name} must have {ref_name}'s dtype {ref.dtype}, got {t.dtype}")
        if t.device != ref.device:
            raise ValueError(f"{name} must be on {ref_name}'s device {ref.device}, got {t.device}")
        if tuple(t.shape) != shape:
            raise _shape_error(name, str(list(shape)), t)

    return check


def check_expert_layers(weights, biases, num_experts: int, fan_in: int, first_index: int, first_fan_in: str,
                        check) -> int:
    """Expert layers ``weights[l] [E, H_l, fan_in_l]``, ``biases[l] [E, H_l]``; layer 0 reads
    ``fan_in`` columns (``first_fan_in`` in messages) and is called ``H_{first_index}``. Returns the
    last width. The same checks and messages as the native kernels (csrc/common/network_checks.h)."""
    for l, (w, b) in enumerate(zip(weights, biases)):
        name = f"params.expert_weights[{l}]"
        if not isinstance(w, torch.Tensor) or w.dim() != 3 or w.shape[0] != num_experts or w.shape[2] != fan_in:
            raise _shape_error(name, f"[E={num_experts}, H_{l + first_index}, {fan_in}] (in_features = "
                               f"{first_fan_in if l == 0 else 'the previous layer width'})", w)
        check(w, name, (num_experts, w.shape[1], fan_in))
        check(b, f"params.expert_biases[{l}]", (num_experts, w.shape[1]))
        fan_in = w.shape[1]
    return fan_in


def check_towers_and_transforms(params, num_tasks: int, fan_in: int, check) -> None:
    """Task towers ``tower_weights[k] [T, G_k, G_{k-1}]`` (``G_0 = fan_in``, ``G_K = 1``) and one
    transform per task, as the native kernels check them."""
    num_layers = len(params.tower_weights)
    for k, (w, b) in enumerate(zip(params.tower_weights, params.tower_biases)):
        name = f"params.tower_weights[{k}]"
        last = k == num_layers - 1
        if (not isinstance(w, torch.Tensor) or w.dim() != 3 or w.shape[0] != num_tasks or w.shape[2] != fan_in
                or (last and w.shape[1] != 1)):
            raise _shape_error(name, f"[T={num_tasks}, G_{k + 1}, {fan_in}]"
                               + (", out_features 1 in the last layer" if last else ""), w)
        check(w, name, (num_tasks, w.shape[1], fan_in))
        check(b, f"params.tower_biases[{k}]", (num_tasks, w.shape[1]))
        fan_in = w.shape[1]
    transforms = params.transforms
    if isinstance(transforms, str) or len(transforms) != num_tasks:
        raise ValueError(f"params.transforms must be a sequence of T={num_tasks} strings, got {transforms!r}")
    for t, name in enumerate(transforms):
        if name not in TRANSFORMS:
            raise ValueError(f"params.transforms[{t}] must be 'sigmoid' or 'identity', got {name!r}")


def tower_score(h: torch.Tensor, params, t: int) -> torch.Tensor:
    """Task t's tower (ReLU between layers) and output transform on its mixture ``h [M, H_L]``: ``[M]``."""
    num_layers = len(params.tower_weights)
    for k, (weight, bias) in enumerate(zip(params.tower_weights, params.tower_biases)):
        h = torch.nn.functional.linear(h, weight[t], bias[t])
        if k < num_layers - 1:
            h = torch.relu(h)
    score = h[:, 0]
    return torch.sigmoid(score) if params.transforms[t] == "sigmoid" else score


def check_params(x: torch.Tensor, params: MultiTaskScoreParams) -> None:
    """Validate x and params against the layout of `MultiTaskScoreParams`.

    Raises:
        TypeError: x or a field is not a tensor, a dtype differs from x's, gate_mask is not bool,
            or params is not a `MultiTaskScoreParams`.
        ValueError: a shape that does not fit the layout, a device differing from x's, a gate_mask
            row with no allowed expert, or a transform other than "sigmoid"/"identity". The
            message names the argument (e.g. ``params.expert_weights[1]``).
    """
    if not isinstance(params, MultiTaskScoreParams):
        raise TypeError(f"params must be a MultiTaskScoreParams, got {type(params).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if x.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        raise TypeError(f"x must be a float32, float64, bfloat16 or float16 tensor, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"x must be a 2-D tensor [M, D], got shape {tuple(x.shape)}")
    rows, width = x.shape
    mask = params.gate_mask
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"params.gate_mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask))}")
    if mask.dim() != 2 or mask.shape[0] < 1 or mask.shape[1] < 1:
        raise _shape_error("params.gate_mask", "[T, E] with T, E >= 1", mask)
    num_tasks, num_experts = mask.shape

    check = like_checker(x, "x")

    for field in ("expert_weights", "expert_biases", "tower_weights", "tower_biases"):
        if not isinstance(getattr(params, field), (list, tuple)) or len(getattr(params, field)) == 0:
            raise ValueError(f"params.{field} must be a non-empty sequence of tensors")
    if len(params.expert_weights) != len(params.expert_biases):
        raise ValueError(
            f"params.expert_biases must have one tensor per expert layer "
            f"({len(params.expert_weights)}), got {len(params.expert_biases)}"
        )
    if len(params.tower_weights) != len(params.tower_biases):
        raise ValueError(
            f"params.tower_biases must have one tensor per tower layer "
            f"({len(params.tower_weights)}), got {len(params.tower_biases)}"
        )
    first = params.expert_weights[0]
    if isinstance(first, torch.Tensor) and first.dim() == 3 and first.shape[0] != num_experts:
        raise ValueError(
            f"params.gate_mask [T, E] and params.expert_weights[0] [E, H_1, D] must agree on the "
            f"number of experts E, got {num_experts} and {first.shape[0]}"
        )
    fan_in = check_expert_layers(params.expert_weights, params.expert_biases, num_experts, width, 1, "D of x", check)
    check(params.gate_weight, "params.gate_weight", (num_tasks, num_experts, width))
    check(params.gate_bias, "params.gate_bias", (num_tasks, num_experts))
    if mask.device != x.device:
        raise ValueError(f"params.gate_mask must be on x's device {x.device}, got {mask.device}")
    if not bool(mask.any(dim=1).all()):
        raise ValueError("params.gate_mask must allow at least one expert for every task")
    check_towers_and_transforms(params, num_tasks, fan_in, check)

def multi_task_score(x: torch.Tensor, params: MultiTaskScoreParams) -> torch.Tensor:
    """Score M rows for T tasks: ``transform_t(tower_t(sum_e softmax_t(x)_e * expert_e(x)))``.

    Args:
        x: ``[M, D]`` input rows (e.g. one per user-candidate pair), dtype of the params.
        params: the network, laid out as `MultiTaskScoreParams` describes.

    Returns:
        ``[M, T]`` scores in x's dtype (computed in that dtype, as the eager model does).

    Raises:
        ValueError / TypeError: shapes, dtypes or transforms that do not match the layout; the
            message names the offending argument.
    """
    check_params(x, params)
    num_tasks, num_experts = params.gate_mask.shape

    expert_outputs = []
    for e in range(num_experts):
        h = x
        for weight, bias in zip(params.expert_weights, params.expert_biases):
            h = torch.relu(torch.nn.functional.linear(h, weight[e], bias[e]))
        expert_outputs.append(h)
    experts = torch.stack(expert_outputs, dim=1)  # [M, E, H]

    scores = []
    for t in range(num_tasks):
        logits = torch.nn.functional.linear(x, params.gate_weight[t], params.gate_bias[t])
        logits = logits.masked_fill(~params.gate_mask[t], float("-inf"))
        gate = torch.softmax(logits, dim=-1)  # [M, E], zero on experts the task may not use
        h = torch.einsum("me,meh->mh", gate, experts)
        score = tower_score(h, params, t)
        scores.append(score)
    return torch.stack(scores, dim=1) if scores else x.new_zeros((x.shape[0], 0))
