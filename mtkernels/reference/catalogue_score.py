"""Reference `catalogue_score`: every (user, item) pair scored from a factorised first layer.

A multi-task network whose experts and gates all read ``x = [user columns | item columns]`` in
their first layer (Shared-Bottom, MMoE, a single-level PLE/CGC layer) computes
``W x + b = W x_user + (W x_item + b)``: a part per user ``[U, C]`` and a part per item ``[N, C]``
(bias included), with ``C = E*H_1 + T*E`` columns, the E experts' first layers (H_1 each) then the T
gates' logits (E each, the experts a task may not use ignored). A pair's score is the rest of the
network on ``user_part[u] + item_part[n]``: ReLU on the expert columns, deeper expert layers, each
task's softmax gate over its allowed experts, the mixture, the tower and its output transform, as
`mtkernels.reference.multi_task_score` computes it from x. Written for reading: it materialises the
``[U*N, C]`` sums, which the native kernel never does. It is the spec, and the fallback where the
native op is missing or the dtype is not float32.
"""

from __future__ import annotations

from typing import NamedTuple, Tuple

import torch

from .multi_task_score import _shape_error, check_expert_layers, check_towers_and_transforms, like_checker, tower_score


class CatalogueScoreParams(NamedTuple):
    """The layers after the factorised first layer of a multi-task network (E experts, T tasks).

    Every expert has layer sizes ``H_1 -> H_2 -> ... -> H_L`` after the first (ReLU after every
    layer), every tower ``H_L -> G_1 -> ... -> 1`` (ReLU between layers, none after the last).
    Weights follow `torch.nn.Linear` (``[out_features, in_features]``), stacked over experts or
    tasks; one device and one floating dtype with the parts (``gate_mask`` is bool).

    Fields:
        expert_weights: L-1 tensors (empty for one-layer experts), layer l ``[E, H_l, H_{l-1}]``.
        expert_biases: L-1 tensors, layer l ``[E, H_l]``.
        gate_mask: ``[T, E]`` bool, the experts each task's gate mixes (at least one per task).
        tower_weights: K tensors, layer k ``[T, G_k, G_{k-1}]`` (``G_0 = H_L``, ``G_K = 1``).
        tower_biases: K tensors, layer k ``[T, G_k]``.
        transforms: T strings, ``"sigmoid"`` (probabilities) or ``"identity"`` (ratings, logits).
    """

    expert_weights: Tuple[torch.Tensor, ...]
    expert_biases: Tuple[torch.Tensor, ...]
    gate_mask: torch.Tensor
    tower_weights: Tuple[torch.Tensor, ...]
    tower_biases: Tuple[torch.Tensor, ...]
    transforms: Tuple[str, ...]


