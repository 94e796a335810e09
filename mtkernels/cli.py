"""The ``mtkernels`` command line: ``demo``, ``train``, ``fuse``, ``cold-start``, ``evaluate``, ``recommend``, ``info``.

    mtkernels info
    mtkernels train --data ml100k --model mmoe --checkpoint runs/mmoe.pt [--epochs 20 --seed 0 ...]
    mtkernels fuse --member runs/ple.pt --member runs/mmoe.pt --cf ease sr --out runs/fused.pt
    mtkernels train --tasks like,rating --init-from runs/click.pt --freeze embeddings,experts --checkpoint runs/like.pt
    mtkernels cold-start --checkpoint runs/click.pt --out runs/cold.pt [--weight 1 --evaluate test_cold]
    mtkernels evaluate --checkpoint runs/mmoe.pt [--split test_warm --split test_cold]
    mtkernels recommend --checkpoint runs/mmoe.pt --user 5 [--user 900] [--k 10]
    mtkernels demo --out outputs/demo

``--data`` is ``ml100k`` (MovieLens-100K, protocol ml100k-mtl-v1), ``census`` (Census-Income) or
the path of a CSV/Parquet interaction log with ``--schema`` (see ``mtkernels.data.load_interactions``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

import torch

from ._extension import info


DATA_SET_NAMES = ("ml100k", "ml100k-mtl-v1", "movielens", "census", "census-income")


def load_data(spec: Dict[str, Any]):
    """Load a data set from a plain spec ``{"name": "ml100k" | "census" | path, "data_dir",
    "schema", "history_length"}`` (stored in checkpoints so ``evaluate`` reloads the same data).

    Raises:
        ValueError: an unknown data set name with no such file; ``history_length`` for a data set other
            than ml100k.
    """
    from . import data as data_module

    name = spec.get("name", "ml100k")
    data_dir = spec.get("data_dir")
    if name in ("ml100k", "ml100k-mtl-v1", "movielens"):
        history = {"history_length": spec["history_length"]} if spec.get("history_length") is not None else {}
        return data_module.load_ml100k_mtl_v1(data_dir, **history)
    if spec.get("history_length") is not None:
        raise ValueError(f"--history-length applies to ml100k only (its causal user-history bag), not to --data {name}")
    if name in ("census", "census-income"):
        return data_module.load_census_income(data_dir)
    if os.path.isfile(name):
        if not spec.get("schema"):
            raise ValueError(f"--data {name} is a file: give its columns with --schema (YAML file or JSON)")
        return data_module.load_interactions(name, _schema(spec["schema"]))
    raise ValueError(f"--data must be 'ml100k', 'census' or an existing CSV/Parquet file, got {name!r}")


def _load_tasks(spec: Dict[str, Any]):
    """`load_data`, then only the spec's ``tasks`` (label columns) when it names some (``train --tasks``)."""
    data = load_data(spec)
    if spec.get("tasks"):
        from .transfer import select_tasks

        data = select_tasks(data, list(spec["tasks"]))
    return data


def _checkpoint_data(checkpoint: Dict[str, Any], data_dir: Optional[str]):
    """The data spec a checkpoint was trained on (``data_dir`` overriding its folder) and that data set."""
    spec = dict(checkpoint.get("data") or {"name": "ml100k"})
    if data_dir:
        spec["data_dir"] = os.path.abspath(data_dir)
    return spec, _load_tasks(spec)


def _check_splits(data, splits: Optional[Sequence[str]], option: str) -> None:
    """Refuse a split name the data set does not have before any work is done."""
    for split in splits or []:
        if split not in data.splits:
            raise ValueError(f"{option} {split!r} is not a split of this data set; splits: {list(data.splits)}")


def _portable_spec(spec: Dict[str, Any]) -> Dict[str, Any]:
    """The data spec with its paths (a log file, a YAML schema, the data folder) made absolute, so that
    the checkpoint storing it is evaluated, served or fused from any working directory."""
    spec = dict(spec)
    if spec.get("name") and spec["name"] not in DATA_SET_NAMES and os.path.isfile(spec["name"]):
        spec["name"] = os.path.abspath(spec["name"])
    if spec.get("data_dir"):
        spec["data_dir"] = os.path.abspath(spec["data_dir"])
    schema = spec.get("schema")
    if isinstance(schema, str) and not schema.lstrip().startswith("{") and os.path.isfile(schema):
        spec["schema"] = os.path.abspath(schema)
    return spec


