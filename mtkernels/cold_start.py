"""Cold-start users: a learned item prior from side features, and a selection set built from train.

A user never seen in training is known only by side features (ml100k: age, gender, occupation,
zip) and by *when* they arrive. Three pieces serve such users (issue 7):

- `ItemPrior`: ``log P(item | user side features)``, a multinomial logistic regression over the
  whole item catalogue (one softmax over the N items, an item bias plus one row of N logits per
  value of each side feature or feature cross), trained by `fit_item_prior` with cross-entropy on
  the training positives and an L2 penalty that shrinks every group towards the item bias (the
  overall popularity). It is the catalogue-wide softmax of YouTube's candidate generator
  (Covington et al., "Deep Neural Networks for YouTube Recommendations", RecSys 2016) with
  demographic inputs only, the setting those authors name for new users.
- `RecentPopularityPrior`: ``log P(item | request time t0)``, exponentially time-decayed counts
  of the training positives rated at or before t0 (causal: nothing after t0 counts), mixed with
  the all-time counts up to t0. A new user's ratings are concentrated in time and item popularity
  moves, so the arrival time says what they will rate. A user's request time is the earliest
  timestamp of their rows in the split being ranked (`request_times`); serving takes it as ``at``.
  `FirstSessionPrior` is the same over each training user's first session only (their positives
  within D days of their first one): what users rate when they are new.
- `ColdStartModel`: wraps a trained multi-task model; rows whose user id is the unknown id 0 get
  a ranking score that blends the model's click logit with the priors' log-probabilities
  (``weight`` 0: the model alone, 1: the priors alone; ``recent_share``: the time-aware prior's
  part of the prior term), every other row is left exactly as the model scores it (warm users are
  unchanged). `mtkernels.evaluation.evaluate` (test_cold) and `mtkernels.serving.Ranker` (unknown
  ids with side features, ``recommend(..., at=)``) use it as they use any model.

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
# groups, L2 and passes (screened on pseudo-cold draws and folds); the time-aware prior's mix
# (screened on the 5 folds, prior terms alone); its first-session length D (0.1, 1, 7 days,
# screened on the 5 folds); which counts it uses (every training positive, or first sessions of
# 1 day), its half-life (7, 10, 14 days), its share of the prior term and the blend weight with
# the MMoE click model, the best mean NDCG@10 over 5 disjoint pseudo-cold folds (all 849 warm
# users): first sessions, half-life 14, share 0.5, weight 1 (the priors alone) 0.5109; every
# training positive (half-life 10) 0.5096, a tie (+0.0012 ± 0.0012 per user, paired); the gender
# x age prior blended 0.9 with the click model 0.4989, the click model alone 0.4507.
# `mtkernels cold-start` defaults.
RECOMMENDED = {"features": (("gender", "age"),), "l2": 1e-4, "epochs": 10, "weight": 1.0,
               "half_life_days": 14.0, "mix": 0.1, "recent_share": 0.5, "session_days": 1.0}


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
    if not groups:
        raise ValueError("features: give at least one feature or group (the item bias alone is plain popularity)")
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
        ValueError: N < 1, no group, an empty or malformed group, a group feature without a cardinality.
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
        ValueError: an l2 < 0 or not finite, or a list of l2 whose length is not the number of groups, epochs < 1,
            batch_size < 1, or no positive rows in ``split``.
    """
    l2s = [float(v) for v in l2] if isinstance(l2, (list, tuple)) else [float(l2)] * len(prior.groups)
    if len(l2s) != len(prior.groups):
        raise ValueError(f"l2: need one value or one per group ({len(prior.groups)}: {prior.groups}), got {l2}")
    if not all(v >= 0 and math.isfinite(v) for v in l2s) or epochs < 1 or batch_size < 1:
        raise ValueError(f"need finite l2 >= 0, epochs >= 1, batch_size >= 1; got {l2}, {epochs}, {batch_size}")
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


# --- the time-aware popularity prior -----------------------------------------------------------
SECONDS_PER_DAY = 86400.0


