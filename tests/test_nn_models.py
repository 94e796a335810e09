"""Backbones and MultiTaskModel: shapes and gradient flow at batch sizes 1 and 37, gates, ESMM's
pCTCVR, state_dict keys, from_config, fused scoring wiring."""

import json

import pytest
import torch

from mtkernels import KeyedJaggedTensor, ops
from mtkernels.data import FeatureSpec, TaskSpec
from mtkernels.nn import ESMM, MMoE, PLE, Expert, MultiTaskModel, SharedBottom
from mtkernels.nn.backbones import expert_outputs

FEATURES = [
    FeatureSpec("user_id", 20, False, "user"),
    FeatureSpec("age", 7, False, "user"),
    FeatureSpec("item_id", 30, False, "item"),
    FeatureSpec("genres", 19, True, "item"),
]
TASKS = [TaskSpec("click", "binary"), TaskSpec("like", "binary"), TaskSpec("rating", "regression")]
DENSE_DIM = 3
BACKBONE_KWARGS = {
    "shared_bottom": {"hidden": [16, 8]},
    "mmoe": {"num_experts": 3, "expert_hidden": [16, 8]},
    "ple": {"num_levels": 2, "num_shared_experts": 2, "num_task_experts": 1, "expert_hidden": [8]},
    "ple1": {"num_levels": 1, "num_shared_experts": 2, "num_task_experts": 2, "expert_hidden": [8, 8]},
    "esmm": {"ctr_task": "click", "hidden": [8]},
    "esmm0": {},
}


def _model(name, **kwargs):
    backbone = name.rstrip("01")
    return MultiTaskModel(FEATURES, DENSE_DIM, TASKS, backbone=backbone, embedding_dim=4,
                          backbone_kwargs=BACKBONE_KWARGS[name], tower_hidden=(6,), **kwargs)


def _batch(batch, seed=0):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.ones(len(FEATURES) * batch, dtype=torch.long)
    lengths[3 * batch:] = torch.randint(0, 4, (batch,), generator=generator)  # genres: 0..3 ids
    values = torch.cat([
        torch.randint(0, f.num_embeddings, (int(lengths[k * batch:(k + 1) * batch].sum()),), generator=generator)
        for k, f in enumerate(FEATURES)
    ])
    sparse = KeyedJaggedTensor([f.name for f in FEATURES], values, lengths=lengths)
    return sparse, torch.randn(batch, DENSE_DIM, generator=generator)


