"""`embedding_bags` on CUDA: forward (vectorised and scalar paths) and backward against the
reference and the CPU kernel, bad input raised as Python errors from device-side checks,
determinism of the backward, fused optimizers, gradcheck. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

import mtkernels
from mtkernels._extension import has_kernel
from mtkernels.ops import FusedEmbeddingOptimizer, embedding_bags
from mtkernels.reference import embedding_bags as reference_embedding_bags

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
CUDA_KERNEL = has_kernel("embedding_bags", "cuda")
needs_kernel = pytest.mark.skipif(not CUDA_KERNEL, reason="CUDA kernel not built")


def test_cuda_kernel_is_built():
    assert CUDA_KERNEL, mtkernels.info()


def make_problem(num_rows, dims, feature_table, batch, max_pooling, index_dtype=torch.int64,
                 dtype=torch.float32, weighted=False, seed=0):
    """Random tables and a random jagged batch (some bags empty), on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(n, d, generator=gen, dtype=torch.float64).to(dtype) for n, d in zip(num_rows, dims)]
    if feature_table is None:
        feature_table = list(range(len(weights)))
    lengths = torch.randint(0, max_pooling + 1, (len(feature_table) * batch,), generator=gen)
    pieces = []
    for f, t in enumerate(feature_table):
        n = int(lengths[f * batch : (f + 1) * batch].sum())
        pieces.append(torch.randint(0, num_rows[t], (n,), generator=gen))
    indices = torch.cat(pieces).to(index_dtype)
    offsets = torch.zeros(lengths.numel() + 1, dtype=index_dtype)
    offsets[1:] = torch.cumsum(lengths, 0)
    psw = torch.rand(indices.numel(), generator=gen, dtype=torch.float64).to(dtype) if weighted else None
    return weights, indices, offsets, feature_table, psw


def cuda(*tensors):
    return [None if t is None else ([w.cuda() for w in t] if isinstance(t, list) else t.cuda()) for t in tensors]


TOLERANCE = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
}

