"""`mtkernels.transfer`: copying shared parts into new models, freezing (no gradient, no optimizer
state), row matching by external id, id dropout for cold start, and the CLI's --init-from/--freeze."""

import copy
import dataclasses
import json
import math
import os

import numpy as np
import pytest
import torch

from mtkernels import cli
from mtkernels.nn import MultiTaskModel
from mtkernels.serving import Ranker, serving_tables
from mtkernels.training import TrainConfig, fit
from mtkernels.training.id_dropout import drop_ids
from mtkernels.training.loop import _dense_optimizer_groups
from mtkernels.training.weighting import make_weighting
from mtkernels.transfer import (L2SP, RECOMMENDED_LR_SCALES, cold_topk_metrics, drop_unlabelled_rows, frozen_summary,
                                keep_label_fraction, popularity_topk_metrics, select_tasks, transfer)
from synthetic import fused_embedding_optimizer, make_data, one_thread, tiny_model  # noqa: F401 (autouse fixture)

QUICK = dict(epochs=2, batch_size=64, progress=False, patience=0)


def _model(data, backbone="mmoe", seed=0, optimizer="fused"):
    kwargs = {"mmoe": {"num_experts": 2, "expert_hidden": [8]},
              "ple": {"num_shared_experts": 1, "num_task_experts": 1, "expert_hidden": [8]},
              "shared_bottom": {"hidden": [8]}}[backbone]
    torch.manual_seed(seed)
    return MultiTaskModel(data.features, data.dense_dim, data.tasks, backbone=backbone, embedding_dim=4,
                          backbone_kwargs=kwargs, tower_hidden=[4],
                          embedding_optimizer=fused_embedding_optimizer() if optimizer == "fused" else None)


@pytest.fixture(scope="module")
def pretrained():
    """A click-only MMoE trained on the synthetic data (the source of every transfer)."""
    data = make_data()
    click = select_tasks(data, ["click"])
    source = _model(click)
    fit(source, click, TrainConfig(**QUICK, id_dropout=0.3))
    return data, click, source


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_select_tasks_and_label_fraction():
    data = make_data()
    like = select_tasks(data, ["like", "rating"])
    assert [t.name for t in like.tasks] == ["like", "rating"]
    assert torch.equal(like.splits["train"].labels, data.splits["train"].labels[:, 1:], ) or torch.allclose(
        like.splits["train"].labels, data.splits["train"].labels[:, 1:], equal_nan=True)
    assert data.splits["train"].labels.shape[1] == 3  # the source data set is untouched
    part, kept = keep_label_fraction(like, ["like", "rating"], 0.25, seed=3)
    labels, users = part.splits["train"].labels, part.splits["train"].user_row
    assert kept.numel() == round(0.25 * torch.unique(data.splits["train"].user_row).numel())
    assert torch.isnan(labels[~torch.isin(users, kept)]).all()
    assert torch.allclose(labels[torch.isin(users, kept)], like.splits["train"].labels[torch.isin(users, kept)],
                          equal_nan=True)
    again, kept_again = keep_label_fraction(like, ["like", "rating"], 0.25, seed=3)
    assert torch.equal(kept, kept_again)  # a seeded draw
    dense = drop_unlabelled_rows(part)
    assert dense.splits["train"].num_rows == int((~torch.isnan(labels)).any(1).sum())
    assert not torch.isnan(dense.splits["train"].labels).all(1).any()
    assert dense.splits["val"].num_rows == data.splits["val"].num_rows
    with pytest.raises(ValueError, match="tasks"):
        select_tasks(data, ["clicks"])
    with pytest.raises(ValueError, match="fraction"):
        keep_label_fraction(data, ["like"], 0.0)


def test_keep_label_fraction_by_rows_keeps_a_uniform_share_of_the_labelled_rows():
    data = make_data()
    train = data.splits["train"].labels
    labelled = (~torch.isnan(train[:, 1:])).any(1).nonzero().squeeze(1)  # the positive rows
    assert labelled.numel() == 24 * 4
    part, kept = keep_label_fraction(data, ["like", "rating"], 0.25, seed=3, unit="rows")
    labels = part.splits["train"].labels
    assert kept.numel() == 24 and kept.dtype == torch.int64
    assert torch.equal(kept, torch.sort(kept).values) and torch.isin(kept, labelled).all()
    assert torch.equal(labels[kept, 1:], train[kept, 1:])  # kept rows: like/rating unchanged
    withheld = torch.ones(train.shape[0], dtype=torch.bool)
    withheld[kept] = False
    assert torch.isnan(labels[withheld, 1:]).all()
    assert int((~torch.isnan(labels[:, 1])).sum()) == 24
    assert torch.equal(labels[:, 0], train[:, 0])  # click untouched
    for name in ("val", "test_warm", "test_cold"):
        assert torch.equal(part.splits[name].labels.nan_to_num(-1), data.splits[name].labels.nan_to_num(-1))
    assert torch.equal(part._split_rows["train"].labels.nan_to_num(-1), labels.nan_to_num(-1))
    assert torch.equal(train.nan_to_num(-1), data.splits["train"].labels.nan_to_num(-1))  # input untouched
    # the seeded draw: numpy's Generator.choice over the labelled rows
    expected = np.sort(np.random.default_rng(3).choice(labelled.numpy(), size=24, replace=False))
    assert kept.tolist() == expected.tolist()
    assert torch.equal(keep_label_fraction(data, ["like", "rating"], 0.25, seed=3, unit="rows")[1], kept)
    assert not torch.equal(keep_label_fraction(data, ["like", "rating"], 0.25, seed=4, unit="rows")[1], kept)
    # rows spread over users; the user unit (the default with users) keeps whole users
    assert torch.unique(data.splits["train"].user_row[kept]).numel() > 6
    by_users, users = keep_label_fraction(data, ["like", "rating"], 0.25, seed=3)
    assert users.numel() == 6
    assert torch.equal(users, keep_label_fraction(data, ["like", "rating"], 0.25, seed=3, unit="users")[1])
    with pytest.raises(ValueError, match="unit must be"):
        keep_label_fraction(data, ["like"], 0.5, unit="labels")
    # a split without users (Census-Income: every row of user row 0) is drawn by rows
    no_users = copy.copy(data)
    no_users.splits = {name: dataclasses.replace(split, user_row=torch.zeros_like(split.user_row))
                       for name, split in data.splits.items()}
    assert torch.equal(keep_label_fraction(no_users, ["like"], 0.25, seed=3)[1],
                       keep_label_fraction(no_users, ["like"], 0.25, seed=3, unit="rows")[1])
    with pytest.raises(ValueError, match="unit='users'"):
        keep_label_fraction(no_users, ["like"], 0.25, unit="users")
    empty = select_tasks(data, ["like"])
    empty.splits = {**empty.splits, "train": dataclasses.replace(
        empty.splits["train"], labels=torch.full_like(empty.splits["train"].labels, float("nan")))}
    with pytest.raises(ValueError, match="carries a label"):
        keep_label_fraction(empty, ["like"], 0.25, unit="rows")


