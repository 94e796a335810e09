"""`ensemble_topk`: the cases of issue 4 item 3 on every path, the native kernel against the
reference on random inputs, reciprocal rank fusion against plain Python, opcheck."""

from __future__ import annotations

import math
import zlib

import pytest
import torch

import mtkernels
from mtkernels import reference
from mtkernels._extension import has_kernel
from mtkernels.ops.ensemble_topk import TRANSFORM_CODES

NATIVE = has_kernel("ensemble_topk", "cpu")
needs_native = pytest.mark.skipif(not NATIVE, reason="native ensemble_topk kernel not built")

# Every path that must honour the contract: the reference (spec and fallback) and the public op
# (native kernel when built).
IMPLS = {"reference": reference.ensemble_topk, "ops": mtkernels.ops.ensemble_topk}


@pytest.fixture(params=list(IMPLS))
def topk(request):
    return IMPLS[request.param]


def csr(rows):
    """CSR exclusion lists (offsets, indices) from a list of per-row item lists."""
    offsets = [0]
    for r in rows:
        offsets.append(offsets[-1] + len(r))
    flat = [i for r in rows for i in r]
    return torch.tensor(offsets, dtype=torch.int64), torch.tensor(flat, dtype=torch.int64)


# ---- the cases of issue 4 item 3 -------------------------------------------------------------


