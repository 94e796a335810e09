"""The two MLP blocks the multi-task backbones are made of: `Expert` and `TaskTower`.

They are plain ``nn.Linear`` stacks so that `mtkernels.ops.pack_multi_task_params` can take their
layers as they are (`Expert`: ReLU after every layer; `TaskTower`: ReLU between layers, a last
layer with one output). Dropout is applied after a ReLU in training only, so an ``eval()`` model
computes exactly what the fused ``multi_task_score`` op computes. ReLU and dropout run as one op,
`mtkernels.ops.relu_dropout`: its keep mask is a hash of each element's index and a seed drawn
from torch's generator, and its backward reads the output only (no mask tensor is drawn or kept;
torch's ``bernoulli_`` mask drew ~20% of an MMoE training step on CPU).
"""

from __future__ import annotations

from typing import List, Sequence

import torch
from torch import nn

from ..ops.relu_dropout import relu_dropout


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
            x = relu_dropout(linear(x), self.dropout, self.training)
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
                x = relu_dropout(x, self.dropout, self.training)
        return x.squeeze(-1)


def tower_outputs(towers: Sequence[TaskTower], representations: torch.Tensor) -> torch.Tensor:
    """``[B, T]``: tower t applied to ``representations[:, t]`` (``[B, T, H]``) for every t, batched:
    each layer of all T towers (same widths) as one batched product over the towers instead of T
    small GEMMs. Equal to stacking ``towers[t](representations[:, t])``.

    The last layer (one output per row) is `_OutputLayer`, whose backward avoids a slow batched
    product of autograd's."""
    if len(towers) != representations.shape[1]:
        raise ValueError(f"representations must be [B, {len(towers)}, H] (one per tower), got {tuple(representations.shape)}")
    dropout, training = towers[0].dropout, towers[0].training
    last = len(towers[0].linears) - 1
    h = representations.transpose(0, 1)  # [T, B, H]
    for layer in range(last):
        weight = torch.stack([tower.linears[layer].weight for tower in towers])  # [T, O, I]
        bias = torch.stack([tower.linears[layer].bias for tower in towers])  # [T, O]
        h = relu_dropout(torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2)), dropout, training)
    weight = torch.stack([tower.linears[last].weight for tower in towers])  # [T, 1, I]
    bias = torch.stack([tower.linears[last].bias for tower in towers])  # [T, 1]
    return _OutputLayer.apply(h, weight, bias).transpose(0, 1)


class _OutputLayer(torch.autograd.Function):
    """The towers' last layers (one output each): ``out [T, B] = h [T, B, I] . weight [T, 1, I] +
    bias [T, 1]``, as ``baddbmm`` forward; backward without the ``[T, I, B] x [T, B, 1]`` batched
    product autograd would run for the weight gradient (a slow path of torch's CPU ``bmm``, ~0.9 ms
    per 2048-row step at one thread): ``d weight = d out [T, 1, B] x h``, ``d h = d out (x) weight``."""

    @staticmethod
    def forward(ctx, h, weight, bias):
        ctx.save_for_backward(h, weight)
        return torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2)).squeeze(-1)

    @staticmethod
    def backward(ctx, grad):
        h, weight = ctx.saved_tensors
        grad_h = grad.unsqueeze(-1) * weight if ctx.needs_input_grad[0] else None
        grad_weight = torch.bmm(grad.unsqueeze(1), h) if ctx.needs_input_grad[1] else None
        grad_bias = grad.sum(1, keepdim=True) if ctx.needs_input_grad[2] else None
        return grad_h, grad_weight, grad_bias