def test_keep_label_fraction_by_rows_on_ml100k_leaves_every_user_about_that_share():
    """ml100k-mtl-v1, 10% of the like/rating labels by rows (seed 0): 7,150 of the 71,505 positive
    training rows, each warm user keeping about 10% of their own (a binomial draw per user)."""
    from mtkernels.data import load_ml100k_mtl_v1

    try:
        data = load_ml100k_mtl_v1()
    except FileNotFoundError as error:
        pytest.skip(f"ml-100k files not fetched: {error}")
    train = data.splits["train"]
    labelled = ~torch.isnan(train.labels[:, 1])
    assert int(labelled.sum()) == 71505
    part, kept = keep_label_fraction(data, ["like", "rating"], 0.10, seed=0, unit="rows")
    labels = part.splits["train"].labels
    assert kept.numel() == 7150 and int((~torch.isnan(labels[:, 1])).sum()) == 7150
    assert torch.equal(labels[kept], train.labels[kept])
    rows = data._users.dense.shape[0]
    total = torch.bincount(train.user_row[labelled], minlength=rows).double()
    held = torch.bincount(train.user_row[kept], minlength=rows).double()
    warm = total > 0
    share = held[warm] / total[warm]
    assert int(warm.sum()) == 849 and int((held[warm] > 0).sum()) >= 800  # users unit: 85 users
    assert abs(float(share.mean()) - 0.10) < 0.005
    z = (held[warm] - 0.10 * total[warm]) / torch.sqrt(0.09 * total[warm])
    assert float(z.abs().max()) < 4.0  # no user far from its binomial share
    heavy = total[warm] >= 100
    assert 0.02 < float(share[heavy].min()) and float(share[heavy].max()) < 0.2


@pytest.mark.parametrize("backbone", ["mmoe", "ple"])
def test_transfer_to_a_new_task_copies_weights_and_trains_the_new_tower(pretrained, backbone):
    data, click, _ = pretrained
    source = _model(click, backbone)
    fit(source, click, TrainConfig(**QUICK))
    target_data = select_tasks(data, ["click", "like"])
    target = _model(target_data, backbone, seed=1)
    report = transfer(source, target, parts=("embeddings", "experts", "towers"), mode="finetune", lr_scale=0.5,
                      source_vocabularies=click.vocabularies, target_vocabularies=target_data.vocabularies)
    source_state, target_state = source.state_dict(), target.state_dict()
    copied = [k for k in target_state if k.endswith(".weight") and k.startswith("embeddings")] + report.parameters
    assert any("experts" in k for k in report.parameters)
    for key in copied:
        assert torch.equal(target_state[key], source_state[key]), key
    if backbone == "ple":  # the new task's own experts are not in the source: left fresh
        assert not [k for k in report.parameters if "task_experts.1." in k]
    assert torch.equal(target_state["towers.0.linears.0.weight"], source_state["towers.0.linears.0.weight"])
    assert report.tables["user_id"]["matched"] == report.tables["user_id"]["rows"]
    assert all(target.lr_scale_of(k) == 0.5 for k in report.parameters)
    # the like tower is new: fresh, trained at the full rate, and it changes
    new_tower = "towers.1.linears.0.weight"
    assert new_tower not in report.parameters and target.lr_scale_of(new_tower) == 1.0
    before = target_state[new_tower].clone()
    fit(target, target_data, TrainConfig(**QUICK))
    assert not torch.equal(target.state_dict()[new_tower], before)


@pytest.mark.parametrize("optimizer", ["fused", "adam"])
@pytest.mark.parametrize("backbone", ["mmoe", "ple", "shared_bottom"])
def test_frozen_parts_are_bitwise_unchanged_after_training(pretrained, backbone, optimizer):
    data, click, _ = pretrained
    source = _model(click, backbone, optimizer=optimizer)
    target_data = select_tasks(data, ["like", "rating"])
    target = _model(target_data, backbone, seed=2, optimizer=optimizer)
    report = transfer(source, target, parts=("embeddings", "experts"), mode="freeze")
    frozen = set(target.frozen_parameter_names())
    assert frozen and all(k.startswith("embeddings") or "experts" in k or "bottom" in k for k in frozen)
    assert {f"embeddings.embedding_bags.{t}.weight" for t in report.tables} <= frozen
    before = _state(target)
    fit(target, target_data, TrainConfig(**QUICK))
    after = target.state_dict()
    for name in frozen:
        assert torch.equal(after[name], before[name]), name
    trained = [k for k in after if k.startswith("towers")]
    assert any(not torch.equal(after[k], before[k]) for k in trained)


