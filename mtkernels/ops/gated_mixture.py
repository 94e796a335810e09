"""`gated_mixture`: the gates' softmax and the expert mixture of MMoE / PLE, forward and backward
in one native pass each (training path; `multi_task_score` fuses the same for inference).

Calls `torch.ops.mtkernels.gated_mixture` (CPU) with `gated_mixture_backward` as its autograd
formula when the kernel is built for the input's device, the pure-PyTorch reference otherwise.
"""

from __future__ import annotations

from typing import Tuple

import torch

from .._extension import has_kernel
from ..reference.gated_mixture import gated_mixture as _reference


def _native(device: torch.device) -> bool:
    return _NATIVE_REGISTERED and has_kernel("gated_mixture", device.type)


def gated_mixture(logits: torch.Tensor, expert_outputs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-task softmax gates over E experts and the gated sum of the experts' outputs.

    ``weights[b, t] = softmax(logits[b, t])``; ``mixed[b, t] = sum_e weights[b, t, e] *
    expert_outputs[b, e]`` (MMoE, Ma et al., KDD 2018: one gate per task; PLE, Tang et al., RecSys
    2020: a -inf logit marks an expert the gate may not use, so its weight is exactly 0).

    Args:
        logits: float32/float64 ``[B, T, E]`` gate logits (the last dimension may be a strided
            slice of a wider GEMM output); every (b, t) needs at least one finite logit.
        expert_outputs: ``[B, E, H]``, same dtype and device.

    Returns:
        ``(mixed [B, T, H], weights [B, T, E])``; both differentiable.

    Raises:
        ValueError: not 3-D, or B / E that disagree. TypeError: dtypes that differ or are not float.
    """
    if logits.dim() != 3 or expert_outputs.dim() != 3:
        raise ValueError(f"logits must be [B, T, E] and expert_outputs [B, E, H], got "
                         f"{tuple(logits.shape)} and {tuple(expert_outputs.shape)}")
    if logits.shape[0] != expert_outputs.shape[0] or logits.shape[2] != expert_outputs.shape[1]:
        raise ValueError(f"logits [B, T, E] and expert_outputs [B, E, H] must agree on B and E, got "
                         f"{tuple(logits.shape)} and {tuple(expert_outputs.shape)}")
    if logits.dtype != expert_outputs.dtype or not logits.is_floating_point():
        raise TypeError(f"logits and expert_outputs must have one float dtype, got {logits.dtype} and "
                        f"{expert_outputs.dtype}")
    if _native(logits.device) and logits.dtype in (torch.float32, torch.float64):
        mixed, weights = torch.ops.mtkernels.gated_mixture.default(logits, expert_outputs)
        return mixed, weights
    return _reference(logits, expert_outputs)


def _register_native() -> None:
    @torch.library.register_fake("mtkernels::gated_mixture")
    def _(logits, expert_outputs):
        batch, tasks, experts = logits.shape
        return (expert_outputs.new_empty((batch, tasks, expert_outputs.shape[2])),
                logits.new_empty((batch, tasks, experts)))

    @torch.library.register_fake("mtkernels::gated_mixture_backward")
    def _(grad_mixed, grad_weights, weights, expert_outputs):
        return weights.new_empty(weights.shape), expert_outputs.new_empty(expert_outputs.shape)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output[1], inputs[1])

    def backward(ctx, grad_mixed, grad_weights):
        weights, expert_outputs = ctx.saved_tensors
        if grad_mixed is None:
            grad_mixed = weights.new_zeros((weights.shape[0], weights.shape[1], expert_outputs.shape[2]))
        return torch.ops.mtkernels.gated_mixture_backward.default(grad_mixed, grad_weights, weights, expert_outputs)

    torch.library.register_autograd("mtkernels::gated_mixture", backward, setup_context=setup_context)


_NATIVE_REGISTERED = False
try:
    if hasattr(torch.ops, "mtkernels") and torch._C._dispatch_has_kernel_for_dispatch_key("mtkernels::gated_mixture", "CPU"):
        _register_native()
        _NATIVE_REGISTERED = True
except RuntimeError:  # the op is not registered (extension missing or built without it)
    _NATIVE_REGISTERED = False
