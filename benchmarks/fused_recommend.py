"""Fused recommendation end to end: the native `catalogue_score` op against the PyTorch path.

    python -m benchmarks.fused_recommend [--checkpoints .cache/fusion-bench] [--runs 5] [--threads 1 2]
        [--untrained] [--sequential-rules]

Loads (or trains, as `benchmarks.fusion_ml100k` does) the seed-0 SharedBottom, MMoE and PLE of
ml100k-mtl-v1, fits EASE on train, saves their fusion with fixed weights 0.1 / 0.2 / 0.5 / 0.2 (every
member weighted, so every member is scored) and serves it with `Ranker.load`: `recommend` of all 849
warm users (external ids, k=10, seen items excluded) over all 1,682 items. Per thread count, the two
paths of `mtkernels.catalogue.CatalogueScorer` alternate run by run (native op, then the blocked
PyTorch path it replaced), so both see the same machine load; prints the median wall and CPU seconds
of each and the share of users whose top-10 lists are identical under both paths. ``--untrained``
times freshly initialised models of the same presets instead (the same shapes, so the same work;
no training needed, the lists differ from a trained fusion's). ``--sequential-rules`` adds a fifth
member, `SequentialRules` (fitted on train), with weights 0.1 / 0.2 / 0.4 / 0.1 / 0.2.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from benchmarks.fusion_ml100k import _checkpoint
from mtkernels.data import load_ml100k_mtl_v1
from mtkernels.demo import NAMES
from mtkernels.fusion import CFMember, ModelMember, ScoreFusion, model_member_from_checkpoint
from mtkernels.serving import Ranker, serving_tables
from mtkernels.training import presets

MEMBERS = ("shared_bottom", "mmoe", "ple")
WEIGHTS = (0.1, 0.2, 0.5, 0.2)  # SharedBottom, MMoE, PLE, EASE
WEIGHTS_FIVE = (0.1, 0.2, 0.4, 0.1, 0.2)  # ... and SequentialRules


def _set_native(ranker: Ranker, native) -> None:
    for member in ranker.fusion.members:
        if member.kind == "model":
            member.scorer.native = native


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", default=".cache/fusion-bench")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--untrained", action="store_true",
                        help="time freshly initialised models of the same presets (same shapes and work, no training)")
    parser.add_argument("--sequential-rules", action="store_true", help="add SequentialRules as a fifth member")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)

    data = load_ml100k_mtl_v1(args.data_dir)
    tables = serving_tables(data)
    os.makedirs(args.checkpoints, exist_ok=True)
    if args.untrained:
        torch.manual_seed(0)
        members = [ModelMember(NAMES.get(b, b), presets.build_model(data, b), tables) for b in MEMBERS]
    else:
        members = [model_member_from_checkpoint(_checkpoint(data, tables, b, 0, args.checkpoints, 2, print),
                                                NAMES.get(b, b))[0] for b in MEMBERS]
    members.append(CFMember.fit(data, "ease", name="EASE"))
    weights = WEIGHTS
    if args.sequential_rules:
        members.append(CFMember.fit(data, "sr", name="SequentialRules"))
        weights = WEIGHTS_FIVE
    fused_path = os.path.join(args.checkpoints, ("fused-untrained" if args.untrained else "fused-all-weighted")
                              + ("-sr" if args.sequential_rules else "") + ".pt")
    ScoreFusion(members, ["click"], weights=list(weights), tables=tables).save(fused_path)
    ranker = Ranker.load(fused_path)
    evaluation = data.topk_eval("test_warm")
    warm_ids = [int(data.user_ids[r]) for r in evaluation.users.tolist()]

    print(f"fused recommendation: {len(warm_ids)} warm users x {data.num_items} items, "
          f"{len(members)} members all weighted {weights}, k=10; median of {args.runs} runs; "
          f"load average at start {os.getloadavg()[0]:.1f}")
    print("| threads | native op s (wall) | PyTorch path s (wall) | wall ratio | native op CPU s | PyTorch path CPU s | CPU ratio | load average | same top-10 |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        times = {True: [], False: []}
        cpu = {True: [], False: []}
        results = {}
        for native in (None, False):  # warm-up: item parts, EASE matrix, allocator
            _set_native(ranker, native)
            results[native is None] = ranker.recommend(warm_ids, k=10)
        # float32 rounding differs between the paths: near-ties may swap, so count the users whose lists agree
        same = (results[True].item_ids == results[False].item_ids).all(dim=1).float().mean().item()
        for _ in range(args.runs):
            for native in (None, False):
                _set_native(ranker, native)
                started, cpu_started = time.perf_counter(), time.process_time()
                ranker.recommend(warm_ids, k=10)
                times[native is None].append(time.perf_counter() - started)
                cpu[native is None].append(time.process_time() - cpu_started)
        wall = {k: statistics.median(v) for k, v in times.items()}
        cpu_s = {k: statistics.median(v) for k, v in cpu.items()}
        print(f"| {threads} | **{wall[True]:.2f}** | {wall[False]:.2f} | {wall[False] / wall[True]:.2f}x | "
              f"{cpu_s[True]:.2f} | {cpu_s[False]:.2f} | {cpu_s[False] / cpu_s[True]:.2f}x | "
              f"{os.getloadavg()[0]:.1f} | {100 * same:.1f}% |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
