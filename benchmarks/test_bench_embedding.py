"""pytest-benchmark microbenchmarks of `embedding_bags` (a small DLRM-like shape).

Run: ``python -m pytest benchmarks/test_bench_embedding.py --benchmark-only`` (not part of the
test suite: pyproject's testpaths is ``tests``). Compare the groups: mtkernels vs a loop of
``nn.EmbeddingBag`` for the forward, the fused row-wise Adagrad step vs
``nn.EmbeddingBag(sparse=True)`` + ``torch.optim.Adagrad``. The full comparison table (FBGEMM,
1 and 2 threads) is ``python -m benchmarks.run embedding``.
"""

from __future__ import annotations

import pytest
import torch

from mtkernels.ops import FusedEmbeddingOptimizer, embedding_bags

NUM_TABLES, NUM_ROWS, DIM, BATCH, MAX_POOLING = 8, 20_000, 64, 512, 40


@pytest.fixture(scope="module")
def problem():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(0, MAX_POOLING + 1, (NUM_TABLES * BATCH,), generator=gen)
    indices = torch.randint(0, NUM_ROWS, (int(lengths.sum()),), generator=gen)
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.long)
    torch.cumsum(lengths, 0, out=offsets[1:])
    tables = [torch.randn(NUM_ROWS, DIM, generator=gen) * 0.01 for _ in range(NUM_TABLES)]
    starts = [int(offsets[f * BATCH]) for f in range(NUM_TABLES + 1)]
    per_feature = [
        (indices[starts[f] : starts[f + 1]], offsets[f * BATCH : (f + 1) * BATCH] - starts[f]) for f in range(NUM_TABLES)
    ]
    grad_output = torch.randn(BATCH, NUM_TABLES * DIM, generator=gen)
    return tables, indices, offsets, per_feature, grad_output


@pytest.mark.benchmark(group="forward")
def test_forward_mtkernels(benchmark, problem):
    tables, indices, offsets, _, _ = problem
    with torch.no_grad():
        out = benchmark(embedding_bags, tables, indices, offsets)
    assert out.shape == (BATCH, NUM_TABLES * DIM)


@pytest.mark.benchmark(group="forward")
def test_forward_embedding_bag_loop(benchmark, problem):
    tables, _, _, per_feature, _ = problem
    modules = [torch.nn.EmbeddingBag.from_pretrained(t, mode="sum") for t in tables]

    def loop():
        return torch.cat([m(i, o) for m, (i, o) in zip(modules, per_feature)], dim=1)

    with torch.no_grad():
        out = benchmark(loop)
    assert out.shape == (BATCH, NUM_TABLES * DIM)


@pytest.mark.benchmark(group="train step")
def test_step_mtkernels_fused_rowwise_adagrad(benchmark, problem):
    tables, indices, offsets, _, grad_output = problem
    tables = [t.clone() for t in tables]
    opt = FusedEmbeddingOptimizer(tables, kind="rowwise_adagrad", lr=0.01)
    benchmark(lambda: embedding_bags(tables, indices, offsets, fused_optimizer=opt).backward(grad_output))
    assert all(a.sum() > 0 for a in opt.accumulators)


@pytest.mark.benchmark(group="train step")
def test_step_embedding_bag_sparse_adagrad(benchmark, problem):
    tables, _, _, per_feature, grad_output = problem
    modules = [torch.nn.EmbeddingBag.from_pretrained(t.clone(), freeze=False, mode="sum", sparse=True) for t in tables]
    params = [m.weight for m in modules]
    opt = torch.optim.Adagrad(params, lr=0.01)

    def step():
        torch.cat([m(i, o) for m, (i, o) in zip(modules, per_feature)], dim=1).backward(grad_output)
        opt.step()
        for p in params:
            p.grad = None

    benchmark(step)
