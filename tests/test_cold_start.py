"""`mtkernels.cold_start`: the item prior (softmax over the catalogue from user side features), the
cold-user blend of `ColdStartModel` (warm rows untouched) and the pseudo-cold selection data."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mtkernels import evaluation
from mtkernels.cold_start import (PSEUDO_COLD_SPLIT, ColdStartModel, FirstSessionPrior, ItemPrior, RecentPopularityPrior,
                                  first_session_prior_for, fit_item_prior, item_prior_for, pseudo_cold_ml100k,
                                  recent_popularity_prior_for, request_times)
from mtkernels.data import protocol
from mtkernels.data.movielens import read_grouplens
from mtkernels.serving import Ranker, serving_tables
from mtkernels.training import TrainConfig, fit
from mtkernels.transfer import cold_topk_metrics, select_tasks
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
    with pytest.raises(ValueError, match="l2"):  # NaN would train a NaN prior without a word
        fit_item_prior(item_prior_for(data, ("age",)), data, l2=float("nan"))
    with pytest.raises(ValueError, match="features: give at least one"):  # was torch.stack's RuntimeError
        item_prior_for(data, ())


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


def test_cold_start_model_of_an_esmm_model_is_scored_on_its_entire_space_labels():
    # weight 0 is the model itself, so every metric of evaluate must be the model's: ESMM's like output,
    # P(click and like), is scored on entire-space labels (0 on non-clicked rows, whose like label is NaN)
    data = make_data()
    esmm = tiny_model(data, "esmm").eval()
    labels = data.splits["test_cold"].labels
    assert bool(torch.isnan(labels[:, 1]).any())
    wrapped = ColdStartModel(esmm, item_prior_for(data, ("age",)), 0.0)
    torch.testing.assert_close(wrapped.targets(labels), esmm.targets(labels), rtol=0, atol=0, equal_nan=True)
    for split in ("val", "test_cold"):
        want = evaluation.evaluate(esmm, data, split, topk=False)
        got = evaluation.evaluate(wrapped, data, split, topk=False)
        assert got["like"]["auc"] == pytest.approx(want["like"]["auc"], abs=1e-9)
        assert got["like"]["logloss"] == pytest.approx(want["like"]["logloss"], rel=1e-6)


def test_evaluate_rejects_unknown_splits_and_k(trained):
    data, model, _ = trained
    for call in (evaluation.evaluate, evaluation.topk_metrics):
        with pytest.raises(ValueError, match=r"split: 'test' is not a split of .*test_warm"):
            call(model, data, "test")
        with pytest.raises(ValueError, match="k must be a positive number of items, got 0"):
            call(model, data, "test_cold", k=0)


def test_cold_start_model_errors(trained):
    data, model, prior = trained
    with pytest.raises(ValueError, match="weight"):
        ColdStartModel(model, prior, 1.5)
    with pytest.raises(ValueError, match="task"):
        ColdStartModel(model, prior, 0.5, task="like")
    with pytest.raises(ValueError, match="already a ColdStartModel"):  # cold-start on cold.pt: two blends
        ColdStartModel(ColdStartModel(model, prior, 0.5), prior, 0.5)


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
    # the time-aware prior counts the other users' training positives only; a held-out user's
    # request time is their first training timestamp
    recent = recent_popularity_prior_for(data, 7.0)
    kept = train[~train["user_id"].isin(held_users).to_numpy() & (train["click"].to_numpy() == 1)]
    assert sorted(zip(data.item_ids[recent.items].tolist(), recent.timestamps.tolist())) == sorted(
        zip(kept["item_id"], kept["timestamp"]))
    first = request_times(data, PSEUDO_COLD_SPLIT)[ev.users]
    assert first.tolist() == [float(theirs["timestamp"][theirs["user_id"] == u].min()) for u in ids[ev.users].tolist()]
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


# --- the time-aware popularity prior ----------------------------------------------------------
DAY = 86_400


def _reference_recent(items, stamps, num_items, half_life_days, mix, t0):
    """The docstring's formula, one rating at a time."""
    recent = [0.0] * num_items
    overall = [1.0] * num_items
    for item, stamp in zip(items, stamps):
        if stamp <= t0:
            recent[item] += 2.0 ** (-(t0 - stamp) / (DAY * half_life_days))
            overall[item] += 1.0
    if sum(recent) == 0:
        return [math.log(o / sum(overall)) for o in overall]
    return [math.log((1 - mix) * r / sum(recent) + mix * o / sum(overall)) for r, o in zip(recent, overall)]


