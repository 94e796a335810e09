"""`embedding_bags` against its baselines (issue 2, item 6): one Markdown table.

Setup (DLRM-like): 26 tables x 100,000 rows, dim 16/64/128 (all tables one dim per run), batch 2048,
one feature per table, sum pooling, pooling factor 1 or variable 0..40 (uniform, mean 20, some bags
empty). Phases:
  - forward (no grad): mtkernels; a loop of 26 ``nn.EmbeddingBag`` + ``torch.cat``; one
    ``nn.EmbeddingBag`` over the concatenated table (indices shifted beforehand, output permuted
    to ``[B, 26*D]``); FBGEMM's CPU TBE (``fbgemm-gpu-cpu``, when installed).
  - training step (forward + backward + update, a fixed upstream gradient): mtkernels with the
    fused row-wise Adagrad and the fused SGD; ``nn.EmbeddingBag(sparse=True)`` loop forward+backward
    alone, + ``torch.optim.SGD``, + ``torch.optim.Adagrad``; FBGEMM's TBE with
    EXACT_ROWWISE_ADAGRAD (the update fused into its backward).
Every implementation of one configuration is timed in the same process, interleaved round by
round (so machine noise hits all alike); the table reports medians. GB/s is the bytes of the rows
the forward gathers (``len(indices) * D * 4``) divided by the time. "x mtkernels" is the baseline's
time over mtkernels' time (> 1: mtkernels is faster).

All tables of one dim share one storage (the concatenated table, viewed per table), so the memory
peak at dim 128 is about 4 GB (the tables, FBGEMM's own copy, torch Adagrad's dense state).
"""

from __future__ import annotations

import gc
import statistics
import time
from typing import Callable, Dict, List

import torch

from mtkernels.ops import FusedEmbeddingOptimizer, embedding_bags

NUM_TABLES = 26
NUM_ROWS = 100_000
BATCH = 2048
LR = 0.01

try:  # optional: only for this benchmark (pip install --no-deps fbgemm-gpu-cpu==1.8.0)
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        SplitTableBatchedEmbeddingBagsCodegen,
    )

    HAVE_FBGEMM = True
except Exception:  # noqa: BLE001  (missing, or built against another torch)
    HAVE_FBGEMM = False


def make_batch(pooling: str, generator: torch.Generator):
    """Feature-major jagged batch: (indices int64 [L], offsets int64 [26*B+1])."""
    if pooling == "1":
        lengths = torch.ones(NUM_TABLES * BATCH, dtype=torch.long)
    else:
        lengths = torch.randint(0, 41, (NUM_TABLES * BATCH,), generator=generator)
    indices = torch.randint(0, NUM_ROWS, (int(lengths.sum()),), generator=generator)
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.long)
    torch.cumsum(lengths, 0, out=offsets[1:])
    return indices, offsets


