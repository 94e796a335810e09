"""The training step's faster pieces against what they replace: modules drop out in training only
(the `relu_dropout` op itself: tests/test_training_ops.py), the batched training forward against the
modules one by one, and the fused Adam that `fit` uses against torch's per-parameter Adam."""

import pytest
import torch

from mtkernels.nn import MMoE, MultiTaskModel, TaskTower
from mtkernels.nn.towers import Expert
from mtkernels.training.loop import _fused_adam_supported


@pytest.mark.parametrize("module", ["expert", "tower", "mmoe"])
def test_modules_use_dropout_in_training_only(module):
    torch.manual_seed(2)
    net = {"expert": lambda: Expert(6, (8, 5), dropout=0.5), "tower": lambda: TaskTower(6, (8,), dropout=0.5),
           "mmoe": lambda: MMoE(6, 2, num_experts=3, expert_hidden=(8,), dropout=0.5)}[module]()
    x = torch.randn(50, 6)
    out = lambda: torch.cat([o.reshape(50, -1) for o in (net(x) if module == "mmoe" else [net(x)])], 1)  # noqa: E731
    net.train()
    first, second = out(), out()
    assert not torch.equal(first, second)  # a fresh mask per call
    net.eval()
    torch.testing.assert_close(out(), out())


def _adam_run(fused: bool, steps: int = 30):
    torch.manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in [(16, 9), (16,), (3, 16), (3,)]]
    optimizer = torch.optim.Adam([{"params": params[:2], "weight_decay": 1e-5}, {"params": params[2:], "weight_decay": 0.0}],
                                 lr=2e-3, fused=fused)
    generator = torch.Generator().manual_seed(4)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()
    return [p.detach() for p in params]


def test_fused_adam_equals_adam():
    for fused, plain in zip(_adam_run(True), _adam_run(False)):
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)


def test_fused_adam_supported_only_for_one_float_device():
    floats = [{"params": [torch.nn.Parameter(torch.randn(3))]}]
    assert _fused_adam_supported(floats)
    assert not _fused_adam_supported([{"params": []}])
    model = MultiTaskModel([{"name": "item", "num_embeddings": 5, "multi_valued": False, "side": "item"}], 2,
                           [{"name": "click", "kind": "binary"}], backbone="mmoe", embedding_dim=4,
                           backbone_kwargs={"num_experts": 2, "expert_hidden": [4]})
    assert _fused_adam_supported([{"params": model.dense_parameters()}])


def test_fused_scoring_sees_fused_adam_steps():
    # torch's fused Adam updates in place without bumping version counters; the model's packed
    # scoring parameters must still follow the steps (they once scored with stale weights).
    torch.manual_seed(6)
    model = MultiTaskModel([{"name": "item", "num_embeddings": 5, "multi_valued": False, "side": "item"}], 2,
                           [{"name": "click", "kind": "binary"}, {"name": "rating", "kind": "regression"}],
                           backbone="mmoe", embedding_dim=4, backbone_kwargs={"num_experts": 2, "expert_hidden": [4]})
    from mtkernels import KeyedJaggedTensor

    sparse = KeyedJaggedTensor(["item"], torch.tensor([0, 3, 4]), lengths=torch.ones(3, dtype=torch.long))
    dense = torch.randn(3, 2)
    optimizer = torch.optim.Adam(model.dense_parameters(), lr=0.1, fused=True)
    for _ in range(2):
        model.eval()
        with torch.no_grad():
            fused = model(sparse, dense)
        model.use_fused_scoring = False
        with torch.no_grad():
            eager = model(sparse, dense)
        model.use_fused_scoring = True
        torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)
        model.train()
        model(sparse, dense).sum().backward()
        optimizer.step()
        optimizer.zero_grad()


def _by_hand_cgc(cgc, x):
    """One first-level CGC layer from its modules one by one: task t's softmax gate over the shared
    experts and its own, then the shared gate (when there is one) over every expert."""
    shared = [e(x) for e in cgc.shared_experts]
    own = [[e(x) for e in task] for task in cgc.task_experts]
    mixes = []
    for t, gate in enumerate(cgc.task_gates):
        stacked = torch.stack(shared + own[t], 1)
        g = torch.ones(x.shape[0], 1) if isinstance(gate, torch.nn.Identity) else torch.softmax(gate(x), -1)
        mixes.append((g.unsqueeze(-1) * stacked).sum(1))
    if cgc.shared_gate is not None:
        everything = torch.stack(shared + [o for task in own for o in task], 1)
        mixes.append((torch.softmax(cgc.shared_gate(x), -1).unsqueeze(-1) * everything).sum(1))
    return mixes


