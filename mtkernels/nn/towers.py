"""The two MLP blocks the multi-task backbones are made of: `Expert` and `TaskTower`.

They are plain ``nn.Linear`` stacks so that `mtkernels.ops.pack_multi_task_params` can take their
layers as they are (`Expert`: ReLU after every layer; `TaskTower`: ReLU between layers, a last
layer with one output). Dropout is applied after a ReLU in training only, so an ``eval()`` model
computes exactly what the fused ``multi_task_score`` op computes.
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn


# Dropout's keep decision is drawn as a 16-bit integer against a threshold: torch's CPU
# ``bernoulli_`` (what ``F.dropout`` uses) drew ~20% of an MMoE training step's time, a 16-bit
# ``randint`` with one comparison costs about a third of it. The drop probability is ``p`` rounded to
# a multiple of 1/65536 (0.1 -> 0.100006) and the kept values are scaled by 1 / (1 - that), so the
# layer is still unbiased: E[dropout(x)] = x.
_DROPOUT_LEVELS = 65536


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout (Srivastava et al., JMLR 2014) like ``F.dropout``, with a cheaper mask.

    Each element is zeroed with probability ``round(p * 65536) / 65536`` and the others are
    scaled by ``1 / (1 - that)``; the identity when ``p == 0`` or not ``training``. The mask comes
    from torch's global generator (``torch.manual_seed`` makes it reproducible).

    Shapes: any ``x``; returns a tensor of the same shape and dtype.
    """
    if not training or p == 0.0:
        return x
    dropped = min(max(round(p * _DROPOUT_LEVELS), 0), _DROPOUT_LEVELS - 1)
    draw = torch.randint(-_DROPOUT_LEVELS // 2, _DROPOUT_LEVELS // 2, x.shape, dtype=torch.int16, device=x.device)
    keep = (draw >= dropped - _DROPOUT_LEVELS // 2).to(x.dtype)
    return x * keep.mul_(_DROPOUT_LEVELS / (_DROPOUT_LEVELS - dropped))


def _check_dims(owner: str, input_dim: int, hidden: Sequence[int], dropout: float) -> List[int]:
    if int(input_dim) < 1:
        raise ValueError(f"{owner}: input_dim must be >= 1, got {input_dim}")
    hidden = [int(h) for h in hidden]
    if any(h < 1 for h in hidden):
        raise ValueError(f"{owner}: hidden sizes must be >= 1, got {hidden}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"{owner}: dropout must be in [0, 1), got {dropout}")
    return hidden


class Expert(nn.Module):
    """An expert (or shared bottom) MLP: ``Linear -> ReLU (-> Dropout)`` for every layer, the last
    one included, as in MMoE's experts (Ma et al., KDD 2018).

    Args:
        input_dim: D.
        hidden: the layer widths (at least one); the output has ``hidden[-1]`` columns.
        dropout: dropout probability after each ReLU (training only).

    Shapes: ``[B, D] -> [B, hidden[-1]]``. ``state_dict`` keys: ``linears.<i>.weight/bias``.

    Raises:
        ValueError: no layer, a non-positive width, dropout outside ``[0, 1)``.
    """

    def __init__(self, input_dim: int, hidden: Sequence[int], dropout: float = 0.0) -> None:
        super().__init__()
        hidden = _check_dims("Expert", input_dim, hidden, dropout)
        if not hidden:
            raise ValueError("Expert: hidden must hold at least one layer width")
        dims = [int(input_dim)] + hidden
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.dropout = float(dropout)
        self.output_dim = hidden[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for linear in self.linears:
            x = F.relu(linear(x))
            if self.dropout:
                x = dropout(x, self.dropout, self.training)
        return x


class TaskTower(nn.Module):
    """A task tower: ``Linear -> ReLU (-> Dropout)`` per hidden layer, then ``Linear(., 1)``.

    Returns the task's logit (or raw regression value); the model applies the task's output
    transform (sigmoid for binary tasks, identity for regression).

    Args:
        input_dim: width of the task's input (the backbone's output for this task).
        hidden: hidden layer widths (may be empty: one linear layer).
        dropout: dropout probability after each hidden ReLU (training only).

    Shapes: ``[B, input_dim] -> [B]``. ``state_dict`` keys: ``linears.<i>.weight/bias``.

    Raises:
        ValueError: a non-positive width, dropout outside ``[0, 1)``.
    """

    def __init__(self, input_dim: int, hidden: Sequence[int] = (32,), dropout: float = 0.0) -> None:
        super().__init__()
        hidden = _check_dims("TaskTower", input_dim, hidden, dropout)
        dims = [int(input_dim)] + hidden + [1]
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.dropout = float(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.linears) - 1
        for i, linear in enumerate(self.linears):
            x = linear(x)
            if i < last:
                x = F.relu(x)
                if self.dropout:
                    x = dropout(x, self.dropout, self.training)
        return x.squeeze(-1)
