"""Serving top-k recommendations from a training checkpoint: :class:`Ranker`.

The checkpoint (written by ``mtkernels.training.fit`` with ``checkpoint_extra={"serving":
serving_tables(data)}``) carries everything a request needs, so serving never reloads the data set:
the model (config + best weights), the feature tables of every known user and of every item, the
items each user has seen (train + val positives), item titles and popularity.

A request for B users scores all N items for each user with the model (``[B*N]`` pairs in one
forward, fused scoring in eval mode), fuses the chosen tasks' scores and selects the top k with
``mtkernels.ops.ensemble_topk`` (one call per batch of users; seen items excluded inside the op).

A fused checkpoint (``mtkernels.fusion.ScoreFusion.save``: several models and a collaborative-
filtering member with weights learned on validation) is served the same way: ``Ranker.load``
detects it and ranks each block of users with the fusion (every member's score matrices, one
``ensemble_topk`` call).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
from typing import Dict, List, Mapping, Optional, Sequence

import torch

from . import ops
from .evaluation import default_ranking, fused_topk
from .data import gather_jagged
from .jagged import KeyedJaggedTensor
from .training.checkpoint import build_model, load_checkpoint

SERVED_BY = ("model", "side_features", "popularity")


def _lengths_to_offsets(lengths: torch.Tensor) -> torch.Tensor:
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.long)
    torch.cumsum(lengths.long(), 0, out=offsets[1:])
    return offsets


def serving_tables(data, user_id_feature: str = "user_id") -> Dict[str, object]:
    """What the :class:`Ranker` needs from a ``mtkernels.data.MultiTaskData``, as plain tensors
    (stored in checkpoints under ``"serving"``), so serving never reloads the data set.

    - user table: every user-table row's user-side features (``data.user_feature_rows``), row 0
      the unknown user; cold users keep their side features with the unknown ``user_id`` 0;
    - item table: every item's item-side feature bags and its dense columns as ``pair_batch``
      builds them (context features are unknown at serving time: id 0 / dense 0);
    - seen items per user row: the ``test_warm`` (or a generic log's ``test``) exclusions (train + val
      positives, PROTOCOL.md §5);
    - popularity: positives per item of the first binary task in ``train``; titles; external ids.

    Returns:
        dict with ``feature_names``, ``feature_sides``, ``multi_valued``, ``user_ids [R]``,
        ``user_warm [R] bool``, ``user_sparse {name: [R]}``, ``user_multi {name: (values, offsets)}``,
        ``user_dense [R, du]``, ``item_ids [N]``, ``item_bags {name: (values, offsets [N+1])}``,
        ``item_dense [N, dense_dim - du]``, ``seen_offsets [R+1]``, ``seen_indices``,
        ``popularity [N]``, ``titles``.

    Raises:
        ValueError: user or item ids that are not integers (a log with string ids); the data set has
            per-(user, item) dense columns (``data.has_pair_dense``,
            e.g. ML-100K's ``rating_estimate``), which these per-side tables cannot hold.
    """
    if not (isinstance(data.user_ids, torch.Tensor) and isinstance(data.item_ids, torch.Tensor)):
        raise ValueError("serving_tables: the Ranker serves integer user and item ids; this data set's ids are not "
                         "integers (map them to integers in the log)")
    if getattr(data, "has_pair_dense", False):
        raise ValueError("serving_tables: data has per-(user, item) dense columns (has_pair_dense); "
                         "the Ranker serves per-side features only (load the data without them)")
    names = [f.name for f in data.features]
    sides = {f.name: f.side for f in data.features}
    num_items = int(data.num_items)
    num_rows = int(data.num_user_rows)
    users = data.user_feature_rows(users=torch.arange(num_rows))
    if user_id_feature in users.sparse:
        user_warm = users.sparse[user_id_feature] != 0
    else:
        user_warm = torch.ones(num_rows, dtype=torch.bool)
    user_warm[0] = False

    items = data.pair_batch(torch.tensor([0]), torch.arange(num_items))
    item_bags = {}
    for name in names:
        if sides[name] == "item":
            bag = items.sparse[name]
            item_bags[name] = (bag["values"].long().clone(), _lengths_to_offsets(bag["lengths"]))
    item_dense = items.dense[:, users.dense.shape[1]:].clone()

    # the test split's exclusions: ml100k-mtl-v1's test_warm, a generic log's test
    warm = data.topk_eval("test_warm" if "test_warm" in data.topk_splits else "test")
    seen_lengths = torch.zeros(num_rows, dtype=torch.long)
    seen_lengths[warm.users] = warm.exclude_offsets[1:] - warm.exclude_offsets[:-1]
    seen_offsets = _lengths_to_offsets(seen_lengths)
    seen_indices = torch.zeros(int(seen_offsets[-1]), dtype=torch.long)
    for j, row in enumerate(warm.users.tolist()):
        seen_indices[seen_offsets[row] : seen_offsets[row + 1]] = warm.exclude_indices[
            warm.exclude_offsets[j] : warm.exclude_offsets[j + 1]
        ]

    train = data.splits["train"]
    first_binary = next((t for t, task in enumerate(data.tasks) if task.kind == "binary"), 0)
    positive = train.labels[:, first_binary] > 0
    popularity = torch.bincount(train.item[positive] - 1, minlength=num_items)[:num_items].float()

    return {
        "feature_names": names,
        "feature_sides": sides,
        "user_ids": torch.as_tensor(data.user_ids).long().clone(),
        "user_warm": user_warm,
        "user_sparse": {k: v.clone() for k, v in users.sparse.items()},
        "user_multi": {k: (v.clone(), o.clone()) for k, (v, o) in users.multi.items()},
        "user_dense": users.dense.clone(),
        "item_ids": torch.as_tensor(data.item_ids).long().clone(),
        "item_bags": item_bags,
        "item_dense": item_dense,
        "seen_offsets": seen_offsets,
        "seen_indices": seen_indices,
        "popularity": popularity,
        "titles": list(data.item_titles),
    }


def pair_rows(tables: Mapping[str, object], users: Dict[str, object], pair_users: torch.Tensor,
              pair_items: torch.Tensor):
    """Model inputs of the (user, item) pairs ``(pair_users[i], pair_items[i])``, laid out as
    ``MultiTaskData.pair_batch`` lays them out (context features unknown: id 0, dense 0).

    Args:
        tables: :func:`serving_tables`.
        users: ``{"sparse": {name: [R]}, "multi": {name: (values, offsets)}, "dense": [R, du]}``
            (the ``user_*`` entries of ``tables``, possibly with appended rows).
        pair_users: int64 ``[P]`` rows of ``users``. pair_items: int64 ``[P]`` item positions.

    Returns:
        ``(KeyedJaggedTensor of P rows, dense [P, dense_dim])``.
    """
    values, lengths = [], []
    for name in tables["feature_names"]:
        side = tables["feature_sides"][name]
        if side == "user" and name in users["multi"]:
            v, l = gather_jagged(*users["multi"][name], pair_users)
        elif side == "user":
            v, l = users["sparse"][name][pair_users], torch.ones(pair_users.numel(), dtype=torch.long)
        elif side == "item":
            v, l = gather_jagged(*tables["item_bags"][name], pair_items)
        else:  # context features are unknown at serving time: the unknown id 0
            v = torch.zeros(pair_users.numel(), dtype=torch.long)
            l = torch.ones(pair_users.numel(), dtype=torch.long)
        values.append(v)
        lengths.append(l)
    sparse = KeyedJaggedTensor(tables["feature_names"], torch.cat(values), lengths=torch.cat(lengths))
    dense = torch.cat([users["dense"][pair_users], tables["item_dense"][pair_items]], dim=1)
    return sparse, dense


@dataclasses.dataclass
class Recommendations:
    """The answer to one request of B users.

    Attributes:
        user_ids: the B requested external user ids, in request order.
        item_ids: int64 ``[B, k]`` external item ids, best first; -1 pads a list when fewer than k
            items are left.
        scores: float32 ``[B, k]`` the fused ranking score (popularity count for users served from
            popularity); -inf on padding.
        titles: B lists of k item titles ("" on padding).
        served_by: B strings: ``"model"`` (a known user), ``"side_features"`` (unknown id, scored by
            the model from the user's side features with the unknown user index) or
            ``"popularity"`` (nothing known: the most popular items).
    """

    user_ids: List[int]
    item_ids: torch.Tensor
    scores: torch.Tensor
    titles: List[List[str]]
    served_by: List[str]

    def __len__(self) -> int:
        return len(self.user_ids)


def _is_integer(value) -> bool:
    """An int, NumPy integer or one-element integer tensor (not a bool, float or string)."""
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


class Ranker:
    """Top-k recommendations from a checkpoint of ``mtkernels.training`` (issue 4, item 4).

    Args:
        model: the trained multi-task model (put in eval mode: fused scoring).
        tasks: its task specs (``.name``, ``.kind``).
        tables: :func:`serving_tables` of the training data.
        users_per_block: users scored per model forward (memory: block x N pairs).
        fusion: a ``mtkernels.fusion.ScoreFusion`` to rank with instead of one model (then
            ``model`` is None and ``tasks`` holds the one fused score); see :meth:`from_fusion`.
    """

    def __init__(self, model: Optional[torch.nn.Module], tasks: Sequence, tables: Mapping[str, object],
                 users_per_block: int = 256, fusion=None) -> None:
        if model is None and fusion is None:
            raise ValueError("Ranker needs a model or a fusion")
        self.model = model.eval() if model is not None else None
        self.fusion = fusion
        self.tasks = list(tasks)
        self.tables = tables
        self.users_per_block = int(users_per_block)
        self.item_ids = tables["item_ids"]
        self.num_items = int(self.item_ids.numel())
        # Row 0 is the unknown user (external id -1): never a match for a requested id.
        self._user_row = {int(u): r for r, u in enumerate(tables["user_ids"].tolist()) if r > 0}
        self._item_position = {int(i): p for p, i in enumerate(self.item_ids.tolist())}

    @classmethod
    def from_fusion(cls, fusion) -> "Ranker":
        """A Ranker over a ``mtkernels.fusion.ScoreFusion`` (which must hold serving tables)."""
        if fusion.tables is None:
            raise ValueError("the fusion holds no serving tables (build it with tables=serving_tables(data))")
        return cls(None, [_Task("fused", "score")], fusion.tables, fusion=fusion)

    @classmethod
    def load(cls, checkpoint_path: str, users_per_block: int = 256) -> "Ranker":
        """Load a checkpoint written by ``mtkernels.training.fit`` with serving tables, or a fused
        checkpoint written by ``mtkernels.fusion.ScoreFusion.save`` (served the same way).

        Raises:
            FileNotFoundError: no file at ``checkpoint_path``.
            ValueError: not an mtkernels checkpoint, or one without serving tables (a data set
                without an item catalogue, or with non-integer user/item ids).
        """
        checkpoint = load_checkpoint(checkpoint_path)
        if not checkpoint.get("serving"):
            raise ValueError(f"{checkpoint_path} holds no serving tables (the data set has no items to rank, or "
                             "non-integer user/item ids)")
        if "fusion" in checkpoint:
            from .fusion import ScoreFusion

            return cls.from_fusion(ScoreFusion.from_checkpoint(checkpoint))
        tasks = [_Task(t["name"], t["kind"]) for t in checkpoint["tasks"]]
        return cls(build_model(checkpoint, best=True), tasks, checkpoint["serving"], users_per_block)

    # --- feature rows ------------------------------------------------------------------------
    def pair_features(self, users: Dict[str, object], rows: torch.Tensor):
        """Features of all (user, item) pairs of user rows ``rows`` x all items, user-major
        (row ``u * N + n``), laid out as ``MultiTaskData.pair_batch`` lays them out.

        Args:
            users: ``{"sparse": {name: [R]}, "multi": {name: (values, offsets)}, "dense": [R, du]}``.
            rows: int64 ``[U]`` rows of that table.

        Returns:
            ``(KeyedJaggedTensor of U*N rows, dense [U*N, dense_dim])``.
        """
        n_users, n_items = rows.numel(), self.num_items
        return pair_rows(self.tables, users, rows.repeat_interleave(n_items), torch.arange(n_items).repeat(n_users))

    @property
    def uses_request_time(self) -> bool:
        """True when the model ranks unknown users by the request time (a time-aware
        `mtkernels.cold_start.ColdStartModel`); `recommend` then takes ``at``."""
        return self.model is not None and bool(getattr(self.model, "uses_request_time", False))

    @torch.no_grad()
    def score(self, users: Dict[str, object], rows: torch.Tensor, at: Optional[float] = None) -> torch.Tensor:
        """Model predictions ``[U, N, T]`` of user rows ``rows`` against every item; ``at``: the
        request time (seconds) for a model with ``uses_request_time`` (None: its latest training
        timestamp)."""
        timed = self.uses_request_time
        if timed and at is None:
            at = self.model.default_request_time
        out = []
        for start in range(0, rows.numel(), self.users_per_block):
            block = rows[start : start + self.users_per_block]
            sparse, dense = self.pair_features(users, block)
            predictions = self.model(sparse, dense, at=at) if timed else self.model(sparse, dense)
            out.append(predictions.reshape(block.numel(), self.num_items, len(self.tasks)))
        return torch.cat(out) if out else torch.zeros(0, self.num_items, len(self.tasks))

    def _table_sizes(self) -> Dict[str, int]:
        """``{feature: rows of its embedding table}`` of the model (every fused member's)."""
        models = [self.model] if self.model is not None else [getattr(m, "model", None) for m in self.fusion.members]
        sizes: Dict[str, int] = {}
        for model in models:
            for module in model.modules() if isinstance(model, torch.nn.Module) else ():
                for spec in getattr(module, "features", None) or ():
                    if hasattr(spec, "num_embeddings"):
                        sizes[spec.name] = min(sizes.get(spec.name, spec.num_embeddings), spec.num_embeddings)
        return sizes

    def _check_side_features(self, user: int, features: Mapping[str, object]) -> None:
        """Each encoded id of a ``side_features`` entry must be a row of its table."""
        sizes = self._table_sizes()
        for name, value in features.items():
            ids = value if isinstance(value, (list, tuple)) else [value]
            size = sizes.get(name)
            for i in ids:
                if not _is_integer(i) or i < 0 or (size is not None and i >= size):
                    expected = f"an id in [0, {size})" if size is not None else "an integer id >= 0"
                    raise ValueError(f"side_features[{user}][{name!r}]: expected {expected} (encoded, e.g. by "
                                     f"MultiTaskData.new_user_rows), got {i!r}")

    def _user_table(self, extra: List[Mapping[str, int]]) -> Dict[str, object]:
        """The stored user table, plus one appended row per ``extra`` side-feature dict."""
        sparse = dict(self.tables["user_sparse"])
        multi = dict(self.tables["user_multi"])
        dense = self.tables["user_dense"]
        if extra:
            known = set(sparse) | set(multi)
            for features in extra:
                unknown = set(features) - known
                if unknown:
                    raise ValueError(
                        f"side_features name unknown user features {sorted(unknown)}; known: {sorted(known)}"
                    )
            for name in sparse:
                added = torch.tensor([int(e.get(name, 0)) for e in extra], dtype=torch.long)
                sparse[name] = torch.cat([sparse[name], added])
            for name, (values, offsets) in multi.items():
                bags = [list(e.get(name, [])) for e in extra]
                added = torch.tensor([i for bag in bags for i in bag], dtype=torch.long)
                ends = offsets[-1] + torch.cumsum(torch.tensor([len(b) for b in bags], dtype=torch.long), 0)
                multi[name] = (torch.cat([values, added]), torch.cat([offsets, ends]))
            # Dense user features of an unseen user: the standardised mean, 0.
            dense = torch.cat([dense, dense.new_zeros(len(extra), dense.shape[1])])
        return {"sparse": sparse, "multi": multi, "dense": dense}

    # --- requests ----------------------------------------------------------------------------
    def recommend(
        self,
        user_ids: Sequence[int],
        k: int = 10,
        exclude_seen: bool = True,
        task_weights: Optional[Mapping[str, float]] = None,
        side_features: Optional[Mapping[int, Mapping[str, object]]] = None,
        at: Optional[float] = None,
    ) -> Recommendations:
        """Top-k items for each user of a request.

        Args:
            user_ids: B external user ids (may be empty).
            k: list length (>= 0); a k above the catalogue's size is capped to it (lists hold
                each item once; slots left empty by excluded items hold id -1 and score -inf).
            exclude_seen: drop the items a known user has already seen (train + val positives).
            task_weights: ``{task name: weight}``; the ranking score is ``sum_t w_t * prediction_t``
                (probabilities for binary tasks, raw values for regression tasks); default: the
                click (first binary task) probability, as in the evaluation.
            side_features: optional ``{user id: {user-side feature name: encoded id (or list of
                ids for a multi-valued feature)}}`` for ids the checkpoint does not know; missing
                features take the unknown id 0, dense user features the mean.
            at: the request time, seconds (Unix time; a Python or NumPy number or a 0-d tensor),
                for a model that ranks unknown users by it (``uses_request_time``: a
                `mtkernels.cold_start.ColdStartModel` with a `RecentPopularityPrior`): only
                training ratings up to ``at`` count. Default: the latest training timestamp.
                Known users' lists do not depend on it.

        Returns:
            :class:`Recommendations`. Users known from training are scored by the model
            (``"model"``); users known only by their side features (the cold users of the data
            set) or given ``side_features`` are scored by the model with the unknown user id
            (``"side_features"``); the rest get the most popular training items
            (``"popularity"``; ties by the smaller item id).

        Raises:
            ValueError: k not an integer >= 0, a single id instead of a sequence, a user id that is
                not an integer, ``side_features`` of a user not in ``user_ids``, unknown task names,
                unknown feature names in ``side_features`` or an id outside its table;
                ``task_weights`` given to a fused ranker (it ranks by its learned weights); ``at``
                given to a model that does not use a request time, or not a finite number.
        """
        if not _is_integer(k) or k < 0:
            raise ValueError(f"k must be an integer >= 0, got {k!r}")
        k = min(int(k), int(self.item_ids.numel()))  # no list is longer than the catalogue
        if at is not None:
            if not self.uses_request_time:
                raise ValueError("at: this checkpoint's model does not rank by request time (only a cold-start model "
                                 "with a time-aware prior does)")
            value = at.item() if isinstance(at, torch.Tensor) and at.dim() == 0 else at
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"at: the request time must be a finite number of seconds (Unix time), got {at!r}")
            at = int(value) if isinstance(value, numbers.Integral) else float(value)  # NumPy scalars too
        if user_ids.dim() == 0 if isinstance(user_ids, torch.Tensor) else _is_integer(user_ids):
            raise ValueError(f"user_ids: expected a sequence of ids (e.g. [{int(user_ids)}]), got {user_ids!r}")
        bad = [u for u in user_ids if not _is_integer(u)]
        if bad:
            raise ValueError(f"user_ids: expected integer ids, got {bad[:3]!r}")
        user_ids = [int(u) for u in user_ids]
        stray = sorted(set(side_features or {}) - set(user_ids))
        if stray:
            raise ValueError(f"side_features names users not in user_ids: {stray[:5]} (add them to the request)")
        if self.fusion is not None and task_weights:
            raise ValueError("task_weights does not apply to a fused checkpoint: it ranks by its learned source weights")
        if self.fusion is None:
            task_weights = dict(task_weights or default_ranking(self.tasks))
        side_features = side_features or {}
        n_users = len(user_ids)
        n_known = int(self.tables["user_ids"].numel())
        item_ids = torch.full((n_users, k), -1, dtype=torch.long)
        scores = torch.full((n_users, k), float("-inf"))
        served_by: List[str] = ["popularity"] * n_users

        rows: List[int] = []
        positions: List[int] = []
        extra: List[Mapping[str, object]] = []
        for position, user in enumerate(user_ids):
            row = self._user_row.get(user)
            if row is not None:
                served_by[position] = "model" if bool(self.tables["user_warm"][row]) else "side_features"
            elif user in side_features:
                self._check_side_features(user, side_features[user])
                row = n_known + len(extra)
                extra.append(side_features[user])
                served_by[position] = "side_features"
            else:
                continue
            rows.append(row)
            positions.append(position)
        users = self._user_table(extra)

        if positions and k > 0:
            rows_t = torch.tensor(rows, dtype=torch.long)
            exclude_offsets = exclude_indices = None
            if exclude_seen:
                offsets, indices = self.tables["seen_offsets"], self.tables["seen_indices"]
                parts = [indices[offsets[r] : offsets[r + 1]] if r < n_known else indices[:0] for r in rows]
                exclude_indices = torch.cat(parts)
                exclude_offsets = _lengths_to_offsets(torch.tensor([p.numel() for p in parts], dtype=torch.long))
            if self.fusion is not None:
                top_scores, top_items = self.fusion.topk(rows_t, k, exclude_offsets, exclude_indices, users=users)
            else:
                predictions = self.score(users, rows_t, at)
                top_scores, top_items = fused_topk(predictions, self.tasks, task_weights, k, exclude_offsets, exclude_indices)
            where = torch.tensor(positions, dtype=torch.long)
            scores[where] = top_scores
            item_ids[where] = torch.where(top_items >= 0, self.item_ids[top_items.clamp_min(0)], top_items)

        popular = [p for p, how in enumerate(served_by) if how == "popularity"]
        if popular and k > 0:
            top_scores, top_items = _popularity_topk(self.tables["popularity"], k)
            where = torch.tensor(popular, dtype=torch.long)
            scores[where] = top_scores.expand(len(popular), -1)
            item_ids[where] = torch.where(top_items >= 0, self.item_ids[top_items.clamp_min(0)], top_items).expand(
                len(popular), -1
            )

        titles = self.tables["titles"]
        title_lists = [
            [titles[self._item_position[int(i)]] if int(i) >= 0 else "" for i in row] for row in item_ids
        ]
        return Recommendations(user_ids, item_ids, scores, title_lists, served_by)


def _popularity_topk(popularity: torch.Tensor, k: int):
    """Top-k of the popularity vector ``[N]`` through the same op: ``([1, k], [1, k])``."""
    return ops.ensemble_topk(popularity.float().reshape(1, 1, -1), torch.ones(1), k)


@dataclasses.dataclass(frozen=True)
class _Task:
    name: str
    kind: str
