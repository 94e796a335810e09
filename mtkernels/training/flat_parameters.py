"""Contiguous parameter and gradient buffers for the dense optimiser (one tensor per Adam group).

A MultiTaskModel's dense part is ~30 small tensors (expert, gate and tower weights and biases).
torch.optim.Adam's per-step Python cost grows with the tensor count (state lookups, step counters,
grouping by device and dtype: ~0.9 ms per step on CPU, about as much as the fused update itself
and 5-6% of an MMoE training step at batch 2048), so `flatten_groups` makes every parameter of a
group a view of one contiguous buffer and its ``.grad`` a view of one contiguous gradient buffer,
and gives Adam the buffer: one tensor per group. Autograd accumulates each parameter's gradient
in place into its view (``.grad`` is defined, so AccumulateGrad adds into it), and Adam updates
the whole buffer in one fused call. The same technique as the contiguous gradient buffers of
Apex's and DeepSpeed's optimisers and of PyTorch DDP's ``gradient_as_bucket_view``.

Adam is elementwise, so the update of every element is the same as with one tensor per parameter,
bit for bit, with one difference: a parameter that gets no gradient in a step is updated with a
zero gradient (its moments decay), where per-tensor Adam skips a parameter whose ``.grad`` is None.
`fit` only flattens when every trained parameter takes part in the loss, which
`all_receive_gradients` checks on a few training rows before training (with torch's RNG state
restored afterwards, so the run draws the same dropout masks either way).
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch


class FlatGroups:
    """What `flatten_groups` returns.

    Attributes:
        groups: the optimiser groups, each ``{"params": [buffer], ...}`` with the other keys
            (``weight_decay``, ``lr``) of the group it replaces.
        buffers: the parameter buffers (1-D), one per group.
    """

    def __init__(self, groups: List[Dict], buffers: List[torch.Tensor]) -> None:
        self.groups = groups
        self.buffers = buffers

    def zero_grad(self) -> None:
        """Zero every gradient buffer in place (the parameters' ``.grad`` views stay attached;
        ``set_to_none`` would detach them)."""
        for buffer in self.buffers:
            buffer.grad.zero_()


def flattenable(groups: Sequence[Dict]) -> bool:
    """True when every group's parameters are dense, of one dtype and on one device, and no
    parameter is in two groups or shares storage with another (views of one tensor)."""
    seen = set()
    for group in groups:
        params = list(group["params"])
        if not params or len({(p.dtype, p.device) for p in params}) != 1:
            return False
        for p in params:
            if p.is_sparse or not p.is_leaf or p.untyped_storage().data_ptr() in seen:
                return False
            seen.add(p.untyped_storage().data_ptr())
    return True


def flatten_groups(groups: Sequence[Dict]) -> FlatGroups:
    """Make each group's parameters views of one new contiguous buffer (their values copied in, in
    group order) and their gradients views of one zeroed gradient buffer.

    Args:
        groups: torch.optim parameter groups (``{"params": [...], ...}``) of leaf tensors that
            `flattenable` accepts.

    Returns:
        `FlatGroups`: groups over the buffers, to build the optimiser from.

    Raises:
        ValueError: groups that `flattenable` rejects.
    """
    groups = [dict(g, params=list(g["params"])) for g in groups]
    if not flattenable(groups):
        raise ValueError("groups must hold dense leaf tensors of one dtype and device per group, each in one group")
    flat_groups, buffers = [], []
    for group in groups:
        params = group["params"]
        with torch.no_grad():
            buffer = torch.cat([p.detach().reshape(-1) for p in params])
        buffer.requires_grad_(True)
        buffer.grad = torch.zeros_like(buffer)
        start = 0
        for p in params:
            end = start + p.numel()
            p.data = buffer.data[start:end].view_as(p)
            p.grad = buffer.grad[start:end].view_as(p)
            start = end
        buffers.append(buffer)
        flat_groups.append(dict(group, params=[buffer]))
    return FlatGroups(flat_groups, buffers)


def all_receive_gradients(params: Sequence[torch.Tensor], loss: torch.Tensor) -> bool:
    """True when ``loss`` depends on every tensor of ``params`` through the autograd graph (each
    gets a gradient from ``loss.backward()``; the gradient may be zero)."""
    params = [p for p in params if p.requires_grad]
    if not params:
        return True
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return all(g is not None for g in grads)
