"""Collaborative-filtering members for score fusion: `ItemKNN`, `EASE` and `SequentialRules`,
three item-item models.

All score user u for item n as ``sum_{i in history(u)} h_u(i) B[i, n]`` over an item-item matrix B
learned from the training positives; they differ in B and in the history weights h_u (1 for
`ItemKNN` and `EASE`; decaying with recency for `SequentialRules`).

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

`SequentialRules`: the "sequential rules" of session-based recommendation (Ludewig and Jannach,
"Evaluation of Session-based Recommendation Algorithms", UMUAI 2018; Kamehkhosh, Jannach and
Ludewig 2017): B[i, j] counts j following i in a user's time-ordered history within ``window``
steps, weighted 1/steps, and the user's history is weighted by recency (half-life in ratings).
"""

from __future__ import annotations

import abc
from typing import Mapping, Optional, Sequence, Tuple

import torch
from torch import nn


class ItemItemCF(nn.Module, abc.ABC):
    """Base of the item-item models: the users' training histories (CSR buffers
    ``history_offsets [R+1]``, ``history_indices``, each row's items oldest first) and scoring
    ``history @ B``. Subclasses set the item-item matrix in :meth:`_fit_matrix` (from the
    co-occurrence counts, or from the ordered histories) and return it densely from
    :meth:`similarity`; :meth:`history_weights` weights a row's items (1 here).

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
    def fit(self, user_rows: torch.Tensor, items: torch.Tensor, num_user_rows: int,
            order: Optional[torch.Tensor] = None) -> "ItemItemCF":
        """Fit on positive (user row, item position) pairs, e.g. the training split's clicks.

        Each row's history is kept oldest first: by ``order`` (e.g. timestamps, ``[P]``, ties in
        the given order), or in the given order when ``order`` is None. Duplicate pairs count once
        (at their last occurrence). User rows in ``[0, num_user_rows)``; a row with no pair has an
        empty history (scores 0).

        Raises:
            ValueError: different lengths, item positions outside ``[0, N)`` or rows outside
                ``[0, num_user_rows)``.
        """
        user_rows = torch.as_tensor(user_rows, dtype=torch.long).reshape(-1)
        items = torch.as_tensor(items, dtype=torch.long).reshape(-1)
        if user_rows.numel() != items.numel():
            raise ValueError(f"user_rows and items must have the same length, got {user_rows.numel()} and {items.numel()}")
        if order is not None:
            order = torch.as_tensor(order).reshape(-1)
            if order.numel() != items.numel():
                raise ValueError(f"order must have one value per pair ({items.numel()}), got {order.numel()}")
        if items.numel() and (int(items.min()) < 0 or int(items.max()) >= self.num_items):
            raise ValueError(f"items: positions must be in [0, {self.num_items}), got {int(items.min())}..{int(items.max())}")
        if user_rows.numel() and (int(user_rows.min()) < 0 or int(user_rows.max()) >= num_user_rows):
            raise ValueError(f"user_rows must be in [0, {num_user_rows}), got {int(user_rows.min())}..{int(user_rows.max())}")
        # oldest first within each row: stable sorts by order, then by row
        sequence = torch.arange(items.numel())
        if order is not None:
            sequence = torch.sort(order, stable=True).indices
        sequence = sequence[torch.sort(user_rows[sequence], stable=True).indices]
        user_rows, items = user_rows[sequence], items[sequence]
        # a duplicate (row, item) pair is kept at its last occurrence
        key = user_rows * self.num_items + items
        last = torch.full((int(key.max()) + 1 if key.numel() else 0,), -1, dtype=torch.long)
        last.scatter_reduce_(0, key, torch.arange(key.numel()), reduce="amax")
        keep = last[key] == torch.arange(key.numel())
        user_rows, items = user_rows[keep], items[keep]
        counts = torch.bincount(user_rows, minlength=num_user_rows)
        self.history_offsets = torch.zeros(num_user_rows + 1, dtype=torch.long)
        torch.cumsum(counts, 0, out=self.history_offsets[1:])
        self.history_indices = items
        interactions = torch.zeros(num_user_rows, self.num_items, dtype=torch.float64)
        interactions[user_rows, items] = 1.0
        self._fit_matrix(interactions.t() @ interactions)  # float64 co-occurrence counts X^T X
        self._dense = None
        return self

    @abc.abstractmethod
    def _fit_matrix(self, gram: torch.Tensor) -> None:
        """Fit the item-item matrix from the float64 ``[N, N]`` co-occurrence counts ``X^T X``
        (the ordered histories are already in ``history_offsets`` / ``history_indices``)."""

    def history_weights(self, steps_back: torch.Tensor) -> torch.Tensor:
        """Weight of a history item ``steps_back`` items before the row's most recent one
        (0 = the most recent), float32 like ``steps_back``: 1 (every item counts the same)."""
        return torch.ones(steps_back.shape)

    @abc.abstractmethod
    def similarity(self) -> torch.Tensor:
        """The dense float32 ``[N, N]`` item-item matrix (scores = history x this)."""

    @torch.no_grad()
    def score(self, users: Optional[Mapping] = None, rows: Sequence[int] = (),
              skip_recent: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Scores ``[U, N, 1]`` of user rows ``rows`` against every item (the fusion member
        interface; ``users``, the feature table, is not used). Rows without a training history
        (cold users, rows appended at serving time) score 0 everywhere.

        ``skip_recent`` (int ``[U]``, >= 0): score each row from its history without its last
        ``skip_recent[u]`` items, as if the history had ended that many ratings earlier (the
        gap-matched validation of `mtkernels.fusion.ScoreFusion.fit_weights`); B is unchanged.

        Raises:
            ValueError: ``skip_recent`` of the wrong length or negative.
        """
        rows = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
        num_rows = self.history_offsets.numel() - 1
        known = (rows >= 0) & (rows < num_rows)
        safe = torch.where(known, rows, torch.zeros_like(rows))
        starts = torch.where(known, self.history_offsets[safe], torch.zeros_like(rows))
        ends = torch.where(known, self.history_offsets[(safe + 1).clamp_max(num_rows)], torch.zeros_like(rows))
        if skip_recent is not None:
            skip_recent = torch.as_tensor(skip_recent, dtype=torch.long).reshape(-1)
            if skip_recent.numel() != rows.numel() or bool((skip_recent < 0).any()):
                raise ValueError(f"skip_recent must hold {rows.numel()} counts >= 0 (one per row), got "
                                 f"{skip_recent.tolist() if skip_recent.numel() < 10 else skip_recent.shape}")
            ends = torch.maximum(ends - skip_recent, starts)
        lengths = ends - starts
        # history of the requested rows as a dense 0/1 matrix [U, N], times the similarity [N, N]:
        # one dense GEMM (multi-threaded, ~5 ms for 64 users x 1,682 items) where torch's COO
        # sparse x dense product ran single-threaded at about 30x the time on ml100k
        row_index = torch.arange(rows.numel()).repeat_interleave(lengths)
        offsets = torch.zeros(rows.numel() + 1, dtype=torch.long)
        torch.cumsum(lengths, 0, out=offsets[1:])
        position = torch.arange(int(offsets[-1])) - offsets[:-1].repeat_interleave(lengths) + starts.repeat_interleave(lengths)
        columns = self.history_indices[position]
        steps_back = (ends.repeat_interleave(lengths) - 1 - position).float()
        history = torch.zeros(rows.numel(), self.num_items)
        history[row_index, columns] = self.history_weights(steps_back)
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