def _schema(schema):
    if isinstance(schema, dict):
        return schema
    text = str(schema)
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--schema: not valid JSON ({exc}): {text!r}") from None
    if not os.path.isfile(text):
        raise ValueError(f"--schema: no such YAML file {text!r} (give a YAML path or JSON text)")
    return text  # a YAML path: the loader reads it


def _task_weights(pairs: Optional[Sequence[str]]) -> Optional[Dict[str, float]]:
    if not pairs:
        return None
    weights = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--task-weight must look like NAME=WEIGHT (e.g. click=1.0), got {pair!r}")
        if name in weights:
            raise ValueError(f"--task-weight names {name} twice")
        try:
            weights[name] = float(value)
        except ValueError:
            raise ValueError(f"--task-weight {pair!r}: the weight must be a number") from None
    return weights


def _strict_json(value: Any) -> str:
    from .training.checkpoint import strict_json  # lazy, as every command's training imports

    return strict_json(value)


def _format_metrics(result: Dict[str, Any]) -> str:
    parts = []
    for key, value in result.items():
        if isinstance(value, dict):
            parts.append(f"{key}: " + " ".join(f"{k} {v:.4f}" for k, v in value.items() if isinstance(v, (int, float))))
    return " | ".join(parts)


# --- commands -------------------------------------------------------------------------------
def cmd_info(args) -> int:
    print(json.dumps(info(), indent=2))
    return 0


def cmd_train(args) -> int:
    from .evaluation import evaluate
    from .training import TrainConfig, fit, presets

    if args.threads:
        torch.set_num_threads(args.threads)
    data_spec = _portable_spec({"name": args.data, "data_dir": args.data_dir, "schema": args.schema})
    if args.tasks:
        data_spec["tasks"] = [t for t in args.tasks.split(",") if t]
    if args.history_length is not None:
        data_spec["history_length"] = args.history_length
    data = _load_tasks(data_spec)
    _check_splits(data, args.evaluate, "--evaluate")
    overrides = {"embedding_dim": args.embedding_dim, "use_fused_optimizer": args.embedding_optimizer != "none"}
    if args.embedding_optimizer == "none" and args.embedding_lr is not None:
        raise ValueError("--embedding-lr needs a fused --embedding-optimizer (with 'none' the tables train with Adam "
                         "at --lr)")
    if args.embedding_optimizer != "none":
        overrides["embedding_optimizer"] = dict(presets.EMBEDDING_OPTIMIZER, kind=args.embedding_optimizer,
                                                **({"lr": args.embedding_lr} if args.embedding_lr is not None else {}))
    # the initial weights belong to the seeded run: --seed S twice gives the same model
    torch.manual_seed(args.seed if args.seed is not None else presets.TRAIN_PRESET.get("seed", TrainConfig().seed))
    model = presets.build_model(data, args.model, **overrides)
    regularizer = _init_from(args, model, data)
    # the transfer recipes (README) were chosen without weight averaging: --init-from keeps it off unless asked
    values = presets.train_values(args.model) if args.init_from is None else dict(presets.TRAIN_PRESET)
    if regularizer is not None:
        values["weight_decay"] = 0.0  # L2-SP replaces plain weight decay (unless --weight-decay is given)
    for field in ("epochs", "batch_size", "lr", "weight_decay", "patience", "monitor", "loss_weighting", "seed"):
        value = getattr(args, field)
        if value is not None:
            values[field] = value
    if values["epochs"] < 1:
        raise ValueError(f"--epochs must be >= 1 (the checkpoint is written after each epoch), got {values['epochs']}")
    values["progress"] = not args.no_progress
    if args.id_dropout is not None:
        values["id_dropout"] = args.id_dropout
    if args.ema_decay is not None:
        values["ema_decay"] = args.ema_decay
    if args.monitor_tasks:
        values["monitor_tasks"] = [t for t in args.monitor_tasks.split(",") if t]
    config = TrainConfig(**values)
    # the L2-SP penalty is part of the objective but not of TrainConfig: the checkpoint records it
    l2_sp = None if regularizer is None else [regularizer.alpha, regularizer.beta]
    if os.path.exists(args.checkpoint) and not args.resume:
        print(f"note: training from scratch replaces the existing checkpoint {args.checkpoint} (--resume continues it)",
              file=sys.stderr)
    if args.resume and os.path.isfile(args.checkpoint):
        _check_resumed_l2_sp(args.checkpoint, l2_sp)
    extra = {"data": data_spec, "serving": _serving_tables(data),
             "vocabularies": data.vocabularies, "l2_sp": l2_sp}
    result = fit(model, data, config, checkpoint_path=args.checkpoint, resume=args.resume, checkpoint_extra=extra,
                 regularizer=regularizer)
    print(f"trained {args.model}: best epoch {result.best_epoch}, {len(result.history)} epochs, "
          f"{result.seconds_per_epoch:.2f} s/epoch; checkpoint: {os.path.abspath(args.checkpoint)}")
    if args.evaluate:
        for split in args.evaluate:
            print(f"{split}: {_format_metrics(evaluate(model, data, split))}")
    return 0