class TestContract:
    def test_ties_smaller_index_first(self, topk):
        values, indices = topk(torch.tensor([[[5.0, 7.0, 7.0, 3.0, 9.0]]]), [1.0], 3)
        assert indices.tolist() == [[4, 1, 2]]
        assert values.tolist() == [[9.0, 7.0, 7.0]]
        assert values.dtype == torch.float32 and indices.dtype == torch.int64

    def test_many_ties(self, topk):
        x = torch.tensor([[[1.0, 2.0, 2.0, 2.0, 1.0, 2.0, 0.0]]])
        values, indices = topk(x, [1.0], 6)
        assert indices.tolist() == [[1, 2, 3, 5, 0, 4]]
        assert values.tolist() == [[2.0, 2.0, 2.0, 2.0, 1.0, 1.0]]

    def test_k_zero(self, topk):
        values, indices = topk(torch.randn(2, 3, 10), [1.0, 2.0], 0)
        assert values.shape == (3, 0) and indices.shape == (3, 0)
        assert values.dtype == torch.float32 and indices.dtype == torch.int64

    def test_k_negative(self, topk):
        with pytest.raises(ValueError, match="k must be >= 0"):
            topk(torch.randn(1, 3, 10), [1.0], -1)

    def test_k_not_int(self, topk):
        with pytest.raises(TypeError, match="k must be an integer"):
            topk(torch.randn(1, 3, 10), [1.0], 2.5)

    def test_k_greater_than_items_left(self, topk):
        x = torch.tensor([[[0.5, 0.1, 0.9, 0.3]]])
        offsets, excluded = csr([[2]])
        values, indices = topk(x, [1.0], 6, exclude_offsets=offsets, exclude_indices=excluded)
        assert indices.tolist() == [[0, 3, 1, -1, -1, -1]]
        assert values[0, :3].tolist() == pytest.approx([0.5, 0.3, 0.1])
        assert values[0, 3:].tolist() == [-math.inf] * 3

    def test_excluded_never_returned_even_when_best(self, topk):
        torch.manual_seed(0)
        x = torch.rand(1, 3, 50)
        x[0, 0, 7] = 100.0  # the best item of row 0 ...
        x[0, 2, 11] = 100.0  # ... and of row 2
        offsets, excluded = csr([[7, 3], [], [11, 11, 0]])  # duplicates allowed
        values, indices = topk(x, [1.0], 50, exclude_offsets=offsets, exclude_indices=excluded)
        assert 7 not in indices[0].tolist() and 3 not in indices[0].tolist()
        assert 11 not in indices[2].tolist() and 0 not in indices[2].tolist()
        assert indices[1].tolist() == torch.argsort(x[0, 1], descending=True, stable=True).tolist()
        assert indices[0, -2:].tolist() == [-1, -1] and indices[2, -2:].tolist() == [-1, -1]
        assert sorted(indices[0, :-2].tolist()) == sorted(set(range(50)) - {7, 3})

    def test_row_all_excluded(self, topk):
        x = torch.randn(2, 2, 4)
        offsets, excluded = csr([[0, 1, 2, 3], [1]])
        values, indices = topk(x, [1.0, 1.0], 3, exclude_offsets=offsets.int(), exclude_indices=excluded.int())
        assert indices[0].tolist() == [-1, -1, -1]
        assert values[0].tolist() == [-math.inf] * 3
        assert 1 not in indices[1].tolist() and -1 not in indices[1].tolist()

    def test_zero_weight_source_with_minus_inf(self, topk):
        a = torch.tensor([[0.1, 0.4, 0.3]])
        b = torch.tensor([[-math.inf, -math.inf, 2.0]])
        c = torch.tensor([[math.nan, 1.0, math.inf]])
        values, indices = topk([a, b, c], [1.0, 0.0, 0.0], 3, transforms=["identity", "sigmoid", "log_sigmoid"])
        assert indices.tolist() == [[1, 2, 0]]
        assert not torch.isnan(values).any()
        torch.testing.assert_close(values, torch.tensor([[0.4, 0.3, 0.1]]))

    def test_nan_never_returned(self, topk):
        x = torch.tensor([[[math.nan, 1.0, math.nan, 0.5, -math.inf]], [[0.0, math.nan, 0.0, 0.0, 0.0]]])
        values, indices = topk(x, [1.0, 1.0], 5)
        assert indices.tolist() == [[3, 4, -1, -1, -1]]
        assert values[0, 0].item() == 0.5
        assert values[0, 1:].tolist() == [-math.inf] * 4
        assert not torch.isnan(values).any()

    def test_nan_from_inf_minus_inf_never_returned(self, topk):
        a = torch.tensor([[math.inf, 1.0]])
        b = torch.tensor([[-math.inf, 1.0]])
        values, indices = topk([a, b], [1.0, 1.0], 2)
        assert indices.tolist() == [[1, -1]]

    def test_minus_inf_items_are_returned(self, topk):
        x = torch.tensor([[[-math.inf, 2.0, -math.inf]]])
        values, indices = topk(x, [1.0], 4)
        assert indices.tolist() == [[1, 0, 2, -1]]
        assert values.tolist() == [[2.0, -math.inf, -math.inf, -math.inf]]

    @pytest.mark.parametrize("k", [0, 3])
    def test_empty_batch(self, topk, k):
        values, indices = topk(torch.empty(2, 0, 5), [1.0, 1.0], k)
        assert values.shape == (0, k) and indices.shape == (0, k)

    def test_empty_batch_with_exclusions(self, topk):
        offsets, excluded = csr([])
        values, indices = topk(torch.empty(1, 0, 5), [1.0], 2, exclude_offsets=offsets, exclude_indices=excluded)
        assert values.shape == (0, 2)

    def test_no_items(self, topk):
        values, indices = topk(torch.empty(1, 2, 0), [1.0], 2)
        assert indices.tolist() == [[-1, -1], [-1, -1]]

    def test_mismatched_source_shapes(self, topk):
        with pytest.raises(ValueError, match="same shape"):
            topk([torch.randn(2, 5), torch.randn(2, 6)], [1.0, 1.0], 2)

    @pytest.mark.parametrize("weights", [[1.0], [1.0, 1.0, 1.0], torch.ones(3)])
    def test_weight_count(self, topk, weights):
        with pytest.raises(ValueError, match="weights must have one entry per source"):
            topk(torch.randn(2, 3, 5), weights, 2)

    def test_offsets_not_non_decreasing(self, topk):
        offsets = torch.tensor([0, 2, 1, 3])
        with pytest.raises(ValueError, match="non-decreasing"):
            topk(torch.randn(1, 3, 5), [1.0], 2, exclude_offsets=offsets, exclude_indices=torch.tensor([0, 1, 2]))

    @pytest.mark.parametrize("bad", [-1, 5])
    def test_exclude_indices_out_of_range(self, topk, bad):
        offsets, excluded = csr([[0], [bad]])
        with pytest.raises(ValueError, match=r"exclude_indices must lie in \[0, N=5\)"):
            topk(torch.randn(1, 2, 5), [1.0], 2, exclude_offsets=offsets, exclude_indices=excluded)


