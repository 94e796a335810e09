"""Transfer learning and cold start experiments (issue 7), mean ± std over seeds, as Markdown.

    python -m benchmarks.transfer_experiments [--seeds 3] [--quick] [--threads 1]
        [--experiments task cold recipe census] [--label-unit users|rows] [--census-arms TEXT]
        [--out benchmarks/results/transfer-cpu.md]

1. ``task`` — ml100k-mtl-v1: pretrain an MMoE on the click task (with id dropout), then train like +
   rating with the like/rating labels of only 10% of the training users (a seeded draw per seed;
   the other users' labels are NaN and their rows are dropped, which the masked loss would ignore
   anyway). The 8 dense statistics are recomputed for that 10% world
   (`mtkernels.data.refit_dense_features`: mean rating and like rate from the budget users' labels
   only, counts and popularity from clicks), and the click source is pretrained in it. Transferred (embeddings + experts frozen, fine-tuned at one lower learning rate, or
   at per-part rates: embeddings x 0.1, experts x 1; and the last with click kept as an auxiliary
   task on every row, its gate and tower carried over) vs the same model from scratch on the same
   10% (with and without the auxiliary click labels), vs from scratch on 100%; plus L2-SP
   fine-tuning at lr x 1 with patience 5, the same without L2-SP, and from scratch with patience 5.
   Every arm stops early on val like AUC. test_warm like AUC and rating RMSE; plus the cost of training with
   frozen vs fine-tuned shared parts (seconds per epoch on the 100% like/rating rows, trained
   values, gradient + optimizer-state bytes). ``--label-unit rows`` reads issue 7's "10% of the
   training users' like/rating labels" as 10% of the labels instead: a uniform draw of 10% of the
   labelled training rows (`keep_label_fraction(..., unit="rows")`), so every user keeps about 10%
   of their own labels; everything else is the same.
2. ``cold`` — test_cold (94 users never seen in training): click models (the source of (1) and the
   same pretraining with id dropout 0 and 1) rank
   the whole catalogue for each cold user from side features (unknown user id row trained by id
   dropout, history features at their mean), against popularity and popularity within
   gender x age groups, both computed here (`mtkernels.transfer.popularity_topk_metrics`). The same
   models' test_warm numbers show what id dropout costs warm users, against the same pretraining
   without id dropout.
2b. ``recipe`` — the cold-start recipe (`mtkernels.cold_start`): for unknown users, the MMoE click
   score (id dropout 0.5) blended with a learned item prior ``log P(item | gender x age)`` (a
   softmax over the catalogue trained on the training positives) and the time-aware popularity
   prior ``log P(item | request time)`` (`RecentPopularityPrior`, or `FirstSessionPrior`: counted
   over the training users' first sessions only), `ColdStartModel`. The time-aware prior (which
   counts, half-life), its share and the blend weight are chosen on pseudo-cold users
   (`pseudo_cold_ml100k(folds=5, fold=f)`: each fifth of the warm users in turn held out of
   training and ranked against their whole training history from their first training timestamp,
   test_cold's shape from train rows only); test_cold is only scored.
3. ``census`` — Census-Income (KDD): pretrain on never-married (all training labels), transfer to
   income with 5% of the training rows' income labels (the same arms, without auxiliary ones, the
   frozen arm's new gate at lr x 0.3, plus L2-SP fine-tuning with patience 5, the per-part rates
   with patience 5 alone, and from scratch with patience 5), vs from scratch on the same 5%; test
   AUC. ``--census-arms TEXT`` runs only the arms whose name contains TEXT.

Choices were made on validation splits (the id dropout p on validation users scored as cold, the
per-part rates on seed 0's val, L2-SP's alpha and beta and its patience on the mean val over
seeds 0-2, the transfer arm by its "val" column); test splits are only
scored. ``--quick`` is a smoke run (1 seed, 2 epochs). Census-Income is found through
``$MTKERNELS_SHARED_DATA`` or ``../shared/data``.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import subprocess
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch

from mtkernels import evaluation, metrics, ops
from mtkernels.cold_start import (PSEUDO_COLD_SPLIT, RECOMMENDED, ColdStartModel, first_session_prior_for, fit_item_prior,
                                  item_prior_for, pseudo_cold_ml100k, recent_popularity_prior_for, request_times)
from mtkernels.data import load_census_income, load_ml100k_mtl_v1, refit_dense_features
from mtkernels.data.movielens import read_movielens_100k
from mtkernels.training import TrainConfig, fit, presets
from mtkernels.training.checkpoint import atomic_write
from mtkernels.transfer import (RECOMMENDED_LR_SCALES, drop_unlabelled_rows, frozen_summary, keep_label_fraction,
                                popularity_topk_metrics, select_tasks, transfer)

# Chosen on validation (see the README section): id dropout of the user id and history features,
# and fine-tuning of transferred parts at a tenth of the base learning rates.
ID_DROPOUT = 0.5
COLD_ID_DROPOUTS = (0.0, ID_DROPOUT, 1.0)
FINETUNE_LR_SCALES = (1.0, 0.3, 0.1)
BACKBONE = "mmoe"
# A label budget of a few thousand rows is 2-4 steps per epoch at the preset batch of 2048: the
# budget arms (transferred and from scratch alike) train with smaller batches.
BUDGET_BATCH = 256


class L2SPArm(NamedTuple):
    """An L2-SP fine-tuning arm (Li et al., ICML 2018; `transfer(..., l2_sp=alpha, l2_sp_new=beta)`,
    trained with weight decay 0, which L2-SP replaces): the fine-tuning rates (``rates`` names them),
    L2-SP's alpha and beta and early stopping's patience, chosen by the mean val AUC of the target
    task over seeds 0-2 (README)."""

    rates: str
    scale: object
    alpha: float
    beta: float
    patience: int


# Census (5% of the income labels) and ml100k (10% of the users' like/rating labels)
CENSUS_L2_SP = L2SPArm("embeddings lr x 0.1, experts lr x 1", RECOMMENDED_LR_SCALES, 0.1, 0.01, 5)
TASK_L2_SP = L2SPArm("lr x 1", 1.0, 1.0, 0.01, 5)
# Census's frozen arm trains its new income gate at lr x 0.3. With the embeddings and experts frozen,
# the gate's softmax over the 4 experts is the only way to choose what the tower sees, and at the base
# rate it saturates within ~30 Adam steps (its logits over inputs of mean L1 norm ~170 move by up to
# lr x ||x||_1 ~ 0.34 a step): on some draws onto an expert that carries little about income, where
# the softmax's gradient vanishes and val AUC stays near 0.80 (seed 0: 0.8126). Chosen on val over
# seeds 0-2 and 3 target initialisations each (README).
CENSUS_FROZEN_GATE_SCALE = 0.3


def _config(seed: int, quick: bool, **values) -> TrainConfig:
    base = dict(presets.TRAIN_PRESET, seed=seed, progress=False)
    if quick:
        base["epochs"] = 2
    base.update(values)
    return TrainConfig(**base)


def _model(data, seed: int):
    torch.manual_seed(seed)
    return presets.build_model(data, BACKBONE)


COUNTS = {"rows", "epochs", "trained", "frozen"}


def _mean_std(values: List[float], digits: int = 4) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _table(title: str, header: List[str], rows: Dict[str, Dict[str, List[float]]], columns: List[str]) -> str:
    lines = [f"**{title}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in rows.items():
        cells = [_mean_std(row.get(c, []), 0 if c in COUNTS else (2 if c in ("seconds", "state_kib") else 4))
                 for c in columns]
        lines.append("| " + name + " | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _append(store: Dict[str, Dict[str, List[float]]], name: str, values: Dict[str, float]) -> None:
    for key, value in values.items():
        store.setdefault(name, {}).setdefault(key, []).append(float(value))


# --- 1 and 2: ml100k ---------------------------------------------------------------------------
class Arm(NamedTuple):
    """One compared model: how it starts (``mode`` None = from scratch, else `transfer`'s mode with
    ``scale`` and ``parts``), what it trains on (``data``), and optionally L2-SP's ``(alpha, beta)``
    (`transfer`'s ``l2_sp``, ``l2_sp_new``; the arm then trains with weight decay 0, which L2-SP
    replaces), early stopping's ``patience`` (default the preset's) and ``gate_scale``, the learning-rate
    scale of the target's (new) gates (default 1)."""

    mode: Optional[str]
    scale: object
    data: object
    parts: Tuple[str, ...] = ("embeddings", "experts")
    l2_sp: Optional[Tuple[float, float]] = None
    patience: Optional[int] = None
    gate_scale: Optional[float] = None


