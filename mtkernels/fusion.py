"""Multi-model, multi-task score fusion: several models' task scores into one ranked list.

`ScoreFusion` combines S *sources*, each one task score of one member (a trained
`mtkernels.nn.MultiTaskModel`, or a collaborative-filtering model, `mtkernels.nn.EASE`,
`mtkernels.nn.ItemKNN` or `mtkernels.nn.SequentialRules`):

- ``mode="weighted"``: ``fused(u, n) = sum_s w_s * transform_s(score_s(u, n))`` (linear score
  fusion, "CombSUM" with weights; Fox and Shaw, TREC-2 1994; weights learned on validation as in
  learned linear ensembles, e.g. the Netflix-prize blends of Töscher, Jahrer and Bell 2009);
- ``mode="rrf"``: reciprocal rank fusion ``sum_s w_s / (c + rank_s(u, n))`` (Cormack, Clarke and
  Büttcher, SIGIR 2009), scale-free.

Scores of different members live on different scales (probabilities, ratings, sums of item-item
weights), so the default transforms standardise each source per user over the catalogue (minus the
user's mean, over the user's standard deviation), probabilities on the logit scale first; chosen
on the validation split of ml100k-mtl-v1 (val NDCG@10 of the fitted fusion of SharedBottom, MMoE,
PLE and EASE, seed 0: 0.152 with logit then standardisation, 0.151 with standardised
probabilities, 0.151 with reciprocal rank fusion).

Serving computes, per block of users, every member's score matrices ``[U, N]`` and makes ONE
`mtkernels.ops.ensemble_topk` call (transforms, weights, seen-item exclusion and top-k in one pass);
only one block of score matrices is alive at a time. A fused checkpoint holds the members (model
configs and weights, the collaborative-filtering state), the sources, weights and transforms,
and the serving tables; `mtkernels.serving.Ranker.load` serves it like a single model.
"""

from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from . import metrics as _metrics
from . import ops
from .catalogue import CatalogueScorer, user_table
from .evaluation import _check_split_and_k
from .nn import MultiTaskModel
from .nn.cf import EASE, ItemItemCF, ItemKNN, SequentialRules
from .training.checkpoint import build_model, class_path, load_checkpoint, save_checkpoint

MODES = ("weighted", "rrf")
OBJECTIVES = ("ndcg@10", "logloss")
# Applied in Python before the op (they need a whole user row or are not in the op's list) ...
ROW_TRANSFORMS = ("zscore", "logit_zscore", "logit")
# ... and inside `ensemble_topk` itself.
NATIVE_TRANSFORMS = ("identity", "sigmoid", "log_sigmoid")
TRANSFORMS = NATIVE_TRANSFORMS + ROW_TRANSFORMS
_EPS = 1e-6


class ModelMember:
    """A trained multi-task model as a fusion member: its task predictions for users x the catalogue.

    Args:
        name: member name (unique within a fusion), e.g. ``"ple"``.
        model: a trained ``mtkernels.nn.MultiTaskModel``.
        tables: ``mtkernels.serving.serving_tables`` of its data.
        users_per_block: users per block of the factorised catalogue scoring.
    """

    kind = "model"

    def __init__(self, name: str, model: torch.nn.Module, tables: Mapping[str, object], users_per_block: int = 16) -> None:
        self.name = str(name)
        self.model = model.eval()
        self.scorer = CatalogueScorer(model, tables, users_per_block)
        self.task_names = tuple(t.name for t in model.tasks)
        self.task_kinds = tuple(t.kind for t in model.tasks)

    def score(self, users: Mapping, rows: torch.Tensor, tasks: Optional[Sequence[str]] = None) -> torch.Tensor:
        """Predictions ``[U, N, len(tasks)]`` (probabilities for binary tasks, raw values for
        regression; default all tasks): only the towers of ``tasks`` run."""
        return self.scorer.score(users, rows, tasks)

    def score_pairs(self, users: Mapping, pair_users: torch.Tensor, pair_items: torch.Tensor) -> torch.Tensor:
        return self.scorer.score_pairs(users, pair_users, pair_items)

    def state(self) -> Dict[str, object]:
        return {"kind": self.kind, "name": self.name, "model_class": class_path(self.model),
                "model_config": self.model.config, "model_state": self.model.state_dict()}


CF_METHODS = {"itemknn": ItemKNN, "ease": EASE, "sr": SequentialRules}


