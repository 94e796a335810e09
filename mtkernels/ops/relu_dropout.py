"""`relu_dropout`: ReLU followed by inverted dropout (Srivastava et al., JMLR 2014) in one pass.

The keep decision of element i is a hash of (i, seed) (`mtkernels.reference.relu_dropout` states
it), so nothing but the output is saved for the backward: ``y > 0`` exactly where ReLU passed and
the element was kept. Calls the native CPU kernel `torch.ops.mtkernels.relu_dropout` (with its
backward op registered as the autograd formula) when it is built, the reference otherwise.
"""

from __future__ import annotations

from typing import Optional

import torch

from .._extension import has_kernel
from ..reference.relu_dropout import relu_dropout as _reference


def _native(device: torch.device) -> bool:
    return _NATIVE_REGISTERED and has_kernel("relu_dropout", device.type)


def draw_seed(generator: Optional[torch.Generator] = None) -> int:
    """A 63-bit seed from torch's global generator (or ``generator``): what `relu_dropout` draws when
    it is given none, so ``torch.manual_seed`` makes a training run's masks reproducible."""
    return int(torch.randint(0, 2**63 - 1, (), generator=generator, dtype=torch.int64))


def relu_dropout(x: torch.Tensor, p: float, training: bool = True, seed: Optional[int] = None) -> torch.Tensor:
    """``dropout(relu(x), p)`` with a hashed keep mask; the plain ReLU when ``p == 0`` or not ``training``.

    Each element is dropped with probability ``p' = round(p * 2**32) / 2**32`` and the others are
    scaled by ``1 / (1 - p')``, so ``E[y] = relu(x)``. The mask depends on ``seed`` (drawn from
    torch's global generator when None) and on each element's row-major index only.

    Args:
        x: float32 or float64, any shape (a 2-D column slice is read in place).
        p: drop probability in [0, 1).
        training: apply dropout (else only the ReLU).
        seed: 64-bit seed of the mask (None: `draw_seed`).

    Returns:
        a contiguous tensor of x's shape and dtype.

    Raises:
        ValueError: ``p`` outside [0, 1). TypeError: a non-float x (native kernel).
    """
    if not 0.0 <= float(p) < 1.0:
        raise ValueError(f"p must be in [0, 1), got {p}")
    if not training or p == 0.0:
        return torch.relu(x)
    if seed is None:
        seed = draw_seed()
    if _native(x.device):
        return torch.ops.mtkernels.relu_dropout.default(x, float(p), int(seed))
    return _reference(x, float(p), int(seed))


def _register_native() -> None:
    @torch.library.register_fake("mtkernels::relu_dropout")
    def _(x, p, seed):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("mtkernels::relu_dropout_backward")
    def _(grad_output, result, p):
        return torch.empty_like(result, memory_format=torch.contiguous_format)

    def setup_context(ctx, inputs, output):
        ctx.p = inputs[1]
        ctx.save_for_backward(output)

    def backward(ctx, grad_output):
        (result,) = ctx.saved_tensors
        return torch.ops.mtkernels.relu_dropout_backward.default(grad_output, result, ctx.p), None, None

    torch.library.register_autograd("mtkernels::relu_dropout", backward, setup_context=setup_context)


_NATIVE_REGISTERED = False
try:
    if hasattr(torch.ops, "mtkernels") and torch._C._dispatch_has_kernel_for_dispatch_key("mtkernels::relu_dropout", "CPU"):
        _register_native()
        _NATIVE_REGISTERED = True
except RuntimeError:  # the op is not registered (extension missing or built without it)
    _NATIVE_REGISTERED = False
