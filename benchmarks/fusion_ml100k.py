"""Multi-model fusion on ml100k-mtl-v1 (issue 8 "Must reach"): quality over seeds and serving time.

    python -m benchmarks.fusion_ml100k [--seeds 3] [--models shared_bottom mmoe ple] [--cf ease sr]
        [--full-val-history] [--checkpoints .cache/fusion-bench] [--train-threads 2] [--timing-runs 5]
        [--out benchmarks/results/fusion-cpu.md]

Per seed: trains each model with the presets of `mtkernels.training.presets` (or loads
``<checkpoints>/<model>-seed<s>.pt`` when it exists), fits the collaborative-filtering members on
train (EASE lambda 100; SequentialRules window 200, half-life 3), learns the fusion weights on val
(NDCG@10, coordinate search, that seed; gap-matched: the collaborative-filtering members score val
users without their last |val(u)| training items, see `ScoreFusion.fit_weights`, unless
``--full-val-history``), and evaluates every member alone (ranking by its click score) and the
fusion on test_warm and test_cold.
Prints the Markdown table (mean ± sample std over seeds) and the learned weights.

Timing: `Ranker.recommend` of all 849 warm users (external ids, k=10, seen items excluded) over
all 1,682 items with the seed-0 fusion of every member, end to end (every member's scoring, the
per-user transforms, one `ensemble_topk` per block of users, ids and titles); median of
``--timing-runs`` runs after one warm-up, at 1 and 2 threads; plus the same users scored by each
model's plain forward over every (user, item) pair (what `Ranker` does for one model), timed on
64 users and scaled to 849, as the reference the factorised scoring replaces.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import time
from typing import Dict, List

import numpy as np
import torch

from mtkernels.catalogue import user_table
from mtkernels.data import load_ml100k_mtl_v1
from mtkernels.demo import NAMES
from mtkernels.fusion import CFMember, ScoreFusion, model_member_from_checkpoint
from mtkernels.serving import Ranker, serving_tables
from mtkernels.training import TrainConfig, fit, presets
from mtkernels.training.checkpoint import atomic_write

SPLITS = ("test_warm", "test_cold")
CF_NAMES = {"ease": "EASE", "itemknn": "ItemKNN", "sr": "SequentialRules"}
METRICS = ("ndcg@10", "recall@10")


def _checkpoint(data, tables, backbone: str, seed: int, folder: str, threads: int, log) -> str:
    path = os.path.join(folder, f"{backbone}-seed{seed}.pt")
    if os.path.exists(path):
        log(f"loaded {path}")
        return path
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = presets.build_model(data, backbone)
    started = time.perf_counter()
    partial = path + ".partial"  # renamed when training ends, so an interrupted run is never loaded
    fit(model, data, TrainConfig(**dict(presets.TRAIN_PRESET, seed=seed, progress=False)), checkpoint_path=partial,
        checkpoint_extra={"data": {"name": "ml100k"}, "serving": tables}, log=lambda line: None)
    os.replace(partial, path)
    log(f"trained {backbone} seed {seed} in {time.perf_counter() - started:.0f} s -> {path}")
    return path


def _metrics(system: ScoreFusion, data) -> Dict[str, float]:
    return {f"{split}_{m}": v for split in SPLITS for m, v in system.topk_metrics(data, split).items()}


def _mean_std(values: List[float]) -> str:
    if any(math.isnan(v) for v in values):
        return "-"
    mean = float(np.mean(values))
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return f"{mean:.4f} ± {std:.4f}"


def _median_seconds(call, runs: int, cpu: bool = False):
    """Median wall seconds of ``runs`` calls after a warm-up (and median CPU seconds of this
    process, which a machine shared with other jobs inflates far less than wall time)."""
    call()  # warm-up: caches (item side of the first layer, the kNN/EASE matrix) and allocator
    times, cpu_times = [], []
    for _ in range(runs):
        started, cpu_started = time.perf_counter(), time.process_time()
        call()
        times.append(time.perf_counter() - started)
        cpu_times.append(time.process_time() - cpu_started)
    if cpu:
        return statistics.median(times), statistics.median(cpu_times)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["shared_bottom", "mmoe", "ple"])
    parser.add_argument("--cf", nargs="+", default=["ease", "sr"], choices=["ease", "itemknn", "sr"],
                        help="collaborative-filtering members")
    parser.add_argument("--full-val-history", action="store_true",
                        help="fit the weights with the whole training history on val (not gap-matched)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--checkpoints", default=".cache/fusion-bench", help="folder of the members' checkpoints")
    parser.add_argument("--train-threads", type=int, default=2)
    parser.add_argument("--fit-threads", type=int, default=1, help="threads while fitting and evaluating")
    parser.add_argument("--timing-runs", type=int, default=5)
    parser.add_argument("--timing-threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default="benchmarks/results/fusion-cpu.md")
    args = parser.parse_args(argv)

    lines: List[str] = []

    def log(line: str) -> None:
        print(line, flush=True)

    os.makedirs(args.checkpoints, exist_ok=True)
    data = load_ml100k_mtl_v1(args.data_dir)
    tables = serving_tables(data)
    cf_names = [CF_NAMES[c] for c in args.cf]
    gap_matched = not args.full_val_history
    rows: Dict[str, Dict[str, List[float]]] = {}
    weights: Dict[str, List[float]] = {}
    val: List[float] = []
    fusions = []
    cfs = None
    for seed in range(args.seeds):
        members = []
        for backbone in args.models:
            path = _checkpoint(data, tables, backbone, seed, args.checkpoints, args.train_threads, log)
            members.append(model_member_from_checkpoint(path, NAMES.get(backbone, backbone))[0])
        torch.set_num_threads(args.fit_threads)
        if cfs is None:  # deterministic: the same members for every seed
            cfs = [CFMember.fit(data, c, name=n) for c, n in zip(args.cf, cf_names)]
        started = time.perf_counter()
        fusion = ScoreFusion(members + cfs, ["click"], tables=tables)
        report = fusion.fit_weights(data, objective="ndcg@10", seed=seed, gap_matched=gap_matched)
        log(f"seed {seed}: weights {({k: round(v, 3) for k, v in report['weights'].items()})}, val NDCG@10 "
            f"{report['val_equal_weights']:.4f} (equal weights) -> {report['val_fitted']:.4f} "
            f"({time.perf_counter() - started:.0f} s)")
        val.append(report["val_fitted"])
        for name, w in report["weights"].items():
            weights.setdefault(name.split("/")[0], []).append(w)
        systems = [(m.name, ScoreFusion([m], ["click"], weights=[1.0], transforms="identity", tables=tables))
                   for m in members + cfs]
        for name, system in systems + [("fusion", fusion)]:
            for key, value in _metrics(system, data).items():
                if name in cf_names and key.startswith("test_cold"):
                    value = math.nan  # no training history for cold users: every score is 0
                rows.setdefault(name, {}).setdefault(key, []).append(value)
        log(f"seed {seed}: " + ", ".join(f"{name} {rows[name]['test_warm_ndcg@10'][-1]:.4f}" for name in rows))
        fusions.append(fusion)

    best = max((n for n in rows if n != "fusion"), key=lambda n: np.mean(rows[n]["test_warm_ndcg@10"]))
    fused, best_value = np.mean(rows["fusion"]["test_warm_ndcg@10"]), np.mean(rows[best]["test_warm_ndcg@10"])
    load = os.getloadavg()
    lines.append(f"torch {torch.__version__}, {os.cpu_count()} cores; load average at the end of the quality runs: "
                 f"{load[0]:.1f}, {load[1]:.1f}, {load[2]:.1f}")
    lines.append("")
    val_kind = "gap-matched val" if gap_matched else "val (whole training history)"
    lines.append(f"### ml100k-mtl-v1: members and their fusion (mean ± std over {args.seeds} seeds; models by click "
                 f"probability; {', '.join(cf_names)} fitted on train; fusion weights by coordinate search on "
                 f"{val_kind} NDCG@10)")
    lines.append("")
    lines.append("| system | weight | test_warm NDCG@10 | test_warm Recall@10 | test_cold NDCG@10 | test_cold Recall@10 |")
    lines.append("|---|---:|---:|---:|---:|---:|")
    for name, values in rows.items():
        weight = _mean_std(weights[name]) if name in weights else "-"
        label = f"**{name}**" if name == "fusion" else name
        lines.append(f"| {label} | {weight} | " + " | ".join(_mean_std(values[f"{s}_{m}"]) for s in SPLITS for m in METRICS) + " |")
    lines.append("")
    lines.append(f"{', '.join(cf_names)}: no training history for the cold users (every score 0): '-'; the fusion "
                 f"ranks them by the models alone.")
    lines.append(f"Fusion / best member ({best}) on test_warm NDCG@10: **{fused / best_value:.3f}x** "
                 f"({fused:.4f} vs {best_value:.4f}); val NDCG@10 of the fitted fusion {_mean_std(val)}.")
    print("\n".join(lines), flush=True)

    # --- serving time ---------------------------------------------------------------------------
    evaluation = data.topk_eval("test_warm")
    warm_ids = [int(data.user_ids[r]) for r in evaluation.users.tolist()]
    ranker = Ranker.from_fusion(fusions[0])
    timing = ["", f"### Fused recommendation: {len(warm_ids)} warm users x {data.num_items} items, "
              f"{len(fusions[0].members)} members, k=10, seen items excluded (`Ranker.recommend`, end to end; "
              f"median of {args.timing_runs} runs)", "",
              "| threads | fused recommend s (wall) | fused recommend CPU s | members' scoring s (factorised, wall) | plain per-pair forward of the 3 models s (64 users, x849/64, wall) | load average |",
              "|---:|---:|---:|---:|---:|---|"]
    users = user_table(tables)
    sample = evaluation.users[:64]
    for threads in args.timing_threads:
        torch.set_num_threads(threads)
        total, total_cpu = _median_seconds(lambda: ranker.recommend(warm_ids, k=10), args.timing_runs, cpu=True)
        scoring = sum(_median_seconds(lambda m=m: m.score(users, evaluation.users, ["click"]), 3)
                      for m in fusions[0].members)
        plain = 0.0
        for member in fusions[0].members:
            if member.kind == "model":
                reference = Ranker(member.model, member.model.tasks, tables, users_per_block=16)
                plain += _median_seconds(lambda r=reference: r.score(users, sample), 1) * len(warm_ids) / sample.numel()
        load = os.getloadavg()
        timing.append(f"| {threads} | **{total:.2f}** | {total_cpu:.2f} | {scoring:.2f} | {plain:.1f} | {load[0]:.1f} |")
    print("\n".join(timing), flush=True)
    lines += timing
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next((l.split(":", 1)[1].strip() for l in lscpu.splitlines() if l.startswith("Model name")), "")
    except OSError:
        model = ""
    lines.append("")
    lines.append(f"CPU: {model}. Command: `python -m benchmarks.fusion_ml100k --seeds {args.seeds} --cf {' '.join(args.cf)}"
                 f"{' --full-val-history' if args.full_val_history else ''}`.")
    text = "\n".join(lines) + "\n"
    atomic_write(args.out, lambda f: f.write(text.encode()))
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
