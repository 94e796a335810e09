"""Seconds per training epoch on ml100k-mtl-v1 (issue 3: < 2.5 s over the 357,525 training rows).

    python -m benchmarks.train_speed [--models mmoe ple] [--threads 1 2] [--epochs 3] [--repeats 2]
        [--batch-size 2048] [--baseline /path/to/another/checkout | --history-length L [--history-table item_id]
         | --interaction-dim D]

For each model and thread count, trains with the presets through `mtkernels.training.fit` and
reports what ``FitResult.seconds_per_epoch`` measures: the training pass only (shuffled batches
gathered from the pre-encoded split, forward, masked losses, backward with the fused embedding
update, Adam step, the weight-average update where the preset has one), never the validation
scoring that follows each epoch. Each measurement runs in
a fresh process; the first epoch is dropped as warm-up and the median of the other epochs (over
all repeats) is printed, as wall seconds and as CPU seconds of the process (``time.process_time``:
all threads together, so at 2 threads it is up to twice the wall time; on a machine that others
share it is the steadier of the two).

``--baseline DIR`` times the code of another checkout (``PYTHONPATH=DIR``, e.g. the main branch
before a change) in the same run, interleaved with this one (ours, baseline, ours, baseline, ...),
so that both see the same load; the last column is baseline / ours. ``--history-length L`` times
this code with the causal user-history bag (``load_ml100k_mtl_v1(history_length=L)``) against the
same code without it, interleaved the same way (the "baseline" columns are then "without");
``--interaction-dim D`` does the same for the biased-MF interaction term on the like and rating tasks
(``MultiTaskModel(interaction_tasks=("like", "rating"), interaction_dim=D)``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _worker(backbone: str, threads: int, epochs: int, batch_size: int, data_dir, history_length=None,
            history_table: str = "own", interaction_dim=None) -> dict:
    """Train in this process and return the per-epoch wall and CPU seconds of fit's training pass."""
    import time

    import torch

    torch.set_num_threads(threads)
    import mtkernels
    from mtkernels.data import load_ml100k_mtl_v1
    from mtkernels.training import TrainConfig, fit, presets

    # older checkouts (a --baseline) have no history_length option: pass it only when set
    data = load_ml100k_mtl_v1(data_dir, **({} if history_length is None else {"history_length": history_length}))
    torch.manual_seed(0)
    if history_length is not None and history_table == "item_id":
        from mtkernels.nn import MultiTaskModel

        model = MultiTaskModel(data.features, data.dense_dim, data.tasks,
                               **dict(presets.model_kwargs(backbone), shared_tables={"history": "item_id"}))
    elif interaction_dim is not None:
        from mtkernels.nn import MultiTaskModel

        model = MultiTaskModel(data.features, data.dense_dim, data.tasks, **dict(
            presets.model_kwargs(backbone), interaction_tasks=["like", "rating"], interaction_dim=interaction_dim))
    else:
        model = presets.build_model(data, backbone)
    # what the presets run (with their weight averaging); older checkouts have only TRAIN_PRESET
    values = presets.train_values(backbone) if hasattr(presets, "train_values") else dict(presets.TRAIN_PRESET)
    config = TrainConfig(**dict(values, epochs=epochs, batch_size=batch_size, patience=0, progress=False))
    # fit reads time.perf_counter() exactly twice per epoch (start and end of the training pass)
    marks = []
    wall = time.perf_counter

    def clock():
        marks.append((wall(), time.process_time()))
        return marks[-1][0]

    time.perf_counter = clock
    try:
        fit(model, data, config)
    finally:
        time.perf_counter = wall
    if len(marks) != 2 * epochs:
        raise RuntimeError(f"expected {2 * epochs} clock reads from fit, got {len(marks)}")
    return {
        "code": os.path.dirname(os.path.dirname(os.path.abspath(mtkernels.__file__))),
        "wall": [end[0] - start[0] for start, end in zip(marks[0::2], marks[1::2])],
        "cpu": [end[1] - start[1] for start, end in zip(marks[0::2], marks[1::2])],
    }


