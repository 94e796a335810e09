"""`ensemble_topk` on CUDA: the contract cases, the kernel against the reference (run on the same
device) on random inputs (shared-memory path and the large-k path, weighted and rrf), CUDA against
CPU. Skipped without a GPU."""

from __future__ import annotations

import math

import pytest
import torch

import mtkernels
from mtkernels import reference
from mtkernels._extension import has_kernel

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
CUDA_KERNEL = has_kernel("ensemble_topk", "cuda")
needs_kernel = pytest.mark.skipif(not CUDA_KERNEL, reason="CUDA kernel not built")
topk = mtkernels.ops.ensemble_topk


def test_cuda_kernel_is_built():
    # On a GPU machine the CUDA build must register the kernel (otherwise the op silently runs
    # the reference and every test below would only test the reference).
    assert CUDA_KERNEL, mtkernels.info()


def csr(rows, device="cuda", dtype=torch.int64):
    offsets = [0]
    for r in rows:
        offsets.append(offsets[-1] + len(r))
    flat = [i for r in rows for i in r]
    return (torch.tensor(offsets, dtype=dtype, device=device), torch.tensor(flat, dtype=dtype, device=device))


@needs_kernel
class TestContract:
    def test_ties_smaller_index_first(self):
        values, indices = topk(torch.tensor([[[5.0, 7.0, 7.0, 3.0, 9.0]]], device="cuda"), [1.0], 3)
        assert indices.tolist() == [[4, 1, 2]]
        assert values.tolist() == [[9.0, 7.0, 7.0]]
        assert values.device.type == "cuda" and values.dtype == torch.float32 and indices.dtype == torch.int64

    def test_many_ties(self):
        x = torch.tensor([[[1.0, 2.0, 2.0, 2.0, 1.0, 2.0, 0.0]]], device="cuda")
        values, indices = topk(x, [1.0], 6)
        assert indices.tolist() == [[1, 2, 3, 5, 0, 4]]
        assert values.tolist() == [[2.0, 2.0, 2.0, 2.0, 1.0, 1.0]]

    def test_k_zero_and_empty_batch(self):
        values, indices = topk(torch.randn(2, 3, 10, device="cuda"), [1.0, 2.0], 0)
        assert values.shape == (3, 0) and indices.shape == (3, 0)
        values, indices = topk(torch.randn(2, 0, 10, device="cuda"), [1.0, 2.0], 4)
        assert values.shape == (0, 4)

    def test_k_greater_than_items_left(self):
        x = torch.tensor([[[0.5, 0.1, 0.9, 0.3]]], device="cuda")
        offsets, excluded = csr([[2]])
        values, indices = topk(x, [1.0], 6, exclude_offsets=offsets, exclude_indices=excluded)
        assert indices.tolist() == [[0, 3, 1, -1, -1, -1]]
        assert values[0, 3:].tolist() == [-math.inf] * 3

    def test_row_all_excluded_int32_exclusions(self):
        x = torch.randn(2, 2, 4, device="cuda")
        offsets, excluded = csr([[0, 1, 2, 3], [1]], dtype=torch.int32)
        values, indices = topk(x, [1.0, 1.0], 3, exclude_offsets=offsets, exclude_indices=excluded)
        assert indices[0].tolist() == [-1, -1, -1]
        assert 1 not in indices[1].tolist() and -1 not in indices[1].tolist()

    def test_zero_weight_source_with_minus_inf_and_nan(self):
        a = torch.tensor([[0.1, 0.4, 0.3]], device="cuda")
        b = torch.tensor([[-math.inf, -math.inf, 2.0]], device="cuda")
        c = torch.tensor([[math.nan, 1.0, math.inf]], device="cuda")
        values, indices = topk([a, b, c], [1.0, 0.0, 0.0], 3, transforms=["identity", "sigmoid", "log_sigmoid"])
        assert indices.tolist() == [[1, 2, 0]]

    def test_nan_never_returned_minus_inf_returned(self):
        x = torch.tensor([[[math.nan, 1.0, math.nan, 0.5, -math.inf]], [[0.0, math.nan, 0.0, 0.0, 0.0]]], device="cuda")
        values, indices = topk(x, [1.0, 1.0], 5)
        assert indices.tolist() == [[3, 4, -1, -1, -1]]
        assert not torch.isnan(values).any()

    def test_bad_exclusions_raise(self):
        x = torch.randn(1, 2, 5, device="cuda")
        with pytest.raises(ValueError, match="exclude_indices must lie in"):
            offsets, excluded = csr([[0], [5]])
            topk(x, [1.0], 2, exclude_offsets=offsets, exclude_indices=excluded)
        with pytest.raises(ValueError, match="non-decreasing"):
            topk(x, [1.0], 2, exclude_offsets=torch.tensor([0, 2, 1], device="cuda"),
                 exclude_indices=torch.tensor([0], device="cuda"))
        # the context is still usable after the errors
        assert topk(x, [1.0], 2)[1].shape == (2, 2)