def cmd_fuse(args) -> int:
    from .fusion import CFMember, ScoreFusion, model_member_from_checkpoint

    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.member:
        raise ValueError("fuse needs at least one --member CHECKPOINT")
    members, first = [], None
    for spec in args.member:
        path, _, name = spec.partition("=")
        member, checkpoint = model_member_from_checkpoint(path, name or None)
        if any(m.name == member.name for m in members):
            member.name = f"{member.name}-{len(members)}"
        members.append(member)
        first = first or checkpoint
    data_spec = dict(first.get("data") or {"name": "ml100k"})
    if args.data_dir:
        data_spec["data_dir"] = os.path.abspath(args.data_dir)
    data = load_data(data_spec)
    _check_splits(data, args.evaluate, "--evaluate")
    cfs = [c for c in dict.fromkeys(args.cf) if c != "none"]
    members.extend(CFMember.fit(data, c) for c in cfs)
    fusion = ScoreFusion(members, args.tasks, mode=args.mode, tables=first["serving"])
    gap_matched = args.objective == "ndcg@10" and not args.full_val_history
    report = fusion.fit_weights(data, objective=args.objective, seed=args.seed, gap_matched=gap_matched)
    fusion.save(args.out, extra={"data": data_spec})
    print("weights: " + ", ".join(f"{k} {v:.3f}" for k, v in report["weights"].items()))
    for split in args.evaluate or []:
        print(f"{split}: " + " ".join(f"{k} {v:.4f}" for k, v in fusion.topk_metrics(data, split).items()))
    print(f"fused checkpoint: {os.path.abspath(args.out)}")
    return 0


