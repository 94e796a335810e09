"""Per-task losses with missing labels: masked binary cross-entropy and mean squared error.

Multi-task recommendation logs label some tasks on a subset of rows only (in ml100k-mtl-v1 the
sampled negatives carry a click label but no like or rating). Such labels are NaN; they drop out
of that task's loss, and a task with no label in the batch contributes exactly 0 (with a zero,
finite gradient), never NaN.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

# Probabilities are clipped like the metric (PROTOCOL.md §5 logloss) so that a saturated sigmoid
# gives a finite loss and gradient.
PROBABILITY_EPS = 1e-7

TASK_KINDS = ("binary", "regression")


def _kind(task) -> str:
    kind = task if isinstance(task, str) else getattr(task, "kind", None)
    if kind not in TASK_KINDS:
        raise ValueError(f"task kind must be one of {TASK_KINDS}, got {kind!r}")
    return kind


def masked_task_losses(predictions: torch.Tensor, labels: torch.Tensor, tasks: Sequence) -> torch.Tensor:
    """Loss of each task over the rows where that task has a label.

    Args:
        predictions: float ``[B, T]``: probabilities in (0, 1) for binary tasks (the models apply
            the sigmoid), raw values for regression tasks.
        labels: float ``[B, T]``, NaN where a row has no label for that task.
        tasks: T task specs (objects with ``.kind``) or kind strings, ``"binary"`` (binary
            cross-entropy) or ``"regression"`` (mean squared error).

    Returns:
        float ``[T]``: task t's mean loss over its labelled rows; 0 for a task with no labelled
        row in the batch (its gradient is 0 too).

    Raises:
        ValueError: shapes that differ or do not match the number of tasks, an unknown task kind.
    """
    if predictions.dim() != 2 or predictions.shape != labels.shape:
        raise ValueError(
            f"predictions and labels must both be [B, T] with the same shape, got "
            f"{tuple(predictions.shape)} and {tuple(labels.shape)}"
        )
    kinds = [_kind(t) for t in tasks]
    if len(kinds) != predictions.shape[1]:
        raise ValueError(f"got {len(kinds)} tasks for predictions with {predictions.shape[1]} columns")
    if not kinds:
        return predictions.new_zeros(0)
    # All tasks of a kind at once, task-major: the rows of [T, B] are contiguous, so each task's sum
    # over its rows is the same reduction (the same float result) as summing its column on its own,
    # with ~10 ops and autograd nodes per kind instead of ~10 per task. stack(unbind), not
    # t().contiguous(): its backward hands the model a contiguous [B, T] gradient, as the loop over
    # tasks did, so the GEMMs of the backward see the same layouts and round the same way.
    p, y = torch.stack(predictions.unbind(1)), labels.t().contiguous()
    mask = ~torch.isnan(y)
    # Fill missing labels with a harmless value and zero their weight instead of indexing,
    # so an empty mask still yields a finite 0 with a zero gradient (never 0/0).
    y_filled = torch.where(mask, y, torch.zeros_like(y))
    weight = mask.to(p.dtype)
    parts, order = [], []
    for kind, loss in (("binary", _binary_cross_entropy), ("regression", _squared_error)):
        tasks_of_kind = [t for t, k in enumerate(kinds) if k == kind]
        if tasks_of_kind:
            rows = _rows(tasks_of_kind, p.device)
            element = loss(p[rows], y_filled[rows])
            w = weight[rows]
            parts.append((element * w).sum(1) / w.sum(1).clamp_min(1.0))
            order += tasks_of_kind
    losses = parts[0] if len(parts) == 1 else torch.cat(parts)
    if order != sorted(order):
        losses = losses[_rows([order.index(t) for t in range(len(order))], p.device)]
    return losses


def _rows(tasks, device):
    """An index of the task rows ``tasks``: a slice (a view) when they are consecutive."""
    if tasks == list(range(tasks[0], tasks[0] + len(tasks))):
        return slice(tasks[0], tasks[0] + len(tasks))
    return torch.tensor(tasks, device=device)


def _squared_error(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (p - y) ** 2


def _binary_cross_entropy(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy(p.clamp(PROBABILITY_EPS, 1.0 - PROBABILITY_EPS), y, reduction="none")
