"""Weight averaging (`mtkernels.training.weight_averaging`, `TrainConfig(ema_decay=...)`): the debiased
EMA against its closed form, swapping, state round trip, and `fit` validating, keeping and resuming
the averaged weights."""

import copy

import pytest
import torch

from mtkernels.training import TrainConfig, fit, load_checkpoint, validation_monitor
from mtkernels.training.weight_averaging import (ExponentialMovingAverage, averaged_tensors, load_model_average_state,
                                                  model_average_state)
from synthetic import make_data, one_thread, tiny_model  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def data():
    return make_data()


def _config(**kw):
    values = dict(epochs=3, batch_size=64, lr=1e-2, progress=False, patience=0, seed=3, ema_decay=0.9)
    values.update(kw)
    return TrainConfig(**values)


@pytest.mark.parametrize("decay", [0.5, 0.9, 0.998])
def test_average_is_the_debiased_exponential_mean(decay):
    g = torch.Generator().manual_seed(0)
    live = [torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(7, generator=g, dtype=torch.float64)]
    average = ExponentialMovingAverage(live, decay)
    seen = []
    for step in range(1, 13):
        for t in live:
            t.add_(torch.randn(t.shape, generator=g, dtype=torch.float64))
        seen.append([t.clone() for t in live])
        average.update()
        # reference: sum_i decay^(t-i) w_i / sum_i decay^(t-i), the initial weights not included
        factors = [decay ** (step - i) for i in range(1, step + 1)]
        for k in range(len(live)):
            want = sum(f * s[k] for f, s in zip(factors, seen)) / sum(factors)
            torch.testing.assert_close(average.average[k], want, rtol=1e-12, atol=1e-12)
    assert average.num_updates == 12
    first = ExponentialMovingAverage([torch.zeros(2)], 0.99)
    first.tensors[0].fill_(4.0)
    first.update()
    assert torch.equal(first.average[0], torch.full((2,), 4.0))  # one update: the weights themselves


def test_swap_and_averaged_block():
    live = [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])]
    average = ExponentialMovingAverage(live, 0.5)
    live[0].copy_(torch.tensor([3.0, 6.0]))
    live[1].fill_(5.0)
    average.update()  # first update: the average equals the live values
    live[0].fill_(0.0)
    live[1].fill_(1.0)
    average.update()  # (1 - 0.5) / (1 - 0.25) = 2/3 of the new values
    want = [torch.tensor([1.0, 2.0]), torch.tensor([[5.0 / 3 + 2.0 / 3]])]
    with average.averaged():
        torch.testing.assert_close(live[0], want[0])
        torch.testing.assert_close(live[1], want[1])
    assert torch.equal(live[0], torch.zeros(2)) and torch.equal(live[1], torch.ones(1, 1))
    with pytest.raises(RuntimeError, match="inside"):
        with average.averaged():
            raise RuntimeError("inside")
    assert torch.equal(live[0], torch.zeros(2))  # restored on an error too


def test_errors():
    with pytest.raises(ValueError, match="decay must be in"):
        ExponentialMovingAverage([torch.zeros(2)], 1.0)
    with pytest.raises(ValueError, match=r"tensors\[0\] must be floating point"):
        ExponentialMovingAverage([torch.zeros(2, dtype=torch.long)], 0.9)
    with pytest.raises(ValueError, match="at least one"):
        ExponentialMovingAverage([], 0.9)
    with pytest.raises(ValueError, match="ema_decay"):
        TrainConfig(ema_decay=1.0)


def test_model_average_state_round_trip(data):
    model = tiny_model(data, "mmoe", seed=1)
    average = ExponentialMovingAverage(averaged_tensors(model), 0.9)
    for step in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * (step + 1))
        average.update()
    state = model_average_state(model, average)
    assert state["num_updates"] == 3 and state["decay"] == 0.9
    # live = w0 + 0.6 after steps adding 0.1, 0.2, 0.3; the average weighs w0 + 0.6, + 0.3, + 0.1 by 1, 0.9, 0.81
    with torch.no_grad():
        name, live = next(iter(model.named_parameters()))
        want = live - 0.6 + (0.6 * 1 + 0.3 * 0.9 + 0.1 * 0.81) / (1 + 0.9 + 0.81)
    other = tiny_model(data, "mmoe", seed=2)
    restored = ExponentialMovingAverage(averaged_tensors(other), 0.9)
    load_model_average_state(other, restored, state)
    assert restored.num_updates == 3
    with restored.averaged():
        for key, value in state["parameters"].items():
            assert torch.equal(dict(other.named_parameters())[key].detach(), value), key
    torch.testing.assert_close(state["parameters"][name], want)


def test_averaged_tensors_cover_every_weight_once(data):
    model = tiny_model(data, "mmoe")
    tensors = averaged_tensors(model)
    assert len(tensors) == len(list(model.parameters()))  # tables (no grad: fused optimiser) included
    assert sum(t.numel() for t in tensors) == sum(p.numel() for p in model.parameters())