ALL = list(BACKBONE_KWARGS)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("batch", [1, 37])
def test_forward_shape_and_gradient_flow(name, batch):
    torch.manual_seed(0)
    model = _model(name)
    sparse, dense = _batch(batch, seed=batch)
    out = model(sparse, dense)
    assert out.shape == (batch, len(TASKS))
    assert out.dtype == torch.float32
    probabilities = out[:, :2]
    assert bool(((probabilities > 0) & (probabilities < 1)).all())
    (out * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
    for parameter_name, parameter in model.named_parameters():
        assert parameter.grad is not None, parameter_name
        assert bool(torch.isfinite(parameter.grad).all()), parameter_name
        if batch > 1:  # with one row a ReLU unit may be off; with 37 every layer must learn
            assert float(parameter.grad.abs().sum()) > 0, parameter_name
    touched = sparse["item_id"]["values"]
    item_grad = model.embeddings.embedding_bags["item_id"].weight.grad
    assert float(item_grad[touched].abs().sum()) > 0


def _expert_forward(linears, x):
    for linear in linears:
        x = torch.relu(linear(x))
    return x


@pytest.mark.parametrize("hidden", [(5,), (6, 4, 3)])
def test_batched_experts_equal_each_expert(hidden):
    torch.manual_seed(12)
    experts = [Expert(7, hidden) for _ in range(3)]
    x = torch.randn(9, 7, requires_grad=True)
    batched = expert_outputs(experts, x)
    one_by_one = torch.stack([expert(x) for expert in experts], dim=1)
    torch.testing.assert_close(batched, one_by_one)
    upstream = torch.randn_like(batched)
    grads = torch.autograd.grad((batched * upstream).sum(), [x] + list(experts[1].parameters()))
    expected = torch.autograd.grad((one_by_one * upstream).sum(), [x] + list(experts[1].parameters()))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("batch", [1, 37])
def test_mmoe_gates_softmax_and_mixture(batch):
    torch.manual_seed(1)
    mmoe = MMoE(10, num_tasks=2, num_experts=4, expert_hidden=(6, 5))
    x = torch.randn(batch, 10)
    gates = mmoe.gate_weights(x)
    assert len(gates) == 2
    for g in gates:
        assert g.shape == (batch, 4)
        assert bool((g >= 0).all())
        torch.testing.assert_close(g.sum(dim=1), torch.ones(batch))
    outputs = mmoe(x)
    experts = torch.stack([_expert_forward(e.linears, x) for e in mmoe.experts], dim=1)
    for t in range(2):
        torch.testing.assert_close(outputs[t], (gates[t].unsqueeze(-1) * experts).sum(dim=1))
    assert not torch.allclose(outputs[0], outputs[1])  # each task has its own mixture


@pytest.mark.parametrize("batch", [1, 37])
def test_ple_gates_over_allowed_experts(batch):
    torch.manual_seed(2)
    ple = PLE(10, num_tasks=3, num_levels=3, num_shared_experts=2, num_task_experts=1, expert_hidden=(6,))
    x = torch.randn(batch, 10)
    weights = ple.gate_weights(x)
    assert len(weights) == 3
    for level, level_weights in enumerate(weights):
        last = level == 2
        assert len(level_weights) == (3 if last else 4)  # T task gates (+ the shared gate)
        for g in level_weights[:3]:
            assert g.shape == (batch, 2 + 1)  # shared + the task's own
        if not last:
            assert level_weights[3].shape == (batch, 2 + 3 * 1)  # every expert
        for g in level_weights:
            assert bool((g >= 0).all())
            torch.testing.assert_close(g.sum(dim=1), torch.ones(batch))
    # one CGC level by hand: task t mixes [shared..., own...] with its gate
    cgc = ple.levels[0]
    shared = [_expert_forward(e.linears, x) for e in cgc.shared_experts]
    task_outputs, shared_output = cgc([x] * 3, x)
    for t in range(3):
        own = [_expert_forward(e.linears, x) for e in cgc.task_experts[t]]
        stacked = torch.stack(shared + own, dim=1)
        torch.testing.assert_close(task_outputs[t], (weights[0][t].unsqueeze(-1) * stacked).sum(dim=1))
    everything = shared + [_expert_forward(e.linears, x) for task in cgc.task_experts for e in task]
    torch.testing.assert_close(shared_output, (weights[0][3].unsqueeze(-1) * torch.stack(everything, 1)).sum(1))
    # the next level reads each task's output and the shared output, through its own experts
    inputs = task_outputs + [shared_output]
    cgc = ple.levels[1]
    shared = [_expert_forward(e.linears, shared_output) for e in cgc.shared_experts]
    own = [[_expert_forward(e.linears, task_outputs[t]) for e in cgc.task_experts[t]] for t in range(3)]
    next_tasks, next_shared = cgc(task_outputs, shared_output)
    for t in range(3):
        g = torch.softmax(cgc.task_gates[t](inputs[t]), dim=-1)
        torch.testing.assert_close(next_tasks[t], (g.unsqueeze(-1) * torch.stack(shared + own[t], 1)).sum(1))
    g = torch.softmax(cgc.shared_gate(shared_output), dim=-1)
    everything = torch.stack(shared + [o for outputs in own for o in outputs], 1)
    torch.testing.assert_close(next_shared, (g.unsqueeze(-1) * everything).sum(1))
    assert [o.shape for o in ple(x)] == [(batch, 6)] * 3


def test_ple_task_output_ignores_other_tasks_experts():
    torch.manual_seed(3)
    ple = PLE(5, num_tasks=2, num_levels=1, num_shared_experts=1, num_task_experts=2, expert_hidden=(4,))
    x = torch.randn(8, 5)
    before = ple(x)
    with torch.no_grad():
        for expert in ple.levels[0].task_experts[1]:
            expert.linears[0].weight.add_(1.0)
    after = ple(x)
    torch.testing.assert_close(after[0], before[0])
    assert not torch.allclose(after[1], before[1])


def test_shared_bottom_and_single_expert_mmoe_have_no_gate():
    torch.manual_seed(4)
    x = torch.randn(5, 6)
    bottom = SharedBottom(6, 2, hidden=(4,))
    outputs = bottom(x)
    torch.testing.assert_close(outputs[0], _expert_forward(bottom.bottom.linears, x))
    assert outputs[1] is outputs[0]
    mmoe = MMoE(6, 2, num_experts=1, expert_hidden=(4,))
    torch.testing.assert_close(mmoe(x)[1], _expert_forward(mmoe.experts[0].linears, x))
    torch.testing.assert_close(mmoe.gate_weights(x)[0], torch.ones(5, 1))
    assert list(mmoe.state_dict()) == ["experts.0.linears.0.weight", "experts.0.linears.0.bias"]


@pytest.mark.parametrize("name", ["esmm", "esmm0"])
def test_esmm_pctcvr_is_pctr_times_pcvr(name):
    torch.manual_seed(5)
    model = _model(name).eval()
    sparse, dense = _batch(11, seed=5)
    with torch.no_grad():
        out = model(sparse, dense)
        x = model._inputs(sparse, dense)
        shared = model.backbone(x)
        p_ctr = torch.sigmoid(model.towers[0](shared[0]))
        p_cvr = torch.sigmoid(model.towers[1](shared[1]))
        rating = model.towers[2](shared[2])
    torch.testing.assert_close(out[:, 0], p_ctr)
    torch.testing.assert_close(out[:, 1], p_ctr * p_cvr)
    torch.testing.assert_close(out[:, 2], rating)
    assert bool((out[:, 1] <= out[:, 0]).all())  # pCTCVR <= pCTR


def test_esmm_entire_space_targets():
    nan = float("nan")
    labels = torch.tensor([[1.0, 1.0, 4.0], [1.0, 0.0, 2.0], [0.0, nan, nan], [nan, nan, 3.0], [1.0, nan, 5.0]])
    targets = _model("esmm").targets(labels)
    expected = torch.tensor([[1.0, 1.0, 4.0], [1.0, 0.0, 2.0], [0.0, 0.0, nan], [nan, nan, 3.0], [1.0, nan, 5.0]])
    torch.testing.assert_close(targets, expected, equal_nan=True)
    torch.testing.assert_close(_model("mmoe").targets(labels), labels, equal_nan=True)  # others: unchanged


def test_esmm_ctr_task_must_be_binary():
    with pytest.raises(ValueError, match="ctr_task"):
        ESMM(4, ["regression", "binary"], ctr_task=0)
    with pytest.raises(ValueError, match="not a task"):
        MultiTaskModel(FEATURES, DENSE_DIM, TASKS, backbone="esmm", backbone_kwargs={"ctr_task": "buy"})


def test_state_dict_keys_are_stable():
    model = _model("mmoe")
    keys = list(model.state_dict())
    assert keys[:4] == [f"embeddings.embedding_bags.{f.name}.weight" for f in FEATURES]
    expected_backbone = [f"backbone.experts.{e}.linears.{i}.{p}" for e in range(3) for i in range(2)
                         for p in ("weight", "bias")]
    expected_backbone += [f"backbone.gates.{t}.{p}" for t in range(3) for p in ("weight", "bias")]
    expected_towers = [f"towers.{t}.linears.{i}.{p}" for t in range(3) for i in range(2) for p in ("weight", "bias")]
    assert keys[4:] == expected_backbone + expected_towers
    ple_keys = set(_model("ple").state_dict())
    assert "backbone.levels.0.shared_gate.weight" in ple_keys
    assert "backbone.levels.1.shared_gate.weight" not in ple_keys  # the last level has none
    assert "backbone.levels.1.task_experts.2.0.linears.0.weight" in ple_keys
    assert "backbone.levels.1.task_gates.0.weight" in ple_keys


@pytest.mark.parametrize("name", ALL)
def test_from_config_round_trip(name):
    torch.manual_seed(6)
    model = _model(name, dropout=0.1).eval()
    config = json.loads(json.dumps(model.config))
    assert config == model.config
    rebuilt = MultiTaskModel.from_config(config).eval()
    assert rebuilt.config == model.config
    assert rebuilt.tasks == TASKS and rebuilt.features == FEATURES  # the mtkernels.data specs
    rebuilt.load_state_dict(model.state_dict())
    sparse, dense = _batch(9, seed=6)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(sparse, dense), model(sparse, dense), rtol=0, atol=0)