SHAPES = [
    ((10,), (4,), None, 3, 3),
    ((10, 7, 12), (4, 8, 3), None, 5, 4),  # dims 8 (vectorised for float32) and 3 (scalar)
    ((50, 20), (16, 33), [0, 1, 0, 0], 17, 6),
    ((1000, 300, 64, 5), (64, 128, 7, 1), [3, 0, 1, 2, 1], 64, 1),
    ((200,), (40,), [0, 0, 0], 31, 40),
    ((3000,), (256,), [0, 0], 100, 70),  # two passes of the warp over the columns, long bags
]


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("pooling,weighted", [("sum", False), ("mean", False), ("sum", True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_forward_matches_reference_and_cpu(shape, index_dtype, pooling, weighted, dtype):
    num_rows, dims, feature_table, batch, max_pool = shape
    weights, indices, offsets, feature_table, psw = make_problem(
        num_rows, dims, feature_table, batch, max_pool, index_dtype, dtype, weighted, seed=SHAPES.index(shape)
    )
    expected = reference_embedding_bags(
        [w.double() for w in weights], indices.long(), offsets.long(), feature_table, pooling,
        None if psw is None else psw.double(),
    )
    out = embedding_bags(*cuda(weights, indices, offsets), feature_table, pooling, *cuda(psw))
    assert out.device.type == "cuda" and out.dtype == dtype
    torch.testing.assert_close(out.cpu().double(), expected, **TOLERANCE[dtype])
    cpu = embedding_bags(weights, indices, offsets, feature_table, pooling, psw)
    torch.testing.assert_close(out.cpu(), cpu, **TOLERANCE[dtype])


@needs_kernel
def test_unaligned_and_strided_tables_take_the_scalar_path():
    # Views made on the device (a copy to the device would realign them).
    shifted = torch.randn(10 * 8 + 1, device="cuda")[1:].view(10, 8)  # data 4 bytes off 16-byte alignment
    strided = torch.randn(20, 10, device="cuda")[:, :8]  # row stride 10: rows not 16-byte aligned
    assert shifted.data_ptr() % 16 != 0 and strided.stride(0) == 10
    indices = torch.tensor([0, 5, 9, 3, 19, 0, 7])
    offsets = torch.tensor([0, 2, 3, 5, 7])
    expected = reference_embedding_bags([shifted.cpu(), strided.cpu()], indices, offsets, [0, 1], "sum", None)
    out = embedding_bags([shifted, strided], indices.cuda(), offsets.cuda(), [0, 1])
    torch.testing.assert_close(out.cpu(), expected)


@needs_kernel
@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_empty_bags_and_empty_batch(pooling):
    tables = [torch.randn(5, 4).cuda(), torch.randn(3, 2).cuda()]
    offsets = torch.zeros(7, dtype=torch.long, device="cuda")  # F=2, B=3, all bags empty
    out = embedding_bags(tables, torch.zeros(0, dtype=torch.long, device="cuda"), offsets, pooling=pooling)
    assert torch.equal(out.cpu(), torch.zeros(3, 6))
    out = embedding_bags(tables, torch.zeros(0, dtype=torch.long, device="cuda"),
                         torch.zeros(1, dtype=torch.long, device="cuda"))
    assert out.shape == (0, 6)


@needs_kernel
@pytest.mark.parametrize("bad_index,position", [(7, 2), (-1, 0), (2**32 + 1, 3)])
def test_out_of_range_index_raises_index_error_and_context_survives(bad_index, position):
    tables = [torch.randn(5, 2).cuda(), torch.randn(7, 3).cuda()]
    indices = torch.tensor([1, 2, 3, 4], dtype=torch.long)
    indices[position] = bad_index
    offsets = torch.tensor([0, 1, 2, 3, 4])
    feature = 0 if position < 2 else 1
    with pytest.raises(IndexError, match=rf"feature {feature}\b.*position {position}\b"):
        embedding_bags(tables, indices.cuda(), offsets.cuda())
    # Same message as the CPU kernel.
    with pytest.raises(IndexError) as cpu_error:
        embedding_bags([t.cpu() for t in tables], indices, offsets)
    with pytest.raises(IndexError) as cuda_error:
        embedding_bags(tables, indices.cuda(), offsets.cuda())
    assert str(cpu_error.value).splitlines()[0] == str(cuda_error.value).splitlines()[0]
    # no device-side assert: the context still works
    good = embedding_bags(tables, torch.tensor([1, 2, 3, 4], device="cuda"), offsets.cuda())
    assert torch.isfinite(good).all()


@needs_kernel
@pytest.mark.parametrize("offsets,num_indices", [([0, 3, 1], 3), ([0, 1, 5], 4), ([1, 2, 4], 4)])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_malformed_offsets_raise_value_error(offsets, num_indices, index_dtype):
    table = torch.randn(10, 4).cuda()
    indices = torch.arange(num_indices, dtype=index_dtype, device="cuda")
    with pytest.raises(ValueError, match="offsets"):
        embedding_bags([table], indices, torch.tensor(offsets, dtype=index_dtype, device="cuda"))
    assert torch.isfinite(embedding_bags([table], indices[:1], torch.tensor([0, 1], dtype=index_dtype, device="cuda"))).all()


def _grads(weights, indices, offsets, feature_table, pooling, psw, sparse, grad_output):
    tables = [w.detach().clone().requires_grad_(True) for w in weights]
    p = None if psw is None else psw.detach().clone().requires_grad_(True)
    out = embedding_bags(tables, indices, offsets, feature_table, pooling, p, sparse=sparse)
    out.backward(grad_output)
    grads = [t.grad.to_dense() if t.grad.is_sparse else t.grad for t in tables]
    return grads, None if p is None else p.grad


@needs_kernel
@pytest.mark.parametrize("pooling,weighted", [("sum", False), ("mean", False), ("sum", True)])
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_backward_matches_cpu(pooling, weighted, sparse, index_dtype):
    weights, indices, offsets, feature_table, psw = make_problem(
        (50, 2000, 7), (16, 130, 3), [0, 1, 2, 1], 40, 12, index_dtype, weighted=weighted, seed=5
    )
    total = 16 + 130 + 3 + 130
    grad_output = torch.randn(40, total, generator=torch.Generator().manual_seed(9))
    cpu_grads, cpu_psw = _grads(weights, indices, offsets, feature_table, pooling, psw, sparse, grad_output)
    gpu_grads, gpu_psw = _grads(*cuda(weights, indices, offsets), feature_table, pooling, *cuda(psw), sparse,
                                grad_output.cuda())
    for a, b in zip(gpu_grads, cpu_grads):
        torch.testing.assert_close(a.cpu(), b, atol=1e-5, rtol=1e-5)
    if weighted:
        torch.testing.assert_close(gpu_psw.cpu(), cpu_psw, atol=1e-5, rtol=1e-5)


@needs_kernel
def test_sparse_backward_ops_give_rows_ascending():
    weights, indices, offsets, feature_table, _ = make_problem((30, 40), (4, 8), [0, 1, 0], 9, 8, seed=2)
    grad_output = torch.randn(9, 16)
    rows_cpu, grads_cpu = torch.ops.mtkernels.embedding_bags_backward_sparse(
        grad_output, weights, indices, offsets, feature_table, "sum", None)
    rows_gpu, grads_gpu = torch.ops.mtkernels.embedding_bags_backward_sparse(
        *cuda(grad_output, weights, indices, offsets), feature_table, "sum", None)
    for a, b in zip(rows_gpu, rows_cpu):
        assert torch.equal(a.cpu(), b)
    for a, b in zip(grads_gpu, grads_cpu):
        torch.testing.assert_close(a.cpu(), b)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_backward_is_deterministic(dtype):
    # Many duplicates of few rows: the case float atomics would make run-dependent.
    weights, indices, offsets, feature_table, psw = make_problem(
        (8, 3), (64, 5), [0, 1, 0], 512, 40, dtype=dtype, weighted=True, seed=4
    )
    grad_output = torch.randn(512, 133).to(dtype)
    args = cuda(weights, indices, offsets)
    first, first_psw = _grads(*args, feature_table, "sum", psw.cuda(), False, grad_output.cuda())
    second, second_psw = _grads(*args, feature_table, "sum", psw.cuda(), False, grad_output.cuda())
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    assert torch.equal(first_psw, second_psw)


@needs_kernel
def test_gradcheck_float64():
    weights, indices, offsets, feature_table, psw = make_problem(
        (6, 5), (3, 2), [0, 1, 0], 4, 3, dtype=torch.float64, weighted=True, seed=8
    )
    tables = [w.cuda().requires_grad_(True) for w in weights]
    p = psw.cuda().requires_grad_(True)
    idx, off = indices.cuda(), offsets.cuda()

    def fn(psw_, *tables_):
        return embedding_bags(list(tables_), idx, off, feature_table, "sum", psw_)

    assert torch.autograd.gradcheck(fn, (p, *tables), eps=1e-6, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize("kind", ["sgd", "rowwise_adagrad"])
@pytest.mark.parametrize("pooling,weighted", [("sum", False), ("mean", False), ("sum", True)])
def test_fused_update_matches_cpu(kind, pooling, weighted):
    weights, indices, offsets, feature_table, psw = make_problem(
        (40, 300), (8, 36), [0, 1, 1], 25, 10, weighted=weighted, seed=6
    )
    grad_output = torch.randn(25, 80)
    results = []
    for device in ("cpu", "cuda"):
        tables = [w.clone().to(device) for w in weights]
        opt = FusedEmbeddingOptimizer(tables, kind=kind, lr=0.1, eps=1e-8)
        for _ in range(2):  # two steps, so the accumulators are used
            out = embedding_bags(tables, indices.to(device), offsets.to(device), feature_table, pooling,
                                 None if psw is None else psw.to(device), fused_optimizer=opt)
            out.backward(grad_output.to(device))
        results.append((tables, opt.accumulators))
    (cpu_tables, cpu_acc), (gpu_tables, gpu_acc) = results
    for a, b in zip(gpu_tables, cpu_tables):
        torch.testing.assert_close(a.cpu(), b, atol=1e-5, rtol=1e-5)
    for a, b in zip(gpu_acc, cpu_acc):
        torch.testing.assert_close(a.cpu(), b, atol=1e-5, rtol=1e-5)


@needs_kernel
def test_fused_update_bad_index_leaves_tables_untouched():
    table = torch.randn(5, 4).cuda()
    before = table.clone()
    opt = FusedEmbeddingOptimizer([table], kind="sgd", lr=0.1)
    indices = torch.tensor([1, 9], device="cuda")
    offsets = torch.tensor([0, 1, 2], device="cuda")
    with pytest.raises(IndexError):
        out = embedding_bags([table], indices, offsets, fused_optimizer=opt)
        out.backward(torch.ones_like(out))
    assert torch.equal(table, before)


@needs_kernel
def test_opcheck_forward():
    weights, indices, offsets, feature_table, psw = make_problem((20, 9), (8, 3), [0, 1, 0], 6, 4, weighted=True, seed=1)
    args = (*cuda(weights, indices, offsets), feature_table, "sum", psw.cuda(), False)
    torch.library.opcheck(torch.ops.mtkernels.embedding_bags.default, args)