class TestBadInput:
    def test_offsets_length(self, topk):
        with pytest.raises(ValueError, match="B\\+1=3 entries"):
            topk(torch.randn(1, 2, 5), [1.0], 2, exclude_offsets=torch.tensor([0, 1]), exclude_indices=torch.tensor([1]))

    def test_offsets_ends(self, topk):
        with pytest.raises(ValueError, match="start at 0 and end at len"):
            topk(torch.randn(1, 2, 5), [1.0], 2, exclude_offsets=torch.tensor([0, 1, 3]), exclude_indices=torch.tensor([1, 2]))

    def test_only_one_exclusion_tensor(self, topk):
        with pytest.raises(ValueError, match="together"):
            topk(torch.randn(1, 2, 5), [1.0], 2, exclude_offsets=torch.tensor([0, 0, 0]))

    def test_exclusion_dtype(self, topk):
        with pytest.raises(TypeError, match="exclude_indices must be an int32 or int64"):
            topk(torch.randn(1, 2, 5), [1.0], 2, exclude_offsets=torch.tensor([0, 0, 1]), exclude_indices=torch.tensor([1.0]))

    def test_scores_dtype(self, topk):
        with pytest.raises(TypeError, match=r"scores\[0\] must be float32"):
            topk(torch.ones(1, 2, 5, dtype=torch.int64), [1.0], 2)

    def test_scores_rank(self, topk):
        with pytest.raises(ValueError, match=r"\[S, B, N\]"):
            topk(torch.randn(2, 5), [1.0], 2)

    def test_no_source(self, topk):
        with pytest.raises(ValueError, match="at least one source"):
            topk([], [], 2)

    def test_unknown_transform(self, topk):
        with pytest.raises(ValueError, match=r"transforms\[1\] must be one of"):
            topk(torch.randn(2, 2, 5), [1.0, 1.0], 2, transforms=["sigmoid", "tanh"])

    def test_transform_count(self, topk):
        with pytest.raises(ValueError, match="transforms must have one entry per source"):
            topk(torch.randn(2, 2, 5), [1.0, 1.0], 2, transforms=["sigmoid"])

    def test_unknown_mode(self, topk):
        with pytest.raises(ValueError, match="mode must be one of"):
            topk(torch.randn(1, 2, 5), [1.0], 2, mode="borda")

    def test_non_finite_weight(self, topk):
        with pytest.raises(ValueError, match="weights must be finite"):
            topk(torch.randn(2, 2, 5), [1.0, math.nan], 2)

    def test_negative_rrf_c(self, topk):
        with pytest.raises(ValueError, match="rrf_c"):
            topk(torch.randn(1, 2, 5), [1.0], 2, mode="rrf", rrf_c=-1.0)


# ---- semantics ---------------------------------------------------------------------------------


def test_weighted_fusion_matches_formula(topk):
    torch.manual_seed(1)
    x = torch.randn(3, 4, 30)
    w = [0.5, -1.5, 2.0]
    values, indices = topk(x, torch.tensor(w), 30, transforms=["sigmoid", "identity", "log_sigmoid"])
    fused = w[0] * torch.sigmoid(x[0]) + w[1] * x[1] + w[2] * torch.nn.functional.logsigmoid(x[2])
    expected = torch.sort(fused, dim=1, descending=True)
    torch.testing.assert_close(values, expected.values)
    torch.testing.assert_close(values, fused.gather(1, indices))


def plain_python_rrf(rows_per_source, weights, c, k):
    """RRF of one row, straight from the definition (no torch)."""
    num_items = len(rows_per_source[0])
    fused = [0.0] * num_items
    for row, w in zip(rows_per_source, weights):
        ranked = sorted(range(num_items), key=lambda n: (-row[n], n))
        for position, n in enumerate(ranked):
            fused[n] += w / (c + position + 1)
    order = sorted(range(num_items), key=lambda n: (-fused[n], n))[:k]
    return [fused[n] for n in order], order


@pytest.mark.parametrize("seed", range(4))
def test_rrf_against_plain_python(topk, seed):
    gen = torch.Generator().manual_seed(seed)
    num_sources, batch_size, num_items = 3, 4, 12
    # few distinct values, so that ties inside a source are common
    x = torch.randint(0, 5, (num_sources, batch_size, num_items), generator=gen).float()
    weights = [1.0, 0.5, 2.0]
    values, indices = topk(x, weights, 8, mode="rrf", rrf_c=10.0)
    for b in range(batch_size):
        want_values, want_indices = plain_python_rrf([x[s, b].tolist() for s in range(num_sources)], weights, 10.0, 8)
        assert values[b].tolist() == pytest.approx(want_values, rel=1e-6)
        # indices equal wherever the fused values are distinct
        for j in range(8):
            if (j == 0 or want_values[j] != want_values[j - 1]) and (j == 7 or want_values[j] != want_values[j + 1]):
                assert indices[b, j].item() == want_indices[j]


