"""Reference `expert_gate_mixture`: the experts' ReLU + dropout and the gates' softmax mixture that
follow the one GEMM of the MMoE / PLE training path (``experts_and_gates``), in plain torch: the
reference `relu_dropout` on the expert columns, then the reference `gated_mixture`.

``z [B, E*H + G*E]``: expert e's pre-activations in columns ``e*H .. e*H + H - 1``, then gate g's
logits over the E experts in columns ``E*H + g*E ..`` (-inf: an expert the gate may not use).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .gated_mixture import gated_mixture
from .relu_dropout import relu_dropout


def expert_gate_mixture(z: torch.Tensor, num_experts: int, num_gates: int, p: float, seed: int,
                        bias: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``-> (mixed [B, G, H], hidden [B, E, H], weights [B, G, E])`` with ``u = z + bias`` (``bias [E*H
    + G*E]`` or None), ``hidden = relu_dropout(u[:, :E*H], p, seed).view(B, E, H)``, ``weights =
    softmax`` of each gate's logits in u and ``mixed[b, g] = sum_e weights[b, g, e] * hidden[b, e]``."""
    if bias is not None:
        z = z + bias
    batch, hidden_width = z.shape[0], (z.shape[1] - num_gates * num_experts) // num_experts
    width = num_experts * hidden_width
    hidden = relu_dropout(z[:, :width], p, seed).reshape(batch, num_experts, hidden_width)
    mixed, weights = gated_mixture(z[:, width:].reshape(batch, num_gates, num_experts), hidden)
    return mixed, hidden, weights
