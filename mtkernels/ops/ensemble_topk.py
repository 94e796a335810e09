"""`ensemble_topk`: fused score fusion and per-row top-k (ARCHITECTURE.md §3.3).

Calls the native kernel `torch.ops.mtkernels.ensemble_topk` when it is built for the device of the
scores, and the pure-PyTorch reference (`mtkernels.reference.ensemble_topk`) otherwise.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from .._extension import has_kernel
from ..reference import ensemble_topk as _reference
from ..reference.ensemble_topk import Scores, prepare_arguments

# Transform codes of the native schema (`int[] transforms`); the order is part of the contract.
TRANSFORM_CODES = {"identity": 0, "sigmoid": 1, "log_sigmoid": 2}


def ensemble_topk(
    scores: Scores,
    weights,
    k: int,
    transforms: Optional[Sequence[str]] = None,
    exclude_offsets: Optional[torch.Tensor] = None,
    exclude_indices: Optional[torch.Tensor] = None,
    mode: str = "weighted",
    rrf_c: float = 60.0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fuse S score matrices and return the top-k items of every row, in one pass over the scores.

    ``mode="weighted"``: ``fused[b, n] = sum_s w_s * transform_s(scores[s, b, n])``, summed in
    float32 in source order; a source whose weight is 0 contributes nothing (also where its score
    is -inf or NaN, which ``0 * score`` would turn into NaN).

    ``mode="rrf"``: reciprocal rank fusion (Cormack, Clarke and Büttcher, SIGIR 2009),
    ``fused[b, n] = sum_s w_s / (rrf_c + rank_s(b, n))`` where ``rank_s(b, n)`` is the 1-based rank
    of item n among all N items of row b of source s (score descending, ties by the smaller index,
    NaN scores ranked after every number). Exact: every source's row is fully sorted, so rrf costs
    ``O(S * N log N)`` per row (against ``O(S * N)`` for weighted) plus one float32 row buffer per
    thread; transforms are ignored (they are monotone and do not change ranks). Ranks are taken
    over all N items, before exclusions; an item with a NaN score in a source of non-zero weight
    has a NaN fused score.

    Items are ordered by fused value descending, ties broken by the smaller index. Excluded items
    and items whose fused score is NaN are never returned; an item whose fused score is -inf is a
    valid item (returned, after every finite one). When fewer than k items remain, the tail of the
    row holds index -1 and value -inf.

    Cost (native CPU kernel, weighted mode): one streaming pass over the ``S * B * N`` scores,
    rows in parallel (``torch.get_num_threads()`` threads), ``O(k)`` memory per thread; the fused
    matrix is never materialised. Past the first k items of a row, an item's transforms are only
    computed when a cheap upper bound of its fused score beats the current k-th best (exact
    pruning in the style of MaxScore: the results are the same as without it). Fused values use
    a fast float32 sigmoid/log-sigmoid (within about 3 ulp of ``torch.sigmoid``).

    No autograd: the outputs do not require grad and no gradient flows to ``scores`` (top-k
    selection is piecewise constant; train with the fused scores, not with this op).

    Args:
        scores: ``[S, B, N]`` tensor, or a list of S tensors ``[B, N]`` (B rows, e.g. users; N items),
            float32, float16 or bfloat16 (read and accumulated in float32) or float64 (read in
            float32). Sources of different dtypes are first converted to float32 (a copy).
        weights: ``[S]`` tensor or a list of S floats (finite; any sign).
        k: number of items per row, ``>= 0`` (may exceed N).
        transforms: S names among ``"identity"``, ``"sigmoid"``, ``"log_sigmoid"`` (default all
            ``"identity"``), applied to each source before weighting (weighted mode only).
        exclude_offsets: optional ``[B + 1]`` int32/int64 CSR offsets (0 first, ``len(exclude_indices)``
            last, non-decreasing): row b excludes ``exclude_indices[offsets[b]:offsets[b + 1]]``.
        exclude_indices: optional 1-D int32/int64 item indices in ``[0, N)`` (duplicates allowed),
            e.g. the items each user has already seen. Given together with ``exclude_offsets``.
        mode: ``"weighted"`` or ``"rrf"``.
        rrf_c: the constant c of reciprocal rank fusion (``>= 0``, default 60).

    Returns:
        ``(values, indices)``: ``values [B, k]`` float32 fused scores, ``indices [B, k]`` int64
        item indices, on the device of ``scores``.

    Raises:
        ValueError: ``k < 0``; no source; sources of different shapes or devices; a weight count or
            transform count different from S; an unknown transform or mode; non-finite weights;
            ``rrf_c < 0``; only one of the two exclusion tensors; ``exclude_offsets`` not of length
            B + 1, not starting at 0, not ending at ``len(exclude_indices)`` or decreasing;
            ``exclude_indices`` outside ``[0, N)``.
        TypeError: scores not floating point; exclusion tensors not int32/int64; ``k`` not an int.
    """
    sources, weight_list, k, transform_names = prepare_arguments(
        scores, weights, k, transforms, exclude_offsets, exclude_indices, mode, rrf_c
    )
    if not has_kernel("ensemble_topk", sources[0].device.type):
        return _reference(sources, weight_list, k, transform_names, exclude_offsets, exclude_indices, mode, rrf_c)
    if len({src.dtype for src in sources}) > 1:
        sources = [src.to(torch.float32) for src in sources]
    sources = [src.detach() for src in sources]  # no autograd: selection has no useful gradient
    codes = [TRANSFORM_CODES[name] for name in transform_names]
    return torch.ops.mtkernels.ensemble_topk.default(
        sources, weight_list, k, codes, exclude_offsets, exclude_indices, mode, float(rrf_c)
    )


def _register_fake() -> None:
    """Shape/dtype rule of the native op, so torch.compile and torch.export can trace it."""

    @torch.library.register_fake("mtkernels::ensemble_topk")
    def _(scores, weights, k, transforms, exclude_offsets, exclude_indices, mode, rrf_c):
        torch._check(len(scores) >= 1, lambda: "scores must hold at least one source")
        torch._check(k >= 0, lambda: f"k must be >= 0, got {k}")
        batch_size = scores[0].shape[0]
        values = scores[0].new_empty((batch_size, k), dtype=torch.float32)
        indices = scores[0].new_empty((batch_size, k), dtype=torch.int64)
        return values, indices


if hasattr(torch.ops.mtkernels, "ensemble_topk"):
    _register_fake()
