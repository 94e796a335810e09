"""`embedding_bags`: fused multi-table pooled lookup, with autograd and a fused optimizer.

The native op `torch.ops.mtkernels.embedding_bags` (csrc/embedding_bags/cpu) runs when it is built
for the tables' device (`mtkernels._extension.has_kernel`); otherwise the pure-PyTorch reference
(`mtkernels.reference.embedding_bags`) runs, with the same results and errors. The layout follows
FBGEMM's table-batched embedding bags (TBE) and TorchRec's KeyedJaggedTensor: flat ``indices`` and
``offsets`` over (feature, sample) bags, feature-major.

Three backward modes:
  - dense (default): each table gets a dense ``.grad``;
  - ``sparse=True``: each table gets a coalesced sparse COO ``.grad`` (touched rows only), like
    ``nn.EmbeddingBag(sparse=True)`` but with duplicate rows already summed;
  - ``fused_optimizer=FusedEmbeddingOptimizer(...)``: the backward updates the touched rows in
    place (SGD or FBGEMM's EXACT_ROWWISE_ADAGRAD) and no table gradient is ever materialised.
All three are deterministic on CPU.
"""

from __future__ import annotations

import importlib
from typing import Dict, List, Optional, Sequence

import torch

from .._extension import has_kernel

# the module, not the function of the same name that mtkernels.reference exports
_reference = importlib.import_module("mtkernels.reference.embedding_bags")

_OPTIMIZERS = ("sgd", "rowwise_adagrad")


def _has_native(device: torch.device) -> bool:
    return has_kernel("embedding_bags", device.type)


class FusedEmbeddingOptimizer:
    """An optimizer applied to embedding tables inside the backward of `embedding_bags`.

    Follows FBGEMM's TBE fused optimizers: the gradient of a table is never materialised; for each
    row touched by the batch, the row gradient (duplicates within the batch summed first, exactly)
    is applied to the row in place.

    Args:
        weights: the T tables it updates (in place), float ``[num_embeddings[t], embedding_dim[t]]``.
            They need not (and should not) require grad.
        kind: ``"rowwise_adagrad"`` (FBGEMM's EXACT_ROWWISE_ADAGRAD: one float32 accumulator per
            row, ``acc[r] += mean(g_r**2)``, ``w[r] -= lr * g_r / (sqrt(acc[r]) + eps)``) or
            ``"sgd"`` (``w[r] -= lr * g_r``).
        lr: learning rate (float > 0).
        eps: the Adagrad denominator term (float >= 0).
        initial_accumulator_value: the starting value of every Adagrad accumulator (float >= 0).

    Attributes:
        weights: the tables (list of tensors, updated in place).
        accumulators: one float32 ``[num_embeddings[t]]`` tensor per table for rowwise_adagrad, an
            empty list for sgd.
        lr, eps, kind: the settings; ``lr`` may be changed between steps (a schedule).

    Raises:
        ValueError: an unknown kind, a negative lr/eps/initial_accumulator_value, or a table that
            is not 2-D.
    """

    def __init__(
        self,
        weights: Sequence[torch.Tensor],
        kind: str = "rowwise_adagrad",
        lr: float = 0.01,
        eps: float = 1e-8,
        initial_accumulator_value: float = 0.0,
    ) -> None:
        if kind not in _OPTIMIZERS:
            raise ValueError(f"kind must be one of {_OPTIMIZERS}, got {kind!r}")
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not eps >= 0.0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if not initial_accumulator_value >= 0.0:
            raise ValueError(f"initial_accumulator_value must be >= 0, got {initial_accumulator_value}")
        self.weights: List[torch.Tensor] = list(weights)
        for t, table in enumerate(self.weights):
            if table.dim() != 2:
                raise ValueError(f"weights[{t}] must be a 2-D table, got shape {tuple(table.shape)}")
        self.kind = kind
        self.lr = float(lr)
        self.eps = float(eps)
        self.initial_accumulator_value = float(initial_accumulator_value)
        self.accumulators: List[torch.Tensor] = []
        if kind == "rowwise_adagrad":
            self.accumulators = [
                torch.full((w.shape[0],), self.initial_accumulator_value, dtype=torch.float32, device=w.device)
                for w in self.weights
            ]
        # The lookup's output must require grad (so that its backward runs) although no table
        # does: an empty leaf that requires grad is passed through the autograd.Function.
        self._anchor = torch.zeros(0, requires_grad=True)

    def state_dict(self) -> Dict[str, object]:
        """``{"kind", "lr", "eps", "initial_accumulator_value", "accumulators"}`` (tensors cloned)."""
        return {
            "kind": self.kind,
            "lr": self.lr,
            "eps": self.eps,
            "initial_accumulator_value": self.initial_accumulator_value,
            "accumulators": [a.detach().clone() for a in self.accumulators],
        }

    def load_state_dict(self, state: Dict[str, object]) -> None:
        """Restore settings and accumulators (copied in place; shapes must match).

        Raises:
            ValueError: a different kind, or accumulators of other count/shapes.
        """
        if state["kind"] != self.kind:
            raise ValueError(f"state_dict is for kind {state['kind']!r}, this optimizer is {self.kind!r}")
        accumulators = list(state["accumulators"])
        if len(accumulators) != len(self.accumulators):
            raise ValueError(f"state_dict has {len(accumulators)} accumulators, expected {len(self.accumulators)}")
        for t, (mine, theirs) in enumerate(zip(self.accumulators, accumulators)):
            if tuple(theirs.shape) != tuple(mine.shape):
                raise ValueError(f"accumulators[{t}] has shape {tuple(theirs.shape)}, expected {tuple(mine.shape)}")
        with torch.no_grad():
            for mine, theirs in zip(self.accumulators, accumulators):
                mine.copy_(theirs)
        self.lr = float(state["lr"])
        self.eps = float(state["eps"])
        self.initial_accumulator_value = float(state.get("initial_accumulator_value", 0.0))

    def __repr__(self) -> str:
        return f"FusedEmbeddingOptimizer(kind={self.kind!r}, lr={self.lr}, eps={self.eps}, tables={len(self.weights)})"


