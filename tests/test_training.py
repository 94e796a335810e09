"""Losses, loss weighting, checkpoints and TrainConfig of `mtkernels.training`."""

import math
import os

import pytest
import torch
import torch.nn.functional as F

from mtkernels.training import (FixedWeighting, GradNorm, TrainConfig, UncertaintyWeighting, load_checkpoint,
                                make_weighting, masked_task_losses, save_checkpoint)

KINDS = ["binary", "binary", "regression"]


def _random(n, seed=0, nan_fraction=0.4):
    g = torch.Generator().manual_seed(seed)
    probs = torch.rand(n, 3, generator=g).clamp(0.01, 0.99)
    preds = probs.clone()
    preds[:, 2] = torch.randn(n, generator=g) * 2 + 3
    labels = torch.stack([(torch.rand(n, generator=g) < 0.5).float(), (torch.rand(n, generator=g) < 0.5).float(),
                          torch.randint(1, 6, (n,), generator=g).float()], 1)
    labels[torch.rand(n, 3, generator=g) < nan_fraction] = float("nan")
    return preds, labels


@pytest.mark.parametrize("n,seed", [(1, 0), (37, 1), (500, 2)])
def test_masked_losses_match_loss_over_labelled_rows(n, seed):
    preds, labels = _random(n, seed)
    losses = masked_task_losses(preds, labels, KINDS)
    for t, kind in enumerate(KINDS):
        keep = ~torch.isnan(labels[:, t])
        if not keep.any():
            assert losses[t] == 0
            continue
        p, y = preds[keep, t], labels[keep, t]
        expected = F.binary_cross_entropy(p, y) if kind == "binary" else F.mse_loss(p, y)
        torch.testing.assert_close(losses[t], expected)


def test_task_without_labels_adds_zero_and_a_zero_gradient():
    preds, labels = _random(16)
    labels[:, 1] = float("nan")
    preds.requires_grad_(True)
    losses = masked_task_losses(preds, labels, KINDS)
    assert losses[1].item() == 0.0
    losses.sum().backward()
    assert torch.isfinite(preds.grad).all()
    assert (preds.grad[:, 1] == 0).all()
    assert (preds.grad[:, 0] != 0).any()


def test_all_labels_missing_and_empty_batch_give_finite_zero():
    preds = torch.full((5, 3), 0.5, requires_grad=True)
    labels = torch.full((5, 3), float("nan"))
    losses = masked_task_losses(preds, labels, KINDS)
    assert torch.equal(losses, torch.zeros(3))
    losses.sum().backward()
    assert torch.equal(preds.grad, torch.zeros(5, 3))
    empty = masked_task_losses(torch.zeros(0, 3), torch.zeros(0, 3), KINDS)
    assert torch.equal(empty, torch.zeros(3))


def test_saturated_probabilities_give_finite_loss():
    preds = torch.tensor([[0.0, 1.0, 0.0]], requires_grad=True)
    labels = torch.tensor([[1.0, 0.0, 2.0]])
    losses = masked_task_losses(preds, labels, KINDS)
    assert torch.isfinite(losses).all()
    torch.testing.assert_close(losses[0], torch.tensor(-math.log(1e-7)), rtol=1e-4, atol=1e-4)
    losses.sum().backward()
    assert torch.isfinite(preds.grad).all()


def test_masked_losses_reject_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        masked_task_losses(torch.zeros(4, 3), torch.zeros(4, 2), KINDS)
    with pytest.raises(ValueError, match="3 columns"):
        masked_task_losses(torch.zeros(4, 3), torch.zeros(4, 3), KINDS[:2])
    with pytest.raises(ValueError, match="task kind"):
        masked_task_losses(torch.zeros(4, 3), torch.zeros(4, 3), ["binary", "ranking", "regression"])


def test_fixed_weighting():
    w = FixedWeighting(3, [1.0, 0.5, 0.1])
    losses = torch.tensor([2.0, 4.0, 10.0])
    assert w.combine(losses).item() == pytest.approx(2.0 + 2.0 + 1.0)
    assert torch.equal(FixedWeighting(3).weights(), torch.ones(3))
    with pytest.raises(ValueError, match="one entry per task"):
        FixedWeighting(3, [1.0])
    with pytest.raises(ValueError, match="non-negative"):
        FixedWeighting(2, [1.0, -1.0])


def test_uncertainty_weighting_follows_kendall_et_al():
    w = UncertaintyWeighting(KINDS)
    with torch.no_grad():
        w.log_variance.copy_(torch.tensor([0.3, -0.2, 1.0]))
    losses = torch.tensor([0.7, 0.4, 1.5])
    s = w.log_variance.detach()
    expected = (torch.exp(-s[0]) * 0.7 + 0.5 * s[0]) + (torch.exp(-s[1]) * 0.4 + 0.5 * s[1]) \
        + (0.5 * torch.exp(-s[2]) * 1.5 + 0.5 * s[2])
    total = w.combine(losses)
    torch.testing.assert_close(total, expected)
    total.backward()
    # d/ds (c e^{-s} L + s/2) = -c e^{-s} L + 1/2, zero at s* = log(2 c L)
    scale = torch.tensor([1.0, 1.0, 0.5])
    torch.testing.assert_close(w.log_variance.grad, -scale * torch.exp(-s) * losses + 0.5)
    optimum = torch.log(2 * scale * losses)
    with torch.no_grad():
        w.log_variance.copy_(optimum)
    w.log_variance.grad = None
    w.combine(losses).backward()
    torch.testing.assert_close(w.log_variance.grad, torch.zeros(3), atol=1e-6, rtol=0)