class SequentialRules(ItemItemCF):
    """Sequential rules (SR; Ludewig and Jannach, UMUAI 2018): which items users rate soon AFTER
    an item, scored from a recency-weighted history. Complements the order-free `EASE` /
    `ItemKNN` on a temporal split, where a user's next items follow their latest ones.

    From each user row's training history in time order ``i_1, i_2, ...``:
    ``C[a, b] = sum over pairs (i_p = a, i_{p+d} = b), 1 <= d <= window, of 1/d``;
    ``B[a, b] = C[a, b] / sum_b C[a, b]`` (rows normalised; an item never followed has a zero row).
    The score of user u for item n is ``sum_k 0.5^(k / half_life) * B[h_k, n]`` over the user's
    history ``h_0`` (most recent), ``h_1``, ... (0 for users without history, e.g. cold users).

    Args:
        num_items: N. window: steps d counted (>= 1; 200 on ml100k-mtl-v1). half_life: in
            ratings (> 0; 3 on ml100k-mtl-v1); both chosen on the gap-matched val split (README,
            Fusion).

    Fitted state: ``weight [N, N]`` float32 (B), the ordered histories (see `ItemItemCF`).

    Raises:
        ValueError: ``num_items < 1``, ``window < 1`` or ``half_life <= 0`` (constructor); see
            :meth:`ItemItemCF.fit`.
    """

    _fitted_buffers = ("weight", "history_offsets", "history_indices")

    def __init__(self, num_items: int, window: int = 200, half_life: float = 3.0) -> None:
        super().__init__(num_items)
        if int(window) < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if not float(half_life) > 0:
            raise ValueError(f"half_life must be > 0 (ratings), got {half_life}")
        self.window = int(window)
        self.half_life = float(half_life)
        self.register_buffer("weight", torch.zeros(self.num_items, self.num_items))

    @property
    def config(self) -> dict:
        return {"num_items": self.num_items, "window": self.window, "half_life": self.half_life}

    def _fit_matrix(self, gram: torch.Tensor) -> None:
        rows = torch.repeat_interleave(torch.arange(self.history_offsets.numel() - 1),
                                       self.history_offsets[1:] - self.history_offsets[:-1])
        items = self.history_indices
        counts = torch.zeros(self.num_items * self.num_items, dtype=torch.float64)
        for d in range(1, min(self.window, max(items.numel() - 1, 0)) + 1):
            same = rows[:-d] == rows[d:]  # i_p and i_{p+d} of the same user
            counts.index_add_(0, items[:-d][same] * self.num_items + items[d:][same],
                              torch.full((int(same.sum()),), 1.0 / d, dtype=torch.float64))
        counts = counts.view(self.num_items, self.num_items)
        self.weight = (counts / counts.sum(1, keepdim=True).clamp_min(1e-12)).float()

    def history_weights(self, steps_back: torch.Tensor) -> torch.Tensor:
        """``0.5 ** (steps_back / half_life)``."""
        return torch.pow(0.5, steps_back / self.half_life)

    def similarity(self) -> torch.Tensor:
        return self.weight
