"""pytest-benchmark microbenchmarks of `ensemble_topk` (run: `pytest benchmarks/test_bench_topk.py`).

Small B (128 users x 100,000 items x 3 sources) so one round is short; the comparison table with
every baseline is `python -m benchmarks.run topk`.
"""

from __future__ import annotations

import pytest
import torch

import mtkernels
from benchmarks.table_topk import TRANSFORMS, WEIGHTS, _workload, eager_pipeline

BATCH_SIZE, NUM_ITEMS = 128, 100_000


@pytest.fixture(scope="module")
def workload():
    return _workload(BATCH_SIZE, NUM_ITEMS)


@pytest.fixture(params=[1, 2], ids=lambda t: f"threads{t}")
def threads(request):
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)


@pytest.mark.parametrize("k", [10, 100, 1000])
def test_ensemble_topk(benchmark, workload, threads, k):
    scores, offsets, seen, _ = workload
    values, indices = benchmark(mtkernels.ops.ensemble_topk, scores, WEIGHTS, k, TRANSFORMS, offsets, seen)
    assert indices.shape == (BATCH_SIZE, k)


@pytest.mark.parametrize("k", [10, 100, 1000])
def test_ensemble_topk_rrf(benchmark, workload, threads, k):
    scores, offsets, seen, _ = workload
    small = scores[:, :16]  # rrf sorts every source's row: a smaller batch
    values, indices = benchmark(
        mtkernels.ops.ensemble_topk, small, WEIGHTS, k, None, offsets[:17], seen[: int(offsets[16])], "rrf"
    )
    assert indices.shape == (16, k)


@pytest.mark.parametrize("k", [10, 100, 1000])
def test_eager_pipeline(benchmark, workload, threads, k):
    scores, _, _, mask = workload
    a, b, c = scores.unbind(0)
    values, indices = benchmark(eager_pipeline, a, b, c, mask, k)
    assert indices.shape == (BATCH_SIZE, k)


def test_read_floor(benchmark, workload, threads):
    scores = workload[0]
    benchmark(scores.sum)
