"""One table of the CUDA kernels against their torch baselines (run by benchmarks/gpu_check.sh).

Each op against the torch code a user would otherwise write, at the sizes of issue 6:
  - embedding_bags forward, 26 tables x 100,000 rows x 128, batch 16,384, pooling 0..40, against a
    loop of `torch.nn.functional.embedding_bag` (what a list of nn.EmbeddingBag runs) + torch.cat;
  - ensemble_topk, 3 x 4096 x 1,000,000 float32, k = 100, 50 exclusions per row, against the torch
    pipeline (weighted sum, exclusions set to -inf, torch.topk) and against torch.topk alone on one
    matrix;
  - multi_task_score, an MMoE (8 experts 256 -> 512 -> 256, 3 towers 256 -> 128 -> 1) at 4096 and
    200 rows, against the eager torch.nn model.
Times are medians of CUDA-event timings after warm-up. GB/s counts the bytes an op must move at
least (reads + writes), next to a device-to-device copy measured in the same run.

    python -m benchmarks.gpu_check [--out table.md] [--tests STATUS]

GPU_CHECK_SCALE (default 1) scales the large sizes down on smaller GPUs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import mtkernels
from mtkernels.ops import embedding_bags, ensemble_topk, multi_task_score, pack_multi_task_params
from mtkernels.training.checkpoint import atomic_write

SCALE = float(os.environ.get("GPU_CHECK_SCALE", "1"))


def median_ms(fn, iterations=10, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iterations):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth():
    src = torch.empty(2**29, dtype=torch.float32, device="cuda")  # 2 GiB
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), iterations=20)
    return 2 * src.numel() * 4 / ms / 1e6  # GB/s, read + write


def bench_embedding_bags(rows):
    gen = torch.Generator(device="cuda").manual_seed(0)
    tables, num_rows, dim, batch = 26, 100_000, 128, int(16_384 * SCALE)
    weights = [torch.randn(num_rows, dim, device="cuda", generator=gen) for _ in range(tables)]
    lengths = torch.randint(0, 41, (tables * batch,), device="cuda", generator=gen)
    offsets = torch.zeros(tables * batch + 1, dtype=torch.int64, device="cuda")
    offsets[1:] = lengths.cumsum(0)
    indices = torch.randint(0, num_rows, (int(offsets[-1]),), device="cuda", generator=gen)
    # The baseline's per-feature inputs, prepared outside the timed region.
    host_offsets = offsets.cpu()
    per_feature = []
    for f in range(tables):
        lo, hi = int(host_offsets[f * batch]), int(host_offsets[(f + 1) * batch])
        per_feature.append((indices[lo:hi], offsets[f * batch : (f + 1) * batch + 1] - lo))

    def ours():
        return embedding_bags(weights, indices, offsets)

    def baseline():
        return torch.cat(
            [torch.nn.functional.embedding_bag(idx, w, off, mode="sum", include_last_offset=True)
             for w, (idx, off) in zip(weights, per_feature)], dim=1)

    with torch.no_grad():
        torch.testing.assert_close(ours(), baseline(), atol=1e-4, rtol=1e-4)
        ours_ms, base_ms = median_ms(ours), median_ms(baseline)
    moved = indices.numel() * (dim * 4 + 8) + offsets.numel() * 8 + batch * tables * dim * 4
    rows.append(("embedding_bags fwd", f"26x100k x128, B={batch}, L=0..40", ours_ms, base_ms, moved,
                 "nn.EmbeddingBag loop", ">=60% copy, >=3x"))


def bench_ensemble_topk(rows):
    gen = torch.Generator(device="cuda").manual_seed(1)
    sources, batch, items, k = 3, 4096, int(1_000_000 * SCALE), 100
    scores = torch.rand(sources, batch, items, device="cuda", generator=gen)
    weights = [0.5, 0.3, 0.2]
    per_row = 50
    exclude_offsets = torch.arange(0, (batch + 1) * per_row, per_row, device="cuda")
    exclude_indices = torch.randint(0, items, (batch * per_row,), device="cuda", generator=gen)
    excluded_rows = torch.arange(batch, device="cuda").repeat_interleave(per_row)

    def ours():
        return ensemble_topk(scores, weights, k, exclude_offsets=exclude_offsets, exclude_indices=exclude_indices)

    def pipeline():
        fused = scores[0] * weights[0]
        for s in range(1, sources):
            fused.add_(scores[s], alpha=weights[s])
        fused[excluded_rows, exclude_indices] = -float("inf")
        return torch.topk(fused, k, dim=1)

    def topk_alone():
        return torch.topk(scores[0], k, dim=1)

    values, _ = ours()
    ref_values, _ = pipeline()
    torch.testing.assert_close(values, ref_values, atol=1e-6, rtol=1e-6)
    ours_ms = median_ms(ours, iterations=5)
    pipe_ms = median_ms(pipeline, iterations=5)
    alone_ms = median_ms(topk_alone, iterations=5)
    moved = scores.numel() * 4 + batch * k * 12
    shape = f"{sources}x{batch}x{items}, k={k}, 50 excl/row"
    rows.append(("ensemble_topk", shape, ours_ms, pipe_ms, moved, "torch pipeline", ">=3x"))
    rows.append(("ensemble_topk", shape, ours_ms, alone_ms, moved, "torch.topk, 1 matrix", ">=1.5x"))
    del scores


def bench_multi_task_score(rows):
    torch.manual_seed(2)
    width, experts, tasks = 256, 8, 3
    expert_layers = [[torch.nn.Linear(width, 512), torch.nn.Linear(512, 256)] for _ in range(experts)]
    gates = [torch.nn.Linear(width, experts) for _ in range(tasks)]
    towers = [[torch.nn.Linear(256, 128), torch.nn.Linear(128, 1)] for _ in range(tasks)]
    for module in [*sum(expert_layers, []), *gates, *sum(towers, [])]:
        module.cuda()
    mask = torch.ones(tasks, experts, dtype=torch.bool, device="cuda")
    transforms = ["sigmoid", "sigmoid", "identity"]
    params = pack_multi_task_params(expert_layers, gates, mask, towers, transforms)

    def eager(x):
        outs = []
        for layers in expert_layers:
            h = x
            for layer in layers:
                h = torch.relu(layer(h))
            outs.append(h)
        stacked = torch.stack(outs, dim=1)
        scores = []
        for t in range(tasks):
            g = torch.softmax(gates[t](x), dim=-1)
            h = torch.einsum("me,meh->mh", g, stacked)
            h = towers[t][1](torch.relu(towers[t][0](h)))[:, 0]
            scores.append(torch.sigmoid(h) if transforms[t] == "sigmoid" else h)
        return torch.stack(scores, dim=1)

    param_bytes = sum(p.numel() * p.element_size() for p in params.expert_weights + params.expert_biases
                      + params.tower_weights + params.tower_biases + (params.gate_weight, params.gate_bias))
    for m, target in ((4096, ">=2x"), (200, ">=5x")):
        x = torch.randn(m, width, device="cuda")
        with torch.inference_mode():
            torch.testing.assert_close(multi_task_score(x, params), eager(x), atol=1e-4, rtol=1e-4)
            ours_ms = median_ms(lambda: multi_task_score(x, params), iterations=50)
            eager_ms = median_ms(lambda: eager(x), iterations=50)
        moved = x.numel() * 4 + param_bytes + m * tasks * 4
        rows.append(("multi_task_score", f"MMoE E=8 T=3, M={m}", ours_ms, eager_ms, moved, "eager MMoE", target))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="also write the table (markdown) here")
    parser.add_argument("--tests", default="not run", help="GPU test status, printed in the header")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device")
    info = mtkernels.info()
    missing = [op for op, devices in info["ops"].items() if "cuda" not in devices]
    if missing:
        raise SystemExit(f"gpu_check: no CUDA kernel for {missing} (build with FORCE_CUDA=1)")
    started = time.time()
    bandwidth = copy_bandwidth()
    rows = []
    for bench in (bench_embedding_bags, bench_ensemble_topk, bench_multi_task_score):
        try:
            bench(rows)
        except Exception as exc:  # one failing benchmark must not hide the others
            rows.append((bench.__name__.replace("bench_", ""), f"FAILED: {type(exc).__name__}: {exc}"[:120],
                         float("nan"), float("nan"), 0, "-", "-"))
        torch.cuda.empty_cache()
    lines = [
        f"# mtkernels GPU check — {torch.cuda.get_device_name()}",
        "",
        f"torch {torch.__version__} (CUDA {torch.version.cuda}), mtkernels {info['version']}, "
        f"GPU tests: {args.tests}, scale {SCALE:g}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"device-to-device copy: {bandwidth:.0f} GB/s (read + write)",
        "",
        "| op | case | mtkernels ms | baseline | baseline ms | speedup | GB/s | % of copy | target |",
        "|---|---|---:|---|---:|---:|---:|---:|---|",
    ]
    for op, case, ours_ms, base_ms, moved, baseline, target in rows:
        gbs = moved / ours_ms / 1e6 if moved and ours_ms == ours_ms else float("nan")
        lines.append(
            f"| {op} | {case} | {ours_ms:.3f} | {baseline} | {base_ms:.3f} | {base_ms / ours_ms:.2f}x | "
            f"{gbs:.0f} | {100 * gbs / bandwidth:.0f}% | {target} |"
        )
    lines.append("")
    lines.append(f"benchmarks took {time.time() - started:.0f} s")
    table = "\n".join(lines)
    print(table)
    if args.out:  # atomically, like the other result tables: a killed run never leaves half a table
        atomic_write(args.out, lambda handle: handle.write((table + "\n").encode()))


if __name__ == "__main__":
    main()