# --------------------------------------------------------------------------------------------
# Input normalisation (metadata only; the kernel validates offsets and indices in its own pass)
# --------------------------------------------------------------------------------------------
def _normalise(weights, indices, offsets, feature_table, pooling, per_sample_weights, lengths):
    weights = list(weights)
    if len(weights) == 0:
        raise ValueError("weights must hold at least one table")
    for t, table in enumerate(weights):
        if not isinstance(table, torch.Tensor) or table.dim() != 2:
            raise ValueError(f"weights[{t}] must be a 2-D table tensor, got {getattr(table, 'shape', type(table))}")
        if not table.is_floating_point():
            raise TypeError(f"weights[{t}] must be a float tensor, got {table.dtype}")
    if feature_table is None:
        feature_table = list(range(len(weights)))
    feature_table = [int(t) for t in feature_table]
    if pooling not in ("sum", "mean"):
        raise ValueError(f"pooling must be 'sum' or 'mean', got {pooling!r}")
    if not isinstance(indices, torch.Tensor) or indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise TypeError(f"indices must be an int32 or int64 tensor, got {getattr(indices, 'dtype', type(indices))}")
    if lengths is not None:
        if offsets is not None:
            raise ValueError("pass offsets or lengths, not both")
        if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
            raise TypeError(f"lengths must be an int32 or int64 tensor, got {lengths.dtype}")
        if lengths.dim() != 1:
            raise ValueError(f"lengths must be a 1-D tensor [F*B], got shape {tuple(lengths.shape)}")
        offsets = torch.zeros(lengths.numel() + 1, dtype=lengths.dtype, device=lengths.device)
        torch.cumsum(lengths, 0, out=offsets[1:])
    if offsets is None:
        raise ValueError("offsets (or lengths=) is required")
    if offsets.is_floating_point() or offsets.is_complex() or offsets.dtype == torch.bool:
        raise TypeError(f"offsets must be an int32 or int64 tensor, got {offsets.dtype}")
    if indices.dtype not in (torch.int32, torch.int64):
        indices = indices.long()
    if offsets.dtype not in (torch.int32, torch.int64):
        offsets = offsets.long()
    # One index type in the kernel: a mixed pair is widened (never narrowed: an int64 index of
    # 2**32+1 must stay out of range, not wrap into it).
    if indices.dtype != offsets.dtype:
        indices, offsets = indices.long(), offsets.long()
    if per_sample_weights is not None:
        if per_sample_weights.dim() != 1 or per_sample_weights.numel() != indices.numel():
            raise ValueError(
                f"per_sample_weights must be 1-D with len(indices)={indices.numel()} entries, "
                f"got shape {tuple(per_sample_weights.shape)}"
            )
        if pooling != "sum":
            raise ValueError("per_sample_weights is only supported with pooling='sum' (sum only), got 'mean'")
        if not per_sample_weights.is_floating_point():
            raise TypeError(f"per_sample_weights must be a float tensor, got {per_sample_weights.dtype}")
        if per_sample_weights.dtype != weights[0].dtype:
            per_sample_weights = per_sample_weights.to(weights[0].dtype)
    return weights, indices, offsets, feature_table, per_sample_weights


