"""Evaluation of multi-task recommenders: point-wise metrics per task and top-k ranking metrics.

Follows the ml100k-mtl-v1 protocol (../shared/data/PROTOCOL.md §5):

- point-wise metrics pooled over the rows of a split: AUC and logloss for binary tasks, RMSE for
  regression tasks, each over the rows where that task has a label (NaN labels drop out);
- top-k (NDCG@K, Recall@K): every user of the split scored against the whole item catalogue, the
  split's exclusions removed (train(+val) positives), the top-k lists computed by the fused
  ``mtkernels.ops.ensemble_topk`` op from a weighted sum of task scores (the "ranking score" the
  model states: by default the click probability, i.e. the first binary task), ties broken by the
  smaller item index (= the smaller item id, items are indexed in ascending id).
"""

from __future__ import annotations

import math
import operator
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch

from . import metrics as _metrics
from . import ops


def default_ranking(tasks: Sequence) -> Dict[str, float]:
    """The default ranking score: the probability of the first binary task (click in ml100k)."""
    for task in tasks:
        if task.kind == "binary":
            return {task.name: 1.0}
    return {tasks[0].name: 1.0}


def _ranking_sources(tasks: Sequence, task_weights: Mapping[str, float]) -> Tuple[list, torch.Tensor]:
    names = [t.name for t in tasks]
    columns, weights = [], []
    for name, w in task_weights.items():
        if name not in names:
            raise ValueError(f"task_weights names an unknown task {name!r}; the tasks are {names}")
        columns.append(names.index(name))
        weights.append(float(w))
    if not columns:
        raise ValueError("task_weights must name at least one task")
    return columns, torch.tensor(weights, dtype=torch.float32)


