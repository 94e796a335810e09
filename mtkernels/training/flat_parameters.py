"""Contiguous parameter and gradient buffers for the dense optimiser (one tensor per Adam group).

A MultiTaskModel's dense part is ~30 small tensors (expert, gate and tower weights and biases).
torch.optim.Adam's per-step Python cost grows with the tensor count (state lookups, step counters,
grouping by device and dtype, zeroing: ~0.7 ms per step on CPU for 26 tensors against ~0.1 ms for
one, and serial work that a second thread does not shorten), so `flatten_groups` makes every
parameter of a group a view of one contiguous buffer and gives Adam the buffer: one tensor per
group. After the backward, `FlatGroups.gather_grads` copies the parameters' gradients into the
buffer's ``.grad`` with one ``cat`` per group, and Adam updates the whole buffer in one fused call,
which writes through the views. (Gradient views of one buffer, as in Apex's and DeepSpeed's
contiguous gradients or DDP's ``gradient_as_bucket_view``, would save that copy but make autograd
add every gradient into its view instead of handing the tensor over: one more op per parameter,
which costs more here than the ``cat``.)

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
        buffers: the parameter buffers (1-D), one per group, with a ``.grad`` buffer each.
        params: the parameters of each group, whose values are views of that group's buffer.
    """

    def __init__(self, groups: List[Dict], buffers: List[torch.Tensor], params: List[List[torch.Tensor]]) -> None:
        self.groups = groups
        self.buffers = buffers
        self.params = params

    def zero_grad(self) -> None:
        """Drop the parameters' gradients (``set_to_none``: the backward hands its gradient tensors
        over instead of adding them into zeros)."""
        for params in self.params:
            for p in params:
                p.grad = None

    def gather_grads(self) -> None:
        """Copy each parameter's ``.grad`` into its slice of the group's gradient buffer (one ``cat``
        per group); a parameter without a gradient gets zeros there (see the module docstring)."""
        for buffer, params in zip(self.buffers, self.params):
            grads = [p.grad.reshape(-1) if p.grad is not None else p.new_zeros(p.numel()) for p in params]
            torch.cat(grads, out=buffer.grad)


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
    group order), with a gradient buffer of the same size for `FlatGroups.gather_grads`.

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
            p.grad = None
            start = end
        buffers.append(buffer)
        flat_groups.append(dict(group, params=[buffer]))
    return FlatGroups(flat_groups, buffers, [g["params"] for g in groups])


def all_receive_gradients(params: Sequence[torch.Tensor], loss: torch.Tensor) -> bool:
    """True when ``loss`` depends on every tensor of ``params`` through the autograd graph (each
    gets a gradient from ``loss.backward()``; the gradient may be zero)."""
    params = [p for p in params if p.requires_grad]
    if not params:
        return True
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return all(g is not None for g in grads)