def check_against_reference(scores, weights, k, transforms, offsets, excluded, mode, exact):
    values, indices = topk(scores, weights, k, transforms, offsets, excluded, mode)
    ref_values, ref_indices = reference.ensemble_topk(scores, weights, k, transforms, offsets, excluded, mode)
    torch.testing.assert_close(values, ref_values, atol=1e-5, rtol=1e-5)
    if exact:
        assert torch.equal(indices, ref_indices)
    else:
        # Transforms may round differently by an ulp: returned items must carry their value.
        assert torch.equal(indices < 0, ref_indices < 0)
        fused = torch.zeros_like(scores[0], dtype=torch.float32)
        for src, w, name in zip(scores, weights, transforms):
            x = src.float()
            fused += w * {"identity": x, "sigmoid": torch.sigmoid(x), "log_sigmoid": torch.nn.functional.logsigmoid(x)}[name]
        picked = fused.gather(1, indices.clamp(min=0))
        ok = indices >= 0
        torch.testing.assert_close(picked[ok], values[ok], atol=1e-5, rtol=1e-5)
        for row in indices.tolist():
            row = [i for i in row if i >= 0]
            assert len(set(row)) == len(row)


def random_exclusions(batch, items, gen, device="cuda"):
    counts = torch.randint(0, min(items, 40) + 1, (batch,), generator=gen)
    offsets = torch.zeros(batch + 1, dtype=torch.int64)
    offsets[1:] = counts.cumsum(0)
    excluded = torch.randint(0, items, (int(offsets[-1]),), generator=gen)
    return offsets.to(device), excluded.to(device)


@needs_kernel
@pytest.mark.parametrize(
    "num_sources,batch,items,k",
    [(1, 3, 7, 3), (3, 17, 1000, 10), (2, 5, 5000, 100), (3, 4, 100_003, 100), (2, 3, 4099, 1000),
     (1, 2, 3000, 3072), (2, 3, 9000, 5000), (2, 2, 50, 80)],
    ids=["tiny", "small", "mid", "large_n", "k1000", "k3072_largest_shared", "k5000_composite", "k_above_n"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("exclusions", [False, True])
def test_weighted_identity_matches_reference_exactly(num_sources, batch, items, k, dtype, exclusions):
    gen = torch.Generator().manual_seed(batch * items + k)
    scores = torch.randn(num_sources, batch, items, generator=gen).to(dtype).cuda()
    weights = (torch.rand(num_sources, generator=gen) + 0.5).tolist()
    offsets, excluded = random_exclusions(batch, items, gen) if exclusions else (None, None)
    check_against_reference(scores, weights, k, ["identity"] * num_sources, offsets, excluded, "weighted", exact=True)


@needs_kernel
@pytest.mark.parametrize("k", [5, 300, 4000])
def test_weighted_transforms_match_reference(k):
    gen = torch.Generator().manual_seed(k)
    scores = (3 * torch.randn(3, 6, 7000, generator=gen)).cuda()
    offsets, excluded = random_exclusions(6, 7000, gen)
    check_against_reference(scores, [0.7, -0.2, 1.3], k, ["sigmoid", "identity", "log_sigmoid"], offsets, excluded,
                            "weighted", exact=False)


@needs_kernel
@pytest.mark.parametrize("k", [10, 500])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rrf_matches_reference(k, dtype):
    gen = torch.Generator().manual_seed(k)
    scores = torch.randn(3, 5, 2000, generator=gen).to(dtype)
    scores[0, 1, :50] = math.nan
    scores[1, 2, ::7] = scores[1, 2, 3]  # ties inside a ranking
    offsets, excluded = random_exclusions(5, 2000, gen)
    check_against_reference(scores.cuda(), [1.0, 0.5, 0.25], k, ["identity"] * 3, offsets, excluded, "rrf", exact=True)


@needs_kernel
def test_cuda_matches_cpu_kernel():
    gen = torch.Generator().manual_seed(7)
    scores = torch.randn(3, 9, 3000, generator=gen)
    offsets, excluded = random_exclusions(9, 3000, gen, device="cpu")
    cpu = topk(scores, [1.0, 2.0, 0.5], 64, None, offsets, excluded)
    gpu = topk(scores.cuda(), [1.0, 2.0, 0.5], 64, None, offsets.cuda(), excluded.cuda())
    torch.testing.assert_close(gpu[0].cpu(), cpu[0])
    assert torch.equal(gpu[1].cpu(), cpu[1])


@needs_kernel
def test_strided_sources_and_non_default_stream():
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(2, 2000, 6, generator=gen).cuda()
    scores = [base[..., 0], base[..., 3]]  # rows with stride 6 between items
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        values, indices = topk(scores, [1.0, 1.0], 20)
    stream.synchronize()
    ref = reference.ensemble_topk(scores, [1.0, 1.0], 20)
    assert torch.equal(indices, ref[1])