class RecentPopularityPrior(nn.Module):
    """``log P(item | request time t0)``: causal, exponentially time-decayed popularity of the N items.

    A new user's ratings are concentrated in time (ml100k: median span 0.06 days) and item
    popularity moves with releases, so *when* an unknown user arrives says what they will rate.
    From the training positives (item ``i_p``, timestamp ``s_p``) and a request time ``t0``:

        ``c(n) = sum_{p: i_p = n, s_p <= t0} 2 ** (-(t0 - s_p) / (86400 * half_life_days))``
        ``g(n) = 1 + #{p: i_p = n, s_p <= t0}``
        ``P(n | t0) = (1 - mix) * c(n) / sum(c) + mix * g(n) / sum(g)``

    Only ratings at or before ``t0`` count (no future); the second term (all-time counts up to
    ``t0``, add-one smoothed) keeps every probability positive, and is all there is when nothing was
    rated before ``t0``. This is the time-aware popularity baseline of Ji et al., "A Re-visit of
    the Popularity Baseline in Recommender Systems" (SIGIR 2020, arXiv:2005.13829: on MovieLens,
    the items popular when the user interacts beat training-set MostPop by 70% or more), with
    exponential decay in place of a fixed window.

    Args:
        num_items: N (items are positions 0..N-1).
        half_life_days: h > 0, the age (days) at which a rating counts half.
        mix: share of the all-time term, in (0, 1].
        num_ratings: P, the number of stored training positives (sizes the buffers, so that
            ``RecentPopularityPrior(**config)`` can load a ``state_dict``).

    Buffers (``state_dict`` keys): ``items`` int64 ``[P]`` item positions, ``timestamps`` int64
    ``[P]`` seconds (Unix time), sorted by time; fill them with `fit` or `recent_popularity_prior_for`.

    Raises:
        ValueError: N < 1, half_life_days not > 0 (or not finite), mix outside (0, 1], P < 0.
    """

    def __init__(self, num_items: int, half_life_days: float, mix: float = 0.1, num_ratings: int = 0) -> None:
        super().__init__()
        if int(num_items) < 1:
            raise ValueError(f"num_items must be >= 1, got {num_items}")
        if not (math.isfinite(float(half_life_days)) and float(half_life_days) > 0):
            raise ValueError(f"half_life_days must be a positive number of days, got {half_life_days}")
        if not 0.0 < float(mix) <= 1.0:
            raise ValueError(f"mix must be in (0, 1], got {mix}")
        if int(num_ratings) < 0:
            raise ValueError(f"num_ratings must be >= 0, got {num_ratings}")
        self.num_items = int(num_items)
        self.half_life_days = float(half_life_days)
        self.mix = float(mix)
        self.register_buffer("items", torch.zeros(int(num_ratings), dtype=torch.long))
        self.register_buffer("timestamps", torch.zeros(int(num_ratings), dtype=torch.long))

    @property
    def config(self) -> dict:
        """Plain constructor arguments: ``RecentPopularityPrior(**config)`` rebuilds it (empty
        buffers of the right size: load the ``state_dict``)."""
        return {"num_items": self.num_items, "half_life_days": self.half_life_days, "mix": self.mix,
                "num_ratings": int(self.items.numel())}

    def fit(self, items: torch.Tensor, timestamps: torch.Tensor) -> "RecentPopularityPrior":
        """Store the training positives: item positions int64 ``[P]`` in ``[0, N)`` and their
        timestamps int64 ``[P]`` (seconds). Returns ``self``.

        Raises:
            ValueError: different lengths, not 1-D. IndexError: an item outside ``[0, N)``.
        """
        items, timestamps = torch.as_tensor(items).long().reshape(-1), torch.as_tensor(timestamps).long().reshape(-1)
        if items.numel() != timestamps.numel():
            raise ValueError(f"items and timestamps must have the same length, got {items.numel()} and {timestamps.numel()}")
        if items.numel() and (int(items.min()) < 0 or int(items.max()) >= self.num_items):
            raise IndexError(f"items: positions must be in [0, {self.num_items}), got {int(items.min())}..{int(items.max())}")
        order = torch.sort(timestamps, stable=True).indices
        self.items = items[order].clone()
        self.timestamps = timestamps[order].clone()
        return self

    @property
    def latest(self) -> int:
        """The latest stored timestamp (seconds): the default request time of serving.

        Raises:
            ValueError: no ratings stored."""
        if self.timestamps.numel() == 0:
            raise ValueError("the recent-popularity prior holds no ratings (fit it first)")
        return int(self.timestamps[-1])

    def _check_at(self, at) -> torch.Tensor:
        if at is None:
            raise ValueError("at: the time-aware prior needs the request time (seconds, Unix time) of every row, got None")
        at = torch.as_tensor(at)
        if at.dim() > 1 or at.is_floating_point() and not bool(torch.isfinite(at).all()):
            raise ValueError(f"at: request times must be a number or a 1-D tensor of finite seconds, got {at}")
        return at.double().reshape(-1)

    def forward(self, at) -> torch.Tensor:
        """float32 ``[B, N]`` ``log P(item | t0 = at[b])`` for request times ``at`` (seconds, ``[B]`` or
        a number); computed once per distinct time.

        Raises:
            ValueError: ``at`` None, not 1-D, or not finite.
        """
        at = self._check_at(at)
        times, inverse = torch.unique(at, return_inverse=True)
        return self._log_prob_at(times)[inverse]

    def _log_prob_at(self, times: torch.Tensor) -> torch.Tensor:
        out = torch.empty(times.numel(), self.num_items, dtype=torch.float64)
        stamps = self.timestamps.double()
        scale = math.log(2.0) / (SECONDS_PER_DAY * self.half_life_days)
        for j, t0 in enumerate(times.tolist()):
            known = int(torch.searchsorted(stamps, torch.tensor([t0], dtype=torch.float64), right=True))
            items = self.items[:known]
            # relative to the newest known rating: exp() of an age of hundreds of half-lives underflows to 0
            decay = torch.exp(-(stamps[known - 1] - stamps[:known]) * scale) if known else stamps[:0]
            recent = torch.bincount(items, weights=decay, minlength=self.num_items).double()
            overall = torch.bincount(items, minlength=self.num_items).double() + 1.0
            prob = self.mix * overall / overall.sum()
            if float(recent.sum()) > 0:
                prob = prob + (1.0 - self.mix) * recent / recent.sum()
            else:
                prob = overall / overall.sum()
            out[j] = torch.log(prob)
        return out.float()

    def log_prob(self, items: torch.Tensor, at) -> torch.Tensor:
        """float32 ``[B]`` ``log P(items[b] | t0 = at[b])`` (``at``: ``[B]`` seconds or one number).

        Raises:
            IndexError: an item position outside ``[0, N)``. ValueError: a bad ``at``, or a length
                other than B.
        """
        items = items.long()
        if items.numel() and (int(items.min()) < 0 or int(items.max()) >= self.num_items):
            raise IndexError(f"items: positions must be in [0, {self.num_items}), got {int(items.min())}..{int(items.max())}")
        at = self._check_at(at)
        if at.numel() == 1:
            at = at.expand(items.numel())
        if at.numel() != items.numel():
            raise ValueError(f"at: need one request time or one per row ({items.numel()}), got {at.numel()}")
        if items.numel() == 0:
            return torch.zeros(0)
        times, inverse = torch.unique(at, return_inverse=True)
        return self._log_prob_at(times)[inverse, items]


