"""The training-path ops `relu_dropout`, `gated_mixture` and `expert_gate_mixture`: native kernels against the pure-PyTorch
reference (shapes, dtypes, empty and strided inputs), their backward against autograd through the
reference, gradcheck, opcheck, bad input, and the dropout's statistics."""

from __future__ import annotations

import pytest
import torch

from mtkernels import ops, reference
from mtkernels._extension import has_kernel
from mtkernels.reference.relu_dropout import dropout_scale, dropout_threshold, keep_mask

native_only = pytest.mark.skipif(not has_kernel("relu_dropout") or not has_kernel("gated_mixture"),
                                 reason="native training ops not built")
DTYPES = [torch.float32, torch.float64]
egm_native_only = pytest.mark.skipif(not has_kernel("expert_gate_mixture"), reason="native expert_gate_mixture not built")


# --- relu_dropout ------------------------------------------------------------------------------

@native_only
@pytest.mark.parametrize("shape", [(0, 5), (1, 1), (37, 64), (3, 2048, 32), (7,)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
def test_relu_dropout_native_equals_reference(shape, dtype, p):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype)
    seed = 123456789123 if p != 0.5 else 2**62 + 5
    got = torch.ops.mtkernels.relu_dropout.default(x, p, seed)
    want = reference.relu_dropout(x, p, seed)
    assert got.shape == x.shape and got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@native_only
@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_dropout_keeps_nan_like_the_reference(dtype):
    # A kept NaN stays NaN (torch.relu's rule); a dropped one is 0, as in the reference. The native
    # ReLU used to turn every NaN into 0, hiding a diverged layer.
    torch.manual_seed(1)
    x = torch.randn(9, 40, dtype=dtype)
    x[::2, ::3] = float("nan")
    got = torch.ops.mtkernels.relu_dropout.default(x, 0.3, 77)
    want = reference.relu_dropout(x, 0.3, 77)
    assert bool(torch.isnan(want).any()) and bool((torch.isnan(x) & (want == 0)).any())  # both cases occur
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@egm_native_only
def test_expert_gate_mixture_keeps_nan_like_the_reference():
    torch.manual_seed(2)
    z = _gemm_output(6, 4, 3, 8, torch.float32)
    z[1, 5] = float("nan")  # an expert unit of row 1
    got = ops.expert_gate_mixture(z, 4, 3, 0.0, seed=3)
    want = reference.expert_gate_mixture(z, 4, 3, 0.0, 3)
    for g, w in zip(got, want):
        assert torch.equal(torch.isnan(g), torch.isnan(w))
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert bool(torch.isnan(got[0][1]).any()) and not bool(torch.isnan(got[0][[0, 2, 3, 4, 5]]).any())


@native_only
def test_relu_dropout_reads_a_strided_column_slice():
    torch.manual_seed(1)
    wide = torch.randn(50, 70)
    part = wide[:, 5:45]
    got = ops.relu_dropout(part, 0.3, True, seed=99)
    torch.testing.assert_close(got, reference.relu_dropout(part.contiguous(), 0.3, 99), rtol=0, atol=0)
    transposed = torch.randn(20, 30).t()
    torch.testing.assert_close(ops.relu_dropout(transposed, 0.3, True, seed=7),
                               reference.relu_dropout(transposed.contiguous(), 0.3, 7), rtol=0, atol=0)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_relu_dropout_drops_p_and_keeps_the_mean(p):
    x = torch.full((400, 500), 2.0)
    y = ops.relu_dropout(x, p, True, seed=11)
    dropped = (y == 0).double().mean().item()
    assert abs(dropped - p) < 0.006  # 200,000 draws: the fraction's standard error is below 0.0012
    kept = y[y != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 2.0 * dropout_scale(p)))
    assert abs(y.mean().item() - 2.0) < 0.03  # inverted dropout: unbiased
    assert dropout_threshold(p) == round(p * 2**32)