def test_frozen_tables_hold_no_optimizer_state(pretrained):
    data, click, source = pretrained
    target_data = select_tasks(data, ["like"])
    target = _model(target_data)
    full = frozen_summary(target)
    assert {k for k in target.state_dict() if k.endswith(".momentum")} == {
        f"embeddings.embedding_bags.{f.name}.momentum" for f in data.features}
    transfer(source, target, parts=("embeddings", "experts"), mode="freeze")
    # no Adagrad accumulator buffer, no fused optimizer over the tables, nothing in Adam
    assert not [k for k in target.state_dict() if k.endswith(".momentum")]
    assert target.embeddings.fused_optimizers == []
    assert all(not p.requires_grad for p in target.embeddings.parameters())
    groups = _dense_optimizer_groups(target, make_weighting("fixed", target_data.tasks, None, 1.5), 0.0, 1e-3)
    in_adam = {id(p) for g in groups for p in g["params"]}
    frozen = dict(target.named_parameters())
    for name in target.frozen_parameter_names():
        assert id(frozen[name]) not in in_adam, name
    assert frozen_summary(target)["optimizer_state_bytes"] < full["optimizer_state_bytes"]
    # a checkpoint of the frozen model rebuilds frozen (lr_scales live in the config)
    rebuilt = MultiTaskModel.from_config(target.config)
    rebuilt.load_state_dict(target.state_dict())
    assert rebuilt.frozen_parameter_names() == target.frozen_parameter_names()


def test_partially_frozen_tables_and_finetune_lr_scales(pretrained):
    data, click, source = pretrained
    target = _model(data)
    base_lr = target.embeddings.fused_optimizers[0].lr
    report = transfer(source, target, parts=("embeddings",), mode="finetune", lr_scale=0.1)
    assert report.prefixes["embeddings.embedding_bags.user_id"] == 0.1
    lrs = sorted(o.lr for o in target.embeddings.fused_optimizers)
    assert lrs and all(abs(lr - 0.1 * base_lr) < 1e-12 for lr in lrs)
    # Adagrad accumulators of matched rows travel with them when fine-tuning
    assert torch.equal(target.state_dict()["embeddings.embedding_bags.item_id.momentum"],
                       source.state_dict()["embeddings.embedding_bags.item_id.momentum"])
    target.set_lr_scales({"embeddings.embedding_bags.age": 0.0, "backbone.experts": 0.2})
    assert target.embeddings.frozen_tables == ["age"]
    before = _state(target)
    fit(target, data, TrainConfig(**QUICK))
    after = target.state_dict()
    assert torch.equal(after["embeddings.embedding_bags.age.weight"], before["embeddings.embedding_bags.age.weight"])
    assert not torch.equal(after["embeddings.embedding_bags.item_id.weight"], before["embeddings.embedding_bags.item_id.weight"])
    groups = _dense_optimizer_groups(target, make_weighting("fixed", data.tasks, None, 1.5), 0.0, 1e-3)
    assert sorted(g.get("lr", 1e-3) for g in groups) == pytest.approx([2e-4, 1e-3])
    with pytest.raises(ValueError, match="matches no parameter"):
        target.set_lr_scales({"backbone.expert": 0.0})


def test_per_part_lr_scales_and_unfreezing_by_a_second_transfer(pretrained):
    data, click, source = pretrained
    target = _model(data)
    base_lr = target.embeddings.fused_optimizers[0].lr
    report = transfer(source, target, parts=("embeddings", "experts"), mode="finetune", lr_scale=RECOMMENDED_LR_SCALES)
    assert report.part_scales == {"embeddings": 0.1, "experts": 1.0} == RECOMMENDED_LR_SCALES
    assert "embeddings 0.1, experts 1" in report.summary()
    assert target.lr_scale_of("embeddings.embedding_bags.user_id.weight") == 0.1
    expert = next(k for k in report.parameters if k.startswith("backbone.experts"))
    assert target.lr_scale_of(expert) == 1.0
    assert "backbone.experts.0" not in target.lr_scales  # the default scale is not written into the config
    assert all(abs(o.lr - 0.1 * base_lr) < 1e-12 for o in target.embeddings.fused_optimizers)
    groups = _dense_optimizer_groups(target, make_weighting("fixed", data.tasks, None, 1.5), 0.0, 1e-3)
    assert [g.get("lr", 1e-3) for g in groups] == [1e-3]  # every dense parameter at the base rate
    # a part not named trains at 1; freezing first and fine-tuning again unfreezes
    frozen = _model(data, seed=2)
    transfer(source, frozen, parts=("embeddings", "experts"), mode="freeze")
    assert frozen.frozen_parameter_names()
    again = transfer(source, frozen, parts=("embeddings", "experts"), mode="finetune", lr_scale={"embeddings": 0.5})
    assert again.part_scales == {"embeddings": 0.5, "experts": 1.0}
    assert frozen.frozen_parameter_names() == [] and frozen.lr_scale_of(expert) == 1.0
    assert frozen.embeddings.frozen_tables == []
    # the pretrained rows keep their Adagrad accumulators after a frozen phase too (they were zero,
    # so the first fine-tuning steps of pretrained rows were as large as a fresh row's)
    source_state = source.state_dict()
    for feature in data.features:
        key = f"embeddings.embedding_bags.{feature.name}.momentum"
        assert float(source_state[key].sum()) > 0
        assert torch.equal(frozen.state_dict()[key], source_state[key]), key
    # ... in the tensors the fused optimizer updates
    accumulators = {a.data_ptr() for o in frozen.embeddings.fused_optimizers for a in o.accumulators}
    assert all(t.momentum.data_ptr() in accumulators for t in frozen.embeddings.embedding_bags.values())
    before = _state(frozen)
    fit(frozen, data, TrainConfig(**QUICK))
    assert not torch.equal(frozen.state_dict()[expert], before[expert])
    with pytest.raises(ValueError, match="not transferred"):
        transfer(source, _model(data), parts=("experts",), mode="finetune", lr_scale={"embeddings": 0.1})
    with pytest.raises(ValueError, match="'experts' must be a finite number >= 0"):
        transfer(source, _model(data), parts=("experts",), mode="finetune", lr_scale={"experts": -1.0})


