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
                x = F.dropout(x, self.dropout, self.training)
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
                    x = F.dropout(x, self.dropout, self.training)
        return x.squeeze(-1)
