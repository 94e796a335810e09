"""Reference `embedding_bags`: one `torch.nn.functional.embedding_bag` per feature.

The spec of ARCHITECTURE.md §3.1, written for reading, not speed. It is also the fallback when the
native extension is missing.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F


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
        the tables (low-precision tables accumulate in float32).

    Raises:
        IndexError: an index outside ``[0, num_embeddings)`` of its table (names feature, position).
        ValueError / TypeError: malformed offsets, dtypes or lengths.
    """
    if feature_table is None:
        feature_table = list(range(len(weights)))
    feature_table = [int(t) for t in feature_table]
    if pooling not in ("sum", "mean"):
        raise ValueError(f"pooling must be 'sum' or 'mean', got {pooling!r}")
    if indices.is_floating_point() or indices.is_complex():
        raise TypeError(f"indices must be an int32 or int64 tensor, got {indices.dtype}")
    if offsets.is_floating_point() or offsets.is_complex():
        raise TypeError(f"offsets must be an int32 or int64 tensor, got {offsets.dtype}")
    if per_sample_weights is not None and pooling != "sum":
        raise ValueError("per_sample_weights is only supported with pooling='sum'")
    num_features = len(feature_table)
    if offsets.dim() != 1 or offsets.numel() < 1:
        raise ValueError(f"offsets must be a non-empty 1-D tensor, got shape {tuple(offsets.shape)}")
    if num_features == 0 or (offsets.numel() - 1) % num_features != 0:
        raise ValueError(
            f"offsets must have F*B+1 entries for F={num_features} features, got {offsets.numel()}"
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
    if per_sample_weights is not None and per_sample_weights.numel() != indices.numel():
        raise ValueError(
            f"per_sample_weights must have len(indices)={indices.numel()} entries, "
            f"got {per_sample_weights.numel()}"
        )

    pooled = []
    for f, t in enumerate(feature_table):
        table = weights[t]
        start, end = int(offsets[f * batch_size]), int(offsets[(f + 1) * batch_size])
        idx = indices[start:end]
        bad = (idx < 0) | (idx >= table.shape[0])
        if bool(bad.any()):
            pos = start + int(bad.nonzero()[0])
            raise IndexError(
                f"feature {f}: index {int(indices[pos])} at position {pos} is out of range "
                f"for table {t} with {table.shape[0]} rows"
            )
        bag_offsets = offsets[f * batch_size : (f + 1) * batch_size] - start
        # float16/bfloat16 tables accumulate in float32
        table_acc = table.float() if table.dtype in (torch.float16, torch.bfloat16) else table
        psw = None
        if per_sample_weights is not None:
            psw = per_sample_weights[start:end].to(table_acc.dtype)
        out = F.embedding_bag(idx, table_acc, bag_offsets, mode=pooling, per_sample_weights=psw)
        pooled.append(out.to(table.dtype))
    return torch.cat(pooled, dim=1) if pooled else weights[0].new_zeros((batch_size, 0))
