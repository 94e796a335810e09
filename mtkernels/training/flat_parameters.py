"""Contiguous parameter buffers for the dense optimiser: Adam over a few tensors instead of ~30.

A MultiTaskModel's dense part is ~30 small tensors (expert, gate and tower weights and biases).
torch.optim.Adam's per-step Python cost grows with the tensor count (state lookups, step counters,
grouping by device and dtype, zeroing: ~0.7 ms per step on CPU for 26 tensors against ~0.1 ms for
one, serial work that a second thread does not shorten), so `flatten_groups` makes the parameters
of a group views of one contiguous buffer and gives Adam the buffer. After the backward,
`FlatGroups.gather_grads` copies their gradients into the buffer's ``.grad`` with one ``cat`` per
group, and Adam updates the whole buffer in one fused call, which writes through the views.
(Gradient views of one buffer, as in Apex's and DeepSpeed's contiguous gradients or DDP's
``gradient_as_bucket_view``, would save that copy but make autograd add every gradient into its
view instead of handing the tensor over: one more op per parameter, which costs more here.)

Same results bit for bit as Adam over the parameters one by one: Adam is elementwise, but torch's
fused CPU kernel runs a vectorised body and a scalar tail (the last ``numel % vector width``
elements of each tensor), which may round a multiply-add differently. So only parameters whose
size is a multiple of `VECTOR_MULTIPLE` (no tail in either layout) go into the buffer; the others
(in the presets: the gates' biases ``[E]`` and the towers' output biases ``[1]``) stay their own
tensors in the group, 7 tensors in all for MMoE instead of 26. One difference remains: a parameter
without a gradient in a step is updated with a zero gradient (its moments decay) where per-tensor
Adam skips it, so `fit` only flattens when every trained parameter takes part in the loss, which
`all_receive_gradients` checks on a few training rows before training (torch's RNG state restored
afterwards, so the run draws the same dropout masks either way).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

# Floats per vector of AVX-512 (16; AVX2's 8 divides it): a tensor of a multiple of this size has
# no scalar tail in torch's fused Adam kernel, whether it is its own tensor or a slice of the buffer.
VECTOR_MULTIPLE = 16


class FlatGroups:
    """What `flatten_groups` returns.

    Attributes:
        groups: the optimiser groups, each ``{"params": [buffer, *rest], ...}`` (``[*rest]`` when no
            parameter of the group went into a buffer) with the other keys (``weight_decay``,
            ``lr``) of the group it replaces.
        buffers: per group, the 1-D parameter buffer (with a ``.grad`` buffer) or None.
        flat: per group, the parameters whose values are views of that group's buffer, in order.
        rest: per group, the parameters that stay their own tensors.
        original: per group, the parameters in the order of the group it replaces.
    """

    def __init__(self, groups, buffers, flat, rest, original) -> None:
        self.groups: List[Dict] = groups
        self.buffers: List[Optional[torch.Tensor]] = buffers
        self.flat: List[List[torch.Tensor]] = flat
        self.rest: List[List[torch.Tensor]] = rest
        self.original: List[List[torch.Tensor]] = original

    def zero_grad(self) -> None:
        """Drop every parameter's gradient (``set_to_none``: the backward hands its gradient tensors
        over instead of adding them into zeros)."""
        for params in self.original:
            for p in params:
                p.grad = None

    def gather_grads(self) -> None:
        """Copy the gradient of each buffered parameter into its slice of the group's gradient
        buffer (one ``cat`` per group); one without a gradient gets zeros (see the module docstring)."""
        for buffer, params in zip(self.buffers, self.flat):
            if buffer is not None:
                grads = [p.grad.reshape(-1) if p.grad is not None else p.new_zeros(p.numel()) for p in params]
                torch.cat(grads, out=buffer.grad)

    def adam_state_dict(self, state_dict: Dict) -> Dict:
        """An Adam ``state_dict`` for these groups: ``state_dict`` itself when it already is one, or
        converted from Adam over the original parameters one by one (a checkpoint written before
        the buffers, or by a run that did not flatten): the buffered parameters' ``exp_avg`` and
        ``exp_avg_sq`` concatenated in order, the step count kept.

        Raises:
            ValueError: groups whose sizes match neither layout, or buffered parameters at
                different steps.
        """
        groups = state_dict["param_groups"]
        sizes = [len(g["params"]) for g in groups]
        if sizes == [len(g["params"]) for g in self.groups]:
            return state_dict
        if sizes != [len(params) for params in self.original]:
            raise ValueError(f"optimizer state has groups of {sizes} parameters; expected "
                             f"{[len(g['params']) for g in self.groups]} (buffers) or "
                             f"{[len(p) for p in self.original]} (one tensor per parameter)")
        state, new_groups, index = {}, [], 0
        for group, buffer, flat, rest, original in zip(groups, self.buffers, self.flat, self.rest, self.original):
            old = {id(p): i for p, i in zip(original, group["params"])}
            ids = []
            if buffer is not None:
                per_param = [state_dict["state"].get(old[id(p)]) for p in flat]
                if any(s is not None for s in per_param):
                    if any(s is None for s in per_param) or len({float(s["step"]) for s in per_param}) != 1:
                        raise ValueError("cannot flatten an Adam state whose parameters are at different steps")
                    state[index] = {"step": per_param[0]["step"].clone()}
                    for key in ("exp_avg", "exp_avg_sq"):
                        state[index][key] = torch.cat([s[key].reshape(-1) for s in per_param])
                ids.append(index)
                index += 1
            for p in rest:
                if old[id(p)] in state_dict["state"]:
                    state[index] = state_dict["state"][old[id(p)]]
                ids.append(index)
                index += 1
            new_groups.append(dict(group, params=ids))
        return {"state": state, "param_groups": new_groups}


def flattenable(groups: Sequence[Dict]) -> bool:
    """True when every group's parameters are dense leaf tensors of one dtype and device, and no
    two parameters overlap in memory (tied weights, or one tensor in two groups), which copies
    into separate slices of a buffer would untie. Disjoint views of one storage (the buffer of an
    earlier `flatten_groups`, when a model is trained again) are fine."""
    spans = []
    for group in groups:
        params = list(group["params"])
        if not params or len({(p.dtype, p.device) for p in params}) != 1:
            return False
        for p in params:
            if p.is_sparse or not p.is_leaf:
                return False
            extent = 1 + sum((size - 1) * stride for size, stride in zip(p.shape, p.stride())) if p.numel() else 0
            start = p.storage_offset()
            spans.append((p.untyped_storage().data_ptr(), start, start + extent))
    spans.sort()
    return all(a[0] != b[0] or a[2] <= b[1] for a, b in zip(spans, spans[1:]))


def flatten_groups(groups: Sequence[Dict]) -> FlatGroups:
    """Make the parameters of each group whose size is a multiple of `VECTOR_MULTIPLE` views of one
    new contiguous buffer (their values copied in, in group order), with a gradient buffer of the
    same size for `FlatGroups.gather_grads`; the group's other parameters stay as they are.

    Args:
        groups: torch.optim parameter groups (``{"params": [...], ...}``) that `flattenable` accepts.

    Returns:
        `FlatGroups`: groups over the buffers and the other parameters, to build the optimiser from.

    Raises:
        ValueError: groups that `flattenable` rejects.
    """
    groups = [dict(g, params=list(g["params"])) for g in groups]
    if not flattenable(groups):
        raise ValueError("groups must hold dense leaf tensors of one dtype and device per group, each in one group")
    new_groups, buffers, flats, rests = [], [], [], []
    for group in groups:
        flat = [p for p in group["params"] if p.numel() % VECTOR_MULTIPLE == 0]
        rest = [p for p in group["params"] if p.numel() % VECTOR_MULTIPLE != 0]
        buffer = None
        if flat:
            with torch.no_grad():
                buffer = torch.cat([p.detach().reshape(-1) for p in flat])
            buffer.requires_grad_(True)
            buffer.grad = torch.zeros_like(buffer)
            start = 0
            for p in flat:
                end = start + p.numel()
                p.data = buffer.data[start:end].view_as(p)
                p.grad = None
                start = end
        buffers.append(buffer)
        flats.append(flat)
        rests.append(rest)
        new_groups.append(dict(group, params=([buffer] if buffer is not None else []) + rest))
    return FlatGroups(new_groups, buffers, flats, rests, [g["params"] for g in groups])


def all_receive_gradients(params: Sequence[torch.Tensor], loss: torch.Tensor) -> bool:
    """True when ``loss`` depends on every tensor of ``params`` through the autograd graph (each
    gets a gradient from ``loss.backward()``; the gradient may be zero)."""
    params = [p for p in params if p.requires_grad]
    if not params:
        return True
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return all(g is not None for g in grads)
