"""Item-kNN rating estimates (baseline predictor + item-item neighbourhood) as a stacking feature.

Koren, "Factorization meets the neighborhood", KDD 2008, sections 2.1-2.2: the baseline
``b_ui = mu + b_u + b_i`` (biases fitted by alternating regularised means) plus a weighted average
of the user's residuals ``r_uj - b_uj`` on the ``k`` rated items j most similar to i, the similarity
a shrunk Pearson correlation of the residuals (``rho_ij * n_ij / (n_ij + shrinkage)``, negative ones
dropped). Used as a per-(user, item) dense feature of a neural model (stacking), the estimate of a
training rating must not see that rating: `item_knn_estimates` gives training positives K-fold
out-of-fold values and every other (user, item) pair the estimate from all training positives.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

NEIGHBOURS = 30
SHRINKAGE = 100.0
USER_REGULARISATION = 10.0
ITEM_REGULARISATION = 25.0
FOLDS = 5


class ItemKNN:
    """Baseline + item-item kNN rating model fitted on (user row, item row, rating) triples.

    Args:
        user_row, item_row: int64 ``[n]`` table rows (< ``num_user_rows`` / ``num_item_rows``).
        rating: float ``[n]`` observed ratings.
        num_user_rows, num_item_rows: sizes of the user and item tables.
        neighbours: k, the most similar rated items used per estimate.
        shrinkage: similarity shrinkage towards 0 for item pairs with few common raters.

    Raises:
        ValueError: no ratings, or arrays of different lengths.
    """

    def __init__(self, user_row: np.ndarray, item_row: np.ndarray, rating: np.ndarray, num_user_rows: int,
                 num_item_rows: int, neighbours: int = NEIGHBOURS, shrinkage: float = SHRINKAGE) -> None:
        user_row, item_row = np.asarray(user_row, np.int64), np.asarray(item_row, np.int64)
        rating = np.asarray(rating, np.float64)
        if not (len(user_row) == len(item_row) == len(rating)) or len(rating) == 0:
            raise ValueError(f"user_row, item_row, rating: need equal non-zero lengths, got "
                             f"{len(user_row)}, {len(item_row)}, {len(rating)}")
        self.neighbours = int(neighbours)
        self.mean = float(rating.mean())
        user_bias, item_bias = np.zeros(num_user_rows), np.zeros(num_item_rows)
        user_count = np.bincount(user_row, minlength=num_user_rows)
        item_count = np.bincount(item_row, minlength=num_item_rows)
        for _ in range(10):
            item_bias = np.bincount(item_row, rating - self.mean - user_bias[user_row], num_item_rows) / (item_count + ITEM_REGULARISATION)
            user_bias = np.bincount(user_row, rating - self.mean - item_bias[item_row], num_user_rows) / (user_count + USER_REGULARISATION)
        self.user_bias, self.item_bias = user_bias, item_bias
        self.residual = np.zeros((num_user_rows, num_item_rows))
        rated = np.zeros((num_user_rows, num_item_rows))
        self.residual[user_row, item_row] = rating - self.mean - user_bias[user_row] - item_bias[item_row]
        rated[user_row, item_row] = 1.0
        self.rated = rated.astype(bool)
        common = rated.T @ rated
        squares = (self.residual ** 2).T @ rated  # [i, j]: sum of r_ui^2 over users who rated i and j
        similarity = (self.residual.T @ self.residual) / (np.sqrt(squares * squares.T) + 1e-12)
        similarity *= common / (common + shrinkage)
        np.fill_diagonal(similarity, 0.0)
        self.similarity = np.maximum(similarity, 0.0)

    def baseline(self, user_row: np.ndarray, item_row: np.ndarray) -> np.ndarray:
        """``mu + b_u + b_i`` for the pairs, float64 ``[n]``."""
        return self.mean + self.user_bias[user_row] + self.item_bias[item_row]

    def estimate(self, user_row: np.ndarray, item_row: np.ndarray) -> np.ndarray:
        """Baseline + neighbourhood estimate of each pair's rating, float64 ``[n]``.

        A user without ratings (a cold user, the unknown row 0) gets ``mu + b_i``."""
        return self.baseline(user_row, item_row) + self.neighbourhood(user_row, item_row)

    def neighbourhood(self, user_row: np.ndarray, item_row: np.ndarray) -> np.ndarray:
        """The neighbourhood term alone (estimate - baseline), float64 ``[n]``, vectorised per user:
        the similarity-weighted mean of the user's residuals on the k most similar rated items
        (0 for users without ratings)."""
        user_row, item_row = np.asarray(user_row, np.int64), np.asarray(item_row, np.int64)
        out = np.zeros(len(user_row))
        order = np.argsort(user_row, kind="stable")
        users, starts = np.unique(user_row[order], return_index=True)
        bounds = np.append(starts, len(order))
        for user, start, end in zip(users, bounds[:-1], bounds[1:]):
            history = np.flatnonzero(self.rated[user])
            if history.size == 0:
                continue
            rows = order[start:end]
            weight = self.similarity[np.ix_(item_row[rows], history)]  # [r, h]
            residual = np.broadcast_to(self.residual[user, history], weight.shape)
            if history.size > self.neighbours:
                top = np.argpartition(-weight, self.neighbours, axis=1)[:, : self.neighbours]
                weight = np.take_along_axis(weight, top, 1)
                residual = np.take_along_axis(residual, top, 1)
            # +1 in the denominator: shrink towards the baseline when the neighbours are weak
            out[rows] += (weight * residual).sum(1) / (weight.sum(1) + 1.0)
        return out


def item_knn_estimates(user_row: np.ndarray, item_row: np.ndarray, rating: np.ndarray, num_user_rows: int,
                       num_item_rows: int, query_user: np.ndarray, query_item: np.ndarray, query_owner: np.ndarray,
                       folds: int = FOLDS, seed: int = 0, with_baseline: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """Out-of-fold values for the training rows and full-data values for every (user, item) pair.

    The training positives are split into K folds. A training row (a positive, or a sampled
    negative) takes the fold of its *owner*, the positive it belongs to, and is scored by the model
    fitted on the other folds: the owner's rating never enters the values of the owner or of its
    negatives, and a positive and its negatives are scored by the same model (with the full model
    for negatives, the feature would tell negatives from positives by how much data scored them).

    Args:
        user_row, item_row, rating: the training positives, ``[n]`` each.
        num_user_rows, num_item_rows: table sizes.
        query_user, query_item: int64 ``[q]``: the training rows to score.
        query_owner: int64 ``[q]``: index (into the positives) of each row's owner.
        folds: K of the K-fold split (>= 2); the fold of each positive drawn uniformly with
            ``numpy.random.default_rng(seed)``.
        with_baseline: True: baseline + neighbourhood (`ItemKNN.estimate`); False: the
            neighbourhood term alone (`ItemKNN.neighbourhood`).

    Returns:
        ``(table, values)``: float64 ``[num_user_rows, num_item_rows]`` from all training
        positives (for evaluation rows, resampled negatives and ranking, whose ratings are not in
        the training positives), and float64 ``[q]`` the out-of-fold values of the queries.

    Raises:
        ValueError: ``folds < 2``, query arrays of different lengths, an owner out of range, or
            bad rating arrays (see `ItemKNN`).
    """
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    user_row, item_row = np.asarray(user_row, np.int64), np.asarray(item_row, np.int64)
    rating = np.asarray(rating, np.float64)
    query_user, query_item = np.asarray(query_user, np.int64), np.asarray(query_item, np.int64)
    query_owner = np.asarray(query_owner, np.int64)
    if not len(query_user) == len(query_item) == len(query_owner):
        raise ValueError(f"query_user, query_item, query_owner: need equal lengths, got "
                         f"{len(query_user)}, {len(query_item)}, {len(query_owner)}")
    if len(query_owner) and (query_owner.min() < 0 or query_owner.max() >= len(rating)):
        raise ValueError(f"query_owner: must index the {len(rating)} positives, got {query_owner.min()}..{query_owner.max()}")
    fold = np.random.default_rng(seed).integers(0, folds, len(rating))
    query_fold = fold[query_owner]
    values = np.zeros(len(query_user))
    for k in range(folds):
        held, asked = fold == k, query_fold == k
        model = ItemKNN(user_row[~held], item_row[~held], rating[~held], num_user_rows, num_item_rows)
        score = model.estimate if with_baseline else model.neighbourhood
        values[asked] = score(query_user[asked], query_item[asked])
    full = ItemKNN(user_row, item_row, rating, num_user_rows, num_item_rows)
    all_users = np.repeat(np.arange(num_user_rows), num_item_rows)
    all_items = np.tile(np.arange(num_item_rows), num_user_rows)
    score = full.estimate if with_baseline else full.neighbourhood
    return score(all_users, all_items).reshape(num_user_rows, num_item_rows), values