# --------------------------------------------------------------------------------------------
# Native op: fake kernels and autograd (registered once, when the extension is loaded)
# --------------------------------------------------------------------------------------------
def _register_native() -> None:
    ops = torch.ops.mtkernels

    @torch.library.register_fake("mtkernels::embedding_bags")
    def _(weights, indices, offsets, feature_table, pooling, per_sample_weights, sparse):
        batch_size = (offsets.shape[0] - 1) // max(len(feature_table), 1)
        total_dim = sum(weights[t].shape[1] for t in feature_table)
        return weights[0].new_empty((batch_size, total_dim))

    @torch.library.register_fake("mtkernels::embedding_bags_backward")
    def _(grad_output, weights, indices, offsets, feature_table, pooling, per_sample_weights):
        return [w.new_empty(w.shape) for w in weights]

    @torch.library.register_fake("mtkernels::embedding_bags_backward_sparse")
    def _(grad_output, weights, indices, offsets, feature_table, pooling, per_sample_weights):
        ctx = torch.library.get_ctx()
        rows, grads = [], []
        for w in weights:
            unique = ctx.new_dynamic_size()
            rows.append(indices.new_empty((unique,), dtype=torch.int64))
            grads.append(w.new_empty((unique, w.shape[1])))
        return rows, grads

    @torch.library.register_fake("mtkernels::embedding_bags_per_sample_weights_backward")
    def _(grad_output, weights, indices, offsets, feature_table):
        return weights[0].new_empty(indices.shape)

    @torch.library.register_fake("mtkernels::embedding_bags_fused_update")
    def _(weights, accumulators, grad_output, indices, offsets, feature_table, pooling, per_sample_weights,
          optimizer, lr, eps):
        return None

    def setup_context(ctx, inputs, output):
        weights, indices, offsets, feature_table, pooling, per_sample_weights, sparse = inputs
        ctx.save_for_backward(indices, offsets, per_sample_weights, *weights)
        ctx.num_tables = len(weights)
        ctx.feature_table = feature_table
        ctx.pooling = pooling
        ctx.sparse = sparse

    def backward(ctx, grad_output):
        indices, offsets, per_sample_weights, *weights = ctx.saved_tensors
        grad_output = grad_output.contiguous()
        needs_weights = ctx.needs_input_grad[0]
        weight_grads = None
        if any(needs_weights):
            if ctx.sparse:
                rows, grads = ops.embedding_bags_backward_sparse(
                    grad_output, weights, indices, offsets, ctx.feature_table, ctx.pooling, per_sample_weights
                )
                weight_grads = [
                    torch.sparse_coo_tensor(r[None], g, w.shape, is_coalesced=True, check_invariants=False) if need else None
                    for r, g, w, need in zip(rows, grads, weights, needs_weights)
                ]
            else:
                dense = ops.embedding_bags_backward(
                    grad_output, weights, indices, offsets, ctx.feature_table, ctx.pooling, per_sample_weights
                )
                weight_grads = [g if need else None for g, need in zip(dense, needs_weights)]
        psw_grad = None
        if per_sample_weights is not None and ctx.needs_input_grad[5]:
            psw_grad = ops.embedding_bags_per_sample_weights_backward(
                grad_output, weights, indices, offsets, ctx.feature_table
            )
        return weight_grads, None, None, None, None, psw_grad, None

    torch.library.register_autograd("mtkernels::embedding_bags", backward, setup_context=setup_context)


_NATIVE_REGISTERED = False
try:
    if hasattr(torch.ops, "mtkernels") and torch._C._dispatch_has_kernel_for_dispatch_key(
        "mtkernels::embedding_bags", "CPU"
    ):
        _register_native()
        _NATIVE_REGISTERED = True
except RuntimeError:  # the op is not registered (extension missing or built without it)
    _NATIVE_REGISTERED = False