def test_l2_sp_penalty_value_gradient_and_alpha_zero(pretrained):
    """L2-SP (Li et al., ICML 2018): alpha/2 ||w - w_source||^2 on the transferred dense parameters,
    beta/2 ||w||^2 on the new trained ones, tables (fused Adagrad) left out; against a hand computation."""
    data, click, source = pretrained
    target = _model(data, seed=1)
    report = transfer(source, target, parts=("embeddings", "experts"), mode="finetune", lr_scale=RECOMMENDED_LR_SCALES,
                      l2_sp=0.3, l2_sp_new=0.05)
    penalty = report.regularizer
    assert penalty.alpha == 0.3 and penalty.beta == 0.05
    source_state = source.state_dict()
    assert sorted(penalty.reference) == sorted(k for k in report.parameters if k.startswith("backbone.experts"))
    assert all(torch.equal(penalty.reference[k], source_state[k]) for k in penalty.reference)
    # the transferred values are the source's: only the new parameters' term is not 0 yet
    assert float(L2SP(penalty.reference, alpha=0.3)(target).detach()) == 0.0
    transfer_keys = set(penalty.reference)
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in target.named_parameters():
            p.add_(0.1 * torch.randn_like(p))
    dense = {n: p for n, p in target.named_parameters() if not n.startswith("embeddings.")}
    new = [n for n in dense if n not in transfer_keys]
    assert new and any(n.startswith("towers.") for n in new) and any(n.startswith("backbone.gates") for n in new)
    expected = 0.0
    for n, p in dense.items():
        d = (p.detach().double() - source_state[n].double()) if n in transfer_keys else p.detach().double()
        expected += (0.3 if n in transfer_keys else 0.05) / 2 * float((d * d).sum())
    value = penalty(target)
    assert float(value.detach()) == pytest.approx(expected, rel=1e-5)
    target.zero_grad(set_to_none=True)
    value.backward()
    for n, p in target.named_parameters():
        if n.startswith("embeddings."):
            assert p.grad is None  # tables: the fused optimizer never sees a dense gradient
        elif n in transfer_keys:
            assert torch.allclose(p.grad, 0.3 * (p.detach() - source_state[n]), atol=1e-7)
        else:
            assert torch.allclose(p.grad, 0.05 * p.detach(), atol=1e-7)
    # frozen parameters carry no penalty (they cannot move)
    target.set_lr_scales({"backbone.experts": 0.0})
    frozen_value = float(penalty(target).detach())
    assert frozen_value == pytest.approx(sum(0.05 / 2 * float((dense[n].detach().double() ** 2).sum()) for n in new), rel=1e-5)

    # alpha = beta = 0: bit for bit the plain fine-tuning run
    def finetune(l2_sp):
        model = _model(data, seed=1)
        r = transfer(source, model, parts=("embeddings", "experts"), mode="finetune", lr_scale=0.5, l2_sp=l2_sp)
        fit(model, data, TrainConfig(**QUICK, weight_decay=0.0), regularizer=r.regularizer)
        return model.state_dict()

    plain, zero = finetune(None), finetune(0.0)
    assert all(torch.equal(plain[k], zero[k]) for k in plain)
    # a strong pull keeps the experts nearer their source values than plain fine-tuning does
    pulled = finetune(100.0)

    def distance(state):
        return sum(float((state[k] - source_state[k]).pow(2).sum()) for k in transfer_keys)

    assert distance(pulled) < 0.5 * distance(plain)
    with pytest.raises(ValueError, match="mode='finetune'"):
        transfer(source, _model(data), mode="freeze", l2_sp=0.1)
    with pytest.raises(ValueError, match="l2_sp and l2_sp_new must be finite numbers >= 0"):
        transfer(source, _model(data), mode="finetune", l2_sp=0.1, l2_sp_new=-1.0)
    with pytest.raises(ValueError, match="no parameters"):
        penalty(_model(data, "ple"))  # another backbone: no parameters of those names


def test_resample_negatives_after_select_tasks(tmp_path):
    """The sampled negatives are the rows whose click label is 0: after select_tasks reorders the tasks
    they are still found by that task, and without it resampling is refused (it took the first task,
    like, and gave rated positives with a like label of 0 unrated items, keeping their ratings)."""
    from mtkernels.data import protocol
    from mtkernels.data.movielens import build_ml100k_mtl_v1, read_grouplens
    try:
        from tests.data_fixtures import synthetic_movielens, write_grouplens
    except ImportError:
        from data_fixtures import synthetic_movielens, write_grouplens

    movielens = read_grouplens(write_grouplens(tmp_path / "ml-100k", *synthetic_movielens()))
    data = build_ml100k_mtl_v1(movielens, protocol.build_splits(movielens.ratings, np.arange(1, 61)))
    item = data.splits["train"].item.clone()
    negative = data.splits["train"].labels[:, 0] == 0
    reordered = select_tasks(data, ["rating", "click"])
    fresh = reordered.resample_negatives(seed=5)
    assert torch.equal(fresh.item[~negative], item[~negative])  # positives keep their items
    assert (fresh.item[negative] != item[negative]).float().mean() > 0.5
    assert torch.equal(fresh.item, data.resample_negatives(seed=5).item)  # the same draw as on the full data set
    data.resample_negatives(seed=None)
    assert torch.equal(reordered.resample_negatives(seed=None).item, item)
    few = select_tasks(data, ["like", "rating"])
    assert bool((few.splits["train"].labels[:, 0] == 0).any())  # rated positives with like 0
    with pytest.raises(ValueError, match=r"sampled negatives are the rows whose 'click' label is 0.*\['like', 'rating'\]"):
        few.resample_negatives(seed=5)
    assert torch.equal(few.splits["train"].item, item)


def test_infinite_rates_and_penalties_are_refused(pretrained, tmp_path, monkeypatch, capsys):
    # an infinite lr scale or L2-SP weight trained to NaN weights; they are refused by name like negative ones
    data, _, source = pretrained
    inf = float("inf")
    with pytest.raises(ValueError, match=r"lr_scale of 'experts' must be a finite number >= 0, got inf"):
        transfer(source, _model(data), parts=("experts",), mode="finetune", lr_scale=inf)
    with pytest.raises(ValueError, match=r"l2_sp and l2_sp_new must be finite numbers >= 0, got inf and 0.0"):
        transfer(source, _model(data), mode="finetune", l2_sp=inf)
    with pytest.raises(ValueError, match=r"l2_sp and l2_sp_new must be finite numbers >= 0, got 0.1 and inf"):
        transfer(source, _model(data), mode="finetune", l2_sp=0.1, l2_sp_new=inf)
    with pytest.raises(ValueError, match=r"alpha and beta must be finite numbers >= 0, got 1.0 and nan"):
        L2SP({}, alpha=1.0, beta=float("nan"))
    monkeypatch.setattr(cli, "load_data", lambda spec: data)
    checkpoint = str(tmp_path / "source.pt")
    common = ["--model", "mmoe", "--epochs", "1", "--batch-size", "64", "--embedding-dim", "4", "--no-progress"]
    assert cli.main(["train", *common, "--checkpoint", checkpoint]) == 0
    capsys.readouterr()
    for option in (["--l2-sp", "inf"], ["--l2-sp", "1,inf"], ["--transfer-lr-scale", "inf"],
                   ["--transfer-lr-scale", "experts=inf"]):
        assert cli.main(["train", *common, "--init-from", checkpoint, *option, "--checkpoint", str(tmp_path / "t.pt")]) == 2
        assert option[0] in capsys.readouterr().err