def test_rrf_ignores_transforms_and_zero_weights(topk):
    torch.manual_seed(2)
    x = torch.randn(3, 5, 40)
    x[1, 0, 3] = -math.inf
    a = topk(x, [1.0, 0.0, 2.0], 10, transforms=["sigmoid", "sigmoid", "log_sigmoid"], mode="rrf")
    b = topk(x[[0, 2]], [1.0, 2.0], 10, mode="rrf")
    torch.testing.assert_close(a, b)


def test_rrf_nan_ranked_last_and_never_returned(topk):
    x = torch.tensor([[[math.nan, 3.0, 1.0, 2.0]], [[1.0, 1.0, 1.0, 1.0]]])
    values, indices = topk(x, [1.0, 1.0], 4, mode="rrf", rrf_c=0.0)
    # source 0 ranks: item1 1, item3 2, item2 3; source 1 ranks by index: item0 1, item1 2, ...
    assert indices.tolist() == [[1, 3, 2, -1]]
    torch.testing.assert_close(values[0, :3], torch.tensor([1 / 1 + 1 / 2, 1 / 2 + 1 / 4, 1 / 3 + 1 / 3]))


# ---- the native kernel against the reference ---------------------------------------------------

TRANSFORM_NAMES = list(TRANSFORM_CODES)


def random_case(gen, num_sources, batch_size, num_items, exclusions):
    """Random scores, weights (some zero), transforms and exclusion lists (with duplicates)."""
    x = torch.randn(num_sources, batch_size, num_items, generator=gen) * 3
    weights = (torch.rand(num_sources, generator=gen) * 4 - 2).tolist()
    if num_sources > 1:
        weights[int(torch.randint(0, num_sources, (1,), generator=gen))] = 0.0
    transforms = [TRANSFORM_NAMES[int(i)] for i in torch.randint(0, 3, (num_sources,), generator=gen)]
    if not exclusions:
        return x, weights, transforms, None, None
    lengths = torch.randint(0, max(1, num_items // 2), (batch_size,), generator=gen)
    offsets = torch.zeros(batch_size + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths, 0)
    indices = torch.randint(0, max(1, num_items), (int(offsets[-1]),), generator=gen)
    return x, weights, transforms, offsets, indices


def assert_same_topk(got, want, fused_tol=2e-6):
    """Values equal to tolerance; indices equal where the reference values are distinct (farther
    apart than the tolerance from both neighbours); -1 exactly where the reference has -1."""
    (values, indices), (ref_values, ref_indices) = got, want
    assert values.dtype == torch.float32 and indices.dtype == torch.int64
    assert values.shape == ref_values.shape and indices.shape == ref_indices.shape
    torch.testing.assert_close(values, ref_values, rtol=fused_tol, atol=fused_tol)
    assert torch.equal(indices == -1, ref_indices == -1)
    if ref_values.shape[1] == 0:
        return
    tol = 4 * fused_tol * (1 + ref_values.abs().nan_to_num(posinf=0, neginf=0))
    gap_before = torch.full_like(ref_values, math.inf)
    gap_before[:, 1:] = ref_values[:, :-1] - ref_values[:, 1:]
    gap_after = torch.full_like(ref_values, math.inf)
    gap_after[:, :-1] = ref_values[:, :-1] - ref_values[:, 1:]
    distinct = (gap_before.nan_to_num(nan=0) > tol) & (gap_after.nan_to_num(nan=0) > tol) & (ref_indices >= 0)
    assert torch.equal(indices[distinct], ref_indices[distinct])


SHAPES = [  # (S, B, N, k)
    (1, 4, 1, 1),
    (2, 3, 17, 5),
    (3, 8, 300, 10),
    (3, 5, 5000, 100),  # several chunks
    (4, 3, 2100, 1000),  # k near N, buffer compaction
    (2, 70, 64, 300),  # k > N, many rows
    (5, 2, 4097, 64),
]


@needs_native
@pytest.mark.parametrize("mode", ["weighted", "rrf"])
@pytest.mark.parametrize("exclusions", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_native_matches_reference(shape, exclusions, mode):
    num_sources, batch_size, num_items, k = shape
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, exclusions, mode)).encode()))
    x, weights, transforms, offsets, indices = random_case(gen, num_sources, batch_size, num_items, exclusions)
    args = (weights, k, transforms, offsets, indices, mode)
    got = mtkernels.ops.ensemble_topk(x, *args)
    want = reference.ensemble_topk(x, *args)
    assert_same_topk(got, want)
    if exclusions:
        for b in range(batch_size):
            seen = set(indices[offsets[b] : offsets[b + 1]].tolist())
            assert not seen & set(got[1][b].tolist())


