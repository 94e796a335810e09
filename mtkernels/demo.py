"""``mtkernels demo`` (``make demo``): SharedBottom, MMoE and PLE trained on MovieLens-100K under the
ml100k-mtl-v1 protocol, their test metrics beside published baselines, top-10 movies for a warm and
a cold user, a JSON report and a PNG of the learning curves.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

# Issue 3: the same protocol run with other libraries on this machine (test_warm).
BASELINES: Dict[str, Dict[str, float]] = {
    "torch-rechub MMoE": {"click_auc": 0.830, "like_auc": 0.804, "rating_rmse": 0.981, "ndcg@10": 0.100,
                          "recall@10": 0.083, "seconds_per_epoch": 7.4},
    "torch-rechub PLE": {"click_auc": 0.829, "like_auc": 0.801, "rating_rmse": 0.984, "ndcg@10": 0.105,
                         "recall@10": 0.088, "seconds_per_epoch": 7.4},
    "ItemKNN (implicit)": {"ndcg@10": 0.109, "recall@10": 0.097},
}

COLUMNS = [
    ("click_auc", "click AUC"), ("click_logloss", "click LL"), ("like_auc", "like AUC"),
    ("like_logloss", "like LL"), ("rating_rmse", "RMSE"), ("ndcg@10", "NDCG@10"),
    ("recall@10", "Recall@10"), ("seconds_per_epoch", "s/epoch"), ("epochs", "epochs"),
]

NAMES = {"shared_bottom": "SharedBottom", "mmoe": "MMoE", "ple": "PLE", "esmm": "ESMM"}


def flatten_metrics(result: Dict[str, Any]) -> Dict[str, float]:
    """``{"click": {"auc": ..}, "topk": {"ndcg@10": ..}}`` -> ``{"click_auc": .., "ndcg@10": ..}``."""
    flat: Dict[str, float] = {}
    for key, value in result.items():
        if key == "topk":
            flat.update(value or {})
        elif isinstance(value, dict):
            flat.update({f"{key}_{k}": v for k, v in value.items()})
    return flat


def summarise(runs: List[Dict[str, float]]) -> Dict[str, Dict[str, float]]:
    """Mean and spread (sample standard deviation; 0 for one run) of each metric over seeds."""
    keys = sorted({k for r in runs for k in r})
    out = {"mean": {}, "std": {}}
    for k in keys:
        values = np.array([r[k] for r in runs if k in r], dtype=float)
        out["mean"][k] = float(values.mean())
        out["std"][k] = float(values.std(ddof=1)) if values.size > 1 else 0.0
    return out


def format_table(title: str, rows: Dict[str, Dict[str, Any]], seeds: int) -> str:
    """A fixed-width table: one row per model (mean, with ±std when seeds > 1) or baseline."""
    header = f"{'model':<22}" + "".join(f"{label:>16}" for _, label in COLUMNS)
    lines = [title, header, "-" * len(header)]
    for name, row in rows.items():
        cells = []
        for key, _ in COLUMNS:
            mean = row.get("mean", {}).get(key, row.get(key))
            std = row.get("std", {}).get(key)
            if mean is None or (isinstance(mean, float) and math.isnan(mean)):
                cells.append(f"{'-':>16}")
            elif key == "epochs":
                cells.append(f"{mean:>16.1f}")
            elif std is not None and seeds > 1:
                cells.append(f"{mean:>9.4f}±{std:.3f}".rjust(16) if key != "seconds_per_epoch" else f"{mean:>10.2f}±{std:.2f}".rjust(16))
            else:
                cells.append(f"{mean:>16.4f}" if key != "seconds_per_epoch" else f"{mean:>16.2f}")
        lines.append(f"{name:<22}" + "".join(cells))
    return "\n".join(lines)


def plot_learning_curves(history: Dict[str, List[Dict[str, Any]]], path: str) -> None:
    """A PNG with train loss and validation metrics per epoch, one line per model run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .training.checkpoint import atomic_write

    panels = [("train loss", lambda h: h["train_loss"]),
              ("val click AUC", lambda h: h["val"]["click"]["auc"]),
              ("val like AUC", lambda h: h["val"]["like"]["auc"]),
              ("val rating RMSE", lambda h: h["val"]["rating"]["rmse"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (label, get) in zip(axes, panels):
        for run, records in history.items():
            ax.plot([r["epoch"] + 1 for r in records], [get(r) for r in records], marker="o", ms=3, label=run)
        ax.set_title(label)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("ml100k-mtl-v1: learning curves (validation split)")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def fusion_stage(data, report: Dict[str, Any], models: Sequence[str], out: str, print_fn=print) -> Dict[str, Any]:
    """Fuse the demo's seed-0 models, EASE and SequentialRules (both fitted on train) with weights
    learned on gap-matched val (NDCG@10; `ScoreFusion.fit_weights`); print and return each member's and the fusion's test_warm / test_cold NDCG@10 and
    Recall@10 and the weights; write the fused checkpoint to ``<out>/fused.pt``."""
    from .fusion import CFMember, ScoreFusion, model_member_from_checkpoint

    started = time.perf_counter()
    members, tables = [], None
    for backbone in models:
        member, checkpoint = model_member_from_checkpoint(report["models"][backbone]["runs"][0]["checkpoint"],
                                                          NAMES.get(backbone, backbone))
        members.append(member)
        tables = checkpoint["serving"]
    cfs = [CFMember.fit(data, "ease", name="EASE"), CFMember.fit(data, "sr", name="SequentialRules")]
    fusion = ScoreFusion(members + cfs, ["click"], tables=tables)
    fit = fusion.fit_weights(data, objective="ndcg@10", seed=0, gap_matched=True)
    rows: Dict[str, Dict[str, float]] = {}
    for backbone in models:
        run = report["models"][backbone]["runs"][0]
        rows[NAMES.get(backbone, backbone)] = {f"{split}_{m}": run[split][m] for split in ("test_warm", "test_cold")
                                               for m in ("ndcg@10", "recall@10")}
    # the collaborative-filtering members have nothing to rank cold users with (no training history)
    for cf in cfs:
        rows[cf.name] = {f"test_warm_{m}": v for m, v in ScoreFusion([cf], ["click"], tables=tables).topk_metrics(data, "test_warm").items()}
        rows[cf.name].update({"test_cold_ndcg@10": math.nan, "test_cold_recall@10": math.nan})
    rows["fusion"] = {f"{split}_{m}": v for split in ("test_warm", "test_cold")
                      for m, v in fusion.topk_metrics(data, split).items()}
    checkpoint = os.path.join(out, "fused.pt")
    fusion.save(checkpoint, extra={"data": {"name": "ml100k"}})
    weights = {name.split("/")[0]: w for name, w in fit["weights"].items()}
    print_fn("")
    print_fn("fusion (seed-0 models + EASE + SequentialRules, click scores; weights by coordinate search on "
             "gap-matched val NDCG@10)")
    header = f"{'member':<16}{'weight':>8}{'warm NDCG@10':>14}{'warm Recall@10':>16}{'cold NDCG@10':>14}{'cold Recall@10':>16}"
    print_fn(header)
    print_fn("-" * len(header))
    for name, row in rows.items():
        weight = f"{weights[name]:.3f}" if name in weights else "-"
        cells = [f"{row[key]:>{width}.4f}" if not math.isnan(row[key]) else f"{'-':>{width}}"
                 for key, width in (("test_warm_ndcg@10", 14), ("test_warm_recall@10", 16),
                                    ("test_cold_ndcg@10", 14), ("test_cold_recall@10", 16))]
        print_fn(f"{name:<16}{weight:>8}" + "".join(cells))
    seconds = time.perf_counter() - started
    print_fn(f"(EASE and SequentialRules have no history for cold users: they are ranked by the models alone.) "
             f"fused checkpoint: {os.path.abspath(checkpoint)} (stage: {seconds:.0f} s)")
    return {"members": rows, "weights": weights, "val_ndcg@10": fit["val_fitted"], "checkpoint": checkpoint,
            "seconds": seconds}


def run_demo(out: str = "outputs/demo", data_dir: Optional[str] = None,
             models: Sequence[str] = ("shared_bottom", "mmoe", "ple"), seeds: int = 1,
             epochs: Optional[int] = None, progress: bool = True, threads: Optional[int] = None,
             print_fn=print, fuse: bool = True) -> Dict[str, Any]:
    """Run the demo; returns the report (also written to ``<out>/report.json``).

    Args:
        out: output folder (created): ``report.json``, ``learning_curves.png``, one checkpoint per
            model and seed (``<model>-seed<s>.pt``).
        data_dir: folder of the MovieLens files (default: ``MTKERNELS_DATA`` / the fetched cache).
        models: backbones to train.
        seeds: runs per model (0..seeds-1); tables show the mean (± sample std when > 1).
        epochs: cap on epochs (default: the preset, with early stopping on val).
        threads: ``torch.set_num_threads`` (default: torch's).
        fuse: add the fusion stage (:func:`fusion_stage`): the seed-0 models, EASE and
            SequentialRules, fused.

    Raises:
        ValueError: ``seeds`` or ``epochs`` below 1, no model or an unknown backbone (before any
            work: nothing is loaded or written).
    """
    from . import evaluation
    from .nn.model import BACKBONES
    from .data import load_ml100k_mtl_v1
    from .serving import Ranker, serving_tables
    from .training import TrainConfig, fit, presets
    from .training.checkpoint import atomic_write, strict_json

    for name, value in (("seeds", seeds), ("epochs", epochs)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    unknown = [m for m in models if m not in BACKBONES]
    if not models or unknown:
        raise ValueError(f"models: unknown backbones {unknown}; backbones are {list(BACKBONES)}" if unknown
                         else "models must name at least one backbone")
    started = time.perf_counter()
    if threads:
        torch.set_num_threads(threads)
    os.makedirs(out, exist_ok=True)
    data = load_ml100k_mtl_v1(data_dir)
    print_fn(f"data: {data!r} (loaded in {time.perf_counter() - started:.1f} s, {torch.get_num_threads()} threads)")
    tables = serving_tables(data)
    data_spec = {"name": "ml100k", "data_dir": os.path.abspath(data_dir) if data_dir else None}  # any working folder

    report: Dict[str, Any] = {"protocol": "ml100k-mtl-v1", "seeds": seeds, "models": {}, "baselines": BASELINES,
                              "ranking_score": "click probability", "threads": torch.get_num_threads()}
    curves: Dict[str, List[Dict[str, Any]]] = {}
    for backbone in models:
        runs = []
        for seed in range(seeds):
            values = dict(presets.train_values(backbone), seed=seed, progress=progress)
            if epochs is not None:
                values["epochs"] = epochs
            torch.manual_seed(seed)
            model = presets.build_model(data, backbone)
            checkpoint = os.path.join(out, f"{backbone}-seed{seed}.pt")
            result = fit(model, data, TrainConfig(**values), checkpoint_path=checkpoint,
                         checkpoint_extra={"data": data_spec, "serving": tables},
                         log=(lambda line: None) if not progress else None)
            run = {"seed": seed, "checkpoint": checkpoint, "best_epoch": result.best_epoch,
                   "epochs": len(result.history), "seconds_per_epoch": result.seconds_per_epoch}
            for split in ("test_warm", "test_cold"):
                flat = flatten_metrics(evaluation.evaluate(model, data, split))
                flat.update(seconds_per_epoch=result.seconds_per_epoch, epochs=float(len(result.history)))
                run[split] = flat
            run["history"] = result.history
            runs.append(run)
            curves[f"{NAMES.get(backbone, backbone)} s{seed}"] = result.history
            print_fn(f"{NAMES.get(backbone, backbone)} seed {seed}: {len(result.history)} epochs "
                     f"({result.seconds_per_epoch:.2f} s/epoch), test_warm click AUC "
                     f"{run['test_warm']['click_auc']:.4f}, NDCG@10 {run['test_warm']['ndcg@10']:.4f}")
        report["models"][backbone] = {
            "runs": runs,
            "test_warm": summarise([r["test_warm"] for r in runs]),
            "test_cold": summarise([r["test_cold"] for r in runs]),
        }

    for split in ("test_warm", "test_cold"):
        rows = {NAMES.get(b, b): report["models"][b][split] for b in models}
        if split == "test_warm":
            rows.update(BASELINES)
        print_fn("")
        print_fn(format_table(f"{split} (mean over {seeds} seed{'s' if seeds > 1 else ''}; ranking score: "
                              f"click probability; baselines from issue 3)", rows, seeds))

    if fuse:
        report["fusion"] = fusion_stage(data, report, models, out, print_fn)

    # Recommendations from the best model by validation (first seed), for one warm and one cold user.
    best = max(models, key=lambda b: report["models"][b]["runs"][0]["history"][report["models"][b]["runs"][0]["best_epoch"]]["monitor"])
    ranker = Ranker.load(report["models"][best]["runs"][0]["checkpoint"])
    warm_user = int(data.user_ids[int(data.topk_eval("test_warm").users[0])])
    cold_user = int(data.user_ids[int(data.topk_eval("test_cold").users[0])])
    recs = ranker.recommend([warm_user, cold_user], k=10)
    report["recommendations"] = {"model": best, "users": []}
    for user, how, ids, titles in zip(recs.user_ids, recs.served_by, recs.item_ids, recs.titles):
        side = data.user_side(user)
        print_fn("")
        print_fn(f"top-10 for user {user} ({'warm' if how == 'model' else 'cold, served from side features'}; "
                 f"{side}) by {NAMES.get(best, best)}:")
        for rank, title in enumerate(titles, start=1):
            print_fn(f"  {rank:2d}. {title}")
        report["recommendations"]["users"].append(
            {"user_id": user, "served_by": how, "side": {k: str(v) for k, v in side.items()},
             "item_ids": ids.tolist(), "titles": titles})

    report["seconds_total"] = time.perf_counter() - started
    report_path = os.path.join(out, "report.json")
    png_path = os.path.join(out, "learning_curves.png")
    atomic_write(report_path, lambda f: f.write(strict_json(report).encode()))  # an undefined metric: null
    plot_learning_curves(curves, png_path)
    print_fn("")
    print_fn(f"report: {os.path.abspath(report_path)}")
    print_fn(f"learning curves: {os.path.abspath(png_path)}")
    print_fn(f"checkpoints: {os.path.abspath(out)}/<model>-seed<s>.pt (try: mtkernels recommend "
             f"--checkpoint {os.path.join(out, best + '-seed0.pt')} --user {warm_user})")
    print_fn(f"demo finished in {report['seconds_total']:.0f} s")
    return report