def test_auxiliary_source_task_with_carried_gate_and_tower(pretrained):
    """The source task kept as an auxiliary task: its gate and tower carried over, early stopping on
    the target tasks only (`TrainConfig.monitor_tasks`)."""
    data, click, source = pretrained
    budget, kept = keep_label_fraction(data, ["like", "rating"], 0.25, seed=1)
    target = _model(budget, seed=3)
    report = transfer(source, target, parts=("embeddings", "experts", "gates", "towers"), mode="finetune",
                      lr_scale={"embeddings": 0.1})
    assert "backbone.gates.0.weight" in report.parameters and "towers.0.linears.0.weight" in report.parameters
    assert not [k for k in report.parameters if k.startswith(("towers.1.", "towers.2.", "backbone.gates.1"))]
    result = fit(target, budget, TrainConfig(**QUICK, monitor_tasks=["like", "rating"]))
    for record in result.history:
        val = record["val"]
        # the score skips a NaN metric (a split with one like class); click AUC never counts
        expected = sum(v for v in (val["like"]["auc"], -val["rating"]["rmse"]) if not math.isnan(v))
        assert record["monitor"] == pytest.approx(expected) and val["score"] == pytest.approx(expected)
        assert not math.isnan(val["click"]["auc"]) and record["monitor"] != pytest.approx(expected + val["click"]["auc"])
    with pytest.raises(ValueError, match="monitor_tasks"):
        fit(_model(budget), budget, TrainConfig(**QUICK, monitor_tasks=["purchase"]))
    with pytest.raises(ValueError, match="monitor_tasks"):
        TrainConfig(monitor_tasks=[])


def test_rows_matched_by_external_id(pretrained):
    data, click, source = pretrained
    target = _model(data, seed=5)
    fresh = _state(target)
    source_keys = click.vocabularies
    # the target's user_id table lists the same users in reverse order, plus two the source never saw
    users = source_keys["user_id"]
    target_keys = dict(source_keys)
    target_keys["user_id"] = [None] + list(reversed(users[1:-2])) + ["new-a", "new-b"]
    report = transfer(source, target, parts=("embeddings",), mode="freeze",
                      source_vocabularies=source_keys, target_vocabularies=target_keys)
    table = target.state_dict()["embeddings.embedding_bags.user_id.weight"]
    source_table = source.state_dict()["embeddings.embedding_bags.user_id.weight"]
    for row, key in enumerate(target_keys["user_id"]):
        if key in ("new-a", "new-b"):
            assert torch.equal(table[row], fresh["embeddings.embedding_bags.user_id.weight"][row])
        else:
            assert torch.equal(table[row], source_table[users.index(key) if row else 0]), row
    assert report.tables["user_id"] == {"rows": len(users), "matched": len(users) - 2, "fresh": 2, "by": "external id"}
    assert report.tables["age"]["by"] == "position"  # no keys for age here: same row count, matched in place
    # different row counts and no keys: refused rather than guessed
    small = make_data(num_warm=20)
    with pytest.raises(ValueError, match="vocabularies"):
        transfer(source, _model(small), parts=("embeddings",))


def test_transfer_errors(pretrained):
    data, click, source = pretrained
    target = _model(data)
    with pytest.raises(ValueError, match="parts"):
        transfer(source, target, parts=("bottoms",))
    with pytest.raises(ValueError, match="mode"):
        transfer(source, target, mode="thaw")
    with pytest.raises(ValueError, match="backbone"):
        transfer(source, _model(data, "ple"), parts=("experts",))
    wide = MultiTaskModel(data.features, data.dense_dim, data.tasks, backbone="mmoe", embedding_dim=4,
                          backbone_kwargs={"num_experts": 2, "expert_hidden": [16]}, tower_hidden=[4])
    with pytest.raises(ValueError, match="shape|backbone sizes"):
        transfer(source, wide, parts=("experts",))
    with pytest.raises(TypeError, match="source"):
        transfer(42, target)
    # gates and towers move between tasks of the same name: none shared is an error, not a silent no-op
    like = _model(select_tasks(data, ["like"]))
    before = like.state_dict()["embeddings.embedding_bags.user_id.weight"].clone()
    with pytest.raises(ValueError, match=r"towers.*same name.*\['click'\].*\['like'\]"):
        transfer(source, like, parts=("embeddings", "towers"), mode="freeze")
    assert torch.equal(like.state_dict()["embeddings.embedding_bags.user_id.weight"], before)  # nothing changed


def test_source_checkpoint_given_as_a_str_or_a_path(pretrained, tmp_path):
    # a pathlib.Path is a checkpoint path too (load_checkpoint and Ranker.load take one; transfer said
    # "source must be a model, a checkpoint dict or a checkpoint path, got PosixPath")
    from mtkernels.training import save_checkpoint

    data, click, source = pretrained
    path = tmp_path / "source.pt"
    save_checkpoint(str(path), {"model_class": "mtkernels.nn.model:MultiTaskModel", "model_config": source.config,
                                "model_state": source.state_dict(), "vocabularies": click.vocabularies})
    for given in (str(path), path):
        target = _model(data, seed=3)
        report = transfer(given, target, parts=("embeddings", "experts"), mode="freeze")
        assert report.tables["item_id"]["by"] == "position"  # the target was given no vocabularies
        for key in report.parameters:
            assert torch.equal(target.state_dict()[key], source.state_dict()[key]), key
        assert torch.equal(target.state_dict()["embeddings.embedding_bags.item_id.weight"],
                           source.state_dict()["embeddings.embedding_bags.item_id.weight"])