def cmd_cold_start(args) -> int:
    from .cold_start import (ColdStartModel, cold_start_checkpoint, first_session_prior_for, fit_item_prior,
                             item_prior_for, recent_popularity_prior_for)
    from .evaluation import evaluate
    from .training import build_model, load_checkpoint, save_checkpoint

    if not 0.0 <= args.weight <= 1.0:
        raise ValueError(f"--weight must be in [0, 1] (0: the model alone, 1: the prior alone), got {args.weight}")
    if not 0.0 <= args.recent_share <= 1.0:
        raise ValueError(f"--recent-share must be in [0, 1] (0: no time-aware prior), got {args.recent_share}")
    if not (math.isfinite(args.half_life) and args.half_life > 0):
        raise ValueError(f"--half-life must be a positive number of days, got {args.half_life}")
    if not 0.0 < args.mix <= 1.0:
        raise ValueError(f"--mix must be in (0, 1], got {args.mix}")
    if not (math.isfinite(args.session_days) and args.session_days >= 0):
        raise ValueError(f"--session-days must be a number of days >= 0 (0: every training positive), got {args.session_days}")
    if args.threads:
        torch.set_num_threads(args.threads)
    checkpoint = load_checkpoint(args.checkpoint)
    if "fusion" in checkpoint:
        raise ValueError(f"--checkpoint {args.checkpoint} is a fused checkpoint; cold-start wraps a trained model")
    if str(checkpoint.get("model_class", "")).endswith(":ColdStartModel"):
        raise ValueError(f"--checkpoint {args.checkpoint} is already a cold-start checkpoint; give the checkpoint of "
                         "`mtkernels train` it wraps")
    spec, data = _checkpoint_data(checkpoint, args.data_dir)
    _check_splits(data, args.evaluate, "--evaluate")
    features = [tuple(part for part in group.split("*") if part) for group in args.features.split(",") if group]
    try:
        l2 = [float(v) for v in args.l2.split(",") if v]
    except ValueError:
        raise ValueError(f"--l2 must be a number or comma-separated numbers, got {args.l2!r}") from None
    prior = fit_item_prior(item_prior_for(data, features), data, l2=l2[0] if len(l2) == 1 else l2,
                           epochs=args.epochs, seed=args.seed)
    recent = None
    if args.recent_share > 0:
        if "timestamp" not in (data.splits["train"].extra or {}):
            raise ValueError(f"--recent-share {args.recent_share:g}: {data.name} has no timestamp column for the "
                             "time-aware prior; pass --recent-share 0 to use the side-feature prior alone")
        recent = (first_session_prior_for(data, args.half_life, args.mix, args.session_days) if args.session_days > 0
                  else recent_popularity_prior_for(data, args.half_life, args.mix))
    model = ColdStartModel(build_model(checkpoint, best=True), prior, args.weight, recent=recent,
                           recent_share=args.recent_share)
    save_checkpoint(args.out, dict(cold_start_checkpoint(model, data), data=spec,
                                   vocabularies=checkpoint.get("vocabularies", data.vocabularies)))
    counted = f", first sessions of {args.session_days:g} days" if args.session_days > 0 else ""
    timed = (f", time-aware prior share {args.recent_share:g} (half-life {args.half_life:g} days, mix {args.mix:g}"
             f"{counted})" if recent is not None else "")
    print(f"cold-start model (item prior {args.features}, L2 {args.l2}{timed}, weight {args.weight:g}): "
          f"{os.path.abspath(args.out)}")
    for split in args.evaluate or []:
        print(f"{split}: {_format_metrics(evaluate(model, data, split))}")
    return 0


def _parts(text: Optional[str], option: str) -> List[str]:
    from .transfer import PARTS

    parts = [p for p in (text or "").split(",") if p]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"{option}: unknown parts {unknown}; parts are {', '.join(PARTS)}")
    return parts


def _lr_scale(text: str):
    """``--transfer-lr-scale``: ``"0.3"`` -> 0.3; ``"embeddings=0.1,experts=1"`` -> {part: scale}."""
    if "=" not in text:
        try:
            scale = float(text)
        except ValueError:
            raise ValueError(f"--transfer-lr-scale: expected a number or PART=SCALE,..., got {text!r}") from None
        if not (math.isfinite(scale) and scale >= 0):
            raise ValueError(f"--transfer-lr-scale: a scale must be a finite number >= 0, got {text!r}")
        return scale
    scales = {}
    for item in (i for i in text.split(",") if i):
        part, _, value = item.partition("=")
        try:
            scales[part] = float(value)
        except ValueError:
            raise ValueError(f"--transfer-lr-scale: expected PART=SCALE, got {item!r}") from None
        if not (math.isfinite(scales[part]) and scales[part] >= 0):
            raise ValueError(f"--transfer-lr-scale: a scale must be a finite number >= 0, got {item!r}")
    _parts(",".join(scales), "--transfer-lr-scale")
    return scales


def _l2_sp(text: Optional[str]):
    """``--l2-sp``: ``"0.1"`` -> (0.1, 0.0); ``"0.1,0.01"`` -> (alpha, beta); None -> None."""
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or not all(math.isfinite(v) and v >= 0 for v in values):
        raise ValueError(f"--l2-sp: expected ALPHA or ALPHA,BETA (numbers >= 0), got {text!r}")
    return values[0], (values[1] if len(values) == 2 else 0.0)


