"""Reference `ensemble_topk`: fuse S score matrices and take the top-k of every row, in plain torch.

The spec of ARCHITECTURE.md §3.3, written for reading, not speed: it materialises the fused
``[B, N]`` matrix and sorts whole rows. It is also the fallback when the native kernel is missing
(and the only path on devices without a native kernel).

The argument rules (``prepare_arguments``) live here too, because they are part of the spec; the
functional op in `mtkernels.ops.ensemble_topk` applies the same rules before calling the kernel.
"""

from __future__ import annotations

import math
import operator
from typing import List, Optional, Sequence, Tuple, Union

import torch

TRANSFORMS = ("identity", "sigmoid", "log_sigmoid")
MODES = ("weighted", "rrf")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)

Scores = Union[torch.Tensor, Sequence[torch.Tensor]]


def prepare_arguments(
    scores: Scores,
    weights,
    k,
    transforms: Optional[Sequence[str]],
    exclude_offsets: Optional[torch.Tensor],
    exclude_indices: Optional[torch.Tensor],
    mode: str,
    rrf_c: float,
) -> Tuple[List[torch.Tensor], List[float], int, List[str]]:
    """Check the arguments of `ensemble_topk` and bring them to one form.

    Cheap checks only (shapes, dtypes, lengths, names); the checks that read every exclusion
    (offsets non-decreasing, indices in ``[0, N)``) are done by the reference and by the kernel.

    Returns:
        ``(sources, weights, k, transforms)``: S tensors ``[B, N]`` (views of ``scores`` when it is
        one ``[S, B, N]`` tensor), S Python floats, ``k`` as an int, S transform names.

    Raises:
        TypeError: scores not float tensors, indices not int32/int64, ``k`` not an integer.
        ValueError: anything else malformed (see `ensemble_topk`).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if isinstance(k, bool):
        raise TypeError(f"k must be an integer, got {k!r}")
    try:
        k = operator.index(k)
    except TypeError:
        raise TypeError(f"k must be an integer, got {type(k).__name__}") from None
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")

    if isinstance(scores, torch.Tensor):
        if scores.dim() != 3:
            raise ValueError(
                f"scores must be a [S, B, N] tensor or a list of S [B, N] tensors, "
                f"got a tensor of shape {tuple(scores.shape)}"
            )
        sources = list(scores.unbind(0))
    elif isinstance(scores, (list, tuple)):
        sources = list(scores)
    else:
        raise TypeError(
            f"scores must be a [S, B, N] tensor or a list of S [B, N] tensors, got {type(scores).__name__}"
        )
    if len(sources) == 0:
        raise ValueError("scores must hold at least one source (S >= 1), got none")
    for s, src in enumerate(sources):
        if not isinstance(src, torch.Tensor):
            raise TypeError(f"scores[{s}] must be a tensor, got {type(src).__name__}")
        if src.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"scores[{s}] must be float32, float16, bfloat16 or float64, got {src.dtype}"
            )
        if src.dim() != 2:
            raise ValueError(f"scores[{s}] must be a [B, N] tensor, got shape {tuple(src.shape)}")
        if src.shape != sources[0].shape:
            raise ValueError(
                f"all sources must have the same shape [B, N]: scores[0] is {tuple(sources[0].shape)}, "
                f"scores[{s}] is {tuple(src.shape)}"
            )
        if src.device != sources[0].device:
            raise ValueError(
                f"all sources must be on the same device: scores[0] is on {sources[0].device}, "
                f"scores[{s}] on {src.device}"
            )
    num_sources = len(sources)
    batch_size = sources[0].shape[0]

    if isinstance(weights, torch.Tensor):
        if weights.dim() != 1:
            raise ValueError(f"weights must be a 1-D tensor [S], got shape {tuple(weights.shape)}")
        weights = weights.detach().double().cpu().tolist()
    else:
        try:
            weights = [float(w) for w in weights]
        except (TypeError, ValueError):
            raise TypeError(f"weights must be a [S] tensor or a list of S floats, got {weights!r}") from None
    if len(weights) != num_sources:
        raise ValueError(f"weights must have one entry per source (S={num_sources}), got {len(weights)}")
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"weights must be finite, got {weights}")

    if transforms is None:
        transforms = ["identity"] * num_sources
    elif isinstance(transforms, str):
        raise ValueError(f"transforms must be a list of S={num_sources} names, got the string {transforms!r}")
    else:
        transforms = list(transforms)
    if len(transforms) != num_sources:
        raise ValueError(
            f"transforms must have one entry per source (S={num_sources}), got {len(transforms)}"
        )
    for s, name in enumerate(transforms):
        if name not in TRANSFORMS:
            raise ValueError(f"transforms[{s}] must be one of {TRANSFORMS}, got {name!r}")

    if not math.isfinite(rrf_c) or rrf_c < 0:
        raise ValueError(f"rrf_c must be a finite number >= 0, got {rrf_c}")

    if (exclude_offsets is None) != (exclude_indices is None):
        raise ValueError("exclude_offsets and exclude_indices must be given together (or neither)")
    if exclude_offsets is not None:
        for name, t in (("exclude_offsets", exclude_offsets), ("exclude_indices", exclude_indices)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
            if t.dtype not in INDEX_DTYPES:
                raise TypeError(f"{name} must be an int32 or int64 tensor, got {t.dtype}")
            if t.dim() != 1:
                raise ValueError(f"{name} must be a 1-D tensor, got shape {tuple(t.shape)}")
            if t.device != sources[0].device:
                raise ValueError(f"{name} must be on the device of scores ({sources[0].device}), got {t.device}")
        if exclude_offsets.numel() != batch_size + 1:
            raise ValueError(
                f"exclude_offsets must have B+1={batch_size + 1} entries, got {exclude_offsets.numel()}"
            )
    return sources, weights, k, transforms


def check_exclusions(exclude_offsets: torch.Tensor, exclude_indices: torch.Tensor, num_items: int) -> None:
    """The full checks of a CSR exclusion list (reads all of it). Raises ValueError."""
    offsets = exclude_offsets.long()
    first, last = int(offsets[0]), int(offsets[-1])
    if first != 0 or last != exclude_indices.numel():
        raise ValueError(
            f"exclude_offsets must start at 0 and end at len(exclude_indices)={exclude_indices.numel()}, "
            f"got {first} and {last}"
        )
    if bool((offsets[1:] < offsets[:-1]).any()):
        raise ValueError("exclude_offsets must be non-decreasing")
    if exclude_indices.numel() > 0:
        low, high = int(exclude_indices.min()), int(exclude_indices.max())
        if low < 0 or high >= num_items:
            bad = low if low < 0 else high
            raise ValueError(f"exclude_indices must lie in [0, N={num_items}), got {bad}")


def _transform(x: torch.Tensor, name: str) -> torch.Tensor:
    if name == "sigmoid":
        return torch.sigmoid(x)
    if name == "log_sigmoid":
        return torch.nn.functional.logsigmoid(x)
    return x


def _order(key: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per row, the item order (valid first; then key descending; then index ascending)."""
    # Two stable sorts: by key, then by validity; stability keeps the index order among ties.
    by_key = torch.sort(key.masked_fill(~valid, 0.0), dim=1, descending=True, stable=True).indices
    invalid_in_key_order = (~valid).gather(1, by_key).to(torch.uint8)
    by_validity = torch.sort(invalid_in_key_order, dim=1, stable=True).indices
    return by_key.gather(1, by_validity)