def test_dropout_only_in_training():
    torch.manual_seed(7)
    model = _model("mmoe", dropout=0.5, use_fused_scoring=False)
    sparse, dense = _batch(16, seed=7)
    model.train()
    assert not torch.allclose(model(sparse, dense), model(sparse, dense))
    model.eval()
    torch.testing.assert_close(model(sparse, dense), model(sparse, dense), rtol=0, atol=0)


def test_parameter_groups():
    model = _model("ple")
    embedding = model.embedding_parameters()
    dense = model.dense_parameters()
    assert len(embedding) == len(FEATURES)
    assert {id(p) for p in embedding}.isdisjoint(id(p) for p in dense)
    assert len(embedding) + len(dense) == len(list(model.parameters()))


def test_bad_inputs():
    model = _model("mmoe")
    sparse, dense = _batch(4)
    with pytest.raises(ValueError, match="dense"):
        model(sparse, dense[:3])
    with pytest.raises(ValueError, match="dense"):
        model(sparse, torch.randn(4, DENSE_DIM + 1))
    with pytest.raises(ValueError, match="dense"):
        model(sparse, None)
    with pytest.raises(ValueError, match="backbone"):
        MultiTaskModel(FEATURES, DENSE_DIM, TASKS, backbone="moe")
    with pytest.raises(ValueError, match="kind"):
        MultiTaskModel(FEATURES, DENSE_DIM, [TaskSpec("click", "multiclass")])
    with pytest.raises(ValueError, match="num_experts"):
        MMoE(4, 2, num_experts=0)
    with pytest.raises(ValueError, match="expert"):
        PLE(4, 2, num_shared_experts=0, num_task_experts=0)


