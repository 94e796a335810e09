"""`MultiTaskData`: encoded splits of a multi-task data set, batches, and user x item pair batches.

Every row of a split is (user row, item row, per-row context features, labels). User-side and
item-side features live once in a user table and an item table (row 0 of each = unknown) and are
gathered into per-row tensors when the data set is built, so a batch is a handful of index gathers
(no per-row Python). Ranking crosses user rows with item positions the same way (``pair_batch``).

The batch layout is TorchRec's: a ``KeyedJaggedTensor`` with one key per sparse feature,
feature-major, plus a dense float matrix (cf. TorchRec ``torchrec.datasets.utils.Batch``:
``dense_features``, ``sparse_features``, ``labels``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch

from ..jagged import KeyedJaggedTensor
from .history import UserHistory
from .types import Batch, FeatureSpec, Jagged, Split, TaskSpec, TopKEval, UserRows

SPLIT_NAMES_ML100K = ("train", "val", "test_warm", "test_cold")


def _long(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, dtype=np.int64) if not isinstance(x, torch.Tensor) else x, dtype=torch.long)


def gather_jagged(values: torch.Tensor, offsets: torch.Tensor, index: torch.Tensor):
    """Bags ``index`` of a CSR jagged tensor: returns ``(values [nnz'], lengths [len(index)])``.

    Vectorised: each output position p of bag b reads ``values[p + starts[b] - out_starts[b]]``.
    """
    starts = offsets[index]
    lengths = offsets[index + 1] - starts
    total = int(lengths.sum()) if lengths.numel() else 0
    if total == 0:
        return values.new_empty(0), lengths
    out_starts = torch.cumsum(lengths, 0) - lengths
    shift = torch.repeat_interleave(starts - out_starts, lengths, output_size=total)
    return values.index_select(0, torch.arange(total, dtype=torch.long).add_(shift)), lengths


def _take_columns(single: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``single[:, index]`` for a feature-major ``[F, n]`` matrix, one contiguous row at a time
    (index_select along dim 1 is several times slower on CPU)."""
    if single.shape[0] == 0:
        return single.new_zeros(0, index.numel())
    return torch.stack([row.index_select(0, index) for row in single])


def lengths_to_offsets(lengths: torch.Tensor) -> torch.Tensor:
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.long)
    torch.cumsum(lengths, 0, out=offsets[1:])
    return offsets


@dataclass
class EntityTable:
    """Features of users or items, one row per entity; row 0 is the unknown entity.

    Attributes:
        sparse: ``{feature: int64 [R]}`` single-valued features of this side.
        multi: ``{feature: (values, offsets [R+1])}`` multi-valued features of this side.
        dense: float32 ``[R, d]`` dense features of this side.
    """

    sparse: Dict[str, torch.Tensor]
    multi: Dict[str, Jagged]
    dense: torch.Tensor

    @property
    def num_rows(self) -> int:
        return self.dense.shape[0]

    @staticmethod
    def empty() -> "EntityTable":
        return EntityTable({}, {}, torch.zeros(1, 0))


@dataclass
class SplitRows:
    """What a loader supplies for one split before encoding into a `Split` (n rows).

    Attributes:
        user_row: int64 ``[n]`` user-table rows (0 = unknown user / no users).
        item_row: int64 ``[n]`` item-table rows (= item index, 0 = unknown / no items).
        labels: float32 ``[n, T]`` (NaN = no label).
        context_sparse / context_multi / context_dense: per-row context features.
        extra: per-row columns kept for reporting (not model input).
    """

    user_row: torch.Tensor
    item_row: torch.Tensor
    labels: torch.Tensor
    context_sparse: Dict[str, torch.Tensor] = field(default_factory=dict)
    context_multi: Dict[str, Jagged] = field(default_factory=dict)
    context_dense: Optional[torch.Tensor] = None
    extra: Dict[str, torch.Tensor] = field(default_factory=dict)


class MultiTaskData:
    """An encoded multi-task data set: tasks, sparse/dense features, splits, ranking helpers.

    Built by the loaders (`load_ml100k_mtl_v1`, `load_census_income`, `load_interactions`); models
    read ``tasks``, ``features`` and ``dense_dim`` to size themselves and iterate ``batches``.

    Attributes:
        name: data set / protocol name, e.g. ``"ml100k-mtl-v1"``.
        tasks: ``list[TaskSpec]``; column t of every ``labels`` matrix is task t.
        features: ``list[FeatureSpec]``; the keys of every batch's ``KeyedJaggedTensor``, in order.
        dense_names: names of the dense columns (user-side, then item-side, then context).
        splits: ``{split name: Split}``.
        num_items, item_ids, user_ids, item_titles: the catalogue (see the properties).
    """

    def __init__(
        self,
        *,
        name: str,
        tasks: Sequence[TaskSpec],
        features: Sequence[FeatureSpec],
        split_rows: Dict[str, SplitRows],
        users: Optional[EntityTable] = None,
        items: Optional[EntityTable] = None,
        user_dense_names: Sequence[str] = (),
        item_dense_names: Sequence[str] = (),
        context_dense_names: Sequence[str] = (),
        user_ids=None,
        item_ids=None,
        item_titles: Optional[List[str]] = None,
        user_side_frame: Optional[pd.DataFrame] = None,
        topk_sets: Optional[Dict[str, TopKEval]] = None,
        user_id_feature: Optional[str] = "user_id",
        info: Optional[dict] = None,
        negative_pools: Optional[Jagged] = None,
        user_encoder=None,
        user_side_columns: Sequence[str] = (),
        vocabularies: Optional[Dict[str, list]] = None,
        pair_dense: Optional[torch.Tensor] = None,
        history: Optional[UserHistory] = None,
    ) -> None:
        self.name = name
        self.tasks = list(tasks)
        self.features = list(features)
        self._users = users if users is not None else EntityTable.empty()
        self._items = items if items is not None else EntityTable.empty()
        self._user_dense_names = list(user_dense_names)
        self._item_dense_names = list(item_dense_names)
        self._context_dense_names = list(context_dense_names)
        self.dense_names = self._user_dense_names + self._item_dense_names + self._context_dense_names
        self._user_ids = user_ids
        self._item_ids = item_ids
        self._item_titles = item_titles
        self._user_side_frame = user_side_frame
        self._topk = dict(topk_sets or {})
        self._user_id_feature = user_id_feature
        self.info = dict(info or {})
        names = [f.name for f in self.features]
        if len(set(names)) != len(names):
            raise ValueError(f"feature names must be unique, got {names}")
        self._single = [f for f in self.features if not f.multi_valued]
        self._single_col = {f.name: j for j, f in enumerate(self._single)}
        self._split_single: Dict[str, torch.Tensor] = {}
        # (offsets [user rows + 1], item rows): the items each user may get as a sampled negative.
        self._negative_pools = negative_pools
        # the task whose label 0 marks a sampled negative: the first one, by name, so that a copy with
        # other or reordered tasks (`mtkernels.transfer.select_tasks`) still finds the negatives
        self._negative_task = self.tasks[0].name if self.tasks else None
        # raw side-feature records -> {user feature: int64 ids}, for users the data set never saw
        self._user_encoder = user_encoder
        self._user_side_columns = tuple(user_side_columns)  # the raw names user_encoder reads
        self._vocabularies = dict(vocabularies or {})
        # float32 [user rows, item rows, context dense]: the context dense columns of any (user, item)
        # pair, for pair_batch and resampled negatives (None: context dense is 0 there)
        if pair_dense is not None and (pair_dense.dim() != 3 or pair_dense.shape[2] != len(self._context_dense_names)):
            raise ValueError(f"pair_dense: expected [user rows, item rows, {len(self._context_dense_names)}], "
                             f"got {tuple(pair_dense.shape)}")
        self._pair_dense = pair_dense
        self._split_rows = dict(split_rows)
        # causal user-history bags (`mtkernels.data.history`): cut per batch, never stored per row
        self._history = history
        if history is not None:
            spec = next((f for f in self.features if f.name == history.feature), None)
            if spec is None or not spec.multi_valued or spec.side != "user":
                raise ValueError(f"history: feature {history.feature!r} must be a multi-valued user-side feature")
            if history.num_user_rows != self._users.num_rows:
                raise ValueError(f"history: {history.num_user_rows} user rows, the user table has {self._users.num_rows}")
            for name, rows in self._split_rows.items():
                if name not in history.prefix or history.prefix[name].numel() != rows.labels.shape[0]:
                    raise ValueError(f"history: split {name!r} needs a prefix of {rows.labels.shape[0]} rows")
        self.splits: Dict[str, Split] = {name_: self._assemble(name_, rows) for name_, rows in split_rows.items()}

    # --- building ---------------------------------------------------------------------------
    def _side_table(self, side: str) -> EntityTable:
        return self._users if side == "user" else self._items

    def _assemble(self, split_name: str, rows: SplitRows) -> Split:
        n = rows.labels.shape[0]
        user_row, item_row = rows.user_row.long(), rows.item_row.long()
        single = torch.zeros(len(self._single), n, dtype=torch.long)  # feature-major, rows contiguous
        multi: Dict[str, Jagged] = {}
        for f in self.features:
            if f.side == "context":
                if f.multi_valued:
                    multi[f.name] = rows.context_multi[f.name]
                else:
                    single[self._single_col[f.name]] = rows.context_sparse[f.name]
                continue
            if self._history is not None and f.name == self._history.feature:
                continue  # cut per batch (`_rows_batch`)
            table = self._side_table(f.side)
            row = user_row if f.side == "user" else item_row
            if f.multi_valued:
                values, lengths = gather_jagged(*table.multi[f.name], row)
                multi[f.name] = (values, lengths_to_offsets(lengths))
            else:
                single[self._single_col[f.name]] = table.sparse[f.name][row]
        dense_parts = [self._users.dense[user_row], self._items.dense[item_row]]
        if rows.context_dense is not None:
            dense_parts.append(rows.context_dense.float())
        dense = torch.cat(dense_parts, dim=1).contiguous() if dense_parts else torch.zeros(n, 0)
        if dense.shape[1] != self.dense_dim:
            raise ValueError(f"split {split_name!r}: {dense.shape[1]} dense columns, expected {self.dense_dim}")
        self._split_single[split_name] = single
        sparse = {f.name: single[self._single_col[f.name]] for f in self._single}
        user = sparse.get(self._user_id_feature, torch.zeros(n, dtype=torch.long)) if self._user_id_feature else torch.zeros(n, dtype=torch.long)
        return Split(
            num_rows=n,
            sparse=sparse,
            multi=multi,
            dense=dense,
            labels=rows.labels.float(),
            user=user,
            item=item_row,
            user_row=user_row,
            extra=dict(rows.extra),
        )

    # --- shapes -----------------------------------------------------------------------------
    @property
    def dense_dim(self) -> int:
        """Number of dense float features per row (may be 0)."""
        return len(self.dense_names)

    @property
    def user_dense_dim(self) -> int:
        """Number of user-side dense columns (the first columns of every ``dense`` matrix)."""
        return len(self._user_dense_names)

    @property
    def item_dense_dim(self) -> int:
        """Number of item-side dense columns (right after the user-side ones)."""
        return len(self._item_dense_names)

    @property
    def has_pair_dense(self) -> bool:
        """True when the context dense columns depend on the (user, item) pair (e.g. ML-100K's
        ``rating_estimate``); ``pair_batch`` then fills them in, other consumers must too."""
        return self._pair_dense is not None

    @property
    def history_feature(self) -> Optional[str]:
        """The causal user-history feature (`mtkernels.data.history`), or None. Its bags depend on
        the split: rank a split's users with ``user_feature_rows(split=...)`` /
        ``pair_batch(..., split=...)``."""
        return None if self._history is None else self._history.feature

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def feature(self, name: str) -> FeatureSpec:
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(f"no feature {name!r}; features: {[f.name for f in self.features]}")

    # --- batches ----------------------------------------------------------------------------
    def _split(self, split: str) -> Split:
        if split not in self.splits:
            raise KeyError(f"no split {split!r}; splits: {list(self.splits)}")
        return self.splits[split]

    def _make_kjt(self, single: Dict[str, torch.Tensor], multi: Dict[str, tuple], batch: int) -> KeyedJaggedTensor:
        if not self.features:
            return KeyedJaggedTensor([], torch.zeros(0, dtype=torch.long), lengths=torch.zeros(0, dtype=torch.long))
        values, lengths = [], []
        ones = torch.ones(batch, dtype=torch.long)
        for f in self.features:
            if f.multi_valued:
                v, l = multi[f.name]
                values.append(v)
                lengths.append(l)
            else:
                values.append(single[f.name])
                lengths.append(ones)
        return KeyedJaggedTensor([f.name for f in self.features], torch.cat(values), lengths=torch.cat(lengths))

    def _rows_batch(self, split: str, single: torch.Tensor, multi: Dict[str, Jagged], dense, labels, start: int, end: int,
                    index) -> Batch:
        """Rows start..end of feature-major ``single [F1, n]``, CSR ``multi``, ``dense`` and ``labels``;
        ``index`` = their row numbers in ``split`` (for the history bags)."""
        columns = {f.name: single[self._single_col[f.name], start:end] for f in self._single}
        jagged = {}
        for name, (values, offsets) in multi.items():
            bounds = offsets[start : end + 1]
            jagged[name] = (values[int(bounds[0]) : int(bounds[-1])], bounds[1:] - bounds[:-1])
        if self._history is not None:
            jagged[self._history.feature] = self._history.split_bags(split, index, self.splits[split].user_row[index])
        return Batch(self._make_kjt(columns, jagged, end - start), dense[start:end], labels[start:end], index)

    def batch(self, split: str, index: torch.Tensor) -> Batch:
        """The rows ``index`` (int64 ``[B]``) of ``split`` as a `Batch`."""
        s = self._split(split)
        index = _long(index).reshape(-1)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= s.num_rows):
            raise IndexError(f"index: rows must be in [0, {s.num_rows}) for split {split!r}")
        multi = {}
        for name, (v, o) in s.multi.items():
            values, lengths = gather_jagged(v, o, index)
            multi[name] = (values, lengths_to_offsets(lengths))
        single = _take_columns(self._split_single[split], index)
        return self._rows_batch(split, single, multi, s.dense[index], s.labels[index], 0, index.numel(), index)

    def batches(
        self, split: str, batch_size: int, shuffle: bool = False, seed: Optional[int] = None, drop_last: bool = False
    ) -> Iterator[Batch]:
        """Iterate over ``split`` in batches of ``batch_size`` rows (the last one may be smaller).

        A shuffled pass gathers the whole split once in the new order, so that each batch is then
        a set of contiguous slices (no per-batch random gathers; no per-row Python).

        Args:
            split: a key of ``splits``.
            batch_size: rows per batch (>= 1).
            shuffle: visit rows in a random order (a fresh permutation per call).
            seed: seed of that permutation (``torch.Generator``); None draws from torch's global RNG.
            drop_last: skip a final batch smaller than ``batch_size``.

        Yields:
            `Batch` with ``index`` = the rows' numbers in the split.

        Raises:
            KeyError: unknown split. ValueError: ``batch_size < 1``.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        s = self._split(split)
        n = s.num_rows
        single, multi, dense, labels = self._split_single[split], s.multi, s.dense, s.labels
        if shuffle:
            gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
            order = torch.randperm(n, generator=gen)
            single = _take_columns(single, order)
            dense, labels = dense.index_select(0, order), labels.index_select(0, order)
            shuffled = {}
            for name, (v, o) in multi.items():
                values, lengths = gather_jagged(v, o, order)
                shuffled[name] = (values, lengths_to_offsets(lengths))
            multi = shuffled
        else:
            order = torch.arange(n)
        for start in range(0, n, batch_size):
            end = min(start + batch_size, n)
            if drop_last and end - start < batch_size:
                break
            yield self._rows_batch(split, single, multi, dense, labels, start, end, order[start:end])

    def num_batches(self, split: str, batch_size: int, drop_last: bool = False) -> int:
        n = self._split(split).num_rows
        return n // batch_size if drop_last else -(-n // batch_size)

    # --- negative sampling ------------------------------------------------------------------
    def resample_negatives(self, seed: Optional[int], split: str = "train") -> Split:
        """Draw new items for the sampled-negative rows of ``split`` (rows whose label of the loader's
        first task, e.g. ``click``, is 0; found by name after `mtkernels.transfer.select_tasks`).

        Each negative row keeps its user, timestamp and labels and gets an item drawn uniformly from
        the user's negative pool (for ml100k-mtl-v1: the items the user rated nowhere, the protocol's
        own rule), so a model can see fresh negatives every epoch (PROTOCOL.md 3: a model may resample
        its training negatives but must say so). Replaces ``splits[split]`` and returns it;
        ``seed=None`` restores the loader's original negatives. Evaluation splits must keep theirs.

        Raises:
            ValueError: the data set has no negative pools (no sampled negatives), an unknown split,
                or tasks without the one that marks the negatives.
        """
        if self._negative_pools is None:
            raise ValueError(f"{self.name} has no sampled negatives to resample")
        if split not in self._split_rows:
            raise ValueError(f"no split {split!r}; splits: {list(self._split_rows)}")
        names = [t.name for t in self.tasks]
        if self._negative_task not in names:
            raise ValueError(f"the sampled negatives are the rows whose {self._negative_task!r} label is 0, and this "
                             f"data set's tasks {names} lack it (resample before select_tasks)")
        rows = self._split_rows[split]
        if seed is not None:
            offsets, items = self._negative_pools
            negative = rows.labels[:, names.index(self._negative_task)] == 0
            users = rows.user_row[negative]
            sizes = offsets[users + 1] - offsets[users]
            if bool((sizes == 0).any()):
                raise ValueError("a user with sampled negatives has an empty negative pool")
            generator = torch.Generator().manual_seed(int(seed))
            pick = (torch.rand(users.numel(), generator=generator, dtype=torch.float64) * sizes).long().clamp_(max=sizes - 1)
            item_row = rows.item_row.clone()
            item_row[negative] = items[offsets[users] + pick]
            context_dense = rows.context_dense
            if self._pair_dense is not None:  # a negative's item is unrated: the full-history value
                context_dense = context_dense.clone()
                context_dense[negative] = self._pair_dense[users, item_row[negative]]
            rows = SplitRows(rows.user_row, item_row, rows.labels, rows.context_sparse, rows.context_multi,
                             context_dense, rows.extra)
        self.splits[split] = self._assemble(split, rows)
        return self.splits[split]

    # --- catalogue and users ----------------------------------------------------------------
    @property
    def num_items(self) -> int:
        """Number of catalogue items; item position p has item index p + 1 (0 = unknown)."""
        return self._items.num_rows - 1

    @property
    def item_ids(self):
        """External item ids by position, int64 ``[num_items]`` (a list for string ids)."""
        return self._item_ids

    @property
    def user_ids(self):
        """External user id per user-table row (row 0, the unknown user, holds -1 / None).

        Warm users' rows equal their encoded user index (the ``user_id`` feature); cold users have
        rows after them and encoded index 0. int64 for integer ids, a list for string ids.
        """
        return self._user_ids

    @property
    def vocabularies(self) -> Dict[str, list]:
        """The external key of every row of each feature's table: ``{feature: [key of id 0, key of
        id 1, ...]}`` (id 0, the unknown row, has key None), for matching rows across data sets
        (`mtkernels.transfer`). ``user_id`` and ``item_id`` come from `user_ids` / `item_ids`;
        other features from the loader (category values, or bucket numbers for fixed buckets).
        Features the loader gave no keys for are absent. Plain Python values (stored in
        checkpoints)."""
        keys = {name: list(values) for name, values in self._vocabularies.items()}
        specs = {f.name: f for f in self.features}
        user_spec = specs.get(self._user_id_feature) if self._user_id_feature else None
        if user_spec is not None and self._user_ids is not None and self._user_id_feature not in keys:
            ids = self._user_ids.tolist() if isinstance(self._user_ids, torch.Tensor) else list(self._user_ids)
            column = [None] * user_spec.num_embeddings
            for row, index in enumerate(self._users.sparse[self._user_id_feature].tolist()):
                if index > 0:
                    column[index] = ids[row]
            keys[self._user_id_feature] = column
        if "item_id" in specs and self._item_ids is not None and "item_id" not in keys:
            ids = self._item_ids.tolist() if isinstance(self._item_ids, torch.Tensor) else list(self._item_ids)
            column = [None] * specs["item_id"].num_embeddings
            for row, index in enumerate(self._items.sparse["item_id"].tolist()):
                if 0 < row <= len(ids) and index > 0:
                    column[index] = ids[row - 1]
            keys["item_id"] = column
        return keys

    @property
    def num_user_rows(self) -> int:
        return self._users.num_rows

    @property
    def item_titles(self) -> List[str]:
        """Item titles by position (external ids as text when the data has no titles)."""
        if self._item_titles is None:
            return [str(i) for i in (self._item_ids.tolist() if isinstance(self._item_ids, torch.Tensor) else self._item_ids or [])]
        return self._item_titles

    def _lookup(self, ids_by_row, wanted, what: str, skip_first: bool) -> torch.Tensor:
        table = ids_by_row.tolist() if isinstance(ids_by_row, torch.Tensor) else list(ids_by_row)
        where = {v: i for i, v in enumerate(table) if not (skip_first and i == 0)}
        out = []
        for w in wanted:
            key = w.item() if isinstance(w, torch.Tensor) else w
            if key not in where:
                raise KeyError(f"unknown {what} {key!r}")
            out.append(where[key])
        return torch.tensor(out, dtype=torch.long)

    def user_row_of(self, external_user_ids: Sequence) -> torch.Tensor:
        """User-table rows of external user ids (int64 ``[U]``). Raises KeyError for unknown ids."""
        if self._user_ids is None:
            raise ValueError(f"{self.name} has no users")
        return self._lookup(self._user_ids, external_user_ids, "user id", skip_first=True)

    def item_position_of(self, external_item_ids: Sequence) -> torch.Tensor:
        """Item positions (0..num_items-1) of external item ids. Raises KeyError for unknown ids."""
        if self._item_ids is None:
            raise ValueError(f"{self.name} has no items")
        return self._lookup(self._item_ids, external_item_ids, "item id", skip_first=False)

    def user_side(self, external_user_id) -> dict:
        """Raw side features of one user (e.g. ``{"age": 24, "gender": "M", ...}``).

        Raises:
            KeyError: unknown user id. ValueError: the data set has no user side features.
        """
        if self._user_side_frame is None:
            raise ValueError(f"{self.name} has no user side features")
        if external_user_id not in self._user_side_frame.index:
            raise KeyError(f"unknown user id {external_user_id!r}")
        return {k: (v.item() if hasattr(v, "item") else v) for k, v in self._user_side_frame.loc[external_user_id].items()}

    def user_feature_rows(self, split: Optional[str] = None, users: Optional[Sequence] = None) -> UserRows:
        """User-side features of some users, to cross with items in `pair_batch`.

        Args:
            split: when ``users`` is None, take that split's top-k users (or all its users).
            users: user-table rows (int64 ``[U]``), e.g. ``topk_eval(split).users``. A cold user's
                ``user_id`` feature is the unknown id 0, so the model scores it from side features.

        With a user-history feature (`mtkernels.data.history`), its bag is the history the split is
        ranked with (``val``: train; other splits and ``split=None``: train + val, the latest).

        Raises:
            ValueError: neither argument given, or the data set has no users. IndexError: a row out of range.
        """
        if users is None:
            if split is None:
                raise ValueError("user_feature_rows needs split or users")
            users = self._topk[split].users if split in self._topk else torch.unique(self._split(split).user_row)
        rows = _long(users).reshape(-1)
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= self._users.num_rows):
            raise IndexError(f"users: user-table rows must be in [0, {self._users.num_rows}), got {rows.min()}..{rows.max()}")
        sparse = {f.name: self._users.sparse[f.name][rows] for f in self.features if f.side == "user" and not f.multi_valued}
        multi = {}
        for f in self.features:
            if f.side == "user" and f.multi_valued:
                if self._history is not None and f.name == self._history.feature:
                    v, l = self._history.user_bags(rows, split)
                else:
                    v, l = gather_jagged(*self._users.multi[f.name], rows)
                multi[f.name] = (v, lengths_to_offsets(l))
        return UserRows(rows, sparse, multi, self._users.dense[rows])

    def new_user_rows(self, sides: Sequence[dict]) -> UserRows:
        """`UserRows` for users the data set does not hold, from raw side features alone.

        Encoded like the loader's cold users: ``user_id`` = 0, vocabularies of the training users
        (unseen or missing values -> 0), dense (history) features = the mean, 0; ``rows`` = -1.
        E.g. ``data.new_user_rows([{"age": 31, "gender": "F", "occupation": "writer", "zip_code": "10025"}])``.

        Raises:
            ValueError: the loader gave no side-feature encoder (no user side features); an entry of
                ``sides`` that is not a dict, names a side feature the data set does not have, or gives
                one a value that is not a single string or number (a list, a dict).
        """
        if self._user_encoder is None:
            raise ValueError(f"{self.name} cannot encode new users (no user side features)")
        for i, side in enumerate(sides):
            if not isinstance(side, dict):
                raise ValueError(f"sides[{i}]: expected a dict of raw side features, got {type(side).__name__}")
            unknown = [k for k in side if k not in self._user_side_columns]
            if unknown:
                raise ValueError(f"sides[{i}]: unknown side features {unknown}; known: {', '.join(self._user_side_columns)}")
            for key, value in side.items():
                if not (value is None or isinstance(value, (str, int, float, np.generic))):
                    raise ValueError(f"sides[{i}][{key!r}]: expected one raw value (a string or number), got {value!r}")
        count = len(sides)
        encoded = self._user_encoder(pd.DataFrame(list(sides)))
        sparse, multi = {}, {}
        for f in self.features:
            if f.side != "user":
                continue
            if f.multi_valued:
                multi[f.name] = (torch.zeros(0, dtype=torch.long), torch.zeros(count + 1, dtype=torch.long))
            elif f.name == self._user_id_feature:
                sparse[f.name] = torch.zeros(count, dtype=torch.long)
            else:
                sparse[f.name] = torch.as_tensor(encoded.get(f.name, np.zeros(count)), dtype=torch.long)
        return UserRows(torch.full((count,), -1, dtype=torch.long), sparse, multi, torch.zeros(count, self.user_dense_dim))

    def pair_batch(self, users: Union[UserRows, torch.Tensor, Sequence[int]], items: Optional[torch.Tensor] = None,
                   split: Optional[str] = None) -> Batch:
        """Every (user, item) pair of U users x N items as one `Batch`, user-major.

        Row ``u * N + j`` pairs user u with item ``items[j]``. Context features are unknown (id 0,
        empty bags, dense 0 = the standardised mean) unless the data set has per-pair dense
        columns (``has_pair_dense``), which are filled in (new users, row -1, as the unknown user
        row 0); labels are NaN.

        Args:
            users: a `UserRows` (from `user_feature_rows`), or user-table rows (int64 ``[U]``).
            items: item positions 0..num_items-1 (int64 ``[N]``); None = the whole catalogue.
            split: the split being ranked, for user rows given as rows (their history bags, see
                `user_feature_rows`); None = the latest history.

        Raises:
            IndexError: an item position outside ``[0, num_items)``.
        """
        if not isinstance(users, UserRows):
            users = self.user_feature_rows(split=split, users=users)
        items = torch.arange(self.num_items) if items is None else _long(items).reshape(-1)
        if items.numel() and (int(items.min()) < 0 or int(items.max()) >= self.num_items):
            raise IndexError(f"items: positions must be in [0, {self.num_items}), got {items.min()}..{items.max()}")
        num_users, num_items = len(users), items.numel()
        batch = num_users * num_items
        item_rows = (items + 1).repeat(num_users)
        user_index = torch.arange(num_users).repeat_interleave(num_items)
        single, multi = {}, {}
        for f in self.features:
            if f.side == "user":
                if f.multi_valued:
                    multi[f.name] = gather_jagged(*users.multi[f.name], user_index)
                else:
                    single[f.name] = users.sparse[f.name].repeat_interleave(num_items)
            elif f.side == "item":
                if f.multi_valued:
                    multi[f.name] = gather_jagged(*self._items.multi[f.name], item_rows)
                else:
                    single[f.name] = self._items.sparse[f.name][item_rows]
            else:
                if f.multi_valued:
                    multi[f.name] = (torch.zeros(0, dtype=torch.long), torch.zeros(batch, dtype=torch.long))
                else:
                    single[f.name] = torch.zeros(batch, dtype=torch.long)
        dense = torch.cat(
            [
                users.dense.repeat_interleave(num_items, dim=0),
                self._items.dense[item_rows],
                self._pair_context_dense(users.rows, item_rows, num_items),
            ],
            dim=1,
        )
        labels = torch.full((batch, self.num_tasks), float("nan"))
        return Batch(self._make_kjt(single, multi, batch), dense, labels, None)

    def _pair_context_dense(self, user_rows: torch.Tensor, item_rows: torch.Tensor, num_items: int) -> torch.Tensor:
        batch = user_rows.numel() * num_items
        if self._pair_dense is None:
            return torch.zeros(batch, len(self._context_dense_names))
        users = user_rows.clamp(min=0).repeat_interleave(num_items)
        return self._pair_dense[users, item_rows]

    # --- top-k evaluation -------------------------------------------------------------------
    @property
    def topk_splits(self) -> List[str]:
        """The splits with top-k evaluation sets (e.g. ``["val", "test_warm", "test_cold"]``)."""
        return list(self._topk)

    def topk_eval(self, split: str) -> TopKEval:
        """Users, excluded (already seen) and relevant items of a split, per PROTOCOL.md section 5.

        Raises:
            ValueError: the data set has no top-k sets (no items, or no split with a relevant item) or
                none for that split.
        """
        if not self._topk:
            if int(getattr(self, "num_items", 0) or 0) > 0:
                raise ValueError(f"{self.name} has no top-k evaluation set: no split has a user with a relevant item "
                                 f"(its items: {self.num_items})")
            raise ValueError(f"{self.name} has no items to rank: top-k evaluation is not defined for it")
        if split not in self._topk:
            raise ValueError(f"no top-k evaluation set for split {split!r}; available: {list(self._topk)}")
        return self._topk[split]

    def __repr__(self) -> str:
        return (
            f"MultiTaskData({self.name!r}, tasks={[t.name for t in self.tasks]}, "
            f"features={[f.name for f in self.features]}, dense_dim={self.dense_dim}, "
            f"splits={ {k: v.num_rows for k, v in self.splits.items()} })"
        )


def csr_from_pairs(group: np.ndarray, values: np.ndarray, num_groups: int) -> tuple:
    """CSR ``(offsets [G+1], values)`` from (group, value) pairs, values sorted within a group."""
    group = np.asarray(group, dtype=np.int64)
    values = np.asarray(values, dtype=np.int64)
    order = np.lexsort((values, group))
    counts = np.bincount(group, minlength=num_groups) if group.size else np.zeros(num_groups, dtype=np.int64)
    offsets = np.zeros(num_groups + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return torch.from_numpy(offsets), torch.from_numpy(values[order].copy())
