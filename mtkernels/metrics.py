"""Evaluation metrics of the ``ml100k-mtl-v1`` protocol (shared/data/PROTOCOL.md section 5).

Point-wise metrics pool the rows of a split and skip rows whose label is NaN (a task without a
label on that row, e.g. like/rating on sampled negatives). AUC and logloss come from scikit-learn.
Top-k metrics (NDCG@K, Recall@K) take each user's ranked item positions and the CSR of relevant
items, with binary relevance; users with no relevant item are left out of the mean.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from sklearn.metrics import log_loss, roc_auc_score

EPSILON = 1e-7  # PROTOCOL.md: p clipped to [1e-7, 1 - 1e-7] before the logloss


def _labelled(y, p) -> Tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y.detach().cpu() if isinstance(y, torch.Tensor) else y, dtype=np.float64).reshape(-1)
    p = np.asarray(p.detach().cpu().double() if isinstance(p, torch.Tensor) else p, dtype=np.float64).reshape(-1)
    if y.shape != p.shape:
        raise ValueError(f"labels and predictions must have the same number of entries, got {y.size} and {p.size}")
    keep = ~np.isnan(y)
    y, p = y[keep], p[keep]
    if np.isnan(p).any():
        raise ValueError("predictions hold NaN on labelled rows")
    return y, p


def auc(y, p) -> float:
    """ROC AUC (ties count 1/2; ``sklearn.metrics.roc_auc_score``) over rows with a label.

    Args:
        y: labels 0/1, any shape (NaN = no label, skipped). p: scores, same number of entries.

    Returns:
        The AUC, or NaN when the labelled rows hold fewer than two classes.

    Raises:
        ValueError: sizes differ, or a labelled row has a NaN score.
    """
    y, p = _labelled(y, p)
    if np.unique(y).size < 2:
        return float("nan")
    return float(roc_auc_score(y, p))


def logloss(y, p) -> float:
    """``mean(-(y ln p + (1-y) ln(1-p)))`` with p clipped to ``[1e-7, 1-1e-7]``, over labelled rows.

    Args:
        y: labels 0/1 (NaN skipped). p: probabilities, same number of entries.

    Returns:
        The mean logloss (NaN when no row is labelled).
    """
    y, p = _labelled(y, p)
    if y.size == 0:
        return float("nan")
    return float(log_loss(y, np.clip(p, EPSILON, 1.0 - EPSILON), labels=[0.0, 1.0]))


def rmse(y, p) -> float:
    """Root mean squared error of the raw predictions (no clipping) over labelled rows (NaN if none)."""
    y, p = _labelled(y, p)
    if y.size == 0:
        return float("nan")
    return float(math.sqrt(np.mean((p - y) ** 2)))


Relevant = Union[Tuple[torch.Tensor, torch.Tensor], object]


def _relevant_csr(relevant: Relevant) -> Tuple[torch.Tensor, torch.Tensor]:
    if hasattr(relevant, "relevant_offsets"):
        return relevant.relevant_offsets, relevant.relevant_indices
    offsets, indices = relevant
    return torch.as_tensor(offsets, dtype=torch.long), torch.as_tensor(indices, dtype=torch.long)


def _hits(topk_indices, relevant: Relevant, k: Optional[int]):
    """Per user: hits ``[U, k]`` (bool) and the number of distinct relevant items ``[U]``."""
    topk = torch.as_tensor(topk_indices).long()
    if topk.dim() != 2:
        raise ValueError(f"topk_indices must be [U, k], got shape {tuple(topk.shape)}")
    k = topk.shape[1] if k is None else int(k)
    if k < 1 or k > topk.shape[1]:
        raise ValueError(f"k must be in [1, {topk.shape[1]}] (the width of topk_indices), got {k}")
    topk = topk[:, :k]
    offsets, indices = _relevant_csr(relevant)
    num_users = topk.shape[0]
    if offsets.numel() != num_users + 1:
        raise ValueError(f"relevant offsets must have U+1={num_users + 1} entries, got {offsets.numel()}")
    counts = offsets[1:] - offsets[:-1]
    owner = torch.repeat_interleave(torch.arange(num_users), counts)
    width = int(max(int(indices.max()) if indices.numel() else 0, int(topk.max()) if topk.numel() else 0)) + 1
    relevant_keys = torch.unique(owner * width + indices)
    owner_unique = relevant_keys // width
    distinct = torch.bincount(owner_unique, minlength=num_users)
    query = torch.arange(num_users).unsqueeze(1) * width + topk
    # -1 marks "no item" in a top-k list (fewer candidates than k): never a hit.
    hits = torch.isin(query, relevant_keys) & (topk >= 0)
    return hits, distinct


def ndcg_at_k(topk_indices, relevant: Relevant, k: Optional[int] = None) -> float:
    """Mean NDCG@k over users with at least one relevant item (PROTOCOL.md section 5).

    ``DCG@k = sum_{r=1..k} rel_r / log2(r+1)`` with binary relevance; ``IDCG@k`` is the same for
    ``min(k, |R|)`` relevant items at the top. Ties in the ranking are the caller's (the top-k op
    breaks them by the smaller index, items being indexed by ascending id).

    Args:
        topk_indices: int ``[U, >=k]``, each user's ranked item positions (-1 = no item).
        relevant: CSR ``(offsets [U+1], indices)`` of relevant item positions per user, or a
            `TopKEval` (its ``relevant_offsets`` / ``relevant_indices``).
        k: cut-off (default: the width of ``topk_indices``).

    Returns:
        The mean, or NaN when no user has a relevant item.

    Raises:
        ValueError: shapes that do not agree, or k outside ``[1, width]``.
    """
    hits, distinct = _hits(topk_indices, relevant, k)
    width = hits.shape[1]
    discount = 1.0 / torch.log2(torch.arange(2, width + 2, dtype=torch.float64))
    dcg = (hits.double() * discount).sum(1)
    ideal_cumulative = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(discount, 0)])
    idcg = ideal_cumulative[distinct.clamp(max=width)]
    users = distinct > 0
    if not bool(users.any()):
        return float("nan")
    return float((dcg[users] / idcg[users]).mean())


def recall_at_k(topk_indices, relevant: Relevant, k: Optional[int] = None) -> float:
    """Mean Recall@k = hits in the top k / |R| (not truncated to k), over users with |R| > 0.

    Arguments, return value and errors as `ndcg_at_k`.
    """
    hits, distinct = _hits(topk_indices, relevant, k)
    users = distinct > 0
    if not bool(users.any()):
        return float("nan")
    return float((hits.sum(1)[users].double() / distinct[users].double()).mean())


def task_metrics(tasks: Sequence, labels: torch.Tensor, predictions: torch.Tensor) -> Dict[str, float]:
    """Point-wise metrics of every task: binary -> ``{task}_auc``, ``{task}_logloss``; regression -> ``{task}_rmse``.

    Args:
        tasks: the `TaskSpec` list (``name``, ``kind``). labels / predictions: ``[n, T]`` (NaN labels skipped);
            binary predictions are probabilities.
    """
    labels, predictions = torch.as_tensor(labels), torch.as_tensor(predictions)
    if labels.shape != predictions.shape or labels.dim() != 2 or labels.shape[1] != len(tasks):
        raise ValueError(f"labels and predictions must both be [n, {len(tasks)}], got {tuple(labels.shape)} and {tuple(predictions.shape)}")
    out = {}
    for t, task in enumerate(tasks):
        if task.kind == "binary":
            out[f"{task.name}_auc"] = auc(labels[:, t], predictions[:, t])
            out[f"{task.name}_logloss"] = logloss(labels[:, t], predictions[:, t])
        else:
            out[f"{task.name}_rmse"] = rmse(labels[:, t], predictions[:, t])
    return out