@needs_native
@pytest.mark.parametrize("mode", ["weighted", "rrf"])
def test_native_ties_exact(mode):
    """Small integer scores: fused values are exact in float32, so every index must match."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(-3, 4, (3, 8, 3000), generator=gen).float()
    x[0, 2, ::7] = math.nan
    x[1, 3, ::5] = -math.inf
    offsets = torch.arange(0, 8 * 40 + 1, 40)
    excluded = torch.randint(0, 3000, (8 * 40,), generator=gen)
    for k in (1, 10, 1000, 3100):
        got = mtkernels.ops.ensemble_topk(x, [1.0, 2.0, 0.5], k, None, offsets, excluded, mode)
        want = reference.ensemble_topk(x, [1.0, 2.0, 0.5], k, None, offsets, excluded, mode)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@needs_native
@pytest.mark.parametrize("signs", [(1, 1, 1), (1, -1, 1), (-1, -1, -1), (1, 1, -1)])
@pytest.mark.parametrize("k", [1, 100])
def test_native_pruning_is_exact(signs, k):
    """Past the first chunk the kernel skips items by a bound: every transform, both weight signs,
    long rows (many chunks), exclusions, extreme values; always the reference's answer."""
    gen = torch.Generator().manual_seed(zlib.crc32(repr((signs, k)).encode()))
    x = torch.randn(4, 6, 5000, generator=gen) * 3
    x[0, 0, 3000:3010] = math.inf
    x[1, 1, 4000:4003] = -math.inf
    x[2, 2, ::13] = math.nan
    x[3, 3, 4000] = 1e30
    weights = [signs[0] * 0.7, signs[1] * 1.1, signs[2] * 0.4, 0.2]
    offsets = torch.arange(0, 6 * 50 + 1, 50)
    excluded = torch.randint(0, 5000, (300,), generator=gen)
    for transforms in (
        ["sigmoid", "sigmoid", "identity", "log_sigmoid"],
        ["log_sigmoid", "sigmoid", "log_sigmoid", "sigmoid"],
        ["sigmoid"] * 4,
    ):
        args = (weights, k, transforms, offsets, excluded)
        assert_same_topk(mtkernels.ops.ensemble_topk(x, *args), reference.ensemble_topk(x, *args))


@needs_native
def test_native_pruning_ties_at_the_bound():
    """sigmoid(0) = 1/2 sits exactly on its bound; integer identity scores make fused values tie
    exactly across thousands of items: the order must still be value, then index."""
    gen = torch.Generator().manual_seed(7)
    zeros = torch.zeros(5, 20000)
    ints = torch.randint(0, 6, (5, 20000), generator=gen).float()
    for k in (1, 10, 100, 3000):
        args = ([1.0, 1.0], k, ["sigmoid", "identity"])
        got = mtkernels.ops.ensemble_topk([zeros, ints], *args)
        want = reference.ensemble_topk([zeros, ints], *args)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("mode", ["weighted", "rrf"])
def test_native_low_and_double_precision(dtype, mode):
    gen = torch.Generator().manual_seed(4)
    x = (torch.randn(3, 6, 1000, generator=gen) * 4).to(dtype)
    args = ([0.7, 1.3, -0.4], 50, ["sigmoid", "identity", "log_sigmoid"], None, None, mode)
    got = mtkernels.ops.ensemble_topk(x, *args)
    # read in float32: the reference on the float32 copy is the exact target
    assert_same_topk(got, reference.ensemble_topk(x.float(), *args))
    assert_same_topk(got, reference.ensemble_topk(x, *args))


@needs_native
def test_native_mixed_dtypes_and_strided_sources():
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(7, 500, generator=gen)
    b = torch.randn(500, 7, generator=gen).t()  # item stride 7
    c = torch.randn(7, 600, generator=gen)[:, 50:550].to(torch.bfloat16)  # row stride 600
    args = ([1.0, 0.5, 2.0], 20, ["sigmoid", "identity", "sigmoid"])
    assert_same_topk(mtkernels.ops.ensemble_topk([a, b, c], *args), reference.ensemble_topk([a, b, c], *args))