def test_no_dense_features():
    model = MultiTaskModel(FEATURES, 0, TASKS, backbone="mmoe", embedding_dim=4)
    sparse, _ = _batch(5)
    assert model(sparse).shape == (5, 3)
    assert model(sparse, torch.zeros(5, 0)).shape == (5, 3)


# --- fused scoring -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_fused_scoring_in_eval_matches_eager(name, monkeypatch):
    packs, scores = [], []
    pack, score = ops.pack_multi_task_params, ops.multi_task_score
    monkeypatch.setattr(ops, "pack_multi_task_params", lambda *a: packs.append(1) or pack(*a))
    monkeypatch.setattr(ops, "multi_task_score", lambda *a: scores.append(1) or score(*a))
    torch.manual_seed(8)
    model = _model(name, dropout=0.2)
    sparse, dense = _batch(23, seed=8)
    model.train()
    model(sparse, dense)
    model.eval()
    model(sparse, dense)  # grad mode on: eager
    assert not scores
    with torch.no_grad():
        fused = model(sparse, dense)
        model.use_fused_scoring = False
        eager = model(sparse, dense)
        model.use_fused_scoring = True
    supported = name not in ("ple", "esmm0")  # multi-level PLE; ESMM without a bottom: eager only
    assert len(scores) == int(supported)
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)
    if supported:
        with torch.no_grad():
            model(sparse, dense)
            assert len(packs) == 1  # cached while the parameters are unchanged
            model.towers[0].linears[0].weight.mul_(2.0)  # an in-place update: packed again
            changed = model(sparse, dense)
            assert len(packs) == 2
            model.use_fused_scoring = False
            torch.testing.assert_close(changed, model(sparse, dense), rtol=1e-5, atol=1e-5)
            assert not torch.allclose(changed[:, 0], fused[:, 0])


