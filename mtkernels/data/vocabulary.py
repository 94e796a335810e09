"""Categorical encoding: values -> ids 1..V with 0 for unknown (out-of-vocabulary) values.

The vocabulary is built from training data only, so a value first seen in validation or test (a cold
user, a new category) maps to the unknown id 0, whose embedding row the model learns as the "unknown"
representation (as TorchRec/FBGEMM set-ups do with a reserved OOV row).
"""

from __future__ import annotations

from typing import Iterable, List, Sequence

import numpy as np
import pandas as pd


class Vocabulary:
    """Sorted distinct values -> ids 1..V; anything else -> 0.

    Args:
        values: the training values (duplicates and missing values ignored).
        min_count: values seen fewer times than this stay unknown (0).
    """

    def __init__(self, values: Iterable, min_count: int = 1) -> None:
        series = pd.Series(list(values) if not isinstance(values, (pd.Series, np.ndarray)) else values)
        series = series[series.notna()]
        counts = series.value_counts()
        kept = counts[counts >= min_count].index
        self.categories: List = sorted(kept.tolist())
        self._index = pd.Index(self.categories)

    @property
    def num_embeddings(self) -> int:
        """V + 1 (the unknown id 0 included)."""
        return len(self.categories) + 1

    def encode(self, values: Sequence) -> np.ndarray:
        """int64 ids for ``values``: 1..V for known values, 0 for unknown or missing ones."""
        # Factorise first, then look up only the distinct values: fast on millions of strings.
        codes, uniques = pd.factorize(pd.Series(values), use_na_sentinel=True)
        table = np.append(self._index.get_indexer(pd.Index(uniques)) + 1, 0).astype(np.int64)
        return table[codes]  # code -1 (missing) reads the trailing 0

    def row_keys(self) -> list:
        """The value of every id, id 0 (unknown) first as None: ``[None, *categories]``."""
        return [None] + list(self.categories)

    def decode(self, ids: Sequence[int]) -> list:
        """Values for ids (None for 0)."""
        return [None if int(i) == 0 else self.categories[int(i) - 1] for i in ids]

    def __len__(self) -> int:
        return len(self.categories)

    def __repr__(self) -> str:
        return f"Vocabulary({len(self.categories)} values)"


def encode_multi(lists: Sequence[Sequence], vocab: Vocabulary) -> tuple:
    """Encode a column of value lists into CSR: ``(values int64 [nnz], offsets int64 [n+1])``.

    An empty list stays an empty bag (pooled to zeros by ``embedding_bags``).
    """
    lengths = np.fromiter((len(x) for x in lists), dtype=np.int64, count=len(lists))
    flat = [v for x in lists for v in x]
    values = vocab.encode(flat) if flat else np.zeros(0, dtype=np.int64)
    offsets = np.zeros(len(lists) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return values, offsets
