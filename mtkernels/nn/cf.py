"""Collaborative-filtering members for score fusion: `ItemKNN` and `EASE`, two item-item models.

Both score user u for item n as ``sum_{i in history(u)} B[i, n]`` over an item-item matrix B
learned from the training positives; they differ in B.

`ItemKNN`: 
Item-based k-nearest-neighbour collaborative filtering (Sarwar, Karypis, Konstan and Riedl,
"Item-Based Collaborative Filtering Recommendation Algorithms", WWW 2001; Deshpande and Karypis,
"Item-Based Top-N Recommendation Algorithms", TOIS 2004) with cosine similarity on binary
implicit feedback, as implicit's ``CosineRecommender`` does (learned from its documentation:
similarity rows pruned to the K nearest neighbours, a user's score for item n is the sum of the
similarities between n and the items of the user's history).

`EASE`: Steck, "Embarrassingly Shallow Autoencoders for Sparse Data", WWW 2019: B is the
closed-form ridge regression of each item's column on all other items' columns with a zero
diagonal, ``P = (X^T X + lambda I)^-1``, ``B = -P / diag(P)`` (column-wise), ``diag(B) = 0``.
"""

from __future__ import annotations

import abc
from typing import Mapping, Optional, Sequence, Tuple

import torch
from torch import nn


class ItemItemCF(nn.Module, abc.ABC):
    """Base of the item-item models: the users' training histories (CSR buffers
    ``history_offsets [R+1]``, ``history_indices``) and scoring ``history @ B``. Subclasses
    set the item-item matrix in :meth:`_fit_matrix` and return it densely from :meth:`similarity`.

    ``task_names`` is ``("click",)``: the score ranks items by implicit feedback.
    """

    task_names = ("click",)
    _fitted_buffers: Tuple[str, ...] = ("history_offsets", "history_indices")

    def __init__(self, num_items: int) -> None:
        super().__init__()
        if int(num_items) < 1:
            raise ValueError(f"num_items must be >= 1, got {num_items}")
        self.num_items = int(num_items)
        self.register_buffer("history_offsets", torch.zeros(1, dtype=torch.long))
        self.register_buffer("history_indices", torch.zeros(0, dtype=torch.long))
        self._dense: Optional[torch.Tensor] = None

    @classmethod
    def from_config(cls, config: Mapping) -> "ItemItemCF":
        return cls(**config)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # fitted buffers change size with the data: take the stored shapes
        for name in self._fitted_buffers:
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        self._dense = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def fit(self, user_rows: torch.Tensor, items: torch.Tensor, num_user_rows: int) -> "ItemItemCF":
        """Fit on positive (user row, item position) pairs, e.g. the training split's clicks.

        Duplicate pairs count once. User rows in ``[0, num_user_rows)``; a row with no pair has an
        empty history (scores 0).

        Raises:
            ValueError: different lengths, item positions outside ``[0, N)`` or rows outside
                ``[0, num_user_rows)``.
        """
        user_rows = torch.as_tensor(user_rows, dtype=torch.long).reshape(-1)
        items = torch.as_tensor(items, dtype=torch.long).reshape(-1)
        if user_rows.numel() != items.numel():
            raise ValueError(f"user_rows and items must have the same length, got {user_rows.numel()} and {items.numel()}")
        if items.numel() and (int(items.min()) < 0 or int(items.max()) >= self.num_items):
            raise ValueError(f"items: positions must be in [0, {self.num_items}), got {int(items.min())}..{int(items.max())}")
        if user_rows.numel() and (int(user_rows.min()) < 0 or int(user_rows.max()) >= num_user_rows):
            raise ValueError(f"user_rows must be in [0, {num_user_rows}), got {int(user_rows.min())}..{int(user_rows.max())}")
        pairs = torch.unique(user_rows * self.num_items + items)
        user_rows, items = pairs // self.num_items, pairs % self.num_items
        interactions = torch.zeros(num_user_rows, self.num_items, dtype=torch.float64)
        interactions[user_rows, items] = 1.0
        self._fit_matrix(interactions.t() @ interactions)  # float64 co-occurrence counts X^T X
        counts = torch.bincount(user_rows, minlength=num_user_rows)
        self.history_offsets = torch.zeros(num_user_rows + 1, dtype=torch.long)
        torch.cumsum(counts, 0, out=self.history_offsets[1:])
        self.history_indices = items  # pairs are sorted by (user row, item)
        self._dense = None
        return self

    @abc.abstractmethod
    def _fit_matrix(self, gram: torch.Tensor) -> None:
        """Fit the item-item matrix from the float64 ``[N, N]`` co-occurrence counts ``X^T X``."""

    @abc.abstractmethod
    def similarity(self) -> torch.Tensor:
        """The dense float32 ``[N, N]`` item-item matrix (scores = history x this)."""

    @torch.no_grad()
    def score(self, users: Optional[Mapping] = None, rows: Sequence[int] = ()) -> torch.Tensor:
        """Scores ``[U, N, 1]`` of user rows ``rows`` against every item (the fusion member
        interface; ``users``, the feature table, is not used). Rows without a training history
        (cold users, rows appended at serving time) score 0 everywhere."""
        rows = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
        num_rows = self.history_offsets.numel() - 1
        known = (rows >= 0) & (rows < num_rows)
        safe = torch.where(known, rows, torch.zeros_like(rows))
        starts = torch.where(known, self.history_offsets[safe], torch.zeros_like(rows))
        ends = torch.where(known, self.history_offsets[(safe + 1).clamp_max(num_rows)], torch.zeros_like(rows))
        lengths = ends - starts
        # history of the requested rows as a dense 0/1 matrix [U, N], times the similarity [N, N]:
        # one dense GEMM (multi-threaded, ~5 ms for 64 users x 1,682 items) where torch's COO
        # sparse x dense product ran single-threaded at about 30x the time on ml100k
        row_index = torch.arange(rows.numel()).repeat_interleave(lengths)
        offsets = torch.zeros(rows.numel() + 1, dtype=torch.long)
        torch.cumsum(lengths, 0, out=offsets[1:])
        position = torch.arange(int(offsets[-1])) - offsets[:-1].repeat_interleave(lengths) + starts.repeat_interleave(lengths)
        columns = self.history_indices[position]
        history = torch.zeros(rows.numel(), self.num_items)
        history[row_index, columns] = 1.0
        return (history @ self.similarity()).unsqueeze(-1)

    @torch.no_grad()
    def score_pairs(self, users: Optional[Mapping], pair_users: torch.Tensor, pair_items: torch.Tensor) -> torch.Tensor:
        """Scores ``[P, 1]`` of the pairs ``(pair_users[i], pair_items[i])``."""
        pair_users = torch.as_tensor(pair_users, dtype=torch.long).reshape(-1)
        pair_items = torch.as_tensor(pair_items, dtype=torch.long).reshape(-1)
        unique, inverse = torch.unique(pair_users, return_inverse=True)
        return self.score(users, unique)[inverse, pair_items]


