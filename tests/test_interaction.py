"""The interaction term of `MultiTaskModel` (`mtkernels.nn.InteractionTerm`, biased MF): its value
against a hand computation, gradient flow at batch sizes 1 and 37, its L2 penalty's gradient, the
fused eval path, config round trip, cold users (row 0), training with id dropout, catalogue
scoring, transfer and learning-rate scales."""

import json
import math

import pytest
import torch

from mtkernels.catalogue import CatalogueScorer, user_table
from mtkernels.nn import InteractionTerm, MultiTaskModel
from mtkernels.nn.towers import tower_outputs
from mtkernels.serving import Ranker, serving_tables
from mtkernels.training import TrainConfig, fit
from mtkernels.transfer import transfer
from synthetic import fused_embedding_optimizer, make_data, one_thread  # noqa: F401 (autouse fixture)
from test_nn_models import BACKBONE_KWARGS, DENSE_DIM, FEATURES, TASKS, _batch

DIM = 3


def _model(name="mmoe", tasks=("like", "rating"), **kwargs):
    backbone = name.rstrip("01")
    return MultiTaskModel(FEATURES, DENSE_DIM, TASKS, backbone=backbone, embedding_dim=4,
                          backbone_kwargs=BACKBONE_KWARGS[name], tower_hidden=(6,), interaction_tasks=tasks,
                          interaction_dim=DIM, **kwargs)