def _arms(share: str, budget, full, aux=None, aux_task: str = "", l2_sp: Optional[L2SPArm] = None,
          frozen_gate_scale: Optional[float] = None) -> Dict[str, Arm]:
    """The compared models. ``aux``: the budget data with the source task's labels kept on every
    row (the source task trained on as an auxiliary task, its gate and tower carried over).
    ``l2_sp``: also that L2-SP arm, the same rates and patience without L2-SP, and from scratch
    with that patience (what the patience alone does). ``frozen_gate_scale``: the frozen arm
    trains its new gates at lr x this."""
    frozen = "transfer, embeddings + experts frozen"
    if frozen_gate_scale is not None:
        frozen += f", new gate lr x {frozen_gate_scale:g}"
    arms = {frozen: Arm("freeze", 0.0, budget, gate_scale=frozen_gate_scale)}
    for scale in FINETUNE_LR_SCALES:
        arms[f"transfer, embeddings + experts fine-tuned (lr x {scale:g})"] = Arm("finetune", scale, budget)
    arms["transfer, embeddings fine-tuned (lr x 0.1), experts (lr x 1)"] = Arm("finetune", RECOMMENDED_LR_SCALES, budget)
    if l2_sp is not None:
        arms[f"transfer, {l2_sp.rates}, patience {l2_sp.patience}"] = Arm(
            "finetune", l2_sp.scale, budget, patience=l2_sp.patience)
        arms[f"transfer, L2-SP (alpha {l2_sp.alpha:g}, beta {l2_sp.beta:g}), {l2_sp.rates}, patience {l2_sp.patience}"] = Arm(
            "finetune", l2_sp.scale, budget, l2_sp=(l2_sp.alpha, l2_sp.beta), patience=l2_sp.patience)
    if aux is not None:
        arms[f"transfer + auxiliary {aux_task} task on all rows (embeddings lr x 0.1, experts lr x 1)"] = Arm(
            "finetune", RECOMMENDED_LR_SCALES, aux, ("embeddings", "experts", "gates", "towers"))
    arms[f"from scratch, same {share}"] = Arm(None, 1.0, budget)
    if l2_sp is not None:
        arms[f"from scratch, same {share}, patience {l2_sp.patience}"] = Arm(None, 1.0, budget, patience=l2_sp.patience)
    if aux is not None:
        arms[f"from scratch, same {share} + auxiliary {aux_task} labels on all rows"] = Arm(None, 1.0, aux)
    arms["from scratch, 100% of the labels"] = Arm(None, 1.0, full)
    return arms