class ItemKNN(ItemItemCF):
    """Item-item cosine k-nearest-neighbour recommender on implicit (binary) feedback.

    ``sim(i, j) = |U_i ∩ U_j| / (sqrt(|U_i|) * sqrt(|U_j|) + shrink)`` over the users U_i who
    interacted with item i (``shrink`` damps pairs seen by few users; Koren's shrinkage), the
    diagonal removed, each row i kept to its ``neighbours`` largest entries; the score of user u for
    item n is ``sum_{i in history(u)} sim(i, n)`` (0 for users without history, e.g. cold users).

    Args:
        num_items: N (items are positions 0..N-1).
        neighbours: K, similarities kept per item (row); ``0`` keeps every item.
        shrink: the shrinkage term (>= 0).

    Fitted state (``state_dict``): ``neighbour_indices [N, K]`` int64 and ``neighbour_values [N, K]``
    float32 (the pruned similarity rows), ``history_offsets [R+1]`` / ``history_indices`` (the
    training items of each user row, CSR).

    Raises:
        ValueError: ``num_items < 1``, ``neighbours < 0`` or ``shrink < 0`` (constructor); item
            positions outside ``[0, N)`` or mismatched lengths (:meth:`fit`).
    """

    _fitted_buffers = ("neighbour_indices", "neighbour_values", "history_offsets", "history_indices")

    def __init__(self, num_items: int, neighbours: int = 20, shrink: float = 0.0) -> None:
        super().__init__(num_items)
        if int(neighbours) < 0:
            raise ValueError(f"neighbours must be >= 0 (0 = all), got {neighbours}")
        if float(shrink) < 0:
            raise ValueError(f"shrink must be >= 0, got {shrink}")
        self.neighbours = int(neighbours)
        self.shrink = float(shrink)
        width = self.num_items if self.neighbours == 0 else min(self.neighbours, self.num_items)
        self.register_buffer("neighbour_indices", torch.zeros(self.num_items, width, dtype=torch.long))
        self.register_buffer("neighbour_values", torch.zeros(self.num_items, width))

    @property
    def config(self) -> dict:
        return {"num_items": self.num_items, "neighbours": self.neighbours, "shrink": self.shrink}

    def _fit_matrix(self, gram: torch.Tensor) -> None:
        norms = gram.diagonal().sqrt()
        sim = gram / (norms[:, None] * norms[None, :] + self.shrink).clamp_min(1e-12)
        sim.fill_diagonal_(0.0)
        self.neighbour_values, self.neighbour_indices = torch.topk(sim.float(), self.neighbour_indices.shape[1], dim=1)

    def similarity(self) -> torch.Tensor:
        """The pruned similarity matrix ``[N, N]`` (dense, built once and cached)."""
        if self._dense is None:
            dense = torch.zeros(self.num_items, self.num_items)
            dense.scatter_(1, self.neighbour_indices, self.neighbour_values)
            self._dense = dense
        return self._dense


class EASE(ItemItemCF):
    """EASE^R (Steck, WWW 2019): an item-item linear autoencoder with a closed form.

    ``B = argmin ||X - X B||^2 + lambda ||B||^2`` subject to ``diag(B) = 0``, solved by
    ``P = (X^T X + lambda I)^-1``, ``B[i, j] = -P[i, j] / P[j, j]`` (``i != j``). One ``N x N``
    inverse (float64): fine for catalogues of a few thousand items.

    Args:
        num_items: N. l2: lambda (> 0), chosen on validation (100 on ml100k-mtl-v1).

    Fitted state: ``weight [N, N]`` float32 (B), the histories (see `ItemItemCF`).
    """

    _fitted_buffers = ("weight", "history_offsets", "history_indices")

    def __init__(self, num_items: int, l2: float = 100.0) -> None:
        super().__init__(num_items)
        if not float(l2) > 0:
            raise ValueError(f"l2 must be > 0, got {l2}")
        self.l2 = float(l2)
        self.register_buffer("weight", torch.zeros(self.num_items, self.num_items))

    @property
    def config(self) -> dict:
        return {"num_items": self.num_items, "l2": self.l2}

    def _fit_matrix(self, gram: torch.Tensor) -> None:
        inverse = torch.linalg.inv(gram + self.l2 * torch.eye(gram.shape[0], dtype=gram.dtype))
        weight = -inverse / inverse.diagonal()[None, :]
        weight.fill_diagonal_(0.0)
        self.weight = weight.float()

    def similarity(self) -> torch.Tensor:
        return self.weight
