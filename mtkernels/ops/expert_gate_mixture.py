"""`expert_gate_mixture`: everything between the one GEMM of the MMoE / PLE training path and the
towers, forward and backward in one native pass each: ReLU + dropout of the experts' (single)
layer, every gate's softmax, and the mixture (`relu_dropout` followed by `gated_mixture`, without
the split of the GEMM output, the intermediate passes over ``[B, E, H]`` and the cat of the two
gradients in the backward).

Calls `torch.ops.mtkernels.expert_gate_mixture` (CPU) with `expert_gate_mixture_backward` as its
autograd formula when the kernel is built for the input's device, the pure-PyTorch reference
(`mtkernels.reference.expert_gate_mixture`) otherwise.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._extension import has_kernel
from ..reference.expert_gate_mixture import expert_gate_mixture as _reference
from .relu_dropout import draw_seed


def _native(device: torch.device) -> bool:
    return _NATIVE_REGISTERED and has_kernel("expert_gate_mixture", device.type)


def expert_gate_mixture(z: torch.Tensor, num_experts: int, num_gates: int, p: float, training: bool = True,
                        seed: Optional[int] = None,
                        bias: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Experts' ReLU + dropout, gates' softmax and the gated mixture, from ``u = z + bias`` where
    ``z = x [W_experts; W_gates]^T`` (or the whole ``x W^T + b`` as z, without ``bias``).

    ``hidden = relu_dropout(u[:, :E*H], p, seed).view(B, E, H)`` (the same mask as
    `mtkernels.ops.relu_dropout` on that column slice), ``weights[b, g] = softmax(u[b, E*H + g*E :
    E*H + (g+1)*E])`` and ``mixed[b, g] = sum_e weights[b, g, e] * hidden[b, e]``: MMoE's experts
    and gates (Ma et al., KDD 2018) and a CGC layer of PLE (Tang et al., RecSys 2020; a -inf logit
    marks an expert the gate may not use, weight exactly 0), when each expert is one layer.

    Passing the GEMM's bias here instead of adding it in the GEMM (``F.linear`` with a bias is an
    ``addmm`` that first copies the bias into every row of its output; end to end the gain was within
    noise, README "Training speed") folds it into the pass that reads z anyway; the backward then also
    returns the bias gradient (the column sums of z's gradient, which it writes anyway: per block of
    rows, the blocks added in a fixed order, so it does not depend on the thread count).

    Args:
        z: float32/float64 ``[B, E*H + G*E]``: expert e's pre-activations in columns ``e*H ..
            e*H + H - 1``, then gate g's E logits from column ``E*H + g*E``; every gate needs at
            least one finite logit. Rows may be strided (columns contiguous).
        num_experts: E >= 1.
        num_gates: G >= 1.
        p: drop probability in [0, 1) (rounded to 1/2^32 as in `relu_dropout`).
        training: apply dropout (else only the ReLU, p = 0).
        seed: 64-bit seed of the mask (None: drawn from torch's generator like `relu_dropout`).
        bias: optional ``[E*H + G*E]`` of z's dtype and device, added to every row of z (may hold -inf
            for a gate's logit of an expert it may not use).

    Returns:
        ``(mixed [B, G, H], hidden [B, E, H], weights [B, G, E])``, all differentiable with respect to
        z and bias.

    Raises:
        ValueError: z not 2-D, a width that is not ``E*H + G*E`` with H >= 1, E or G < 1, p outside
            [0, 1), bias not ``[E*H + G*E]`` or on another device. TypeError: a non-float z, a bias of
            another dtype.
    """
    if not 0.0 <= float(p) < 1.0:
        raise ValueError(f"p must be in [0, 1), got {p}")
    num_experts, num_gates = int(num_experts), int(num_gates)
    if num_experts < 1 or num_gates < 1:
        raise ValueError(f"num_experts and num_gates must be >= 1, got {num_experts} and {num_gates}")
    if z.dim() != 2:
        raise ValueError(f"z must be a 2-D tensor [B, E*H + G*E], got shape {tuple(z.shape)}")
    rest = z.shape[1] - num_gates * num_experts
    if rest < num_experts or rest % num_experts:
        raise ValueError(f"z must be [B, E*H + G*E] with E = {num_experts}, G = {num_gates} and H >= 1, "
                         f"got {tuple(z.shape)}")
    if z.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"z must be a float32 or float64 tensor, got {z.dtype}")
    if bias is not None:
        if bias.dim() != 1 or bias.shape[0] != z.shape[1]:
            raise ValueError(f"bias must be [E*H + G*E] = [{z.shape[1]}] (z's width), got shape {tuple(bias.shape)}")
        if bias.dtype != z.dtype:
            raise TypeError(f"bias must be {z.dtype} like z, got {bias.dtype}")
        if bias.device != z.device:
            raise ValueError(f"bias must be on z's device {z.device}, got {bias.device}")
    if not training:
        p = 0.0
    if seed is None:
        seed = draw_seed() if p > 0.0 else 0
    if _native(z.device):
        return torch.ops.mtkernels.expert_gate_mixture.default(z, bias, num_experts, num_gates, float(p), int(seed))
    return _reference(z, num_experts, num_gates, float(p), int(seed), bias)


def _register_native() -> None:
    @torch.library.register_fake("mtkernels::expert_gate_mixture")
    def _(z, bias, num_experts, num_gates, p, seed):
        batch = z.shape[0]
        width = (z.shape[1] - num_gates * num_experts) // num_experts
        return (z.new_empty((batch, num_gates, width)), z.new_empty((batch, num_experts, width)),
                z.new_empty((batch, num_gates, num_experts)))

    @torch.library.register_fake("mtkernels::expert_gate_mixture_backward")
    def _(grad_mixed, grad_hidden, grad_weights, hidden, weights, p, bias_grad):
        batch, experts, width = hidden.shape
        columns = experts * width + weights.shape[1] * experts
        return hidden.new_empty((batch, columns)), hidden.new_empty((columns if bias_grad else 0,))

    def setup_context(ctx, inputs, output):
        ctx.p = inputs[4]
        # an unused output (hidden, weights: the training path reads only the mixture) gets None, not a
        # zero-filled [B, E, H] gradient that the kernel would then read
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(output[1], output[2])

    def backward(ctx, grad_mixed, grad_hidden, grad_weights):
        hidden, weights = ctx.saved_tensors
        if grad_mixed is None:
            grad_mixed = hidden.new_zeros((hidden.shape[0], weights.shape[1], hidden.shape[2]))
        bias_grad = ctx.needs_input_grad[1]
        grad_z, grad_bias = torch.ops.mtkernels.expert_gate_mixture_backward.default(
            grad_mixed, grad_hidden, grad_weights, hidden, weights, ctx.p, bias_grad)
        return grad_z, (grad_bias if bias_grad else None), None, None, None, None

    torch.library.register_autograd("mtkernels::expert_gate_mixture", backward, setup_context=setup_context)


_NATIVE_REGISTERED = False
try:
    if hasattr(torch.ops, "mtkernels") and torch._C._dispatch_has_kernel_for_dispatch_key(
            "mtkernels::expert_gate_mixture", "CPU"):
        _register_native()
        _NATIVE_REGISTERED = True
except RuntimeError:  # the op is not registered (extension missing or built without it)
    _NATIVE_REGISTERED = False
