"""Seconds per training epoch on ml100k-mtl-v1 (issue 3: < 2.5 s over the 357,525 training rows).

    python -m benchmarks.train_speed [--models mmoe ple] [--threads 1 2] [--epochs 3] [--batch-size 2048]
        [--cpu-time]

For each model and thread count, trains with the presets through `mtkernels.training.fit` and
reports what ``FitResult.seconds_per_epoch`` measures: the training pass only (shuffled batches
gathered from the pre-encoded split, forward, masked losses, backward with the fused embedding
update, Adam step), never the validation scoring that follows each epoch. The first epoch is dropped
as warm-up; the median of the rest is printed. Beside it, in the same run, the same training with
the two pieces this project replaced put back (``F.dropout``, whose ``bernoulli_`` mask drew ~20% of
a step, and torch's per-parameter Adam instead of the fused one), and the ratio of the two.
On a machine that others share, ``--cpu-time`` times the same training pass in CPU seconds of this
process (``time.process_time``) instead of wall seconds, which other jobs inflate unevenly.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F

import mtkernels.nn.backbones as backbones
import mtkernels.nn.towers as towers
import mtkernels.training.loop as loop
from mtkernels.data import load_ml100k_mtl_v1
from mtkernels.training import TrainConfig, fit, presets


@contextlib.contextmanager
def _torch_dropout_and_adam():
    """The baseline: torch's ``F.dropout`` and per-parameter Adam in place of the project's."""
    saved = towers.dropout, backbones._dropout, loop._fused_adam_supported
    towers.dropout = backbones._dropout = F.dropout
    loop._fused_adam_supported = lambda groups: False
    try:
        yield
    finally:
        towers.dropout, backbones._dropout, loop._fused_adam_supported = saved


def seconds_per_epoch(data, backbone: str, epochs: int, batch_size: int) -> float:
    torch.manual_seed(0)
    model = presets.build_model(data, backbone)
    config = TrainConfig(**dict(presets.TRAIN_PRESET, epochs=epochs, batch_size=batch_size, patience=0,
                                progress=False))
    result = fit(model, data, config)
    seconds = [h["seconds"] for h in result.history][1:] or [result.history[0]["seconds"]]
    return statistics.median(seconds)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mmoe", "ple"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--epochs", type=int, default=3, help="epochs per measurement (the first is warm-up)")
    parser.add_argument("--batch-size", type=int, default=presets.TRAIN_PRESET["batch_size"])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--cpu-time", action="store_true", help="CPU seconds of the process instead of wall seconds")
    args = parser.parse_args(argv)
    if args.cpu_time:
        # fit times its training pass with time.perf_counter; this process is all benchmark
        time.perf_counter = time.process_time
    data = load_ml100k_mtl_v1(args.data_dir)
    rows = data.splits["train"].num_rows
    unit = "CPU seconds" if args.cpu_time else "wall seconds"
    print(f"training pass over {rows:,} rows, batch {args.batch_size}, {unit}, median of epochs 2..{args.epochs}")
    print("| model | threads | s/epoch | with F.dropout + per-parameter Adam | speed-up |")
    print("|---|---:|---:|---:|---:|")
    for backbone in args.models:
        for threads in args.threads:
            torch.set_num_threads(threads)
            ours = seconds_per_epoch(data, backbone, args.epochs, args.batch_size)
            with _torch_dropout_and_adam():
                base = seconds_per_epoch(data, backbone, args.epochs, args.batch_size)
            print(f"| {backbone} | {threads} | {ours:.2f} | {base:.2f} | {base / ours:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