def _check_resumed_l2_sp(path: str, l2_sp: Optional[List[float]]) -> None:
    """``--resume``: refuse an ``--l2-sp`` other than the one the checkpoint was trained with (a
    checkpoint written before it was recorded is not checked)."""
    from .training import load_checkpoint

    saved = load_checkpoint(path)
    if "l2_sp" not in saved or saved["l2_sp"] == l2_sp:
        return
    said = lambda value: "none" if value is None else ",".join(f"{v:g}" for v in value)  # noqa: E731
    raise ValueError(f"cannot resume from {path}: it was trained with --l2-sp {said(saved['l2_sp'])}, this run has "
                     f"--l2-sp {said(l2_sp)} (the penalty is a training setting; only --epochs and --patience may "
                     "change when resuming)")


def _init_from(args, model, data):
    """``--init-from CHECKPOINT``: copy the ``--transfer`` parts, freezing the ``--freeze`` ones and
    fine-tuning the rest at ``--transfer-lr-scale`` (`mtkernels.transfer.transfer`), with the L2-SP
    penalty of ``--l2-sp`` (returned for `fit`; None without it)."""
    from .training import load_checkpoint
    from .transfer import transfer

    frozen = _parts(args.freeze, "--freeze")
    l2_sp = _l2_sp(args.l2_sp)
    if not args.init_from:
        for option, value in (("--freeze", frozen), ("--l2-sp", l2_sp), ("--transfer", args.transfer),
                              ("--transfer-lr-scale", args.transfer_lr_scale)):
            if value:
                raise ValueError(f"{option} needs --init-from CHECKPOINT (the source parts come from it)")
        return None
    parts = _parts(args.transfer if args.transfer is not None else "embeddings,experts", "--transfer")
    if not parts and not frozen:
        raise ValueError("--transfer names no part to copy")
    scale = _lr_scale(args.transfer_lr_scale if args.transfer_lr_scale is not None else "1")
    tuned = [p for p in parts if p not in frozen]
    if args.transfer_lr_scale is not None and not tuned:
        raise ValueError(f"--transfer-lr-scale {args.transfer_lr_scale} has no fine-tuned part to scale: every copied "
                         f"part is frozen ({', '.join(frozen)})")
    checkpoint = load_checkpoint(args.init_from)
    kind = "fused" if "fusion" in checkpoint else (
        "cold-start" if str(checkpoint.get("model_class", "")).endswith(":ColdStartModel") else None)
    if kind:
        raise ValueError(f"--init-from {args.init_from} is a {kind} checkpoint; transfer copies from the checkpoint of "
                         "`mtkernels train`")
    if isinstance(scale, dict):
        unknown = [p for p in scale if p not in tuned]
        if unknown:
            raise ValueError(f"--transfer-lr-scale names {unknown}, which are not fine-tuned parts ({', '.join(tuned)})")
    if l2_sp is not None and not tuned:
        raise ValueError("--l2-sp pulls fine-tuned parts towards the source, and every --transfer part is frozen")
    regularizer = None
    for mode, chosen in (("freeze", frozen), ("finetune", tuned)):
        if chosen:
            alpha, beta = l2_sp if mode == "finetune" and l2_sp is not None else (None, 0.0)
            report = transfer(checkpoint, model, parts=chosen, mode=mode, lr_scale=scale if mode == "finetune" else 0.0,
                              target_vocabularies=data.vocabularies, l2_sp=alpha, l2_sp_new=beta)
            print(report.summary())
            regularizer = report.regularizer or regularizer
    return regularizer


def cmd_evaluate(args) -> int:
    from .evaluation import evaluate
    from .training import build_model, load_checkpoint

    checkpoint = load_checkpoint(args.checkpoint)
    _, data = _checkpoint_data(checkpoint, args.data_dir)
    splits = args.split or [s for s in ("test_warm", "test_cold", "test") if s in data.splits]
    _check_splits(data, splits, "--split")
    if "fusion" in checkpoint:  # a fused checkpoint ranks: top-k metrics only
        from .fusion import ScoreFusion

        if args.task_weight:
            raise ValueError("--task-weight does not apply to a fused checkpoint: it ranks by its learned source weights")

        fusion = ScoreFusion.from_checkpoint(checkpoint)
        results = {split: {"topk": fusion.topk_metrics(data, split, k=args.k)} for split in splits}
        print(_strict_json(results) if args.json else
              "\n".join(f"{split}: {_format_metrics(r)}" for split, r in results.items()))
        return 0
    model = build_model(checkpoint, best=True)
    results = {}
    for split in splits:
        results[split] = evaluate(model, data, split, k=args.k, task_weights=_task_weights(args.task_weight))
    if args.json:
        print(_strict_json(results))
    else:
        for split, result in results.items():
            print(f"{split}: {_format_metrics(result)}")
    return 0