def check_params(user_part: torch.Tensor, item_part: torch.Tensor, params: CatalogueScoreParams) -> int:
    """Validate the parts and params against the layout of `CatalogueScoreParams`; returns H_1.

    Raises:
        TypeError: a part or field is not a tensor, a dtype differs from user_part's (or is not
            floating), gate_mask is not bool, or params is not a `CatalogueScoreParams`.
        ValueError: a shape that does not fit the layout, a device differing from user_part's, a
            gate_mask row with no allowed expert, a transform other than "sigmoid"/"identity".
            The message names the argument (e.g. ``params.tower_weights[1]``).
    """
    if not isinstance(params, CatalogueScoreParams):
        raise TypeError(f"params must be a CatalogueScoreParams, got {type(params).__name__}")
    for name, part in (("user_part", user_part), ("item_part", item_part)):
        if not isinstance(part, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(part).__name__}")
        if not part.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {part.dtype}")
        if part.dim() != 2:
            raise _shape_error(name, "[rows, E*H_1 + T*E] (2-D)", part)
    if item_part.dtype != user_part.dtype:
        raise TypeError(f"item_part must have user_part's dtype {user_part.dtype}, got {item_part.dtype}")
    if item_part.device != user_part.device:
        raise ValueError(f"item_part must be on user_part's device {user_part.device}, got {item_part.device}")
    if item_part.shape[1] != user_part.shape[1]:
        raise ValueError(f"item_part must have user_part's {user_part.shape[1]} columns, got {item_part.shape[1]}")
    mask = params.gate_mask
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"params.gate_mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask))}")
    if mask.dim() != 2 or mask.shape[0] < 1 or mask.shape[1] < 1:
        raise _shape_error("params.gate_mask", "[T, E] with T, E >= 1", mask)
    if mask.device != user_part.device:
        raise ValueError(f"params.gate_mask must be on user_part's device {user_part.device}, got {mask.device}")
    num_tasks, num_experts = mask.shape
    width = user_part.shape[1]
    expert_columns = width - num_tasks * num_experts
    if expert_columns <= 0 or expert_columns % num_experts:
        raise ValueError(
            f"user_part and item_part must have E*H_1 + T*E columns (E={num_experts}, T={num_tasks} from "
            f"params.gate_mask, H_1 >= 1), got {width}"
        )

    check = like_checker(user_part, "user_part")

    for field in ("expert_weights", "expert_biases", "tower_weights", "tower_biases"):
        if not isinstance(getattr(params, field), (list, tuple)):
            raise TypeError(f"params.{field} must be a sequence of tensors")
    if not params.tower_weights:
        raise ValueError("params.tower_weights must be a non-empty sequence of tensors")
    if len(params.expert_weights) != len(params.expert_biases):
        raise ValueError(f"params.expert_biases must have one tensor per deeper expert layer "
                         f"({len(params.expert_weights)}), got {len(params.expert_biases)}")
    if len(params.tower_weights) != len(params.tower_biases):
        raise ValueError(f"params.tower_biases must have one tensor per tower layer "
                         f"({len(params.tower_weights)}), got {len(params.tower_biases)}")
    first = expert_columns // num_experts
    fan_in = check_expert_layers(params.expert_weights, params.expert_biases, num_experts, first, 2,
                                 "H_1 of the parts", check)
    if not bool(mask.any(dim=1).all()):
        raise ValueError("params.gate_mask must allow at least one expert for every task")
    check_towers_and_transforms(params, num_tasks, fan_in, check)
    return first


def catalogue_score(user_part: torch.Tensor, item_part: torch.Tensor, params: CatalogueScoreParams) -> torch.Tensor:
    """Scores ``[U, N, T]`` of every pair (u, n) from ``user_part [U, C]`` and ``item_part [N, C]``.

    Raises:
        ValueError / TypeError: as `check_params`.
    """
    first = check_params(user_part, item_part, params)
    num_tasks, num_experts = params.gate_mask.shape
    users, items = user_part.shape[0], item_part.shape[0]
    pre = (user_part[:, None, :] + item_part[None, :, :]).reshape(users * items, user_part.shape[1])  # [U*N, C]
    expert_outputs = []
    for e in range(num_experts):
        h = torch.relu(pre[:, e * first : (e + 1) * first])
        for weight, bias in zip(params.expert_weights, params.expert_biases):
            h = torch.relu(torch.nn.functional.linear(h, weight[e], bias[e]))
        expert_outputs.append(h)
    experts = torch.stack(expert_outputs, dim=1)  # [U*N, E, H_L]
    scores = []
    for t in range(num_tasks):
        start = num_experts * first + t * num_experts
        logits = pre[:, start : start + num_experts].masked_fill(~params.gate_mask[t], float("-inf"))
        gate = torch.softmax(logits, dim=-1)  # [U*N, E], zero on experts the task may not use
        h = torch.einsum("pe,peh->ph", gate, experts)
        score = tower_score(h, params, t)
        scores.append(score)
    return torch.stack(scores, dim=1).reshape(users, items, num_tasks)
