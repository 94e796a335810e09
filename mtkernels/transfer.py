"""Transfer learning and cold start: carry what a multi-task model learned to new tasks, new
label budgets and new users.

Recipe (pretrain -> transfer -> fine-tune)::

    source = presets.build_model(click_only, "mmoe"); fit(source, click_only, config)
    target = presets.build_model(like_and_rating, "mmoe")            # other tasks, new towers
    report = transfer(source, target, parts=("embeddings", "experts"), mode="freeze",
                      source_vocabularies=click_only.vocabularies,
                      target_vocabularies=like_and_rating.vocabularies)
    fit(target, like_and_rating, config)                              # trains gates and towers

What moves (``parts``):

- ``"embeddings"``: tables matched by name; rows matched by external id (the data sets'
  ``vocabularies``: ``{feature: [key of row 0, key of row 1, ...]}``, row 0 the unknown id, which is
  always carried over). Ids the source never saw keep the target's fresh initialisation.
- ``"experts"``: the shared expert networks (MMoE experts, PLE shared experts, the SharedBottom /
  ESMM bottom), and PLE task experts of tasks present in both models (matched by task name).
- ``"gates"``, ``"towers"``: per-task gates and towers of tasks present in both (by name).

How it trains afterwards (``mode``):

- ``"freeze"``: the transferred parts get a learning-rate scale of 0 (``MultiTaskModel.lr_scales``;
  a frozen table's unmatched rows keep their fresh values for good, so freeze tables whose ids the
  source covers and unfreeze the others afterwards, e.g.
  ``target.set_lr_scales({"embeddings.embedding_bags.user_id": 1.0})``):
  they take no gradient and hold no optimizer state; frozen tables are looked up by their own
  ``embedding_bags`` call with no fused optimizer and keep no Adagrad ``momentum`` buffer, frozen
  dense parameters are in no Adam group. This is what TorchRec lacks (an lr of 0 there still
  spends the optimizer memory and the backward).
- ``"finetune"``: they train at ``lr_scale`` x the base learning rate (one scale, or one per part,
  e.g. ``lr_scale={"embeddings": 0.1, "experts": 1.0}``): a table's fused optimizer
  runs at ``embedding lr x lr_scale`` (tables of one scale share one fused optimizer; the Adagrad
  accumulators of matched rows are copied too, so pretrained rows keep their small effective
  steps), and ``mtkernels.training.fit`` gives the transferred dense parameters their own Adam
  group at ``lr x lr_scale`` (the new parts train at the base rates).

L2-SP (``transfer(..., mode="finetune", l2_sp=alpha, l2_sp_new=beta)``; Li, Grandvalet & Davoine,
"Explicit inductive bias for transfer learning with convolutional networks", ICML 2018): instead of
plain weight decay towards 0, the transferred dense parameters are pulled towards their source
values, ``alpha/2 ||w - w_source||^2``, and the new ones towards 0, ``beta/2 ||w||^2``. The penalty
(`L2SP`, returned as ``report.regularizer``) is added to the training loss by ``fit(...,
regularizer=report.regularizer)``, so Adam sees its gradient like the task losses' (the paper's
form, with SGD there). Embedding tables trained by the fused row-wise Adagrad are not in it: their
optimizer runs inside the backward of the lookup and only sees the rows the batch touched, so a
penalty on the whole table would never reach it; they stay near the source through their
learning-rate scale (e.g. ``lr_scale={"embeddings": 0.1, ...}``) or by being frozen.

Cold start: users never seen in training are scored from their side features through the shared
parts, with the unknown ``user_id`` row 0 and mean (0) history features. `TrainConfig.id_dropout`
trains row 0 on purpose (`mtkernels.training.id_dropout`); `cold_topk_metrics` scores warm users
*as if* cold (on val: a selection signal that never touches test), and `popularity_topk_metrics`
computes the popularity baselines of PROTOCOL.md (overall, or within groups of user features).

Transfer learning of shared bottoms/experts follows the usual fine-tuning practice (Yosinski et
al., "How transferable are features in deep neural networks?", NeurIPS 2014: freeze or fine-tune
lower layers, train new heads); row matching by id follows TorchRec's practice of warm-starting
tables from a checkpoint keyed by feature name.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import evaluation as _evaluation
from . import metrics as _metrics
from . import ops
from .evaluation import default_ranking, fused_topk

PARTS = ("embeddings", "experts", "gates", "towers")
MODES = ("freeze", "finetune")
# Fine-tuning rates chosen on validation for Census income with 5% of the labels (README):
# pretrained rows move slowly, the experts adapt. On ml100k with 10% of the users' like/rating labels
# and leak-free dense statistics (`mtkernels.data.refit_dense_features`), val preferred one scale
# of 0.3 for both parts, by less than the seed-to-seed spread, and then L2-SP (`l2_sp=1`, `l2_sp_new=0.01`)
# at scale 1; on Census, L2-SP at these rates (`l2_sp=0.1`, `l2_sp_new=0.01`), by a hair (README).
RECOMMENDED_LR_SCALES = {"embeddings": 0.1, "experts": 1.0}
_TABLE_PREFIX = "embeddings.embedding_bags."

# (part, pattern over state_dict keys, regex group holding a task index or None). The match's
# end is the module prefix the learning-rate scale is set on.
_PATTERNS: List[Tuple[str, "re.Pattern", Optional[int]]] = [
    ("experts", re.compile(r"^backbone\.experts\.\d+(?=\.)"), None),                      # MMoE
    ("experts", re.compile(r"^backbone\.bottom(?=\.)"), None),                            # SharedBottom, ESMM
    ("experts", re.compile(r"^backbone\.levels\.\d+\.shared_experts\.\d+(?=\.)"), None),  # PLE
    ("experts", re.compile(r"^backbone\.levels\.\d+\.task_experts\.(\d+)\.\d+(?=\.)"), 1),
    ("gates", re.compile(r"^backbone\.gates\.(\d+)(?=\.)"), 1),
    ("gates", re.compile(r"^backbone\.levels\.\d+\.task_gates\.(\d+)(?=\.)"), 1),
    ("gates", re.compile(r"^backbone\.levels\.\d+\.shared_gate(?=\.)"), None),
    ("towers", re.compile(r"^towers\.(\d+)(?=\.)"), 1),
]


@dataclasses.dataclass
class TransferReport:
    """What `transfer` did.

    Attributes:
        mode: ``"freeze"`` or ``"finetune"``; part_scales: ``{part: learning-rate scale}`` of the
            transferred parts (0 when frozen).
        tables: ``{table: {"rows", "matched", "fresh", "by"}}``: target rows, rows copied from the
            source (row 0 included), rows left at their fresh initialisation, and how rows were
            matched (``"external id"`` or ``"position"``).
        skipped_tables: target tables the source does not have (left fresh and trained).
        parameters: target ``state_dict`` keys copied from the source (dense parts).
        prefixes: the ``{parameter-name prefix: scale}`` set on the target (``lr_scales``).
        regularizer: the `L2SP` penalty to pass to ``fit(..., regularizer=...)`` when `transfer`
            was given ``l2_sp``, else None.
    """

    mode: str
    part_scales: Dict[str, float]
    tables: Dict[str, Dict[str, object]]
    skipped_tables: List[str]
    parameters: List[str]
    prefixes: Dict[str, float]
    regularizer: Optional["L2SP"] = None

    def summary(self) -> str:
        """One line per table and one for the dense parts."""
        scales = ", ".join(f"{part} {scale:g}" for part, scale in self.part_scales.items())
        lines = [f"transfer ({self.mode}, lr scale {scales}):"]
        for name, t in self.tables.items():
            lines.append(f"  table {name}: {t['matched']}/{t['rows']} rows matched by {t['by']}, {t['fresh']} fresh")
        if self.skipped_tables:
            lines.append(f"  tables not in the source (fresh): {', '.join(self.skipped_tables)}")
        lines.append(f"  dense tensors copied: {len(self.parameters)}")
        return "\n".join(lines)


def _source_model(source):
    """(model, vocabularies or None) of a model, a checkpoint dict or a checkpoint path."""
    if isinstance(source, torch.nn.Module):
        return source, None
    from .training.checkpoint import build_model, load_checkpoint

    checkpoint = load_checkpoint(os.fspath(source)) if isinstance(source, (str, os.PathLike)) else source
    if not isinstance(checkpoint, dict) or "model_config" not in checkpoint:
        raise TypeError(f"source must be a model, a checkpoint dict or a checkpoint path, got {type(source).__name__}")
    return build_model(checkpoint, best=True), checkpoint.get("vocabularies")


def _row_map(name: str, source_rows: int, target_rows: int, source_keys, target_keys) -> Tuple[torch.Tensor, torch.Tensor, str]:
    """(target rows, source rows) to copy for one table; row 0 (unknown) always maps to row 0."""
    if source_keys is not None and target_keys is not None:
        if len(source_keys) != source_rows or len(target_keys) != target_rows:
            raise ValueError(
                f"table {name!r}: vocabularies have {len(source_keys)} (source) / {len(target_keys)} (target) "
                f"keys for {source_rows} / {target_rows} rows"
            )
        where = {key: row for row, key in enumerate(source_keys) if row > 0 and key is not None}
        pairs = [(0, 0)] + [(row, where[key]) for row, key in enumerate(target_keys)
                            if row > 0 and key is not None and key in where]
        by = "external id"
    elif source_rows == target_rows:
        pairs = [(row, row) for row in range(target_rows)]
        by = "position"
    else:
        raise ValueError(
            f"table {name!r} has {source_rows} rows in the source and {target_rows} in the target: give "
            "source_vocabularies and target_vocabularies (e.g. data.vocabularies) to match rows by external id"
        )
    index = torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)
    return index[:, 0], index[:, 1], by


def _task_index_maps(source, target) -> Dict[int, int]:
    source_names = [t.name for t in source.tasks]
    target_names = [t.name for t in target.tasks]
    return {i: target_names.index(n) for i, n in enumerate(source_names) if n in target_names}


@torch.no_grad()
def transfer(
    source,
    target: torch.nn.Module,
    parts: Sequence[str] = ("embeddings", "experts"),
    mode: str = "freeze",
    lr_scale: Union[float, Mapping[str, float]] = 1.0,
    source_vocabularies: Optional[Mapping[str, Sequence]] = None,
    target_vocabularies: Optional[Mapping[str, Sequence]] = None,
    l2_sp: Optional[float] = None,
    l2_sp_new: float = 0.0,
) -> TransferReport:
    """Copy the shared parts of a trained model into a new model and set how they train.

    Args:
        source: the trained `mtkernels.nn.MultiTaskModel`, or a checkpoint (a ``str`` or
            ``pathlib.Path`` path, or a dict from ``mtkernels.training``) whose ``vocabularies``
            entry, when present, is the default ``source_vocabularies``.
        target: a `MultiTaskModel` (changed in place), possibly with other tasks and towers; the
            transferred tensors must have the source's shapes (same embedding_dim, backbone sizes
            and, for experts, the same input width: the same features and dense columns).
        parts: any of `PARTS` (see the module docstring).
        mode: ``"freeze"`` (transferred parts get lr scale 0: no gradient, no optimizer state) or
            ``"finetune"`` (they train at ``lr_scale`` x the base learning rates).
        lr_scale: learning-rate multiplier of the transferred parts in ``"finetune"`` mode (>= 0), or
            ``{part: multiplier}`` (parts not named train at 1), e.g. ``{"embeddings": 0.1,
            "experts": 1.0}``: pretrained rows move slowly while the experts adapt (what the README's
            transfer results chose on validation). Calling `transfer` again on the same target
            (e.g. ``"finetune"`` after ``"freeze"``) sets the new scales.
        source_vocabularies, target_vocabularies: ``{feature: [external key of each row]}`` of the
            data sets the models were (will be) trained on (``MultiTaskData.vocabularies``). A table
            whose keys both sides give is matched row by row by key; otherwise rows are matched by
            position, which needs equal row counts.
        l2_sp: ``"finetune"`` only: L2-SP's alpha (>= 0). The report's ``regularizer`` is then an
            `L2SP` holding the transferred dense parameters' source values; give it to
            ``fit(..., regularizer=report.regularizer)`` (and ``TrainConfig(weight_decay=0)``: it
            replaces plain weight decay). None: no regulariser.
        l2_sp_new: L2-SP's beta (>= 0), the L2 penalty of the trained dense parameters that were
            not transferred (new gates and towers).

    Returns:
        `TransferReport` (rows matched per table, tensors copied, scales set, the L2-SP penalty).

    Raises:
        ValueError: unknown parts or mode, a negative or infinite lr_scale or one for a part not in ``parts``,
            different backbones (experts, gates), tensors of different shapes, tables of different row
            counts without vocabularies, ``gates``/``towers`` with no task name in both models,
            ``l2_sp`` with ``mode="freeze"``, a negative or infinite ``l2_sp`` or ``l2_sp_new``.
        TypeError: a source that is neither a model nor a checkpoint.
    """
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise ValueError(f"parts must be a non-empty subset of {PARTS}, got {list(parts)}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if isinstance(lr_scale, Mapping):
        extra = [p for p in lr_scale if p not in parts]
        if extra:
            raise ValueError(f"lr_scale names parts {extra} that are not transferred (parts: {list(parts)})")
        requested = {p: lr_scale.get(p, 1.0) for p in parts}
    else:
        requested = {p: lr_scale for p in parts}
    for part, value in requested.items():
        if not (math.isfinite(float(value)) and float(value) >= 0):
            raise ValueError(f"lr_scale of {part!r} must be a finite number >= 0, got {value}")
    if l2_sp is not None:
        if mode != "finetune":
            raise ValueError(f"l2_sp pulls fine-tuned parameters towards the source; it needs mode='finetune', got {mode!r}")
        if not all(math.isfinite(float(v)) and float(v) >= 0 for v in (l2_sp, l2_sp_new)):
            raise ValueError(f"l2_sp and l2_sp_new must be finite numbers >= 0, got {l2_sp} and {l2_sp_new}")
    source, checkpoint_vocabularies = _source_model(source)
    per_task = [p for p in parts if p in ("gates", "towers")]
    if per_task and not _task_index_maps(source, target):
        raise ValueError(f"parts {per_task} move between tasks of the same name, and the source's tasks "
                         f"{[t.name for t in source.tasks]} and the target's {[t.name for t in target.tasks]} share none")
    if source_vocabularies is None:
        source_vocabularies = checkpoint_vocabularies
    source_vocabularies = dict(source_vocabularies or {})
    target_vocabularies = dict(target_vocabularies or {})
    scales = {p: 0.0 if mode == "freeze" else float(v) for p, v in requested.items()}
    prefixes: Dict[str, float] = {}
    tables_report: Dict[str, Dict[str, object]] = {}
    skipped: List[str] = []
    copied: List[str] = []
    accumulators = []  # (table, target rows, source rows, source accumulator) to copy once the scales are set

    if "embeddings" in parts:
        source_tables = source.embeddings.embedding_bags
        for name, table in target.embeddings.embedding_bags.items():
            if name not in source_tables._modules:
                skipped.append(name)
                continue
            source_table = source_tables[name]
            if source_table.weight.shape[1] != table.weight.shape[1]:
                raise ValueError(f"table {name!r}: embedding_dim {source_table.weight.shape[1]} in the source, "
                                 f"{table.weight.shape[1]} in the target")
            rows, from_rows, by = _row_map(name, source_table.weight.shape[0], table.weight.shape[0],
                                           source_vocabularies.get(name), target_vocabularies.get(name))
            table.weight[rows] = source_table.weight[from_rows].to(table.weight.dtype)
            source_momentum = source_table._buffers.get("momentum")
            if mode == "finetune" and source_momentum is not None:
                accumulators.append((table, rows, from_rows, source_momentum))
            tables_report[name] = {"rows": int(table.weight.shape[0]), "matched": int(rows.numel()),
                                   "fresh": int(table.weight.shape[0] - rows.numel()), "by": by}
            prefixes[_TABLE_PREFIX + name] = scales["embeddings"]

    dense_parts = [p for p in parts if p != "embeddings"]
    if dense_parts:
        source_backbone = source.config["backbone"]
        if source_backbone != target.config["backbone"]:
            raise ValueError(f"cannot transfer {dense_parts} from a {source_backbone!r} backbone into a "
                             f"{target.config['backbone']!r} one")
        tasks = _task_index_maps(source, target)
        target_state = target.state_dict()
        for key, value in source.state_dict().items():
            for part, pattern, task_group in _PATTERNS:
                match = pattern.match(key)
                if part not in dense_parts or match is None:
                    continue
                target_key, prefix = key, match.group(0)
                if task_group is not None:
                    task = int(match.group(task_group))
                    if task not in tasks:
                        break
                    start, end = match.span(task_group)
                    target_key = key[:start] + str(tasks[task]) + key[end:]
                    prefix = prefix[:start] + str(tasks[task]) + prefix[end:]
                if target_key not in target_state:
                    break
                if target_state[target_key].shape != value.shape:
                    raise ValueError(
                        f"{key} is {tuple(value.shape)} in the source but {target_key} is "
                        f"{tuple(target_state[target_key].shape)} in the target (same features, dense columns "
                        "and backbone sizes are needed)"
                    )
                target_state[target_key].copy_(value)
                copied.append(target_key)
                prefixes[prefix] = scales[part]
                break

    # only scales that change: a target trained at the default 1 keeps an lr_scales-free config
    changed = {prefix: scale for prefix, scale in prefixes.items() if target.lr_scale_of(prefix) != scale}
    if changed:
        target.set_lr_scales(changed)
    # after the scales: a table frozen until now gets its Adagrad accumulator (zeros) only there
    for table, rows, from_rows, source_momentum in accumulators:
        target_momentum = table._buffers.get("momentum")
        if target_momentum is not None:
            target_momentum[rows] = source_momentum[from_rows]
    target._packed = None  # the fused scoring parameters are repacked from the copied weights
    regularizer = None
    if l2_sp is not None:
        parameters = dict(target.named_parameters())
        regularizer = L2SP({name: parameters[name] for name in copied if name in parameters},
                           alpha=float(l2_sp), beta=float(l2_sp_new))
    return TransferReport(mode, scales, tables_report, skipped, copied, prefixes, regularizer)


class L2SP:
    """The L2-SP penalty of fine-tuning (Li, Grandvalet & Davoine, "Explicit inductive bias for
    transfer learning with convolutional networks", ICML 2018)::

        alpha/2 * sum_{w transferred} ||w - w_source||^2  +  beta/2 * sum_{w new} ||w||^2

    over a model's trained dense parameters (those with ``requires_grad``). Embedding tables are
    left out: a fused optimizer never sees a dense gradient, and tables trained by Adam are left
    out too so that both kinds behave alike. "Transferred" are the names in ``reference``, the
    others are new. `transfer` builds one (``l2_sp=alpha, l2_sp_new=beta``); ``fit(model, data,
    config, regularizer=penalty)`` adds ``penalty(model)`` to every step's loss. Adam, `fit`'s
    optimizer, normalises the penalty's gradient like the task losses' (a coupled L2): with a large
    alpha the pull dominates wherever the task gradient is small and the steps jitter those
    weights around their source values (alpha 0.1 to 1 was best in the README's experiments).

    Args:
        reference: ``{parameter name: source value}`` (copied here, so training does not move them).
        alpha, beta: the penalty weights (finite, >= 0).

    Raises:
        ValueError: a negative or non-finite weight.
    """

    def __init__(self, reference: Mapping[str, torch.Tensor], alpha: float, beta: float = 0.0) -> None:
        if not all(math.isfinite(float(v)) and float(v) >= 0 for v in (alpha, beta)):
            raise ValueError(f"alpha and beta must be finite numbers >= 0, got {alpha} and {beta}")
        self.alpha, self.beta = float(alpha), float(beta)
        self.reference = {name: value.detach().clone() for name, value in reference.items()}

    def __call__(self, model: torch.nn.Module) -> torch.Tensor:
        """The penalty of ``model``'s current parameters (a scalar tensor that autograd differentiates).

        Raises:
            ValueError: a reference name that is not a parameter of ``model`` or has another shape.
        """
        parameters = dict(model.named_parameters())
        missing = [n for n in self.reference if n not in parameters or parameters[n].shape != self.reference[n].shape]
        if missing:
            raise ValueError(f"L2SP: the model has no parameters {missing} of the reference's shapes")
        transferred, new = [], []
        for name, parameter in parameters.items():
            if not parameter.requires_grad or name.startswith(_TABLE_PREFIX):
                continue
            if name in self.reference:
                transferred.append(parameter - self.reference[name].to(parameter.device, parameter.dtype))
            else:
                new.append(parameter)
        total = next(iter(parameters.values())).new_zeros(())
        if self.alpha > 0 and transferred:
            total = total + 0.5 * self.alpha * sum(d.pow(2).sum() for d in transferred)
        if self.beta > 0 and new:
            total = total + 0.5 * self.beta * sum(p.pow(2).sum() for p in new)
        return total


# --- data for transfer experiments -----------------------------------------------------------
def select_tasks(data, tasks: Sequence[str]):
    """A shallow copy of a `MultiTaskData` restricted to some tasks (label columns), e.g. to
    pretrain on ``click`` only. Features, rows and top-k sets are shared with ``data``.

    Raises:
        ValueError: an unknown or repeated task name.
    """
    names = [t.name for t in data.tasks]
    if not tasks or len(set(tasks)) != len(tasks) or any(t not in names for t in tasks):
        raise ValueError(f"tasks must be distinct names of {names}, got {list(tasks)}")
    columns = [names.index(t) for t in tasks]
    return _with_labels(data, lambda split, labels: labels[:, columns], [data.tasks[c] for c in columns])


def _with_labels(data, relabel, tasks):
    out = copy.copy(data)
    out.tasks = list(tasks)
    out.splits = {name: dataclasses.replace(split, labels=relabel(name, split.labels)) for name, split in data.splits.items()}
    # resample_negatives rebuilds a split from these rows: keep them consistent with the labels
    out._split_rows = {name: dataclasses.replace(rows, labels=relabel(name, rows.labels))
                       for name, rows in data._split_rows.items()}
    out._split_single = dict(data._split_single)
    return out


def keep_label_fraction(data, tasks: Sequence[str], fraction: float, seed: int = 0, split: str = "train",
                        unit: Optional[str] = None):
    """A shallow copy of ``data`` where only a seeded ``fraction`` of the ``split`` labels of
    ``tasks`` is kept (the other rows' ``tasks`` labels become NaN, which the masked loss drops).

    ``unit`` says what ``fraction`` counts:

    - ``"users"``: whole users are kept, ``round(fraction * U)`` (at least 1) of the split's U users
      with all their labels (the others keep none), the per-user reading of a label budget;
    - ``"rows"``: ``round(fraction * n)`` (at least 1) of the split's n rows that carry a label for at least one of
      ``tasks`` (on ml100k-mtl-v1 the positive rows; the sampled negatives have NaN like/rating
      already), a uniform draw, so every user keeps about ``fraction`` of their labels;
    - ``None`` (default): ``"users"`` where the split has users (MovieLens), ``"rows"`` where it has
      none (Census-Income, every row of user row 0).

    Draws use ``numpy.random.default_rng(seed)`` (``Generator.choice`` without replacement, sorted).
    Other tasks and other splits are untouched. Features are untouched too: on ml100k-mtl-v1 the
    dense rating statistics summarise every training label, so a label-budget experiment follows
    this with `mtkernels.data.refit_dense_features` (statistics from the kept labels only).

    Returns:
        ``(data, kept)``: the copy and, int64 sorted, the kept user rows (``"users"``) or the kept
        row indices of ``split`` (``"rows"``).

    Raises:
        ValueError: fraction outside (0, 1], unknown tasks or split, ``unit`` not one of None,
            ``"users"``, ``"rows"``, ``"users"`` on a split without users, or no labelled row.
    """
    if not 0.0 < float(fraction) <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    names = [t.name for t in data.tasks]
    if not tasks or any(t not in names for t in tasks):
        raise ValueError(f"tasks must be names of {names}, got {list(tasks)}")
    if split not in data.splits:
        raise ValueError(f"no split {split!r}; splits: {list(data.splits)}")
    if unit not in (None, "users", "rows"):
        raise ValueError(f"unit must be None, 'users' or 'rows', got {unit!r}")
    rows = data.splits[split]
    columns = [names.index(t) for t in tasks]
    users = torch.unique(rows.user_row)
    if unit is None:
        unit = "users" if users.numel() > 1 else "rows"
    rng = np.random.default_rng(seed)
    if unit == "users":
        if users.numel() < 2:
            raise ValueError(f"unit='users': split {split!r} has no users (one user row); use unit='rows'")
        count = max(1, int(round(fraction * users.numel())))
        kept = torch.from_numpy(np.sort(rng.choice(users.numpy(), size=count, replace=False)))
        keep = torch.isin(rows.user_row, kept)
    else:
        labelled = (~torch.isnan(rows.labels[:, columns])).any(dim=1).nonzero().squeeze(1)
        if labelled.numel() == 0:
            raise ValueError(f"no row of split {split!r} carries a label for {list(tasks)}")
        count = max(1, int(round(fraction * labelled.numel())))
        kept = torch.from_numpy(np.sort(rng.choice(labelled.numpy(), size=count, replace=False)))
        keep = torch.zeros(rows.num_rows, dtype=torch.bool)
        keep[kept] = True

    def relabel(name, labels):
        if name != split:
            return labels
        labels = labels.clone()
        for c in columns:
            labels[~keep, c] = float("nan")
        return labels

    return _with_labels(data, relabel, data.tasks), kept


def drop_unlabelled_rows(data, split: str = "train"):
    """A shallow copy of ``data`` whose ``split`` keeps only rows with at least one label.

    A masked per-task loss ignores rows whose labels are all NaN, so dropping them changes nothing
    but the batch composition and the time per epoch: after `select_tasks` to like + rating,
    MovieLens' sampled-negative rows (click only) are all NaN, and after `keep_label_fraction`
    most rows are. Top-k sets and other splits are untouched.
    """
    from .data.dataset import SplitRows, gather_jagged, lengths_to_offsets

    if split not in data.splits:
        raise ValueError(f"no split {split!r}; splits: {list(data.splits)}")
    out = _with_labels(data, lambda name, labels: labels, data.tasks)
    rows = out._split_rows[split]
    keep = (~torch.isnan(rows.labels)).any(dim=1).nonzero().squeeze(1)

    def take_multi(jagged):
        values, lengths = gather_jagged(jagged[0], jagged[1], keep)
        return values, lengths_to_offsets(lengths)

    subset = SplitRows(
        user_row=rows.user_row[keep], item_row=rows.item_row[keep], labels=rows.labels[keep],
        context_sparse={k: v[keep] for k, v in rows.context_sparse.items()},
        context_multi={k: take_multi(v) for k, v in rows.context_multi.items()},
        context_dense=None if rows.context_dense is None else rows.context_dense[keep],
        extra={k: v[keep] for k, v in rows.extra.items()},
    )
    out._split_rows[split] = subset
    if out._history is not None:  # the kept rows' history prefixes
        out._history = dataclasses.replace(out._history, prefix={**out._history.prefix, split: out._history.prefix[split][keep]})
    out.splits = dict(out.splits)
    out.splits[split] = out._assemble(split, subset)
    return out


# --- cold start -------------------------------------------------------------------------------
def as_cold_users(users, data, features: Sequence[str] = ("user_id",)):
    """A copy of `UserRows` with the id features set to the unknown id 0 and the user-side dense
    (history) features to their mean 0: the users as the model sees a user it never met (and an
    empty user-history bag, when the data has one)."""
    sparse = dict(users.sparse)
    for name in features:
        if name in sparse:
            sparse[name] = torch.zeros_like(sparse[name])
    multi = dict(users.multi)
    history = getattr(data, "history_feature", None)
    if history in multi:
        values, offsets = multi[history]
        multi[history] = (values[:0], torch.zeros_like(offsets))
    return dataclasses.replace(users, sparse=sparse, multi=multi, dense=torch.zeros_like(users.dense))


@torch.no_grad()
def cold_topk_metrics(model, data, split: str, k: int = 10, task_weights: Optional[Mapping[str, float]] = None,
                      users_per_block: int = 64) -> Dict[str, float]:
    """NDCG@k and Recall@k of a split's top-k evaluation with every user scored as a cold user
    (`as_cold_users`: unknown user id, mean history features, side features kept).

    On ``val`` this measures cold-start ranking without touching test data (model selection for
    id dropout); on ``test_cold`` it equals `mtkernels.evaluation.topk_metrics` (those users are
    cold already). A time-aware `mtkernels.cold_start.ColdStartModel` ranks each user at their
    request time in ``split`` (`mtkernels.cold_start.request_times`), as `evaluation.topk_lists` does.
    """
    model.eval()
    first = _evaluation._request_times(model, data, split)
    tasks = list(getattr(model, "tasks", data.tasks))
    task_weights = dict(task_weights or default_ranking(tasks))
    evaluation = data.topk_eval(split)
    items = torch.arange(data.num_items)
    lists = []
    for start in range(0, len(evaluation), users_per_block):
        stop = min(start + users_per_block, len(evaluation))
        users = as_cold_users(data.user_feature_rows(users=evaluation.users[start:stop]), data)
        batch = data.pair_batch(users, items)
        at = None if first is None else first[evaluation.users[start:stop]].repeat_interleave(data.num_items)
        predictions = _evaluation._forward(model, batch, at).reshape(stop - start, data.num_items, len(tasks))
        lo, hi = int(evaluation.exclude_offsets[start]), int(evaluation.exclude_offsets[stop])
        _, indices = fused_topk(predictions, tasks, task_weights, k,
                                evaluation.exclude_offsets[start:stop + 1] - lo, evaluation.exclude_indices[lo:hi])
        lists.append(indices)
    indices = torch.cat(lists) if lists else torch.zeros(0, k, dtype=torch.long)
    return {f"ndcg@{k}": float(_metrics.ndcg_at_k(indices, evaluation.relevant, k)),
            f"recall@{k}": float(_metrics.recall_at_k(indices, evaluation.relevant, k))}


def popularity_topk_metrics(data, split: str, k: int = 10, group_by: Sequence[str] = (),
                            source_split: str = "train") -> Dict[str, float]:
    """NDCG@k and Recall@k of popularity rankings (PROTOCOL.md §5 candidates and relevance).

    Popularity = the number of positives (first binary task) of each item in ``source_split``;
    with ``group_by`` (user-side single-valued features, e.g. ``("gender", "age")``), counted
    only over the users that share the ranked user's values of those features. Ties go to the
    smaller item id (the `ensemble_topk` rule).
    """
    evaluation = data.topk_eval(split)
    source = data.splits[source_split]
    first_binary = next((t for t, task in enumerate(data.tasks) if task.kind == "binary"), 0)
    positive = source.labels[:, first_binary] > 0
    items = source.item[positive] - 1
    num_items = data.num_items
    if group_by:
        table = data.user_feature_rows(users=torch.arange(data.num_user_rows))
        key = torch.zeros(data.num_user_rows, dtype=torch.long)
        for name in group_by:
            if name not in table.sparse:
                raise ValueError(f"group_by: {name!r} is not a single-valued user feature; "
                                 f"those are {sorted(table.sparse)}")
            values = table.sparse[name]
            key = key * (int(values.max()) + 1) + values
        source_keys = key[source.user_row[positive]]
        _, group = torch.unique(torch.cat([source_keys, key]), return_inverse=True)
        num_groups = int(group.max()) + 1
        counts = torch.zeros(num_groups, num_items)
        counts.index_put_((group[: source_keys.numel()], items), torch.ones(items.numel()), accumulate=True)
        scores = counts[group[source_keys.numel():][evaluation.users]]
    else:
        scores = torch.bincount(items, minlength=num_items)[:num_items].float().expand(len(evaluation), -1)
    _, indices = ops.ensemble_topk(scores.unsqueeze(0).contiguous(), torch.ones(1), k,
                                   exclude_offsets=evaluation.exclude_offsets, exclude_indices=evaluation.exclude_indices)
    return {f"ndcg@{k}": float(_metrics.ndcg_at_k(indices, evaluation.relevant, k)),
            f"recall@{k}": float(_metrics.recall_at_k(indices, evaluation.relevant, k))}


def frozen_summary(model) -> Dict[str, object]:
    """Trainable vs frozen parameter counts and optimizer-state bytes of a `MultiTaskModel` as it
    would train now: Adam keeps 2 float32 moments per trained dense value; the fused row-wise
    Adagrad one float32 per trained table row (SGD none)."""
    frozen = set(model.frozen_parameter_names())
    trained_dense = frozen_dense = table_rows = frozen_values = 0
    for name, parameter in model.named_parameters():
        if name in frozen:
            frozen_values += parameter.numel()
        elif name.startswith(_TABLE_PREFIX):
            table_rows += parameter.shape[0]
        else:
            trained_dense += parameter.numel()
    adagrad = (model.embeddings.optimizer_config or {}).get("kind") == "rowwise_adagrad"
    return {"frozen_values": frozen_values, "trained_dense_values": trained_dense,
            "optimizer_state_bytes": 8 * trained_dense + (4 * table_rows if adagrad else 0)}