def _train_arm(arm: Arm, source, seed: int, quick: bool, budget_data, monitor_tasks: List[str]):
    """Build, transfer into (unless from scratch) and fit one arm's model; (model, FitResult)."""
    model = _model(arm.data, seed)
    regularizer = None
    if arm.mode is not None:
        alpha, beta = arm.l2_sp if arm.l2_sp is not None else (None, 0.0)
        regularizer = transfer(source, model, parts=arm.parts, mode=arm.mode, lr_scale=arm.scale,
                               l2_sp=alpha, l2_sp_new=beta).regularizer
    if arm.gate_scale is not None:
        model.set_lr_scales({"backbone.gates": arm.gate_scale})
    # label-budget arms train with small batches; an auxiliary arm has every row, like the 100% one
    batch = BUDGET_BATCH if arm.data is budget_data else presets.TRAIN_PRESET["batch_size"]
    values = dict(batch_size=batch, monitor_tasks=monitor_tasks)
    if arm.l2_sp is not None:
        values["weight_decay"] = 0.0
    if arm.patience is not None:
        values["patience"] = arm.patience
    result = fit(model, arm.data, _config(seed, quick, **values), regularizer=regularizer)
    return model, result


LABEL_UNITS = ("users", "rows")
_BUDGET_WORDS = {"users": "like/rating labels of 10% of the training users",
                 "rows": "10% of the training like/rating labels, a uniform draw of rows"}


def _like_auc_by_budget(model, data, kept: torch.Tensor) -> Dict[str, float]:
    """test_warm like AUC on the rows of the budget users (``kept`` user rows) and of the others."""
    split = data.splits["test_warm"]
    like = [t.name for t in data.tasks].index("like")
    scores = evaluation.predict(model, data, "test_warm")[:, like]
    in_budget = torch.isin(split.user_row, kept)
    return {name: metrics.auc(split.labels[mask, like], scores[mask])
            for name, mask in (("budget_auc", in_budget), ("other_auc", ~in_budget))}