def recent_popularity_prior_for(data, half_life_days: float, mix: float = 0.1, split: str = "train") -> RecentPopularityPrior:
    """A `RecentPopularityPrior` over ``data``'s catalogue, filled with the positives (first binary
    task) of ``split`` and their ``timestamp`` column.

    Raises:
        ValueError: no such split, or it has no ``timestamp`` column; a bad half-life or mix (as the class).
    """
    rows = _split(data, split)
    if "timestamp" not in (rows.extra or {}):
        raise ValueError(f"split {split!r} of {data.name} has no timestamp column: the time-aware prior needs one")
    first_binary = next((t for t, task in enumerate(data.tasks) if task.kind == "binary"), 0)
    positive = rows.labels[:, first_binary] > 0
    prior = RecentPopularityPrior(data.num_items, half_life_days, mix)
    return prior.fit(rows.item[positive] - 1, rows.extra["timestamp"][positive])


class FirstSessionPrior(RecentPopularityPrior):
    """``log P(item | t0)`` from the training users' *first sessions* only (sign-up popularity).

    A cold user's relevant items are essentially their sign-up session (ml100k test_cold: median
    span 0.06 days, 83% of the ratings within a day of the first), and what a user rates on
    sign-up (MovieLens showed new users a list of films to rate) is not what long-time users
    rate at the same moment. So this prior counts, of each training user's positives, only those
    rated within ``session_days`` days of that user's first training positive (their first
    session), and otherwise is exactly `RecentPopularityPrior` over those ratings:

        ``F = {p: s_p <= first(u_p) + 86400 * session_days}``
        ``c(n) = sum_{p in F: i_p = n, s_p <= t0} 2 ** (-(t0 - s_p) / (86400 * half_life_days))``
        ``g(n) = 1 + #{p in F: i_p = n, s_p <= t0}``
        ``P(n | t0) = (1 - mix) * c(n) / sum(c) + mix * g(n) / sum(g)``

    Causal as that prior: a first-session rating after ``t0`` (of a session that started before
    ``t0`` or after it) never counts. The decay runs from each rating's own time, which is within
    ``session_days`` of its session's start. It is the time-aware popularity of Ji et al. (SIGIR
    2020, arXiv:2005.13829) restricted to the population a cold-start model serves, new users,
    as DropoutNet (Volkovs et al., NeurIPS 2017) trains on users made to look new; here the
    training users are taken *when* they were new. ``latest`` (serving's default request time) is
    the latest first-session rating; the prior is the same at any later time, so serving's default
    ranks as at the latest training timestamp.

    Args:
        num_items, half_life_days, mix: as `RecentPopularityPrior`.
        session_days: D > 0, the length (days) of a user's first session.
        num_ratings: P, the number of stored first-session positives (sizes the buffers, so that
            ``FirstSessionPrior(**config)`` can load a ``state_dict``).

    Raises:
        ValueError: as `RecentPopularityPrior`; session_days not > 0 or not finite.
    """

    def __init__(self, num_items: int, half_life_days: float, mix: float = 0.1, session_days: float = 1.0,
                 num_ratings: int = 0) -> None:
        super().__init__(num_items, half_life_days, mix, num_ratings)
        if not (math.isfinite(float(session_days)) and float(session_days) > 0):
            raise ValueError(f"session_days must be a positive number of days, got {session_days}")
        self.session_days = float(session_days)

    @property
    def config(self) -> dict:
        """Plain constructor arguments: ``FirstSessionPrior(**config)`` rebuilds it (empty buffers of
        the right size: load the ``state_dict``)."""
        return dict(super().config, session_days=self.session_days)

    def fit(self, users: torch.Tensor, items: torch.Tensor, timestamps: torch.Tensor) -> "FirstSessionPrior":
        """Keep each user's first-session positives: user ids int64 ``[P]`` (any ids), item positions
        int64 ``[P]`` in ``[0, N)``, timestamps int64 ``[P]`` (seconds). A user's session starts at
        their earliest timestamp among these rows. Returns ``self``.

        Raises:
            ValueError: different lengths. IndexError: an item outside ``[0, N)``.
        """
        users = torch.as_tensor(users).long().reshape(-1)
        items, timestamps = torch.as_tensor(items).long().reshape(-1), torch.as_tensor(timestamps).long().reshape(-1)
        if not users.numel() == items.numel() == timestamps.numel():
            raise ValueError(f"users, items and timestamps must have the same length, got {users.numel()}, "
                             f"{items.numel()} and {timestamps.numel()}")
        ids, row = torch.unique(users, return_inverse=True)
        first = torch.full((ids.numel(),), torch.iinfo(torch.long).max, dtype=torch.long)
        first.scatter_reduce_(0, row, timestamps, reduce="amin")
        # seconds as float64 (exact for Unix times); D days may be a fraction of a day
        in_session = timestamps.double() <= first[row].double() + SECONDS_PER_DAY * self.session_days
        return super().fit(items[in_session], timestamps[in_session])


