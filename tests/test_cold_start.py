"""`mtkernels.cold_start`: the item prior (softmax over the catalogue from user side features), the
cold-user blend of `ColdStartModel` (warm rows untouched) and the pseudo-cold selection data."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mtkernels import evaluation
from mtkernels.cold_start import (PSEUDO_COLD_SPLIT, ColdStartModel, ItemPrior, fit_item_prior, item_prior_for,
                                  pseudo_cold_ml100k)
from mtkernels.data import protocol
from mtkernels.data.movielens import read_grouplens
from mtkernels.serving import Ranker, serving_tables
from mtkernels.training import TrainConfig, fit
from mtkernels.transfer import select_tasks
from synthetic import make_data, one_thread, tiny_model  # noqa: F401 (autouse fixture)

try:
    from tests.data_fixtures import synthetic_movielens, write_grouplens
except ImportError:  # tests/ on sys.path instead of the repo root
    from data_fixtures import synthetic_movielens, write_grouplens


def _random_prior(seed=0, num_items=7):
    prior = ItemPrior(num_items, {"age": 3, "gender": 2}, ("age", ("gender", "age")))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        prior.bias.copy_(torch.randn(num_items, generator=generator))
        for table in prior.tables:
            table.copy_(torch.randn(table.shape, generator=generator))
    return prior


def test_item_prior_matches_a_direct_softmax():
    prior = _random_prior()
    age = torch.tensor([0, 2, 1, 2, 0])
    gender = torch.tensor([1, 0, 1, 0, 0])
    side = {"age": age, "gender": gender}
    # reference: bias + age row + (gender, age) cross row, mixed radix gender * 3 + age
    logits = prior.bias + prior.tables[0][age] + prior.tables[1][gender * 3 + age]
    expected = torch.log_softmax(logits, dim=1)
    torch.testing.assert_close(prior(side), expected)
    torch.testing.assert_close(prior(side).exp().sum(1), torch.ones(5))
    items = torch.tensor([6, 0, 3, 3, 1])
    torch.testing.assert_close(prior.log_prob(side, items), expected[torch.arange(5), items])
    assert prior.log_prob({"age": age[:0], "gender": gender[:0]}, items[:0]).shape == (0,)
    assert ItemPrior(**prior.config).config == prior.config


def test_item_prior_errors():
    with pytest.raises(ValueError, match="num_items"):
        ItemPrior(0, {"age": 3})
    with pytest.raises(ValueError, match="zip"):
        ItemPrior(5, {"age": 3}, ("zip",))
    with pytest.raises(ValueError, match="features"):
        ItemPrior(5, {"age": 3}, ((),))
    prior = _random_prior()
    with pytest.raises(KeyError, match="gender"):
        prior({"age": torch.tensor([0])})
    with pytest.raises(IndexError, match="age"):
        prior({"age": torch.tensor([3]), "gender": torch.tensor([0])})
    with pytest.raises(IndexError, match="items"):
        prior.log_prob({"age": torch.tensor([0]), "gender": torch.tensor([0])}, torch.tensor([7]))
    data = make_data()
    with pytest.raises(ValueError, match="genres"):
        item_prior_for(data, ("genres",))
    with pytest.raises(ValueError, match="l2"):
        fit_item_prior(item_prior_for(data, ("age",)), data, l2=-1.0)


def test_fit_item_prior_learns_each_group_and_shrinks_to_popularity():
    data = make_data(num_warm=60, num_items=30, positives=8, age_taste=True)
    prior = fit_item_prior(item_prior_for(data, ("age",)), data, l2=1e-5, epochs=60, lr=0.1, batch_size=128)
    rows = data.splits["train"]
    positive = rows.labels[:, 0] > 0
    age = data.user_feature_rows(users=rows.user_row[positive]).sparse["age"]
    items = rows.item[positive] - 1
    with torch.no_grad():
        for group in (1, 2, 3):
            counts = torch.bincount(items[age == group], minlength=data.num_items)
            learned = prior({"age": torch.tensor([group])})[0]
            # the most frequent item of each age group is the group's most probable item
            assert counts[learned.argmax()] == counts.max()
        assert not torch.equal(prior({"age": torch.tensor([1])}).argmax(1), prior({"age": torch.tensor([2])}).argmax(1))
    # a huge penalty leaves only the bias: every group ranks by overall popularity
    flat = fit_item_prior(item_prior_for(data, ("age",)), data, l2=10.0, epochs=60, lr=0.1, batch_size=128)
    with torch.no_grad():
        assert max(float(t.abs().max()) for t in flat.tables) < 1e-2
        ranked = flat({"age": torch.tensor([1])})[0]
    counts = torch.bincount(items, minlength=data.num_items)
    assert counts[ranked.argmax()] == counts.max()
    # one L2 per group: the heavily penalised group is shrunk to 0, the other one learns
    both = fit_item_prior(item_prior_for(data, ("age", ("age",))), data, l2=[1e-5, 10.0], epochs=60, lr=0.1,
                          batch_size=128)
    with torch.no_grad():
        assert float(both.tables[1].abs().max()) < 1e-2 < float(both.tables[0].abs().max())
    # one value is the same as that value for every group
    single = fit_item_prior(item_prior_for(data, ("age",)), data, l2=1e-3, epochs=3, batch_size=128)
    listed = fit_item_prior(item_prior_for(data, ("age",)), data, l2=[1e-3], epochs=3, batch_size=128)
    assert torch.equal(single.tables[0], listed.tables[0]) and torch.equal(single.bias, listed.bias)
    with pytest.raises(ValueError, match="one per group"):
        fit_item_prior(item_prior_for(data, ("age",)), data, l2=[1e-3, 1e-3])
    with pytest.raises(ValueError, match="l2"):
        fit_item_prior(item_prior_for(data, ("age",)), data, l2=[-1.0])


@pytest.fixture(scope="module")
def trained():
    data = select_tasks(make_data(num_warm=60, num_items=30, positives=8, age_taste=True), ["click"])
    model = tiny_model(data)
    fit(model, data, TrainConfig(epochs=3, batch_size=64, progress=False, patience=0, id_dropout=0.5, lr=1e-2))
    prior = fit_item_prior(item_prior_for(data, ("age",)), data, l2=1e-4, epochs=30, lr=0.1, batch_size=128)
    return data, model.eval(), prior


def test_cold_start_model_changes_only_cold_rows(trained):
    data, model, prior = trained
    users = torch.cat([data.topk_eval("val").users[:3], data.topk_eval("test_cold").users[:2]])
    batch = data.pair_batch(users)
    with torch.no_grad():
        base = model(batch.sparse, batch.dense)
        for weight in (0.0, 0.5, 1.0):
            out = ColdStartModel(model, prior, weight)(batch.sparse, batch.dense)
            warm = batch.sparse["user_id"]["values"] != 0
            assert warm.sum() == 3 * data.num_items and (~warm).sum() == 2 * data.num_items
            assert torch.equal(out[warm], base[warm])
            p = base[~warm, 0].double().clamp(1e-7, 1 - 1e-7)
            age = batch.sparse["age"]["values"][~warm]
            item = batch.sparse["item_id"]["values"][~warm] - 1
            log_prior = prior({"age": age}).double()[torch.arange(item.numel()), item] + math.log(data.num_items)
            expected = torch.sigmoid((1 - weight) * torch.log(p / (1 - p)) + weight * log_prior).float()
            torch.testing.assert_close(out[~warm, 0], expected)
        assert torch.equal(ColdStartModel(model, prior, 0.0)(batch.sparse, batch.dense), base)


def test_cold_start_model_in_evaluation_and_serving(trained):
    data, model, prior = trained
    only_prior = ColdStartModel(model, prior, 1.0)
    # test_cold through evaluate = ranking each cold user's catalogue by the prior of its age group
    got = evaluation.evaluate(only_prior, data, "test_cold")["topk"]
    ev = data.topk_eval("test_cold")
    with torch.no_grad():
        scores = prior(data.user_feature_rows(users=ev.users).sparse)
    _, lists = torch.sort(scores, dim=1, descending=True, stable=True)
    from mtkernels import metrics
    assert got["ndcg@10"] == pytest.approx(metrics.ndcg_at_k(lists[:, :10], ev.relevant, 10))
    assert got["recall@10"] == pytest.approx(metrics.recall_at_k(lists[:, :10], ev.relevant, 10))
    # warm users' metrics are the model's own
    assert evaluation.topk_metrics(only_prior, data, "val") == evaluation.topk_metrics(model, data, "val")
    # Ranker: two unknown users with different side features get their age group's prior ranking
    ranker = Ranker(only_prior, data.tasks, serving_tables(data))
    result = ranker.recommend([9001, 9002], k=5, side_features={9001: {"age": 1}, 9002: {"age": 2}})
    assert result.served_by == ["side_features", "side_features"]
    first, second = (row.tolist() for row in result.item_ids)
    assert first != second
    with torch.no_grad():
        expected = prior({"age": torch.tensor([1])})[0].topk(5).indices
    assert first == data.item_ids[expected].tolist()


def test_cold_start_model_errors(trained):
    data, model, prior = trained
    with pytest.raises(ValueError, match="weight"):
        ColdStartModel(model, prior, 1.5)
    with pytest.raises(ValueError, match="task"):
        ColdStartModel(model, prior, 0.5, task="like")


def test_pseudo_cold_holds_out_whole_training_users(tmp_path):
    ratings, users, items = synthetic_movielens(num_users=60)
    movielens = read_grouplens(write_grouplens(tmp_path / "gl", ratings, users, items))
    data = pseudo_cold_ml100k(fraction=0.2, seed=1, movielens=movielens)
    assert set(data.splits) == {"train", "val", PSEUDO_COLD_SPLIT}
    ids = data.user_ids
    held = data.splits[PSEUDO_COLD_SPLIT]
    held_users = set(ids[held.user_row].tolist())
    train_users = set(ids[data.splits["train"].user_row].tolist())
    val_users = set(ids[data.splits["val"].user_row].tolist())
    assert len(held_users) == round(0.2 * len(held_users | train_users)) and not held_users & (train_users | val_users)
    # held-out users are encoded cold: unknown user id 0
    assert int(data.user_feature_rows(users=held.user_row).sparse["user_id"].abs().sum()) == 0
    # relevant = the user's positives over the whole catalogue (nothing excluded)
    ev = data.topk_eval(PSEUDO_COLD_SPLIT)
    assert ev.exclude_indices.numel() == 0
    positive = held.labels[:, 0] > 0
    assert ev.relevant_indices.numel() == int(positive.sum())
    # ... which are all the user's training positives of the protocol split
    train = protocol.build_splits(movielens.ratings, np.sort(movielens.items["item_id"].to_numpy()))["train"]
    theirs = train[train["user_id"].isin(held_users).to_numpy() & (train["click"].to_numpy() == 1)]
    assert sorted(zip(ids[ev.users].repeat_interleave(ev.relevant_offsets.diff()).tolist(),
                      data.item_ids[ev.relevant_indices].tolist())) == sorted(zip(theirs["user_id"], theirs["item_id"]))
    other = pseudo_cold_ml100k(fraction=0.2, seed=2, movielens=movielens)
    assert other.topk_eval(PSEUDO_COLD_SPLIT).users.numel() == ev.users.numel()
    assert set(other.user_ids[other.splits[PSEUDO_COLD_SPLIT].user_row].tolist()) != held_users
    with pytest.raises(ValueError, match="fraction"):
        pseudo_cold_ml100k(fraction=1.0, movielens=movielens)
    # K folds: disjoint held-out users that together are every warm user of the protocol split
    folds = [pseudo_cold_ml100k(seed=1, movielens=movielens, folds=3, fold=f) for f in range(3)]
    held_sets = [set(d.user_ids[d.splits[PSEUDO_COLD_SPLIT].user_row].tolist()) for d in folds]
    assert sum(len(h) for h in held_sets) == len(set(train["user_id"])) == len(set().union(*held_sets))
    assert all(len(h) in (len(train["user_id"].unique()) // 3, len(train["user_id"].unique()) // 3 + 1) for h in held_sets)
    for d, h in zip(folds, held_sets):
        assert not h & set(d.user_ids[d.splits["train"].user_row].tolist())
    with pytest.raises(ValueError, match="folds"):
        pseudo_cold_ml100k(movielens=movielens, folds=3, fold=3)


def test_cold_start_checkpoint_serves_through_ranker_load(trained, tmp_path):
    from mtkernels.cold_start import cold_start_checkpoint
    from mtkernels.training.checkpoint import save_checkpoint

    data, model, prior = trained
    blended = ColdStartModel(model, prior, 0.75)
    path = str(tmp_path / "cold_start.pt")
    save_checkpoint(path, cold_start_checkpoint(blended, data))
    ranker = Ranker.load(path)
    assert isinstance(ranker.model, ColdStartModel) and ranker.model.weight == 0.75
    sides = {9001: {"age": 1}, 9002: {"age": 3}}
    known = int(data.user_ids[data.topk_eval("val").users[0]])
    loaded = ranker.recommend([9001, 9002, known], k=5, side_features=sides)
    direct = Ranker(blended, data.tasks, serving_tables(data)).recommend([9001, 9002, known], k=5, side_features=sides)
    assert loaded.served_by == ["side_features", "side_features", "model"]
    assert torch.equal(loaded.item_ids, direct.item_ids)