def task_transfer_experiments(seeds: List[int], quick: bool, log: Callable[[str], None],
                              unit: str = "users") -> List[str]:
    """(1): click -> like + rating with 10% of the training users' like/rating labels: all labels of
    10% of the users (``unit="users"``) or 10% of the labelled rows, every user keeping ~10% of
    theirs (``unit="rows"``; then no budget/other users columns: nearly every user is in the budget)."""
    data = load_ml100k_mtl_v1()
    full = drop_unlabelled_rows(select_tasks(data, ["like", "rating"]))
    task_rows: Dict[str, Dict[str, List[float]]] = {}
    cost_rows: Dict[str, Dict[str, List[float]]] = {}

    for seed in seeds:
        # The 10% world: click labels on every row, like/rating labels of 10% of the training users,
        # and the dense rating statistics recomputed from those users' labels only (the source is
        # pretrained in this world too, so no input summarises a withheld label).
        aux, kept = keep_label_fraction(data, ["like", "rating"], 0.10, seed=seed, unit=unit)
        aux = refit_dense_features(aux)
        click = select_tasks(aux, ["click"])
        source = _model(click, seed)
        fit(source, click, _config(seed, quick, id_dropout=ID_DROPOUT))
        budget = drop_unlabelled_rows(select_tasks(aux, ["like", "rating"]))
        for name, arm in _arms("10%", budget, full, aux, "click", TASK_L2_SP).items():
            model, result = _train_arm(arm, source, seed, quick, budget, ["like"])
            values = {}
            for split, prefix in (("test_warm", ""), ("val", "val_")):
                m = evaluation.evaluate(model, arm.data, split, topk=False)
                values[prefix + "like_auc"], values[prefix + "rating_rmse"] = m["like"]["auc"], m["rating"]["rmse"]
            if unit == "users":
                values.update(_like_auc_by_budget(model, arm.data, kept))
            values["rows"] = arm.data.splits["train"].num_rows
            values["epochs"] = len(result.history)
            _append(task_rows, name, values)
            log(f"seed {seed} {name}: like AUC {values['like_auc']:.4f} RMSE {values['rating_rmse']:.4f} "
                f"({values['rows']} rows, {values['epochs']} epochs)")

        # cost of training the target with frozen vs fine-tuned shared parts, on all like/rating rows
        for name, mode in (("frozen embeddings + experts", "freeze"), ("everything fine-tuned", "finetune")):
            model = _model(full, seed)
            transfer(source, model, parts=("embeddings", "experts"), mode=mode, lr_scale=1.0)
            summary = frozen_summary(model)
            epochs = 1 if quick else 3
            result = fit(model, full, _config(seed, quick, epochs=epochs, patience=0))
            _append(cost_rows, name, {"seconds": result.seconds_per_epoch,
                                      "trained": summary["trained_dense_values"],
                                      "frozen": summary["frozen_values"],
                                      "state_kib": (summary["optimizer_state_bytes"] + 4 * summary["trained_dense_values"]) / 1024})

    n = len(seeds)
    header = ["model", "val like AUC", "like AUC", "like AUC, budget users", "like AUC, other users",
              "val rating RMSE", "rating RMSE", "training rows", "epochs"]
    columns = ["val_like_auc", "like_auc", "budget_auc", "other_auc", "val_rating_rmse", "rating_rmse", "rows", "epochs"]
    if unit == "rows":
        header, columns = header[:3] + header[5:], columns[:2] + columns[4:]
    return [
        _table(f"Task transfer, ml100k-mtl-v1 test_warm ({_BUDGET_WORDS[unit]}; "
               f"early stopping on val like AUC; mean ± std over {n} seeds)", header, task_rows, columns),
        _table(f"Cost of the target's training with the source's shared parts frozen vs fine-tuned (all "
               f"like/rating rows, {torch.get_num_threads()} thread(s), {n} seeds)",
               ["target training", "s/epoch", "trained dense values", "frozen values", "grad + optimizer state KiB"],
               cost_rows, ["seconds", "trained", "frozen", "state_kib"]),
    ]


