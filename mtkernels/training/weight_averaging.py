"""Weight averaging: an exponential moving average (EMA) of the trained weights, updated after every
optimiser step and used for validation, early stopping, the kept best state and serving.

Averaging the iterates of a stochastic optimiser (Polyak & Juditsky, SIAM J. Control Optim. 1992)
smooths the step-to-step noise of the weights; an exponential average (as in timm's ``ModelEmaV2``
or ``torch.optim.swa_utils.AveragedModel`` with an EMA ``avg_fn``) weights recent iterates most, so
it follows a model that is still learning. This one is debiased (as Adam's moments, Kingma & Ba
2015): after t updates it is exactly

    average_t = sum_i decay**(t - i) * w_i / sum_i decay**(t - i)      (i = 1 .. t)

of the weights w_i after steps 1..t, kept as ``average_t = lerp(average_{t-1}, w_t, (1 - decay) /
(1 - decay**t))``, so the initial weights never enter it and no warm-up schedule is needed.

What is averaged: every floating-point parameter of the model, the embedding tables included
(with a fused embedding optimiser they are updated inside the backward and do not require grad,
but they are trained weights: averaging only the dense part would pair averaged experts with the
last step's table rows). A table row that no step touches stays equal to itself. Buffers (the
fused optimiser's row-wise Adagrad accumulators) are optimiser state, not weights, and are left
alone. The caller passes the tensors to average (`fit` passes the flat buffers of
`mtkernels.training.flat_parameters` instead of the parameters that are views of them), so one
``torch._foreach_lerp_`` per step updates all of them.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Sequence

import torch


class ExponentialMovingAverage:
    """A debiased exponential moving average of a set of tensors (see the module docstring).

    Args:
        tensors: the live weights to average, updated in place by training (e.g. parameters, or
            flat buffers that parameters are views of); float tensors, no two sharing memory.
        decay: in (0, 1): the weight of the previous average per update (0.999: a horizon of
            about 1 / (1 - decay) = 1,000 steps, ~6 epochs of ml100k at batch 2048).

    Raises:
        ValueError: ``decay`` outside (0, 1), no tensors, or a tensor that is not floating point.
    """

    def __init__(self, tensors: Sequence[torch.Tensor], decay: float) -> None:
        if not 0.0 < float(decay) < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.tensors: List[torch.Tensor] = [t.detach() for t in tensors]
        if not self.tensors:
            raise ValueError("tensors: need at least one tensor to average")
        for i, t in enumerate(self.tensors):
            if not t.is_floating_point():
                raise ValueError(f"tensors[{i}] must be floating point, got {t.dtype}")
        self.decay = float(decay)
        self.num_updates = 0
        self.average: List[torch.Tensor] = [t.clone() for t in self.tensors]

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current values of the tensors into the average (after each optimiser step)."""
        self.num_updates += 1
        weight = (1.0 - self.decay) / (1.0 - self.decay ** self.num_updates)
        torch._foreach_lerp_(self.average, self.tensors, weight)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange the values of the live tensors and of the average (twice: back as before)."""
        for live, average in zip(self.tensors, self.average):
            held = live.clone()
            live.copy_(average)
            average.copy_(held)

    @contextlib.contextmanager
    def averaged(self) -> Iterator[None]:
        """Within the block the tensors hold the average; on exit they hold the live values again."""
        self.swap()
        try:
            yield
        finally:
            self.swap()


def averaged_tensors(model: torch.nn.Module, flat=None) -> List[torch.Tensor]:
    """The tensors whose average stands for ``model``'s weights: every floating-point parameter,
    with the parameters that are views of a `FlatGroups` buffer replaced by that buffer."""
    buffers = [b for b in (flat.buffers if flat is not None else []) if b is not None]
    in_buffers = {id(p) for params in (flat.flat if flat is not None else []) for p in params}
    return buffers + [p for p in model.parameters() if p.is_floating_point() and id(p) not in in_buffers]


def model_average_state(model: torch.nn.Module, average: ExponentialMovingAverage) -> Dict[str, object]:
    """The average of ``model``'s weights for a checkpoint, by parameter name (independent of how the
    tensors were laid out in training): ``{"decay", "num_updates", "parameters": {name: tensor}}``."""
    with average.averaged():
        parameters = {name: p.detach().clone() for name, p in model.named_parameters() if p.is_floating_point()}
    return {"decay": average.decay, "num_updates": average.num_updates, "parameters": parameters}


@torch.no_grad()
def load_model_average_state(model: torch.nn.Module, average: ExponentialMovingAverage, state: Dict[str, object]) -> None:
    """Restore a `model_average_state` into ``average`` (whose tensors hold ``model``'s weights);
    the model's live weights are left as they are.

    Raises:
        ValueError: another decay, or parameter names that differ from the model's.
    """
    if float(state["decay"]) != average.decay:
        raise ValueError(f"weight average state has decay {state['decay']}, this one {average.decay}")
    saved = state["parameters"]
    names = [name for name, p in model.named_parameters() if p.is_floating_point()]
    if sorted(saved) != sorted(names):
        raise ValueError(f"weight average state names parameters {sorted(set(saved) ^ set(names))} "
                         "that this model lacks or that it misses")
    with average.averaged():  # the live tensors hold the average here: overwrite them, swap back
        for name, p in model.named_parameters():
            if name in saved:
                p.copy_(saved[name])
    average.num_updates = int(state["num_updates"])
