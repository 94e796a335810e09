"""The contiguous Adam buffers of `mtkernels.training.flat_parameters` against torch's Adam over
the parameters one by one (bit for bit), and the vectorised `masked_task_losses` against a loop over tasks."""

import copy

import pytest
import torch
import torch.nn.functional as F

from mtkernels.nn import MultiTaskModel
from mtkernels.training import masked_task_losses
from mtkernels.training.flat_parameters import all_receive_gradients, flatten_groups, flattenable
from mtkernels.training.losses import PROBABILITY_EPS


def _model(seed=0, backbone="mmoe"):
    torch.manual_seed(seed)
    # sizes of both kinds: multiples of 16 (expert layers) and others (gates, towers)
    kwargs = ({"num_experts": 3, "expert_hidden": [16]} if backbone == "mmoe"
              else {"num_shared_experts": 1, "num_task_experts": 1, "expert_hidden": [16]})
    return MultiTaskModel([{"name": "item", "num_embeddings": 9, "multi_valued": False, "side": "item"}], 4,
                          [{"name": "click", "kind": "binary"}, {"name": "rating", "kind": "regression"}],
                          backbone=backbone, embedding_dim=4, backbone_kwargs=kwargs, tower_hidden=[5],
                          dropout=0.2, embedding_optimizer={"kind": "rowwise_adagrad", "lr": 0.05, "eps": 1e-8})


def _batch(step):
    from mtkernels import KeyedJaggedTensor

    g = torch.Generator().manual_seed(100 + step)
    n = 7 + step % 3  # ragged batch sizes
    sparse = KeyedJaggedTensor(["item"], torch.randint(0, 9, (n,), generator=g), lengths=torch.ones(n, dtype=torch.long))
    labels = torch.stack([(torch.rand(n, generator=g) < 0.5).float(), torch.randint(1, 6, (n,), generator=g).float()], 1)
    return sparse, torch.randn(n, 4, generator=g), labels


def _train(model, flat: bool, steps=6):
    decay = [p for n, p in model.named_parameters() if n.startswith("backbone")]
    rest = [p for n, p in model.named_parameters() if n.startswith("towers")]
    groups = [{"params": decay, "weight_decay": 1e-3}, {"params": rest, "weight_decay": 0.0}]
    buffers = flatten_groups(groups) if flat else None
    optimizer = torch.optim.Adam(buffers.groups if flat else groups, lr=1e-2, fused=True)
    torch.manual_seed(7)  # the dropout masks
    for step in range(steps):
        sparse, dense, labels = _batch(step)
        loss = masked_task_losses(model(sparse, dense), labels, ["binary", "regression"]).sum()
        if flat:
            buffers.zero_grad()
        else:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if flat:
            buffers.gather_grads()
        optimizer.step()
    return buffers


@pytest.mark.parametrize("backbone", ["mmoe", "ple"])
def test_flat_adam_equals_adam_per_parameter_bit_for_bit(backbone):
    per_tensor, flat = _model(backbone=backbone), _model(backbone=backbone)
    _train(per_tensor, flat=False)
    buffers = _train(flat, flat=True)
    for (name, a), b in zip(per_tensor.state_dict().items(), flat.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(per_tensor.state_dict()["towers.0.linears.0.weight"],
                           _model(backbone=backbone).state_dict()["towers.0.linears.0.weight"])
    # the parameters of a multiple of 16 values are views of the buffer, which Adam updated
    start = 0
    for p in buffers.flat[0]:
        assert p.numel() % 16 == 0 and p.data_ptr() == buffers.buffers[0][start:].data_ptr()
        start += p.numel()
    assert start == buffers.buffers[0].numel()
    assert all(p.numel() % 16 for p in buffers.rest[0]) and buffers.rest[0]  # the gates' biases
    assert buffers.groups[0]["params"][1:] == buffers.rest[0]


def test_gather_grads_copies_each_gradient_into_its_slice():
    params = [torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(32)), torch.nn.Parameter(torch.randn(3)),
              torch.nn.Parameter(torch.randn(16))]
    values = torch.cat([params[i].detach().reshape(-1) for i in (0, 1, 3)])
    flat = flatten_groups([{"params": params, "weight_decay": 0.5}])
    assert flat.groups[0]["weight_decay"] == 0.5
    assert flat.groups[0]["params"][0] is flat.buffers[0] and flat.groups[0]["params"][1] is params[2]
    assert torch.equal(flat.buffers[0].detach(), values)
    grads = [torch.randn(4, 4).t(), torch.randn(32)]  # a non-contiguous gradient
    params[0].grad, params[1].grad = grads
    params[2].grad = torch.randn(3)
    flat.gather_grads()  # params[3] has no gradient: zeros in its slice
    assert torch.equal(flat.buffers[0].grad, torch.cat([grads[0].reshape(-1), grads[1], torch.zeros(16)]))
    flat.zero_grad()
    assert all(p.grad is None for p in params)
    with torch.no_grad():
        flat.buffers[0].add_(1.0)
    assert torch.equal(params[1].detach(), values[16:48] + 1.0)
    none_flat = flatten_groups([{"params": [torch.nn.Parameter(torch.randn(3))]}])
    assert none_flat.buffers == [None] and len(none_flat.groups[0]["params"]) == 1
    none_flat.gather_grads()