def fused_topk(
    predictions: torch.Tensor,
    tasks: Sequence,
    task_weights: Mapping[str, float],
    k: int,
    exclude_offsets: Optional[torch.Tensor] = None,
    exclude_indices: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k items per user from a weighted sum of task predictions, in one ``ensemble_topk`` call.

    Args:
        predictions: float ``[U, N, T]``: the model's outputs for U users x N items (probabilities
            for binary tasks, raw values for regression tasks).
        tasks: the model's T task specs (``.name``, ``.kind``).
        task_weights: ``{task name: weight}``; the score of item n for user u is
            ``sum_t w_t * predictions[u, n, t]``.
        k: list length (>= 0).
        exclude_offsets, exclude_indices: optional CSR ``[U+1]`` / item positions in ``[0, N)`` never
            returned for that user (e.g. the items the user has already seen).

    Returns:
        ``(scores [U, k] float32, indices [U, k] int64)``, best first, ties by smaller index; the
        tail is ``(-inf, -1)`` when fewer than k items are left.

    Raises:
        ValueError: unknown task names, a bad k or malformed exclusions (from the op).
    """
    columns, weights = _ranking_sources(tasks, task_weights)
    sources = predictions[:, :, columns].permute(2, 0, 1).contiguous().float()
    return ops.ensemble_topk(
        sources, weights, k, exclude_offsets=exclude_offsets, exclude_indices=exclude_indices
    )


def check_tasks(model: torch.nn.Module, data) -> None:
    """Column t of a model's output is its t-th task: refuse data whose tasks differ (names, kinds or
    order), which would compare or train each column against another task's labels.

    Raises:
        ValueError: the model's ``tasks`` differ from ``data.tasks`` (a model without ``tasks`` passes).
    """
    tasks = getattr(model, "tasks", None)
    if tasks is None:
        return
    ours = [(t.name, t.kind) for t in tasks]
    theirs = [(t.name, t.kind) for t in data.tasks]
    if ours != theirs:
        raise ValueError(f"the model's tasks {[n for n, _ in ours]} differ from the data's {[n for n, _ in theirs]} "
                         "(names, kinds and order must match; `mtkernels.transfer.select_tasks` picks and orders "
                         "a data set's tasks)")


def _request_times(model: torch.nn.Module, data, split: str) -> Optional[torch.Tensor]:
    """Per user row, the request time of ``split`` (`mtkernels.cold_start.request_times`) for a
    model with ``uses_request_time`` (a time-aware cold-start model); None for any other model."""
    if not getattr(model, "uses_request_time", False):
        return None
    from .cold_start import request_times

    return request_times(data, split)


def scored_labels(model: torch.nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """The labels ``[n, T]`` a model's outputs are scored against: ``model.targets(labels)`` where
    the model has it (ESMM: entire-space labels, 0 where a post-click task's row was not clicked),
    else ``labels``."""
    return model.targets(labels) if hasattr(model, "targets") else labels


def _forward(model: torch.nn.Module, batch, at: Optional[torch.Tensor]) -> torch.Tensor:
    """The model's outputs for a batch, at request times ``at`` when it takes them."""
    return model(batch.sparse, batch.dense) if at is None else model(batch.sparse, batch.dense, at=at)


@torch.no_grad()
def predict(model: torch.nn.Module, data, split: str, batch_size: int = 32768) -> torch.Tensor:
    """Model outputs for every row of a split, in row order: float ``[n, T]``.

    Raises:
        ValueError: the model's tasks differ from ``data.tasks`` (`check_tasks`).
    """
    check_tasks(model, data)
    model.eval()
    first = _request_times(model, data, split)  # a time-aware cold-start model: each row at its user's request time
    if first is not None:
        first = first[data.splits[split].user_row]
    outputs = [_forward(model, batch, None if first is None else first[batch.index])
               for batch in data.batches(split, batch_size, shuffle=False)]
    num_tasks = len(data.tasks)
    return torch.cat(outputs) if outputs else torch.zeros(0, num_tasks)


def pointwise_metrics(tasks: Sequence, labels: torch.Tensor, predictions: torch.Tensor) -> Dict[str, Dict[str, float]]:
    """AUC and logloss of each binary task, RMSE of each regression task (NaN labels skipped).

    Args:
        tasks: T task specs. labels, predictions: float ``[n, T]``.

    Returns:
        ``{task name: {"auc", "logloss"} | {"rmse"}}``; a metric with no labelled row (or AUC with
        a single class) is NaN.
    """
    result: Dict[str, Dict[str, float]] = {}
    for t, task in enumerate(tasks):
        y = labels[:, t]
        p = predictions[:, t]
        mask = ~torch.isnan(y)
        y, p = y[mask].double().numpy(), p[mask].double().numpy()
        if task.kind == "binary":
            two_classes = y.size > 0 and 0 < y.sum() < y.size
            result[task.name] = {
                "auc": float(_metrics.auc(y, p)) if two_classes else math.nan,
                "logloss": float(_metrics.logloss(y, p)) if y.size else math.nan,
            }
        else:
            result[task.name] = {"rmse": float(_metrics.rmse(y, p)) if y.size else math.nan}
    return result


def _check_split(data, split: str) -> None:
    if split not in data.splits:
        raise ValueError(f"split: {split!r} is not a split of {data.name}; splits: {', '.join(data.splits)}")


def _check_split_and_k(data, split: str, k: int) -> None:
    _check_split(data, split)
    try:
        positive = not isinstance(k, bool) and operator.index(k) >= 1
    except TypeError:
        positive = False
    if not positive:
        raise ValueError(f"k must be a positive number of items, got {k!r}")


@torch.no_grad()
def topk_lists(
    model: torch.nn.Module,
    data,
    split: str,
    k: int = 10,
    task_weights: Optional[Mapping[str, float]] = None,
    users_per_block: int = 64,
):
    """Top-k item positions for every user of a split's top-k evaluation (PROTOCOL.md §5).

    Scores each block of users against all ``data.num_items`` items with the model and keeps the
    top k with ``ensemble_topk`` (the split's exclusions removed). A model with
    ``uses_request_time`` (a time-aware `mtkernels.cold_start.ColdStartModel`) gets ``at`` = each
    user's request time, the earliest timestamp of their rows in ``split``.

    Returns:
        ``(indices [U, k] int64 item positions (-1 pads), topk_eval)`` where ``topk_eval`` is
        ``data.topk_eval(split)`` (users, exclusions, relevant items).

    Raises:
        ValueError: ``split`` is not a split of ``data`` or has no top-k set; ``k`` < 1; the model's
            tasks differ from ``data.tasks``.
    """
    _check_split_and_k(data, split, k)
    check_tasks(model, data)
    model.eval()
    tasks = data.tasks
    task_weights = dict(task_weights or default_ranking(tasks))
    evaluation = data.topk_eval(split)
    users = evaluation.users
    items = torch.arange(data.num_items)
    lists = []
    first = _request_times(model, data, split)
    for start in range(0, users.numel(), users_per_block):
        stop = min(start + users_per_block, users.numel())
        batch = data.pair_batch(users[start:stop], items, split=split)
        at = None if first is None else first[users[start:stop]].repeat_interleave(data.num_items)
        predictions = _forward(model, batch, at).reshape(stop - start, data.num_items, len(tasks))
        lo, hi = int(evaluation.exclude_offsets[start]), int(evaluation.exclude_offsets[stop])
        offsets = evaluation.exclude_offsets[start : stop + 1] - lo
        _, indices = fused_topk(
            predictions, tasks, task_weights, k, offsets, evaluation.exclude_indices[lo:hi]
        )
        lists.append(indices)
    indices = torch.cat(lists) if lists else torch.zeros(0, k, dtype=torch.long)
    return indices, evaluation


def topk_metrics(model, data, split: str, k: int = 10, task_weights: Optional[Mapping[str, float]] = None) -> Dict[str, float]:
    """NDCG@k and Recall@k of a split (PROTOCOL.md §5): ``{"ndcg@k": ..., "recall@k": ...}``."""
    indices, evaluation = topk_lists(model, data, split, k, task_weights)
    relevant = (evaluation.relevant_offsets, evaluation.relevant_indices)
    return {
        f"ndcg@{k}": float(_metrics.ndcg_at_k(indices, relevant, k)),
        f"recall@{k}": float(_metrics.recall_at_k(indices, relevant, k)),
    }


def has_items(data) -> bool:
    """True when the data set has an item catalogue to rank (top-k metrics, serving)."""
    return int(getattr(data, "num_items", 0) or 0) > 0


def evaluate(
    model: torch.nn.Module,
    data,
    split: str,
    k: int = 10,
    task_weights: Optional[Mapping[str, float]] = None,
    topk: bool = True,
    batch_size: int = 32768,
) -> Dict[str, object]:
    """All metrics of one split: ``{task: {...}, ..., "topk": {"ndcg@k", "recall@k"}}``.

    ``topk=False``, a data set without items (``num_items`` 0 or missing, e.g. Census-Income), or a
    split without a top-k set (``train``: its positives are what the other splits exclude) skips
    the ranking part.

    Raises:
        ValueError: ``split`` is not a split of ``data``; ``k`` < 1; the model's tasks differ from
            ``data.tasks``.
    """
    _check_split_and_k(data, split, k)
    check_tasks(model, data)
    labels = scored_labels(model, data.splits[split].labels)  # ESMM: entire-space labels
    result: Dict[str, object] = dict(pointwise_metrics(data.tasks, labels, predict(model, data, split, batch_size)))
    if topk and has_items(data) and split in getattr(data, "topk_splits", [split]):
        result["topk"] = topk_metrics(model, data, split, k, task_weights)
    return result


BLEND_WEIGHTS = tuple(0.25 * i for i in range(17))


class LikeRatingBlend(torch.nn.Module):
    """A multi-task model whose like probability also ranks by its own rating prediction:
    ``p_like' = sigmoid(logit(p_like) + weight * rating)``; the other outputs are unchanged.

    Like AUC is scored on the positives only, where it asks which of the user's ratings are >= 4,
    so the rating head's score carries what the like head misses (README "What bounds like AUC").
    One model (its own two heads), the weight chosen on validation (`choose_like_rating_blend`).

    Args:
        model: maps ``(sparse, dense)`` to ``[B, T]`` outputs (binary tasks as probabilities).
        like_task, rating_task: the column of the binary like task and of the regression task.
        weight: w >= 0, finite (0: the model's own like probability).

    Raises:
        ValueError: a negative or non-finite weight, or the same column twice.
    """

    def __init__(self, model: torch.nn.Module, like_task: int, rating_task: int, weight: float) -> None:
        super().__init__()
        if not (math.isfinite(weight) and weight >= 0) or like_task == rating_task:
            raise ValueError(f"weight must be a finite number >= 0 and like_task != rating_task, got {weight}, "
                             f"{like_task}, {rating_task}")
        self.model, self.like_task, self.rating_task, self.weight = model, int(like_task), int(rating_task), float(weight)

    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        """The labels the outputs are scored against: the wrapped model's (`scored_labels`)."""
        return scored_labels(self.model, labels)

    def forward(self, sparse, dense: torch.Tensor) -> torch.Tensor:
        out = self.model(sparse, dense)
        logit = torch.logit(out[:, self.like_task].clamp(1e-7, 1 - 1e-7)) + self.weight * out[:, self.rating_task]
        return torch.cat([out[:, : self.like_task], torch.sigmoid(logit)[:, None], out[:, self.like_task + 1 :]], 1)


@torch.no_grad()
def choose_like_rating_blend(model: torch.nn.Module, data, split: str = "val", like: str = "like",
                             rating: str = "rating", weights: Sequence[float] = BLEND_WEIGHTS) -> Tuple[LikeRatingBlend, Dict[float, float]]:
    """The `LikeRatingBlend` of ``model`` whose weight gives the best like AUC on ``split``
    (validation: PROTOCOL.md 4 reserves it for such choices; the first best weight wins ties).

    Returns:
        ``(blend, {weight: like AUC on split})``.

    Raises:
        KeyError: no task named ``like`` or ``rating``. ValueError: an unknown ``split``; empty
            ``weights`` or a candidate that is not a finite number >= 0.
    """
    names = [t.name for t in data.tasks]
    if like not in names or rating not in names:
        raise KeyError(f"tasks {like!r} and {rating!r} needed, tasks are {names}")
    _check_split(data, split)
    if not len(weights):
        raise ValueError("weights: need at least one candidate")
    if not all(math.isfinite(float(w)) and float(w) >= 0 for w in weights):
        raise ValueError(f"weights: every candidate must be a finite number >= 0, got {[float(w) for w in weights]}")
    like_task, rating_task = names.index(like), names.index(rating)
    labels = scored_labels(model, data.splits[split].labels)[:, like_task]  # the labels evaluate scores
    rows = ~torch.isnan(labels)
    output = predict(model, data, split).double()[rows]
    logit = torch.logit(output[:, like_task].clamp(1e-7, 1 - 1e-7))
    y = labels[rows].double().numpy()
    aucs = {float(w): float(_metrics.auc(y, (logit + w * output[:, rating_task]).numpy())) for w in weights}
    best = max(aucs, key=aucs.get)
    return LikeRatingBlend(model, like_task, rating_task, best), aucs


class RatingCalibration(torch.nn.Module):
    """A multi-task model whose rating prediction is recalibrated linearly:
    ``rating' = scale * rating + shift``; the other outputs are unchanged.

    Platt-style recalibration (Platt 1999) for a regression head: the shift corrects the mean,
    the scale how far the predictions spread around it (a head trained on a drifting split, as
    ml100k-mtl-v1's temporal one, can be over- or under-confident). Fitted on validation by
    `choose_rating_calibration`.

    Args:
        model: maps ``(sparse, dense)`` to ``[B, T]`` outputs.
        rating_task: the column of the regression task.
        scale, shift: finite floats.

    Raises:
        ValueError: a scale or shift that is not finite.
    """

    def __init__(self, model: torch.nn.Module, rating_task: int, scale: float, shift: float) -> None:
        super().__init__()
        if not (math.isfinite(scale) and math.isfinite(shift)):
            raise ValueError(f"scale and shift must be finite, got {scale}, {shift}")
        self.model, self.rating_task, self.scale, self.shift = model, int(rating_task), float(scale), float(shift)

    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        """The labels the outputs are scored against: the wrapped model's (`scored_labels`)."""
        return scored_labels(self.model, labels)

    def forward(self, sparse, dense: torch.Tensor) -> torch.Tensor:
        out = self.model(sparse, dense)
        rating = out[:, self.rating_task] * self.scale + self.shift
        return torch.cat([out[:, : self.rating_task], rating[:, None], out[:, self.rating_task + 1 :]], 1)


@torch.no_grad()
def choose_rating_calibration(model: torch.nn.Module, data, split: str = "val", rating: str = "rating") -> RatingCalibration:
    """The `RatingCalibration` of ``model`` fitted by least squares on the rated rows of ``split``
    (validation: PROTOCOL.md 4 reserves it for such choices): ``(scale, shift)`` minimise
    ``sum (scale * prediction + shift - rating)^2`` (float64, closed form).

    Raises:
        KeyError: no task named ``rating``. ValueError: an unknown ``split``, fewer than two rated
            rows, or predictions that are all equal (no scale to fit).
    """
    names = [t.name for t in data.tasks]
    if rating not in names:
        raise KeyError(f"task {rating!r} needed, tasks are {names}")
    _check_split(data, split)
    column = names.index(rating)
    labels = scored_labels(model, data.splits[split].labels)[:, column]
    rows = ~torch.isnan(labels)
    x = predict(model, data, split).double()[rows, column]
    y = labels[rows].double()
    if x.numel() < 2:
        raise ValueError(f"split {split!r} has {x.numel()} rated rows; at least 2 are needed to fit a calibration")
    centred = x - x.mean()
    spread = float((centred * centred).sum())
    if spread == 0.0:
        raise ValueError(f"the rating predictions on split {split!r} are all equal; no scale can be fitted")
    scale = float((centred * (y - y.mean())).sum()) / spread
    shift = float(y.mean()) - scale * float(x.mean())
    return RatingCalibration(model, column, scale, shift)
