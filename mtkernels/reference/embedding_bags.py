"""Reference `embedding_bags`: one `torch.nn.functional.embedding_bag` per feature.

The spec of ARCHITECTURE.md §3.1, written for reading, not speed. It is also the fallback when the
native extension is missing: `embedding_bags` (forward, autograd through F.embedding_bag),
`embedding_bags_row_gradients` (the gradient of each table as unique rows + summed row gradients,
which is what the sparse and fused backward paths need) and `fused_update` (SGD and FBGEMM's
EXACT_ROWWISE_ADAGRAD applied to those rows).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    # float16/bfloat16 tables accumulate in float32; float64 stays float64 (gradcheck)
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_and_normalise(weights, indices, offsets, feature_table, pooling, per_sample_weights):
    """Validate the inputs of every reference function; returns (feature_table, indices, offsets, B)."""
    if len(weights) == 0:
        raise ValueError("weights must hold at least one table")
    for t, table in enumerate(weights):
        if table.dim() != 2:
            raise ValueError(f"weights[{t}] must be a 2-D table, got shape {tuple(table.shape)}")
    if feature_table is None:
        feature_table = list(range(len(weights)))
    feature_table = [int(t) for t in feature_table]
    for f, t in enumerate(feature_table):
        if not 0 <= t < len(weights):
            raise ValueError(f"feature_table[{f}]={t} is not a table id in [0, {len(weights)})")
    if pooling not in ("sum", "mean"):
        raise ValueError(f"pooling must be 'sum' or 'mean', got {pooling!r}")
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise TypeError(f"indices must be an int32 or int64 tensor, got {indices.dtype}")
    if offsets.is_floating_point() or offsets.is_complex() or offsets.dtype == torch.bool:
        raise TypeError(f"offsets must be an int32 or int64 tensor, got {offsets.dtype}")
    if per_sample_weights is not None and pooling != "sum":
        raise ValueError("per_sample_weights is only supported with pooling='sum' (sum only), got 'mean'")
    if indices.dim() != 1:
        raise ValueError(f"indices must be a 1-D tensor, got shape {tuple(indices.shape)}")
    num_features = len(feature_table)
    if offsets.dim() != 1 or offsets.numel() < 1:
        raise ValueError(f"offsets must be a non-empty 1-D tensor (F*B+1 entries), got shape {tuple(offsets.shape)}")
    if num_features == 0 or (offsets.numel() - 1) % num_features != 0:
        raise ValueError(
            f"offsets must have F*B+1 entries for F={num_features} features (every feature the "
            f"same batch size), got {offsets.numel()}"
        )
    batch_size = (offsets.numel() - 1) // num_features
    indices = indices.long()
    offsets = offsets.long()
    if int(offsets[0]) != 0 or int(offsets[-1]) != indices.numel():
        raise ValueError(
            f"offsets must start at 0 and end at len(indices)={indices.numel()}, "
            f"got {int(offsets[0])} and {int(offsets[-1])}"
        )
    if bool((offsets[1:] < offsets[:-1]).any()):
        raise ValueError("offsets must be non-decreasing")
    if per_sample_weights is not None and (
        per_sample_weights.dim() != 1 or per_sample_weights.numel() != indices.numel()
    ):
        raise ValueError(
            f"per_sample_weights must be 1-D with len(indices)={indices.numel()} entries, "
            f"got shape {tuple(per_sample_weights.shape)}"
        )
    for f, t in enumerate(feature_table):
        start, end = int(offsets[f * batch_size]), int(offsets[(f + 1) * batch_size])
        idx = indices[start:end]
        bad = (idx < 0) | (idx >= weights[t].shape[0])
        if bool(bad.any()):
            pos = start + int(bad.nonzero()[0])
            raise IndexError(
                f"feature {f}: index {int(indices[pos])} at position {pos} is out of range "
                f"for table {t} with {weights[t].shape[0]} rows"
            )
    return feature_table, indices, offsets, batch_size


def embedding_bags(
    weights: Sequence[torch.Tensor],
    indices: torch.Tensor,
    offsets: torch.Tensor,
    feature_table: Optional[Sequence[int]] = None,
    pooling: str = "sum",
    per_sample_weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Pooled lookup of F features over T tables (table-batched embedding bags, FBGEMM layout).

    Args:
        weights: T tables, table t a float tensor ``[num_embeddings[t], embedding_dim[t]]``.
        indices: 1-D int32/int64 row ids of all bags, feature-major.
        offsets: 1-D, same integer family, length ``F * B + 1``; bag ``(f, b)`` is
            ``indices[offsets[f*B + b] : offsets[f*B + b + 1]]``.
        feature_table: table id of each feature (length F); default ``range(T)``.
        pooling: ``"sum"`` or ``"mean"`` (an empty bag pools to zeros).
        per_sample_weights: optional float ``[len(indices)]``, with ``"sum"`` only.

    Returns:
        ``[B, sum_f embedding_dim[feature_table[f]]]``, features concatenated in order, dtype of
        the tables (low-precision tables accumulate in float32). Differentiable (autograd through
        ``F.embedding_bag``) with respect to the tables and the per-sample weights.

    Raises:
        IndexError: an index outside ``[0, num_embeddings)`` of its table (names feature, position).
        ValueError / TypeError: malformed offsets, dtypes or lengths.
    """
    feature_table, indices, offsets, batch_size = _check_and_normalise(
        weights, indices, offsets, feature_table, pooling, per_sample_weights
    )
    pooled = []
    for f, t in enumerate(feature_table):
        table = weights[t]
        start, end = int(offsets[f * batch_size]), int(offsets[(f + 1) * batch_size])
        bag_offsets = offsets[f * batch_size : (f + 1) * batch_size] - start
        table_acc = table.to(_accumulate_dtype(table.dtype))
        psw = None
        if per_sample_weights is not None:
            psw = per_sample_weights[start:end].to(table_acc.dtype)
        out = F.embedding_bag(indices[start:end], table_acc, bag_offsets, mode=pooling, per_sample_weights=psw)
        pooled.append(out.to(table.dtype))
    return torch.cat(pooled, dim=1)