@needs_native
def test_native_extreme_values():
    x = torch.tensor([[[math.inf, -math.inf, 0.0, -0.0, 1e30, -1e30, 100.0, -100.0, math.nan, 3.0]]]).expand(3, 1, 10)
    for transforms in (["sigmoid"] * 3, ["log_sigmoid"] * 3, ["identity", "sigmoid", "log_sigmoid"]):
        got = mtkernels.ops.ensemble_topk(x, [1.0, 1.0, 1.0], 10, transforms)
        want = reference.ensemble_topk(x, [1.0, 1.0, 1.0], 10, transforms)
        assert torch.equal(got[1] == -1, want[1] == -1)
        assert 8 not in got[1].tolist()[0]
        torch.testing.assert_close(got[0], want[0], rtol=2e-6, atol=1e-6)


@needs_native
def test_native_transforms_accuracy():
    """The fast sigmoid / log-sigmoid against torch over a wide range (one source, k = N)."""
    x = torch.linspace(-90, 90, 20001).reshape(1, 1, -1)
    for name, fn in (("sigmoid", torch.sigmoid), ("log_sigmoid", torch.nn.functional.logsigmoid)):
        values, indices = mtkernels.ops.ensemble_topk(x, [1.0], x.shape[-1], [name])
        expected = fn(x[0, 0])[indices[0]]
        torch.testing.assert_close(values[0], expected, rtol=1e-6, atol=1e-7)


@needs_native
def test_native_bad_input_raises_from_cpp():
    """Called directly (no Python checks in front), the kernel rejects bad input itself."""
    op = torch.ops.mtkernels.ensemble_topk.default
    x = [torch.randn(2, 5)]
    with pytest.raises(ValueError, match="k must be >= 0"):
        op(x, [1.0], -1, [0], None, None, "weighted", 60.0)
    with pytest.raises(ValueError, match="weights must have one entry per source"):
        op(x, [1.0, 2.0], 1, [0], None, None, "weighted", 60.0)
    with pytest.raises(ValueError, match="transforms"):
        op(x, [1.0], 1, [7], None, None, "weighted", 60.0)
    with pytest.raises(ValueError, match="same shape"):
        op([x[0], torch.randn(2, 6)], [1.0, 1.0], 1, [0, 0], None, None, "weighted", 60.0)
    with pytest.raises(TypeError, match="same dtype"):
        op([x[0], x[0].double()], [1.0, 1.0], 1, [0, 0], None, None, "weighted", 60.0)
    with pytest.raises(ValueError, match="mode"):
        op(x, [1.0], 1, [0], None, None, "sum", 60.0)
    with pytest.raises(ValueError, match="non-decreasing"):
        op(x, [1.0], 1, [0], torch.tensor([0, 2, 1]), torch.tensor([0]), "weighted", 60.0)
    with pytest.raises(ValueError, match="exclude_indices must lie in"):
        op(x, [1.0], 1, [0], torch.tensor([0, 1, 1]), torch.tensor([5]), "weighted", 60.0)
    with pytest.raises(ValueError, match="B\\+1=3 entries"):
        op(x, [1.0], 1, [0], torch.tensor([0, 1]), torch.tensor([4]), "weighted", 60.0)
    with pytest.raises(ValueError, match="together"):
        op(x, [1.0], 1, [0], torch.tensor([0, 1, 1]), None, "weighted", 60.0)


def test_no_autograd_through_the_op():
    x = torch.randn(2, 3, 20, requires_grad=True)
    values, indices = mtkernels.ops.ensemble_topk(x, [1.0, 1.0], 5)
    assert not values.requires_grad and not indices.requires_grad


@needs_native
@pytest.mark.parametrize("with_exclusions", [False, True])
def test_opcheck(with_exclusions):
    gen = torch.Generator().manual_seed(6)
    x = list(torch.randn(3, 4, 50, generator=gen).unbind(0))
    offsets, excluded = (csr([[1, 2], [], [49], [0, 0, 3]]) if with_exclusions else (None, None))
    for mode in ("weighted", "rrf"):
        torch.library.opcheck(
            torch.ops.mtkernels.ensemble_topk.default,
            (x, [1.0, 0.0, -2.0], 7, [1, 0, 2], offsets, excluded, mode, 60.0),
        )


@needs_native
def test_fake_kernel_under_compile():
    def pipeline(a, b):
        return torch.ops.mtkernels.ensemble_topk.default([a, b], [1.0, 0.5], 4, [1, 0], None, None, "weighted", 60.0)

    compiled = torch.compile(pipeline, backend="aot_eager", fullgraph=True)
    a, b = torch.randn(3, 40), torch.randn(3, 40)
    got = compiled(a, b)
    torch.testing.assert_close(got, pipeline(a, b))
