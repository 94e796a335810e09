"""Combining per-task losses into one training objective.

- ``FixedWeighting``: sum_t w_t L_t with constant weights.
- ``UncertaintyWeighting``: Kendall, Gal and Cipolla, "Multi-Task Learning Using Uncertainty to
  Weigh Losses for Scene Geometry and Semantics", CVPR 2018 (homoscedastic uncertainty, one learned
  log-variance per task).
- ``GradNorm``: Chen, Badrinarayanan, Lee and Rabinovich, "GradNorm: Gradient Normalization for
  Adaptive Loss Balancing in Deep Multitask Networks", ICML 2018.

All three share one interface: ``combine(losses [T]) -> scalar`` for the backward of the model,
``weights() -> [T]`` (the current task weights, detached, for logging), and ``state_dict``.
GradNorm additionally updates its weights with ``update`` (see there), called each step before
the model's backward.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch
from torch import nn

from .losses import _kind


class FixedWeighting(nn.Module):
    """sum_t w_t L_t with fixed weights (default: all ones).

    Args:
        num_tasks: T.
        weights: optional T non-negative floats.

    Raises:
        ValueError: a weight count other than T, or a negative weight.
    """

    def __init__(self, num_tasks: int, weights: Optional[Sequence[float]] = None) -> None:
        super().__init__()
        w = torch.ones(num_tasks) if weights is None else torch.as_tensor(list(weights), dtype=torch.float32)
        if w.numel() != num_tasks:
            raise ValueError(f"weights must have one entry per task ({num_tasks}), got {w.numel()}")
        if bool((w < 0).any()):
            raise ValueError(f"weights must be non-negative, got {w.tolist()}")
        self.register_buffer("task_weights", w)

    def combine(self, losses: torch.Tensor) -> torch.Tensor:
        return (self.task_weights.to(losses.dtype) * losses).sum()

    def weights(self) -> torch.Tensor:
        return self.task_weights.detach().clone()


class UncertaintyWeighting(nn.Module):
    """Homoscedastic-uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018).

    One learned ``s_t = log sigma_t^2`` per task (parameter ``log_variance [T]``, initialised to 0),
    trained jointly with the model. As in the paper (eqs. 7 and 10, written with s = log sigma^2
    for numerical stability):

        regression (Gaussian likelihood):    0.5 * exp(-s_t) * L_t + 0.5 * s_t
        binary (Boltzmann/softmax likelihood): exp(-s_t) * L_t + 0.5 * s_t

    Args:
        tasks: T task specs (``.kind``) or kind strings ("binary" / "regression").
    """

    def __init__(self, tasks: Sequence) -> None:
        super().__init__()
        kinds = [_kind(t) for t in tasks]
        self.register_buffer("scale", torch.tensor([1.0 if k == "binary" else 0.5 for k in kinds]))
        self.log_variance = nn.Parameter(torch.zeros(len(kinds)))

    def combine(self, losses: torch.Tensor) -> torch.Tensor:
        s = self.log_variance
        return (self.scale * torch.exp(-s) * losses + 0.5 * s).sum()

    def weights(self) -> torch.Tensor:
        return (self.scale * torch.exp(-self.log_variance)).detach().clone()


class GradNorm(nn.Module):
    """GradNorm adaptive loss balancing (Chen et al., ICML 2018, Algorithm 1).

    Learned weights w_t (``task_weights [T]``, start at 1) scale the task losses. After each step's
    ``update`` (called before the model's backward) computes the gradient norm G_t = ||grad_W w_t L_t|| over the
    shared parameters W (the paper uses the last shared layer), the relative inverse training rate
    r_t = (L_t / L_t(0)) / mean_j (L_j / L_j(0)), and moves w down the gradient of
    sum_t |G_t - mean(G) * r_t^alpha| (target held constant), then renormalises sum_t w_t = T.

    Args:
        num_tasks: T.
        alpha: the asymmetry hyperparameter (the paper uses 0.12 to 3; 1.5 is its common choice).
        lr: learning rate of the weights' own Adam optimiser.

    A task with no label in the first batches has L_t(0) = 0: its initial loss is taken from the
    first batch where it is positive, and until then its rate counts as average (r_t = 1).
    """

    def __init__(self, num_tasks: int, alpha: float = 1.5, lr: float = 0.025) -> None:
        super().__init__()
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        self.num_tasks = num_tasks
        self.alpha = float(alpha)
        self.task_weights = nn.Parameter(torch.ones(num_tasks))
        self.register_buffer("initial_losses", torch.zeros(num_tasks))
        self._optimizer = torch.optim.Adam([self.task_weights], lr=lr)

    def combine(self, losses: torch.Tensor) -> torch.Tensor:
        # The model's backward sees the weights as constants (a copy: update() changes them in
        # place before that backward runs); they move only in update.
        return (self.task_weights.detach().clone().to(losses.dtype) * losses).sum()

    def weights(self) -> torch.Tensor:
        return self.task_weights.detach().clone()

    def gradient_norms(self, losses: torch.Tensor, shared: Sequence[torch.Tensor]) -> torch.Tensor:
        """G_t = ||grad_W (w_t L_t)||_2 for each task, differentiable w.r.t. the weights."""
        norms = []
        for t in range(self.num_tasks):
            if not losses[t].requires_grad:
                norms.append(losses.new_zeros(()))
                continue
            grads = torch.autograd.grad(losses[t], shared, retain_graph=True, create_graph=False, allow_unused=True)
            sq = sum((g.detach() ** 2).sum() for g in grads if g is not None)
            # ||grad (w_t L_t)|| = w_t ||grad L_t|| (w_t > 0): differentiable in w_t without a
            # second-order graph through the model.
            norms.append(self.task_weights[t] * torch.sqrt(torch.as_tensor(sq, dtype=losses.dtype)))
        return torch.stack(norms)

    def update(self, losses: torch.Tensor, shared: Iterable[torch.Tensor]) -> None:
        """One GradNorm update of the task weights. Call it before the model's backward: it takes
        the task gradients w.r.t. ``shared`` with ``retain_graph=True`` and leaves the graph intact.

        Args:
            losses: ``[T]`` this batch's task losses (still attached to the graph).
            shared: the shared parameters W whose gradient norms are balanced.
        """
        shared = [p for p in shared if p.requires_grad]
        if not shared:
            raise ValueError("GradNorm needs at least one shared parameter that requires grad")
        detached = losses.detach()
        with torch.no_grad():
            fresh = (self.initial_losses <= 0) & (detached > 0)
            self.initial_losses[fresh] = detached[fresh]
        norms = self.gradient_norms(losses, shared)
        known = self.initial_losses > 0
        ratio = torch.where(known, detached / self.initial_losses.clamp_min(1e-12), torch.ones_like(detached))
        active = known & (detached > 0)
        if not bool(active.any()):
            return
        mean_ratio = ratio[active].mean()
        rate = torch.where(active, ratio / mean_ratio, torch.ones_like(ratio))
        target = (norms[active].mean() * rate ** self.alpha).detach()
        gradnorm_loss = (norms - target)[active].abs().sum()
        self._optimizer.zero_grad(set_to_none=True)
        gradnorm_loss.backward()
        self._optimizer.step()
        with torch.no_grad():
            self.task_weights.clamp_(min=1e-3)
            self.task_weights.mul_(self.num_tasks / self.task_weights.sum())

    def optimizer_state_dict(self) -> dict:
        return self._optimizer.state_dict()

    def load_optimizer_state_dict(self, state: dict) -> None:
        self._optimizer.load_state_dict(state)


def make_weighting(kind: str, tasks: Sequence, task_weights: Optional[Sequence[float]] = None,
                   gradnorm_alpha: float = 1.5, gradnorm_lr: float = 0.025) -> nn.Module:
    """Build a loss weighting by name: ``"fixed"``, ``"uncertainty"`` or ``"gradnorm"``.

    Raises:
        ValueError: an unknown kind.
    """
    if kind == "fixed":
        return FixedWeighting(len(tasks), task_weights)
    if kind == "uncertainty":
        return UncertaintyWeighting(tasks)
    if kind == "gradnorm":
        return GradNorm(len(tasks), alpha=gradnorm_alpha, lr=gradnorm_lr)
    raise ValueError(f"loss_weighting must be 'fixed', 'uncertainty' or 'gradnorm', got {kind!r}")