# --------------------------------------------------------------------------------------------
# Fallback autograd for the reference path (sparse gradients) and the fused optimizer
# --------------------------------------------------------------------------------------------
def _row_gradients_to_table_grad(row_gradients, weights, needs, sparse):
    grads = []
    for (rows, g), w, need in zip(row_gradients, weights, needs):
        if not need:
            grads.append(None)
        elif sparse:
            grads.append(torch.sparse_coo_tensor(rows[None], g.to(w.dtype), w.shape, is_coalesced=True, check_invariants=False))
        else:
            dense = torch.zeros_like(w)
            dense[rows] = g.to(w.dtype)
            grads.append(dense)
    return grads


def _reference_per_sample_weights_grad(grad_output, weights, indices, offsets, feature_table):
    # d out[b, cols_f] / d psw[i] = weights[t][indices[i]] for the bag (f, b) holding position i
    batch_size = (offsets.numel() - 1) // len(feature_table)
    offsets = offsets.long()
    pieces, column = [], 0
    for f, t in enumerate(feature_table):
        dim = weights[t].shape[1]
        start, end = int(offsets[f * batch_size]), int(offsets[(f + 1) * batch_size])
        lengths = offsets[f * batch_size + 1 : (f + 1) * batch_size + 1] - offsets[f * batch_size : (f + 1) * batch_size]
        bag = torch.repeat_interleave(torch.arange(batch_size), lengths)
        rows = weights[t][indices[start:end].long()]
        pieces.append((grad_output[bag, column : column + dim] * rows).sum(dim=1))
        column += dim
    return torch.cat(pieces)


class _ReferenceSparseLookup(torch.autograd.Function):
    """The reference forward with a coalesced sparse (or dense) table gradient."""

    @staticmethod
    def forward(ctx, per_sample_weights, indices, offsets, feature_table, pooling, sparse, *weights):
        out = _reference.embedding_bags(list(weights), indices, offsets, feature_table, pooling, per_sample_weights)
        ctx.save_for_backward(indices, offsets, per_sample_weights, *weights)
        ctx.feature_table, ctx.pooling, ctx.sparse = feature_table, pooling, sparse
        return out

    @staticmethod
    def backward(ctx, grad_output):
        indices, offsets, per_sample_weights, *weights = ctx.saved_tensors
        row_gradients = _reference.embedding_bags_row_gradients(
            grad_output, weights, indices, offsets, ctx.feature_table, ctx.pooling, per_sample_weights
        )
        table_grads = _row_gradients_to_table_grad(row_gradients, weights, ctx.needs_input_grad[6:], ctx.sparse)
        psw_grad = None
        if per_sample_weights is not None and ctx.needs_input_grad[0]:
            psw_grad = _reference_per_sample_weights_grad(grad_output, weights, indices, offsets, ctx.feature_table)
        return (psw_grad, None, None, None, None, None, *table_grads)


class _FusedLookup(torch.autograd.Function):
    """Forward lookup; the backward applies the fused optimizer to the touched rows in place."""

    @staticmethod
    def forward(ctx, anchor, per_sample_weights, optimizer, indices, offsets, feature_table, pooling, native):
        weights = optimizer.weights
        if native:
            out = torch.ops.mtkernels.embedding_bags(weights, indices, offsets, feature_table, pooling, per_sample_weights, False)
        else:
            out = _reference.embedding_bags(weights, indices, offsets, feature_table, pooling, per_sample_weights)
        # The tables are not saved with save_for_backward: the backward mutates them on purpose.
        ctx.save_for_backward(indices, offsets, per_sample_weights)
        ctx.optimizer, ctx.feature_table, ctx.pooling, ctx.native = optimizer, feature_table, pooling, native
        return out

    @staticmethod
    def backward(ctx, grad_output):
        indices, offsets, per_sample_weights = ctx.saved_tensors
        opt = ctx.optimizer
        grad_output = grad_output.contiguous()
        psw_grad = None
        # the per-sample-weight gradient reads the rows before the update changes them
        if per_sample_weights is not None and ctx.needs_input_grad[1]:
            if ctx.native:
                psw_grad = torch.ops.mtkernels.embedding_bags_per_sample_weights_backward(
                    grad_output, opt.weights, indices, offsets, ctx.feature_table
                )
            else:
                psw_grad = _reference_per_sample_weights_grad(grad_output, opt.weights, indices, offsets, ctx.feature_table)
        if ctx.native:
            torch.ops.mtkernels.embedding_bags_fused_update(
                opt.weights, opt.accumulators, grad_output, indices, offsets, ctx.feature_table, ctx.pooling,
                per_sample_weights, opt.kind, opt.lr, opt.eps,
            )
        else:
            row_gradients = _reference.embedding_bags_row_gradients(
                grad_output, opt.weights, indices, offsets, ctx.feature_table, ctx.pooling, per_sample_weights
            )
            _reference.fused_update(opt.weights, opt.accumulators, row_gradients, opt.kind, opt.lr, opt.eps)
        return None, psw_grad, None, None, None, None, None, None


