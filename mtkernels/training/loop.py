"""The fit/evaluate loop: per-task masked losses, loss weighting, early stopping on validation,
a tqdm progress bar, seeds, and atomic checkpoints that a later run resumes from exactly.

Optimisers: the embedding tables are updated inside the backward by the fused optimiser of
``mtkernels.nn.EmbeddingBagCollection`` when the model was built with ``embedding_optimizer``
(row-wise Adagrad as in FBGEMM/TorchRec); everything else trainable (the dense part, and the
log-variances of uncertainty weighting) by one fused Adam, over contiguous buffers of the
parameters when every one of them is trained (`mtkernels.training.flat_parameters`: fewer tensors,
less per-step Python, the same updates bit for bit).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import time
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import evaluation
from .checkpoint import class_path, load_checkpoint, save_checkpoint
from .flat_parameters import all_receive_gradients, flatten_groups, flattenable
from .id_dropout import drop_ids
from .losses import masked_task_losses
from .weight_averaging import ExponentialMovingAverage, averaged_tensors, load_model_average_state, model_average_state
from .weighting import GradNorm, make_weighting

MONITORS = ("score", "loss", "ndcg")


@dataclasses.dataclass
class TrainConfig:
    """Hyperparameters of one training run (plain values; stored in checkpoints).

    Attributes:
        epochs: maximum number of passes over the training split.
        batch_size: rows per step.
        lr: Adam learning rate of the dense part.
        weight_decay: Adam (L2) weight decay of the dense part.
        loss_weighting: ``"fixed"``, ``"uncertainty"`` (Kendall et al., CVPR 2018) or
            ``"gradnorm"`` (Chen et al., ICML 2018).
        task_weights: fixed weights, one per task (``"fixed"`` only; default all 1).
        gradnorm_alpha: GradNorm's asymmetry alpha.
        patience: stop after this many epochs without a better validation ``monitor`` (0: never).
        monitor: what early stopping watches on the validation split: ``"score"`` (sum over
            tasks of AUC for binary tasks and -RMSE for regression tasks; higher is better),
            ``"loss"`` (the unweighted sum of task losses; lower is better) or ``"ndcg"`` (top-k
            NDCG@10 on val plus ``"score"``; needs an item catalogue; slower).
        monitor_tasks: the task names ``"score"`` sums over (default all tasks), e.g. only the
            target tasks when a source task is kept as an auxiliary task in transfer learning.
        seed: seeds Python, NumPy and torch when `fit` starts; epoch e shuffles with
            ``seed * 1_000_003 + e``. The model's initial weights are drawn before that: seed torch
            before building the model (``torch.manual_seed``, as ``mtkernels train`` does) for a
            reproducible run.
        eval_batch_size: rows per step when predicting.
        progress: show a tqdm progress bar per epoch.
        validation_split: the split early stopping watches.
        id_dropout: cold-start training (`mtkernels.training.id_dropout.drop_ids`): probability that
            a training row's ``id_dropout_features`` of one side are replaced by the unknown id 0
            (and, with ``id_dropout_dense``, that side's dense history columns by 0), so the unknown
            row learns to stand for users (items) known only by their side features. 0: off.
        id_dropout_features: the single-valued id features dropped (default ``["user_id"]``).
        id_dropout_dense: also zero the dropped side's dense columns (what a cold user gets).
        ema_decay: weight averaging (`mtkernels.training.weight_averaging`): the decay of a debiased
            exponential moving average of all trained weights (tables included), updated after
            every step; validation, early stopping, the kept best state and the checkpoint's best
            weights then use the average. 0: off (the last step's weights).
    """

    epochs: int = 30
    batch_size: int = 2048
    lr: float = 2e-3
    weight_decay: float = 0.0
    loss_weighting: str = "fixed"
    task_weights: Optional[List[float]] = None
    gradnorm_alpha: float = 1.5
    patience: int = 2
    monitor: str = "score"
    monitor_tasks: Optional[List[str]] = None
    seed: int = 0
    eval_batch_size: int = 32768
    progress: bool = True
    validation_split: str = "val"
    id_dropout: float = 0.0
    id_dropout_features: List[str] = dataclasses.field(default_factory=lambda: ["user_id"])
    id_dropout_dense: bool = True
    ema_decay: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) (0: off), got {self.ema_decay}")
        if not 0.0 <= self.id_dropout <= 1.0:
            raise ValueError(f"id_dropout must be in [0, 1], got {self.id_dropout}")
        self.id_dropout_features = list(self.id_dropout_features)
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.patience < 0:
            raise ValueError(f"patience must be >= 0, got {self.patience}")
        if self.monitor_tasks is not None:
            self.monitor_tasks = list(self.monitor_tasks)
            if not self.monitor_tasks:
                raise ValueError("monitor_tasks must name at least one task (or be None: all tasks)")
        if self.monitor not in MONITORS:
            raise ValueError(f"monitor must be one of {MONITORS}, got {self.monitor!r}")
        if self.loss_weighting not in ("fixed", "uncertainty", "gradnorm"):
            raise ValueError(
                f"loss_weighting must be 'fixed', 'uncertainty' or 'gradnorm', got {self.loss_weighting!r}"
            )

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**values)


@dataclasses.dataclass
class FitResult:
    """What :func:`fit` returns. ``history`` holds one dict per epoch (``epoch``, ``train_loss``,
    ``task_losses``, ``task_weights``, ``seconds``, ``val`` metrics, ``monitor``)."""

    history: List[Dict[str, Any]]
    best_epoch: int
    best_monitor: float
    seconds_per_epoch: float
    stopped_early: bool
    resumed_from_epoch: Optional[int] = None


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy and torch (one call at the start of a run)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _rng_state() -> Dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def _dense_optimizer_groups(model: torch.nn.Module, weighting: torch.nn.Module, weight_decay: float,
                            lr: Optional[float] = None):
    """Adam groups: the model's dense parameters (with weight decay), other trainable model
    parameters (embedding tables without a fused optimiser; no weight decay), the uncertainty
    log-variances (no weight decay). GradNorm's weights have their own optimiser. Parameters
    with a learning-rate scale other than 1 (``model.lr_scale_of``, set by transfer learning) get
    their own group at ``lr * scale``; frozen ones (scale 0) do not require grad and are in none."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if hasattr(model, "dense_parameters"):
        dense_ids = {id(p) for p in model.dense_parameters()}
    else:
        dense_ids = {id(p) for p in trainable}
    scale_of = {}
    if hasattr(model, "lr_scale_of") and lr is not None:
        scale_of = {id(p): model.lr_scale_of(n) for n, p in model.named_parameters()}
    groups = []
    for in_dense, decay in ((True, weight_decay), (False, 0.0)):
        members = [p for p in trainable if (id(p) in dense_ids) == in_dense]
        scales = sorted({scale_of.get(id(p), 1.0) for p in members}, reverse=True) or [1.0]
        for scale in scales:
            group = {"params": [p for p in members if scale_of.get(id(p), 1.0) == scale], "weight_decay": decay}
            if scale != 1.0:
                group["lr"] = lr * scale
            groups.append(group)
    if not isinstance(weighting, GradNorm):
        extra = [p for p in weighting.parameters() if p.requires_grad]
        if extra:
            groups.append({"params": extra, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def _fused_adam_supported(groups) -> bool:
    """Adam's fused kernel (one pass over all parameters; torch >= 2.4 on CPU and CUDA) instead of its
    per-parameter loop, which on CPU costs ~10x more per step than the fused one at these sizes and
    was ~9% of an MMoE training step: same update rule, float parameters on one CPU/CUDA device."""
    params = [p for g in groups for p in g["params"]]
    devices = {p.device for p in params}
    return (bool(params) and len(devices) == 1 and next(iter(devices)).type in ("cpu", "cuda")
            and all(p.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16) for p in params))


def _flat_groups(model, data, weighting, groups):
    """`flatten_groups` of the Adam groups when fused Adam runs and every parameter in them gets a
    gradient from the training loss (checked on a few training rows, torch's RNG state restored);
    else None (one tensor per parameter, as torch.optim does)."""
    if not _fused_adam_supported(groups) or not flattenable(groups) or data.splits["train"].num_rows == 0:
        return None
    params = [p for g in groups for p in g["params"]]
    rng = torch.get_rng_state()
    was_training = model.training
    try:
        model.train()
        batch = next(iter(data.batches("train", 64)))
        losses = masked_task_losses(model(batch.sparse, batch.dense), evaluation.scored_labels(model, batch.labels), data.tasks)
        every = all_receive_gradients(params, weighting.combine(losses))
    finally:
        torch.set_rng_state(rng)
        model.train(was_training)
    return flatten_groups(groups) if every else None


def shared_parameters(model: torch.nn.Module) -> List[torch.nn.Parameter]:
    """The last shared layer's parameters, where GradNorm measures task gradient norms.

    Uses ``model.shared_parameters()`` when the model defines it; otherwise the last ``nn.Linear``
    of ``model.backbone`` (the experts' / shared bottom's output layer); otherwise all dense
    parameters.
    """
    if hasattr(model, "shared_parameters"):
        return [p for p in model.shared_parameters() if p.requires_grad]
    backbone = getattr(model, "backbone", None)
    if backbone is not None:
        linears = [m for m in backbone.modules() if isinstance(m, torch.nn.Linear)]
        # In MMoE/PLE the last Linear created may be a gate; prefer an expert's layer.
        experts = [m for name, m in backbone.named_modules() if isinstance(m, torch.nn.Linear) and "gate" not in name]
        chosen = experts[-1] if experts else (linears[-1] if linears else None)
        if chosen is not None:
            return [p for p in chosen.parameters() if p.requires_grad]
    params = model.dense_parameters() if hasattr(model, "dense_parameters") else model.parameters()
    return [p for p in params if p.requires_grad]


def _check_monitor(config: TrainConfig, data) -> None:
    """The validation split and the monitored tasks must be the data's (`fit` checks before training)."""
    if config.validation_split not in data.splits:
        raise ValueError(f"validation_split {config.validation_split!r} is not a split of {data.name}; "
                         f"splits: {list(data.splits)}")
    names = [task.name for task in data.tasks]
    unknown = [name for name in (config.monitor_tasks or []) if name not in names]
    if unknown:
        raise ValueError(f"monitor_tasks {unknown} are not tasks of the data ({names})")


def validation_monitor(model, data, config: TrainConfig) -> Dict[str, Any]:
    """Validation metrics and the early-stopping value (higher is better) of the current model.

    Raises:
        ValueError: ``config.validation_split`` is not a split of ``data``, or ``config.monitor_tasks``
            names a task it does not have.
    """
    _check_monitor(config, data)
    split = config.validation_split
    predictions = evaluation.predict(model, data, split, config.eval_batch_size)
    labels = evaluation.scored_labels(model, data.splits[split].labels)
    metrics: Dict[str, Any] = dict(evaluation.pointwise_metrics(data.tasks, labels, predictions))
    score = 0.0
    for task in data.tasks:
        if config.monitor_tasks is not None and task.name not in config.monitor_tasks:
            continue
        m = metrics[task.name]
        value = m["auc"] if task.kind == "binary" else -m["rmse"]
        score += 0.0 if math.isnan(value) else value
    metrics["score"] = score
    with torch.no_grad():
        metrics["loss"] = float(masked_task_losses(predictions, labels, data.tasks).sum())
    if config.monitor == "score":
        monitor = score
    elif config.monitor == "loss":
        monitor = -metrics["loss"]
    else:
        metrics["topk"] = evaluation.topk_metrics(model, data, split, 10)
        monitor = score + metrics["topk"]["ndcg@10"]
    metrics["monitor"] = monitor
    return metrics


# TrainConfig fields a resumed run may change (how long, how patient, how it reports); any other
# change would make the continued run differ from an uninterrupted one (Adam's restored state also
# carries the saved learning rate), so resuming with it is refused.
_RESUMABLE_CHANGES = frozenset({"epochs", "patience", "progress", "eval_batch_size"})


def _config_difference(saved: Any, current: Any) -> str:
    """The keys of two model configs that differ, each with both values (long values shortened)."""
    if not (isinstance(saved, dict) and isinstance(current, dict)):
        return f"kind ({type(saved).__name__} in the checkpoint, {type(current).__name__} here)"

    def short(value: Any) -> str:
        text = repr(value)
        return text if len(text) <= 80 else text[:77] + "..."

    keys = [k for k in list(saved) + [k for k in current if k not in saved] if saved.get(k) != current.get(k)]
    return ", ".join(f"{k} ({short(saved.get(k))} in the checkpoint, {short(current.get(k))} here)" for k in keys)


def fit(
    model: torch.nn.Module,
    data,
    config: Optional[TrainConfig] = None,
    checkpoint_path: Optional[str] = None,
    resume: bool = False,
    checkpoint_extra: Optional[Dict[str, Any]] = None,
    log: Optional[Callable[[str], None]] = None,
    regularizer: Optional[Callable[[torch.nn.Module], torch.Tensor]] = None,
) -> FitResult:
    """Train ``model`` on ``data.splits["train"]`` with early stopping on validation.

    Each step: predictions ``[B, T]`` -> per-task masked losses ``[T]`` -> loss weighting ->
    backward (the fused embedding optimiser updates the touched table rows inside it) -> Adam
    step of the dense part (then, with ``config.ema_decay`` > 0, the weight average's update). After
    each epoch the validation split is scored; the best epoch's weights are kept and loaded into
    ``model`` at the end. With weight averaging, the averaged weights are the ones validated, kept,
    loaded at the end and saved as the checkpoint's best weights (``model_state`` stays the live
    weights, the average is in ``trainer["weight_average"]``, by parameter name, to resume).

    Args:
        model: a multi-task model, ``model(sparse KJT, dense [B, Dd]) -> [B, T]`` (probabilities
            for binary tasks), with ``config`` and ``from_config`` (``mtkernels.nn.MultiTaskModel``).
        data: a ``mtkernels.data.MultiTaskData`` (``tasks``, ``splits``, ``batches``).
        config: hyperparameters (default ``TrainConfig()``).
        checkpoint_path: when given, a checkpoint is written there (atomically) after every
            epoch: latest and best weights, optimiser/weighting/RNG state, history, plus
            ``checkpoint_extra`` (e.g. the Ranker's serving tables).
        resume: continue from ``checkpoint_path`` when it exists (same model config required);
            the continued run equals an uninterrupted one.
        log: called with one line per epoch (default: tqdm.write when ``config.progress``).
        regularizer: ``regularizer(model) -> scalar tensor`` added to every step's weighted task
            loss before the backward (e.g. the L2-SP penalty of `mtkernels.transfer.transfer`'s
            report); its gradient reaches the parameters Adam trains. ``train_loss`` in the history
            stays the task loss. Not stored in checkpoints: pass it again when resuming.

    Returns:
        :class:`FitResult`.

    Raises:
        ValueError: a checkpoint to resume from whose model config differs from ``model.config``, or
            whose training config differs from ``config`` beyond epochs, patience, progress and
            eval_batch_size;
            the model's tasks differ from ``data.tasks``; ``config.validation_split`` or a
            ``config.monitor_tasks`` name the data does not have (checked before training).
    """
    config = config or TrainConfig()
    evaluation.check_tasks(model, data)
    _check_monitor(config, data)
    if log is None:
        log = tqdm.write if config.progress else (lambda line: None)
    tasks = data.tasks
    seed_everything(config.seed)
    weighting = make_weighting(config.loss_weighting, tasks, config.task_weights, config.gradnorm_alpha)
    groups = _dense_optimizer_groups(model, weighting, config.weight_decay, config.lr)
    flat = _flat_groups(model, data, weighting, groups)
    if flat is not None:  # most parameters in one buffer per group: fewer tensors for Adam to loop over
        groups = flat.groups
    optimizer = torch.optim.Adam(groups, lr=config.lr, fused=_fused_adam_supported(groups))
    zero_grad = flat.zero_grad if flat is not None else (lambda: optimizer.zero_grad(set_to_none=True))
    average = ExponentialMovingAverage(averaged_tensors(model, flat), config.ema_decay) if config.ema_decay > 0 else None
    shared = shared_parameters(model) if isinstance(weighting, GradNorm) else []
    if isinstance(weighting, GradNorm) and not shared:
        raise ValueError(
            "loss_weighting='gradnorm' needs shared parameters that require grad (the last shared layer); "
            "this model shares none"
        )

    history: List[Dict[str, Any]] = []
    best_monitor, best_epoch, bad_epochs = -math.inf, -1, 0
    best_state = None
    start_epoch = 0
    resumed_from = None
    stopped_early = False
    model_config = getattr(model, "config", None)

    if resume and checkpoint_path and os.path.isfile(checkpoint_path):
        ckpt = load_checkpoint(checkpoint_path)
        if "trainer" not in ckpt:
            raise ValueError(f"cannot resume from {checkpoint_path}: not the checkpoint of a training run (no trainer "
                             "state; e.g. a fused or cold-start checkpoint)")
        if ckpt.get("model_config") != model_config:
            raise ValueError(f"cannot resume from {checkpoint_path}: its model config differs in "
                             f"{_config_difference(ckpt.get('model_config'), model_config)}")
        saved_config = ckpt.get("train_config") or {}
        changed = {k: v for k, v in config.to_dict().items()
                   if k not in _RESUMABLE_CHANGES and k in saved_config and saved_config[k] != v}
        if changed:
            raise ValueError(f"cannot resume from {checkpoint_path}: its training config differs in "
                             f"{_config_difference({k: saved_config[k] for k in changed}, changed)} (only "
                             f"{', '.join(sorted(_RESUMABLE_CHANGES))} may change when resuming)")
        trainer = ckpt["trainer"]
        model.load_state_dict(ckpt["model_state"])
        optimizer.load_state_dict(flat.adam_state_dict(trainer["optimizer"]) if flat is not None else trainer["optimizer"])
        weighting.load_state_dict(trainer["weighting"])
        if isinstance(weighting, GradNorm) and trainer.get("weighting_optimizer") is not None:
            weighting.load_optimizer_state_dict(trainer["weighting_optimizer"])
        _set_rng_state(trainer["rng"])
        if average is not None:
            if trainer.get("weight_average") is None:
                raise ValueError(f"cannot resume from {checkpoint_path} with ema_decay {config.ema_decay}: "
                                 "it was written without weight averaging")
            load_model_average_state(model, average, trainer["weight_average"])
        history = list(ckpt["history"])
        best_monitor, best_epoch, bad_epochs = trainer["best_monitor"], trainer["best_epoch"], trainer["bad_epochs"]
        best_state = ckpt.get("best_model_state")
        stopped_early = trainer.get("stopped_early", False)
        start_epoch = trainer["epoch"] + 1
        resumed_from = trainer["epoch"]
        log(f"resumed from {checkpoint_path} after epoch {trainer['epoch']}")

    split = data.splits["train"]
    steps_per_epoch = max(1, math.ceil(split.num_rows / config.batch_size))

    def write_checkpoint(epoch: int) -> None:
        if not checkpoint_path:
            return
        save_checkpoint(
            checkpoint_path,
            {
                "model_class": class_path(model),
                "model_config": model_config,
                "model_state": model.state_dict(),
                "best_model_state": best_state,
                "train_config": config.to_dict(),
                "tasks": [{"name": t.name, "kind": t.kind} for t in tasks],
                "history": history,
                "trainer": {
                    "epoch": epoch,
                    "optimizer": optimizer.state_dict(),
                    "weighting": weighting.state_dict(),
                    "weighting_optimizer": weighting.optimizer_state_dict() if isinstance(weighting, GradNorm) else None,
                    "rng": _rng_state(),
                    "weight_average": model_average_state(model, average) if average is not None else None,
                    "best_monitor": best_monitor,
                    "best_epoch": best_epoch,
                    "bad_epochs": bad_epochs,
                    "stopped_early": stopped_early,
                },
                **(checkpoint_extra or {}),
            },
        )

    for epoch in range(start_epoch, config.epochs):
        if stopped_early:
            break
        model.train()
        total, steps = 0.0, 0
        task_sums = torch.zeros(len(tasks), dtype=torch.float64)
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}", disable=not config.progress, leave=False)
        started = time.perf_counter()
        # its own generator, seeded per epoch: a resumed run drops the same rows as an uninterrupted one
        dropout_rng = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch + 7919)
        for batch in data.batches("train", config.batch_size, shuffle=True, seed=config.seed * 1_000_003 + epoch):
            if config.id_dropout > 0:
                batch = drop_ids(batch, data, config.id_dropout, config.id_dropout_features,
                                 config.id_dropout_dense, dropout_rng)
            predictions = model(batch.sparse, batch.dense)
            losses = masked_task_losses(predictions, evaluation.scored_labels(model, batch.labels), tasks)
            objective = weighting.combine(losses)
            zero_grad()
            if shared:
                weighting.update(losses, shared)
            (objective if regularizer is None else objective + regularizer(model)).backward()
            if flat is not None:
                flat.gather_grads()
            optimizer.step()
            if average is not None:
                average.update()
            total += float(objective.detach())
            task_sums += losses.detach().double()
            steps += 1
            bar.update(1)
            if steps % 20 == 0:
                bar.set_postfix(loss=f"{total / steps:.4f}")
        seconds = time.perf_counter() - started
        bar.close()

        with average.averaged() if average is not None else contextlib.nullcontext():
            val = validation_monitor(model, data, config)
            if val["monitor"] > best_monitor:  # the weights validated (the average, when on) are kept
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        record = {
            "epoch": epoch,
            "train_loss": total / max(steps, 1),
            "task_losses": {t.name: float(v) / max(steps, 1) for t, v in zip(tasks, task_sums)},
            "task_weights": [float(w) for w in weighting.weights()],
            "seconds": seconds,
            "val": val,
            "monitor": val["monitor"],
        }
        history.append(record)
        if val["monitor"] > best_monitor:
            best_monitor, best_epoch, bad_epochs = val["monitor"], epoch, 0
        else:
            bad_epochs += 1
            stopped_early = config.patience > 0 and bad_epochs >= config.patience
        log(
            f"epoch {epoch}: loss {record['train_loss']:.4f}, {seconds:.2f} s, "
            + ", ".join(
                f"{t.name} " + " ".join(f"{k} {v:.4f}" for k, v in val[t.name].items()) for t in tasks
            )
            + ("  *" if best_epoch == epoch else "")
        )
        write_checkpoint(epoch)

    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    train_seconds = [h["seconds"] for h in history]
    return FitResult(
        history=history,
        best_epoch=best_epoch,
        best_monitor=best_monitor,
        seconds_per_epoch=float(np.mean(train_seconds)) if train_seconds else math.nan,
        stopped_early=stopped_early,
        resumed_from_epoch=resumed_from,
    )