def test_recent_popularity_prior_matches_the_formula():
    generator = torch.Generator().manual_seed(3)
    items = torch.randint(0, 9, (200,), generator=generator)
    stamps = torch.randint(0, 60 * DAY, (200,), generator=generator)
    for half_life, mix in ((1.0, 0.1), (7.5, 0.5), (30.0, 1.0)):
        prior = RecentPopularityPrior(9, half_life, mix).fit(items, stamps)
        # before every rating, between ratings, exactly at a rating (counted: <= t0), after the last
        times = [-DAY, 10 * DAY + 17, int(stamps[5]), 61 * DAY]
        got = prior(torch.tensor(times))
        assert got.shape == (4, 9) and got.dtype == torch.float32
        for row, t0 in enumerate(times):
            expected = torch.tensor(_reference_recent(items.tolist(), stamps.tolist(), 9, half_life, mix, t0))
            torch.testing.assert_close(got[row], expected.float(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.exp().sum(1), torch.ones(4))
        # one number, floats, repeated times and log_prob all agree with the matrix
        torch.testing.assert_close(prior(float(times[1]))[0], got[1])
        torch.testing.assert_close(prior(torch.tensor(times * 2, dtype=torch.float64)), torch.cat([got, got]))
        picks = torch.tensor([0, 8, 3, 3])
        torch.testing.assert_close(prior.log_prob(picks, torch.tensor(times)), got[torch.arange(4), picks])
        torch.testing.assert_close(prior.log_prob(picks, times[2]), got[2, picks])
        assert prior.log_prob(picks[:0], torch.zeros(0)).shape == (0,)
    # nothing rated before t0: uniform
    torch.testing.assert_close(prior(-1).exp()[0], torch.full((9,), 1 / 9))
    # stored sorted by time; the latest timestamp is serving's default request time
    assert bool((prior.timestamps[1:] >= prior.timestamps[:-1]).all()) and prior.latest == int(stamps.max())
    rebuilt = RecentPopularityPrior(**prior.config)
    rebuilt.load_state_dict(prior.state_dict())
    torch.testing.assert_close(rebuilt(torch.tensor(times)), got)


def test_recent_popularity_prior_is_causal():
    """A training rating after t0 never changes the scores at t0; one before it does."""
    generator = torch.Generator().manual_seed(4)
    items = torch.randint(0, 12, (300,), generator=generator)
    stamps = torch.randint(0, 100 * DAY, (300,), generator=generator)
    t0 = torch.tensor([20 * DAY, 50 * DAY + 3, 99 * DAY])
    base = RecentPopularityPrior(12, 5.0).fit(items, stamps)(t0)
    for j in range(t0.numel()):
        for extra_item, delay in ((0, 1), (7, DAY), (11, 400 * DAY)):
            later = RecentPopularityPrior(12, 5.0).fit(torch.cat([items, torch.tensor([extra_item] * 2)]),
                                                       torch.cat([stamps, t0[j] + torch.tensor([delay, 2 * delay])]))
            assert torch.equal(later(t0[j:j + 1]), base[j:j + 1])
    earlier = RecentPopularityPrior(12, 5.0).fit(torch.cat([items, torch.tensor([7])]), torch.cat([stamps, t0[:1] - 1]))
    assert not torch.equal(earlier(t0[:1]), base[:1])


def test_recent_popularity_prior_errors():
    for half_life in (-1.0, 0.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="half_life_days"):
            RecentPopularityPrior(5, half_life)
    with pytest.raises(ValueError, match="mix"):
        RecentPopularityPrior(5, 1.0, mix=0.0)
    with pytest.raises(ValueError, match="num_items"):
        RecentPopularityPrior(0, 1.0)
    prior = RecentPopularityPrior(5, 1.0)
    with pytest.raises(ValueError, match="fit it first"):
        prior.latest
    with pytest.raises(ValueError, match="same length"):
        prior.fit(torch.tensor([0, 1]), torch.tensor([0]))
    timed = make_data(timestamps=True)
    with pytest.raises(ValueError, match=r"split: 'test' is not a split of .*test_cold"):
        recent_popularity_prior_for(timed, 10.0, split="test")
    with pytest.raises(ValueError, match=r"split: 'test' is not a split of .*test_cold"):
        request_times(timed, "test")
    with pytest.raises(IndexError, match="items"):
        prior.fit(torch.tensor([5]), torch.tensor([0]))
    prior.fit(torch.tensor([0, 1]), torch.tensor([0, DAY]))
    with pytest.raises(ValueError, match="at"):
        prior(None)
    with pytest.raises(ValueError, match="at"):
        prior(torch.tensor([float("nan")]))
    with pytest.raises(ValueError, match="at"):
        prior(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="at"):
        prior.log_prob(torch.tensor([0, 1, 2]), torch.tensor([0, 1]))
    with pytest.raises(IndexError, match="items"):
        prior.log_prob(torch.tensor([5]), 0)
    with pytest.raises(ValueError, match="timestamp"):
        recent_popularity_prior_for(make_data(), 7.0)


@pytest.fixture(scope="module")
def timed():
    data = select_tasks(make_data(num_warm=60, num_items=30, positives=8, age_taste=True, timestamps=True), ["click"])
    model = tiny_model(data)
    fit(model, data, TrainConfig(epochs=3, batch_size=64, progress=False, patience=0, id_dropout=0.5, lr=1e-2))
    prior = fit_item_prior(item_prior_for(data, ("age",)), data, l2=1e-4, epochs=30, lr=0.1, batch_size=128)
    return data, model.eval(), prior, recent_popularity_prior_for(data, 3.0, 0.2)


def test_request_times_are_each_users_first_timestamp(timed):
    data = timed[0]
    for split in ("train", "test_cold"):
        rows = data.splits[split]
        first = request_times(data, split)
        for row in rows.user_row.unique().tolist():
            assert first[row] == float(rows.extra["timestamp"][rows.user_row == row].min())
        assert bool(torch.isnan(first[~torch.isin(torch.arange(data.num_user_rows), rows.user_row)]).all())
    with pytest.raises(ValueError, match="timestamp"):
        request_times(make_data(), "train")


def test_time_aware_cold_start_model(timed):
    data, model, prior, recent = timed
    users = torch.cat([data.topk_eval("val").users[:3], data.topk_eval("test_cold").users[:2]])
    batch = data.pair_batch(users)
    at = torch.tensor([5, 6, 7, 40, 80], dtype=torch.float64).repeat_interleave(data.num_items) * DAY + 1_000_000
    warm = batch.sparse["user_id"]["values"] != 0
    with torch.no_grad():
        base = model(batch.sparse, batch.dense)
        for weight, share in ((1.0, 1.0), (0.7, 0.4)):
            cold_model = ColdStartModel(model, prior, weight, recent=recent, recent_share=share)
            assert cold_model.uses_request_time
            out = cold_model(batch.sparse, batch.dense, at=at)
            assert torch.equal(out[warm], base[warm])
            p = base[~warm, 0].double().clamp(1e-7, 1 - 1e-7)
            item = batch.sparse["item_id"]["values"][~warm] - 1
            rows = torch.arange(item.numel())
            log_side = prior({"age": batch.sparse["age"]["values"][~warm]}).double()[rows, item]
            log_time = recent(at[~warm]).double()[rows, item]
            log_prior = (1 - share) * log_side + share * log_time + math.log(data.num_items)
            expected = torch.sigmoid((1 - weight) * torch.log(p / (1 - p)) + weight * log_prior).float()
            torch.testing.assert_close(out[~warm, 0], expected)
        # share 0 is the gender x age recipe: no request time needed
        plain = ColdStartModel(model, prior, 0.7, recent=recent, recent_share=0.0)
        assert not plain.uses_request_time
        assert torch.equal(plain(batch.sparse, batch.dense), ColdStartModel(model, prior, 0.7)(batch.sparse, batch.dense))
        with pytest.raises(ValueError, match="at"):
            cold_model(batch.sparse, batch.dense)
        with pytest.raises(ValueError, match="at"):
            cold_model(batch.sparse, batch.dense, at=at[:7])
    with pytest.raises(ValueError, match="recent_share"):
        ColdStartModel(model, prior, 0.5, recent_share=0.5)
    with pytest.raises(ValueError, match="recent_share"):
        ColdStartModel(model, prior, 0.5, recent=recent, recent_share=1.5)
    with pytest.raises(ValueError, match="catalogue"):
        ColdStartModel(model, prior, 0.5, recent=RecentPopularityPrior(3, 1.0), recent_share=0.5)


def test_time_aware_cold_start_in_evaluation_and_serving(timed, tmp_path):
    from mtkernels import metrics
    from mtkernels.cold_start import cold_start_checkpoint
    from mtkernels.training.checkpoint import save_checkpoint

    data, model, prior, recent = timed
    only_recent = ColdStartModel(model, prior, 1.0, recent=recent, recent_share=1.0)
    # test_cold: each cold user ranked by the time-aware prior at their first test_cold timestamp
    got = evaluation.evaluate(only_recent, data, "test_cold")
    ev = data.topk_eval("test_cold")
    with torch.no_grad():
        scores = recent(request_times(data, "test_cold")[ev.users])
    _, lists = torch.sort(scores, dim=1, descending=True, stable=True)
    assert got["topk"]["ndcg@10"] == pytest.approx(metrics.ndcg_at_k(lists[:, :10], ev.relevant, 10))
    assert got["topk"]["recall@10"] == pytest.approx(metrics.recall_at_k(lists[:, :10], ev.relevant, 10))
    assert 0 < got["click"]["auc"] < 1
    assert evaluation.topk_metrics(only_recent, data, "val") == evaluation.topk_metrics(model, data, "val")
    # warm val users scored as cold (selection without test data) get their val request times too
    # (cold_topk_metrics raised "at: ... needs the request time" for a time-aware model)
    ev = data.topk_eval("val")
    with torch.no_grad():
        scores = recent(request_times(data, "val")[ev.users])
    for u in range(len(ev)):
        scores[u, ev.exclude_indices[ev.exclude_offsets[u]:ev.exclude_offsets[u + 1]]] = float("-inf")
    _, lists = torch.sort(scores, dim=1, descending=True, stable=True)
    as_cold = cold_topk_metrics(only_recent, data, "val")
    assert as_cold["ndcg@10"] == pytest.approx(metrics.ndcg_at_k(lists[:, :10], ev.relevant, 10))
    assert as_cold["recall@10"] == pytest.approx(metrics.recall_at_k(lists[:, :10], ev.relevant, 10))
    # serving: two request times give two different lists; the default is the latest training timestamp
    blended = ColdStartModel(model, prior, 0.9, recent=recent, recent_share=0.75)
    ranker = Ranker(blended, data.tasks, serving_tables(data))
    assert ranker.uses_request_time
    sides = {9001: {"age": 1}}
    early = ranker.recommend([9001], k=8, side_features=sides, at=1_000_000 + 5 * DAY)
    late = ranker.recommend([9001], k=8, side_features=sides, at=1_000_000 + 60 * DAY)
    default = ranker.recommend([9001], k=8, side_features=sides)
    assert early.item_ids.tolist() != late.item_ids.tolist()
    latest = ranker.recommend([9001], k=8, side_features=sides, at=recent.latest)
    assert torch.equal(default.item_ids, latest.item_ids) and recent.latest == int(data.splits["train"].extra["timestamp"].max())
    # a known user's list does not depend on the request time
    known = int(data.user_ids[data.topk_eval("val").users[0]])
    assert torch.equal(ranker.recommend([known], k=8, at=1_000_000.0).item_ids, ranker.recommend([known], k=8).item_ids)
    # the checkpoint round trip keeps the time-aware prior
    path = str(tmp_path / "cold_time.pt")
    save_checkpoint(path, cold_start_checkpoint(blended, data))
    loaded = Ranker.load(path)
    assert loaded.model.recent_share == 0.75 and loaded.model.recent.half_life_days == 3.0
    assert torch.equal(loaded.recommend([9001], k=8, side_features=sides, at=1_000_000 + 5 * DAY).item_ids, early.item_ids)
    # a request time read from the data (NumPy / pandas integers, a 0-d tensor) is a number of seconds too
    for same in (np.int64(1_000_000 + 5 * DAY), np.float64(1_000_000 + 5 * DAY), torch.tensor(1_000_000 + 5 * DAY)):
        assert torch.equal(ranker.recommend([9001], k=8, side_features=sides, at=same).item_ids, early.item_ids)
    for bad in (float("nan"), "yesterday", True, torch.tensor([1.0, 2.0]), np.float64("inf")):
        with pytest.raises(ValueError, match="at"):
            ranker.recommend([9001], k=8, side_features=sides, at=bad)
    with pytest.raises(ValueError, match="at"):
        Ranker(model, data.tasks, serving_tables(data)).recommend([9001], k=8, side_features=sides, at=1_000_000)


# --- the first-session prior ------------------------------------------------------------------
def test_first_session_prior_counts_each_users_first_session():
    """A hand-computed log: user 10 rates items 0, 1, 2 at days 0, 0.5, 3; user 20 rates 2, 3, 1 at
    days 1, 2, 2.5. With D = 1 day the first sessions are (0, 0), (1, 0.5) and (2, 1), (3, 2): the
    session end is included, user 10's day-3 rating and user 20's day-2.5 rating are not."""
    users = torch.tensor([10, 10, 10, 20, 20, 20])
    items = torch.tensor([0, 1, 2, 2, 3, 1])
    stamps = (torch.tensor([0.0, 0.5, 3.0, 1.0, 2.0, 2.5]) * DAY).long() + 1_000_000
    prior = FirstSessionPrior(4, half_life_days=2.0, mix=0.5, session_days=1.0).fit(users, items, stamps)
    assert prior.items.tolist() == [0, 1, 2, 3]
    assert (prior.timestamps - 1_000_000).tolist() == [0, DAY // 2, DAY, 2 * DAY]
    # at day 2: decayed counts 2^-1, 2^-0.75, 2^-0.5, 1 (half-life 2 days); all-time counts 1 + 1 each
    c = torch.tensor([2 ** -1.0, 2 ** -0.75, 2 ** -0.5, 1.0], dtype=torch.float64)
    expected = torch.log(0.5 * c / c.sum() + 0.5 * torch.full((4,), 2.0 / 8.0, dtype=torch.float64))
    torch.testing.assert_close(prior(1_000_000 + 2 * DAY)[0], expected.float())
    # at day 0.75 only user 10's first two ratings are known (user 20's session has not started)
    c = torch.tensor([2 ** -0.375, 2 ** -0.125, 0.0, 0.0], dtype=torch.float64)
    g = torch.tensor([2.0, 2.0, 1.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(prior(1_000_000 + 3 * DAY // 4)[0],
                               torch.log(0.5 * c / c.sum() + 0.5 * g / g.sum()).float())
    # exactly the time-aware prior over the first-session rows; a longer session keeps more
    same = RecentPopularityPrior(4, 2.0, 0.5).fit(torch.tensor([0, 1, 2, 3]), prior.timestamps)
    times = torch.tensor([0.0, 0.75, 2.0, 9.0]) * DAY + 1_000_000
    torch.testing.assert_close(prior(times), same(times))
    # serving's default request time: the latest first-session rating (day 2), the same prior as any later time
    assert prior.latest == 1_000_000 + 2 * DAY and torch.equal(prior(prior.latest), prior(1_000_000 + 3 * DAY))
    assert FirstSessionPrior(4, 2.0, 0.5, session_days=1.6).fit(users, items, stamps).items.tolist() == [0, 1, 2, 3, 1]
    assert FirstSessionPrior(4, 2.0, 0.5, session_days=0.25).fit(users, items, stamps).items.tolist() == [0, 2]
    # deterministic and independent of the row order; the config and state_dict rebuild it
    shuffled = torch.tensor([5, 2, 0, 4, 1, 3])
    again = FirstSessionPrior(4, 2.0, 0.5, 1.0).fit(users[shuffled], items[shuffled], stamps[shuffled])
    assert torch.equal(again(times), prior(times)) and torch.equal(again.items, prior.items)
    assert prior.config == {"num_items": 4, "half_life_days": 2.0, "mix": 0.5, "num_ratings": 4, "session_days": 1.0}
    rebuilt = FirstSessionPrior(**prior.config)
    rebuilt.load_state_dict(prior.state_dict())
    assert torch.equal(rebuilt(times), prior(times))


def test_first_session_prior_is_causal():
    """A training rating after t0 never changes the scores at t0 (a later rating of a session that
    started before t0, or a new user's whole session); one before it does."""
    generator = torch.Generator().manual_seed(5)
    users = torch.randint(0, 40, (300,), generator=generator)
    items = torch.randint(0, 12, (300,), generator=generator)
    stamps = torch.randint(0, 100 * DAY, (300,), generator=generator)
    t0 = torch.tensor([20 * DAY, 50 * DAY + 3, 99 * DAY])
    base = FirstSessionPrior(12, 5.0, 0.1, 3.0).fit(users, items, stamps)(t0)
    for j in range(t0.numel()):
        # the user whose first rating is the latest one at or before t0: their session is open at t0
        known = stamps <= t0[j]
        open_user = users[known][torch.argmax(torch.where(known, stamps, -1)[known])]
        for user, delay in ((open_user, 1), (open_user, DAY), (torch.tensor(99), 1), (open_user, 400 * DAY)):
            later = FirstSessionPrior(12, 5.0, 0.1, 3.0).fit(
                torch.cat([users, user.reshape(1).repeat(2)]), torch.cat([items, torch.tensor([3, 7])]),
                torch.cat([stamps, t0[j] + torch.tensor([delay, 2 * delay])]))
            assert torch.equal(later(t0[j:j + 1]), base[j:j + 1])
    earlier = FirstSessionPrior(12, 5.0, 0.1, 3.0).fit(torch.cat([users, torch.tensor([99])]),
                                                        torch.cat([items, torch.tensor([7])]), torch.cat([stamps, t0[:1] - 1]))
    assert not torch.equal(earlier(t0[:1]), base[:1])


def test_first_session_prior_errors_and_data_helper(timed, tmp_path):
    for days in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="session_days"):
            FirstSessionPrior(5, 1.0, 0.1, days)
    with pytest.raises(ValueError, match="half_life_days"):
        FirstSessionPrior(5, 0.0)
    with pytest.raises(ValueError, match="same length"):
        FirstSessionPrior(5, 1.0).fit(torch.tensor([1, 2]), torch.tensor([0, 1]), torch.tensor([0]))
    with pytest.raises(IndexError, match="items"):
        FirstSessionPrior(5, 1.0).fit(torch.tensor([1]), torch.tensor([5]), torch.tensor([0]))
    with pytest.raises(ValueError, match="timestamp"):
        first_session_prior_for(make_data(), 7.0)
    data, model, prior, _ = timed
    with pytest.raises(ValueError, match=r"split: 'test' is not a split"):
        first_session_prior_for(data, 7.0, split="test")
    # synthetic timestamps: a user's j-th positive at day 7 j + row, so a 1-day session is their first positive
    first = first_session_prior_for(data, 3.0, 0.2, session_days=1.0)
    train = data.splits["train"]
    positive = train.labels[:, 0] > 0
    rows, stamps = train.user_row[positive], train.extra["timestamp"][positive]
    start = {r: int(stamps[rows == r].min()) for r in rows.unique().tolist()}
    in_first = torch.tensor([int(s) == start[r] for r, s in zip(rows.tolist(), stamps.tolist())])
    expected = sorted(zip((train.item[positive] - 1)[in_first].tolist(), stamps[in_first].tolist()))
    assert sorted(zip(first.items.tolist(), first.timestamps.tolist())) == expected and len(expected) == len(start)
    # in the cold-start model's time-aware slot, through a checkpoint and Ranker.load
    from mtkernels.cold_start import cold_start_checkpoint
    from mtkernels.training.checkpoint import save_checkpoint

    cold = ColdStartModel(model, prior, 1.0, recent=first, recent_share=0.5)
    path = str(tmp_path / "cold_first.pt")
    save_checkpoint(path, cold_start_checkpoint(cold, data))
    loaded = Ranker.load(path)
    assert isinstance(loaded.model.recent, FirstSessionPrior) and loaded.model.recent.session_days == 1.0
    sides = {9001: {"age": 1}}
    at = 1_000_000 + 30 * DAY
    assert torch.equal(loaded.recommend([9001], k=8, side_features=sides, at=at).item_ids,
                       Ranker(cold, data.tasks, serving_tables(data)).recommend([9001], k=8, side_features=sides, at=at).item_ids)