def _serving_tables(data):
    """The checkpoint's serving tables, or None (with a note) where the Ranker cannot serve the data set."""
    from .evaluation import has_items
    from .serving import serving_tables

    if not has_items(data):
        return None
    if not (isinstance(data.user_ids, torch.Tensor) and isinstance(data.item_ids, torch.Tensor)):
        print("note: the user or item ids are not integers, so the checkpoint holds no serving tables "
              "(`recommend` needs integer ids; `evaluate` works)", file=sys.stderr)
        return None
    if not any(s in data.topk_splits for s in ("test_warm", "test")):  # its exclusions are the seen items
        print("note: the data set has no top-k set for its test split, so the checkpoint holds no serving tables "
              "(no user has a relevant test item; `evaluate` works)", file=sys.stderr)
        return None
    return serving_tables(data)


def _side_features(args) -> Dict[int, Dict[str, object]]:
    """``--side-features USER=JSON`` (raw values, e.g. ``{"age": 31, "gender": "F"}``) -> encoded ids, with
    the encoders of the checkpoint's data set (`MultiTaskData.new_user_rows`)."""
    from .training import load_checkpoint

    raw = {}
    for text in args.side_features:
        user, sep, value = text.partition("=")
        try:
            user_id, features = int(user), json.loads(value) if sep else None
        except ValueError:
            features = None
        if not isinstance(features, dict):
            raise ValueError(f"--side-features must be USER=JSON-object, e.g. 9999='{{\"age\": 31, \"gender\": \"F\"}}', "
                             f"got {text!r}")
        raw[user_id] = features
    checkpoint = load_checkpoint(args.checkpoint)
    _, data = _checkpoint_data(checkpoint, args.data_dir)
    rows = data.new_user_rows(list(raw.values()))
    return {user: {name: int(ids[i]) for name, ids in rows.sparse.items()} for i, user in enumerate(raw)}


def cmd_recommend(args) -> int:
    from .serving import Ranker

    if not args.user and not args.side_features:
        raise ValueError("give at least one --user or --side-features USER=JSON")
    ranker = Ranker.load(args.checkpoint)
    side_features = _side_features(args) if args.side_features else None
    users = list(dict.fromkeys(args.user + list(side_features or {})))
    result = ranker.recommend(users, k=args.k, exclude_seen=not args.include_seen,
                              task_weights=_task_weights(args.task_weight), side_features=side_features, at=args.at)
    if args.json:  # the list stops where the items do (k above the candidates: no -1 / -inf padding)
        lists = []
        for u, how, ids, scores, titles in zip(result.user_ids, result.served_by, result.item_ids, result.scores,
                                               result.titles):
            n = int((ids >= 0).sum())
            lists.append({"user_id": u, "served_by": how, "item_ids": ids[:n].tolist(), "scores": scores[:n].tolist(),
                          "titles": titles[:n]})
        print(_strict_json(lists))
        return 0
    for u, how, ids, scores, titles in zip(result.user_ids, result.served_by, result.item_ids, result.scores, result.titles):
        print(f"user {u} (served by {how}):")
        for rank, (i, s, t) in enumerate(zip(ids.tolist(), scores.tolist(), titles), start=1):
            if i >= 0:
                print(f"  {rank:2d}. {t} (item {i}, score {s:.4f})")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(out=args.out, data_dir=args.data_dir, models=args.models, seeds=args.seeds,
             epochs=args.epochs, progress=not args.no_progress, threads=args.threads, fuse=not args.no_fusion)
    return 0