def test_fit_validates_and_keeps_the_average(data, tmp_path):
    path = str(tmp_path / "ema.pt")
    model = tiny_model(data, "mmoe", seed=1)
    config = _config()
    result = fit(model, data, config, checkpoint_path=path)
    checkpoint = load_checkpoint(path)
    state = checkpoint["trainer"]["weight_average"]
    assert state["decay"] == 0.9 and state["num_updates"] == 3 * -(-data.splits["train"].num_rows // 64)

    # the last epoch's recorded validation is the average's, not the live weights'
    last = copy.deepcopy(model)
    last.load_state_dict(checkpoint["model_state"])
    live_monitor = validation_monitor(last, data, config)["monitor"]
    average = ExponentialMovingAverage(averaged_tensors(last), 0.9)
    load_model_average_state(last, average, state)
    assert average.num_updates == state["num_updates"]
    for key, value in checkpoint["model_state"].items():  # the live weights are untouched
        assert torch.equal(last.state_dict()[key], value), key
    assert model_average_state(last, average)["parameters"].keys() == state["parameters"].keys()
    with average.averaged():
        assert validation_monitor(last, data, config)["monitor"] == pytest.approx(result.history[-1]["monitor"], abs=1e-9)
        averaged_state = {k: v.clone() for k, v in last.state_dict().items()}
    assert live_monitor != pytest.approx(result.history[-1]["monitor"], abs=1e-9)
    table = "embeddings.embedding_bags.user_id.weight"
    assert not torch.equal(averaged_state[table], checkpoint["model_state"][table])  # tables are averaged
    # the kept (best) state is the validated average, and it is what the model holds after fit
    assert validation_monitor(model, data, config)["monitor"] == pytest.approx(result.best_monitor, abs=1e-9)
    for key, value in checkpoint["best_model_state"].items():
        assert torch.equal(model.state_dict()[key], value), key
    if result.best_epoch == len(result.history) - 1:
        for key, value in averaged_state.items():
            assert torch.equal(checkpoint["best_model_state"][key], value), key


def test_resume_with_average_equals_uninterrupted_run(data, tmp_path):
    straight = tiny_model(data, "ple", seed=1)
    straight_result = fit(straight, data, _config(patience=1, epochs=4), checkpoint_path=str(tmp_path / "straight.pt"))
    path = str(tmp_path / "resume.pt")
    fit(tiny_model(data, "ple", seed=1), data, _config(patience=1, epochs=1), checkpoint_path=path)
    resumed = tiny_model(data, "ple", seed=99)  # different init: the checkpoint overrides it
    result = fit(resumed, data, _config(patience=1, epochs=4), checkpoint_path=path, resume=True)
    assert result.resumed_from_epoch == 0
    assert [h["monitor"] for h in result.history] == [h["monitor"] for h in straight_result.history]
    for key, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    a, b = load_checkpoint(str(tmp_path / "straight.pt")), load_checkpoint(path)
    for name, value in a["trainer"]["weight_average"]["parameters"].items():
        assert torch.equal(b["trainer"]["weight_average"]["parameters"][name], value), name
    with pytest.raises(ValueError, match=r"ema_decay \(0.0 in the checkpoint, 0.9 here\)"):
        plain = str(tmp_path / "plain.pt")
        fit(tiny_model(data, "ple", seed=1), data, _config(epochs=1, ema_decay=0.0), checkpoint_path=plain)
        fit(tiny_model(data, "ple", seed=1), data, _config(epochs=2), checkpoint_path=plain, resume=True)


def test_load_model_average_state_errors(data):
    model = tiny_model(data, "mmoe")
    average = ExponentialMovingAverage(averaged_tensors(model), 0.9)
    state = model_average_state(model, average)
    with pytest.raises(ValueError, match="decay 0.9"):
        load_model_average_state(model, ExponentialMovingAverage(averaged_tensors(model), 0.5), state)
    state["parameters"].pop("towers.0.linears.0.bias")
    with pytest.raises(ValueError, match="towers.0.linears.0.bias"):
        load_model_average_state(model, average, state)


def test_resume_refuses_a_changed_training_config_but_allows_more_epochs(data, tmp_path):
    # a changed lr would be silently overridden by Adam's restored state, and any other change makes
    # the continued run differ from an uninterrupted one: refused, naming the field
    path = str(tmp_path / "run.pt")
    fit(tiny_model(data, "mmoe", seed=1), data, _config(epochs=1), checkpoint_path=path)
    with pytest.raises(ValueError, match=r"lr \(0.01 in the checkpoint, 0.005 here\)"):
        fit(tiny_model(data, "mmoe", seed=1), data, _config(epochs=2, lr=0.005), checkpoint_path=path, resume=True)
    result = fit(tiny_model(data, "mmoe", seed=1), data, _config(epochs=2, patience=3), checkpoint_path=path, resume=True)
    assert result.resumed_from_epoch == 0 and len(result.history) == 2


def test_resume_with_average_and_uncertainty_weighting_equals_uninterrupted_run(data, tmp_path):
    """The MMoE/PLE presets train with both (presets.train_values): the learned log-variances and
    their Adam state resume exactly with the averaged weights."""
    config = dict(patience=1, loss_weighting="uncertainty")
    straight = tiny_model(data, "mmoe", seed=2)
    straight_result = fit(straight, data, _config(epochs=3, **config), checkpoint_path=str(tmp_path / "straight.pt"))
    path = str(tmp_path / "resume.pt")
    fit(tiny_model(data, "mmoe", seed=2), data, _config(epochs=1, **config), checkpoint_path=path)
    resumed = tiny_model(data, "mmoe", seed=99)
    result = fit(resumed, data, _config(epochs=3, **config), checkpoint_path=path, resume=True)
    assert [h["task_weights"] for h in result.history] == [h["task_weights"] for h in straight_result.history]
    assert straight_result.history[-1]["task_weights"] != [1.0, 1.0, 1.0]  # the weights were learned
    assert [h["monitor"] for h in result.history] == [h["monitor"] for h in straight_result.history]
    for key, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
