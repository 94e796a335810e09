"""`multi_task_score`: fused experts, per-task gates and task towers for scoring (inference).

`pack_multi_task_params` turns a model's `torch.nn.Linear` layers (MMoE, a single-level PLE/CGC
layer, Shared-Bottom) into the stacked layout `MultiTaskScoreParams`; `multi_task_score` runs the
native CPU kernel (torch.ops.mtkernels.multi_task_score) when it is built for x's device and the
pure-PyTorch reference otherwise.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.weak import WeakIdKeyDictionary

from .._extension import NATIVE, has_kernel
from ..reference.multi_task_score import (
    TRANSFORMS,
    MultiTaskScoreParams,
    check_params,
)
from ..reference.multi_task_score import multi_task_score as _reference

__all__ = ["MultiTaskScoreParams", "pack_multi_task_params", "multi_task_score"]


def _bias(linear: torch.nn.Linear) -> torch.Tensor:
    if linear.bias is not None:
        return linear.bias
    return linear.weight.new_zeros(linear.out_features)


def _check_linear(layer, name: str, in_features: int, out_features: Optional[int], like: torch.Tensor):
    if not isinstance(layer, torch.nn.Linear):
        raise TypeError(f"{name} must be a torch.nn.Linear, got {type(layer).__name__}")
    if layer.in_features != in_features or (out_features is not None and layer.out_features != out_features):
        expected = f"Linear({in_features}, {out_features if out_features is not None else 'any'})"
        raise ValueError(
            f"{name} must be {expected}, got Linear({layer.in_features}, {layer.out_features})"
        )
    if layer.weight.dtype != like.dtype:
        raise TypeError(f"{name} must have dtype {like.dtype} like experts[0][0], got {layer.weight.dtype}")
    if layer.weight.device != like.device:
        raise ValueError(f"{name} must be on device {like.device} like experts[0][0], got {layer.weight.device}")


@torch.no_grad()
def pack_multi_task_params(
    experts: Sequence[Sequence[torch.nn.Linear]],
    gates: Sequence[Optional[torch.nn.Linear]],
    gate_mask: torch.Tensor,
    towers: Sequence[Sequence[torch.nn.Linear]],
    transforms: Sequence[str],
) -> MultiTaskScoreParams:
    """Stack a multi-task model's layers into `MultiTaskScoreParams` for `multi_task_score`.

    The packed tensors are copies (no autograd history): pack again after the weights change.

    Args:
        experts: E experts, each its `Linear` layers in order; ReLU follows every expert layer.
            All experts have the same layer sizes ``D -> H_1 -> ... -> H_L``.
        gates: T gates; gate t is ``Linear(D, n_t)`` giving logits over task t's allowed experts
            (the True entries of ``gate_mask[t]``, in ascending expert order), or None when task t
            has exactly one allowed expert (its mixture is that expert's output).
        gate_mask: ``[T, E]`` bool, the experts each task's gate mixes: all True is MMoE (Ma et
            al., KDD 2018); shared plus task-specific experts is PLE's CGC layer (Tang et al.,
            RecSys 2020); ``E = 1`` is Shared-Bottom (Caruana, 1997).
        towers: T towers, each its `Linear` layers in order, ReLU between them (not after the
            last); the last has ``out_features = 1``. All towers have the same layer sizes.
        transforms: T of ``"sigmoid"`` (probability tasks) or ``"identity"`` (ratings, logits).

    Returns:
        `MultiTaskScoreParams` in the dtype and device of ``experts[0][0].weight``. The expert
        first layer and the gate weights share one buffer (``[E*H_1 + T*E, D]``), so the CUDA
        kernel computes both with one matrix product.

    Raises:
        ValueError: inconsistent layer sizes, gate sizes that do not match ``gate_mask``, a task
            with no allowed expert, unknown transforms (the message names the argument).
        TypeError: layers that are not `torch.nn.Linear`, mixed dtypes, a non-bool gate_mask.
    """
    num_experts, num_tasks = len(experts), len(towers)
    if num_experts < 1:
        raise ValueError("experts must hold at least one expert")
    if num_tasks < 1:
        raise ValueError("towers must hold at least one tower")
    if not isinstance(gate_mask, torch.Tensor) or gate_mask.dtype != torch.bool:
        raise TypeError(f"gate_mask must be a bool tensor, got {getattr(gate_mask, 'dtype', type(gate_mask))}")
    if tuple(gate_mask.shape) != (num_tasks, num_experts):
        raise ValueError(
            f"gate_mask must have shape [T={num_tasks}, E={num_experts}] (len(towers), len(experts)), "
            f"got {tuple(gate_mask.shape)}"
        )
    if len(gates) != num_tasks:
        raise ValueError(f"gates must hold T={num_tasks} entries (one per tower), got {len(gates)}")
    if isinstance(transforms, str) or len(transforms) != num_tasks:
        raise ValueError(f"transforms must hold T={num_tasks} strings, got {transforms!r}")
    for t, name in enumerate(transforms):
        if name not in TRANSFORMS:
            raise ValueError(f"transforms[{t}] must be 'sigmoid' or 'identity', got {name!r}")
    if len(experts[0]) < 1:
        raise ValueError("experts[0] must hold at least one Linear layer")
    first = experts[0][0]
    if not isinstance(first, torch.nn.Linear):
        raise TypeError(f"experts[0][0] must be a torch.nn.Linear, got {type(first).__name__}")
    like = first.weight
    width = first.in_features
    sizes = [layer.out_features for layer in experts[0]]
    for e, expert in enumerate(experts):
        if len(expert) != len(sizes):
            raise ValueError(f"experts[{e}] must have {len(sizes)} layers like experts[0], got {len(expert)}")
        fan_in = width
        for l, layer in enumerate(expert):
            _check_linear(layer, f"experts[{e}][{l}]", fan_in, sizes[l], like)
            fan_in = sizes[l]
    mask_cpu = gate_mask.cpu()
    allowed = [mask_cpu[t].nonzero().flatten().tolist() for t in range(num_tasks)]
    for t, gate in enumerate(gates):
        if not allowed[t]:
            raise ValueError(f"gate_mask[{t}] must allow at least one expert")
        if gate is None:
            if len(allowed[t]) != 1:
                raise ValueError(f"gates[{t}] may be None only when gate_mask[{t}] allows one expert, "
                                 f"it allows {len(allowed[t])}")
        else:
            _check_linear(gate, f"gates[{t}]", width, len(allowed[t]), like)
    tower_sizes = [layer.out_features for layer in towers[0]]
    if not tower_sizes or tower_sizes[-1] != 1:
        raise ValueError(f"towers[0] must end in a Linear with out_features=1, got sizes {tower_sizes}")
    for t, tower in enumerate(towers):
        if len(tower) != len(tower_sizes):
            raise ValueError(f"towers[{t}] must have {len(tower_sizes)} layers like towers[0], got {len(tower)}")
        fan_in = sizes[-1]
        for k, layer in enumerate(tower):
            _check_linear(layer, f"towers[{t}][{k}]", fan_in, tower_sizes[k], like)
            fan_in = tower_sizes[k]

    # The expert first layer and the gates read the same x: one buffer lets the CUDA kernel
    # compute both with a single [M, D] x [D, E*H_1 + T*E] product (it checks the adjacency; the
    # CPU kernel packs its own panel layout, see multi_task_score).
    hidden = sizes[0]
    kw = dict(dtype=like.dtype, device=like.device)
    first_weight = torch.zeros(num_experts * hidden + num_tasks * num_experts, width, **kw)
    first_bias = torch.zeros(num_experts * hidden + num_tasks * num_experts, **kw)
    w0 = first_weight[: num_experts * hidden].view(num_experts, hidden, width)
    b0 = first_bias[: num_experts * hidden].view(num_experts, hidden)
    gate_weight = first_weight[num_experts * hidden :].view(num_tasks, num_experts, width)
    gate_bias = first_bias[num_experts * hidden :].view(num_tasks, num_experts)
    for e, expert in enumerate(experts):
        w0[e].copy_(expert[0].weight)
        b0[e].copy_(_bias(expert[0]))
    expert_weights = [w0] + [torch.stack([ex[l].weight for ex in experts]) for l in range(1, len(sizes))]
    expert_biases = [b0] + [torch.stack([_bias(ex[l]) for ex in experts]) for l in range(1, len(sizes))]
    for t, gate in enumerate(gates):
        if gate is not None:
            idx = torch.tensor(allowed[t], device=like.device)
            gate_weight[t].index_copy_(0, idx, gate.weight)
            gate_bias[t].index_copy_(0, idx, _bias(gate))
    tower_weights = [torch.stack([tw[k].weight for tw in towers]) for k in range(len(tower_sizes))]
    tower_biases = [torch.stack([_bias(tw[k]) for tw in towers]) for k in range(len(tower_sizes))]
    return MultiTaskScoreParams(
        expert_weights=tuple(expert_weights),
        expert_biases=tuple(expert_biases),
        gate_weight=gate_weight,
        gate_bias=gate_bias,
        gate_mask=gate_mask.to(like.device).clone(),
        tower_weights=tuple(tower_weights),
        tower_biases=tuple(tower_biases),
        transforms=tuple(transforms),
    )


_NATIVE_DEVICES: dict = {}


def _native(device: torch.device) -> bool:
    # has_kernel asks the dispatcher; cache it, the 200-row serving call is overhead-bound.
    found = _NATIVE_DEVICES.get(device.type)
    if found is None:
        found = _NATIVE_DEVICES[device.type] = has_kernel("multi_task_score", device.type)
    return found


def _requires_grad(x: torch.Tensor, params: MultiTaskScoreParams) -> bool:
    if x.requires_grad or params.gate_weight.requires_grad or params.gate_bias.requires_grad:
        return True
    return any(
        t.requires_grad
        for group in (params.expert_weights, params.expert_biases, params.tower_weights, params.tower_biases)
        for t in group
    )


_PANEL = 16  # columns per packed weight panel: kPanel in csrc/multi_task_score/cpu


def _params_tensors(params: MultiTaskScoreParams) -> tuple:
    return (
        params.gate_weight, params.gate_bias, params.gate_mask,
        *params.expert_weights, *params.expert_biases, *params.tower_weights, *params.tower_biases,
    )


# torch's fused optimizers (e.g. Adam(fused=True), which mtkernels.training.fit uses) update
# parameters in place without bumping their version counters, so every torch.optim step also
# advances this global count, and the packed-weight caches (here and in MultiTaskModel) key on it.
_OPTIMIZER_STEPS = [0]


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    _OPTIMIZER_STEPS[0] += 1


register_optimizer_step_post_hook(_count_optimizer_step)


def weights_key(tensors) -> tuple:
    """What a cache of packed weights must compare to know they are unchanged: each tensor's
    identity, address, shape and version counter, and the count of torch.optim steps taken since
    import (fused optimizers do not bump version counters). A write through ``tensor.data`` is not
    seen: repack after one (``MultiTaskModel.train()`` drops its pack).

    Raises:
        AttributeError, RuntimeError: a non-tensor, or an inference tensor (no version counter).
    """
    return (_OPTIMIZER_STEPS[0],) + tuple((id(t), t.data_ptr(), t.shape, t._version) for t in tensors)


# params.gate_weight -> (key, tensors, packed buffer). Weak keys: an entry lives as long as the
# params' gate tensor, so the cache never keeps a dropped model's weights alive; the entry holds
# the other tensors, so their ids and addresses cannot be reused by new tensors while it exists.
_PACKED = WeakIdKeyDictionary()  # keyed by identity: a tensor's == is elementwise
_HAS_PACKED_OP = NATIVE and hasattr(torch.ops.mtkernels, "multi_task_score_packed")


def _packed_buffer(params: MultiTaskScoreParams) -> Optional[torch.Tensor]:
    """The CPU kernel's packed weights for `params`, packed on first use and again whenever a
    tensor of params changed (``weights_key``: identity, address, shape, version counter, and the
    count of torch.optim steps). None where no packing applies."""
    tensors = _params_tensors(params)
    try:
        key = weights_key(tensors)
    except (AttributeError, RuntimeError):  # not tensors (the checks report it), or inference tensors
        return None
    entry = _PACKED.get(params.gate_weight)
    if entry is not None and entry[0] == key:
        return entry[2]
    try:
        packed = torch.ops.mtkernels.multi_task_score_pack.default(
            params.expert_weights, params.expert_biases, params.gate_weight, params.gate_bias,
            params.gate_mask, params.tower_weights, params.tower_biases, params.transforms,
        )
    except (ValueError, TypeError):  # bad params: the unpacked op checks them against x and says why
        return None
    _PACKED[params.gate_weight] = (key, tensors[1:], packed)
    return packed


def multi_task_score(x: torch.Tensor, params: MultiTaskScoreParams) -> torch.Tensor:
    """Fused multi-task scoring: experts, per-task softmax gates, towers, output transforms.

    ``out[m, t] = transform_t(tower_t(sum_e g_te(x_m) * expert_e(x_m)))`` with
    ``g_t(x) = softmax(W_t x + b_t)`` over the experts ``params.gate_mask[t]`` allows: MMoE (Ma et
    al., KDD 2018), a single-level PLE/CGC layer (Tang et al., RecSys 2020), or Shared-Bottom
    (E = 1). Expert hidden sizes are uniform across experts, tower sizes uniform across towers.
    The native CPU kernel runs the whole network per block of rows (about 72) on one
    register-tiled micro-kernel, so the first-layer activations and the ``[M, T, H]`` mixtures
    are never written out; it runs on ``torch.get_num_threads()`` threads. On CPU the weights
    are packed into the kernel's panel layout once per params object and reused while no tensor
    of params changes (identity, address, shape and version counter are compared on each call,
    and every torch.optim step invalidates the pack; a write through ``tensor.data`` bypasses
    version counters, so pack again after one).
    Measured speed: benchmarks/table_mts.py.

    Inference only, no autograd: call it under `torch.no_grad()` / `torch.inference_mode()`
    (or with tensors that do not require grad); train with the model's eager forward.

    Args:
        x: ``[M, D]`` rows to score (e.g. user-candidate pairs), float32 or bfloat16 (float16
            works too). The native kernel computes in float32: bfloat16/float16 weights are
            widened to float32 when packed (once per params on CPU), x once per call, every
            product accumulates in float32,
            and the scores are rounded to x's dtype at the end. float64 runs on the reference.
        params: `MultiTaskScoreParams` (from `pack_multi_task_params`, or built from stacked
            tensors directly), same dtype and device as x.

    Returns:
        ``[M, T]`` scores in x's dtype: probabilities for "sigmoid" tasks, raw values for
        "identity" tasks.

    Raises:
        ValueError: a shape or device that does not fit the layout, an empty gate_mask row, an
            unknown transform (the message names the argument).
        TypeError: dtypes that differ from x's, a non-bool gate_mask.
        RuntimeError: grad mode is on and x or a parameter requires grad.
    """
    if torch.is_grad_enabled() and _requires_grad(x, params):
        raise RuntimeError(
            "multi_task_score is inference-only (no autograd): call it under torch.no_grad() or "
            "torch.inference_mode(), or use the model's eager forward for training"
        )
    if not isinstance(params, MultiTaskScoreParams):
        raise TypeError(f"params must be a MultiTaskScoreParams, got {type(params).__name__}")
    # float64 stays on the reference: the native kernel computes in float32.
    if isinstance(x, torch.Tensor) and x.dtype != torch.float64 and _native(x.device):
        if (
            _HAS_PACKED_OP and x.device.type == "cpu" and x.dtype == params.gate_weight.dtype
            and not torch.compiler.is_compiling()
        ):
            packed = _packed_buffer(params)
            if packed is not None:
                return torch.ops.mtkernels.multi_task_score_packed.default(
                    x, params.expert_weights, params.expert_biases, params.gate_weight, params.gate_bias,
                    params.gate_mask, params.tower_weights, params.tower_biases, params.transforms, packed,
                )
        return torch.ops.mtkernels.multi_task_score.default(
            x,
            params.expert_weights,
            params.expert_biases,
            params.gate_weight,
            params.gate_bias,
            params.gate_mask,
            params.tower_weights,
            params.tower_biases,
            params.transforms,
        )
    return _reference(x, params)


if NATIVE and hasattr(torch.ops.mtkernels, "multi_task_score"):

    @torch.library.register_fake("mtkernels::multi_task_score")
    def _(x, expert_weights, expert_biases, gate_weight, gate_bias, gate_mask, tower_weights, tower_biases, transforms):
        torch._check(x.dim() == 2, lambda: f"x must be a 2-D tensor [M, D], got shape {tuple(x.shape)}")
        torch._check(gate_mask.dim() == 2, lambda: "params.gate_mask must be a 2-D tensor [T, E]")
        return x.new_empty((x.shape[0], gate_mask.shape[0]))

if _HAS_PACKED_OP:

    def _packed_size(expert_weights, gate_weight, tower_weights) -> int:
        """Floats in the CPU kernel's packed buffer (PackedLayout in the kernel): per layer of G
        groups, G * (ceil(N/16)*16 * K) panel floats plus G * ceil(N/16)*16 bias floats."""
        def layer(groups, n, k):
            n_pad = -(-n // _PANEL) * _PANEL
            return groups * n_pad * (k + 1)

        tasks, experts, width = gate_weight.shape
        size = sum(layer(w.shape[0], w.shape[1], w.shape[2]) for w in expert_weights)
        size += layer(1, tasks * experts, width)
        size += sum(layer(w.shape[0], w.shape[1], w.shape[2]) for w in tower_weights[:-1])
        last = tower_weights[-1]
        return size + last.shape[0] * last.shape[2] + last.shape[0]

    @torch.library.register_fake("mtkernels::multi_task_score_pack")
    def _(expert_weights, expert_biases, gate_weight, gate_bias, gate_mask, tower_weights, tower_biases, transforms):
        torch._check(gate_weight.dim() == 3, lambda: "params.gate_weight must have shape [T, E, D]")
        return gate_weight.new_empty((_packed_size(expert_weights, gate_weight, tower_weights),), dtype=torch.float32)

    @torch.library.register_fake("mtkernels::multi_task_score_packed")
    def _(x, expert_weights, expert_biases, gate_weight, gate_bias, gate_mask, tower_weights, tower_biases,
          transforms, packed):
        torch._check(x.dim() == 2, lambda: f"x must be a 2-D tensor [M, D], got shape {tuple(x.shape)}")
        torch._check(gate_mask.dim() == 2, lambda: "params.gate_mask must be a 2-D tensor [T, E]")
        return x.new_empty((x.shape[0], gate_mask.shape[0]))