def first_session_prior_for(data, half_life_days: float, mix: float = 0.1, session_days: float = 1.0,
                            split: str = "train") -> FirstSessionPrior:
    """A `FirstSessionPrior` over ``data``'s catalogue, filled with the positives (first binary
    task) of ``split``, their users (``user_row``) and their ``timestamp`` column.

    Raises:
        ValueError: no such split, or it has no ``timestamp`` column; a bad half-life, mix or
            session length (as the class).
    """
    rows = _split(data, split)
    if "timestamp" not in (rows.extra or {}):
        raise ValueError(f"split {split!r} of {data.name} has no timestamp column: the first-session prior needs one")
    first_binary = next((t for t, task in enumerate(data.tasks) if task.kind == "binary"), 0)
    positive = rows.labels[:, first_binary] > 0
    prior = FirstSessionPrior(data.num_items, half_life_days, mix, session_days)
    return prior.fit(rows.user_row[positive], rows.item[positive] - 1, rows.extra["timestamp"][positive])


def _split(data, split: str):
    if split not in data.splits:
        raise ValueError(f"split: {split!r} is not a split of {data.name}; splits: {', '.join(data.splits)}")
    return data.splits[split]


def request_times(data, split: str) -> torch.Tensor:
    """float64 ``[num_user_rows]``: each user's request time in ``split``, the earliest ``timestamp``
    of their rows there (what a system knows at the user's first request); NaN for users without rows.

    Raises:
        ValueError: no such split, or it has no ``timestamp`` column.
    """
    rows = _split(data, split)
    if "timestamp" not in (rows.extra or {}):
        raise ValueError(f"split {split!r} of {data.name} has no timestamp column: a time-aware model needs request times")
    first = torch.full((int(data.num_user_rows),), float("inf"), dtype=torch.float64)
    first.scatter_reduce_(0, rows.user_row, rows.extra["timestamp"].double(), reduce="amin")
    return torch.where(torch.isinf(first), torch.full_like(first, float("nan")), first)