def _threads(text: str) -> int:
    """``--threads``: an integer >= 1 (``torch.set_num_threads`` refuses the rest)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtkernels", description="Multi-task recommendation with fused kernels.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="build and runtime facts (native ops, CUDA, threads)")
    p.set_defaults(func=cmd_info)

    def add_data(p):
        p.add_argument("--data", default="ml100k", help="ml100k | census | path of a CSV/Parquet log")
        p.add_argument("--data-dir", default=None, help="folder of the raw files (default: MTKERNELS_DATA)")
        p.add_argument("--schema", default=None, help="schema of a CSV/Parquet log: YAML path or JSON text")

    p = sub.add_parser("train", help="train a multi-task model and write a checkpoint")
    add_data(p)
    p.add_argument("--model", default="mmoe", choices=["shared_bottom", "mmoe", "ple", "esmm"])
    p.add_argument("--checkpoint", required=True, help="checkpoint file (written atomically every epoch)")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint when it exists")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="Adam learning rate of the dense part")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--patience", type=int)
    p.add_argument("--monitor", choices=["score", "loss", "ndcg"])
    p.add_argument("--monitor-tasks", default=None, metavar="T1,T2",
                   help="tasks the 'score' monitor sums over (default all), e.g. like when click is an auxiliary task")
    p.add_argument("--loss-weighting", choices=["fixed", "uncertainty", "gradnorm"],
                   help="default: the backbone's preset (MMoE, PLE: uncertainty; others fixed); fixed with --init-from")
    p.add_argument("--seed", type=int)
    p.add_argument("--embedding-dim", type=int)
    p.add_argument("--embedding-optimizer", default="rowwise_adagrad", choices=["rowwise_adagrad", "sgd", "none"],
                   help="fused update of the tables inside the backward ('none': Adam with dense gradients)")
    p.add_argument("--embedding-lr", type=float)
    p.add_argument("--tasks", default=None, metavar="T1,T2", help="train only these tasks (label columns)")
    p.add_argument("--history-length", type=int, default=None, metavar="L",
                   help="ml100k: add the causal user-history bag of the last L items (load_ml100k_mtl_v1(history_length=L))")
    p.add_argument("--init-from", default=None, metavar="CHECKPOINT",
                   help="start from a trained checkpoint's shared parts (transfer learning)")
    p.add_argument("--transfer", default=None, metavar="PARTS",
                   help="parts copied by --init-from: embeddings, experts, gates, towers (default embeddings,experts)")
    p.add_argument("--freeze", default=None, metavar="PARTS",
                   help="parts copied by --init-from and frozen (no gradient, no optimizer state), e.g. embeddings,experts")
    p.add_argument("--transfer-lr-scale", default=None, metavar="SCALE|PART=SCALE,...",
                   help="learning-rate multiplier of the copied parts that are not frozen: one number, or one per "
                        "part, e.g. embeddings=0.1,experts=1 (parts not named: 1; default 1)")
    p.add_argument("--l2-sp", default=None, metavar="ALPHA[,BETA]",
                   help="L2-SP fine-tuning (Li et al., ICML 2018): penalise alpha/2 ||w - w_source||^2 of the copied "
                        "dense parts that are not frozen and beta/2 ||w||^2 of the new ones, instead of weight decay "
                        "(which becomes 0 unless --weight-decay is given); tables are left to --transfer-lr-scale")
    p.add_argument("--id-dropout", type=float, default=None, metavar="P",
                   help="cold start: replace a training row's user id by the unknown id with probability P")
    p.add_argument("--ema-decay", type=float, default=None, metavar="DECAY",
                   help="validate, keep and serve an exponential moving average of the weights (0: off; default: the preset, off with --init-from)")
    p.add_argument("--evaluate", action="append", metavar="SPLIT", help="evaluate on SPLIT afterwards (repeatable)")
    p.add_argument("--threads", type=_threads, help="torch.set_num_threads")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("fuse", help="fuse trained models (and a collaborative-filtering model) into one ranker")
    p.add_argument("--member", action="append", default=[], metavar="CHECKPOINT[=NAME]",
                   help="a training checkpoint to fuse (repeatable)")
    p.add_argument("--cf", nargs="+", default=["ease", "sr"], choices=["ease", "itemknn", "sr", "none"],
                   help="collaborative-filtering members fitted on the same training split (sr: SequentialRules)")
    p.add_argument("--full-val-history", action="store_true",
                   help="fit the ndcg@10 weights with the CF members scoring val users from their whole training "
                        "history (default: gap-matched, see ScoreFusion.fit_weights)")
    p.add_argument("--tasks", nargs="+", default=["click"], help="task scores each member contributes")
    p.add_argument("--mode", default="weighted", choices=["weighted", "rrf"])
    p.add_argument("--objective", default="ndcg@10", choices=["ndcg@10", "logloss"],
                   help="what the weights are fitted for on the validation split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="fused checkpoint to write")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--evaluate", action="append", metavar="SPLIT", help="top-k metrics on SPLIT afterwards")
    p.add_argument("--threads", type=_threads)
    p.set_defaults(func=cmd_fuse)

    from .cold_start import RECOMMENDED

    p = sub.add_parser("cold-start", help="wrap a trained model with an item prior for users never seen in "
                                          "training (served from side features) and write a checkpoint")
    p.add_argument("--checkpoint", required=True, help="a checkpoint of `mtkernels train` (its data set is reloaded)")
    p.add_argument("--out", required=True, help="cold-start checkpoint to write (Ranker.load / evaluate / recommend)")
    p.add_argument("--features", default=",".join("*".join(g) for g in RECOMMENDED["features"]), metavar="F1*F2,F3",
                   help="user side-feature groups of the prior, '*' crosses features (default: %(default)s)")
    p.add_argument("--l2", default=f"{RECOMMENDED['l2']:g}", metavar="L2[,L2...]",
                   help="L2 of the prior: one value, or one per group of --features (default: %(default)s)")
    p.add_argument("--weight", type=float, default=RECOMMENDED["weight"],
                   help="blend weight of the prior for unknown users, 0..1 (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=RECOMMENDED["epochs"], help="passes over the training positives")
    p.add_argument("--recent-share", type=float, default=RECOMMENDED["recent_share"],
                   help="share of the time-aware popularity prior in the prior term, 0..1 (0: none; default: "
                        "%(default)s); unknown users are then ranked by the request time (recommend --at)")
    p.add_argument("--half-life", type=float, default=RECOMMENDED["half_life_days"], metavar="DAYS",
                   help="half-life of the time-aware prior's decayed counts, days > 0 (default: %(default)s)")
    p.add_argument("--mix", type=float, default=RECOMMENDED["mix"],
                   help="share of all-time counts in the time-aware prior, (0, 1] (default: %(default)s)")
    p.add_argument("--session-days", type=float, default=RECOMMENDED["session_days"], metavar="DAYS",
                   help="time-aware prior over each training user's first DAYS days only (FirstSessionPrior); 0: "
                        "over every training positive (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--evaluate", action="append", metavar="SPLIT", help="evaluate on SPLIT afterwards (repeatable)")
    p.add_argument("--threads", type=_threads)
    p.set_defaults(func=cmd_cold_start)

    p = sub.add_parser("evaluate", help="metrics of a checkpoint on test splits")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--split", action="append", help="split to evaluate (repeatable; default the test splits)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--task-weight", action="append", metavar="TASK=W", help="ranking score weights (repeatable)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("recommend", help="top-k items for users, from a checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--user", type=int, action="append", default=[], help="external user id (repeatable)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--include-seen", action="store_true", help="do not exclude the items a user has seen")
    p.add_argument("--task-weight", action="append", metavar="TASK=W", help="ranking score weights (repeatable)")
    p.add_argument("--side-features", action="append", default=[], metavar="USER=JSON",
                   help="raw side features of a user the checkpoint does not know, e.g. "
                        "9999='{\"age\": 31, \"gender\": \"F\", \"occupation\": \"writer\", \"zip_code\": \"10025\"}' "
                        "(repeatable; encoded with the checkpoint's data set)")
    p.add_argument("--data-dir", default=None, help="raw data folder for --side-features (default: MTKERNELS_DATA)")
    p.add_argument("--at", type=float, default=None, metavar="SECONDS",
                   help="request time (Unix seconds) for a cold-start checkpoint with a time-aware prior: only "
                        "training ratings up to it count (default: the latest training timestamp)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_recommend)

    p = sub.add_parser("demo", help="train SharedBottom, MMoE and PLE on MovieLens-100K; report and plot")
    p.add_argument("--out", default="outputs/demo")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--models", nargs="+", default=["shared_bottom", "mmoe", "ple"])
    p.add_argument("--seeds", type=int, default=1, help="seeds per model (mean and spread when > 1)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--threads", type=_threads, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-fusion", action="store_true", help="skip the fusion stage (models + EASE + SequentialRules, fused)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f"mtkernels {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
