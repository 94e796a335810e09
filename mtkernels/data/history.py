"""Causal user-history bags: each row's user as the items they interacted with before that row.

The implicit-feedback set N(u) of SVD++ (Koren, "Factorization Meets the Neighborhood", KDD 2008)
and the mean-pooled watch history of the YouTube DNN (Covington et al., "Deep Neural Networks for
YouTube Recommendations", RecSys 2016), as a multi-valued user-side sparse feature pooled by the
model's `EmbeddingBagCollection` (mean pooling; its own table, or the item_id table through
`MultiTaskModel(shared_tables={"history": "item_id"})`).

Nothing of size rows x L is stored: each user's time-ordered item sequence is kept once (CSR over
user-table rows) together with one prefix length per split row; a batch's bags are slices of the
sequences, cut with vectorised ops (``repeat_interleave`` / ``arange``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch


@dataclass
class UserHistory:
    """Per-user item sequences and per-row prefix lengths of one data set.

    A row with user-table row ``u`` and prefix ``k`` has the bag
    ``items[offsets[u] + max(0, k - max_length) : offsets[u] + k]``: the last ``max_length`` of the
    user's first ``k`` sequence items (``k`` is clipped to the sequence length).

    Attributes:
        feature: name of the multi-valued user-side feature holding the bags (e.g. ``"history"``).
        offsets: int64 ``[R + 1]`` CSR offsets over user-table rows.
        items: int64 ``[nnz]`` item-table rows (1..num_items), each user's in time order.
        max_length: L >= 1, the longest bag (the most recent L items are kept).
        prefix: ``{split: int64 [n]}`` prefix length of every row of the split.
        user_prefix: ``{split: int64 [R]}`` prefix length per user when a split is ranked (top-k);
            the key ``None`` is the latest history (serving, `MultiTaskData.user_feature_rows`
            without a split).

    Raises:
        ValueError: malformed offsets, ``max_length < 1``, or prefixes of the wrong dtype.
    """

    feature: str
    offsets: torch.Tensor
    items: torch.Tensor
    max_length: int
    prefix: Dict[str, torch.Tensor]
    user_prefix: Dict[Optional[str], torch.Tensor]

    def __post_init__(self) -> None:
        if int(self.max_length) < 1:
            raise ValueError(f"max_length must be >= 1, got {self.max_length}")
        self.max_length = int(self.max_length)
        if self.offsets.dim() != 1 or self.offsets.numel() < 1 or int(self.offsets[0]) != 0 \
                or int(self.offsets[-1]) != self.items.numel() or bool((self.offsets.diff() < 0).any()):
            raise ValueError("offsets must be non-decreasing, start at 0 and end at len(items)")
        for name, table in list(self.prefix.items()) + list(self.user_prefix.items()):
            if table.dtype != torch.long or table.dim() != 1:
                raise ValueError(f"prefix of split {name!r} must be int64 [n], got {table.dtype} {tuple(table.shape)}")

    @property
    def num_user_rows(self) -> int:
        return self.offsets.numel() - 1

    def bags(self, user_rows: torch.Tensor, prefix: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The bags of B rows: ``(values int64 [nnz], lengths int64 [B])`` (item-table rows).

        Args:
            user_rows: int64 ``[B]`` user-table rows (rows < 0, e.g. new users, get empty bags).
            prefix: int64 ``[B]`` prefix lengths (clipped to each user's sequence length).
        """
        known = user_rows >= 0
        rows = user_rows.clamp(min=0)
        first = self.offsets[rows]
        size = self.offsets[rows + 1] - first
        end = torch.minimum(prefix, size) * known
        start = (end - self.max_length).clamp_(min=0)
        lengths = end - start
        total = int(lengths.sum()) if lengths.numel() else 0
        if total == 0:
            return self.items.new_empty(0), lengths
        shift = torch.repeat_interleave(first + start - (torch.cumsum(lengths, 0) - lengths), lengths, output_size=total)
        return self.items.index_select(0, torch.arange(total, dtype=torch.long).add_(shift)), lengths

    def split_bags(self, split: str, index: torch.Tensor, user_rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The bags of rows ``index`` (int64 ``[B]``) of ``split``, whose users are ``user_rows``."""
        return self.bags(user_rows, self.prefix[split][index])

    def user_bags(self, user_rows: torch.Tensor, split: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """One bag per user for ranking ``split`` (None or a split without its own entry: the
        latest history). Returns ``(values, lengths [U])``."""
        table = self.user_prefix.get(split, self.user_prefix[None])
        return self.bags(user_rows, table[user_rows.clamp(min=0)])


def causal_user_history(splits: Dict[str, Dict[str, torch.Tensor]], num_user_rows: int, max_length: int,
                        feature: str = "history") -> UserHistory:
    """Build the causal histories of a temporal split (ml100k-mtl-v1, PROTOCOL.md 2-4).

    Sequence of a user = their ``train`` positives, then their ``val`` positives, each in
    ``(timestamp, item)`` order (the temporal split puts every val rating after every train one).
    Users without train positives (cold users) have empty sequences. Prefixes:

    - ``train``: a positive sees the user's train positives strictly before it in ``(timestamp,
      item)`` order, never its own item or a later one; a sampled negative (click 0) copies the
      prefix of the positive it follows (PROTOCOL.md 3: each positive is followed by its
      negatives, which copy its user and timestamp), so positives and negatives get the same bag;
    - ``val``: the whole train history (val rows never see each other's items);
    - every other split (``test_warm``; cold splits, whose users have no sequence): train + val
      history, which PROTOCOL.md 4 allows as input (earlier interactions of a warm user; a cold
      user's test ratings are never used).

    Top-k prefixes (`UserHistory.user_prefix`): ``val`` ranks with the train history, every other
    split and serving (key None) with train + val.

    Args:
        splits: ``{split: {"user_row", "item_row", "timestamp", "positive"}}`` tensors ``[n]``
            (int64, bool for ``positive``); must hold ``train``.
        num_user_rows: R, rows of the user table.
        max_length: L, the longest bag (the most recent L items).
        feature: the feature name.

    Raises:
        ValueError: no ``train`` split, or a train negative that does not follow a positive of the
            same user and timestamp.
    """
    if "train" not in splits:
        raise ValueError(f"causal_user_history needs a 'train' split, got {list(splits)}")
    parts, counts = [], []
    for name in ("train", "val"):
        if name not in splits:
            counts.append(torch.zeros(num_user_rows, dtype=torch.long))
            continue
        s = splits[name]
        positive = s["positive"].bool()
        user, item, time = s["user_row"][positive], s["item_row"][positive], s["timestamp"][positive]
        # stable sorts, least significant key first: (user, timestamp, item)
        order = torch.argsort(item, stable=True)
        order = order[torch.argsort(time[order], stable=True)]
        order = order[torch.argsort(user[order], stable=True)]
        parts.append((user[order], item[order], order))
        counts.append(torch.bincount(user, minlength=num_user_rows))
    warm = counts[0] > 0
    counts[1] = counts[1] * warm
    lengths = counts[0] + counts[1]
    offsets = torch.zeros(num_user_rows + 1, dtype=torch.long)
    torch.cumsum(lengths, 0, out=offsets[1:])
    items = torch.zeros(int(offsets[-1]), dtype=torch.long)
    train_user, train_item, train_order = parts[0]
    train_start = offsets[:-1]
    rank = torch.arange(train_user.numel()) - (torch.cumsum(counts[0], 0) - counts[0])[train_user]
    items[train_start[train_user] + rank] = train_item
    if len(parts) > 1:
        val_user, val_item, _ = parts[1]
        keep = warm[val_user]
        val_user, val_item = val_user[keep], val_item[keep]
        val_rank = torch.arange(val_user.numel()) - (torch.cumsum(counts[1], 0) - counts[1])[val_user]
        items[train_start[val_user] + counts[0][val_user] + val_rank] = val_item

    prefix = {}
    train = splits["train"]
    positive = train["positive"].bool()
    positive_rows = torch.nonzero(positive).flatten()
    positive_prefix = torch.empty(positive_rows.numel(), dtype=torch.long)
    positive_prefix[train_order] = rank
    # row j belongs to the last positive at or before it
    owner = torch.cumsum(positive.long(), 0) - 1
    if owner.numel() and int(owner.min()) < 0:
        raise ValueError("causal_user_history: the train split must start with a positive row")
    owner_rows = positive_rows[owner]
    if not (torch.equal(train["user_row"][owner_rows], train["user_row"])
            and torch.equal(train["timestamp"][owner_rows], train["timestamp"])):
        raise ValueError("causal_user_history: every train negative must follow a positive of the same user and timestamp")
    prefix["train"] = positive_prefix[owner]
    for name, s in splits.items():
        if name == "train":
            continue
        table = counts[0] if name == "val" else lengths
        prefix[name] = table[s["user_row"]].clone()
    user_prefix = {"val": counts[0].clone(), None: lengths.clone()}
    return UserHistory(feature, offsets, items, max_length, prefix, user_prefix)