def _randomise(model, seed=0):
    """Non-zero factors, biases, rows 0 and scales, so that every part of the term shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for table in model.interaction.embeddings.embedding_bags.values():
            table.weight.copy_(torch.randn(table.weight.shape, generator=generator))
        model.interaction.scale.copy_(torch.tensor([0.7, -1.3]))


def _hand_term(model, sparse):
    users = sparse["user_id"]["values"].tolist()
    items = sparse["item_id"]["values"].tolist()
    user_table_ = model.interaction.embeddings.embedding_bags["user"].weight.detach().clone()
    item_table = model.interaction.embeddings.embedding_bags["item"].weight.detach().clone()
    for table in (user_table_, item_table):  # the unknown id 0 is scored as the mean known row
        table[0] = table[1:].sum(0) / (table.shape[0] - 1)
    term = []
    for u, i in zip(users, items):
        dot = sum(float(user_table_[u, k]) * float(item_table[i, k]) for k in range(DIM))
        term.append(dot + float(user_table_[u, DIM]) + float(item_table[i, DIM]))
    return torch.tensor(term, dtype=torch.float64)


@pytest.mark.parametrize("batch", [1, 37])
def test_term_and_outputs_equal_a_hand_computation(batch):
    torch.manual_seed(1)
    model = _model().eval()
    _randomise(model, seed=batch)
    sparse, dense = _batch(batch, seed=batch)
    term = _hand_term(model, sparse)
    torch.testing.assert_close(model.interaction(sparse).double(), term, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        raw = tower_outputs(model.towers, model.backbone.stacked(model._inputs(sparse, dense))).double()
        out = model(sparse, dense).double()
    expected = torch.stack([torch.sigmoid(raw[:, 0]), torch.sigmoid(raw[:, 1] + 0.7 * term), raw[:, 2] - 1.3 * term], 1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert float((expected[:, 1] - torch.sigmoid(raw[:, 1])).abs().max()) > 1e-3  # the term changed the output


def test_one_task_and_a_binary_only_term():
    torch.manual_seed(2)
    model = _model(tasks=("click",)).eval()
    with torch.no_grad():
        model.interaction.embeddings.embedding_bags["item"].weight[:, DIM] = 0.5  # item bias only
        model.interaction.scale.fill_(2.0)
    sparse, dense = _batch(5, seed=2)
    with torch.no_grad():
        raw = tower_outputs(model.towers, model.backbone.stacked(model._inputs(sparse, dense)))
        term = _hand_term(model, sparse).float()  # item biases 0.5, user biases 0
        dot = term - 0.5
        expected = torch.sigmoid(raw[:, 0] + 2.0 * (dot + 0.5))
        torch.testing.assert_close(model(sparse, dense)[:, 0], expected, rtol=1e-5, atol=1e-6)
    assert model.interaction_columns == [0]
    assert model._transforms() == ["identity", "sigmoid", "identity"]


@pytest.mark.parametrize("batch", [1, 37])
def test_gradients_reach_the_term(batch):
    torch.manual_seed(3)
    model = _model()
    _randomise(model)
    sparse, dense = _batch(batch, seed=batch + 10)
    out = model(sparse, dense)
    (out * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
    scale_grad = model.interaction.scale.grad
    assert scale_grad is not None and bool((scale_grad != 0).all())
    # d out / d scale: the term times sigmoid' for like, the term for rating
    term = _hand_term(model, sparse).float()
    p = out[:, 1].detach()
    torch.testing.assert_close(scale_grad, torch.stack([(-2.0 * p * (1 - p) * term).sum(), (0.5 * term).sum()]),
                               rtol=1e-4, atol=1e-5)
    for name in ("user", "item"):
        grad = model.interaction.embeddings.embedding_bags[name].weight.grad
        touched = sparse[f"{name}_id"]["values"].unique()
        assert float(grad[touched].abs().sum()) > 0
        untouched = torch.ones(grad.shape[0], dtype=torch.bool)
        untouched[touched] = False
        assert float(grad[untouched].abs().sum()) == 0.0


def test_weight_decay_adds_its_gradient_to_the_looked_up_rows():
    torch.manual_seed(4)
    plain, decayed = _model(), _model(interaction_weight_decay=0.3)
    decayed.load_state_dict(plain.state_dict())
    _randomise(plain)
    _randomise(decayed)
    batch = 7
    sparse, dense = _batch(batch, seed=4)
    for model in (plain, decayed):
        model.eval()  # no dropout: the same forward, the penalty still applies only while training
        model(sparse, dense).sum().backward()
    no_penalty = {n: p.grad.clone() for n, p in decayed.named_parameters()}
    for model in (plain, decayed):
        model.zero_grad()
        model.train()
        model.backbone.eval()
        for tower in model.towers:
            tower.eval()
        model(sparse, dense).sum().backward()
    for name, column in (("user", "user_id"), ("item", "item_id")):
        key = f"interaction.embeddings.embedding_bags.{name}.weight"
        weight = dict(decayed.named_parameters())[key].detach()
        counts = torch.bincount(sparse[column]["values"], minlength=weight.shape[0]).float()
        expected = no_penalty[key] + 0.3 / batch * counts[:, None] * weight
        torch.testing.assert_close(dict(decayed.named_parameters())[key].grad, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dict(plain.named_parameters())[key].grad, no_penalty[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["shared_bottom", "mmoe", "ple1", "ple", "esmm"])
def test_fused_eval_path_gives_the_eager_outputs(name):
    torch.manual_seed(5)
    model = _model(name, dropout=0.1).eval()
    _randomise(model)
    sparse, dense = _batch(23, seed=5)
    with torch.no_grad():
        fused = model(sparse, dense)
        model.use_fused_scoring = False
        eager = model(sparse, dense)
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)


def test_config_round_trip_and_state_dict_keys():
    torch.manual_seed(6)
    model = _model(interaction_weight_decay=0.01, embedding_optimizer=fused_embedding_optimizer(),
                   interaction_optimizer={"kind": "rowwise_adagrad", "lr": 0.02, "eps": 1e-8}).eval()
    _randomise(model)
    config = json.loads(json.dumps(model.config))
    assert config == model.config
    assert {k: config[k] for k in config if k.startswith("interaction")} == {
        "interaction_tasks": ["like", "rating"], "interaction_dim": DIM, "interaction_features": ["user_id", "item_id"],
        "interaction_optimizer": {"kind": "rowwise_adagrad", "lr": 0.02, "eps": 1e-8}, "interaction_weight_decay": 0.01}
    assert not any(k.startswith("interaction") for k in MultiTaskModel(FEATURES, DENSE_DIM, TASKS).config)
    rebuilt = MultiTaskModel.from_config(config).eval()
    assert rebuilt.config == model.config
    rebuilt.load_state_dict(model.state_dict())
    sparse, dense = _batch(9, seed=6)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(sparse, dense), model(sparse, dense), rtol=0, atol=0)
    keys = [k for k in model.state_dict() if k.startswith("interaction.")]
    expected = ["interaction.scale", "interaction.embeddings.embedding_bags.user.weight",
                "interaction.embeddings.embedding_bags.item.weight"]
    if fused_embedding_optimizer() is not None:
        expected += ["interaction.embeddings.embedding_bags.user.momentum", "interaction.embeddings.embedding_bags.item.momentum"]
        assert model.interaction.embeddings.fused_optimizers[0].lr == 0.02
    assert sorted(keys) == sorted(expected)
    assert model.interaction.embeddings.embedding_bags["user"].weight.shape == (20, DIM + 1)
    # the tables are embedding parameters (no torch.optim), the scales dense ones
    assert {id(p) for p in model.interaction.embeddings.parameters()} <= {id(p) for p in model.embedding_parameters()}
    assert any(p is model.interaction.scale for p in model.dense_parameters())


def test_unknown_ids_are_scored_as_the_mean_known_row():
    torch.manual_seed(7)
    model = _model()
    for table in model.interaction.embeddings.embedding_bags.values():
        weight = table.weight.detach()
        assert float(weight[0].abs().sum()) == 0.0 and float(weight[:, DIM].abs().sum()) == 0.0
        assert float(weight[1:, :DIM].abs().min()) > 0
    _randomise(model, seed=7)
    sparse, _ = _batch(11, seed=7)
    values = sparse.values().clone()
    values[:11] = 0  # every row's user_id: the unknown id
    values[2 * 11 + 3] = 0  # and one row's item_id
    cold = type(sparse)(sparse.keys(), values, lengths=sparse.lengths())
    term = _hand_term(model, cold)
    user = model.interaction.embeddings.embedding_bags["user"].weight.detach()
    item = model.interaction.embeddings.embedding_bags["item"].weight.detach()
    items = cold["item_id"]["values"]
    mean_user = user[1:].mean(0)
    by_hand = (mean_user[:DIM] * item[items, :DIM]).sum(1) + mean_user[DIM] + item[items, DIM]
    by_hand[3] = (mean_user[:DIM] * item[1:, :DIM].mean(0)).sum() + mean_user[DIM] + item[1:, DIM].mean()
    torch.testing.assert_close(term.float(), by_hand, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.interaction(cold), by_hand, rtol=1e-5, atol=1e-5)
    # a constant moved from every item bias to every user bias leaves warm and cold terms unchanged
    with torch.no_grad():
        before = (model.interaction(sparse), model.interaction(cold))
        model.interaction.embeddings.embedding_bags["user"].weight[1:, DIM] += 2.5
        model.interaction.embeddings.embedding_bags["item"].weight[1:, DIM] -= 2.5
        for a, b in zip(before, (model.interaction(sparse), model.interaction(cold))):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # the mean takes no gradient: a cold row's gradient reaches the item rows only
    model.zero_grad()
    model.interaction(type(sparse)(sparse.keys(), values, lengths=sparse.lengths())).sum().backward()
    user_grad = model.interaction.embeddings.embedding_bags["user"].weight.grad
    assert float(user_grad.abs().sum()) == 0.0
    assert float(model.interaction.embeddings.embedding_bags["item"].weight.grad.abs().sum()) > 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="interaction_tasks"):
        _model(tasks=("ctr",))
    with pytest.raises(ValueError, match="interaction_tasks"):
        _model(tasks=("like", "like"))
    with pytest.raises(ValueError, match="interaction_dim"):
        MultiTaskModel(FEATURES, DENSE_DIM, TASKS, interaction_tasks=["like"])
    with pytest.raises(ValueError, match="interaction_dim"):
        MultiTaskModel(FEATURES, DENSE_DIM, TASKS, interaction_tasks=["like"], interaction_dim=0)
    with pytest.raises(ValueError, match="interaction_features"):
        _model(interaction_features=("user_id", "genres"))  # multi-valued
    with pytest.raises(ValueError, match="interaction_features"):
        _model(interaction_features=("user_id", "title"))
    with pytest.raises(ValueError, match="interaction_weight_decay"):
        _model(interaction_weight_decay=-1.0)
    with pytest.raises(ValueError, match="interaction_features"):
        InteractionTerm("user_id", 5, "user_id", 5, 2, 1)


# --- training, catalogue scoring, transfer on the synthetic data set ---------------------------------
QUICK = dict(epochs=2, batch_size=64, progress=False, patience=0)


def _data_model(data, backbone="mmoe", seed=0, **kwargs):
    torch.manual_seed(seed)
    return MultiTaskModel(data.features, data.dense_dim, data.tasks, backbone=backbone, embedding_dim=4,
                          backbone_kwargs={"num_experts": 2, "expert_hidden": [8]} if backbone == "mmoe" else {"hidden": [8]},
                          tower_hidden=[4], embedding_optimizer=fused_embedding_optimizer(),
                          interaction_tasks=["like", "rating"], interaction_dim=2, **kwargs)


@pytest.mark.parametrize("id_dropout", [0.0, 0.4])
def test_training_updates_the_term_with_and_without_id_dropout(id_dropout):
    data = make_data()
    model = _data_model(data)
    before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("interaction.")}
    result = fit(model, data, TrainConfig(**QUICK, id_dropout=id_dropout, ema_decay=0.9))
    assert all(math.isfinite(h["train_loss"]) for h in result.history)
    after = model.state_dict()
    user = "interaction.embeddings.embedding_bags.user.weight"
    assert not torch.equal(after[user][1:], before[user][1:])
    assert not torch.equal(after["interaction.scale"], before["interaction.scale"])
    assert float(after[user][0].abs().sum()) == 0.0  # unknown ids use the mean row, never row 0


@pytest.mark.parametrize("backbone", ["mmoe", "shared_bottom"])
@pytest.mark.parametrize("native", [None, False])
def test_catalogue_scorer_adds_the_term(backbone, native):
    data = make_data()
    tables = serving_tables(data)
    model = _data_model(data, backbone).eval()
    generator = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=generator))
    rows = list(data.topk_eval("test_warm").users[:5].tolist()) + list(data.topk_eval("test_cold").users[:2].tolist())
    batch = data.pair_batch(torch.as_tensor(rows))
    with torch.no_grad():
        expected = model(batch.sparse, batch.dense).reshape(len(rows), data.num_items, -1)
    scorer = CatalogueScorer(model, tables, users_per_block=3, native=native)
    torch.testing.assert_close(scorer.score(user_table(tables), torch.tensor(rows)), expected, atol=2e-5, rtol=1e-5)
    some = scorer.score(user_table(tables), torch.tensor(rows), ["rating", "click"])
    torch.testing.assert_close(some, expected[:, :, [2, 0]], atol=2e-5, rtol=1e-5)


def test_transfer_leaves_the_term_fresh_and_lr_scales_reach_its_tables():
    data = make_data()
    source = _data_model(data, seed=0)
    fit(source, data, TrainConfig(**QUICK))
    target = _data_model(data, seed=1)
    fresh = {k: v.clone() for k, v in target.state_dict().items() if k.startswith("interaction.")}
    report = transfer(source, target, parts=("embeddings", "experts", "towers"), mode="freeze")
    assert not any("interaction" in name for name in list(report.tables) + report.parameters + list(report.prefixes))
    assert all(torch.equal(target.state_dict()[k], v) for k, v in fresh.items())
    assert target.interaction.scale.requires_grad
    assert not any(n.startswith("interaction.") for n in target.frozen_parameter_names())
    target.set_lr_scales({"interaction": 0.0})
    assert sorted(n for n in target.frozen_parameter_names() if n.startswith("interaction.")) == [
        "interaction.embeddings.embedding_bags.item.weight", "interaction.embeddings.embedding_bags.user.weight",
        "interaction.scale"]
    assert not target.interaction.scale.requires_grad
    assert not any(p.requires_grad for p in target.interaction.embeddings.parameters())
    assert target.interaction.embeddings.frozen_tables == ["user", "item"]
    fit(target, data, TrainConfig(**QUICK))  # trains the rest; the frozen term stays as it was
    assert all(torch.equal(target.state_dict()[k], v) for k, v in fresh.items() if not k.endswith("momentum"))


def test_training_checkpoint_is_served_with_the_term(tmp_path):
    data = make_data()
    model = _data_model(data)
    path = str(tmp_path / "model.pt")
    fit(model, data, TrainConfig(**QUICK), checkpoint_path=path, checkpoint_extra={"serving": serving_tables(data)})
    ranker = Ranker.load(path)
    assert ranker.model.config == model.config and ranker.model.interaction is not None
    rows = data.topk_eval("test_warm").users[:3]
    batch = data.pair_batch(torch.as_tensor(rows))
    with torch.no_grad():
        expected = model.eval()(batch.sparse, batch.dense)
        torch.testing.assert_close(ranker.model(batch.sparse, batch.dense), expected, rtol=0, atol=0)
    # like-ranked top 3 of the first user equals a brute-force ranking of the model's own like scores
    user = int(data.user_ids[int(rows[0])])
    got = ranker.recommend([user], k=3, exclude_seen=False, task_weights={"like": 1.0})
    like = expected.view(len(rows), data.num_items, -1)[0, :, 1]
    torch.testing.assert_close(got.scores[0], torch.sort(like, descending=True).values[:3], rtol=1e-5, atol=1e-6)
