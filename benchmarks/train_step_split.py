"""Where a training epoch's time goes, by phase (issue 3: what is left of the 2.5 s per epoch).

    python -m benchmarks.train_step_split [--models mmoe ple] [--threads 1] [--batch-size 2048]
        [--epochs 2] [--steps 0]

Runs the training step of `mtkernels.training.fit` (presets, fused row-wise Adagrad for the tables,
fused Adam over one contiguous buffer for the rest) phase by phase and prints, per epoch, the
seconds of: batch building (``data.batches``), the embedding lookup, the rest of the forward
(experts, gates, towers, output transform), the masked losses, the backward (with the tables'
fused update and the gradients' copy into Adam's buffer) and the Adam step. Every phase is timed
with ``time.process_time`` at 1 thread (the CPU seconds of this process: steadier than wall time
on a shared machine) and with ``time.perf_counter`` otherwise; the first epoch is warm-up.

``PYTHONPATH=<another checkout> python benchmarks/train_step_split.py ...`` times another
checkout's code (e.g. main before a change). ``--batch-size 16 --steps 300`` measures the per-step cost that does not grow with the batch
(Python, autograd bookkeeping, op dispatch), in milliseconds per step: the serial part that a
second thread cannot shorten.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

PHASES = ("batch", "embedding", "forward", "loss", "backward", "optimizer")


def split(backbone: str, threads: int, batch_size: int, epochs: int, steps: int, data_dir=None):
    """Per-phase seconds of each epoch (``steps > 0``: of each of the first ``steps`` steps)."""
    import torch

    torch.set_num_threads(threads)
    from mtkernels.data import load_ml100k_mtl_v1
    from mtkernels.nn.towers import tower_outputs
    from mtkernels.training import loop, presets
    from mtkernels.training.losses import masked_task_losses
    from mtkernels.training.weighting import make_weighting

    data = load_ml100k_mtl_v1(data_dir)
    torch.manual_seed(0)
    model = presets.build_model(data, backbone)
    model.train()
    weighting = make_weighting("fixed", data.tasks, None, 1.5)
    groups = loop._dense_optimizer_groups(model, weighting, presets.TRAIN_PRESET["weight_decay"], presets.TRAIN_PRESET["lr"])
    # getattr: PYTHONPATH=<an older checkout> times code from before the flat Adam buffers
    flat_groups = getattr(loop, "_flat_groups", None)
    flat = flat_groups(model, data, weighting, groups) if flat_groups else None
    optimizer = torch.optim.Adam(flat.groups if flat else groups, lr=presets.TRAIN_PRESET["lr"], fused=True)
    clock = time.process_time if threads == 1 else time.perf_counter
    binary = torch.tensor([t.kind == "binary" for t in data.tasks])
    results = []
    for epoch in range(epochs):
        seconds = {p: [] for p in PHASES}
        batches = iter(data.batches("train", batch_size, shuffle=True, seed=epoch))
        while not steps or len(seconds["batch"]) < steps:
            t0 = clock()
            batch = next(batches, None)
            if batch is None:
                break
            t1 = clock()
            x = model._inputs(batch.sparse, batch.dense)
            t2 = clock()
            values = tower_outputs(model.towers, model.backbone.stacked(x))
            predictions = model.backbone.outputs(torch.where(binary, torch.sigmoid(values), values))
            t3 = clock()
            objective = weighting.combine(masked_task_losses(predictions, model.targets(batch.labels), data.tasks))
            t4 = clock()
            if flat:
                flat.zero_grad()
            else:
                optimizer.zero_grad(set_to_none=True)
            objective.backward()
            if flat:
                flat.gather_grads()
            t5 = clock()
            optimizer.step()
            float(objective.detach())
            t6 = clock()
            for phase, start, end in zip(PHASES, (t0, t1, t2, t3, t4, t5), (t1, t2, t3, t4, t5, t6)):
                seconds[phase].append(end - start)
        results.append(seconds)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mmoe", "ple"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=2, help="epochs (the first is warm-up)")
    parser.add_argument("--steps", type=int, default=0, help="steps per epoch (0: the whole epoch)")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be >= 2 (the first is warm-up)")
    unit, scale = ("ms/step (median)", 1e3) if args.steps else ("s/epoch", 1.0)
    print(f"{args.threads} thread(s), batch {args.batch_size}, {'CPU' if args.threads == 1 else 'wall'} {unit}, "
          f"load average at start {os.getloadavg()[0]:.1f}")
    print("| model | " + " | ".join(PHASES) + " | total |")
    print("|---|" + "---:|" * (len(PHASES) + 1))
    for backbone in args.models:
        epochs = split(backbone, args.threads, args.batch_size, args.epochs, args.steps, args.data_dir)[1:]
        if args.steps:
            values = [statistics.median(x for e in epochs for x in e[p]) for p in PHASES]
        else:
            values = [statistics.median(sum(e[p]) for e in epochs) for p in PHASES]
        print(f"| {backbone} | " + " | ".join(f"{scale * v:.3f}" for v in values) + f" | {scale * sum(values):.3f} |",
              flush=True)
    print(f"load average at end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
