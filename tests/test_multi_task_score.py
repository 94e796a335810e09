"""`multi_task_score`: the fused op and its reference against an eager model built from torch.nn
layers (MMoE, PLE-CGC, Shared-Bottom), the hand-made gate check, bad input, opcheck."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtkernels import ops, reference
from mtkernels._extension import has_kernel
from mtkernels.ops import MultiTaskScoreParams, multi_task_score, pack_multi_task_params

NATIVE = has_kernel("multi_task_score", "cpu")
native_only = pytest.mark.skipif(not NATIVE, reason="native multi_task_score kernel not built")


class EagerMultiTask(nn.Module):
    """The network as a user writes it: one nn.Linear per expert layer, gate and tower layer."""

    def __init__(self, width, expert_sizes, gate_mask, tower_sizes, transforms, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        num_tasks, num_experts = gate_mask.shape
        self.gate_mask = gate_mask
        self.transforms = list(transforms)
        self.allowed = [gate_mask[t].nonzero().flatten().tolist() for t in range(num_tasks)]

        def linear(fan_in, fan_out):
            layer = nn.Linear(fan_in, fan_out)
            with torch.no_grad():  # biases away from zero so a missed bias shows
                layer.weight.copy_(torch.randn(fan_out, fan_in, generator=gen) / fan_in**0.5)
                layer.bias.copy_(torch.randn(fan_out, generator=gen) * 0.3)
            return layer

        def mlp(fan_in, sizes):
            layers = []
            for size in sizes:
                layers.append(linear(fan_in, size))
                fan_in = size
            return nn.ModuleList(layers)

        self.experts = nn.ModuleList(mlp(width, expert_sizes) for _ in range(num_experts))
        self.gates = nn.ModuleList(
            linear(width, len(a)) if len(a) > 1 else nn.Identity() for a in self.allowed
        )
        self.towers = nn.ModuleList(mlp(expert_sizes[-1], tower_sizes) for _ in range(num_tasks))

    def gate_list(self):
        return [g if isinstance(g, nn.Linear) else None for g in self.gates]

    def pack(self):
        return pack_multi_task_params(
            [list(e) for e in self.experts], self.gate_list(), self.gate_mask,
            [list(t) for t in self.towers], self.transforms,
        )

    def forward(self, x):
        outputs = []
        for expert in self.experts:
            h = x
            for layer in expert:
                h = torch.relu(layer(h))
            outputs.append(h)
        scores = []
        for t, tower in enumerate(self.towers):
            allowed = self.allowed[t]
            if len(allowed) == 1:
                h = outputs[allowed[0]]
            else:
                g = torch.softmax(self.gates[t](x), dim=-1)
                h = sum(g[:, j : j + 1] * outputs[e] for j, e in enumerate(allowed))
            for k, layer in enumerate(tower):
                h = layer(h)
                if k < len(tower) - 1:
                    h = torch.relu(h)
            s = h[:, 0]
            scores.append(torch.sigmoid(s) if self.transforms[t] == "sigmoid" else s)
        return torch.stack(scores, dim=1)


def mmoe_mask(num_tasks=3, num_experts=4):
    return torch.ones(num_tasks, num_experts, dtype=torch.bool)


def cgc_mask():
    # PLE CGC: 2 shared experts (0, 1), then 2 experts for task 0, 1 for task 1, 2 for task 2
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[:, :2] = True
    mask[0, 2:4] = True
    mask[1, 4] = True
    mask[2, 5:7] = True
    return mask


CONFIGS = {
    # name: (gate_mask, expert layer sizes, tower layer sizes, transforms)
    "mmoe": (mmoe_mask(), [24, 16], [8, 1], ["sigmoid", "sigmoid", "identity"]),
    "ple_cgc": (cgc_mask(), [20, 12], [1], ["sigmoid", "identity", "sigmoid"]),
    "shared_bottom": (torch.ones(2, 1, dtype=torch.bool), [16], [10, 1], ["sigmoid", "identity"]),
    "ple_one_own_expert": (torch.eye(3, dtype=torch.bool), [9, 7, 5], [6, 4, 1], ["identity"] * 3),
}
WIDTH = 13  # D not a multiple of 8: exercises the kernel's remainder loops


def make(config, seed=0, width=WIDTH):
    mask, expert_sizes, tower_sizes, transforms = CONFIGS[config]
    return EagerMultiTask(width, expert_sizes, mask, tower_sizes, transforms, seed=seed).eval()


SCORERS = {"reference": reference.multi_task_score, "ops": multi_task_score}


@pytest.mark.parametrize("scorer", SCORERS)
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("rows", [0, 1, 1000])
def test_float32_matches_eager_model(scorer, config, rows):
    model = make(config, seed=rows)
    x = torch.randn(rows, WIDTH, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x)
        got = SCORERS[scorer](x, model.pack())
    assert got.shape == (rows, model.gate_mask.shape[0]) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scorer", SCORERS)
def test_hand_made_gate_softmax_runs_over_experts(scorer):
    # 3 experts with constant outputs 1, 2, 3; gate logits = x = [[1,2,3],[0,0,0]]; the tower is
    # the identity, so the score is the mixture: softmax([1,2,3]) . [1,2,3] and mean(1,2,3).
    experts = []
    for e in range(3):
        layer = nn.Linear(3, 1)
        nn.init.zeros_(layer.weight)
        nn.init.constant_(layer.bias, e + 1.0)
        experts.append([layer])
    gate = nn.Linear(3, 3)
    with torch.no_grad():
        gate.weight.copy_(torch.eye(3))
        gate.bias.zero_()
    tower = nn.Linear(1, 1)
    nn.init.ones_(tower.weight)
    nn.init.zeros_(tower.bias)
    params = pack_multi_task_params(experts, [gate], torch.ones(1, 3, dtype=torch.bool), [[tower]], ["identity"])
    x = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    with torch.no_grad():
        got = SCORERS[scorer](x, params)
    torch.testing.assert_close(got, torch.tensor([[2.575210], [2.0]]), rtol=0, atol=1e-6)


def test_masked_experts_get_no_weight():
    # Poison the gate rows of experts a task may not use: the score must not change.
    model = make("ple_cgc")
    params = model.pack()
    x = torch.randn(50, WIDTH)
    with torch.no_grad():
        expected = multi_task_score(x, params)
        poisoned = params._replace(
            gate_weight=params.gate_weight.masked_fill(~params.gate_mask[..., None], 1e4),
            gate_bias=params.gate_bias.masked_fill(~params.gate_mask, 1e4),
        )
        torch.testing.assert_close(multi_task_score(x, poisoned), expected)
        torch.testing.assert_close(reference.multi_task_score(x, poisoned), expected)


def test_grad_mode_with_trainable_params_is_refused():
    model = make("mmoe")
    params = model.pack()
    x = torch.randn(4, WIDTH, requires_grad=True)
    with pytest.raises(RuntimeError, match="inference-only"):
        multi_task_score(x, params)
    with torch.no_grad():
        assert multi_task_score(x, params).shape == (4, 3)


def _bad_inputs():
    model = make("mmoe")
    p = model.pack()
    x = torch.randn(5, WIDTH)
    E, T = 4, 3
    w0, w1 = p.expert_weights
    yield "x_1d", x[0], p, "x"
    yield "x_width", torch.randn(5, WIDTH + 1), p, "params.expert_weights[0]"
    yield "expert_bias", x, p._replace(expert_biases=(p.expert_biases[0], p.expert_biases[1][:, :-1])), "params.expert_biases[1]"
    yield "expert_layer_chain", x, p._replace(expert_weights=(w0, w1[:, :, :-1])), "params.expert_weights[1]"
    yield "expert_count", x, p._replace(expert_weights=(w0[:-1], w1)), "params.expert_weights[0]"
    yield "gate_weight", x, p._replace(gate_weight=p.gate_weight[:, :, :-1]), "params.gate_weight"
    yield "gate_bias", x, p._replace(gate_bias=p.gate_bias[:-1]), "params.gate_bias"
    yield "gate_mask_shape", x, p._replace(gate_mask=p.gate_mask[:, :-1]), "params.gate_mask"
    yield "gate_mask_empty_row", x, p._replace(gate_mask=torch.zeros(T, E, dtype=torch.bool)), "params.gate_mask"
    yield "tower_in", x, p._replace(tower_weights=(p.tower_weights[0][:, :, :-1], p.tower_weights[1])), "params.tower_weights[0]"
    yield "tower_out", x, p._replace(tower_weights=(p.tower_weights[0], p.tower_weights[1].expand(T, 2, -1))), "params.tower_weights[1]"
    yield "tower_bias", x, p._replace(tower_biases=(p.tower_biases[0], p.tower_biases[1][:, :0])), "params.tower_biases[1]"
    yield "transform_name", x, p._replace(transforms=("sigmoid", "softmax", "identity")), "params.transforms"
    yield "transform_count", x, p._replace(transforms=("sigmoid",)), "params.transforms"


BAD = {name: (x, p, arg) for name, x, p, arg in _bad_inputs()}


@pytest.mark.parametrize("scorer", SCORERS)
@pytest.mark.parametrize("case", BAD)
def test_wrong_shapes_raise_value_error_naming_the_argument(scorer, case):
    x, params, arg = BAD[case]
    with torch.no_grad(), pytest.raises(ValueError, match=arg.replace("[", r"\[").replace("]", r"\]")):
        SCORERS[scorer](x, params)


@pytest.mark.parametrize("scorer", SCORERS)
def test_wrong_dtype_raises_type_error(scorer):
    params = make("mmoe").pack()
    with torch.no_grad():
        with pytest.raises(TypeError, match="params.gate_weight"):
            SCORERS[scorer](torch.randn(3, WIDTH), params._replace(gate_weight=params.gate_weight.double()))
        with pytest.raises(TypeError, match="params.gate_mask"):
            SCORERS[scorer](torch.randn(3, WIDTH), params._replace(gate_mask=params.gate_mask.float()))
        with pytest.raises(TypeError, match="x"):
            SCORERS[scorer](torch.randint(0, 3, (3, WIDTH)), params)


def test_packer_rejects_inconsistent_layers():
    model = make("mmoe")
    experts = [list(e) for e in model.experts]
    towers = [list(t) for t in model.towers]
    gates, mask, transforms = model.gate_list(), model.gate_mask, model.transforms
    with pytest.raises(ValueError, match=r"experts\[1\]\[1\]"):
        pack_multi_task_params([experts[0], [experts[1][0], nn.Linear(24, 15)]] + experts[2:], gates, mask, towers, transforms)
    with pytest.raises(ValueError, match=r"gates\[2\]"):
        pack_multi_task_params(experts, gates[:2] + [nn.Linear(WIDTH, 3)], mask, towers, transforms)
    with pytest.raises(ValueError, match=r"gates\[0\]"):
        pack_multi_task_params(experts, [None] + gates[1:], mask, towers, transforms)
    with pytest.raises(ValueError, match=r"towers\[0\]"):
        pack_multi_task_params(experts, gates, mask, [[towers[0][0], nn.Linear(8, 2)]] + towers[1:], transforms)
    with pytest.raises(ValueError, match="gate_mask"):
        pack_multi_task_params(experts, gates, mask[:, :3], towers, transforms)
    with pytest.raises(ValueError, match="transforms"):
        pack_multi_task_params(experts, gates, mask, towers, ["sigmoid", "relu", "identity"])
    with pytest.raises(TypeError, match=r"towers\[1\]\[0\]"):
        pack_multi_task_params(experts, gates, mask, [towers[0], [nn.Conv1d(16, 8, 1), towers[1][1]], towers[2]], transforms)


def test_packed_layout_and_raw_tensors():
    model = make("ple_cgc")
    p = model.pack()
    E, T = 7, 3
    assert p.expert_weights[0].shape == (E, 20, WIDTH) and p.expert_weights[1].shape == (E, 12, 20)
    assert p.gate_weight.shape == (T, E, WIDTH) and p.gate_bias.shape == (T, E)
    assert p.tower_weights[0].shape == (T, 1, 12) and p.tower_biases[0].shape == (T, 1)
    # task 1's gate covers experts 0, 1, 4 in that order
    torch.testing.assert_close(p.gate_weight[1, [0, 1, 4]], model.gates[1].weight.detach())
    assert p.gate_weight[1, [2, 3, 5, 6]].abs().sum() == 0
    # the same network from stacked tensors that are not views of one buffer
    raw = MultiTaskScoreParams(
        tuple(w.clone() for w in p.expert_weights), tuple(b.clone() for b in p.expert_biases),
        p.gate_weight.clone(), p.gate_bias.clone(), p.gate_mask.clone(),
        tuple(w.clone() for w in p.tower_weights), tuple(b.clone() for b in p.tower_biases), list(p.transforms),
    )
    x = torch.randn(33, WIDTH)
    with torch.no_grad():
        torch.testing.assert_close(multi_task_score(x, raw), model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("config", ["mmoe", "ple_cgc", "shared_bottom"])
def test_bfloat16_error_within_twice_the_eager_bfloat16_error(config):
    model = make(config, seed=3)
    x = torch.randn(1000, WIDTH, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        exact = model(x)
        model_bf16 = make(config, seed=3).to(torch.bfloat16)
        eager_error = (model_bf16(x.bfloat16()).float() - exact).abs().max()
        got = multi_task_score(x.bfloat16(), model_bf16.pack())
    assert got.dtype == torch.bfloat16 and got.shape == exact.shape
    fused_error = (got.float() - exact).abs().max()
    assert eager_error > 0
    assert fused_error <= 2 * eager_error, (fused_error, eager_error)


def random_params(gen, width, experts, tasks, expert_sizes, tower_sizes, dtype=torch.float32):
    """Random stacked params with a random gate mask (every task keeps one expert at least)."""
    mask = torch.rand(tasks, experts, generator=gen) < 0.6
    mask[torch.arange(tasks), torch.randint(0, experts, (tasks,), generator=gen)] = True

    def stack(groups, sizes, fan_in):
        ws, bs = [], []
        for size in sizes:
            ws.append((torch.randn(groups, size, fan_in, generator=gen) / fan_in**0.5).to(dtype))
            bs.append((torch.randn(groups, size, generator=gen) * 0.3).to(dtype))
            fan_in = size
        return tuple(ws), tuple(bs)

    ew, eb = stack(experts, expert_sizes, width)
    tw, tb = stack(tasks, tower_sizes, expert_sizes[-1])
    transforms = tuple("sigmoid" if torch.rand(1, generator=gen) < 0.5 else "identity" for _ in range(tasks))
    return MultiTaskScoreParams(
        ew, eb,
        torch.randn(tasks, experts, width, generator=gen).to(dtype),
        torch.randn(tasks, experts, generator=gen).to(dtype),
        mask, tw, tb, transforms,
    )


SHAPES = [
    # rows, width, experts, tasks, expert layer sizes, tower layer sizes
    (1, 1, 1, 1, [1], [1]),
    (7, 5, 3, 2, [17], [1]),
    (97, 13, 5, 4, [33, 19], [7, 1]),
    (250, 40, 8, 3, [64, 32], [16, 1]),
    (301, 9, 2, 5, [8, 8, 8], [5, 3, 1]),
]


@native_only
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_native_matches_reference_on_random_params(shape):
    rows, width, experts, tasks, expert_sizes, tower_sizes = shape
    gen = torch.Generator().manual_seed(rows)
    params = random_params(gen, width, experts, tasks, expert_sizes, tower_sizes)
    x = torch.randn(rows, width, generator=gen)
    with torch.no_grad():
        expected = reference.multi_task_score(x.double(), MultiTaskScoreParams(
            *[tuple(t.double() for t in f) if isinstance(f, tuple) and f and isinstance(f[0], torch.Tensor)
              else (f.double() if isinstance(f, torch.Tensor) and f.is_floating_point() else f) for f in params]
        ))
        for threads in (1, 2):
            previous = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                got = multi_task_score(x, params)
            finally:
                torch.set_num_threads(previous)
            torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-5)


@native_only
def test_non_contiguous_input_and_params():
    gen = torch.Generator().manual_seed(11)
    params = random_params(gen, 12, 4, 3, [16, 8], [4, 1])
    x = torch.randn(12, 40, generator=gen)[:, ::2][:, :12]  # rows strided by 40, columns by 2
    transposed = params._replace(gate_weight=params.gate_weight.transpose(1, 2).contiguous().transpose(1, 2))
    with torch.no_grad():
        expected = reference.multi_task_score(x.contiguous(), params)
        torch.testing.assert_close(multi_task_score(x, transposed), expected, rtol=1e-5, atol=1e-6)


@native_only
def test_float64_runs_on_the_reference():
    model = make("mmoe").double()
    x = torch.randn(20, WIDTH, dtype=torch.float64)
    with torch.no_grad():
        got = multi_task_score(x, model.pack())
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, model(x), rtol=1e-12, atol=1e-12)
        with pytest.raises(TypeError, match="float32"):
            p = model.pack()
            torch.ops.mtkernels.multi_task_score.default(x, *p)


@native_only
@pytest.mark.parametrize(
    "config, dtype, rows",
    [("mmoe", torch.float32, 5), ("mmoe", torch.float32, 0), ("ple_cgc", torch.bfloat16, 3), ("shared_bottom", torch.float32, 4)],
)
def test_opcheck(config, dtype, rows):
    p = make(config).to(dtype).pack()
    x = torch.randn(rows, WIDTH, dtype=dtype)
    torch.library.opcheck(torch.ops.mtkernels.multi_task_score.default, (x, *p))


@native_only
def test_torch_compile_uses_the_fake_kernel():
    model = make("mmoe")
    p = model.pack()
    compiled = torch.compile(lambda x: multi_task_score(x, p), backend="eager", fullgraph=True)
    x = torch.randn(9, WIDTH)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)


# ---- the packed CPU path: multi_task_score_pack / multi_task_score_packed and the wrapper's cache ----

packed_only = pytest.mark.skipif(
    not (NATIVE and hasattr(torch.ops.mtkernels, "multi_task_score_packed")),
    reason="native multi_task_score_packed kernel not built",
)


def _pack(params):
    return torch.ops.mtkernels.multi_task_score_pack.default(
        params.expert_weights, params.expert_biases, params.gate_weight, params.gate_bias,
        params.gate_mask, params.tower_weights, params.tower_biases, params.transforms,
    )


@packed_only
@pytest.mark.parametrize("shape", SHAPES + [(1000, 256, 8, 3, [128, 64], [32, 1])], ids=str)
def test_packed_op_matches_the_reference(shape):
    rows, width, experts, tasks, expert_sizes, tower_sizes = shape
    gen = torch.Generator().manual_seed(rows + 1)
    params = random_params(gen, width, experts, tasks, expert_sizes, tower_sizes)
    x = torch.randn(rows, width, generator=gen)
    packed = _pack(params)
    assert packed.dtype == torch.float32 and packed.dim() == 1
    with torch.no_grad():
        expected = reference.multi_task_score(x, params)
        for threads in (1, 2):
            previous = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                got = torch.ops.mtkernels.multi_task_score_packed.default(x, *params, packed)
            finally:
                torch.set_num_threads(previous)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@packed_only
def test_packed_buffer_of_other_params_is_rejected():
    params = make("mmoe").pack()
    other = make("ple_cgc").pack()
    x = torch.randn(4, WIDTH)
    with pytest.raises(ValueError, match="packed must be"):
        torch.ops.mtkernels.multi_task_score_packed.default(x, *params, _pack(other))
    with pytest.raises(TypeError, match="packed must be"):
        torch.ops.mtkernels.multi_task_score_packed.default(x, *params, _pack(params).double())


@packed_only
def test_cached_packing_follows_in_place_weight_changes():
    # The wrapper packs once per params object; every in-place change must repack, so a stale
    # packed layout can never be used.
    model = make("mmoe")
    params = model.pack()
    x = torch.randn(40, WIDTH)
    with torch.no_grad():
        before = multi_task_score(x, params)
        torch.testing.assert_close(before, reference.multi_task_score(x, params), rtol=1e-5, atol=1e-6)
        # (one gate column only: a softmax does not see a shift of all its logits)
        for tensor in (params.expert_weights[1], params.gate_bias[:, 0], params.tower_biases[-1], params.expert_biases[0]):
            tensor.add_(0.25)
            after = multi_task_score(x, params)
            torch.testing.assert_close(after, reference.multi_task_score(x, params), rtol=1e-5, atol=1e-6)
            assert not torch.allclose(after, before)
            before = after
        params.gate_mask[0, 1] = False  # the mask is read per call, and is part of the cache key too
        torch.testing.assert_close(multi_task_score(x, params), reference.multi_task_score(x, params),
                                   rtol=1e-5, atol=1e-6)


@packed_only
@pytest.mark.parametrize("fused", [False, True])  # fused Adam does not bump version counters
def test_cached_packing_follows_optimizer_steps(fused):
    model = make("ple_cgc", seed=5)
    params = model.pack()
    raw = MultiTaskScoreParams(*[tuple(t.clone().requires_grad_() for t in f) if isinstance(f, tuple) and
                                 isinstance(f[0], torch.Tensor) else (f.clone().requires_grad_()
                                 if isinstance(f, torch.Tensor) and f.is_floating_point() else f) for f in params])
    trainable = [t for f in raw for t in (f if isinstance(f, tuple) else (f,))
                 if isinstance(t, torch.Tensor) and t.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=0.05, fused=fused)
    x = torch.randn(64, WIDTH)
    for _ in range(3):
        with torch.no_grad():
            scored = multi_task_score(x, raw)  # packs, then reuses the packing until the step
            torch.testing.assert_close(multi_task_score(x, raw), scored)
            torch.testing.assert_close(scored, reference.multi_task_score(x, raw), rtol=1e-5, atol=1e-6)
        optimizer.zero_grad()
        reference.multi_task_score(x, raw).square().sum().backward()
        optimizer.step()
        with torch.no_grad():
            assert not torch.allclose(multi_task_score(x, raw), scored)


@packed_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_packed_ops(dtype):
    p = make("ple_one_own_expert").to(dtype).pack()
    x = torch.randn(7, WIDTH, dtype=dtype)
    torch.library.opcheck(torch.ops.mtkernels.multi_task_score_pack.default, tuple(p))
    torch.library.opcheck(torch.ops.mtkernels.multi_task_score_packed.default, (x, *p, _pack(p)))


@native_only
@pytest.mark.parametrize("packed", [False, True], ids=["params", "packed"])
def test_nan_input_rows_score_nan_like_the_reference(packed):
    # The fused ReLU must propagate NaN as torch.relu does (it used to turn a NaN into 0, so a row of
    # NaN features got a finite, wrong score); other rows stay exact.
    if packed and not hasattr(torch.ops.mtkernels, "multi_task_score_packed"):
        pytest.skip("native multi_task_score_packed kernel not built")
    gen = torch.Generator().manual_seed(11)
    params = random_params(gen, 13, 4, 3, [33, 19], [7, 1])
    x = torch.randn(20, 13, generator=gen)
    x[3, 5] = float("nan")
    x[17] = float("nan")
    with torch.no_grad():
        expected = reference.multi_task_score(x, params)
        got = (torch.ops.mtkernels.multi_task_score_packed.default(x, *params, _pack(params)) if packed
               else multi_task_score(x, params))
    assert torch.isnan(expected[[3, 17]]).all()
    assert torch.equal(torch.isnan(got), torch.isnan(expected))
    finite = ~torch.isnan(expected).any(1)
    torch.testing.assert_close(got[finite], expected[finite], rtol=1e-5, atol=1e-5)