def test_gradnorm_moves_weight_to_the_task_with_smaller_gradients():
    torch.manual_seed(0)
    shared = torch.nn.Linear(4, 4)
    x = torch.randn(32, 4)
    w = GradNorm(2, alpha=1.5, lr=0.05)
    for _ in range(5):
        h = shared(x)
        # task 0's gradient at the shared layer is ~10x task 1's
        losses = torch.stack([(10 * h[:, 0]).pow(2).mean(), h[:, 1].pow(2).mean()])
        w.update(losses, list(shared.parameters()))
    weights = w.weights()
    assert weights.sum().item() == pytest.approx(2.0, abs=1e-5)
    assert weights[0] < 1.0 < weights[1]
    state = w.state_dict()
    assert set(state) == {"task_weights", "initial_losses"}


def test_gradnorm_skips_tasks_without_labels():
    shared = torch.nn.Linear(3, 3)
    h = shared(torch.randn(8, 3))
    w = GradNorm(3)
    losses = torch.stack([h[:, 0].pow(2).mean(), h.new_zeros(()), h[:, 2].pow(2).mean()])
    w.update(losses, list(shared.parameters()))
    assert torch.isfinite(w.weights()).all()
    assert w.initial_losses[1] == 0
    with pytest.raises(ValueError, match="shared parameter"):
        w.update(losses, [])


def test_make_weighting():
    assert isinstance(make_weighting("fixed", KINDS), FixedWeighting)
    assert isinstance(make_weighting("uncertainty", KINDS), UncertaintyWeighting)
    assert isinstance(make_weighting("gradnorm", KINDS), GradNorm)
    with pytest.raises(ValueError, match="loss_weighting"):
        make_weighting("dwa", KINDS)


def test_checkpoint_round_trip_and_atomic_write(tmp_path):
    path = str(tmp_path / "run" / "model.pt")
    save_checkpoint(path, {"model_state": {"w": torch.arange(3.0)}, "epoch": 1})
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["model_state"]["w"], torch.arange(3.0)) and loaded["epoch"] == 1

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        save_checkpoint(path, {"bad": Unpicklable()})
    # the earlier checkpoint survives a failed write, and no temporary file is left behind
    assert load_checkpoint(path)["epoch"] == 1
    assert os.listdir(tmp_path / "run") == ["model.pt"]


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(str(tmp_path / "missing.pt"))
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(1)}, other)
    with pytest.raises(ValueError, match="not an mtkernels checkpoint"):
        load_checkpoint(str(other))
    text = tmp_path / "log.csv"  # not a torch file at all: the same ValueError, not an UnpicklingError
    text.write_text("uid,iid,click\n1,2,1\n")
    with pytest.raises(ValueError, match="log.csv is not an mtkernels checkpoint"):
        load_checkpoint(str(text))


def test_train_config_validation():
    assert TrainConfig.from_dict(TrainConfig(epochs=3).to_dict()) == TrainConfig(epochs=3)
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="monitor"):
        TrainConfig(monitor="accuracy")
    with pytest.raises(ValueError, match="loss_weighting"):
        TrainConfig(loss_weighting="equal")
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        TrainConfig.from_dict({"epochs": 1, "learning_rate": 0.1})


def test_checkpoint_gets_the_usual_file_permissions(tmp_path):
    path = tmp_path / "perm.pt"
    save_checkpoint(str(path), {"epoch": 0})
    umask = os.umask(0)
    os.umask(umask)
    assert (path.stat().st_mode & 0o777) == (0o666 & ~umask)


def test_load_checkpoint_names_a_truncated_or_corrupt_file(tmp_path):
    # a checkpoint cut short (a copy interrupted, a full disk) and text that legacy unpickling half-parses
    path = tmp_path / "model.pt"
    save_checkpoint(str(path), {"model_state": {"w": torch.arange(1000.0)}, "epoch": 1})
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    garbage = tmp_path / "garbage.pt"
    garbage.write_text("garbage\n")
    for bad in (truncated, garbage):
        with pytest.raises(ValueError, match=f"{bad.name} is not an mtkernels checkpoint"):
            load_checkpoint(str(bad))


def test_unknown_monitor_tasks_or_validation_split_are_refused_before_training(tmp_path):
    # they were found by the first validation, after a whole epoch of training (no checkpoint written)
    from mtkernels.training import fit

    from synthetic import make_data, tiny_model

    data = make_data()
    model = tiny_model(data)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = str(tmp_path / "run.pt")
    for values, message in (({"monitor_tasks": ["lik"]}, r"monitor_tasks \['lik'\] are not tasks of the data"),
                            ({"validation_split": "vall"}, r"validation_split 'vall' is not a split of synthetic")):
        config = TrainConfig(epochs=1, batch_size=64, progress=False, **values)
        with pytest.raises(ValueError, match=message):
            fit(model, data, config, checkpoint_path=path)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        assert not os.path.exists(path)