def test_flattenable_rejects_what_one_buffer_cannot_hold():
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    assert flattenable([{"params": [a]}, {"params": [torch.nn.Parameter(torch.randn(2))]}])
    assert not flattenable([{"params": [a, b]}])  # two dtypes in one group
    assert not flattenable([{"params": [a]}, {"params": [a]}])  # one tensor in two groups
    tied = torch.nn.Parameter(torch.randn(4, 4))
    alias = torch.nn.Parameter(torch.empty(0))
    alias.data = tied.data.t()  # the same memory, another shape: tied weights
    assert not flattenable([{"params": [tied, alias]}])
    # a model trained a second time: its parameters are disjoint views of the first buffer
    params = [torch.nn.Parameter(torch.randn(16)), torch.nn.Parameter(torch.randn(2, 16))]
    first = flatten_groups([{"params": params}])
    assert params[0].untyped_storage().data_ptr() == params[1].untyped_storage().data_ptr()
    assert flattenable([{"params": params}])
    second = flatten_groups([{"params": params}])
    assert second.buffers[0].data_ptr() != first.buffers[0].data_ptr()
    assert torch.equal(second.buffers[0].detach(), first.buffers[0].detach())
    base = torch.nn.Parameter(torch.randn(6))
    assert not flattenable([{"params": [base[:3]]}])  # not a leaf
    assert not flattenable([{"params": []}])
    with pytest.raises(ValueError, match="one dtype and device"):
        flatten_groups([{"params": [a, b]}])


def test_all_receive_gradients():
    a, b = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
    assert all_receive_gradients([a, b], (a * b).sum())
    assert all_receive_gradients([a, b], (a * 0 + b).sum())  # a zero gradient is a gradient
    assert not all_receive_gradients([a, b], a.sum())
    assert all_receive_gradients([], a.sum())


def test_fit_flattens_only_when_every_parameter_is_trained():
    from mtkernels.training.loop import _flat_groups
    from mtkernels.training.weighting import make_weighting

    class Data:
        tasks = [type("Task", (), {"name": "click", "kind": "binary"})(), type("Task", (), {"name": "rating", "kind": "regression"})()]
        splits = {"train": type("Split", (), {"num_rows": 9})()}

        def batches(self, split, batch_size, shuffle=False, seed=None):
            sparse, dense, labels = _batch(2)
            yield type("Batch", (), {"sparse": sparse, "dense": dense, "labels": labels})()

    model = _model()
    weighting = make_weighting("fixed", Data.tasks, None, 1.5)
    rng = torch.get_rng_state()
    flat = _flat_groups(model, Data(), weighting, [{"params": model.dense_parameters()}])
    assert flat is not None and torch.equal(torch.get_rng_state(), rng)  # no dropout mask drawn
    unused = torch.nn.Parameter(torch.randn(2))
    assert _flat_groups(_model(), Data(), weighting, [{"params": _model().dense_parameters() + [unused]}]) is None