def cold_start_experiments(seeds: List[int], quick: bool, log: Callable[[str], None]) -> List[str]:
    """(2): click models with and without id dropout on test_cold, against popularity."""
    data = load_ml100k_mtl_v1()
    click = select_tasks(data, ["click"])
    cold_rows: Dict[str, Dict[str, List[float]]] = {}
    for seed in seeds:
        for p in COLD_ID_DROPOUTS:
            source = _model(click, seed)
            result = fit(source, click, _config(seed, quick, id_dropout=p))
            warm = evaluation.evaluate(source, click, "test_warm")
            cold = evaluation.evaluate(source, click, "test_cold")
            name = f"MMoE click, id dropout {p:g}" + (" (the source of task transfer)" if p == ID_DROPOUT else "")
            _append(cold_rows, name, {"cold_auc": cold["click"]["auc"], "cold_ndcg": cold["topk"]["ndcg@10"],
                                      "cold_recall": cold["topk"]["recall@10"], "warm_auc": warm["click"]["auc"],
                                      "warm_ndcg": warm["topk"]["ndcg@10"], "warm_recall": warm["topk"]["recall@10"],
                                      "epochs": len(result.history)})
            log(f"seed {seed} click p={p}: cold NDCG@10 {cold['topk']['ndcg@10']:.4f} Recall@10 "
                f"{cold['topk']['recall@10']:.4f} | warm NDCG@10 {warm['topk']['ndcg@10']:.4f} "
                f"click AUC {warm['click']['auc']:.4f} ({len(result.history)} epochs)")

    popularity = popularity_topk_metrics(data, "test_cold")
    grouped = popularity_topk_metrics(data, "test_cold", group_by=("gender", "age"))
    _append(cold_rows, "popularity (train positives), this code", {"cold_ndcg": popularity["ndcg@10"],
                                                                  "cold_recall": popularity["recall@10"]})
    _append(cold_rows, "popularity within gender x age, this code", {"cold_ndcg": grouped["ndcg@10"],
                                                                    "cold_recall": grouped["recall@10"]})
    _append(cold_rows, "issue 7 target", {"cold_ndcg": 0.57, "cold_recall": 0.080})
    return [
        _table(f"Cold-start users, test_cold (94 users; mean ± std over {len(seeds)} seeds), with the same models' test_warm",
               ["model", "cold click AUC", "cold NDCG@10", "cold Recall@10", "warm click AUC", "warm NDCG@10",
                "warm Recall@10", "epochs"], cold_rows,
               ["cold_auc", "cold_ndcg", "cold_recall", "warm_auc", "warm_ndcg", "warm_recall", "epochs"]),
    ]


# --- 2b: cold-start recipe (item prior blended into the click score, weight chosen on pseudo-cold) ---
# The prior's groups and L2 were screened on pseudo-cold users (README); the half-life of the
# time-aware prior, its share of the prior term and the blend weight are chosen here, per run, by
# the mean NDCG@10 over K disjoint pseudo-cold folds (every warm user held out once).
PRIOR_FEATURES = RECOMMENDED["features"]
PRIOR_L2 = RECOMMENDED["l2"]
PRIOR_EPOCHS = RECOMMENDED["epochs"]
COLD_WEIGHTS = (0.0, 0.5, 0.75, 0.85, 0.9, 0.95, 1.0)
HALF_LIVES = (7.0, 10.0, 14.0)
# The first-session form of the time-aware prior (`FirstSessionPrior`): each training user's
# positives within D days of their first; D was screened on the same pseudo-cold folds
# (`benchmarks.first_session_screen`: D 0.1 / 1 / 7 days).
SESSION_DAYS = (1.0,)
RECENT_SHARES = (0.0, 0.25, 0.5, 0.75, 1.0)
COLD_FOLDS = 5
# the time-aware priors of the grid: (half-life, session length D or None for every training positive)
TIME_PRIORS = tuple((h, None) for h in HALF_LIVES) + tuple((h, d) for d in SESSION_DAYS for h in HALF_LIVES)


def _time_priors(data):
    """Each of ``TIME_PRIORS`` fitted on ``data``'s train split (mix ``RECOMMENDED["mix"]``)."""
    return {(h, d): (recent_popularity_prior_for(data, h, RECOMMENDED["mix"]) if d is None else
                     first_session_prior_for(data, h, RECOMMENDED["mix"], d)) for h, d in TIME_PRIORS}


def _cold_parts(model, prior, recent_priors, data, split):
    """Per user of ``split`` x item: the click probability (float32, as the model outputs it), the
    item prior's and each time-aware prior's log-probability + log N (float32, as `ColdStartModel`
    computes them), each user's request time taken as `evaluation` takes it (`request_times`)."""
    ev = data.topk_eval(split)
    items = torch.arange(data.num_items)
    with torch.no_grad():
        batch = data.pair_batch(ev.users, items)
        click = model.eval()(batch.sparse, batch.dense)[:, 0].reshape(len(ev), data.num_items)
        item_prior = prior(data.user_feature_rows(users=ev.users).sparse) + math.log(data.num_items)
        at = request_times(data, split)[ev.users]
        recent = {h: r(at) + math.log(data.num_items) for h, r in recent_priors.items()}
    return ev, click, item_prior, recent