# --- the cold-start model ---------------------------------------------------------------------
class ColdStartModel(nn.Module):
    """A multi-task model whose cold-user rows rank with a blend of its click score and an `ItemPrior`.

    ``forward(sparse, dense, at=None)`` returns ``model(sparse, dense)`` ``[B, T]``; in rows whose
    ``user_id`` is the unknown id 0, task ``task``'s probability p becomes

        ``sigmoid((1 - weight) * logit(p) + weight * log_prior)``
        ``log_prior = (1 - recent_share) * (log P(item | side) + log N)
                      + recent_share * (log P(item | t0 = at) + log N)``

    (``log N`` centres each prior: a uniform prior adds 0). ``weight`` 0 is the model alone, 1 the
    priors alone; without a ``recent`` prior (``recent_share`` 0) the second term is absent and
    ``at`` is not needed. Other rows (known users, and the unknown item id 0) and tasks are returned
    unchanged, so warm users score exactly as with ``model``. The cold click output is then a
    ranking score more than a calibrated probability.

    Args:
        model: a trained `MultiTaskModel` (or any module with ``tasks`` and that forward).
        prior: a trained `ItemPrior` over the same catalogue.
        weight: the blend weight in [0, 1] (chosen on `pseudo_cold_ml100k`, never on test).
        task: the task whose score is blended (default: the first binary task).
        user_id_feature, item_id_feature: the id features (item ids are positions + 1, 0 unknown).
        recent: an optional `RecentPopularityPrior` (time-aware popularity; or its `FirstSessionPrior`
            form, counting the training users' first sessions only) over the same catalogue.
        recent_share: its share of the prior term, in [0, 1] (> 0 needs ``recent``).

    Attributes:
        uses_request_time: True when cold rows need ``at`` (a ``recent`` prior with a share > 0);
            `mtkernels.evaluation` then passes each user's `request_times` and
            `mtkernels.serving.Ranker` the request's ``at``.

    Raises:
        ValueError: weight or recent_share outside [0, 1], recent_share > 0 without ``recent``, a
            ``recent`` prior over another catalogue, an unknown task name, a ``model`` that is
            already a ColdStartModel.
    """

    def __init__(self, model: nn.Module, prior: ItemPrior, weight: float, task: Optional[str] = None,
                 user_id_feature: str = "user_id", item_id_feature: str = "item_id",
                 recent: Optional[RecentPopularityPrior] = None, recent_share: float = 0.0) -> None:
        super().__init__()
        if isinstance(model, ColdStartModel):
            raise ValueError("model is already a ColdStartModel: wrap the trained model itself (its .model)")
        if not 0.0 <= float(weight) <= 1.0:
            raise ValueError(f"weight must be in [0, 1], got {weight}")
        if not 0.0 <= float(recent_share) <= 1.0:
            raise ValueError(f"recent_share must be in [0, 1], got {recent_share}")
        if float(recent_share) > 0 and recent is None:
            raise ValueError(f"recent_share {recent_share} needs a recent (RecentPopularityPrior) prior, got None")
        if recent is not None and recent.num_items != prior.num_items:
            raise ValueError(f"recent: its catalogue has {recent.num_items} items, the item prior's {prior.num_items}")
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
        self.recent = recent
        self.recent_share = float(recent_share)

    @property
    def tasks(self):
        return list(self.model.tasks)

    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        """The labels the outputs are scored against: the wrapped model's (ESMM: entire-space labels)."""
        return self.model.targets(labels) if hasattr(self.model, "targets") else labels

    @property
    def uses_request_time(self) -> bool:
        return self.recent is not None and self.recent_share > 0 and self.weight > 0

    @property
    def default_request_time(self) -> Optional[int]:
        """The latest training timestamp (serving's default ``at``); None without a ``recent`` prior."""
        return self.recent.latest if self.recent is not None else None

    @property
    def config(self) -> dict:
        """Plain config; ``ColdStartModel.from_config(config)`` rebuilds it (fresh parameters: load
        the ``state_dict``, keys ``model.*`` and ``prior.*``), so `mtkernels.training.checkpoint`
        and ``Ranker.load`` serve it like any model (see `cold_start_checkpoint`)."""
        from .training.checkpoint import class_path

        return {"model_class": class_path(self.model), "model_config": self.model.config,
                "prior": self.prior.config, "weight": self.weight, "task": self.task,
                "user_id_feature": self.user_id_feature, "item_id_feature": self.item_id_feature,
                "recent": None if self.recent is None else self.recent.config, "recent_share": self.recent_share}

    @classmethod
    def from_config(cls, config: dict) -> "ColdStartModel":
        module_name, _, qualname = config["model_class"].partition(":")
        model_cls = importlib.import_module(module_name)
        for part in qualname.split("."):
            model_cls = getattr(model_cls, part)
        recent = config.get("recent")  # checkpoints written before the time-aware prior have none
        if recent is not None:  # a first-session prior's config is the time-aware one's plus its session length
            recent = (FirstSessionPrior if "session_days" in recent else RecentPopularityPrior)(**recent)
        return cls(model_cls.from_config(config["model_config"]), ItemPrior(**config["prior"]), config["weight"],
                   config["task"], config["user_id_feature"], config["item_id_feature"], recent,
                   config.get("recent_share", 0.0))

    def forward(self, sparse, dense: Optional[torch.Tensor] = None, at=None) -> torch.Tensor:
        """``[B, T]`` as described above; ``at``: request times (seconds) of the B rows, float64 or
        int64 ``[B]`` or one number; needed when ``uses_request_time`` and a row is cold.

        Raises:
            ValueError: ``at`` missing, malformed or of a length other than B where it is needed.
        """
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
        if self.uses_request_time:
            if at is None:
                raise ValueError("at: this cold-start model's time-aware prior needs the request time (seconds, "
                                 "Unix time) of its cold rows, got None")
            at = torch.as_tensor(at).reshape(-1)
            if at.numel() != 1 and at.numel() != cold.numel():
                raise ValueError(f"at: need one request time or one per row ({cold.numel()}), got {at.numel()}")
            recent = self.recent.log_prob(items, at if at.numel() == 1 else at[cold]) + math.log(self.recent.num_items)
            prior = (1.0 - self.recent_share) * prior + self.recent_share * recent
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
