"""Item-kNN rating estimates (mtkernels.data.neighbourhood) and ML-100K's ``rating_estimate`` column:
the estimate against a per-pair loop, out-of-fold values that never see their own rating, and the
column in splits, pair batches and resampled negatives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtkernels.data import protocol
from mtkernels.data.movielens import RATING_ESTIMATES, build_ml100k_mtl_v1, read_grouplens
from mtkernels.data.neighbourhood import ItemKNN, item_knn_estimates

try:
    from tests.data_fixtures import synthetic_movielens, write_grouplens
except ImportError:  # tests/ on sys.path instead of the repo root
    from data_fixtures import synthetic_movielens, write_grouplens


def random_ratings(num_users=25, num_items=40, per_user=15, seed=0):
    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(1, num_users + 1), per_user)  # user row 0 stays empty (unknown)
    items = np.concatenate([rng.choice(np.arange(1, num_items), per_user, replace=False) for _ in range(num_users)])
    taste = rng.normal(size=(num_users + 1, 3)) @ rng.normal(size=(3, num_items))
    ratings = np.clip(np.round(3 + taste[users, items] + rng.normal(0, 0.5, len(users))), 1, 5)
    return users, items, ratings, num_users + 1, num_items


def loop_estimate(model: ItemKNN, user: int, item: int) -> float:
    """The Koren-2008 item-kNN estimate of one pair, written as a plain loop."""
    neighbours = []
    for j in range(model.rated.shape[1]):
        if model.rated[user, j] and j != item:
            neighbours.append((model.similarity[item, j], model.residual[user, j]))
    neighbours.sort(key=lambda pair: -pair[0])
    top = neighbours[: model.neighbours]
    weighted = sum(s * r for s, r in top)
    total = sum(s for s, _ in top)
    return model.mean + model.user_bias[user] + model.item_bias[item] + weighted / (total + 1.0)


@pytest.mark.parametrize("neighbours", [3, 30])
def test_estimate_matches_loop(neighbours):
    users, items, ratings, num_users, num_items = random_ratings()
    model = ItemKNN(users, items, ratings, num_users, num_items, neighbours=neighbours)
    assert (model.similarity >= 0).all() and np.allclose(np.diag(model.similarity), 0)
    assert np.allclose(model.similarity, model.similarity.T)
    query_users = np.array([0, 1, 1, 5, 25, 7, 0])
    query_items = np.array([3, 0, 39, 12, 7, items[6 * 15], 11])
    got = model.estimate(query_users, query_items)
    want = [loop_estimate(model, u, i) for u, i in zip(query_users, query_items)]
    np.testing.assert_allclose(got, want, rtol=1e-10)
    offset = model.neighbourhood(query_users, query_items)
    np.testing.assert_allclose(offset, got - model.baseline(query_users, query_items), atol=1e-12)
    assert offset[0] == 0.0 and np.abs(offset).max() > 0
    # the unknown user (no ratings) gets the item baseline
    assert got[0] == pytest.approx(model.mean + model.item_bias[3])
    assert model.estimate(np.zeros(0, np.int64), np.zeros(0, np.int64)).shape == (0,)


@pytest.mark.parametrize("with_baseline", [True, False])
def test_out_of_fold_values_never_see_their_owner_rating(with_baseline):
    users, items, ratings, num_users, num_items = random_ratings(seed=1)
    # every positive, then two "negatives" per positive (items the user did not rate), owned by it
    rng = np.random.default_rng(5)
    negative_items = rng.integers(0, num_items, size=(len(ratings), 2))
    query_user = np.concatenate([users, np.repeat(users, 2)])
    query_item = np.concatenate([items, negative_items.reshape(-1)])
    owner = np.concatenate([np.arange(len(ratings)), np.repeat(np.arange(len(ratings)), 2)])

    def run(values):
        return item_knn_estimates(users, items, values, num_users, num_items, query_user, query_item, owner,
                                  folds=5, seed=0, with_baseline=with_baseline)

    table, got = run(ratings)
    assert table.shape == (num_users, num_items) and got.shape == (len(query_user),)
    assert np.isfinite(table).all() and np.isfinite(got).all()
    fold = np.random.default_rng(0).integers(0, 5, len(ratings))
    for m in (0, 17, 200):
        changed = ratings.copy()
        changed[m] = 6 - ratings[m] if ratings[m] != 3 else 5
        _, got_changed = run(changed)
        same_fold = fold[owner] == fold[m]
        assert got_changed[m] == got[m]  # its own rating is in no model that scores it ...
        assert np.array_equal(got_changed[owner == m], got[owner == m])  # ... nor its negatives
        assert np.array_equal(got_changed[same_fold], got[same_fold])
        assert not np.allclose(got_changed[~same_fold], got[~same_fold])  # it does feed the other folds
    # a positive and its negatives are scored by the same fold model
    k = fold[3]
    held = fold == k
    model = ItemKNN(users[~held], items[~held], ratings[~held], num_users, num_items)
    score = model.estimate if with_baseline else model.neighbourhood
    np.testing.assert_allclose(got[owner == 3], score(query_user[owner == 3], query_item[owner == 3]))
    # the table is the full model's
    full = ItemKNN(users, items, ratings, num_users, num_items)
    score = full.estimate if with_baseline else full.neighbourhood
    np.testing.assert_allclose(table[users[:20], items[:20]], score(users[:20], items[:20]))


def test_bad_arguments():
    one = np.array([1])
    with pytest.raises(ValueError, match="folds"):
        item_knn_estimates(one, one, np.array([4.0]), 2, 2, one, one, np.array([0]), folds=1)
    with pytest.raises(ValueError, match="query_owner"):
        item_knn_estimates(one, one, np.array([4.0]), 2, 2, one, one, np.array([1]))
    with pytest.raises(ValueError, match="query_user, query_item, query_owner"):
        item_knn_estimates(one, one, np.array([4.0]), 2, 2, one, np.array([1, 0]), np.array([0]))
    with pytest.raises(ValueError, match="user_row, item_row, rating"):
        ItemKNN(np.array([1, 2]), np.array([1]), np.array([4.0]), 3, 3)


@pytest.fixture(scope="module")
def synthetic_movielens_splits(tmp_path_factory):
    ratings, users, items = synthetic_movielens()
    movielens = read_grouplens(write_grouplens(tmp_path_factory.mktemp("ml") / "ml-100k", ratings, users, items))
    return movielens, protocol.build_splits(movielens.ratings, np.arange(1, 61))


@pytest.fixture(scope="module", params=["offset", "estimate"])
def synthetic_data(request, synthetic_movielens_splits):
    movielens, splits = synthetic_movielens_splits
    return (request.param, splits, build_ml100k_mtl_v1(movielens, splits, rating_estimate=request.param),
            build_ml100k_mtl_v1(movielens, splits))


def test_rating_estimate_column(synthetic_data):
    kind, splits, data, plain = synthetic_data
    assert data.dense_dim == plain.dense_dim + 1 and data.dense_names[-1] == RATING_ESTIMATES[kind]
    assert data.has_pair_dense and not plain.has_pair_dense
    train = data.splits["train"]
    positive = train.labels[:, 0] == 1
    # the other columns are unchanged
    for name in data.splits:
        assert torch.equal(data.splits[name].dense[:, :-1], plain.splits[name].dense)
    # recompute: train rows out-of-fold, each negative with the positive before it (its owner),
    # the full-train table for everything else, standardised by the train rows
    users, items = train.user_row[positive].numpy(), train.item[positive].numpy()
    owner = np.repeat(np.arange(int(positive.sum())), 5)
    assert np.array_equal(positive.numpy(), np.tile([True, False, False, False, False], len(users)))
    table, raw = item_knn_estimates(users, items, train.labels[positive, 2].numpy(), data.num_user_rows,
                                    data.num_items + 1, train.user_row.numpy(), train.item.numpy(), owner,
                                    with_baseline=kind == "estimate")
    mean, std = raw.mean(), raw.std()
    np.testing.assert_allclose(train.dense[:, -1].numpy(), (raw - mean) / std, rtol=1e-5, atol=1e-5)
    assert abs(float(train.dense[:, -1].mean())) < 1e-4
    for name in ("val", "test_warm", "test_cold"):
        split = data.splits[name]
        want = (table[split.user_row.numpy(), split.item.numpy()] - mean) / std
        np.testing.assert_allclose(split.dense[:, -1].numpy(), want, rtol=1e-5, atol=1e-5)
    # cold users have no history: their value is the item's (baseline; offset 0), whatever the user
    cold = data.splits["test_cold"]
    same_item = cold.item == cold.item[0]
    assert torch.allclose(cold.dense[same_item, -1], cold.dense[0, -1].expand(int(same_item.sum())))


def test_rating_estimate_in_pair_batch_and_resampled_negatives(synthetic_data):
    _, _, data, _ = synthetic_data
    val = data.splits["val"]
    rows = torch.tensor([0, 1, 7, 12])
    users, items = val.user_row[rows], val.item[rows] - 1
    batch = data.pair_batch(users, items)
    # the diagonal pairs are exactly the val rows
    diagonal = torch.arange(4) * 4 + torch.arange(4)
    assert torch.equal(batch.dense[diagonal], val.dense[rows])
    new_user = data.pair_batch(data.new_user_rows([{"age": 30, "gender": "F"}]), items)
    unknown = data.pair_batch(torch.tensor([0]), items)
    assert torch.equal(new_user.dense[:, -1], unknown.dense[:, -1])
    original = data.splits["train"].dense.clone()
    try:
        fresh = data.resample_negatives(seed=3)
        negative = fresh.labels[:, 0] == 0
        assert torch.equal(fresh.dense[~negative], original[~negative])  # positives keep out-of-fold values
        # negatives drawn afresh get the full-train value (documented)
        recomputed = data.pair_batch(fresh.user_row[negative][:50], fresh.item[negative][:50] - 1)
        diagonal = torch.arange(50) * 50 + torch.arange(50)
        assert torch.equal(fresh.dense[negative][:50], recomputed.dense[diagonal])
    finally:
        restored = data.resample_negatives(seed=None)
    assert torch.equal(restored.dense, original)


def test_bad_rating_estimate(synthetic_movielens_splits):
    with pytest.raises(ValueError, match="rating_estimate must be None or one of"):
        build_ml100k_mtl_v1(*synthetic_movielens_splits, rating_estimate="knn")


def test_serving_tables_refuse_pair_dense(synthetic_data):
    from mtkernels.serving import serving_tables

    with pytest.raises(ValueError, match="has_pair_dense"):
        serving_tables(synthetic_data[2])