def test_id_dropout_replaces_ids_and_history():
    data = make_data()
    batch = next(data.batches("train", 256, shuffle=False))
    dropped = drop_ids(batch, data, 0.5, generator=torch.Generator().manual_seed(0))
    user = dropped.sparse["user_id"]["values"]
    original = batch.sparse["user_id"]["values"]
    gone = (user == 0) & (original != 0)
    assert 0.3 < gone.float().mean() < 0.7
    assert torch.equal(user[~gone], original[~gone])
    assert (dropped.dense[gone, : data.user_dense_dim] == 0).all()
    assert torch.equal(dropped.dense[:, data.user_dense_dim:], batch.dense[:, data.user_dense_dim:])
    assert torch.equal(dropped.sparse["item_id"]["values"], batch.sparse["item_id"]["values"])
    assert torch.equal(batch.sparse["user_id"]["values"], original)  # the input batch is untouched
    assert drop_ids(batch, data, 0.0) is batch
    with pytest.raises(ValueError, match="multi-valued"):
        drop_ids(batch, data, 0.5, features=("genres",))
    with pytest.raises(ValueError):
        TrainConfig(id_dropout=1.5)


def test_id_dropout_trains_the_unknown_row():
    data = make_data()
    plain, dropped = _model(data), _model(data)
    row0 = plain.state_dict()["embeddings.embedding_bags.user_id.weight"][0].clone()
    fit(plain, data, TrainConfig(**QUICK))
    fit(dropped, data, TrainConfig(**QUICK, id_dropout=0.3))
    assert torch.equal(plain.state_dict()["embeddings.embedding_bags.user_id.weight"][0], row0)
    assert not torch.equal(dropped.state_dict()["embeddings.embedding_bags.user_id.weight"][0], row0)


def test_cold_user_ranking_depends_on_side_features(tmp_path):
    # users' tastes follow their age group; click only (the ranking task)
    data = select_tasks(make_data(num_warm=60, num_items=30, positives=8, age_taste=True), ["click"])
    model = _model(data)
    path = str(tmp_path / "cold.pt")
    fit(model, data, TrainConfig(epochs=8, batch_size=64, progress=False, patience=0, id_dropout=0.5, lr=1e-2),
        checkpoint_path=path, checkpoint_extra={"serving": serving_tables(data)})
    ranker = Ranker.load(path)
    result = ranker.recommend([9001, 9002, 9003], k=5, side_features={9001: {"age": 1}, 9002: {"age": 2}})
    assert result.served_by == ["side_features", "side_features", "popularity"]
    first, second, popular = (row.tolist() for row in result.item_ids)
    assert first != second
    assert first != popular or second != popular
    # the same through evaluation: scored as cold users, the val lists beat nothing-known popularity
    cold = cold_topk_metrics(model, data, "val", k=5)
    assert 0.0 <= cold["ndcg@5"] <= 1.0
    assert popularity_topk_metrics(data, "val", k=5, group_by=("age",))["ndcg@5"] >= 0.0


def test_popularity_baselines_match_a_direct_count():
    from mtkernels import metrics

    data = make_data()
    train = data.splits["train"]
    positive = train.labels[:, 0] > 0
    evaluation = data.topk_eval("test_cold")
    age = data.user_feature_rows(users=torch.arange(data.num_user_rows)).sparse["age"]

    def ranked(mask):
        counts = torch.bincount(train.item[positive & mask] - 1, minlength=data.num_items)
        return sorted(range(data.num_items), key=lambda i: (-int(counts[i]), i))[:5]

    overall = torch.tensor([ranked(torch.ones_like(positive)) for _ in evaluation.users.tolist()])
    by_age = torch.tensor([ranked(age[train.user_row] == age[u]) for u in evaluation.users.tolist()])
    for group_by, lists in (((), overall), (("age",), by_age)):
        expected = {"ndcg@5": metrics.ndcg_at_k(lists, evaluation.relevant, 5),
                    "recall@5": metrics.recall_at_k(lists, evaluation.relevant, 5)}
        assert popularity_topk_metrics(data, "test_cold", k=5, group_by=group_by) == pytest.approx(expected)
    assert not torch.equal(overall, by_age)
    with pytest.raises(ValueError, match="group_by"):
        popularity_topk_metrics(data, "test_cold", group_by=("genres",))


