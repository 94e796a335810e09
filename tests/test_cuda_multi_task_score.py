"""`multi_task_score` on CUDA: the fused kernel against the reference (same device) and the CPU
kernel for MMoE, PLE-CGC and Shared-Bottom layouts, low precision against the eager error,
packed (one-product) and unpacked params, wide towers, bad input, determinism. Skipped without a
GPU."""

from __future__ import annotations

import pytest
import torch

import mtkernels
from mtkernels import reference
from mtkernels._extension import has_kernel
from mtkernels.ops import MultiTaskScoreParams, multi_task_score, pack_multi_task_params

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
CUDA_KERNEL = has_kernel("multi_task_score", "cuda")
needs_kernel = pytest.mark.skipif(not CUDA_KERNEL, reason="CUDA kernel not built")


def test_cuda_kernel_is_built():
    assert CUDA_KERNEL, mtkernels.info()


def random_params(width, expert_sizes, gate_mask, tower_sizes, transforms, seed=0, dtype=torch.float32,
                  device="cuda"):
    gen = torch.Generator().manual_seed(seed)
    num_tasks, num_experts = gate_mask.shape

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)

    expert_weights, expert_biases, fan_in = [], [], width
    for size in expert_sizes:
        expert_weights.append(rand(num_experts, size, fan_in, scale=fan_in**-0.5))
        expert_biases.append(rand(num_experts, size, scale=0.3))
        fan_in = size
    tower_weights, tower_biases = [], []
    for size in tower_sizes:
        tower_weights.append(rand(num_tasks, size, fan_in, scale=fan_in**-0.5))
        tower_biases.append(rand(num_tasks, size, scale=0.3))
        fan_in = size
    return MultiTaskScoreParams(
        tuple(expert_weights), tuple(expert_biases), rand(num_tasks, num_experts, width, scale=width**-0.5),
        rand(num_tasks, num_experts, scale=0.3), gate_mask.to(device), tuple(tower_weights), tuple(tower_biases),
        tuple(transforms),
    )


def as_dtype(params, dtype):
    def cast(t):
        return t if t.dtype == torch.bool else t.to(dtype)

    return MultiTaskScoreParams(
        tuple(map(cast, params.expert_weights)), tuple(map(cast, params.expert_biases)), cast(params.gate_weight),
        cast(params.gate_bias), params.gate_mask, tuple(map(cast, params.tower_weights)),
        tuple(map(cast, params.tower_biases)), params.transforms,
    )


def cpu(params):
    return MultiTaskScoreParams(*[
        tuple(t.cpu() for t in f) if isinstance(f, tuple) and f and isinstance(f[0], torch.Tensor)
        else (f.cpu() if isinstance(f, torch.Tensor) else f)
        for f in params
    ])


MMOE = torch.ones(2, 4, dtype=torch.bool)
PLE = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 1, 0], [1, 1, 0, 0, 1]], dtype=torch.bool)
SHARED_BOTTOM = torch.ones(3, 1, dtype=torch.bool)
LAYOUTS = {
    # mask, D, expert sizes, tower sizes
    "mmoe": (MMOE, 24, (32, 16), (8, 1)),
    "ple": (PLE, 40, (64,), (32, 16, 1)),
    "shared_bottom": (SHARED_BOTTOM, 16, (48, 24, 12), (1,)),
    "wide": (MMOE, 33, (300,), (129, 1)),
}