def _blend_metrics(ev, click, item_prior, recent, weight, share):
    """`ColdStartModel`'s cold-row score on whole matrices, then PROTOCOL §5 top-10 metrics."""
    p = click.double().clamp(1e-7, 1 - 1e-7)
    log_prior = item_prior if recent is None else (1.0 - share) * item_prior + share * recent
    score = torch.sigmoid((1.0 - weight) * torch.log(p / (1 - p)) + weight * log_prior.double()).float()
    _, indices = ops.ensemble_topk(score.unsqueeze(0).contiguous(), torch.ones(1), 10,
                                   exclude_offsets=ev.exclude_offsets, exclude_indices=ev.exclude_indices)
    return {"ndcg": float(metrics.ndcg_at_k(indices, ev.relevant, 10)),
            "recall": float(metrics.recall_at_k(indices, ev.relevant, 10))}


def _recipe_name(weight: float, share: float, time_prior: Optional[Tuple[float, Optional[float]]]) -> str:
    recent = ""
    if time_prior is not None:
        half_life, days = time_prior
        recent = (f"time-aware prior (half-life {half_life:g} d)" if days is None else
                  f"first-session prior (D {days:g} d, half-life {half_life:g} d)")
    if weight == 0.0:
        return "MMoE click alone (weight 0)"
    if share == 0.0:
        prior = "gender x age prior"
    elif share == 1.0:
        prior = recent
    else:
        prior = f"{1 - share:g} gender x age prior + {share:g} {recent}"
    return f"{prior} alone" if weight == 1.0 else f"blend {weight:g}: {prior}"