def _losses_task_by_task(predictions, labels, kinds):
    """The loss of each task on its own column: the spec `masked_task_losses` vectorises."""
    losses = []
    for t, kind in enumerate(kinds):
        p, y = predictions[:, t], labels[:, t]
        mask = ~torch.isnan(y)
        y = torch.where(mask, y, torch.zeros_like(y))
        if kind == "binary":
            element = F.binary_cross_entropy(p.clamp(PROBABILITY_EPS, 1 - PROBABILITY_EPS), y, reduction="none")
        else:
            element = (p - y) ** 2
        weight = mask.to(element.dtype)
        losses.append((element * weight).sum() / weight.sum().clamp_min(1.0))
    return torch.stack(losses) if losses else predictions.new_zeros(0)


@pytest.mark.parametrize("kinds", [["binary", "binary", "regression"], ["regression", "binary"],
                                   ["binary", "regression", "binary"], ["binary"], ["regression", "regression"]])
@pytest.mark.parametrize("n", [0, 1, 7, 2049])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_vectorised_losses_equal_task_by_task_bit_for_bit(kinds, n, dtype):
    g = torch.Generator().manual_seed(n + len(kinds))
    predictions = torch.rand(n, len(kinds), generator=g, dtype=dtype)
    labels = (torch.rand(n, len(kinds), generator=g) < 0.5).to(dtype)
    for t, kind in enumerate(kinds):
        if kind == "regression":
            predictions[:, t] *= 5
            labels[:, t] = torch.randint(1, 6, (n,), generator=g).to(dtype)
    labels[torch.rand(n, len(kinds), generator=g) < 0.3] = float("nan")
    a, b = predictions.clone().requires_grad_(), predictions.clone().requires_grad_()
    ours, spec = masked_task_losses(a, labels, kinds), _losses_task_by_task(b, labels, kinds)
    assert torch.equal(ours, spec)
    weights = torch.arange(1, len(kinds) + 1, dtype=dtype)
    (ours * weights).sum().backward()
    (spec * weights).sum().backward()
    assert torch.equal(a.grad, b.grad)


def test_per_parameter_adam_state_converts_to_the_flat_buffers():
    # a checkpoint written by Adam over the parameters one by one resumes on the flat buffers
    def groups_of(model):
        return [{"params": [p for n, p in model.named_parameters() if n.startswith("backbone")], "weight_decay": 1e-3},
                {"params": [p for n, p in model.named_parameters() if n.startswith("towers")], "weight_decay": 0.0}]

    def steps(model, optimizer, flat, first, last):
        torch.manual_seed(first)
        for step in range(first, last):
            sparse, dense, labels = _batch(step)
            loss = masked_task_losses(model(sparse, dense), labels, ["binary", "regression"]).sum()
            optimizer.zero_grad(set_to_none=True) if flat is None else flat.zero_grad()
            loss.backward()
            if flat is not None:
                flat.gather_grads()
            optimizer.step()

    straight = _model()
    optimizer = torch.optim.Adam(groups_of(straight), lr=1e-2, fused=True)
    steps(straight, optimizer, None, 0, 3)
    # deep copies: Adam and the fused table update keep changing the state tensors in place
    saved_model, saved_optimizer = copy.deepcopy(straight.state_dict()), copy.deepcopy(optimizer.state_dict())
    steps(straight, optimizer, None, 3, 6)

    resumed = _model(seed=1)
    resumed.load_state_dict(saved_model)
    flat = flatten_groups(groups_of(resumed))
    optimizer = torch.optim.Adam(flat.groups, lr=1e-2, fused=True)
    converted = flat.adam_state_dict(saved_optimizer)
    assert [len(g["params"]) for g in converted["param_groups"]] == [len(g["params"]) for g in flat.groups]
    assert converted["state"][0]["exp_avg"].numel() == flat.buffers[0].numel()
    optimizer.load_state_dict(converted)
    already_flat = optimizer.state_dict()
    assert flat.adam_state_dict(already_flat) is already_flat
    steps(resumed, optimizer, flat, 3, 6)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name

    with pytest.raises(ValueError, match="groups of"):
        flat.adam_state_dict({"state": {}, "param_groups": [{"params": [0, 1]}]})
