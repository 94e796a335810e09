"""Id dropout: train the unknown (out-of-vocabulary) id row on purpose, for cold start.

A user (or item) never seen in training is encoded with the unknown id 0 and, on MovieLens, the
standardised mean (0) of its history statistics. Left alone, row 0 of the ``user_id`` table is never
trained, so a cold user is scored through a random vector. Id dropout replaces, with probability
``p`` per training row, the id of the row's user (item) by 0 and, optionally, its user-side
(item-side) dense history features by 0, so row 0 learns "a user known only by side features" and
the shared parts learn to score such users from age, gender, occupation, zip, etc.

The idea is the feature-level dropout of DropoutNet (Volkovs et al., "DropoutNet: Addressing Cold
Start in Recommender Systems", NeurIPS 2017), which drops a user's preference input during training
so that the model falls back on content features; here the "preference input" is the id embedding
plus the history statistics.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..jagged import KeyedJaggedTensor


def drop_ids(batch, data, probability: float, features: Sequence[str] = ("user_id",), dense: bool = True,
             generator: Optional[torch.Generator] = None):
    """A copy of ``batch`` where, per side, a random ``probability`` share of the rows lose their ids.

    Args:
        batch: a `mtkernels.data.Batch` of B rows (``sparse`` KJT, ``dense [B, dense_dim]``).
        data: the `MultiTaskData` the batch came from (feature sides, dense column layout).
        probability: chance in ``[0, 1]`` that a row's ids of one side are dropped.
        features: single-valued id features to drop (set to the unknown id 0). Features of the same
            side (user or item) are dropped together, on the same rows; each side draws its own rows.
        dense: also set the dropped side's dense columns (user-side: the first
            ``data.user_dense_dim``; item-side: the next ``data.item_dense_dim``) to 0, the value a
            user or item without training history gets.
        generator: torch generator of the draws (None: the global one).

    Returns:
        a new `Batch` (the input is left unchanged); ``batch`` itself when ``probability`` is 0.

    Raises:
        ValueError: probability outside [0, 1]; a feature the batch lacks, or a multi-valued one.
    """
    if not 0.0 <= float(probability) <= 1.0:
        raise ValueError(f"probability must be in [0, 1], got {probability}")
    if probability == 0.0 or not features:
        return batch
    kjt = batch.sparse
    keys = kjt.keys()
    size = batch.dense.shape[0]
    specs = {f.name: f for f in data.features}
    by_side = {}
    for name in features:
        if name not in keys or name not in specs:
            raise ValueError(f"id dropout feature {name!r} is not a feature of the batch; features: {keys}")
        if specs[name].multi_valued:
            raise ValueError(f"id dropout feature {name!r} is multi-valued; only single-valued id features can be dropped")
        by_side.setdefault(specs[name].side, []).append(name)
    values = kjt.values().clone()
    offsets = kjt.offsets()
    dense_out = batch.dense
    user_dim = int(getattr(data, "user_dense_dim", 0))
    item_dim = int(getattr(data, "item_dense_dim", 0))
    for side, names in by_side.items():
        dropped = torch.rand(size, generator=generator) < probability
        rows = dropped.nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        for name in names:
            start = int(offsets[keys.index(name) * size])
            values[start + rows] = 0
        if dense:
            columns = {"user": (0, user_dim), "item": (user_dim, user_dim + item_dim)}.get(side, (0, 0))
            if columns[1] > columns[0]:
                if dense_out is batch.dense:
                    dense_out = batch.dense.clone()
                dense_out[rows, columns[0]:columns[1]] = 0.0
    sparse = KeyedJaggedTensor(keys, values, lengths=kjt.lengths(), offsets=offsets, weights=kjt.weights_or_none())
    return type(batch)(sparse, dense_out, batch.labels, batch.index)