def cold_start_recipe_experiment(seeds: List[int], quick: bool, log: Callable[[str], None],
                                 folds: int = COLD_FOLDS, features=PRIOR_FEATURES, l2=PRIOR_L2) -> List[str]:
    """Selection: for each of ``folds`` disjoint pseudo-cold folds (`pseudo_cold_ml100k(folds=K,
    fold=f)`: a fifth of the warm users held out of training, scored against their whole training
    history; their request time = their first training timestamp, their own ratings are not in
    the training rows the priors count) train the MMoE click model (id dropout ``ID_DROPOUT``,
    seed f), the item prior and the time-aware priors (``TIME_PRIORS``: ``HALF_LIVES`` over every
    training positive and over the first sessions, ``SESSION_DAYS``) and score every (time-aware
    prior, recent share, blend weight); the one with the best mean pseudo-cold NDCG@10 is chosen. Test:
    per seed, the same trained on the protocol's train split, scored on test_cold (request time =
    the cold user's first test_cold timestamp); the chosen recipe is also scored through
    `ColdStartModel` and `evaluation.topk_metrics`, the served path."""
    movielens = read_movielens_100k()
    data = select_tasks(load_ml100k_mtl_v1(), ["click"])
    grid = [(0.0, 0.0, None)] + [(w, 0.0, None) for w in COLD_WEIGHTS if w > 0]
    grid += [(w, s, t) for t in TIME_PRIORS for s in RECENT_SHARES if s > 0 for w in COLD_WEIGHTS if w > 0]
    results: Dict[tuple, Dict[str, List[float]]] = {g: {} for g in grid}
    runs = [("pseudo", f, select_tasks(pseudo_cold_ml100k(movielens=movielens, folds=folds, fold=f), ["click"]),
             PSEUDO_COLD_SPLIT) for f in range(1 if quick else folds)]
    runs += [("test", seed, data, "test_cold") for seed in seeds]
    trained = {}
    for role, seed, train_data, split in runs:
        model = _model(train_data, seed)
        fit(model, train_data, _config(seed, quick, id_dropout=ID_DROPOUT))
        prior = fit_item_prior(item_prior_for(train_data, features), train_data, l2=l2,
                               epochs=2 if quick else PRIOR_EPOCHS, seed=seed)
        recent_priors = _time_priors(train_data)
        ev, click, item_prior, recent = _cold_parts(model, prior, recent_priors, train_data, split)
        for weight, share, time_prior in grid:
            ranked = _blend_metrics(ev, click, item_prior, None if time_prior is None else recent[time_prior], weight, share)
            _append(results, (weight, share, time_prior), {f"{role}_ndcg": ranked["ndcg"], f"{role}_recall": ranked["recall"]})
        if role == "test":
            trained[seed] = (model, prior, recent_priors)
        best = max(grid, key=lambda g: results[g][f"{role}_ndcg"][-1])
        log(f"{'fold' if role == 'pseudo' else 'seed'} {seed} on {split}: best NDCG@10 {results[best][role + '_ndcg'][-1]:.4f} "
            f"at {_recipe_name(*best)}; gender x age prior blend 0.9: {results[(0.9, 0.0, None)][role + '_ndcg'][-1]:.4f}")
    chosen = max(grid, key=lambda g: statistics.mean(results[g]["pseudo_ndcg"]))
    weight, share, time_prior = chosen
    served: Dict[str, List[float]] = {}
    for seed, (model, prior, recent_priors) in trained.items():
        cold = ColdStartModel(model, prior, weight, recent=None if time_prior is None else recent_priors[time_prior],
                              recent_share=share)
        ranked = evaluation.topk_metrics(cold, data, "test_cold")
        served.setdefault("test_ndcg", []).append(ranked["ndcg@10"])
        served.setdefault("test_recall", []).append(ranked["recall@10"])
        log(f"seed {seed} chosen recipe through ColdStartModel on test_cold: NDCG@10 {ranked['ndcg@10']:.4f} "
            f"Recall@10 {ranked['recall@10']:.4f} (on the score matrices: "
            f"{results[chosen]['test_ndcg'][len(served['test_ndcg']) - 1]:.4f} / "
            f"{results[chosen]['test_recall'][len(served['test_ndcg']) - 1]:.4f})")
    # rows: the chosen recipe, the previous recipe (gender x age prior, every weight), and for each
    # time-aware prior its best share and weight and the prior alone
    shown = [g for g in grid if g[2] is None]
    for t in TIME_PRIORS:
        best_t = max((g for g in grid if g[2] == t), key=lambda g: statistics.mean(results[g]["pseudo_ndcg"]))
        shown += [best_t, (1.0, 1.0, t)]
    for s in RECENT_SHARES[1:]:
        best_s = max((g for g in grid if g[1] == s and g[2] == chosen[2]), key=lambda g: statistics.mean(results[g]["pseudo_ndcg"]))
        shown.append(best_s)
    rows = {}
    for g in dict.fromkeys(shown):
        rows[_recipe_name(*g) + (" (chosen on pseudo-cold)" if g == chosen else "")] = results[g]
    rows["chosen recipe through ColdStartModel + evaluate (served path)"] = served
    popularity = popularity_topk_metrics(data, "test_cold")
    grouped = popularity_topk_metrics(data, "test_cold", group_by=("gender", "age"))
    rows["popularity (train positives)"] = {"test_ndcg": [popularity["ndcg@10"]], "test_recall": [popularity["recall@10"]]}
    rows["popularity within gender x age"] = {"test_ndcg": [grouped["ndcg@10"]], "test_recall": [grouped["recall@10"]]}
    rows["issue 7 target"] = {"test_ndcg": [0.57], "test_recall": [0.080]}
    return [_table(f"Cold-start recipe: MMoE click (id dropout {ID_DROPOUT:g}) blended with the item prior "
                   f"{features} (L2 {l2}) and the time-aware popularity prior (mix {RECOMMENDED['mix']:g}) for unknown "
                   f"users; half-life {HALF_LIVES}, counts from every training positive or from first sessions of "
                   f"{SESSION_DAYS} days, recent share {RECENT_SHARES} and weight {COLD_WEIGHTS} chosen on "
                   f"{folds} pseudo-cold folds (pseudo-cold: mean ± std over the folds; test_cold: over {len(seeds)} seeds)",
                   ["cold-user score", "pseudo-cold NDCG@10", "pseudo-cold Recall@10", "test_cold NDCG@10",
                    "test_cold Recall@10"], rows, ["pseudo_ndcg", "pseudo_recall", "test_ndcg", "test_recall"])]