class CFMember:
    """A collaborative-filtering model (`ItemKNN`, `EASE` or `SequentialRules`) as a fusion member:
    one task, ``"click"`` (implicit feedback), scores 0 for users without training history (cold
    users)."""

    kind = "cf"
    task_kinds = ("score",)

    def __init__(self, name: str, cf: ItemItemCF) -> None:
        self.name = str(name)
        self.cf = cf
        self.task_names = tuple(cf.task_names)

    @classmethod
    def fit(cls, data, method: str = "ease", name: Optional[str] = None, split: str = "train", **config) -> "CFMember":
        """Fit ``method`` (``"itemknn"``, ``"ease"`` or ``"sr"``, with its constructor arguments
        ``config``) on the positives of the first binary task (click) of ``data.splits[split]``,
        each user's history in time order (the split's ``timestamp`` column when it has one, else
        row order).

        Raises:
            ValueError: an unknown method.
        """
        if method not in CF_METHODS:
            raise ValueError(f"method must be one of {sorted(CF_METHODS)}, got {method!r}")
        rows = data.splits[split]
        first_binary = next((t for t, task in enumerate(data.tasks) if task.kind == "binary"), 0)
        positive = rows.labels[:, first_binary] > 0
        cf = CF_METHODS[method](data.num_items, **config)
        timestamps = (getattr(rows, "extra", None) or {}).get("timestamp")
        cf.fit(rows.user_row[positive], rows.item[positive] - 1, data.num_user_rows,
               order=None if timestamps is None else timestamps[positive])
        return cls(name or method, cf)

    def score(self, users: Mapping, rows: torch.Tensor, tasks: Optional[Sequence[str]] = None,
              skip_recent: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[U, N, 1]``; ``skip_recent``: see `mtkernels.nn.ItemItemCF.score`."""
        return self.cf.score(users, rows, skip_recent=skip_recent)

    def score_pairs(self, users: Mapping, pair_users: torch.Tensor, pair_items: torch.Tensor) -> torch.Tensor:
        return self.cf.score_pairs(users, pair_users, pair_items)

    def state(self) -> Dict[str, object]:
        return {"kind": self.kind, "name": self.name, "method": class_path(self.cf), "config": self.cf.config,
                "state": self.cf.state_dict()}


def member_from_state(state: Mapping, tables: Mapping[str, object]):
    """Rebuild a member from :meth:`state` (as stored in a fused checkpoint)."""
    if state["kind"] == ModelMember.kind:
        model = build_model({"model_class": state["model_class"], "model_config": state["model_config"],
                             "model_state": state["model_state"]}, best=False)
        return ModelMember(state["name"], model, tables)
    if state["kind"] == CFMember.kind:
        cls = {class_path_of(c): c for c in CF_METHODS.values()}.get(state["method"])
        if cls is None:
            raise ValueError(f"unknown collaborative-filtering class {state['method']!r}")
        cf = cls.from_config(state["config"])
        cf.load_state_dict(state["state"])
        return CFMember(state["name"], cf)
    raise ValueError(f"unknown fusion member kind {state['kind']!r}; known: 'model', 'cf'")


def class_path_of(cls) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def model_member_from_checkpoint(path: str, name: Optional[str] = None) -> Tuple[ModelMember, Dict[str, object]]:
    """A `ModelMember` from a training checkpoint (best weights) and its serving tables.

    Raises:
        FileNotFoundError: no file at ``path``. ValueError: not a checkpoint of a `MultiTaskModel`
            (e.g. a fused or cold-start checkpoint), or no serving tables.
    """
    checkpoint = load_checkpoint(path)
    if not checkpoint.get("serving"):
        raise ValueError(f"{path} holds no serving tables (the data set has no items to rank)")
    model = build_model(checkpoint, best=True) if "fusion" not in checkpoint else None
    if not isinstance(model, MultiTaskModel):
        raise ValueError(f"{path} is not a checkpoint of `mtkernels train` (a MultiTaskModel); fusion members are "
                         "trained models (fused and cold-start checkpoints are not)")
    name = name or model.config.get("backbone", "model")
    return ModelMember(name, model, checkpoint["serving"]), checkpoint


def _logit(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(_EPS, 1.0 - _EPS)
    return torch.log(p) - torch.log1p(-p)


def _zscore(x: torch.Tensor) -> torch.Tensor:
    """Per row: minus the mean, over the standard deviation (0 for a constant row)."""
    mean = x.mean(dim=1, keepdim=True)
    std = x.std(dim=1, keepdim=True, unbiased=False)
    return torch.where(std > 0, (x - mean) / std.clamp_min(1e-12), torch.zeros_like(x))


class ScoreFusion:
    """Fuse several members' task scores into one ranked list, with weights learned on validation.

    Args:
        members: the members (`ModelMember`, `CFMember`, or any object with ``name``,
            ``task_names``, ``score(users, rows, tasks) -> [U, N, len(tasks)]``, ``score_pairs``
            and ``state()``),
            as a sequence or ``{name: member}``; names must be unique.
        tasks: which task scores each member contributes: a sequence of task names (every member
            contributes those of its tasks that are listed, in this order), or ``{member name:
            [task names]}``. The sources are the resulting (member, task) pairs, in member order.
        weights: S source weights (finite; default ``1/S`` each), a sequence or ``{"member/task": w}``.
        transforms: one name for every source or S names: ``"zscore"`` (standardised per user
            row), ``"logit_zscore"`` (logit of a probability, then per-row standardisation),
            ``"logit"``, or the op's own ``"identity"``, ``"sigmoid"``, ``"log_sigmoid"`` (weighted
            mode only). Default: ``"logit_zscore"`` for binary tasks' probabilities, ``"zscore"``
            for the rest (ratings, collaborative-filtering scores).
        mode: ``"weighted"`` or ``"rrf"`` (reciprocal rank fusion; transforms do not apply).
        rrf_c: the constant c of reciprocal rank fusion.
        tables: ``mtkernels.serving.serving_tables`` of the data (user feature rows, seen items,
            item ids); needed by :meth:`recommend` and saved with the checkpoint.
        users_per_block: users per block of score matrices (memory: ``S x block x N`` floats).

    Raises:
        ValueError: no member, duplicate names, no source, a member with none of a task list's
            tasks, unknown task or member names, a weight
            or transform count different from S, an unknown transform or mode, non-finite weights,
            a model member trained on another data set than ``tables`` (other user or item ids).
    """

    def __init__(self, members, tasks, weights=None, transforms=None, mode: str = "weighted",
                 rrf_c: float = 60.0, tables: Optional[Mapping[str, object]] = None, users_per_block: int = 64) -> None:
        members = list(members.values()) if isinstance(members, Mapping) else list(members)
        if not members:
            raise ValueError("members must hold at least one member")
        names = [m.name for m in members]
        if len(set(names)) != len(names):
            raise ValueError(f"member names must be unique, got {names}")
        self.members = members
        self._by_name = {m.name: m for m in members}
        self.sources = self._sources(tasks)
        self.mode = self._mode(mode)
        if not (float(rrf_c) >= 0 and math.isfinite(float(rrf_c))):
            raise ValueError(f"rrf_c must be a finite number >= 0, got {rrf_c}")
        self.rrf_c = float(rrf_c)
        self.weights = self._weights(weights)
        self.transforms = self._transforms(transforms)
        self.tables = tables
        if tables is not None:
            self._check_same_data(tables)
        self.users_per_block = max(1, int(users_per_block))
        self.objective: Optional[str] = None
        self.intercept = 0.0
        self.fit_report: Dict[str, object] = {}

    # --- configuration -----------------------------------------------------------------------
    def _check_same_data(self, tables: Mapping[str, object]) -> None:
        """Every model member's serving tables must have ``tables``' users and items (the same data set)."""
        for member in self.members:
            own = getattr(getattr(member, "scorer", None), "tables", None)
            for key in ("item_ids", "user_ids") if own is not None else ():
                if not torch.equal(torch.as_tensor(own[key]), torch.as_tensor(tables[key])):
                    raise ValueError(f"member {member.name!r} was trained on another data set: its {key} differ from "
                                     "those of tables (fuse members of one data set)")

    def _sources(self, tasks) -> List[Tuple[str, str]]:
        if isinstance(tasks, str):
            tasks = [tasks]
        sources = []
        if isinstance(tasks, Mapping):
            unknown = set(tasks) - set(self._by_name)
            if unknown:
                raise ValueError(f"tasks names unknown members {sorted(unknown)}; members: {list(self._by_name)}")
            for member in self.members:
                for task in tasks.get(member.name, []):
                    if task not in member.task_names:
                        raise ValueError(f"member {member.name!r} has no task {task!r}; its tasks: {list(member.task_names)}")
                    sources.append((member.name, task))
        else:
            tasks = list(tasks)
            for member in self.members:
                sources += [(member.name, t) for t in tasks if t in member.task_names]
            missing = [m for m in self.members if not any(t in m.task_names for t in tasks)]
            if sources and missing:  # (no source at all: the error below)
                m = missing[0]
                raise ValueError(f"member {m.name!r} has none of the tasks {tasks} (its tasks: {list(m.task_names)}); "
                                 "list one of its tasks, or name each member's tasks with a mapping")
        if not sources:
            raise ValueError(f"tasks {tasks!r} select no (member, task) source; the members' tasks: "
                             f"{ {m.name: list(m.task_names) for m in self.members} }")
        return sources

    @staticmethod
    def _mode(mode: str) -> str:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        return mode

    @property
    def source_names(self) -> List[str]:
        """``"member/task"`` of every source, in order."""
        return [f"{m}/{t}" for m, t in self.sources]

    def _weights(self, weights) -> List[float]:
        count = len(self.sources)
        if weights is None:
            return [1.0 / count] * count
        if isinstance(weights, Mapping):
            unknown = set(weights) - set(self.source_names)
            if unknown:
                raise ValueError(f"weights name unknown sources {sorted(unknown)}; sources: {self.source_names}")
            weights = [float(weights.get(name, 0.0)) for name in self.source_names]
        weights = [float(w) for w in (weights.tolist() if isinstance(weights, torch.Tensor) else weights)]
        if len(weights) != count:
            raise ValueError(f"weights must hold one weight per source ({count}: {self.source_names}), got {len(weights)}")
        if not all(math.isfinite(w) for w in weights):
            raise ValueError(f"weights must be finite, got {weights}")
        return weights

    def _transforms(self, transforms) -> List[str]:
        count = len(self.sources)
        if transforms is None:  # probabilities compare on the logit scale, everything else raw
            transforms = ["logit_zscore" if self._kind(s) == "binary" else "zscore" for s in self.sources]
        if isinstance(transforms, str):
            transforms = [transforms] * count
        transforms = list(transforms)
        if len(transforms) != count:
            raise ValueError(f"transforms must hold one name per source ({count}: {self.source_names}), got {len(transforms)}")
        for name in transforms:
            if name not in TRANSFORMS:
                raise ValueError(f"unknown transform {name!r}; transforms: {TRANSFORMS}")
        return transforms

    def _kind(self, source: Tuple[str, str]) -> Optional[str]:
        member = self._by_name[source[0]]
        return dict(zip(member.task_names, getattr(member, "task_kinds", ()))).get(source[1])

    def set_weights(self, weights) -> None:
        """Replace the weights (same forms as the constructor's)."""
        self.weights = self._weights(weights)

    # --- scoring -----------------------------------------------------------------------------
    def _users(self, users: Optional[Mapping]) -> Mapping:
        if users is not None:
            return users
        if self.tables is None:
            raise ValueError("this fusion has no serving tables: pass the user feature table (users=...)")
        return user_table(self.tables)

    def _validation_users(self, data, split: Optional[str] = None) -> Mapping:
        if getattr(data, "history_feature", None) is not None:
            return user_table_of(data, split)  # the history bags of the split (serving tables hold the latest)
        if self.tables is not None:
            return user_table(self.tables)
        if hasattr(data, "user_feature_rows"):
            return user_table_of(data)
        return {}  # members that need no user features (collaborative filtering, fixed scores)

    def source_scores(self, users: Optional[Mapping], rows: torch.Tensor,
                      transforms: Optional[Sequence[str]] = None,
                      weights: Optional[Sequence[float]] = None,
                      skip_recent: Optional[torch.Tensor] = None) -> Tuple[List[torch.Tensor], List[str]]:
        """The S source matrices ``[U, N]`` of user rows ``rows``, with the row-wise transforms
        applied, and the op-side transform of each (``"identity"`` where applied here). With
        ``weights``, a source of weight 0 is not scored (``ensemble_topk`` skips it in both modes):
        its matrix is zeros, so a member with no weighted source costs nothing. ``skip_recent``
        (int ``[U]``) is passed to the collaborative-filtering members (their histories without
        each row's last ``skip_recent[u]`` items); the models do not read histories."""
        transforms = self.transforms if transforms is None else transforms
        users = self._users(users)
        rows = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
        if weights is not None and all(float(w) == 0.0 for w in weights):
            weights = None  # nothing weighted: score everything, the op decides what that means
        wanted: Dict[str, List[int]] = {}
        for s, (member, task) in enumerate(self.sources):
            if weights is None or float(weights[s]) != 0.0:
                wanted.setdefault(member, []).append(s)
        matrices: List[Optional[torch.Tensor]] = [None] * len(self.sources)
        for member in self.members:
            if member.name not in wanted:
                continue
            tasks = list(dict.fromkeys(self.sources[s][1] for s in wanted[member.name]))
            if skip_recent is not None and member.kind == CFMember.kind:
                scores = member.score(users, rows, tasks, skip_recent=skip_recent)
            else:
                scores = member.score(users, rows, tasks)  # [U, N, len(tasks)]: only the tasks fused
            for s in wanted[member.name]:
                matrices[s] = scores[:, :, tasks.index(self.sources[s][1])]
            del scores
        shape = next(m.shape for m in matrices if m is not None)
        native = []
        for s, name in enumerate(transforms):
            if matrices[s] is None:  # weight 0: never read by the op
                matrices[s] = torch.zeros(shape)
                native.append("identity")
                continue
            if self.mode == "rrf" or name in NATIVE_TRANSFORMS:
                native.append(name if self.mode == "weighted" else "identity")
                matrices[s] = matrices[s].contiguous()
                continue
            x = matrices[s]
            if name in ("logit", "logit_zscore"):
                x = _logit(x)
            if name in ("zscore", "logit_zscore"):
                x = _zscore(x)
            matrices[s] = x.contiguous()
            native.append("identity")
        return matrices, native

    @torch.no_grad()
    def topk(self, rows: torch.Tensor, k: int, exclude_offsets: Optional[torch.Tensor] = None,
             exclude_indices: Optional[torch.Tensor] = None, users: Optional[Mapping] = None,
             weights: Optional[Sequence[float]] = None, transforms: Optional[Sequence[str]] = None
             ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Fused top-k item positions of user rows ``rows``.

        Per block of ``users_per_block`` rows: every member scores the block against all N items,
        then ONE `mtkernels.ops.ensemble_topk` call fuses the S sources (transforms, weights,
        exclusions) and selects the top k. Only one block of score matrices is alive at a time.

        Args:
            rows: int64 ``[U]`` rows of the user table (``users``, default the serving tables').
            k: list length (>= 0).
            exclude_offsets, exclude_indices: optional CSR ``[U+1]`` / item positions never returned.
            users: the user feature table (``{"sparse", "multi", "dense"}``), e.g. with rows
                appended for new users; default the serving tables'.
            weights, transforms: override the fusion's own (used by :meth:`fit_weights`).

        Returns:
            ``(values [U, k] float32, indices [U, k] int64 item positions)``, best first, ties by
            the smaller position; ``(-inf, -1)`` pads when fewer than k items are left.

        Raises:
            ValueError: k < 0 or malformed exclusions (from the op).
        """
        if not isinstance(k, int) or k < 0:
            raise ValueError(f"k must be an int >= 0, got {k!r}")
        rows = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
        weights = self.weights if weights is None else list(weights)
        if (exclude_offsets is None) != (exclude_indices is None):
            raise ValueError("exclude_offsets and exclude_indices must be given together")
        if exclude_offsets is not None and exclude_offsets.numel() != rows.numel() + 1:
            raise ValueError(f"exclude_offsets must have len(rows) + 1 = {rows.numel() + 1} entries, got {exclude_offsets.numel()}")
        values, indices = [], []
        for start in range(0, rows.numel(), self.users_per_block):
            stop = min(start + self.users_per_block, rows.numel())
            matrices, native = self.source_scores(users, rows[start:stop], transforms, weights)
            offsets = block_indices = None
            if exclude_offsets is not None:
                lo, hi = int(exclude_offsets[start]), int(exclude_offsets[stop])
                offsets = exclude_offsets[start : stop + 1] - lo
                block_indices = exclude_indices[lo:hi]
            v, i = ops.ensemble_topk(matrices, weights, k, transforms=native, exclude_offsets=offsets,
                                     exclude_indices=block_indices, mode=self.mode, rrf_c=self.rrf_c)
            del matrices
            values.append(v)
            indices.append(i)
        if not values:
            return torch.zeros(0, k), torch.zeros(0, k, dtype=torch.long)
        return torch.cat(values), torch.cat(indices)

    def topk_metrics(self, data, split: str, k: int = 10) -> Dict[str, float]:
        """NDCG@k and Recall@k of the fused lists on a split of ``data`` (PROTOCOL.md §5).

        Raises:
            ValueError: ``split`` is not a split of ``data`` or has no top-k set; ``k`` < 1.
        """
        _check_split_and_k(data, split, k)
        evaluation = data.topk_eval(split)
        users = user_table_of(data, split) if getattr(data, "history_feature", None) is not None else None
        _, indices = self.topk(evaluation.users, k, evaluation.exclude_offsets, evaluation.exclude_indices, users=users)
        return {f"ndcg@{k}": float(_metrics.ndcg_at_k(indices, evaluation.relevant, k)),
                f"recall@{k}": float(_metrics.recall_at_k(indices, evaluation.relevant, k))}

    def recommend(self, user_ids: Sequence[int], k: int = 10, exclude_seen: bool = True, **kwargs):
        """Top-k items for external user ids, as `mtkernels.serving.Ranker.recommend` answers
        (cold users from side features, unknown users from popularity; ``side_features`` passes
        through). Needs ``tables``."""
        from .serving import Ranker

        if self.tables is None:
            raise ValueError("recommend needs the serving tables: build the fusion with tables=serving_tables(data)")
        return Ranker.from_fusion(self).recommend(user_ids, k=k, exclude_seen=exclude_seen, **kwargs)

    # --- learning the weights ------------------------------------------------------------------
    def fit_weights(self, validation, objective: str = "ndcg@10", seed: int = 0, split: str = "val",
                    rounds: int = 4, grid: Sequence[float] = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
                    gap_matched: bool = False) -> Dict[str, object]:
        """Learn the source weights on the validation split; deterministic for a seed.

        ``objective="ndcg@10"`` (ranking): coordinate search over the probability simplex. Start
        at equal weights; each round visits the sources in an order drawn from
        ``numpy.random.default_rng(seed)`` and, for source s, tries every ``x`` of ``grid`` as its
        share (the other weights rescaled to ``1 - x`` in their current proportions), keeping the
        best val NDCG@10 (ties: the current weights). Stops after ``rounds`` rounds or a round
        without change. Each trial is one fused top-k of every val user; the source matrices are
        computed and transformed once. The fusion's transforms are kept (``"zscore"`` default).

        ``gap_matched=True`` (temporal splits where the test period follows the validation
        period, as ml100k-mtl-v1's per-user split): a test user's relevant items come
        ``|val(u)|`` ratings after the end of the training history, a val user's directly after
        it, so history-based members (recency, sequences) look far better on val than on test and
        would get too much weight. With it, the collaborative-filtering members score each val
        user from the training history WITHOUT its last ``g_u`` items, ``g_u`` = the user's number
        of relevant val items (= |val(u)|), so val sees the test's gap; the models score as
        always. Serving and :meth:`topk_metrics` use the whole history.

        ``objective="logloss"`` (a calibrated click probability): logistic stacking (Wolpert 1992;
        Breiman 1996): a logistic regression (scikit-learn, L2, lbfgs) of the val click labels
        (positives and their sampled negatives, PROTOCOL.md §3) on each source's pointwise score
        (logit of probabilities, raw scores otherwise); its coefficients become the weights and
        transforms (``"logit"`` / ``"identity"``), its intercept `intercept`, so
        ``sigmoid(fused + intercept)`` is a click probability (:meth:`click_probability`).

        Args:
            validation: the ``mtkernels.data.MultiTaskData`` the members were trained on.
            objective: ``"ndcg@10"`` or ``"logloss"``.
            seed: seed of the coordinate order (ndcg) or of the solver (logloss).
            split: the validation split.
            rounds, grid: the coordinate search's budget and candidate shares.
            gap_matched: score the val users' collaborative-filtering sources with the test's gap
                (ndcg objective only).

        Returns:
            ``{"objective", "weights": {source: w}, "val": value of the objective before/after, ...}``
            (also kept as ``fit_report`` and saved with the checkpoint).

        Raises:
            ValueError: an unknown objective; a split without top-k sets (ndcg); the logloss
                objective in ``mode="rrf"``.
        """
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        if objective == "logloss":
            if gap_matched:
                raise ValueError("gap_matched applies to the ndcg@10 objective only")
            if self.mode != "weighted":
                raise ValueError(f"objective 'logloss' needs mode 'weighted' (its coefficients weight logits; mode "
                                 f"{self.mode!r} ranks by reciprocal ranks, which ignore them)")
            return self._fit_logistic(validation, seed, split)
        return self._fit_ndcg(validation, seed, split, rounds, grid, bool(gap_matched))

    def _fit_ndcg(self, data, seed: int, split: str, rounds: int, grid: Sequence[float],
                  gap_matched: bool = False) -> Dict[str, object]:
        evaluation = data.topk_eval(split)
        users = self._validation_users(data, split)
        gap = evaluation.relevant_offsets[1:] - evaluation.relevant_offsets[:-1] if gap_matched else None
        matrices, native = self.source_scores(users, evaluation.users, skip_recent=gap)
        stacked = torch.stack(matrices)  # [S, U, N]: the whole val set, transformed once
        del matrices

        def score(weights: Sequence[float]) -> float:
            _, indices = ops.ensemble_topk(stacked, list(weights), 10, transforms=native,
                                           exclude_offsets=evaluation.exclude_offsets,
                                           exclude_indices=evaluation.exclude_indices,
                                           mode=self.mode, rrf_c=self.rrf_c)
            return float(_metrics.ndcg_at_k(indices, evaluation.relevant, 10))

        count = len(self.sources)
        rng = np.random.default_rng(seed)
        weights = [1.0 / count] * count
        start_value = best = score(weights)
        singles = {}
        for s in range(count):
            one = [0.0] * count
            one[s] = 1.0
            singles[self.source_names[s]] = score(one)
        for _ in range(max(0, int(rounds))):
            changed = False
            for s in rng.permutation(count).tolist():
                base = list(weights)  # the line search of source s starts from the same point
                rest = sum(base) - base[s]
                if count == 1:
                    break
                # the others keep their proportions (equal shares when they are all 0)
                others = [base[j] / rest if rest > 0 else 1.0 / (count - 1) for j in range(count)]
                for share in grid:
                    trial = [share if j == s else (1.0 - share) * others[j] for j in range(count)]
                    value = score(trial)
                    if value > best + 1e-9:
                        best, weights, changed = value, trial, True
            if not changed:
                break
        self.weights = weights
        self.objective = "ndcg@10"
        self.intercept = 0.0
        self.fit_report = {"objective": "ndcg@10", "split": split, "seed": int(seed), "method": "coordinate search on the simplex",
                           "weights": dict(zip(self.source_names, weights)), "transforms": dict(zip(self.source_names, self.transforms)),
                           "gap_matched": gap_matched,
                           "val_equal_weights": start_value, "val_fitted": best, "val_single_sources": singles}
        return self.fit_report

    def _fit_logistic(self, data, seed: int, split: str) -> Dict[str, object]:
        from sklearn.linear_model import LogisticRegression

        rows = data.splits[split]
        click = next((t for t, task in enumerate(data.tasks) if task.kind == "binary"), 0)
        labels = rows.labels[:, click]
        keep = ~torch.isnan(labels)
        pair_users, pair_items, labels = rows.user_row[keep], rows.item[keep] - 1, labels[keep]
        users = self._validation_users(data, split)
        features, transforms = [], []
        cache: Dict[str, torch.Tensor] = {}
        for member_name, task in self.sources:
            member = self._by_name[member_name]
            if member_name not in cache:
                cache[member_name] = member.score_pairs(users, pair_users, pair_items)
            column = cache[member_name][:, member.task_names.index(task)]
            kind = dict(zip(member.task_names, getattr(member, "task_kinds", ()))).get(task)
            if kind == "binary":
                features.append(_logit(column))
                transforms.append("logit")
            else:
                features.append(column)
                transforms.append("identity")
        x = torch.stack(features, dim=1).double().numpy()
        y = labels.double().numpy()
        model = LogisticRegression(C=1.0, max_iter=1000, random_state=seed).fit(x, y)
        p = model.predict_proba(x)[:, 1]
        self.transforms = transforms
        self.weights = [float(w) for w in model.coef_[0]]
        self.intercept = float(model.intercept_[0])
        self.objective = "logloss"
        self.fit_report = {"objective": "logloss", "split": split, "seed": int(seed), "method": "logistic stacking",
                           "weights": dict(zip(self.source_names, self.weights)), "intercept": self.intercept,
                           "transforms": dict(zip(self.source_names, transforms)),
                           "val_logloss": float(_metrics.logloss(y, p))}
        return self.fit_report

    @torch.no_grad()
    def click_probability(self, pair_users: torch.Tensor, pair_items: torch.Tensor, users: Optional[Mapping] = None) -> torch.Tensor:
        """``sigmoid(sum_s w_s * transform_s(score_s) + intercept)`` of (user row, item position)
        pairs ``[P]``: a calibrated click probability after ``fit_weights(objective="logloss")``.

        Raises:
            ValueError: a source transform that needs whole user rows (``zscore``...).
        """
        users = self._users(users)
        total = torch.full((torch.as_tensor(pair_users).numel(),), self.intercept, dtype=torch.float64)
        cache: Dict[str, torch.Tensor] = {}
        for (member_name, task), w, name in zip(self.sources, self.weights, self.transforms):
            if name not in ("identity", "logit", "sigmoid", "log_sigmoid"):
                raise ValueError(f"click_probability needs pointwise transforms, got {name!r} (fit with objective='logloss')")
            member = self._by_name[member_name]
            if member_name not in cache:
                cache[member_name] = member.score_pairs(users, pair_users, pair_items)
            x = cache[member_name][:, member.task_names.index(task)].double()
            x = {"identity": x, "logit": _logit(x), "sigmoid": torch.sigmoid(x),
                 "log_sigmoid": torch.nn.functional.logsigmoid(x)}[name]
            total += w * x
        return torch.sigmoid(total).float()

    # --- checkpoints ---------------------------------------------------------------------------
    def state(self) -> Dict[str, object]:
        """The ``"fusion"`` entry of a fused checkpoint."""
        return {"members": [m.state() for m in self.members], "sources": [list(s) for s in self.sources],
                "weights": list(self.weights), "transforms": list(self.transforms), "mode": self.mode,
                "rrf_c": self.rrf_c, "objective": self.objective, "intercept": self.intercept,
                "fit_report": self.fit_report}

    def save(self, path: str, extra: Optional[Mapping[str, object]] = None) -> None:
        """Write a fused checkpoint (atomically): ``format``, ``fusion`` (:meth:`state`),
        ``serving`` (the tables), ``tasks`` (one ranking score) and any ``extra`` entries."""
        checkpoint = {"fusion": self.state(), "serving": self.tables,
                      "tasks": [{"name": "fused", "kind": "score"}]}
        checkpoint.update(dict(extra or {}))
        save_checkpoint(path, checkpoint)

    @classmethod
    def from_checkpoint(cls, checkpoint: Mapping[str, object], users_per_block: int = 64) -> "ScoreFusion":
        """Rebuild from a loaded fused checkpoint (see :meth:`save`)."""
        state = checkpoint["fusion"]
        tables = checkpoint.get("serving")
        members = [member_from_state(m, tables) for m in state["members"]]
        tasks: Dict[str, List[str]] = {}
        for member, task in state["sources"]:
            tasks.setdefault(member, []).append(task)
        fusion = cls(members, tasks, state["weights"], state["transforms"], state["mode"], state["rrf_c"],
                     tables, users_per_block)
        fusion.objective = state.get("objective")
        fusion.intercept = float(state.get("intercept") or 0.0)
        fusion.fit_report = dict(state.get("fit_report") or {})
        return fusion

    @classmethod
    def load(cls, path: str, users_per_block: int = 64) -> "ScoreFusion":
        """Read a fused checkpoint written by :meth:`save`.

        Raises:
            FileNotFoundError: no file. ValueError: not an mtkernels checkpoint, or not a fused one.
        """
        checkpoint = load_checkpoint(path)
        if "fusion" not in checkpoint:
            raise ValueError(f"{path} is a single-model checkpoint, not a fused one (no 'fusion' entry)")
        return cls.from_checkpoint(checkpoint, users_per_block)


def user_table_of(data, split: Optional[str] = None) -> Dict[str, object]:
    """The user feature table of a ``MultiTaskData`` (every user-table row), as scorers take it;
    ``split``: the split being ranked (its user-history bags, when the data has them)."""
    rows = data.user_feature_rows(split=split, users=torch.arange(int(data.num_user_rows)))
    return {"sparse": rows.sparse, "multi": rows.multi, "dense": rows.dense}

