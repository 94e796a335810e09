"""The training step's faster pieces against what they replace: the cheap-mask dropout against the
dropout definition, and the fused Adam that `fit` uses against torch's per-parameter Adam."""

import pytest
import torch

from mtkernels.nn import MMoE, MultiTaskModel, TaskTower
from mtkernels.nn.towers import Expert, dropout
from mtkernels.training.loop import _fused_adam_supported


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_drops_p_and_keeps_the_mean(p):
    torch.manual_seed(0)
    x = torch.full((400, 500), 2.0)
    y = dropout(x, p, True)
    dropped = (y == 0).double().mean().item()
    # 200,000 draws: the fraction's standard error is below 0.0012
    assert abs(dropped - p) < 0.006
    kept = y[y != 0]
    effective = round(p * 65536) / 65536
    torch.testing.assert_close(kept, torch.full_like(kept, 2.0 / (1.0 - effective)))
    assert abs(y.mean().item() - 2.0) < 0.03  # inverted dropout: unbiased


def test_dropout_gradient_is_the_mask_times_the_scale():
    torch.manual_seed(1)
    x = torch.randn(64, 33, dtype=torch.float64, requires_grad=True)
    y = dropout(x, 0.25, True)
    upstream = torch.randn_like(y)
    (grad,) = torch.autograd.grad((y * upstream).sum(), x)
    scale = torch.where(x.detach() != 0, y.detach() / x.detach(), torch.zeros_like(x))
    torch.testing.assert_close(grad, upstream * scale)
    assert set(torch.unique(scale.round(decimals=6)).tolist()) <= {0.0, round(65536 / (65536 - 16384), 6)}


def test_dropout_identity_off_training_or_at_zero_and_seeded():
    x = torch.randn(10, 7)
    assert dropout(x, 0.3, False) is x
    assert dropout(x, 0.0, True) is x
    torch.manual_seed(5)
    a = dropout(x, 0.3, True)
    torch.manual_seed(5)
    b = dropout(x, 0.3, True)
    assert torch.equal(a, b)
    assert dropout(torch.zeros(0, 4), 0.3, True).shape == (0, 4)
    assert dropout(x.double(), 0.3, True).dtype == torch.float64


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
