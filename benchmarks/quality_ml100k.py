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
early stopping on click, like and rating only; the tables show those three tasks.
--interaction-dim D adds the explicit biased-MF term to the --interaction-tasks (default like and rating;
``MultiTaskModel(interaction_tasks=..., interaction_dim=D)``), its tables trained by the fused row-wise
Adagrad at --interaction-lr (default: the tables' preset lr) with --interaction-weight-decay (default 0).
--val-only scores val alone (no test split is evaluated or printed): for screening variants.
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
TRAIN_KEYS = {"lr", "weight_decay", "batch_size", "epochs", "patience", "monitor", "loss_weighting", "ema_decay"}


def _value(text: str):
    if "," in text:
        return [int(v) for v in text.split(",") if v]
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


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
    parser.add_argument("--val-only", action="store_true", help="score val only (screening: no test split is touched)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = dict(item.split("=", 1) for item in args.set)
    overrides = {k: _value(v) for k, v in overrides.items()}

    data = load_ml100k_mtl_v1(args.data_dir, rating_estimate=args.rating_estimate, history_length=args.history_length,
                              ordinal_tasks=args.ordinal_tasks)
    results = {"threads": args.threads, "overrides": overrides, "rating_estimate": args.rating_estimate,
               "ordinal_tasks": args.ordinal_tasks, "interaction_dim": args.interaction_dim,
               "interaction_tasks": args.interaction_tasks if args.interaction_dim else None,
               "interaction_lr": args.interaction_lr, "interaction_weight_decay": args.interaction_weight_decay,
               "history_length": args.history_length, "history_table": args.history_table, "models": {}}
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
            if args.ordinal_tasks:
                values["monitor_tasks"] = ["click", "like", "rating"]
            torch.manual_seed(seed)
            from mtkernels.nn import MultiTaskModel

            model = MultiTaskModel(data.features, data.dense_dim, data.tasks, **kwargs)
            started = time.perf_counter()
            result = fit(model, data, TrainConfig(**values), log=print if args.verbose else (lambda line: None))
            run = {"seed": seed, "best_epoch": result.best_epoch, "epochs": len(result.history),
                   "seconds_per_epoch": result.seconds_per_epoch, "seconds_total": time.perf_counter() - started,
                   "val_history": [{k: h[k] for k in ("epoch", "train_loss", "monitor", "seconds")} for h in result.history]}
            for split in ("val",) if args.val_only else ("val", "test_warm", "test_cold"):
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
            warm = "" if args.val_only else (
                f" | warm click AUC {run['test_warm']['click_auc']:.4f} like AUC {run['test_warm']['like_auc']:.4f} "
                f"RMSE {run['test_warm']['rating_rmse']:.4f} NDCG@10 {run['test_warm']['ndcg@10']:.4f} "
                f"Recall@10 {run['test_warm']['recall@10']:.4f} | warm blend like AUC "
                f"{run['like_rating_blend']['test_warm_like_auc']:.4f} calibrated RMSE "
                f"{run['rating_calibration']['test_warm_rmse']:.4f}")
            print(f"{NAMES.get(backbone, backbone)} seed {seed}: {run['epochs']} epochs (best {run['best_epoch']}), "
                  f"{run['seconds_per_epoch']:.2f} s/epoch | val click AUC {v['click_auc']:.4f} like AUC {v['like_auc']:.4f} "
                  f"RMSE {v['rating_rmse']:.4f} NDCG@10 {v['ndcg@10']:.4f} | blend w {run['like_rating_blend']['weight']} "
                  f"val like AUC {run['like_rating_blend']['val_like_auc']:.4f} | calibrated RMSE ({calibration.scale:.3f} x + "
                  f"{calibration.shift:.3f}) val {run['rating_calibration']['val_rmse']:.4f}{warm}", flush=True)
        results["models"][backbone] = {"runs": runs}
        for split in ("val",) if args.val_only else ("val", "test_warm", "test_cold"):
            results["models"][backbone][split] = summarise([r[split] for r in runs])
    for split in ("val",) if args.val_only else ("test_warm", "test_cold"):
        rows = {NAMES.get(b, b): results["models"][b][split] for b in args.models}
        if split == "test_warm":
            rows.update(BASELINES)
        print()
        print(format_table(f"{split}: mean ± std over {args.seeds} seeds, {args.threads} threads", rows, args.seeds))
    print()
    for backbone in args.models:
        runs = results["models"][backbone]["runs"]
        mean = lambda values: sum(values) / len(values)  # noqa: E731
        blend_warm = "" if args.val_only else \
            f" test_warm {mean([r['like_rating_blend']['test_warm_like_auc'] for r in runs]):.4f}"
        calibrated_warm = "" if args.val_only else \
            f" test_warm {mean([r['rating_calibration']['test_warm_rmse'] for r in runs]):.4f}"
        print(f"{NAMES.get(backbone, backbone)}, mean over {len(runs)} seeds: val-chosen blend like AUC val "
              f"{mean([r['like_rating_blend']['val_like_auc'] for r in runs]):.4f}{blend_warm}; val-fitted calibrated RMSE "
              f"val {mean([r['rating_calibration']['val_rmse'] for r in runs]):.4f}{calibrated_warm}")
    if args.json:
        atomic_write(args.json, lambda f: f.write(json.dumps(results, indent=2, default=float).encode()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