@pytest.mark.parametrize("shared, own, levels", [(2, 1, 1), (0, 1, 1), (1, 0, 1), (1, 2, 2), (0, 2, 1)])
def test_ple_one_gemm_path_equals_its_modules(shared, own, levels):
    from mtkernels.nn import PLE

    torch.manual_seed(7)
    ple = PLE(9, num_tasks=3, num_levels=levels, num_shared_experts=shared, num_task_experts=own, expert_hidden=(5,))
    x = torch.randn(21, 9, requires_grad=True)
    got = ple.levels[0].mixed([x] * 3, x)
    want = torch.stack(_by_hand_cgc(ple.levels[0], x), 1)
    torch.testing.assert_close(got, want)
    upstream = torch.randn_like(got)
    params = [x] + [p for p in ple.levels[0].parameters()]
    got_grads = torch.autograd.grad((got * upstream).sum(), params, allow_unused=True)
    want_grads = torch.autograd.grad((want * upstream).sum(), params, allow_unused=True)
    for g, w in zip(got_grads, want_grads):
        if w is None:
            assert g is None or bool((g == 0).all())
        else:
            torch.testing.assert_close(g, w)


@pytest.mark.parametrize("backbone, kwargs", [
    ("mmoe", {"num_experts": 3, "expert_hidden": [6]}),
    ("mmoe", {"num_experts": 2, "expert_hidden": [6, 4]}),
    ("mmoe", {"num_experts": 1, "expert_hidden": [6]}),
    ("ple", {"num_levels": 2, "num_shared_experts": 1, "num_task_experts": 1, "expert_hidden": [6]}),
    ("shared_bottom", {"hidden": [8, 6]}),
    ("esmm", {"hidden": [6]}),
])
@pytest.mark.parametrize("batch", [1, 37])
def test_batched_training_forward_equals_towers_one_by_one(backbone, kwargs, batch):
    from mtkernels import KeyedJaggedTensor

    torch.manual_seed(8)
    tasks = [{"name": "click", "kind": "binary"}, {"name": "like", "kind": "binary"}, {"name": "rating", "kind": "regression"}]
    model = MultiTaskModel([{"name": "item", "num_embeddings": 9, "multi_valued": False, "side": "item"}], 3, tasks,
                           backbone=backbone, embedding_dim=4, backbone_kwargs=kwargs, tower_hidden=[5])
    model.train()  # dropout 0: training computes the eval network, through the training path
    sparse = KeyedJaggedTensor(["item"], torch.randint(0, 9, (batch,)), lengths=torch.ones(batch, dtype=torch.long))
    dense = torch.randn(batch, 3)
    got = model(sparse, dense)
    x = model._inputs(sparse, dense)
    values = [tower(r) for tower, r in zip(model.towers, model.backbone(x))]
    columns = [torch.sigmoid(v) if t["kind"] == "binary" else v for t, v in zip(tasks, values)]
    want = model.backbone.outputs(torch.stack(columns, 1))
    torch.testing.assert_close(got, want)
    dense_params = model.dense_parameters()
    upstream = torch.randn_like(got)
    got_grads = torch.autograd.grad((got * upstream).sum(), dense_params, allow_unused=True)
    want_grads = torch.autograd.grad((want * upstream).sum(), dense_params, allow_unused=True)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("hidden", [(), (5,), (5, 4)])
def test_tower_outputs_equal_the_towers_one_by_one(hidden):
    """The batched towers (the last layer as [T, 1, I] x [T, I, B]) against each tower on its own
    representation: outputs and the gradients of the representations and every tower parameter."""
    from mtkernels.nn.towers import tower_outputs

    torch.manual_seed(10)
    towers = torch.nn.ModuleList(TaskTower(6, hidden) for _ in range(3))
    representations = torch.randn(37, 3, 6, requires_grad=True)
    got = tower_outputs(list(towers), representations)
    want = torch.stack([tower(representations[:, t]) for t, tower in enumerate(towers)], 1)
    assert got.shape == (37, 3)
    torch.testing.assert_close(got, want)
    upstream = torch.randn_like(got)
    params = [representations] + list(towers.parameters())
    got_grads = torch.autograd.grad((got * upstream).sum(), params)
    want_grads = torch.autograd.grad((want * upstream).sum(), params)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)
        assert bool(w.abs().sum() > 0)


def test_tower_outputs_needs_one_representation_per_tower():
    from mtkernels.nn.towers import tower_outputs

    towers = [TaskTower(4, (3,)) for _ in range(2)]
    with pytest.raises(ValueError, match=r"representations must be \[B, 2, H\]"):
        tower_outputs(towers, torch.randn(5, 3, 4))
