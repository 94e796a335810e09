"""Cold-start users: a learned item prior from side features, and a selection set built from train.

A user never seen in training is known only by side features (ml100k: age, gender, occupation,
zip). Two pieces serve such users (issue 7):

- `ItemPrior`: ``log P(item | user side features)``, a multinomial logistic regression over the
  whole item catalogue (one softmax over the N items, an item bias plus one row of N logits per
  value of each side feature or feature cross), trained by `fit_item_prior` with cross-entropy on
  the training positives and an L2 penalty that shrinks every group towards the item bias (the
  overall popularity). It is the catalogue-wide softmax of YouTube's candidate generator
  (Covington et al., "Deep Neural Networks for YouTube Recommendations", RecSys 2016) with
  demographic inputs only, the setting those authors name for new users.
- `ColdStartModel`: wraps a trained multi-task model; rows whose user id is the unknown id 0 get
  a ranking score that blends the model's click logit with the prior's log-probability
  (``weight`` 0: the model alone, 1: the prior alone), every other row is left exactly as the
  model scores it (warm users are unchanged). `mtkernels.evaluation.evaluate` (test_cold) and
  `mtkernels.serving.Ranker` (unknown ids with side features) use it as they use any model.

Choosing the blend weight needs cold users that are not test users. `val` scored as cold measures
a warm user's *next* items, while test_cold's relevant set is a cold user's *whole* history; so
`pseudo_cold_ml100k` holds out a random share of the warm training users entirely (their train
rows leave training) and puts them in a ``pseudo_cold`` split whose relevant items are their
whole training history over the whole catalogue, test_cold's shape built from train rows only.
"""

from __future__ import annotations

import importlib
import math
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

PSEUDO_COLD_SPLIT = "pseudo_cold"

# The recipe chosen on pseudo-cold users (README, "Transfer learning and cold start"): the prior's
# groups, L2 and passes (screened on pseudo-cold draws and folds) and the blend weight with the MMoE
# click model (best mean NDCG@10 over 5 disjoint pseudo-cold folds, all 849 warm users: 0.9 scored
# 0.4999, the prior alone 0.4957, the click model alone 0.4507). `mtkernels cold-start` defaults.
RECOMMENDED = {"features": (("gender", "age"),), "l2": 1e-4, "epochs": 10, "weight": 0.9}


# --- selection data ---------------------------------------------------------------------------
def pseudo_cold_ml100k(fraction: float = 0.10, seed: int = 0, data_dir=None, movielens=None,
                       folds: Optional[int] = None, fold: int = 0):
    """ml100k-mtl-v1 with a share of the warm training users held out as cold users (selection data).

    The held-out users (``round(fraction * 849)`` drawn by ``numpy.random.default_rng([7, seed])``
    from the warm users, ascending) lose every row: their train rows form the ``pseudo_cold``
    split (top-k: candidates = all items, relevant = all their training positives, as PROTOCOL.md
    §5 defines test_cold), their val rows are dropped. The other users keep train and val. The test
    splits (test_warm, test_cold) are left out, so nothing chosen on this data set saw test data.
    The held-out users are encoded like cold users (unknown user id 0, mean history features);
    dense statistics and vocabularies come from the remaining training rows only.

    Args:
        fraction: share of the warm users to hold out, in (0, 1).
        seed: which draw.
        folds, fold: K-fold mode (K >= 2, fold in [0, K)); None: one random share.
        data_dir: ML-100K folder (as `mtkernels.data.load_ml100k_mtl_v1`); ``movielens``: an
            already read `MovieLens` to reuse instead.

    Returns:
        a `MultiTaskData` with splits ``train``, ``val``, ``pseudo_cold``.

    Raises:
        ValueError: fraction outside (0, 1); folds < 2 or fold outside [0, folds).
    """
    from .data import movielens as _movielens
    from .data import protocol

    if not 0.0 < float(fraction) < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    if folds is not None and (int(folds) < 2 or not 0 <= int(fold) < int(folds)):
        raise ValueError(f"need folds >= 2 and 0 <= fold < folds, got folds={folds}, fold={fold}")
    source = movielens if movielens is not None else _movielens.read_movielens_100k(data_dir)
    catalogue = np.sort(np.union1d(source.items["item_id"].to_numpy(), source.ratings["item_id"].unique()))
    splits = protocol.build_splits(source.ratings, catalogue)
    train = splits["train"]
    warm = np.unique(train["user_id"].to_numpy())
    order = np.random.default_rng([7, seed]).permutation(warm)
    if folds is None:
        held = np.sort(order[:int(math.floor(fraction * len(warm) + 0.5))])
    else:
        held = np.sort(order[np.arange(len(order)) % int(folds) == int(fold)])
    held_rows = train["user_id"].isin(held).to_numpy()
    val = splits["val"]
    selection = {"train": train[~held_rows], "val": val[~val["user_id"].isin(held).to_numpy()],
                 PSEUDO_COLD_SPLIT: train[held_rows]}
    return _movielens.build_ml100k_mtl_v1(source, selection)