def test_fused_scoring_after_load_state_dict():
    torch.manual_seed(9)
    model, other = _model("mmoe").eval(), _model("mmoe").eval()
    sparse, dense = _batch(7, seed=9)
    with torch.no_grad():
        before = model(sparse, dense)  # packs the current parameters
        model.load_state_dict(other.state_dict())
        torch.testing.assert_close(model(sparse, dense), other(sparse, dense), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(before, model(sparse, dense))


@pytest.mark.parametrize("fused_adam, switch_modes", [(False, True), (True, False)])
def test_fused_scoring_after_optimizer_steps(fused_adam, switch_modes):
    # The model's packed params and the kernel's packed weights both follow the optimizer's
    # in-place updates: eval scores always equal the eager forward of the current weights. Fused
    # Adam does not bump version counters, and a model kept in eval mode never drops its pack
    # through train(): the count of torch.optim steps in the cache key catches it.
    torch.manual_seed(11)
    model = _model("mmoe").eval()
    optimizer = torch.optim.Adam(model.dense_parameters(), lr=0.05, fused=fused_adam)
    sparse, dense = _batch(16, seed=11)
    for _ in range(3):
        model.eval()
        with torch.no_grad():
            fused = model(sparse, dense)
            model.use_fused_scoring = False
            torch.testing.assert_close(fused, model(sparse, dense), rtol=1e-5, atol=1e-5)
            model.use_fused_scoring = True
        if switch_modes:
            model.train()
        optimizer.zero_grad()
        model(sparse, dense).square().sum().backward()
        optimizer.step()
        model.eval()
        with torch.no_grad():
            assert not torch.allclose(model(sparse, dense), fused)


# --- fused embedding optimizer --------------------------------------------------------------------
def test_model_with_fused_embedding_optimizer_trains_rows():
    torch.manual_seed(10)
    model = _model("mmoe", embedding_optimizer={"kind": "rowwise_adagrad", "lr": 0.1, "eps": 1e-8})
    assert all(not p.requires_grad for p in model.embedding_parameters())
    assert all(p.requires_grad for p in model.dense_parameters())
    assert "embeddings.embedding_bags.item_id.momentum" in model.state_dict()
    optimizer = torch.optim.Adam(model.dense_parameters(), lr=1e-2)
    sparse, dense = _batch(16, seed=10)
    items = model.embeddings.embedding_bags["item_id"].weight
    before = items.detach().clone()
    tower_before = model.towers[0].linears[0].weight.detach().clone()
    loss = model(sparse, dense).sum()
    loss.backward()
    optimizer.step()
    touched = torch.zeros(items.shape[0], dtype=torch.bool)
    touched[sparse["item_id"]["values"]] = True
    assert items.grad is None
    assert bool((items[touched] != before[touched]).any(dim=1).all())  # every looked-up row moved
    assert torch.equal(items[~touched], before[~touched])
    assert not torch.equal(model.towers[0].linears[0].weight, tower_before)
    rebuilt = MultiTaskModel.from_config(json.loads(json.dumps(model.config)))
    rebuilt.load_state_dict(model.state_dict())
    torch.testing.assert_close(rebuilt.embeddings.embedding_bags["item_id"].momentum,
                               model.embeddings.embedding_bags["item_id"].momentum)


def test_shared_parameters_are_read_by_every_task():
    """GradNorm's shared layer: each task's output has a gradient on it."""
    torch.manual_seed(11)
    sparse, dense = _batch(12, seed=11)
    for name in ALL:
        model = _model(name)
        shared = model.shared_parameters()
        assert shared and all(p.requires_grad for p in shared), name
        dense_ids = {id(p) for p in model.dense_parameters()} | {id(p) for p in model.embedding_parameters()}
        assert all(id(p) in dense_ids for p in shared)
        out = model(sparse, dense)
        for t in range(out.shape[1]):
            grads = torch.autograd.grad(out[:, t].sum(), shared, retain_graph=True, allow_unused=True)
            assert all(g is not None for g in grads), (name, t)
            assert sum(float(g.abs().sum()) for g in grads) > 0, (name, t)
    ple = PLE(6, 2, num_levels=2, num_shared_experts=0, num_task_experts=1, expert_hidden=(4,))
    assert ple.shared_parameters() == []


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("name", ["mmoe", "ple1", "shared_bottom"])
def test_non_finite_dense_is_an_error_on_every_path(name, bad):
    # the fused multi_task_score path turned a NaN dense input into a plausible probability (its ReLU
    # drops NaN) while the PyTorch path returned NaN: refuse it on both, naming row and column
    model = _model(name)
    sparse, dense = _batch(5)
    dense[3, 1] = bad
    model.eval()
    for fused in (True, False):
        model.use_fused_scoring = fused
        with torch.no_grad(), pytest.raises(ValueError, match=r"dense must be finite, got .* at row 3, column 1"):
            model(sparse, dense)
    model.train()
    with pytest.raises(ValueError, match=r"dense must be finite"):
        model(sparse, dense)
