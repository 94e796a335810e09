"""`embedding_bags`: the native op (when built) and the fallback path against the reference.

Every test that goes through `mtkernels.ops.embedding_bags` runs twice: on the native kernel
(skipped when the extension is not built) and on the pure-PyTorch fallback.
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch

from mtkernels.ops import FusedEmbeddingOptimizer, embedding_bags
from mtkernels.reference import embedding_bags as reference_embedding_bags
from mtkernels.reference.embedding_bags import embedding_bags_row_gradients

# the module (mtkernels.ops.embedding_bags is also the name of the function it exports)
eb_module = importlib.import_module("mtkernels.ops.embedding_bags")
NATIVE = eb_module._NATIVE_REGISTERED


@pytest.fixture(params=["native", "fallback"])
def path(request, monkeypatch):
    if request.param == "native" and not NATIVE:
        pytest.skip("native extension not built")
    if request.param == "fallback":
        monkeypatch.setattr(eb_module, "_NATIVE_REGISTERED", False)
    return request.param


native_only = pytest.mark.skipif(not NATIVE, reason="native extension not built")


def make_problem(
    num_rows=(10, 7, 12),
    dims=(4, 8, 3),
    feature_table=None,
    batch_size=5,
    max_pooling=4,
    index_dtype=torch.int64,
    dtype=torch.float32,
    weighted=False,
    seed=0,
    requires_grad=False,
):
    """Random tables and a random jagged batch (some bags empty)."""
    gen = torch.Generator().manual_seed(seed)
    weights = [
        torch.randn(n, d, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)
        for n, d in zip(num_rows, dims)
    ]
    if feature_table is None:
        feature_table = list(range(len(weights)))
    lengths = torch.randint(0, max_pooling + 1, (len(feature_table) * batch_size,), generator=gen)
    pieces = []
    for f, t in enumerate(feature_table):
        n = int(lengths[f * batch_size : (f + 1) * batch_size].sum())
        pieces.append(torch.randint(0, num_rows[t], (n,), generator=gen))
    indices = torch.cat(pieces).to(index_dtype)
    offsets = torch.zeros(lengths.numel() + 1, dtype=index_dtype)
    offsets[1:] = torch.cumsum(lengths, 0)
    psw = torch.rand(indices.numel(), generator=gen, dtype=torch.float64).to(dtype) if weighted else None
    return weights, indices, offsets, feature_table, psw


def tolerance(dtype):
    return {
        torch.float64: dict(atol=1e-10, rtol=1e-10),
        torch.float32: dict(atol=1e-5, rtol=1e-5),
        torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
        torch.float16: dict(atol=2e-3, rtol=2e-3),
    }[dtype]


# ---------------------------------------------------------------------------------------------
# Forward against the reference on random shapes
# ---------------------------------------------------------------------------------------------
SHAPES = [
    # num_rows, dims, feature_table, batch, max pooling
    ((10,), (4,), None, 3, 3),
    ((10, 7, 12), (4, 8, 3), None, 5, 4),
    ((50, 20), (16, 33), [0, 1, 0, 0], 17, 6),
    ((1000, 300, 64, 5), (64, 128, 7, 1), [3, 0, 1, 2, 1], 64, 1),
    ((200,), (40,), [0, 0, 0], 31, 40),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("pooling,weighted", [("sum", False), ("mean", False), ("sum", True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_matches_reference(path, shape, index_dtype, pooling, weighted, dtype):
    num_rows, dims, feature_table, batch, max_pool = shape
    weights, indices, offsets, feature_table, psw = make_problem(
        num_rows, dims, feature_table, batch, max_pool, index_dtype, dtype, weighted, seed=SHAPES.index(shape)
    )
    out = embedding_bags(weights, indices, offsets, feature_table, pooling, psw)
    expected = reference_embedding_bags(weights, indices.long(), offsets.long(), feature_table, pooling, psw)
    assert out.shape == (batch, sum(dims[t] for t in feature_table))
    assert out.dtype == dtype
    torch.testing.assert_close(out, expected, **tolerance(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_tables_accumulate_in_float32(path, dtype):
    weights, indices, offsets, feature_table, psw = make_problem(
        (100, 80), (32, 16), [0, 1, 1], 20, 30, dtype=dtype, weighted=True, seed=3
    )
    out = embedding_bags(weights, indices, offsets, feature_table, "sum", psw)
    assert out.dtype == dtype
    exact = reference_embedding_bags(
        [w.double() for w in weights], indices, offsets, feature_table, "sum", psw.double()
    )
    eager = torch.cat(
        [
            torch.nn.functional.embedding_bag(
                indices[int(offsets[f * 20]) : int(offsets[(f + 1) * 20])],
                weights[t],
                offsets[f * 20 : (f + 1) * 20] - offsets[f * 20],
                mode="sum",
                per_sample_weights=psw[int(offsets[f * 20]) : int(offsets[(f + 1) * 20])],
            )
            for f, t in enumerate(feature_table)
        ],
        dim=1,
    )
    # flash-attention's rule: at most twice the error of eager PyTorch in the same dtype
    err = (out.double() - exact).abs().max().item()
    eager_err = (eager.double() - exact).abs().max().item()
    assert err <= 2 * eager_err + 1e-6, (err, eager_err)


def test_lengths_form_equals_offsets(path):
    weights, indices, offsets, feature_table, _ = make_problem(seed=4)
    lengths = offsets[1:] - offsets[:-1]
    torch.testing.assert_close(
        embedding_bags(weights, indices, None, feature_table, lengths=lengths),
        embedding_bags(weights, indices, offsets, feature_table),
    )
    with pytest.raises(ValueError, match="not both"):
        embedding_bags(weights, indices, offsets, feature_table, lengths=lengths)
    with pytest.raises(ValueError, match="required"):
        embedding_bags(weights, indices, None, feature_table)


# ---------------------------------------------------------------------------------------------
# Issue 2, item 5: inputs that must behave as stated
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_empty_bags_pool_to_zeros_and_get_no_gradient(path, pooling):
    # offsets [0,1,1,3,3,4] over 4 indices: 5 bags, 2 of them (bags 1 and 3) empty
    table = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    indices = torch.tensor([0, 1, 2, 3])
    offsets = torch.tensor([0, 1, 1, 3, 3, 4])
    out = embedding_bags([table], indices, offsets, pooling=pooling)
    assert out.shape == (5, 3)
    assert torch.equal(out[1], torch.zeros(3, dtype=torch.float64))
    assert torch.equal(out[3], torch.zeros(3, dtype=torch.float64))
    w = table.detach()
    expected_bag2 = w[1] + w[2] if pooling == "sum" else (w[1] + w[2]) / 2
    torch.testing.assert_close(out[2], expected_bag2)
    # bags 1 and 3 are empty: only rows 0..3 are touched, and row r's gradient is that of its bag
    grad_output = torch.randn(5, 3, dtype=torch.float64)
    out.backward(grad_output)
    scale = 0.5 if pooling == "mean" else 1.0
    expected = torch.zeros(6, 3, dtype=torch.float64)
    expected[0] = grad_output[0]
    expected[1] = grad_output[2] * scale
    expected[2] = grad_output[2] * scale
    expected[3] = grad_output[4]
    torch.testing.assert_close(table.grad, expected)
    assert torch.equal(table.grad[4:], torch.zeros(2, 3, dtype=torch.float64))


def test_all_bags_empty_mean_is_zero_not_nan(path):
    table = torch.randn(4, 5)
    out = embedding_bags([table], torch.zeros(0, dtype=torch.long), torch.zeros(7, dtype=torch.long), pooling="mean")
    assert out.shape == (6, 5)
    assert not torch.isnan(out).any()
    assert torch.equal(out, torch.zeros(6, 5))


@pytest.mark.parametrize(
    "bad_index,position",
    [(7, 2), (-1, 0), (2**32 + 1, 3)],
    ids=["num_embeddings", "minus_one", "2**32+1"],
)
def test_out_of_range_index_raises_index_error(path, bad_index, position):
    tables = [torch.randn(5, 2), torch.randn(7, 3)]
    # feature 0 -> table 0 (positions 0..1), feature 1 -> table 1 (positions 2..3)
    indices = torch.tensor([1, 2, 3, 4], dtype=torch.long)
    indices[position] = bad_index
    offsets = torch.tensor([0, 1, 2, 3, 4])
    feature = 0 if position < 2 else 1
    with pytest.raises(IndexError, match=rf"feature {feature}\b.*position {position}\b"):
        embedding_bags(tables, indices, offsets)


@pytest.mark.parametrize(
    "offsets,num_indices",
    [([0, 3, 1], 3), ([0, 1, 5], 4), ([], 4), ([1, 2, 4], 4)],
    ids=["decreasing", "last_beyond_len", "empty_offsets", "not_starting_at_zero"],
)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_malformed_offsets_raise_value_error(path, offsets, num_indices, index_dtype):
    table = torch.randn(10, 4)
    indices = torch.arange(num_indices, dtype=index_dtype)
    with pytest.raises(ValueError, match="offsets"):
        embedding_bags([table], indices, torch.tensor(offsets, dtype=index_dtype))


@pytest.mark.parametrize("index_dtype,offset_dtype", [(torch.int32, torch.int64), (torch.int64, torch.int32)])
def test_mixed_index_dtypes_equal_int64(path, index_dtype, offset_dtype):
    weights, indices, offsets, feature_table, psw = make_problem(weighted=True, seed=5)
    expected = embedding_bags(weights, indices, offsets, feature_table, "sum", psw)
    out = embedding_bags(weights, indices.to(index_dtype), offsets.to(offset_dtype), feature_table, "sum", psw)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_float_indices_raise_type_error(path):
    with pytest.raises(TypeError, match="indices"):
        embedding_bags([torch.randn(4, 2)], torch.tensor([0.0, 1.0]), torch.tensor([0, 2]))
    with pytest.raises(TypeError, match="offsets"):
        embedding_bags([torch.randn(4, 2)], torch.tensor([0, 1]), torch.tensor([0.0, 2.0]))


def test_per_sample_weights_errors(path):
    table = torch.randn(4, 2)
    indices, offsets = torch.tensor([0, 1, 2]), torch.tensor([0, 2, 3])
    with pytest.raises(ValueError, match="sum only"):
        embedding_bags([table], indices, offsets, pooling="mean", per_sample_weights=torch.ones(3))
    with pytest.raises(ValueError, match="per_sample_weights"):
        embedding_bags([table], indices, offsets, per_sample_weights=torch.ones(2))


def test_batch_of_zero(path):
    tables = [torch.randn(4, 2), torch.randn(5, 3)]
    out = embedding_bags(tables, torch.zeros(0, dtype=torch.long), torch.zeros(1, dtype=torch.long), [0, 1, 1])
    assert out.shape == (0, 8)


def test_table_with_all_bags_empty_gives_zero_columns(path):
    tables = [torch.randn(4, 2), torch.randn(5, 3)]
    # feature 0 (table 0) has ids, feature 1 (table 1) has only empty bags
    indices = torch.tensor([0, 3, 1])
    offsets = torch.tensor([0, 2, 3, 3, 3])
    out = embedding_bags(tables, indices, offsets)
    assert torch.equal(out[:, 2:], torch.zeros(2, 3))
    torch.testing.assert_close(out[:, :2], torch.stack([tables[0][0] + tables[0][3], tables[0][1]]))


def test_features_with_different_batch_sizes_raise(path):
    # 2 features: 5 bags cannot be split into two equal batches
    with pytest.raises(ValueError, match="batch size"):
        embedding_bags([torch.randn(4, 2), torch.randn(4, 2)], torch.tensor([0, 1, 2]), torch.tensor([0, 1, 1, 2, 3, 3]))


def test_other_bad_inputs(path):
    table = torch.randn(4, 2)
    indices, offsets = torch.tensor([0, 1]), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="pooling"):
        embedding_bags([table], indices, offsets, pooling="max")
    with pytest.raises(ValueError, match="feature_table"):
        embedding_bags([table], indices, offsets, feature_table=[1])
    with pytest.raises(ValueError, match="weights"):
        embedding_bags([], indices, offsets)
    with pytest.raises(ValueError, match="weights"):
        embedding_bags([torch.randn(4)], indices, offsets)
    with pytest.raises(ValueError, match="indices"):
        embedding_bags([table], indices[None], offsets)


# ---------------------------------------------------------------------------------------------
# Backward: dense and sparse table gradients, per-sample-weight gradients
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES[1:4])
@pytest.mark.parametrize("pooling,weighted", [("sum", False), ("mean", False), ("sum", True)])
@pytest.mark.parametrize("sparse", [False, True])
def test_backward_matches_reference(path, shape, pooling, weighted, sparse):
    num_rows, dims, feature_table, batch, max_pool = shape
    weights, indices, offsets, feature_table, psw = make_problem(
        num_rows, dims, feature_table, batch, max_pool, torch.int32, torch.float64, weighted, seed=7,
        requires_grad=True,
    )
    if psw is not None:
        psw.requires_grad_(True)
    ref_weights = [w.detach().clone().requires_grad_(True) for w in weights]
    ref_psw = None if psw is None else psw.detach().clone().requires_grad_(True)
    out = embedding_bags(weights, indices, offsets, feature_table, pooling, psw, sparse=sparse)
    expected = reference_embedding_bags(ref_weights, indices, offsets, feature_table, pooling, ref_psw)
    grad_output = torch.randn_like(out)
    out.backward(grad_output)
    expected.backward(grad_output)
    for w, r in zip(weights, ref_weights):
        if sparse:
            # duplicate rows summed: one entry per touched row, ascending (autograd's
            # AccumulateGrad drops the is_coalesced flag when it stores .grad, not the content)
            assert w.grad.is_sparse
            rows = w.grad._indices()[0]
            assert torch.equal(rows, torch.unique(rows))
            torch.testing.assert_close(w.grad.to_dense(), r.grad, atol=1e-10, rtol=1e-10)
        else:
            assert not w.grad.is_sparse
            torch.testing.assert_close(w.grad, r.grad, atol=1e-10, rtol=1e-10)
    if psw is not None:
        torch.testing.assert_close(psw.grad, ref_psw.grad, atol=1e-10, rtol=1e-10)


def test_backward_is_deterministic(path):
    weights, indices, offsets, feature_table, psw = make_problem(
        (30, 20), (16, 8), [0, 1, 0, 0], 200, 20, dtype=torch.float32, weighted=True, seed=8, requires_grad=True
    )
    grads = []
    for _ in range(3):
        for w in weights:
            w.grad = None
        out = embedding_bags(weights, indices, offsets, feature_table, "sum", psw)
        out.backward(torch.ones_like(out))
        grads.append([w.grad.clone() for w in weights])
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            assert torch.equal(a, b)


def test_gradcheck_float64(path):
    weights, indices, offsets, feature_table, psw = make_problem(
        (6, 5), (3, 2), [0, 1, 0], 4, 3, dtype=torch.float64, weighted=True, seed=9, requires_grad=True
    )
    psw.requires_grad_(True)

    def fn(psw_, *tables):
        return embedding_bags(list(tables), indices, offsets, feature_table, "sum", psw_)

    assert torch.autograd.gradcheck(fn, (psw, *weights))
    for pooling in ("sum", "mean"):
        assert torch.autograd.gradcheck(
            lambda *tables: embedding_bags(list(tables), indices, offsets, feature_table, pooling), tuple(weights)
        )


# ---------------------------------------------------------------------------------------------
# Fused optimizer: the update inside the backward equals the same update done by hand
# ---------------------------------------------------------------------------------------------
def by_hand_update(weights, accumulators, grads, kind, lr, eps):
    """The optimizer step on a dense copy: grads are the dense table gradients of the step."""
    for t, (w, g) in enumerate(zip(weights, grads)):
        touched = g.abs().sum(dim=1) > 0
        if kind == "sgd":
            w -= lr * g
        else:
            acc = accumulators[t]
            acc[touched] += g[touched].double().pow(2).mean(dim=1).to(acc.dtype)
            denom = acc.double().sqrt() + eps
            w[touched] -= (lr * g[touched].double() / denom[touched, None]).to(w.dtype)


@pytest.mark.parametrize("kind", ["sgd", "rowwise_adagrad"])
@pytest.mark.parametrize("pooling,weighted", [("sum", False), ("mean", False), ("sum", True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_update_matches_update_by_hand(path, kind, pooling, weighted, dtype):
    weights, indices, offsets, feature_table, psw = make_problem(
        (40, 30, 8), (16, 8, 5), [0, 1, 0, 2, 2], 12, 6, torch.int32, dtype, weighted, seed=11
    )
    # duplicates within the batch and within a bag: row 3 of table 0 in every bag of feature 0
    indices[: int(offsets[12])] = 3
    lr, eps = 0.05, 1e-6
    opt = FusedEmbeddingOptimizer(weights, kind=kind, lr=lr, eps=eps, initial_accumulator_value=0.1)
    dense = [w.detach().clone() for w in weights]
    dense_acc = [a.clone() for a in opt.accumulators]
    for step in range(3):
        out = embedding_bags(weights, indices, offsets, feature_table, pooling, psw, fused_optimizer=opt)
        assert out.requires_grad and not any(w.requires_grad for w in weights)
        grad_output = torch.randn(out.shape, dtype=dtype, generator=torch.Generator().manual_seed(step))
        # the gradient a dense copy gets from the reference, then the same step by hand
        ref_weights = [d.clone().requires_grad_(True) for d in dense]
        reference_embedding_bags(ref_weights, indices, offsets, feature_table, pooling, psw).backward(grad_output)
        by_hand_update(dense, dense_acc, [r.grad for r in ref_weights], kind, lr, eps)
        out.backward(grad_output)
        assert all(w.grad is None for w in weights)
        tol = tolerance(dtype) if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-5)
        for w, d in zip(weights, dense):
            torch.testing.assert_close(w, d, **tol)
        for a, d in zip(opt.accumulators, dense_acc):
            torch.testing.assert_close(a, d, **tol)


def test_fused_update_bfloat16_tables(path):
    weights, indices, offsets, feature_table, _ = make_problem((50, 40), (16, 8), None, 10, 5, dtype=torch.bfloat16, seed=12)
    opt = FusedEmbeddingOptimizer(weights, kind="rowwise_adagrad", lr=0.1)
    before = [w.float().clone() for w in weights]
    out = embedding_bags(weights, indices, offsets, fused_optimizer=opt)
    grad_output = torch.randn(out.shape).to(torch.bfloat16)
    out.backward(grad_output)
    rows = embedding_bags_row_gradients(grad_output.float(), [w.float() for w in before], indices, offsets)
    for t, (r, g) in enumerate(rows):
        acc = g.pow(2).mean(1)
        torch.testing.assert_close(opt.accumulators[t][r], acc, atol=1e-2, rtol=1e-2)
        expected = before[t][r] - 0.1 * g / (acc.sqrt() + 1e-8)[:, None]
        torch.testing.assert_close(weights[t][r].float(), expected, atol=3e-2, rtol=3e-2)


def test_fused_optimizer_state_dict_round_trip(path):
    weights, indices, offsets, feature_table, _ = make_problem(seed=13)
    opt = FusedEmbeddingOptimizer(weights, lr=0.1)
    embedding_bags(weights, indices, offsets, fused_optimizer=opt).sum().backward()
    state = copy.deepcopy(opt.state_dict())
    assert set(state) == {"kind", "lr", "eps", "initial_accumulator_value", "accumulators"}
    assert any(a.sum() > 0 for a in state["accumulators"])
    fresh = FusedEmbeddingOptimizer([w.clone() for w in weights], lr=0.5)
    fresh.load_state_dict(state)
    assert fresh.lr == 0.1
    for a, b in zip(fresh.accumulators, opt.accumulators):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="kind"):
        FusedEmbeddingOptimizer(weights, kind="sgd").load_state_dict(state)


def test_fused_optimizer_errors(path):
    weights, indices, offsets, _, _ = make_problem(seed=14)
    with pytest.raises(ValueError, match="kind"):
        FusedEmbeddingOptimizer(weights, kind="adam")
    with pytest.raises(ValueError, match="lr"):
        FusedEmbeddingOptimizer(weights, lr=-1.0)
    opt = FusedEmbeddingOptimizer([w.clone() for w in weights])
    with pytest.raises(ValueError, match="same tables"):
        embedding_bags(weights, indices, offsets, fused_optimizer=opt)
    assert FusedEmbeddingOptimizer(weights, kind="sgd").accumulators == []


def test_fused_no_grad_mode_does_not_update(path):
    weights, indices, offsets, _, _ = make_problem(seed=15)
    opt = FusedEmbeddingOptimizer(weights, kind="sgd", lr=1.0)
    before = [w.clone() for w in weights]
    with torch.no_grad():
        out = embedding_bags(weights, indices, offsets, fused_optimizer=opt)
    assert not out.requires_grad
    torch.testing.assert_close(out, reference_embedding_bags(before, indices, offsets))
    for w, b in zip(weights, before):
        assert torch.equal(w, b)


def test_fused_per_sample_weights_gradient(path):
    weights, indices, offsets, feature_table, psw = make_problem(dtype=torch.float64, weighted=True, seed=16)
    psw.requires_grad_(True)
    ref_weights = [w.clone().requires_grad_(True) for w in weights]
    ref_psw = psw.detach().clone().requires_grad_(True)
    opt = FusedEmbeddingOptimizer(weights, kind="sgd", lr=0.5)
    out = embedding_bags(weights, indices, offsets, feature_table, "sum", psw, fused_optimizer=opt)
    grad_output = torch.randn_like(out)
    out.backward(grad_output)
    reference_embedding_bags(ref_weights, indices, offsets, feature_table, "sum", ref_psw).backward(grad_output)
    # the per-sample-weight gradient is taken at the rows before the update
    torch.testing.assert_close(psw.grad, ref_psw.grad)


# ---------------------------------------------------------------------------------------------
# Op registration: opcheck on the forward and every backward op, torch.compile
# ---------------------------------------------------------------------------------------------
def _opcheck_samples():
    for pooling, weighted, index_dtype, dtype in [
        ("sum", False, torch.int64, torch.float32),
        ("mean", False, torch.int32, torch.float32),
        ("sum", True, torch.int32, torch.float64),
    ]:
        weights, indices, offsets, feature_table, psw = make_problem(
            (12, 9), (4, 6), [0, 1, 0], 5, 4, index_dtype, dtype, weighted, seed=21
        )
        yield weights, indices, offsets, feature_table, pooling, psw


@native_only
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("sparse", [False, True])
def test_opcheck_forward(requires_grad, sparse):
    for weights, indices, offsets, feature_table, pooling, psw in _opcheck_samples():
        weights = [w.requires_grad_(requires_grad) for w in weights]
        if psw is not None:
            psw.requires_grad_(requires_grad)
        # AOT autograd cannot trace a sparse gradient: the sparse backward is checked below
        tests = ("test_schema", "test_autograd_registration", "test_faketensor") if sparse else None
        kwargs = {} if tests is None else {"test_utils": tests}
        torch.library.opcheck(
            torch.ops.mtkernels.embedding_bags.default,
            (weights, indices, offsets, feature_table, pooling, psw, sparse),
            **kwargs,
        )


@native_only
def test_opcheck_backward_ops():
    for weights, indices, offsets, feature_table, pooling, psw in _opcheck_samples():
        total = sum(weights[t].shape[1] for t in feature_table)
        grad_output = torch.randn(5, total, dtype=weights[0].dtype)
        args = (grad_output, weights, indices, offsets, feature_table, pooling, psw)
        torch.library.opcheck(torch.ops.mtkernels.embedding_bags_backward.default, args)
        torch.library.opcheck(torch.ops.mtkernels.embedding_bags_backward_sparse.default, args)
        torch.library.opcheck(
            torch.ops.mtkernels.embedding_bags_per_sample_weights_backward.default,
            (grad_output, weights, indices, offsets, feature_table),
        )
        for kind in ("sgd", "rowwise_adagrad"):
            accumulators = [torch.zeros(w.shape[0]) for w in weights] if kind == "rowwise_adagrad" else []
            torch.library.opcheck(
                torch.ops.mtkernels.embedding_bags_fused_update.default,
                ([w.clone() for w in weights], accumulators, grad_output, indices, offsets, feature_table,
                 pooling, psw, kind, 0.1, 1e-8),
            )


@native_only
def test_native_backward_ops_reject_bad_input():
    weights, indices, offsets, feature_table, psw = make_problem(seed=22)
    grad_output = torch.randn(5, 15)
    ops = torch.ops.mtkernels
    with pytest.raises(ValueError, match="grad_output"):
        ops.embedding_bags_backward(grad_output[:, :3], weights, indices, offsets, feature_table, "sum", None)
    bad = indices.clone()
    bad[-1] = 1000
    with pytest.raises(IndexError, match=rf"feature 2: index 1000 at position {indices.numel() - 1}"):
        ops.embedding_bags_backward_sparse(grad_output, weights, bad, offsets, feature_table, "sum", None)
    with pytest.raises(IndexError, match="feature 2"):
        ops.embedding_bags_per_sample_weights_backward(grad_output, weights, bad, offsets, feature_table)
    with pytest.raises(ValueError, match="optimizer"):
        ops.embedding_bags_fused_update(weights, [], grad_output, indices, offsets, feature_table, "sum", None, "adam", 0.1, 0.0)
    with pytest.raises(ValueError, match="accumulator"):
        ops.embedding_bags_fused_update(weights, [], grad_output, indices, offsets, feature_table, "sum", None,
                                        "rowwise_adagrad", 0.1, 0.0)
    with pytest.raises(TypeError, match="one dtype"):
        ops.embedding_bags(weights, indices.int(), offsets, feature_table, "sum", None, False)
    with pytest.raises(TypeError, match="dtype"):
        ops.embedding_bags([weights[0], weights[1].double(), weights[2]], indices, offsets, feature_table, "sum", None, False)


@native_only
def test_native_handles_non_contiguous_tables():
    weights, indices, offsets, feature_table, _ = make_problem(seed=23)
    transposed = [w.t().contiguous().t() for w in weights]  # column stride != 1
    torch.testing.assert_close(embedding_bags(transposed, indices, offsets), embedding_bags(weights, indices, offsets))
    with pytest.raises(ValueError, match="contiguous rows"):
        torch.ops.mtkernels.embedding_bags_fused_update(
            transposed, [], torch.randn(5, 15), indices, offsets, feature_table, "sum", None, "sgd", 0.1, 0.0
        )


@native_only
def test_torch_compile_fullgraph():
    weights, indices, offsets, feature_table, psw = make_problem(seed=24, weighted=True)

    @torch.compile(fullgraph=True, backend="eager")
    def lookup(w0, w1, w2, idx, off, psw_):
        return torch.ops.mtkernels.embedding_bags([w0, w1, w2], idx, off, [0, 1, 2], "sum", psw_, False)

    torch.testing.assert_close(
        lookup(*weights, indices, offsets, psw), reference_embedding_bags(weights, indices, offsets, None, "sum", psw)
    )


@native_only
@pytest.mark.parametrize("threads", [1, 2])
def test_native_results_do_not_depend_on_thread_count(threads):
    weights, indices, offsets, feature_table, psw = make_problem(
        (300, 200), (32, 16), [0, 1, 0], 512, 30, dtype=torch.float32, weighted=True, seed=25, requires_grad=True
    )
    previous = torch.get_num_threads()
    results = []
    try:
        for n in (1, threads):
            torch.set_num_threads(n)
            for w in weights:
                w.grad = None
            out = embedding_bags(weights, indices, offsets, feature_table, "sum", psw)
            out.backward(torch.ones_like(out))
            results.append((out.detach().clone(), [w.grad.clone() for w in weights]))
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# The specialised float32 loop (dims 8/16/32/64/128) and the table-major work split: large
# batches give each feature several work items, claimed by 1 or 2 threads.
# ---------------------------------------------------------------------------------------------
def _with_threads(threads, fn):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(previous)


@native_only
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("pooling,weighted", [("sum", False), ("mean", False), ("sum", True)])
def test_specialised_dims_with_large_batches_match_reference(index_dtype, pooling, weighted):
    weights, indices, offsets, feature_table, psw = make_problem(
        (300, 50, 70, 20, 90, 40), (8, 16, 32, 64, 128, 24), [0, 1, 2, 3, 4, 5, 2, 4], 1100, 5,
        index_dtype, torch.float32, weighted, seed=31,
    )
    expected = reference_embedding_bags(weights, indices.long(), offsets.long(), feature_table, pooling, psw)
    for threads in (1, 2):
        out = _with_threads(threads, lambda: embedding_bags(weights, indices, offsets, feature_table, pooling, psw))
        torch.testing.assert_close(out, expected, **tolerance(torch.float32))


@native_only
def test_specialised_loop_on_strided_table_rows():
    # rows of a table that is a column slice of a wider tensor: row stride 80, dim 64
    base = torch.randn(100, 80)
    weights = [base[:, 8:72], torch.randn(30, 16)]
    gen = torch.Generator().manual_seed(5)
    lengths = torch.randint(0, 6, (2 * 300,), generator=gen)  # batch 300, features 0 and 1
    split = int(lengths[:300].sum())
    indices = torch.cat([torch.randint(0, 100, (split,), generator=gen),
                         torch.randint(0, 30, (int(lengths.sum()) - split,), generator=gen)])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(lengths, 0)])
    expected = reference_embedding_bags(weights, indices, offsets, None, "sum", None)
    out = _with_threads(2, lambda: embedding_bags(weights, indices, offsets))
    torch.testing.assert_close(out, expected, **tolerance(torch.float32))


@native_only
@pytest.mark.parametrize("threads", [1, 2])
def test_out_of_range_in_specialised_loop_reports_the_first_position(threads):
    weights, indices, offsets, feature_table, _ = make_problem(
        (40, 60, 50), (16, 32, 64), None, 900, 3, torch.int64, torch.float32, seed=32,
    )
    # two bad ids, the later one in an earlier-claimed chunk's feature: the first is reported
    first = int(offsets[900 + 700]) if int(offsets[900 + 701]) > int(offsets[900 + 700]) else int(offsets[900 + 702])
    later = int(offsets[2 * 900 + 10]) + 0 if int(offsets[2 * 900 + 11]) > int(offsets[2 * 900 + 10]) else int(offsets[2 * 900 + 12])
    for bad in (60, -1, 2**32 + 1):
        broken = indices.clone()
        broken[first] = bad
        broken[later] = 10**6
        with pytest.raises(IndexError, match=rf"feature 1: index {bad} at position {first}\b"):
            _with_threads(threads, lambda: embedding_bags(weights, broken, offsets, feature_table))