def _measure(variant, backbone: str, threads: int, args) -> dict:
    code, history_length, interaction_dim = variant
    env = dict(os.environ, PYTHONPATH=code, OMP_NUM_THREADS=str(threads))
    command = [sys.executable, os.path.abspath(__file__), "--worker", backbone, str(threads), str(args.epochs),
               str(args.batch_size)] + (["--data-dir", args.data_dir] if args.data_dir else [])
    if history_length is not None:
        command += ["--history-length", str(history_length), "--history-table", args.history_table]
    if interaction_dim is not None:
        command += ["--interaction-dim", str(interaction_dim)]
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    if os.path.realpath(result["code"]) != os.path.realpath(code):
        raise RuntimeError(f"measured {result['code']}, expected the code in {code}")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mmoe", "ple"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--epochs", type=int, default=3, help="epochs per process (the first is warm-up)")
    parser.add_argument("--repeats", type=int, default=1, help="processes per code, model and thread count")
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--baseline", default=None, help="another checkout to time in the same run")
    parser.add_argument("--history-length", type=int, default=None, metavar="L",
                        help="time this code with the history bag of L items against it without")
    parser.add_argument("--history-table", choices=["own", "item_id"], default="own")
    parser.add_argument("--interaction-dim", type=int, default=None, metavar="D",
                        help="time this code with the interaction term of D factors against it without")
    parser.add_argument("--worker", nargs=4, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        backbone, threads, epochs, batch_size = args.worker
        print(json.dumps(_worker(backbone, int(threads), int(epochs), int(batch_size), args.data_dir,
                                 args.history_length, args.history_table, args.interaction_dim)))
        return 0
    if args.epochs < 2:
        parser.error("--epochs must be >= 2 (the first epoch is warm-up)")
    if sum(x is not None for x in (args.history_length, args.baseline, args.interaction_dim)) > 1:
        parser.error("--history-length, --interaction-dim and --baseline each set the comparison: give one")
    if args.history_length is not None:
        codes = [(HERE, args.history_length, None), (HERE, None, None)]
        print(f"with the history bag (L {args.history_length}, {args.history_table} table) against without")
    elif args.interaction_dim is not None:
        codes = [(HERE, None, args.interaction_dim), (HERE, None, None)]
        print(f"with the interaction term (d {args.interaction_dim}, like and rating) against without")
    else:
        codes = [(HERE, None, None)] + ([(os.path.abspath(args.baseline), None, None)] if args.baseline else [])
    print(f"training pass over ml100k-mtl-v1 train, batch {args.batch_size}, median of epochs 2..{args.epochs} "
          f"over {args.repeats} process(es) each; load average at start {os.getloadavg()[0]:.1f}")
    head = "| model | threads | wall s/epoch | CPU s/epoch |"
    if len(codes) > 1:
        head += " baseline wall | baseline CPU | speed-up (wall, CPU) |"
    print(head)
    print("|---|---:|" + "---:|" * (head.count("|") - 3))
    for backbone in args.models:
        for threads in args.threads:
            runs = {code: {"wall": [], "cpu": []} for code in codes}
            for _ in range(args.repeats):
                for code in codes:
                    result = _measure(code, backbone, threads, args)
                    for key in ("wall", "cpu"):
                        runs[code][key] += result[key][1:]
            medians = {code: {k: statistics.median(v) for k, v in r.items()} for code, r in runs.items()}
            ours = medians[codes[0]]
            row = f"| {backbone} | {threads} | {ours['wall']:.2f} | {ours['cpu']:.2f} |"
            if len(codes) > 1:
                base = medians[codes[1]]
                row += (f" {base['wall']:.2f} | {base['cpu']:.2f} | {base['wall'] / ours['wall']:.2f}x, "
                        f"{base['cpu'] / ours['cpu']:.2f}x |")
            print(row, flush=True)
    print(f"load average at end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
