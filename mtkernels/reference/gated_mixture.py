"""Reference `gated_mixture`: the per-task softmax gates and expert mixture of MMoE (Ma et al.,
KDD 2018) and PLE's CGC layers (Tang et al., RecSys 2020), in plain torch.

``weights = softmax(logits, -1)`` over the E experts (a -inf logit: an expert the gate may not
use, weight 0) and ``mixed[b, t] = sum_e weights[b, t, e] * expert_outputs[b, e]``.
"""

from __future__ import annotations

from typing import Tuple

import torch


def gated_mixture(logits: torch.Tensor, expert_outputs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``logits [B, T, E]``, ``expert_outputs [B, E, H]`` -> ``(mixed [B, T, H], weights [B, T, E])``."""
    weights = torch.softmax(logits, dim=-1)
    mixed = (weights.unsqueeze(-1) * expert_outputs.unsqueeze(1)).sum(dim=2)
    return mixed, weights