def time_interleaved(fns: Dict[str, Callable[[], None]], repeats: int, warmup: int = 1) -> Dict[str, float]:
    """Median milliseconds of each fn, running all fns once per round."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(s) for name, s in samples.items()}


def _fbgemm(dim: int, optimizer) -> "SplitTableBatchedEmbeddingBagsCodegen":
    return SplitTableBatchedEmbeddingBagsCodegen(
        [(NUM_ROWS, dim, EmbeddingLocation.HOST, ComputeDevice.CPU)] * NUM_TABLES,
        optimizer=optimizer,
        learning_rate=LR,
        eps=1e-8,
        pooling_mode=PoolingMode.SUM,
    )


def bench_config(dim: int, pooling: str, threads: List[int], quick: bool) -> List[dict]:
    """All phases and implementations for one (dim, pooling); one row dict per measurement."""
    gen = torch.Generator().manual_seed(dim * 100 + len(pooling))
    indices, offsets = make_batch(pooling, gen)
    gathered_bytes = indices.numel() * dim * 4
    concatenated = torch.randn(NUM_TABLES * NUM_ROWS, dim, generator=gen) * 0.01
    tables = list(concatenated.view(NUM_TABLES, NUM_ROWS, dim).unbind(0))
    grad_output = torch.randn(BATCH, NUM_TABLES * dim, generator=gen)

    # per-feature slices for the nn.EmbeddingBag loop; shifted ids for the concatenated table
    starts = [int(offsets[f * BATCH]) for f in range(NUM_TABLES + 1)]
    feature_indices = [indices[starts[f] : starts[f + 1]] for f in range(NUM_TABLES)]
    feature_offsets = [offsets[f * BATCH : (f + 1) * BATCH] - starts[f] for f in range(NUM_TABLES)]
    shifted = indices + torch.repeat_interleave(
        torch.arange(NUM_TABLES) * NUM_ROWS, offsets[BATCH :: BATCH] - offsets[: -1 : BATCH]
    )
    loop = [torch.nn.EmbeddingBag.from_pretrained(t, freeze=True, mode="sum") for t in tables]
    whole = torch.nn.EmbeddingBag.from_pretrained(concatenated, freeze=True, mode="sum")
    sparse_loop = [torch.nn.EmbeddingBag.from_pretrained(t, freeze=False, mode="sum", sparse=True) for t in tables]
    sparse_params = [m.weight for m in sparse_loop]
    torch_sgd = torch.optim.SGD(sparse_params, lr=LR)
    torch_adagrad = torch.optim.Adagrad(sparse_params, lr=LR, eps=1e-8)
    fused_adagrad = FusedEmbeddingOptimizer(tables, kind="rowwise_adagrad", lr=LR)
    fused_sgd = FusedEmbeddingOptimizer(tables, kind="sgd", lr=LR)
    fb = _fbgemm(dim, EmbOptimType.EXACT_ROWWISE_ADAGRAD) if HAVE_FBGEMM else None

    def forward_fns():
        fns = {
            "mtkernels": lambda: embedding_bags(tables, indices, offsets),
            "nn.EmbeddingBag loop": lambda: torch.cat(
                [m(i, o) for m, i, o in zip(loop, feature_indices, feature_offsets)], dim=1
            ),
            "nn.EmbeddingBag concatenated": lambda: whole(shifted, offsets[:-1])
            .view(NUM_TABLES, BATCH, dim)
            .transpose(0, 1)
            .reshape(BATCH, NUM_TABLES * dim),
        }
        if fb is not None:
            fns["FBGEMM TBE"] = lambda: fb(indices, offsets)
        return fns

    def torch_step(optimizer):
        def step():
            out = torch.cat([m(i, o) for m, i, o in zip(sparse_loop, feature_indices, feature_offsets)], dim=1)
            out.backward(grad_output)
            if optimizer is not None:
                optimizer.step()
            for p in sparse_params:
                p.grad = None

        return step

    def fused_step(optimizer):
        def step():
            embedding_bags(tables, indices, offsets, fused_optimizer=optimizer).backward(grad_output)

        return step

    def train_fns():
        fns = {
            "mtkernels fused rowwise Adagrad": fused_step(fused_adagrad),
            "mtkernels fused SGD": fused_step(fused_sgd),
            "nn.EmbeddingBag(sparse) fwd+bwd only": torch_step(None),
            "nn.EmbeddingBag(sparse) + optim.SGD": torch_step(torch_sgd),
            "nn.EmbeddingBag(sparse) + optim.Adagrad": torch_step(torch_adagrad),
        }
        if fb is not None:
            fns["FBGEMM TBE EXACT_ROWWISE_ADAGRAD"] = lambda: fb(indices, offsets).backward(grad_output)
        return fns

    rows = []
    previous = torch.get_num_threads()
    try:
        for n in threads:
            torch.set_num_threads(n)
            with torch.no_grad():
                fwd = time_interleaved(forward_fns(), repeats=5 if quick else 15)
            train = time_interleaved(train_fns(), repeats=3 if quick else 7)
            for phase, results, ours in (("forward", fwd, "mtkernels"), ("train step", train, "mtkernels fused rowwise Adagrad")):
                for name, ms in results.items():
                    rows.append(
                        dict(dim=dim, pooling=pooling, threads=n, phase=phase, impl=name, ms=ms,
                             gbs=gathered_bytes / ms / 1e6, ratio=ms / results[ours])
                    )
    finally:
        torch.set_num_threads(previous)
        del fb, torch_adagrad, torch_sgd, sparse_loop, sparse_params, loop, whole, tables, concatenated
        gc.collect()
    return rows


def _targets(rows: List[dict]) -> List[str]:
    """The issue's "Must reach" lines, as measured."""
    index = {(r["dim"], r["pooling"], r["threads"], r["impl"]): r["ms"] for r in rows}
    lines = []
    for dim, pooling, n in sorted({(r["dim"], r["pooling"], r["threads"]) for r in rows}):
        get = lambda name: index.get((dim, pooling, n, name))  # noqa: E731
        ours = get("mtkernels")
        best_torch = min(get("nn.EmbeddingBag loop"), get("nn.EmbeddingBag concatenated"))
        parts = [f"fwd vs fastest torch {best_torch / ours:.2f}x (>= 1)"]
        if get("FBGEMM TBE") is not None:
            parts.append(f"fwd vs FBGEMM {get('FBGEMM TBE') / ours:.2f}x" + (" (>= 2)" if n >= 2 else ""))
        adagrad = get("mtkernels fused rowwise Adagrad")
        if get("FBGEMM TBE EXACT_ROWWISE_ADAGRAD") is not None:
            goal = "1.5" if n == 1 else "2.5"
            parts.append(f"Adagrad step vs FBGEMM {get('FBGEMM TBE EXACT_ROWWISE_ADAGRAD') / adagrad:.2f}x (>= {goal})")
        parts.append(f"Adagrad step vs torch sparse+Adagrad {get('nn.EmbeddingBag(sparse) + optim.Adagrad') / adagrad:.1f}x (>= 4)")
        parts.append(
            f"fused SGD / torch fwd+bwd {get('mtkernels fused SGD') / get('nn.EmbeddingBag(sparse) fwd+bwd only'):.2f} (<= 1.3)"
        )
        lines.append(f"- dim {dim}, pooling {pooling}, {n} thread(s): " + "; ".join(parts))
    return lines


def run(threads: List[int], quick: bool) -> str:
    """Time every configuration; return the Markdown table (and the targets as measured)."""
    dims = (64,) if quick else (16, 64, 128)
    rows: List[dict] = []
    for dim in dims:
        for pooling in ("1", "0..40"):
            rows.extend(bench_config(dim, pooling, threads, quick))
    header = [
        f"### embedding_bags: {NUM_TABLES} tables x {NUM_ROWS:,} rows, batch {BATCH}, sum pooling "
        f"({'quick' if quick else 'full'} run{'' if HAVE_FBGEMM else '; FBGEMM not installed'})",
        "",
        "| dim | pooling | threads | phase | implementation | ms (median) | GB/s | x mtkernels |",
        "|---:|---|---:|---|---|---:|---:|---:|",
    ]
    body = [
        f"| {r['dim']} | {r['pooling']} | {r['threads']} | {r['phase']} | {r['impl']} | {r['ms']:.2f} | "
        f"{r['gbs']:.2f} | {r['ratio']:.2f} |"
        for r in rows
    ]
    return "\n".join(header + body + ["", "Targets (issue 2, as measured here):", *_targets(rows)])


if __name__ == "__main__":
    print(run([1, 2], quick=True))
