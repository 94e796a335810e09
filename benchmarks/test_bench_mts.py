"""pytest-benchmark microbenchmarks of `multi_task_score` (issue 5 item 4 shapes) against the eager
MMoE and the batched-experts eager model: ``pytest benchmarks/test_bench_mts.py``.
The comparison table with torch.compile and GFLOP/s is ``python -m benchmarks.run mts``."""

from __future__ import annotations

import pytest
import torch

from benchmarks.table_mts import D, BatchedMMoE, EagerMMoE
from mtkernels.ops import multi_task_score


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    model = EagerMMoE().eval()
    return model, BatchedMMoE(model).eval(), model.pack()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows", [4096, 200])
@pytest.mark.parametrize("variant", ["eager", "batched", "fused"])
def test_multi_task_score(benchmark, models, variant, rows, threads):
    model, batched, params = models
    x = torch.randn(rows, D)
    run = {
        "eager": lambda: model(x),
        "batched": lambda: batched(x),
        "fused": lambda: multi_task_score(x, params),
    }[variant]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    benchmark.group = f"multi_task_score rows={rows} threads={threads}"
    try:
        with torch.no_grad():
            expected = model(x)
            result = benchmark(run)
    finally:
        torch.set_num_threads(previous)
    torch.testing.assert_close(result, expected, rtol=1e-4, atol=1e-5)