def test_cli_init_from_and_freeze(tmp_path, monkeypatch, capsys):
    data = make_data()
    monkeypatch.setattr(cli, "load_data", lambda spec: data)
    source = str(tmp_path / "click.pt")
    common = ["--data", "ml100k", "--model", "mmoe", "--epochs", "2", "--batch-size", "64", "--embedding-dim", "4",
              "--no-progress"]
    assert cli.main(["train", *common, "--tasks", "click", "--id-dropout", "0.3", "--checkpoint", source]) == 0
    target = str(tmp_path / "like.pt")
    assert cli.main(["train", *common, "--tasks", "like,rating", "--init-from", source,
                     "--freeze", "embeddings,experts", "--checkpoint", target]) == 0
    out = capsys.readouterr().out
    assert "rows matched by external id" in out
    from mtkernels.training import build_model, load_checkpoint
    pre, post = build_model(load_checkpoint(source)), load_checkpoint(target)
    assert [t["name"] for t in post["tasks"]] == ["like", "rating"]
    state = post["model_state"]
    for key, value in pre.state_dict().items():
        if key.endswith(".weight") and (key.startswith("embeddings") or key.startswith("backbone.experts")):
            assert torch.equal(state[key], value), key
    assert not [k for k in state if k.endswith(".momentum")]
    assert post["model_config"]["lr_scales"]["backbone.experts.0"] == 0.0
    assert cli.main(["evaluate", "--checkpoint", target, "--split", "val", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["val"]) == {"like", "rating", "topk"}
    assert cli.main(["train", *common, "--freeze", "experts", "--checkpoint", str(tmp_path / "x.pt")]) == 2
    assert "--init-from" in capsys.readouterr().err
    # per-part scales and early stopping on some tasks
    tuned = str(tmp_path / "tuned.pt")
    assert cli.main(["train", *common, "--tasks", "click,like,rating", "--init-from", source,
                     "--transfer", "embeddings,experts,gates,towers", "--transfer-lr-scale", "embeddings=0.1,experts=1",
                     "--monitor-tasks", "rating", "--checkpoint", tuned]) == 0
    assert "lr scale embeddings 0.1, experts 1, gates 1, towers 1" in capsys.readouterr().out
    post = load_checkpoint(tuned)
    assert post["train_config"]["monitor_tasks"] == ["rating"]
    assert post["model_config"]["lr_scales"] == {f"embeddings.embedding_bags.{t}": 0.1
                                                  for t in build_model(post).embeddings.embedding_bags}
    record = post["history"][0]
    assert record["monitor"] == pytest.approx(-record["val"]["rating"]["rmse"])
    assert cli.main(["train", *common, "--init-from", source, "--transfer-lr-scale", "embeddings=x",
                     "--checkpoint", str(tmp_path / "y.pt")]) == 2
    assert "--transfer-lr-scale" in capsys.readouterr().err
    assert cli.main(["train", *common, "--init-from", source, "--freeze", "embeddings",
                     "--transfer-lr-scale", "embeddings=0.1", "--checkpoint", str(tmp_path / "z.pt")]) == 2
    assert "not fine-tuned" in capsys.readouterr().err
    # --l2-sp: 0 is plain fine-tuning without weight decay, bit for bit; a strong pull keeps the experts nearer
    runs = {}
    for name, extra in (("plain", ["--weight-decay", "0"]), ("zero", ["--l2-sp", "0"]), ("strong", ["--l2-sp", "100,0.01"])):
        runs[name] = str(tmp_path / f"l2sp_{name}.pt")
        torch.manual_seed(0)  # the same fresh gates and towers (the model is built before fit seeds)
        assert cli.main(["train", *common, "--tasks", "like,rating", "--init-from", source, *extra,
                         "--checkpoint", runs[name]]) == 0
    states = {name: load_checkpoint(path)["model_state"] for name, path in runs.items()}
    assert load_checkpoint(runs["strong"])["train_config"]["weight_decay"] == 0.0
    assert all(torch.equal(states["plain"][k], states["zero"][k]) for k in states["plain"])
    experts = [k for k in pre.state_dict() if k.startswith("backbone.experts")]

    def distance(state):
        return sum(float((state[k] - pre.state_dict()[k]).pow(2).sum()) for k in experts)

    assert distance(states["strong"]) < 0.5 * distance(states["plain"])
    for bad, message in ((["--l2-sp", "x"], "--l2-sp: expected"), (["--l2-sp", "-1"], "--l2-sp: expected"),
                         (["--init-from", source, "--freeze", "embeddings,experts", "--l2-sp", "1"], "every --transfer part is frozen")):
        args = bad if "--init-from" in bad else ["--init-from", source, *bad]
        assert cli.main(["train", *common, *args, "--checkpoint", str(tmp_path / "bad.pt")]) == 2
        assert message in capsys.readouterr().err
    assert cli.main(["train", *common, "--l2-sp", "1", "--checkpoint", str(tmp_path / "bad.pt")]) == 2
    assert "--l2-sp needs --init-from" in capsys.readouterr().err


def test_cli_resume_keeps_the_l2_sp_penalty(tmp_path, monkeypatch, capsys):
    """--l2-sp is a training setting: resuming continues the same penalty exactly, and a changed or
    dropped one is refused (it was accepted, and the continued run optimised another objective)."""
    data = make_data()
    monkeypatch.setattr(cli, "load_data", lambda spec: data)
    from mtkernels.training import load_checkpoint

    source = str(tmp_path / "click.pt")
    common = ["--data", "ml100k", "--model", "mmoe", "--batch-size", "64", "--embedding-dim", "4", "--no-progress"]
    assert cli.main(["train", *common, "--epochs", "1", "--tasks", "click", "--checkpoint", source]) == 0
    target = [*common, "--tasks", "like,rating", "--init-from", source]
    whole, part = str(tmp_path / "whole.pt"), str(tmp_path / "part.pt")
    assert cli.main(["train", *target, "--l2-sp", "1,0.01", "--epochs", "2", "--checkpoint", whole]) == 0
    assert cli.main(["train", *target, "--l2-sp", "1,0.01", "--epochs", "1", "--checkpoint", part]) == 0
    assert load_checkpoint(part)["l2_sp"] == [1.0, 0.01]
    capsys.readouterr()
    for changed, said in ((["--l2-sp", "0.5"], "0.5,0"), (["--weight-decay", "0"], "none")):
        assert cli.main(["train", *target, *changed, "--epochs", "2", "--resume", "--checkpoint", part]) == 2
        err = capsys.readouterr().err
        assert f"was trained with --l2-sp 1,0.01, this run has --l2-sp {said}" in err, err
    assert load_checkpoint(part)["trainer"]["epoch"] == 0  # nothing was trained by the refused runs
    assert cli.main(["train", *target, "--l2-sp", "1,0.01", "--epochs", "2", "--resume", "--checkpoint", part]) == 0
    resumed, uninterrupted = load_checkpoint(part)["model_state"], load_checkpoint(whole)["model_state"]
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)
    # a run without the penalty records that too, so adding one on resume is refused
    plain = str(tmp_path / "plain.pt")
    assert cli.main(["train", *target, "--epochs", "1", "--checkpoint", plain]) == 0
    assert load_checkpoint(plain)["l2_sp"] is None
    capsys.readouterr()
    assert cli.main(["train", *target, "--l2-sp", "1", "--weight-decay", "1e-5", "--epochs", "2", "--resume",
                     "--checkpoint", plain]) == 2
    assert "was trained with --l2-sp none, this run has --l2-sp 1,0" in capsys.readouterr().err


