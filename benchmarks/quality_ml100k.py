"""Quality of the multi-task models on ml100k-mtl-v1 (issue 3 "Must reach"), 3 seeds per model.

    python -m benchmarks.quality_ml100k [--models mmoe ple] [--seeds 3] [--threads 2]
        [--set embedding_dim=32 --set lr=0.003 ...] [--rating-estimate offset|estimate] [--history-length L [--history-table item_id]]
        [--ordinal-tasks] [--interaction-dim D [--interaction-tasks like rating] [--interaction-lr LR]
        [--interaction-weight-decay WD]] [--val-only] [--json results.json]

Trains each model with the presets of `mtkernels.training.presets` (overridable with --set:
embedding_dim, embedding_lr, lr, weight_decay, batch_size, epochs, patience, dropout, expert_hidden,
num_experts, tower_hidden, ema_decay), early stopping on val, and prints one table per test split with the
mean and sample standard deviation over seeds beside the issue's baselines, plus training seconds
per epoch (the training loop only, at the given thread count). Each run also prints the val
metrics of the kept (best) epoch, the numbers to screen variants on (PROTOCOL.md 4).
--rating-estimate loads the data with an item-kNN column
(``load_ml100k_mtl_v1(rating_estimate=...)``); --history-length L adds the causal user-history bag
(``load_ml100k_mtl_v1(history_length=L)``, the user's last L earlier positives, mean-pooled), from its own
table or, with --history-table item_id, from the item_id table. Each run also reports the like AUC of the blend
``logit(p_like) + w * rating`` with w chosen on val (`evaluation.choose_like_rating_blend`), and the
RMSE of the rating head recalibrated by the least-squares line fitted on val (`evaluation.choose_rating_calibration`).
--ordinal-tasks trains with the auxiliary ``rating >= 2, 3, 5`` tasks (``load_ml100k_mtl_v1(ordinal_tasks=True)``),
early stopping on click, like and rating only (unless --set monitor_tasks=... names others); the tables
show those three tasks.
Task loss weights and the early-stopping monitor (TrainConfig): ``--set task_weights=click:1,like:2,rating:1``
(fixed weights by task name, unnamed tasks 1), ``--set loss_weighting=uncertainty|gradnorm``
(``--set gradnorm_alpha=1.5``), ``--set monitor_tasks=like,rating`` (the tasks the val "score" sums over).
--val-only trains and scores the val split only (metrics, blend, calibration), for screening without
looking at the test splits (PROTOCOL.md 4).
--interaction-dim D adds the explicit biased-MF term to the --interaction-tasks (default like and rating;
``MultiTaskModel(interaction_tasks=..., interaction_dim=D)``), its tables trained by the fused row-wise
Adagrad at --interaction-lr (default: the tables' preset lr) with --interaction-weight-decay (default 0).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from mtkernels import evaluation
from mtkernels.data import load_ml100k_mtl_v1
from mtkernels.demo import BASELINES, NAMES, flatten_metrics, format_table, summarise
from mtkernels.training import TrainConfig, fit, presets
from mtkernels.training.checkpoint import atomic_write

MODEL_KEYS = {"embedding_dim", "dropout", "tower_hidden"}
BACKBONE_KEYS = {"expert_hidden", "num_experts", "hidden", "num_shared_experts", "num_task_experts", "num_levels"}
TRAIN_KEYS = {"lr", "weight_decay", "batch_size", "epochs", "patience", "monitor", "loss_weighting", "ema_decay",
              "gradnorm_alpha", "task_weights", "monitor_tasks"}


def _value(text: str):
    if "," in text:
        return [int(v) for v in text.split(",") if v]
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def task_weights(text: str, task_names) -> list:
    """``"click:1,like:2"`` -> the fixed weights in ``task_names`` order (a task not named gets 1).

    Raises:
        ValueError: an entry not ``name:weight``, a name not in ``task_names``, a name given twice,
            or a weight that is not a number.
    """
    weights = {}
    for entry in filter(None, text.split(",")):
        name, sep, value = entry.partition(":")
        if not sep:
            raise ValueError(f"task_weights entries must be name:weight, got {entry!r}")
        if name not in task_names:
            raise ValueError(f"task_weights names an unknown task {name!r}; tasks: {list(task_names)}")
        if name in weights:
            raise ValueError(f"task_weights names task {name!r} twice")
        weights[name] = float(value)
    return [weights.get(name, 1.0) for name in task_names]


def monitor_tasks(text: str, task_names) -> list:
    """``"like,rating"`` -> ``["like", "rating"]``, the tasks the early-stopping "score" sums over.

    Raises:
        ValueError: no task named, or a name not in ``task_names``.
    """
    names = [name for name in text.split(",") if name]
    unknown = [name for name in names if name not in task_names]
    if unknown or not names:
        raise ValueError(f"monitor_tasks must name tasks of the data {list(task_names)}, got {text!r}")
    return names


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["shared_bottom", "mmoe", "ple"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds are first-seed .. first-seed+seeds-1")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a preset")
    parser.add_argument("--json", default=None, help="write all results here")
    parser.add_argument("--verbose", action="store_true", help="print one line per epoch")
    parser.add_argument("--rating-estimate", choices=["offset", "estimate"], default=None,
                        help="add an out-of-fold item-kNN column (load_ml100k_mtl_v1(rating_estimate=...))")
    parser.add_argument("--history-length", type=int, default=None, metavar="L",
                        help="add the causal user-history bag of the last L items (load_ml100k_mtl_v1(history_length=L))")
    parser.add_argument("--history-table", choices=["own", "item_id"], default="own",
                        help="the history bag's table: its own, or the item_id table (MultiTaskModel(shared_tables=...))")
    parser.add_argument("--ordinal-tasks", action="store_true",
                        help="train with the rating >= 2, 3, 5 auxiliary tasks (load_ml100k_mtl_v1(ordinal_tasks=True))")
    parser.add_argument("--interaction-dim", type=int, default=None, metavar="D",
                        help="add the biased-MF interaction term with D factors (MultiTaskModel(interaction_dim=D))")
    parser.add_argument("--interaction-tasks", nargs="+", default=["like", "rating"],
                        help="the tasks that get the interaction term (with --interaction-dim)")
    parser.add_argument("--interaction-lr", type=float, default=None,
                        help="row-wise Adagrad lr of the interaction tables (default: the tables' preset lr)")
    parser.add_argument("--interaction-weight-decay", type=float, default=0.0,
                        help="L2 penalty of the interaction's looked-up rows")
    parser.add_argument("--val-only", action="store_true",
                        help="score the val split only (screening without the test splits)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = dict(item.split("=", 1) for item in args.set)
    text_keys = {"task_weights", "monitor_tasks"}
    overrides = {k: (v if k in text_keys else _value(v)) for k, v in overrides.items()}

    data = load_ml100k_mtl_v1(args.data_dir, rating_estimate=args.rating_estimate, history_length=args.history_length,
                              ordinal_tasks=args.ordinal_tasks)
    names = [task.name for task in data.tasks]
    if "task_weights" in overrides:
        overrides["task_weights"] = task_weights(overrides["task_weights"], names)
    if "monitor_tasks" in overrides:
        overrides["monitor_tasks"] = monitor_tasks(overrides["monitor_tasks"], names)
    results = {"threads": args.threads, "overrides": overrides, "rating_estimate": args.rating_estimate,
               "ordinal_tasks": args.ordinal_tasks, "interaction_dim": args.interaction_dim,
               "interaction_tasks": args.interaction_tasks if args.interaction_dim else None,
               "interaction_lr": args.interaction_lr, "interaction_weight_decay": args.interaction_weight_decay,
               "history_length": args.history_length, "history_table": args.history_table, "models": {}}
    splits = ("val",) if args.val_only else ("val", "test_warm", "test_cold")
    for backbone in args.models:
        runs = []
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            kwargs = presets.model_kwargs(backbone)
            for key, value in overrides.items():
                if key in MODEL_KEYS:
                    kwargs[key] = value
                elif key in BACKBONE_KEYS and key in kwargs["backbone_kwargs"]:
                    kwargs["backbone_kwargs"][key] = value
                elif key == "embedding_lr":
                    kwargs["embedding_optimizer"]["lr"] = value
            if args.history_length is not None and args.history_table == "item_id":
                kwargs["shared_tables"] = {"history": "item_id"}
            if args.interaction_dim is not None:
                kwargs.update(interaction_tasks=args.interaction_tasks, interaction_dim=args.interaction_dim,
                              interaction_weight_decay=args.interaction_weight_decay)
                if args.interaction_lr is not None:
                    kwargs["interaction_optimizer"] = dict(kwargs["embedding_optimizer"], lr=args.interaction_lr)
            values = dict(presets.train_values(backbone), seed=seed, progress=False)
            values.update({k: v for k, v in overrides.items() if k in TRAIN_KEYS})
            if args.ordinal_tasks and "monitor_tasks" not in overrides:
                values["monitor_tasks"] = ["click", "like", "rating"]
            torch.manual_seed(seed)
            from mtkernels.nn import MultiTaskModel

            model = MultiTaskModel(data.features, data.dense_dim, data.tasks, **kwargs)
            started = time.perf_counter()
            result = fit(model, data, TrainConfig(**values), log=print if args.verbose else (lambda line: None))
            run = {"seed": seed, "best_epoch": result.best_epoch, "epochs": len(result.history),
                   "seconds_per_epoch": result.seconds_per_epoch, "seconds_total": time.perf_counter() - started,
                   "val_history": [{k: h[k] for k in ("epoch", "train_loss", "monitor", "seconds", "task_weights")}
                                   for h in result.history]}
            for split in splits:
                flat = flatten_metrics(evaluation.evaluate(model, data, split))
                flat.update(seconds_per_epoch=result.seconds_per_epoch, epochs=float(len(result.history)))
                run[split] = flat
            blend, val_aucs = evaluation.choose_like_rating_blend(model, data, "val")
            run["like_rating_blend"] = {"weight": blend.weight, "val_like_auc": val_aucs[blend.weight]}
            calibration = evaluation.choose_rating_calibration(model, data, "val")
            run["rating_calibration"] = {
                "scale": calibration.scale, "shift": calibration.shift,
                "val_rmse": evaluation.evaluate(calibration, data, "val", topk=False)["rating"]["rmse"]}
            if not args.val_only:
                run["like_rating_blend"]["test_warm_like_auc"] = evaluation.evaluate(
                    blend, data, "test_warm", topk=False)["like"]["auc"]
                run["rating_calibration"]["test_warm_rmse"] = evaluation.evaluate(
                    calibration, data, "test_warm", topk=False)["rating"]["rmse"]
            runs.append(run)
            v = run["val"]
            warm = ""
            if not args.val_only:
                w = run["test_warm"]
                warm = (f" | warm click AUC {w['click_auc']:.4f} like AUC {w['like_auc']:.4f} "
                        f"RMSE {w['rating_rmse']:.4f} NDCG@10 {w['ndcg@10']:.4f} Recall@10 {w['recall@10']:.4f}")
            print(f"{NAMES.get(backbone, backbone)} seed {seed}: {run['epochs']} epochs (best {run['best_epoch']}), "
                  f"{run['seconds_per_epoch']:.2f} s/epoch{warm} | val click AUC {v['click_auc']:.4f} like AUC "
                  f"{v['like_auc']:.4f} RMSE {v['rating_rmse']:.4f} NDCG@10 {v['ndcg@10']:.4f} | blend w "
                  f"{run['like_rating_blend']['weight']} val like AUC {run['like_rating_blend']['val_like_auc']:.4f}"
                  + ("" if args.val_only else f" warm like AUC {run['like_rating_blend']['test_warm_like_auc']:.4f}")
                  + f" | calibrated RMSE ({calibration.scale:.3f} x + {calibration.shift:.3f}) val "
                  f"{run['rating_calibration']['val_rmse']:.4f}"
                  + ("" if args.val_only else f" warm {run['rating_calibration']['test_warm_rmse']:.4f}"), flush=True)
        results["models"][backbone] = {"runs": runs}
        results["models"][backbone].update({split: summarise([r[split] for r in runs]) for split in splits})
    for split in splits:
        rows = {NAMES.get(b, b): results["models"][b][split] for b in args.models}
        if split == "test_warm":
            rows.update(BASELINES)
        print()
        print(format_table(f"{split}: mean ± std over {args.seeds} seeds, {args.threads} threads", rows, args.seeds))
    print()
    for backbone in args.models:
        runs = results["models"][backbone]["runs"]
        mean = lambda values: sum(values) / len(values)  # noqa: E731
        line = (f"{NAMES.get(backbone, backbone)}, mean over {len(runs)} seeds: val-chosen blend like AUC val "
                f"{mean([r['like_rating_blend']['val_like_auc'] for r in runs]):.4f}")
        if not args.val_only:
            line += f" test_warm {mean([r['like_rating_blend']['test_warm_like_auc'] for r in runs]):.4f}"
        line += f"; val-fitted calibrated RMSE val {mean([r['rating_calibration']['val_rmse'] for r in runs]):.4f}"
        if not args.val_only:
            line += f" test_warm {mean([r['rating_calibration']['test_warm_rmse'] for r in runs]):.4f}"
        print(line)
    if args.json:
        atomic_write(args.json, lambda f: f.write(json.dumps(results, indent=2, default=float).encode()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
