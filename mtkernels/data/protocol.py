"""The `ml100k-mtl-v1` protocol (shared/data/PROTOCOL.md): cold users, per-user temporal split,
click/like/rating labels and 4 sampled negatives per positive, rebuilt exactly from the ratings.

The canonical split files (``protocol_v1/*.csv``) are the oracle: ``tests/test_data_ml100k.py``
rebuilds the four splits and compares them row for row (and by sha256 of the CSV text).
"""

from __future__ import annotations

from typing import Dict, Sequence

import numpy as np
import pandas as pd

PROTOCOL_NAME = "ml100k-mtl-v1"
SPLITS = ("train", "val", "test_warm", "test_cold")
COLD_FRACTION = 0.10
COLD_SEED = 42
VAL_FRACTION = 0.10
TEST_FRACTION = 0.10
NEGATIVES_PER_POSITIVE = 4
NEGATIVE_SEED = 2024
LIKE_THRESHOLD = 4
COLUMNS = ["user_id", "item_id", "timestamp", "click", "like", "rating"]


def cold_users(user_ids: Sequence[int]) -> np.ndarray:
    """PROTOCOL.md 2.1: ``sort(default_rng(42).permutation(users)[:floor(0.10 * U + 0.5)])``."""
    users = np.sort(np.unique(np.asarray(user_ids, dtype=np.int64)))
    n_cold = int(np.floor(COLD_FRACTION * len(users) + 0.5))
    return np.sort(np.random.default_rng(COLD_SEED).permutation(users)[:n_cold])


def assign_splits(ratings: pd.DataFrame) -> pd.DataFrame:
    """Sort ratings by (user, timestamp, item) and add ``split`` = index into `SPLITS`.

    Warm users: the last ``ceil(0.10 n)`` ratings go to test_warm, the ``ceil(0.10 n)`` before them
    to val, the rest to train. Every rating of a cold user goes to test_cold.
    """
    df = ratings.sort_values(["user_id", "timestamp", "item_id"], kind="mergesort").reset_index(drop=True)
    cold = np.isin(df["user_id"].to_numpy(), cold_users(df["user_id"].to_numpy()))
    per_user = df.groupby("user_id", sort=False)["user_id"]
    n = per_user.transform("size").to_numpy()
    position = df.groupby("user_id", sort=False).cumcount().to_numpy()
    # The protocol states ceil(0.10 * n) in floating point; keep that exact expression.
    n_test = np.ceil(TEST_FRACTION * n).astype(np.int64)
    n_val = np.ceil(VAL_FRACTION * n).astype(np.int64)
    split = np.where(position >= n - n_test, 2, np.where(position >= n - n_test - n_val, 1, 0))
    df["split"] = np.where(cold, 3, split)
    return df


def negative_pools(ratings: pd.DataFrame, catalogue: np.ndarray) -> Dict[int, np.ndarray]:
    """User -> catalogue items (ascending) the user rated nowhere in the full data set."""
    catalogue = np.sort(np.asarray(catalogue, dtype=np.int64))
    users = np.unique(ratings["user_id"].to_numpy())
    user_pos = np.searchsorted(users, ratings["user_id"].to_numpy())
    item_pos = np.searchsorted(catalogue, ratings["item_id"].to_numpy())
    rated = np.zeros((len(users), len(catalogue)), dtype=bool)
    rated[user_pos, item_pos] = True
    return {int(u): catalogue[~rated[i]] for i, u in enumerate(users)}


def build_splits(ratings: pd.DataFrame, catalogue: Sequence[int]) -> Dict[str, pd.DataFrame]:
    """Rebuild the four protocol splits from the ratings.

    Args:
        ratings: columns ``user_id, item_id, rating, timestamp`` (integers), one row per rating.
        catalogue: all item ids (ml-100k: 1..1682).

    Returns:
        ``{split: DataFrame}`` with `COLUMNS`, each positive row followed by its 4 negative rows;
        ``like`` and ``rating`` are float with NaN on negative rows (the CSVs write them empty).
    """
    missing = set(ratings["item_id"].unique()) - set(np.asarray(catalogue).tolist())
    if missing:
        raise ValueError(f"ratings: item ids not in the catalogue: {sorted(missing)[:5]}...")
    df = assign_splits(ratings)
    pools = negative_pools(df, np.asarray(catalogue))
    k = NEGATIVES_PER_POSITIVE
    out = {}
    for si, name in enumerate(SPLITS):
        part = df[df["split"].to_numpy() == si]
        users = part["user_id"].to_numpy()
        num_pos = len(part)
        rng = np.random.default_rng([NEGATIVE_SEED, si])
        # One draw per user, users ascending (the rows are sorted by user): the generator's
        # stream is consumed exactly in the order the protocol specifies.
        bounds = np.flatnonzero(np.r_[True, users[1:] != users[:-1], True]) if num_pos else np.zeros(1, np.int64)
        draws = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            pool = pools[int(users[a])]
            if len(pool) == 0:
                raise ValueError(f"user {users[a]} rated every catalogue item: no negative to sample")
            draws.append(pool[rng.integers(0, len(pool), size=k * (b - a))])
        negatives = np.concatenate(draws) if draws else np.zeros(0, np.int64)
        item = np.empty((num_pos, k + 1), dtype=np.int64)
        item[:, 0] = part["item_id"].to_numpy()
        item[:, 1:] = negatives.reshape(num_pos, k)
        rating = np.full((num_pos, k + 1), np.nan)
        rating[:, 0] = part["rating"].to_numpy()
        like = np.full((num_pos, k + 1), np.nan)
        like[:, 0] = (part["rating"].to_numpy() >= LIKE_THRESHOLD).astype(np.float64)
        click = np.zeros((num_pos, k + 1), dtype=np.int64)
        click[:, 0] = 1
        out[name] = pd.DataFrame(
            {
                "user_id": np.repeat(users, k + 1),
                "item_id": item.reshape(-1),
                "timestamp": np.repeat(part["timestamp"].to_numpy(), k + 1),
                "click": click.reshape(-1),
                "like": like.reshape(-1),
                "rating": rating.reshape(-1),
            }
        )
    return out


def to_csv_text(split: pd.DataFrame) -> str:
    """The split in the canonical CSV form (nullable integers: empty like/rating on negatives)."""
    frame = split.copy()
    frame["like"] = frame["like"].astype("Int64")
    frame["rating"] = frame["rating"].astype("Int64")
    return frame[COLUMNS].to_csv(index=False)