def _synthetic_ml100k():
    """A small synthetic MovieLens log (40 users, 50 items) through the ml100k-mtl-v1 pipeline:
    ``(movielens, split frames, MultiTaskData)``."""
    from mtkernels.data import protocol
    from mtkernels.data.movielens import MovieLens, build_ml100k_mtl_v1

    try:
        from tests.data_fixtures import synthetic_movielens
    except ImportError:  # tests/ on sys.path instead of the repo root
        from data_fixtures import synthetic_movielens
    ratings, users, items = synthetic_movielens(num_users=40, num_items=50, seed=2)
    movielens = MovieLens(ratings, users, items, "synthetic", None)
    splits = protocol.build_splits(ratings, np.arange(1, 51))
    return movielens, splits, build_ml100k_mtl_v1(movielens, splits)


def test_refit_dense_features_sees_only_the_budget_labels():
    """A label budget's dense statistics: changing a withheld rating changes no feature, changing a
    kept one does; with every label kept the tables are `build_ml100k_mtl_v1`'s."""
    from mtkernels.data import protocol, refit_dense_features
    from mtkernels.data.movielens import build_ml100k_mtl_v1

    movielens, splits, data = _synthetic_ml100k()
    same = refit_dense_features(data)
    for name in data.splits:
        assert torch.equal(same.splits[name].dense, data.splits[name].dense)

    def budget_dense(changed_user):
        """Dense features of the 25% budget after changing ``changed_user``'s first training rating."""
        altered = {k: v.copy() for k, v in splits.items()}
        train = altered["train"]
        row = train.index[(train["user_id"] == changed_user) & (train["click"] == 1)][0]
        rating = 1.0 if train.loc[row, "rating"] >= protocol.LIKE_THRESHOLD else 5.0
        train.loc[row, ["rating", "like"]] = [rating, float(rating >= protocol.LIKE_THRESHOLD)]
        budget, kept = keep_label_fraction(build_ml100k_mtl_v1(movielens, altered), ["like", "rating"], 0.25, seed=1)
        refit = refit_dense_features(budget)
        return {name: refit.splits[name].dense for name in refit.splits}, kept

    reference, kept = keep_label_fraction(data, ["like", "rating"], 0.25, seed=1)
    reference = refit_dense_features(reference)
    user_ids = data.user_ids[kept].tolist()
    withheld = sorted(set(splits["train"]["user_id"]) - set(user_ids))[0]
    changed, _ = budget_dense(withheld)
    for name in data.splits:
        assert torch.equal(changed[name], reference.splits[name].dense)
    changed, _ = budget_dense(user_ids[0])
    assert not torch.equal(changed["train"], reference.splits["train"].dense)
    # the budget's rating statistics differ from the full labels' ones; popularity does not
    column = data.dense_names.index
    full, part = data.splits["train"].dense, reference.splits["train"].dense
    assert not torch.equal(full[:, column("item_mean_rating")], part[:, column("item_mean_rating")])
    for name in ("item_log_popularity", "user_log_activity", "user_recent_popularity"):
        assert torch.equal(full[:, column(name)], part[:, column(name)])
    with pytest.raises(ValueError, match="click and rating"):
        refit_dense_features(select_tasks(data, ["like", "rating"]))
    with pytest.raises(ValueError, match="dense columns"):
        refit_dense_features(build_ml100k_mtl_v1(movielens, splits, dense_features=False))


def test_refit_dense_features_with_a_row_budget_sees_only_the_kept_labels():
    """A row-level budget (every user keeps some labels): changing a withheld rating changes no
    feature, changing a kept one does; users' mean ratings come from their kept rows only."""
    from mtkernels.data import protocol, refit_dense_features
    from mtkernels.data.movielens import build_ml100k_mtl_v1

    movielens, splits, data = _synthetic_ml100k()
    train = data.splits["train"]

    def budget(frame_splits):
        part, kept = keep_label_fraction(build_ml100k_mtl_v1(movielens, frame_splits), ["like", "rating"], 0.25,
                                         seed=1, unit="rows")
        return refit_dense_features(part), kept

    reference, kept = budget(splits)
    labelled = (~torch.isnan(train.labels[:, 2])).nonzero().squeeze(1)
    withheld_rows = labelled[~torch.isin(labelled, kept)]
    assert torch.unique(train.user_row[kept]).numel() > 30  # most users keep some labels

    def changed(split_row):
        """Dense features of the budget after flipping the rating of training row ``split_row``."""
        user = int(data.user_ids[train.user_row[split_row]])
        item = int(data.item_ids[train.item[split_row] - 1])
        altered = {k: v.copy() for k, v in splits.items()}
        frame = altered["train"]
        row = frame.index[(frame["user_id"] == user) & (frame["item_id"] == item) & (frame["click"] == 1)]
        assert len(row) == 1
        rating = 1.0 if frame.loc[row[0], "rating"] >= protocol.LIKE_THRESHOLD else 5.0
        frame.loc[row[0], ["rating", "like"]] = [rating, float(rating >= protocol.LIKE_THRESHOLD)]
        out, kept_again = budget(altered)
        assert torch.equal(kept_again, kept)  # the same rows are drawn
        return out

    for split_row in withheld_rows[:3].tolist():
        out = changed(split_row)
        for name in data.splits:
            assert torch.equal(out.splits[name].dense, reference.splits[name].dense)
    out = changed(int(kept[0]))
    assert not torch.equal(out.splits["train"].dense, reference.splits["train"].dense)
    # a user's mean rating summarises its kept rows only: users whose kept ratings have the same
    # mean get the same (smoothed, standardised) value when they keep as many
    column = data.dense_names.index("user_mean_rating")
    kept_ratings = {}
    for r in kept.tolist():
        kept_ratings.setdefault(int(train.user_row[r]), []).append(float(train.labels[r, 2]))
    by_key = {}
    dense = reference.splits["train"].dense
    for user, values in kept_ratings.items():
        first = int((train.user_row == user).nonzero()[0])
        by_key.setdefault((len(values), sum(values)), set()).add(round(float(dense[first, column]), 5))
    assert all(len(v) == 1 for v in by_key.values())
    assert len(by_key) > 5