def embedding_bags(
    weights: Sequence[torch.Tensor],
    indices: torch.Tensor,
    offsets: Optional[torch.Tensor],
    feature_table: Optional[Sequence[int]] = None,
    pooling: str = "sum",
    per_sample_weights: Optional[torch.Tensor] = None,
    *,
    lengths: Optional[torch.Tensor] = None,
    sparse: bool = False,
    fused_optimizer: Optional[FusedEmbeddingOptimizer] = None,
) -> torch.Tensor:
    """Pooled lookup of F sparse features in T embedding tables, in one op (FBGEMM's TBE layout).

    Bag ``(f, b)`` (feature f, sample b) is ``indices[offsets[f*B + b] : offsets[f*B + b + 1]]``;
    it is pooled (sum or mean of the rows of table ``feature_table[f]``, optionally weighted) into
    ``out[b, columns of feature f]``. Features are concatenated in order.

    Args:
        weights: T tables, table t float ``[num_embeddings[t], embedding_dim[t]]`` (float32;
            float16/bfloat16 accumulate in float32; float64 for gradcheck). Dims may differ; all
            tables share one dtype and device.
        indices: 1-D int32/int64 ``[L]`` row ids of all bags, feature-major.
        offsets: 1-D int32/int64 ``[F*B + 1]``, non-decreasing, ``offsets[0] = 0``,
            ``offsets[-1] = L``; or None with ``lengths=``. A mixed int32/int64 pair is widened.
        feature_table: the table of each feature (length F; several features may share a table);
            default ``range(T)``.
        pooling: ``"sum"`` or ``"mean"`` (an empty bag pools to zeros in both).
        per_sample_weights: optional float ``[L]``, one weight per index, with ``"sum"`` only;
            differentiable.
        lengths: keyword-only alternative to ``offsets``: 1-D ``[F*B]`` bag lengths.
        sparse: the tables' ``.grad`` is a sparse COO tensor over the touched rows only, each row
            once (duplicates summed, rows ascending), instead of a dense one.
        fused_optimizer: a `FusedEmbeddingOptimizer` over these same tables: the backward updates
            the touched rows in place (duplicate rows summed first) and the tables get no
            ``.grad``. The output requires grad whenever grad mode is on. Run backward once per
            forward (each backward is one optimizer step).

    Returns:
        ``[B, sum_f embedding_dim[feature_table[f]]]`` in the tables' dtype.

    Raises:
        IndexError: an index < 0 or >= num_embeddings of its table; the message names the
            feature and the position in ``indices``. Nothing is read out of bounds.
        ValueError: malformed offsets (not F*B+1 entries, not starting at 0, not ending at L,
            decreasing), both or neither of offsets/lengths, per_sample_weights with mean pooling
            or of the wrong length, a feature_table entry that is not a table, tables on other
            devices or of different dtypes, a fused_optimizer over other tables.
        TypeError: float/bool indices, offsets or lengths; non-float tables.
    """
    weights, indices, offsets, feature_table, per_sample_weights = _normalise(
        weights, indices, offsets, feature_table, pooling, per_sample_weights, lengths
    )
    native = _NATIVE_REGISTERED and _has_native(weights[0].device)
    if fused_optimizer is not None:
        if len(fused_optimizer.weights) != len(weights) or any(
            a is not b and (a.data_ptr() != b.data_ptr() or a.shape != b.shape)
            for a, b in zip(fused_optimizer.weights, weights)
        ):
            raise ValueError("fused_optimizer must be built over the same tables as weights (same order)")
        anchor = fused_optimizer._anchor if torch.is_grad_enabled() else None
        return _FusedLookup.apply(
            anchor, per_sample_weights, fused_optimizer, indices, offsets, feature_table, pooling, native
        )
    if native:
        return torch.ops.mtkernels.embedding_bags(
            weights, indices, offsets, feature_table, pooling, per_sample_weights, bool(sparse)
        )
    if sparse and torch.is_grad_enabled() and any(w.requires_grad for w in weights):
        return _ReferenceSparseLookup.apply(per_sample_weights, indices, offsets, feature_table, pooling, True, *weights)
    return _reference.embedding_bags(weights, indices, offsets, feature_table, pooling, per_sample_weights)