def rrf_ranks(x: torch.Tensor) -> torch.Tensor:
    """Per-row ranks (1 = best) of a ``[B, N]`` float32 matrix: score descending, ties by the smaller
    index, NaN after every number (so a NaN never pushes a real score down). Float32 ``[B, N]``."""
    order = _order(x, ~torch.isnan(x))
    ranks = torch.empty_like(order)
    positions = torch.arange(1, x.shape[1] + 1, device=x.device).expand_as(order)
    ranks.scatter_(1, order, positions)
    return ranks.to(torch.float32)


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
    """Fuse S score matrices and return the top-k items of every row (pure PyTorch).

    Same contract as `mtkernels.ops.ensemble_topk` (see its docstring): values ``[B, k]`` float32
    sorted descending with ties by the smaller index, indices ``[B, k]`` int64; excluded items and
    NaN fused scores are never returned; missing places hold index -1 and value -inf.
    """
    sources, weights, k, transforms = prepare_arguments(
        scores, weights, k, transforms, exclude_offsets, exclude_indices, mode, rrf_c
    )
    batch_size, num_items = sources[0].shape
    device = sources[0].device

    fused = torch.zeros(batch_size, num_items, dtype=torch.float32, device=device)
    for src, w, name in zip(sources, weights, transforms):
        if w == 0.0:  # contributes nothing, even where its score is -inf or NaN (0 * inf is NaN)
            continue
        x = src.to(torch.float32)
        if mode == "weighted":
            fused += w * _transform(x, name)
        else:  # transforms are monotone, so they do not change the ranks: rank the raw scores
            # a true division (``w / tensor`` would be ``reciprocal() * w``, rounded twice)
            ranks = rrf_ranks(x)
            term = torch.full_like(ranks, w) / (rrf_c + ranks)
            fused += torch.where(torch.isnan(x), torch.full_like(x, math.nan), term)

    valid = ~torch.isnan(fused)
    if exclude_offsets is not None:
        check_exclusions(exclude_offsets, exclude_indices, num_items)
        lengths = (exclude_offsets[1:] - exclude_offsets[:-1]).long()
        rows = torch.repeat_interleave(torch.arange(batch_size, device=device), lengths)
        valid[rows, exclude_indices.long()] = False

    order = _order(fused, valid)[:, :k]
    values = fused.gather(1, order)
    keep = valid.gather(1, order)
    values = values.masked_fill(~keep, -math.inf)
    indices = order.masked_fill(~keep, -1)
    if k > num_items:  # fewer items than places: pad the tail
        pad = k - num_items
        values = torch.cat([values, values.new_full((batch_size, pad), -math.inf)], dim=1)
        indices = torch.cat([indices, indices.new_full((batch_size, pad), -1)], dim=1)
    return values, indices