def embedding_bags_row_gradients(
    grad_output: torch.Tensor,
    weights: Sequence[torch.Tensor],
    indices: torch.Tensor,
    offsets: torch.Tensor,
    feature_table: Optional[Sequence[int]] = None,
    pooling: str = "sum",
    per_sample_weights: Optional[torch.Tensor] = None,
) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """The gradient of each table, rows only: what the sparse and the fused backward need.

    Args:
        grad_output: ``[B, total_dim]``, the gradient of the `embedding_bags` output.
        weights, indices, offsets, feature_table, pooling, per_sample_weights: as `embedding_bags`.

    Returns:
        one ``(rows, row_gradients)`` per table: ``rows`` int64 ``[U]`` ascending and unique (the
        rows touched by the batch), ``row_gradients`` ``[U, embedding_dim]`` in the accumulate
        dtype (float32, float64 for float64 tables), duplicate rows summed.
    """
    feature_table, indices, offsets, batch_size = _check_and_normalise(
        weights, indices, offsets, feature_table, pooling, per_sample_weights
    )
    contributions: List[List[Tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in weights]
    column = 0
    for f, t in enumerate(feature_table):
        dim = weights[t].shape[1]
        acc_dtype = _accumulate_dtype(weights[t].dtype)
        start, end = int(offsets[f * batch_size]), int(offsets[(f + 1) * batch_size])
        lengths = offsets[f * batch_size + 1 : (f + 1) * batch_size + 1] - offsets[f * batch_size : (f + 1) * batch_size]
        bag = torch.repeat_interleave(torch.arange(batch_size), lengths)
        grad = grad_output[bag, column : column + dim].to(acc_dtype)
        if per_sample_weights is not None:
            grad = grad * per_sample_weights[start:end].to(acc_dtype)[:, None]
        if pooling == "mean":
            grad = grad / lengths[bag].to(acc_dtype)[:, None]
        contributions[t].append((indices[start:end], grad))
        column += dim
    result = []
    for t, table in enumerate(weights):
        acc_dtype = _accumulate_dtype(table.dtype)
        if not contributions[t]:
            result.append((indices.new_zeros(0), torch.zeros(0, table.shape[1], dtype=acc_dtype)))
            continue
        rows = torch.cat([r for r, _ in contributions[t]])
        grads = torch.cat([g for _, g in contributions[t]])
        unique_rows, inverse = torch.unique(rows, sorted=True, return_inverse=True)
        summed = torch.zeros(unique_rows.numel(), table.shape[1], dtype=acc_dtype).index_add_(0, inverse, grads)
        result.append((unique_rows, summed))
    return result


def fused_update(
    weights: Sequence[torch.Tensor],
    accumulators: Sequence[torch.Tensor],
    row_gradients: Sequence[Tuple[torch.Tensor, torch.Tensor]],
    kind: str,
    lr: float,
    eps: float,
) -> None:
    """Apply one optimizer step to the touched rows of each table, in place.

    ``kind="sgd"``: ``w[r] -= lr * g[r]``. ``kind="rowwise_adagrad"`` (FBGEMM's
    EXACT_ROWWISE_ADAGRAD): ``acc[r] += mean(g[r]**2)``; ``w[r] -= lr * g[r] / (sqrt(acc[r]) + eps)``,
    one float32 accumulator per row. The arithmetic is done in float32 (float64 for float64 tables).
    """
    with torch.no_grad():
        for t, (rows, grad) in enumerate(row_gradients):
            if rows.numel() == 0:
                continue
            table = weights[t]
            grad = grad.to(_accumulate_dtype(table.dtype))
            if kind == "sgd":
                step = lr * grad
            elif kind == "rowwise_adagrad":
                acc = accumulators[t]
                mean_square = grad.pow(2).mean(dim=1) if grad.shape[1] > 0 else torch.zeros_like(acc[rows])
                acc[rows] += mean_square.to(acc.dtype)
                step = lr * grad / (acc[rows].to(grad.dtype).sqrt() + eps)[:, None]
            else:
                raise ValueError(f"kind must be 'sgd' or 'rowwise_adagrad', got {kind!r}")
            table[rows] = (table[rows].to(grad.dtype) - step).to(table.dtype)