def test_relu_dropout_masks_are_independent_across_seeds_and_positions():
    a = keep_mask((1000, 100), 1, 0.5)
    b = keep_mask((1000, 100), 2, 0.5)
    agree = (a == b).double().mean().item()
    assert abs(agree - 0.5) < 0.01  # two seeds: independent masks
    rows = a.double()
    correlation = torch.corrcoef(torch.stack([rows[:, :-1].flatten(), rows[:, 1:].flatten()]))[0, 1].item()
    assert abs(correlation) < 0.02  # neighbouring elements: uncorrelated


def test_relu_dropout_off_training_or_at_zero_is_relu_and_is_seeded():
    x = torch.randn(10, 7)
    torch.testing.assert_close(ops.relu_dropout(x, 0.3, False), torch.relu(x))
    torch.testing.assert_close(ops.relu_dropout(x, 0.0, True), torch.relu(x))
    torch.manual_seed(5)
    a = ops.relu_dropout(x, 0.3, True)
    torch.manual_seed(5)
    b = ops.relu_dropout(x, 0.3, True)
    assert torch.equal(a, b)
    assert not torch.equal(a, ops.relu_dropout(x, 0.3, True))  # a fresh seed per call
    with pytest.raises(ValueError, match="p must be in"):
        ops.relu_dropout(x, 1.0, True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_dropout_gradient_is_the_mask_times_the_scale(dtype):
    torch.manual_seed(2)
    x = torch.randn(64, 33, dtype=dtype, requires_grad=True)
    y = ops.relu_dropout(x, 0.25, True, seed=3)
    upstream = torch.randn_like(y)
    (grad,) = torch.autograd.grad((y * upstream).sum(), x)
    keep = keep_mask(x.shape, 3, 0.25) & (x.detach() > 0)
    torch.testing.assert_close(grad, torch.where(keep, upstream * dropout_scale(0.25), torch.zeros_like(upstream)))


@native_only
def test_relu_dropout_gradcheck_and_opcheck():
    torch.manual_seed(4)
    x = torch.randn(9, 6, dtype=torch.float64)
    x = torch.where(x.abs() < 0.05, torch.full_like(x, 0.5), x).requires_grad_()  # away from ReLU's kink
    assert torch.autograd.gradcheck(lambda v: ops.relu_dropout(v, 0.4, True, seed=8), (x,))
    for args in [(torch.randn(5, 4), 0.2, 1), (torch.randn(5, 4, requires_grad=True), 0.2, 1), (torch.randn(0, 3), 0.5, 2)]:
        torch.library.opcheck(torch.ops.mtkernels.relu_dropout.default, args)
    y = torch.relu(torch.randn(6, 3))
    torch.library.opcheck(torch.ops.mtkernels.relu_dropout_backward.default, (torch.randn(6, 3), y, 0.2))


@native_only
def test_relu_dropout_bad_input():
    with pytest.raises(TypeError, match="x must be a float32 or float64"):
        torch.ops.mtkernels.relu_dropout.default(torch.ones(3, dtype=torch.int32), 0.1, 0)
    with pytest.raises(ValueError, match="p must be in"):
        torch.ops.mtkernels.relu_dropout.default(torch.ones(3), -0.1, 0)
    with pytest.raises(ValueError, match="grad_output must have the shape of result"):
        torch.ops.mtkernels.relu_dropout_backward.default(torch.ones(3), torch.ones(4), 0.1)


# --- gated_mixture -----------------------------------------------------------------------------

def _logits(batch, tasks, experts, dtype, blocked=()):
    logits = torch.randn(batch, tasks, experts, dtype=dtype) * 2
    for t, e in blocked:  # PLE: an expert the gate may not use
        logits[:, t, e] = -torch.inf
    return logits


CASES = [(0, 3, 4, 8, ()), (1, 1, 1, 5, ()), (37, 3, 4, 64, ()), (64, 4, 5, 16, ((0, 3), (0, 4), (1, 2), (1, 4))),
         (200, 2, 3, 7, ((1, 0),))]


@native_only
@pytest.mark.parametrize("batch, tasks, experts, width, blocked", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_mixture_native_equals_reference_forward_and_backward(batch, tasks, experts, width, blocked, dtype):
    torch.manual_seed(batch + width)
    logits = _logits(batch, tasks, experts, dtype, blocked).requires_grad_()
    outputs = torch.randn(batch, experts, width, dtype=dtype, requires_grad=True)
    mixed, weights = ops.gated_mixture(logits, outputs)
    want_mixed, want_weights = reference.gated_mixture(logits, outputs)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {}
    torch.testing.assert_close(mixed, want_mixed, **tol)
    torch.testing.assert_close(weights, want_weights, **tol)
    for (t, e) in blocked:
        assert bool((weights[:, t, e] == 0).all())
    up_mixed, up_weights = torch.randn_like(mixed), torch.randn_like(weights)
    for use_weights in (False, True):
        loss = (mixed * up_mixed).sum() + ((weights * up_weights).sum() if use_weights else 0)
        want = (want_mixed * up_mixed).sum() + ((want_weights * up_weights).sum() if use_weights else 0)
        got_grads = torch.autograd.grad(loss, (logits, outputs), retain_graph=True)
        want_grads = torch.autograd.grad(want, (logits, outputs), retain_graph=True)
        for g, w in zip(got_grads, want_grads):
            torch.testing.assert_close(g, torch.nan_to_num(w), **tol)
            assert bool(torch.isfinite(g).all())


@native_only
def test_gated_mixture_reads_strided_logits_from_a_wider_gemm_output():
    torch.manual_seed(3)
    z = torch.randn(33, 4 * 6 + 3 * 4)
    outputs = z[:, :24].relu().reshape(33, 4, 6)
    logits = z[:, 24:].view(33, 3, 4)
    assert not logits.is_contiguous()
    mixed, weights = ops.gated_mixture(logits, outputs)
    want_mixed, want_weights = reference.gated_mixture(logits.contiguous(), outputs)
    torch.testing.assert_close(mixed, want_mixed)
    torch.testing.assert_close(weights, want_weights)


@native_only
def test_gated_mixture_gradcheck_and_opcheck():
    torch.manual_seed(6)
    logits = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    outputs = torch.randn(5, 4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ops.gated_mixture(a, b), (logits, outputs))
    assert torch.autograd.gradcheck(lambda a, b: ops.gated_mixture(a, b)[1], (logits, outputs))
    for requires_grad in (False, True):
        args = (torch.randn(7, 2, 3, requires_grad=requires_grad), torch.randn(7, 3, 5, requires_grad=requires_grad))
        torch.library.opcheck(torch.ops.mtkernels.gated_mixture.default, args)
    torch.library.opcheck(torch.ops.mtkernels.gated_mixture.default, (torch.randn(0, 2, 3), torch.randn(0, 3, 5)))
    weights = torch.softmax(torch.randn(7, 2, 3), -1)
    torch.library.opcheck(torch.ops.mtkernels.gated_mixture_backward.default,
                          (torch.randn(7, 2, 5), None, weights, torch.randn(7, 3, 5)))


def test_gated_mixture_bad_input():
    with pytest.raises(ValueError, match="must agree on B and E"):
        ops.gated_mixture(torch.randn(4, 2, 3), torch.randn(4, 2, 5))
    with pytest.raises(ValueError, match=r"logits must be \[B, T, E\]"):
        ops.gated_mixture(torch.randn(4, 3), torch.randn(4, 3, 5))
    with pytest.raises(TypeError, match="one float dtype"):
        ops.gated_mixture(torch.randn(4, 2, 3), torch.randn(4, 3, 5, dtype=torch.float64))


@native_only
def test_gated_mixture_native_bad_input():
    with pytest.raises(ValueError, match="must agree on B and E"):
        torch.ops.mtkernels.gated_mixture.default(torch.randn(4, 2, 3), torch.randn(5, 3, 5))
    with pytest.raises(TypeError, match="logits must be a float32 or float64"):
        torch.ops.mtkernels.gated_mixture.default(torch.ones(4, 2, 3, dtype=torch.int64), torch.randn(4, 3, 5))
    with pytest.raises(ValueError, match="grad_mixed must be"):
        torch.ops.mtkernels.gated_mixture_backward.default(torch.randn(4, 2, 4), None, torch.randn(4, 2, 3),
                                                           torch.randn(4, 3, 5))


# --- expert_gate_mixture -----------------------------------------------------------------------

def _gemm_output(batch, experts, gates, width, dtype, blocked=(), pad=0):
    """A [B, E*H + G*E] GEMM output (rows strided when ``pad`` > 0), blocked (gate, expert) logits -inf."""
    z = torch.randn(batch, experts * width + gates * experts + pad, dtype=dtype) * 2
    for g, e in blocked:
        z[:, experts * width + g * experts + e] = -torch.inf
    return z[:, : experts * width + gates * experts]


# (batch, experts, gates, width, blocked): MMoE-like, PLE-like with blocked experts, E = 1, empty, ragged
EGM_CASES = [(0, 4, 3, 8, ()), (1, 1, 1, 5, ()), (37, 4, 3, 64, ()), (65, 4, 3, 16, ((0, 2), (0, 3), (1, 1), (1, 3), (2, 1), (2, 2))),
             (130, 3, 2, 7, ((1, 0),))]


@egm_native_only
@pytest.mark.parametrize("batch, experts, gates, width, blocked", EGM_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_expert_gate_mixture_native_equals_reference_forward_and_backward(batch, experts, gates, width, blocked,
                                                                          dtype, p):
    torch.manual_seed(batch + width + experts)
    z = _gemm_output(batch, experts, gates, width, dtype, blocked, pad=3).requires_grad_()
    got = ops.expert_gate_mixture(z, experts, gates, p, seed=11)
    want = reference.expert_gate_mixture(z, experts, gates, p, 11)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {}
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol)
    weights = got[2]
    for (g, e) in blocked:
        assert bool((weights[:, g, e] == 0).all())
    if batch * experts * width >= 100 and p > 0:  # some positive units dropped
        relu = z[:, : experts * width].detach().relu().reshape(batch, experts, width)
        assert bool(((got[1] == 0) & (relu > 0)).any())
    ups = [torch.randn_like(t) for t in got]
    for use in ((0,), (0, 1), (0, 2), (0, 1, 2)):  # the mixture, plus the hidden and weights outputs
        loss = sum((got[i] * ups[i]).sum() for i in use)
        ref_loss = sum((want[i] * ups[i]).sum() for i in use)
        (g,) = torch.autograd.grad(loss, z, retain_graph=True)
        (w,) = torch.autograd.grad(ref_loss, z, retain_graph=True)
        torch.testing.assert_close(g, torch.nan_to_num(w), **tol)
        assert bool(torch.isfinite(g).all())


@egm_native_only
def test_expert_gate_mixture_equals_relu_dropout_then_gated_mixture_bit_for_bit():
    """What the MMoE / PLE training path computed before the fused op, same seed: identical bits."""
    torch.manual_seed(8)
    z = _gemm_output(256, 4, 3, 64, torch.float32).requires_grad_()
    mixed, hidden, weights = ops.expert_gate_mixture(z, 4, 3, 0.1, seed=5)
    z2 = z.detach().clone().requires_grad_()
    experts, gates = z2.split([256, 12], dim=1)
    hidden2 = ops.relu_dropout(experts, 0.1, seed=5).view(256, 4, 64)
    mixed2, weights2 = ops.gated_mixture(gates.reshape(256, 3, 4), hidden2)
    assert torch.equal(hidden, hidden2) and torch.equal(weights, weights2) and torch.equal(mixed, mixed2)
    up = torch.randn_like(mixed)
    (mixed * up).sum().backward()
    (mixed2 * up).sum().backward()
    assert torch.equal(z.grad, z2.grad)


@egm_native_only
@pytest.mark.parametrize("batch, experts, gates, width, blocked", EGM_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_expert_gate_mixture_with_bias_native_equals_reference(batch, experts, gates, width, blocked, dtype):
    """The bias added inside the op, forward and the gradients of z and bias, against the reference
    (z + bias, then the same ops under autograd); -inf bias entries where a gate may not use an expert."""
    torch.manual_seed(batch + 3 * width)
    z = _gemm_output(batch, experts, gates, width, dtype, pad=2).requires_grad_()
    bias = torch.randn(z.shape[1], dtype=dtype)
    for g, e in blocked:
        bias[experts * width + g * experts + e] = -torch.inf
    bias.requires_grad_()
    got = ops.expert_gate_mixture(z, experts, gates, 0.3, seed=17, bias=bias)
    want = reference.expert_gate_mixture(z, experts, gates, 0.3, 17, bias)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {}
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol)
    ups = [torch.randn_like(t) for t in got]
    for use in ((0,), (0, 1, 2)):
        grads = torch.autograd.grad(sum((got[i] * ups[i]).sum() for i in use), (z, bias), retain_graph=True)
        ref = torch.autograd.grad(sum((want[i] * ups[i]).sum() for i in use), (z, bias), retain_graph=True)
        for g, w in zip(grads, ref):
            torch.testing.assert_close(g, torch.nan_to_num(w), **tol)
        # the bias gradient is the column sum of z's gradient (what F.linear's bias gradient is)
        torch.testing.assert_close(grads[1], grads[0].sum(0), **tol)
        if batch:
            assert bool(grads[1].abs().sum() > 0)


@egm_native_only
def test_expert_gate_mixture_backward_reads_a_transposed_grad_mixed():
    """The towers hand the mixture's gradient over as the transpose of a [G, B, H] tensor: read in
    place, the same result as a contiguous copy."""
    torch.manual_seed(13)
    _, hidden, weights = torch.ops.mtkernels.expert_gate_mixture.default(_gemm_output(70, 4, 3, 8, torch.float32),
                                                                         None, 4, 3, 0.1, 5)
    grad = torch.randn(3, 70, 8).transpose(0, 1)
    assert not grad.is_contiguous()
    backward = torch.ops.mtkernels.expert_gate_mixture_backward.default
    got = backward(grad, None, None, hidden, weights, 0.1, True)
    want = backward(grad.contiguous(), None, None, hidden, weights, 0.1, True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@egm_native_only
def test_expert_gate_mixture_bias_gradient_does_not_depend_on_the_thread_count():
    torch.manual_seed(12)
    z = _gemm_output(1000, 4, 3, 16, torch.float32).requires_grad_()
    bias = torch.randn(z.shape[1]).requires_grad_()
    up = torch.randn(1000, 3, 16)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            mixed = ops.expert_gate_mixture(z, 4, 3, 0.1, seed=2, bias=bias)[0]
            results.append(torch.autograd.grad((mixed * up).sum(), (z, bias)))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert torch.equal(other[0], results[0][0]) and torch.equal(other[1], results[0][1])


@egm_native_only
@pytest.mark.parametrize("dtype", DTYPES)
def test_expert_gate_mixture_bias_inside_equals_the_bias_in_the_gemm(dtype):
    """The training path's new layout (``F.linear(x, W)`` then the op adding the bias) against the
    old one (``F.linear(x, W, b)``, an addmm, then the op): same outputs and the same gradients of x,
    W and b (up to the rounding of where the bias is added)."""
    torch.manual_seed(21)
    experts, gates, width, dim = 4, 3, 32, 40
    x = torch.randn(300, dim, dtype=dtype, requires_grad=True)
    weight = (torch.randn(experts * width + gates * experts, dim, dtype=dtype) / dim ** 0.5).requires_grad_()
    bias = (torch.randn(experts * width + gates * experts, dtype=dtype) * 0.1).requires_grad_()
    new = ops.expert_gate_mixture(torch.nn.functional.linear(x, weight), experts, gates, 0.2, seed=8, bias=bias)
    old = ops.expert_gate_mixture(torch.nn.functional.linear(x, weight, bias), experts, gates, 0.2, seed=8)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {}
    for n, o in zip(new, old):
        torch.testing.assert_close(n, o, **tol)
    ups = [torch.randn_like(t) for t in new]
    g_new = torch.autograd.grad(sum((t * u).sum() for t, u in zip(new, ups)), (x, weight, bias))
    g_old = torch.autograd.grad(sum((t * u).sum() for t, u in zip(old, ups)), (x, weight, bias))
    for n, o in zip(g_new, g_old):
        torch.testing.assert_close(n, o, **tol)
        assert bool(o.abs().sum() > 0)


@egm_native_only
def test_expert_gate_mixture_off_training_is_relu_and_draws_the_seed_like_relu_dropout():
    z = _gemm_output(9, 2, 2, 5, torch.float32)
    _, hidden, _ = ops.expert_gate_mixture(z, 2, 2, 0.5, training=False)
    torch.testing.assert_close(hidden, z[:, :10].relu().reshape(9, 2, 5))
    torch.manual_seed(4)
    first = ops.expert_gate_mixture(z, 2, 2, 0.5)[1]
    torch.manual_seed(4)
    torch.testing.assert_close(first, ops.relu_dropout(z[:, :10], 0.5).reshape(9, 2, 5))


@egm_native_only
def test_expert_gate_mixture_gradcheck_and_opcheck():
    torch.manual_seed(6)
    z = _gemm_output(5, 3, 2, 4, torch.float64, blocked=((1, 0),)).requires_grad_()
    bias = torch.randn(z.shape[1], dtype=torch.float64)
    bias[12 + 3] = -torch.inf  # gate 1's logit of expert 0, as PLE's gate bias holds it
    bias = bias.requires_grad_()
    for i in range(3):
        assert torch.autograd.gradcheck(lambda a: ops.expert_gate_mixture(a, 3, 2, 0.25, seed=3)[i], (z,))
        # the bias's -inf entry is not differentiable (gradcheck perturbs every entry): check the others
        finite = torch.isfinite(bias.detach())
        assert torch.autograd.gradcheck(
            lambda a, b: ops.expert_gate_mixture(a, 3, 2, 0.25, seed=3,
                                                 bias=torch.where(finite, b, bias.detach()))[i], (z, bias))
    for requires_grad in (False, True):
        for bias in (None, torch.randn(21).requires_grad_(requires_grad)):
            args = (_gemm_output(7, 3, 2, 5, torch.float32).requires_grad_(requires_grad), bias, 3, 2, 0.2, 9)
            torch.library.opcheck(torch.ops.mtkernels.expert_gate_mixture.default, args)
    torch.library.opcheck(torch.ops.mtkernels.expert_gate_mixture.default, (torch.randn(0, 21), None, 3, 2, 0.2, 9))
    torch.library.opcheck(torch.ops.mtkernels.expert_gate_mixture.default,
                          (torch.randn(0, 21), torch.randn(21), 3, 2, 0.2, 9))
    _, hidden, weights = torch.ops.mtkernels.expert_gate_mixture.default(torch.randn(7, 21), None, 3, 2, 0.2, 9)
    for bias_grad in (False, True):
        torch.library.opcheck(torch.ops.mtkernels.expert_gate_mixture_backward.default,
                              (torch.randn(7, 2, 5), None, None, hidden, weights, 0.2, bias_grad))
        torch.library.opcheck(torch.ops.mtkernels.expert_gate_mixture_backward.default,
                              (torch.randn(7, 2, 5), torch.randn(7, 3, 5), torch.randn(7, 2, 3), hidden, weights, 0.2,
                               bias_grad))


def test_expert_gate_mixture_bad_input():
    with pytest.raises(ValueError, match=r"z must be \[B, E\*H \+ G\*E\]"):
        ops.expert_gate_mixture(torch.randn(4, 22), 3, 2, 0.1)
    with pytest.raises(ValueError, match=r"z must be \[B, E\*H \+ G\*E\]"):
        ops.expert_gate_mixture(torch.randn(4, 6), 3, 2, 0.1)  # H = 0
    with pytest.raises(ValueError, match="z must be a 2-D tensor"):
        ops.expert_gate_mixture(torch.randn(4, 3, 7), 3, 2, 0.1)
    with pytest.raises(ValueError, match="num_experts and num_gates must be >= 1"):
        ops.expert_gate_mixture(torch.randn(4, 21), 0, 2, 0.1)
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\)"):
        ops.expert_gate_mixture(torch.randn(4, 21), 3, 2, 1.0)
    with pytest.raises(TypeError, match="z must be a float32 or float64"):
        ops.expert_gate_mixture(torch.ones(4, 21, dtype=torch.int64), 3, 2, 0.1)
    with pytest.raises(ValueError, match=r"bias must be \[E\*H \+ G\*E\] = \[21\]"):
        ops.expert_gate_mixture(torch.randn(4, 21), 3, 2, 0.1, bias=torch.randn(4, 21))
    with pytest.raises(TypeError, match="bias must be torch.float32 like z"):
        ops.expert_gate_mixture(torch.randn(4, 21), 3, 2, 0.1, bias=torch.randn(21, dtype=torch.float64))


@egm_native_only
def test_expert_gate_mixture_native_bad_input():
    op, backward = torch.ops.mtkernels.expert_gate_mixture.default, torch.ops.mtkernels.expert_gate_mixture_backward.default
    with pytest.raises(ValueError, match=r"z must be \[B, E\*H \+ G\*E\]"):
        op(torch.randn(4, 22), None, 3, 2, 0.1, 0)
    with pytest.raises(TypeError, match="z must be a float32 or float64"):
        op(torch.ones(4, 21, dtype=torch.int64), None, 3, 2, 0.1, 0)
    with pytest.raises(ValueError, match="num_gates must be >= 1"):
        op(torch.randn(4, 21), None, 3, 0, 0.1, 0)
    with pytest.raises(ValueError, match=r"bias must be \[E\*H \+ G\*E\] = \[21\]"):
        op(torch.randn(4, 21), torch.randn(20), 3, 2, 0.1, 0)
    with pytest.raises(ValueError, match="bias must be a 1-D tensor"):
        op(torch.randn(4, 21), torch.randn(1, 21), 3, 2, 0.1, 0)
    with pytest.raises(TypeError, match="bias must be Float like z"):
        op(torch.randn(4, 21), torch.randn(21, dtype=torch.float64), 3, 2, 0.1, 0)
    with pytest.raises(ValueError, match="grad_mixed must be"):
        backward(torch.randn(4, 2, 4), None, None, torch.randn(4, 3, 5), torch.randn(4, 2, 3), 0.1, False)
    with pytest.raises(ValueError, match="weights must be"):
        backward(torch.randn(4, 2, 5), None, None, torch.randn(4, 3, 5), torch.randn(4, 2, 4), 0.1, True)
    with pytest.raises(ValueError, match="grad_hidden must be"):
        backward(torch.randn(4, 2, 5), torch.randn(4, 3, 4), None, torch.randn(4, 3, 5), torch.randn(4, 2, 3), 0.1, True)