@needs_kernel
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("rows", [1, 7, 200, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference_and_cpu(layout, rows, dtype):
    mask, width, experts, towers = LAYOUTS[layout]
    transforms = ["sigmoid", "identity", "sigmoid"][: mask.shape[0]]
    params = random_params(width, experts, mask, towers, transforms, seed=rows, dtype=dtype)
    x = torch.randn(rows, width, generator=torch.Generator().manual_seed(1)).to(dtype).cuda()
    with torch.no_grad():
        out = multi_task_score(x, params)
        expected = reference.multi_task_score(x, params)
        on_cpu = multi_task_score(x.cpu(), cpu(params))
    assert out.shape == (rows, mask.shape[0]) and out.dtype == dtype and out.device.type == "cuda"
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(out, expected, **tol)
    torch.testing.assert_close(out.cpu(), on_cpu, **tol)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_twice_the_eager_error(dtype):
    mask, width, experts, towers = LAYOUTS["mmoe"]
    params32 = random_params(width, experts, mask, towers, ["sigmoid", "identity"], seed=3)
    x32 = torch.randn(512, width, generator=torch.Generator().manual_seed(2)).cuda()
    with torch.no_grad():
        exact = reference.multi_task_score(x32.double(), as_dtype(params32, torch.float64))
        eager = reference.multi_task_score(x32.to(dtype), as_dtype(params32, dtype))
        fused = multi_task_score(x32.to(dtype), as_dtype(params32, dtype))
    eager_error = (eager.double() - exact).abs().max().item()
    fused_error = (fused.double() - exact).abs().max().item()
    assert fused_error <= 2 * eager_error + 1e-6, (fused_error, eager_error)


@needs_kernel
def test_packed_params_use_the_same_result():
    # pack_multi_task_params puts the gate rows right after the expert rows (one product, a view).
    mask, width = PLE, 20
    torch.manual_seed(0)
    experts = [[torch.nn.Linear(width, 16).cuda(), torch.nn.Linear(16, 8).cuda()] for _ in range(5)]
    gates = [torch.nn.Linear(width, int(mask[t].sum())).cuda() for t in range(3)]
    towers = [[torch.nn.Linear(8, 4).cuda(), torch.nn.Linear(4, 1).cuda()] for _ in range(3)]
    params = pack_multi_task_params(experts, gates, mask.cuda(), towers, ["sigmoid"] * 3)
    x = torch.randn(300, width, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(multi_task_score(x, params), reference.multi_task_score(x, params),
                                   atol=1e-5, rtol=1e-4)


@needs_kernel
def test_deterministic_and_strided_x():
    mask, width, experts, towers = LAYOUTS["ple"]
    params = random_params(width, experts, mask, towers, ["identity"] * 3, seed=5)
    x = torch.randn(1000, 2 * width, device="cuda")[:, ::2]
    with torch.no_grad():
        first = multi_task_score(x, params)
        second = multi_task_score(x, params)
        assert torch.equal(first, second)
        torch.testing.assert_close(first, reference.multi_task_score(x.contiguous(), params), atol=1e-5, rtol=1e-4)


@needs_kernel
def test_very_wide_tower_uses_global_scratch():
    # E + 2 * 7000 floats per warp is above the 48 KiB shared-memory budget.
    params = random_params(8, (16,), MMOE, (7000, 1), ["sigmoid", "identity"], seed=9)
    x = torch.randn(5, 8, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(multi_task_score(x, params), reference.multi_task_score(x, params),
                                   atol=1e-4, rtol=1e-4)


@needs_kernel
def test_zero_rows_and_bad_mask():
    params = random_params(8, (16,), MMOE, (1,), ["sigmoid", "identity"])
    with torch.no_grad():
        assert multi_task_score(torch.zeros(0, 8, device="cuda"), params).shape == (0, 2)
        bad = params._replace(gate_mask=torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool, device="cuda"))
        with pytest.raises(ValueError, match="at least one expert"):
            torch.ops.mtkernels.multi_task_score(
                torch.zeros(3, 8, device="cuda"), bad.expert_weights, bad.expert_biases, bad.gate_weight,
                bad.gate_bias, bad.gate_mask, bad.tower_weights, bad.tower_biases, list(bad.transforms))
        with pytest.raises(TypeError, match="dtype"):
            multi_task_score(torch.zeros(3, 8, device="cuda", dtype=torch.float64), params)
