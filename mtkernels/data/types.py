"""The records `mtkernels.data` hands to models and training code: task and feature specs, splits,
batches, per-user feature rows and top-k evaluation sets.

All of them hold pre-encoded tensors. Sparse ids are 0..num_embeddings-1 with index 0 reserved for
unknown / out-of-vocabulary values (cold users, unseen categories), as in TorchRec's
``EmbeddingBagConfig`` convention of one table row per id.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch

from ..jagged import KeyedJaggedTensor

Jagged = Tuple[torch.Tensor, torch.Tensor]  # (values [nnz], offsets [n+1]), both int64


@dataclass(frozen=True)
class TaskSpec:
    """One prediction task.

    Attributes:
        name: task name, e.g. ``"click"``; its column in ``labels`` follows ``MultiTaskData.tasks``.
        kind: ``"binary"`` (labels 0/1, sigmoid + BCE) or ``"regression"`` (raw value, MSE).
    """

    name: str
    kind: str

    def __post_init__(self) -> None:
        if self.kind not in ("binary", "regression"):
            raise ValueError(f"TaskSpec {self.name!r}: kind must be 'binary' or 'regression', got {self.kind!r}")


@dataclass(frozen=True)
class FeatureSpec:
    """One sparse feature (one embedding table unless the model shares tables).

    Attributes:
        name: feature name (a key of ``Batch.sparse``).
        num_embeddings: ids are ``0..num_embeddings-1``; 0 is the unknown / OOV id.
        multi_valued: True when a sample may hold several ids (a bag, e.g. genres).
        side: ``"user"``, ``"item"`` or ``"context"`` (per-row, neither user nor item).
    """

    name: str
    num_embeddings: int
    multi_valued: bool = False
    side: str = "context"

    def __post_init__(self) -> None:
        if self.side not in ("user", "item", "context"):
            raise ValueError(f"FeatureSpec {self.name!r}: side must be user, item or context, got {self.side!r}")
        if self.num_embeddings < 1:
            raise ValueError(f"FeatureSpec {self.name!r}: num_embeddings must be >= 1, got {self.num_embeddings}")


@dataclass
class Batch:
    """A training / scoring batch of B rows.

    Attributes:
        sparse: ``KeyedJaggedTensor`` with keys = feature names in ``MultiTaskData.features`` order;
            lengths are 1 for single-valued features.
        dense: float32 ``[B, dense_dim]``.
        labels: float32 ``[B, T]``, NaN where a task has no label (all NaN for scoring batches).
        index: int64 ``[B]`` row numbers in the split the batch came from (None for pair batches).
    """

    sparse: KeyedJaggedTensor
    dense: torch.Tensor
    labels: torch.Tensor
    index: Optional[torch.Tensor] = None

    @property
    def batch_size(self) -> int:
        return self.dense.shape[0]

    def to(self, device, non_blocking: bool = False) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return Batch(self.sparse.to(device, non_blocking), move(self.dense), move(self.labels), move(self.index))


@dataclass
class Split:
    """One split (train, val, test...) as pre-encoded tensors, n rows.

    Attributes:
        num_rows: n.
        sparse: ``{feature: int64 [n]}`` for every single-valued feature.
        multi: ``{feature: (values int64 [nnz], offsets int64 [n+1])}`` for multi-valued features.
        dense: float32 ``[n, dense_dim]``.
        labels: float32 ``[n, T]``, NaN where a task has no label.
        user: int64 ``[n]`` encoded user index (the ``user_id`` feature; 0 = unknown, e.g. cold users).
            All zeros for data sets without users.
        item: int64 ``[n]`` encoded item index (1..num_items, item position + 1; 0 = unknown).
        user_row: int64 ``[n]`` row of the user in the user table (distinct for every known user,
            cold users included); pass such rows to ``MultiTaskData.pair_batch``.
        extra: per-row columns kept for reporting (e.g. ``timestamp``), not model input.
    """

    num_rows: int
    sparse: Dict[str, torch.Tensor]
    multi: Dict[str, Jagged]
    dense: torch.Tensor
    labels: torch.Tensor
    user: torch.Tensor
    item: torch.Tensor
    user_row: torch.Tensor
    extra: Dict[str, torch.Tensor] = field(default_factory=dict)

    def __repr__(self) -> str:
        return (
            f"Split(num_rows={self.num_rows}, sparse={list(self.sparse)}, multi={list(self.multi)}, "
            f"dense={tuple(self.dense.shape)}, labels={tuple(self.labels.shape)})"
        )


@dataclass
class UserRows:
    """User-side features of U users, ready to be crossed with items by ``pair_batch``.

    Attributes:
        rows: int64 ``[U]`` user-table rows (-1 for users built from raw side features only).
        sparse: ``{user feature: int64 [U]}`` single-valued user-side features (``user_id`` is 0 for
            cold users: they are served from their side features).
        multi: ``{user feature: (values, offsets [U+1])}`` multi-valued user-side features.
        dense: float32 ``[U, user_dense_dim]`` user-side dense features.
    """

    rows: torch.Tensor
    sparse: Dict[str, torch.Tensor]
    multi: Dict[str, Jagged]
    dense: torch.Tensor

    def __len__(self) -> int:
        return self.rows.numel()


@dataclass
class TopKEval:
    """Top-k evaluation sets for U users (PROTOCOL.md section 5), item positions 0..num_items-1.

    Attributes:
        users: int64 ``[U]`` user-table rows, usable by ``pair_batch`` / ``user_feature_rows``.
        exclude_offsets: int64 ``[U+1]``; ``exclude_indices``: item positions each user must not be
            recommended (already seen: train, plus val for the test sets).
        relevant_offsets: int64 ``[U+1]``; ``relevant_indices``: the user's relevant item positions.
    """

    users: torch.Tensor
    exclude_offsets: torch.Tensor
    exclude_indices: torch.Tensor
    relevant_offsets: torch.Tensor
    relevant_indices: torch.Tensor

    @property
    def relevant(self) -> Jagged:
        """``(relevant_offsets, relevant_indices)``, the CSR form the metrics take."""
        return self.relevant_offsets, self.relevant_indices

    def __len__(self) -> int:
        return self.users.numel()