# --- the item prior ---------------------------------------------------------------------------
def _as_groups(features: Sequence[Union[str, Sequence[str]]]) -> Tuple[Tuple[str, ...], ...]:
    groups = []
    for group in features:
        group = (group,) if isinstance(group, str) else tuple(group)
        if not group or not all(isinstance(name, str) for name in group):
            raise ValueError(f"features: each entry must be a feature name or a tuple of names, got {group!r}")
        groups.append(group)
    return tuple(groups)


class ItemPrior(nn.Module):
    """``log P(item | user side features)`` over a catalogue of N items (multinomial logistic regression).

    ``logits[b, n] = bias[n] + sum_g table_g[value_g(b), n]`` where each group g is one user-side
    single-valued feature or a cross of several (its value = the mixed-radix combination of the
    members' ids). ``log_softmax`` over the N items gives the log-probability that a positive of a
    user with those features is item n.

    Args:
        num_items: N, the catalogue size (items are positions 0..N-1).
        cardinalities: ``{feature: number of ids}`` of every feature the groups use.
        features: the groups, e.g. ``("age", ("gender", "age"))``.

    Raises:
        ValueError: N < 1, an empty or malformed group, a group feature without a cardinality.
    """

    def __init__(self, num_items: int, cardinalities: Mapping[str, int],
                 features: Sequence[Union[str, Sequence[str]]] = (("gender", "age"),)) -> None:
        super().__init__()
        if int(num_items) < 1:
            raise ValueError(f"num_items must be >= 1, got {num_items}")
        self.num_items = int(num_items)
        self.groups = _as_groups(features)
        self.cardinalities = {k: int(v) for k, v in cardinalities.items()}
        for group in self.groups:
            for name in group:
                if name not in self.cardinalities:
                    raise ValueError(f"features: {name!r} has no cardinality; known: {sorted(self.cardinalities)}")
        self.bias = nn.Parameter(torch.zeros(self.num_items))
        self.tables = nn.ParameterList(
            [nn.Parameter(torch.zeros(math.prod(self.cardinalities[n] for n in g), self.num_items)) for g in self.groups])

    @property
    def config(self) -> dict:
        """Plain constructor arguments: ``ItemPrior(**config)`` rebuilds it (fresh parameters)."""
        return {"num_items": self.num_items, "cardinalities": dict(self.cardinalities),
                "features": [list(g) for g in self.groups]}

    def group_values(self, side: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """int64 ``[B, G]``: each row's id in every group (features crossed by mixed radix).

        Raises:
            KeyError: a feature of a group missing from ``side``. IndexError: an id out of range.
        """
        columns = []
        for group in self.groups:
            value = None
            for name in group:
                if name not in side:
                    raise KeyError(f"side features lack {name!r} (the prior uses {self.groups})")
                ids = side[name].long()
                if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.cardinalities[name]):
                    raise IndexError(f"{name}: ids must be in [0, {self.cardinalities[name]}), "
                                     f"got {int(ids.min())}..{int(ids.max())}")
                value = ids if value is None else value * self.cardinalities[name] + ids
            columns.append(value)
        return torch.stack(columns, dim=1)

    def logits(self, side: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """float32 ``[B, N]`` unnormalised logits for B users given ``side = {feature: int64 [B]}``."""
        values = self.group_values(side)
        out = self.bias.expand(values.shape[0], -1)
        for g, table in enumerate(self.tables):
            out = out + table[values[:, g]]
        return out

    def forward(self, side: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """float32 ``[B, N]`` ``log P(item | side)`` (rows sum to 1 after ``exp``)."""
        return torch.log_softmax(self.logits(side), dim=1)

    def log_prob(self, side: Mapping[str, torch.Tensor], items: torch.Tensor) -> torch.Tensor:
        """float32 ``[B]`` ``log P(items[b] | side of row b)``; the softmax is computed once per
        distinct feature combination (a scoring batch of U users x N items has at most U).

        Raises:
            IndexError: an item position outside ``[0, N)``.
        """
        items = items.long()
        if items.numel() and (int(items.min()) < 0 or int(items.max()) >= self.num_items):
            raise IndexError(f"items: positions must be in [0, {self.num_items}), got {int(items.min())}..{int(items.max())}")
        values = self.group_values(side)
        if values.shape[0] == 0:
            return torch.zeros(0)
        profiles, inverse = torch.unique(values, dim=0, return_inverse=True)
        out = self.bias.expand(profiles.shape[0], -1)
        for g, table in enumerate(self.tables):
            out = out + table[profiles[:, g]]
        return torch.log_softmax(out, dim=1)[inverse, items]


def item_prior_for(data, features: Sequence[Union[str, Sequence[str]]] = (("gender", "age"),)) -> ItemPrior:
    """An untrained `ItemPrior` sized for a `MultiTaskData` (its catalogue and user-side features).

    Raises:
        ValueError: a group names a feature that is not a single-valued user-side feature of ``data``.
    """
    specs = {f.name: f for f in data.features if f.side == "user" and not f.multi_valued}
    for group in _as_groups(features):
        for name in group:
            if name not in specs:
                raise ValueError(f"features: {name!r} is not a single-valued user feature of {data.name}; "
                                 f"those are {sorted(specs)}")
    return ItemPrior(data.num_items, {name: spec.num_embeddings for name, spec in specs.items()}, features)


def fit_item_prior(prior: ItemPrior, data, l2: Union[float, Sequence[float]] = 1e-4, epochs: int = 20, lr: float = 0.05,
                   batch_size: int = 4096, seed: int = 0, split: str = "train") -> ItemPrior:
    """Train ``prior`` on the positives (first binary task) of ``split`` by cross-entropy.

    Loss per step: mean ``-log P(item | user side)`` over the batch's positives plus
    ``sum_g l2_g * ||table_g||^2`` (the bias is not penalised: with large ``l2`` the prior is the
    overall item popularity, with small ``l2`` each group's own popularity). ``l2`` is one number
    for every group or one per group (in ``prior.groups`` order), so a weak feature can be shrunk
    harder than a strong one (hierarchical shrinkage). Adam, ``epochs``
    passes in a seeded order. The problem is convex, so a fixed number of passes is enough.

    Returns:
        ``prior`` (trained in place), in eval mode.

    Raises:
        ValueError: an l2 < 0 or a list of l2 whose length is not the number of groups, epochs < 1,
            batch_size < 1, or no positive rows in ``split``.
    """
    l2s = [float(v) for v in l2] if isinstance(l2, (list, tuple)) else [float(l2)] * len(prior.groups)
    if len(l2s) != len(prior.groups):
        raise ValueError(f"l2: need one value or one per group ({len(prior.groups)}: {prior.groups}), got {l2}")
    if any(v < 0 for v in l2s) or epochs < 1 or batch_size < 1:
        raise ValueError(f"need l2 >= 0, epochs >= 1, batch_size >= 1; got {l2}, {epochs}, {batch_size}")
    rows = data.splits[split]
    first_binary = next((t for t, task in enumerate(data.tasks) if task.kind == "binary"), 0)
    positive = rows.labels[:, first_binary] > 0
    users, items = rows.user_row[positive], rows.item[positive] - 1
    if users.numel() == 0:
        raise ValueError(f"split {split!r} has no positive rows to train the item prior on")
    side = data.user_feature_rows(users=users).sparse
    values = prior.group_values(side)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(prior.parameters(), lr=lr)
    prior.train()
    for _ in range(epochs):
        order = torch.randperm(users.numel(), generator=generator)
        for start in range(0, order.numel(), batch_size):
            batch = order[start:start + batch_size]
            logits = prior.bias.expand(batch.numel(), -1)
            penalty = 0.0
            for g, table in enumerate(prior.tables):
                logits = logits + table[values[batch, g]]
                penalty = penalty + l2s[g] * table.pow(2).sum()
            loss = torch.nn.functional.cross_entropy(logits, items[batch]) + penalty
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return prior.eval()


# --- the cold-start model ---------------------------------------------------------------------
class ColdStartModel(nn.Module):
    """A multi-task model whose cold-user rows rank with a blend of its click score and an `ItemPrior`.

    ``forward(sparse, dense)`` returns ``model(sparse, dense)`` ``[B, T]``; in rows whose
    ``user_id`` is the unknown id 0, task ``task``'s probability p becomes

        ``sigmoid((1 - weight) * logit(p) + weight * (log P(item | side) + log N))``

    (``log N`` centres the prior: a uniform prior adds 0). ``weight`` 0 is the model alone, 1 the
    prior alone. Other rows (known users, and the unknown item id 0) and tasks are returned unchanged, so warm users score exactly as with
    ``model``. The cold click output is then a ranking score more than a calibrated probability.

    Args:
        model: a trained `MultiTaskModel` (or any module with ``tasks`` and that forward).
        prior: a trained `ItemPrior` over the same catalogue.
        weight: the blend weight in [0, 1] (chosen on `pseudo_cold_ml100k`, never on test).
        task: the task whose score is blended (default: the first binary task).
        user_id_feature, item_id_feature: the id features (item ids are positions + 1, 0 unknown).

    Raises:
        ValueError: weight outside [0, 1], an unknown task name.
    """

    def __init__(self, model: nn.Module, prior: ItemPrior, weight: float, task: Optional[str] = None,
                 user_id_feature: str = "user_id", item_id_feature: str = "item_id") -> None:
        super().__init__()
        if not 0.0 <= float(weight) <= 1.0:
            raise ValueError(f"weight must be in [0, 1], got {weight}")
        tasks = list(model.tasks)
        names = [t.name for t in tasks]
        if task is None:
            task = next((t.name for t in tasks if t.kind == "binary"), names[0])
        if task not in names:
            raise ValueError(f"task {task!r} is not a task of the model; its tasks are {names}")
        self.model = model
        self.prior = prior
        self.weight = float(weight)
        self.task = task
        self.task_index = names.index(task)
        self.user_id_feature = user_id_feature
        self.item_id_feature = item_id_feature

    @property
    def tasks(self):
        return list(self.model.tasks)

    @property
    def config(self) -> dict:
        """Plain config; ``ColdStartModel.from_config(config)`` rebuilds it (fresh parameters: load
        the ``state_dict``, keys ``model.*`` and ``prior.*``), so `mtkernels.training.checkpoint`
        and ``Ranker.load`` serve it like any model (see `cold_start_checkpoint`)."""
        from .training.checkpoint import class_path

        return {"model_class": class_path(self.model), "model_config": self.model.config,
                "prior": self.prior.config, "weight": self.weight, "task": self.task,
                "user_id_feature": self.user_id_feature, "item_id_feature": self.item_id_feature}

    @classmethod
    def from_config(cls, config: dict) -> "ColdStartModel":
        module_name, _, qualname = config["model_class"].partition(":")
        model_cls = importlib.import_module(module_name)
        for part in qualname.split("."):
            model_cls = getattr(model_cls, part)
        return cls(model_cls.from_config(config["model_config"]), ItemPrior(**config["prior"]), config["weight"],
                   config["task"], config["user_id_feature"], config["item_id_feature"])

    def forward(self, sparse, dense: Optional[torch.Tensor] = None) -> torch.Tensor:
        out = self.model(sparse, dense)
        if self.weight == 0.0:
            return out
        item_ids = sparse[self.item_id_feature]["values"]
        # an unknown item (id 0) has no prior: such rows keep the model's score
        cold = (sparse[self.user_id_feature]["values"] == 0) & (item_ids > 0)
        if not bool(cold.any()):
            return out
        side = {name: sparse[name]["values"][cold] for group in self.prior.groups for name in group}
        items = item_ids[cold] - 1
        prior = self.prior.log_prob(side, items) + math.log(self.prior.num_items)
        p = out[cold, self.task_index].double().clamp(1e-7, 1 - 1e-7)
        score = (1.0 - self.weight) * torch.log(p / (1 - p)) + self.weight * prior.double()
        out = out.clone()
        out[cold, self.task_index] = torch.sigmoid(score).to(out.dtype)
        return out


def cold_start_checkpoint(model: ColdStartModel, data) -> dict:
    """A checkpoint dict of ``model`` that ``mtkernels.training.checkpoint.save_checkpoint`` writes
    and ``mtkernels.serving.Ranker.load`` serves (with ``data``'s serving tables)."""
    from .serving import serving_tables
    from .training.checkpoint import class_path

    return {"model_class": class_path(model), "model_config": model.config, "model_state": model.state_dict(),
            "best_model_state": None, "tasks": [{"name": t.name, "kind": t.kind} for t in model.tasks],
            "serving": serving_tables(data)}