# --- 3: Census-Income -------------------------------------------------------------------------
def census_experiment(seeds: List[int], quick: bool, log: Callable[[str], None], only: str = "") -> List[str]:
    data = load_census_income()
    married = select_tasks(data, ["never_married"])
    income = select_tasks(data, ["income"])
    rows: Dict[str, Dict[str, List[float]]] = {}
    for seed in seeds:
        source = _model(married, seed)
        fit(source, married, _config(seed, quick))
        budget, _ = keep_label_fraction(income, ["income"], 0.05, seed=seed)
        budget = drop_unlabelled_rows(budget)
        arms = _arms("5%", budget, income, l2_sp=CENSUS_L2_SP, frozen_gate_scale=CENSUS_FROZEN_GATE_SCALE)
        for name, arm in arms.items():
            if only not in name:
                continue
            model, result = _train_arm(arm, source, seed, quick, budget, ["income"])
            train_data = arm.data
            metrics = evaluation.evaluate(model, income, "test", topk=False)
            values = {"val_auc": evaluation.evaluate(model, income, "val", topk=False)["income"]["auc"],
                      "auc": metrics["income"]["auc"], "logloss": metrics["income"]["logloss"],
                      "rows": train_data.splits["train"].num_rows, "epochs": len(result.history)}
            _append(rows, name, values)
            log(f"seed {seed} census {name}: income AUC {values['auc']:.4f} ({values['rows']} rows)")
    return [_table(f"Census-Income: never-married -> income with 5% of the income labels, test split "
                   f"(mean ± std over {len(seeds)} seeds)",
                   ["model", "val income AUC", "income AUC", "income logloss", "training rows", "epochs"], rows,
                   ["val_auc", "auc", "logloss", "rows", "epochs"])]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 2 epochs")
    parser.add_argument("--experiments", nargs="+", default=["task", "cold", "recipe", "census"],
                        choices=["task", "cold", "recipe", "census"],
                        help="task: ml100k task transfer; cold: ml100k cold start by id dropout; recipe: the "
                             "cold-start recipe (item prior blend chosen on pseudo-cold users); census: Census-Income transfer")
    parser.add_argument("--cold-folds", type=int, default=COLD_FOLDS,
                        help="recipe: pseudo-cold folds the blend weight is chosen on (default %(default)s)")
    parser.add_argument("--prior-features", default=None, metavar="F1*F2,F3",
                        help="recipe: the prior's groups ('*' crosses; default RECOMMENDED: gender*age)")
    parser.add_argument("--prior-l2", default=None, metavar="L2[,L2...]",
                        help="recipe: the prior's L2, one value or one per group (default RECOMMENDED)")
    parser.add_argument("--label-unit", default="users", choices=LABEL_UNITS,
                        help="task: 10%% of the training users' like/rating labels (users, default) or 10%% of "
                             "the labelled training rows, every user keeping ~10%% of theirs (rows)")
    parser.add_argument("--census-arms", default="", metavar="TEXT",
                        help="census: only the arms whose name contains TEXT (e.g. 'frozen'; default all)")
    parser.add_argument("--out", default=None, help="also write the tables here (Markdown)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = list(range(1 if args.quick else args.seeds))
    started = time.perf_counter()
    log = lambda line: print(line, flush=True)  # noqa: E731
    tables: List[str] = []
    if "task" in args.experiments:
        tables += task_transfer_experiments(seeds, args.quick, log, args.label_unit)
    if "cold" in args.experiments:
        tables += cold_start_experiments(seeds, args.quick, log)
    if "recipe" in args.experiments:
        features = (PRIOR_FEATURES if args.prior_features is None else
                    tuple(tuple(g.split("*")) for g in args.prior_features.split(",") if g))
        l2 = PRIOR_L2 if args.prior_l2 is None else [float(v) for v in args.prior_l2.split(",")]
        tables += cold_start_recipe_experiment(seeds, args.quick, log, args.cold_folds, features,
                                               l2[0] if isinstance(l2, list) and len(l2) == 1 else l2)
    if "census" in args.experiments:
        tables += census_experiment(seeds, args.quick, log, args.census_arms)
    command = (f"python -m benchmarks.transfer_experiments --seeds {args.seeds}{' --quick' if args.quick else ''} "
               f"--threads {args.threads} --experiments {' '.join(args.experiments)}"
               f"{f' --label-unit {args.label_unit}' if args.label_unit != 'users' else ''}"
               f"{f' --census-arms {args.census_arms!r}' if args.census_arms else ''}")
    publish("Transfer learning and cold start (issue 7)", command, args.threads, started, "\n\n".join(tables), args.out)
    return 0


def publish(title: str, command: str, threads: int, started: float, body: str, out: Optional[str]) -> None:
    """Print ``body`` under a header naming the command, machine, torch, threads, seconds since
    ``started`` (``time.perf_counter()``) and the load average at the end; also write it to ``out``
    (atomically) when given."""
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    text = (f"{title}: `{command}`; {platform.machine()}, torch {torch.__version__}, {threads} thread(s); "
            f"{time.perf_counter() - started:.0f} s; machine load at the end: `{load}`\n\n{body}\n")
    print()
    print(text)
    if out:
        atomic_write(out, lambda f: f.write(text.encode()))


if __name__ == "__main__":
    raise SystemExit(main())
