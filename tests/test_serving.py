"""`mtkernels.serving.Ranker` on a tiny trained model: exclusions, cold and unknown users, empty
requests, task fusion, and the pair features it builds against `MultiTaskData.pair_batch`."""

import math

import pytest
import torch

from mtkernels.serving import Ranker, serving_tables
from mtkernels.training import TrainConfig, fit, save_checkpoint
from synthetic import make_data, one_thread, tiny_model  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    data = make_data()
    model = tiny_model(data, "mmoe")
    path = str(tmp_path_factory.mktemp("ranker") / "model.pt")
    fit(model, data, TrainConfig(epochs=2, batch_size=64, lr=1e-2, progress=False, patience=0),
        checkpoint_path=path, checkpoint_extra={"serving": serving_tables(data)})
    return data, model.eval(), path, Ranker.load(path)


def _brute_force(data, model, row, k, exclude, weights=None):
    batch = data.pair_batch(torch.tensor([row]))
    with torch.no_grad():
        pred = model(batch.sparse, batch.dense)
    weights = weights or {"click": 1.0}
    names = [t.name for t in data.tasks]
    score = sum(w * pred[:, names.index(n)] for n, w in weights.items())
    score[list(exclude)] = -math.inf
    order = sorted(range(data.num_items), key=lambda i: (-float(score[i]), i))[:k]
    return [int(data.item_ids[i]) if score[i] > -math.inf else -1 for i in order], score


def _seen(data, row):
    ev = data.topk_eval("test_warm")
    u = ev.users.tolist().index(row)
    return set(ev.exclude_indices[ev.exclude_offsets[u]:ev.exclude_offsets[u + 1]].tolist())


def test_warm_users_ranked_by_the_model_without_seen_items(trained):
    data, model, _, ranker = trained
    rows = data.topk_eval("test_warm").users[:3].tolist()
    users = [int(data.user_ids[r]) for r in rows]
    result = ranker.recommend(users, k=6)
    assert result.served_by == ["model"] * 3 and result.item_ids.shape == (3, 6)
    for j, row in enumerate(rows):
        seen = _seen(data, row)
        expected, score = _brute_force(data, model, row, 6, seen)
        assert result.item_ids[j].tolist() == expected
        seen_ids = {int(data.item_ids[i]) for i in seen}
        assert not seen_ids & set(result.item_ids[j].tolist())
        torch.testing.assert_close(result.scores[j], torch.sort(score, descending=True).values[:6])
        assert result.titles[j][0] == data.item_titles[data.item_ids.tolist().index(expected[0])]


def test_include_seen_and_task_weights(trained):
    data, model, _, ranker = trained
    row = int(data.topk_eval("test_warm").users[0])
    user = int(data.user_ids[row])
    weights = {"click": 1.0, "like": 0.5, "rating": 0.1}
    result = ranker.recommend([user], k=8, exclude_seen=False, task_weights=weights)
    expected, _ = _brute_force(data, model, row, 8, set(), weights)
    assert result.item_ids[0].tolist() == expected
    with pytest.raises(ValueError, match="unknown task"):
        ranker.recommend([user], task_weights={"purchase": 1.0})
    with pytest.raises(ValueError, match="k must be"):
        ranker.recommend([user], k=-1)


def test_cold_users_served_from_side_features(trained):
    data, model, _, ranker = trained
    row = int(data.topk_eval("test_cold").users[0])
    user = int(data.user_ids[row])
    result = ranker.recommend([user], k=5)
    assert result.served_by == ["side_features"]
    expected, _ = _brute_force(data, model, row, 5, set())
    assert result.item_ids[0].tolist() == expected


def test_unknown_users_get_popular_items_and_side_features_when_given(trained):
    data, model, _, ranker = trained
    warm_user = int(data.user_ids[int(data.topk_eval("test_warm").users[0])])
    result = ranker.recommend([123456, warm_user, 777], k=4)
    assert result.served_by == ["popularity", "model", "popularity"]
    train = data.splits["train"]
    counts = torch.bincount(train.item[train.labels[:, 0] == 1] - 1, minlength=data.num_items).tolist()
    order = sorted(range(data.num_items), key=lambda i: (-counts[i], i))[:4]
    assert result.item_ids[0].tolist() == [int(data.item_ids[i]) for i in order]
    assert torch.equal(result.item_ids[0], result.item_ids[2])
    assert result.scores[0].tolist() == [float(counts[i]) for i in order]

    given = ranker.recommend([123456], k=4, side_features={123456: {"age": 2}})
    assert given.served_by == ["side_features"]
    # an unknown user with age 2 scores like a cold user row with the same features
    cold_rows = data.topk_eval("test_cold").users.tolist()
    twin = next((r for r in cold_rows if int(data.user_feature_rows(users=torch.tensor([r])).sparse["age"][0]) == 2), None)
    if twin is not None:
        batch = data.pair_batch(torch.tensor([twin]))
        sparse, dense = ranker.pair_features(ranker._user_table([{"age": 2}]), torch.tensor([ranker.tables["user_ids"].numel()]))
        assert torch.equal(sparse.values(), batch.sparse.values())
    with pytest.raises(ValueError, match="unknown user features"):
        ranker.recommend([5], side_features={5: {"height": 3}})


def test_empty_request_and_short_lists(trained):
    data, _, _, ranker = trained
    empty = ranker.recommend([], k=10)
    assert empty.item_ids.shape == (0, 10) and empty.scores.shape == (0, 10) and len(empty) == 0
    row = int(data.topk_eval("test_warm").users[0])
    user = int(data.user_ids[row])
    allowed = data.num_items - len(_seen(data, row))
    long = ranker.recommend([user], k=data.num_items)
    assert (long.item_ids[0, :allowed] >= 0).all() and (long.item_ids[0, allowed:] == -1).all()
    assert torch.isinf(long.scores[0, allowed:]).all() and long.titles[0][-1] == ""
    assert ranker.recommend([user], k=0).item_ids.shape == (1, 0)
    huge = ranker.recommend([user, 10**9], k=10**12)  # capped to the catalogue, not a [2, 10**12] allocation
    assert huge.item_ids.shape == (2, data.num_items) and torch.equal(huge.item_ids[0], long.item_ids[0])
    assert huge.served_by[1] == "popularity" and sorted(huge.item_ids[1].tolist()) == sorted(data.item_ids.tolist())


def test_pair_features_match_pair_batch(trained):
    data, _, _, ranker = trained
    rows = torch.tensor([1, 3, data.num_user_rows - 1])
    sparse, dense = ranker.pair_features(ranker._user_table([]), rows)
    batch = data.pair_batch(rows)
    assert sparse.keys() == batch.sparse.keys()
    assert torch.equal(sparse.values(), batch.sparse.values())
    assert torch.equal(sparse.lengths(), batch.sparse.lengths())
    assert torch.equal(dense, batch.dense)


def test_load_errors(tmp_path, trained):
    with pytest.raises(FileNotFoundError):
        Ranker.load(str(tmp_path / "none.pt"))
    from mtkernels.training import load_checkpoint

    checkpoint = load_checkpoint(trained[2])
    checkpoint["serving"] = None
    path = str(tmp_path / "no-serving.pt")
    save_checkpoint(path, checkpoint)
    with pytest.raises(ValueError, match="no serving tables"):
        Ranker.load(path)


def test_recommend_rejects_ids_that_are_not_integers_or_out_of_range(trained):
    data, _, _, ranker = trained
    known = int(data.user_ids[1])
    for bad in (known + 0.5, str(known)):  # int(5.5) would silently serve user 5
        with pytest.raises(ValueError, match=r"user_ids: expected integer ids"):
            ranker.recommend([bad], k=3)
    with pytest.raises(ValueError, match=r"k must be an integer >= 0, got 2.5"):
        ranker.recommend([known], k=2.5)
    size = data.feature("age").num_embeddings
    for bad in (size, -1, "31", 1.5):
        with pytest.raises(ValueError, match=rf"side_features\[9001\]\['age'\]: expected an id in \[0, {size}\)"):
            ranker.recommend([9001], k=3, side_features={9001: {"age": bad}})
    # the largest id is fine
    assert ranker.recommend([9001], k=3, side_features={9001: {"age": size - 1}}).served_by == ["side_features"]


def test_recommend_refuses_a_single_id_and_side_features_of_users_not_requested(trained):
    data, _, _, ranker = trained
    known = int(data.user_ids[1])
    for single in (known, torch.tensor(known)):  # was "'int' object is not iterable" / "iteration over a 0-d tensor"
        with pytest.raises(ValueError, match=rf"user_ids: expected a sequence of ids \(e.g. \[{known}\]\), got"):
            ranker.recommend(single, k=3)
    # side features of a user not in user_ids were silently dropped: nobody was served from them
    with pytest.raises(ValueError, match=r"side_features names users not in user_ids: \[9001\]"):
        ranker.recommend([known], k=3, side_features={9001: {"age": 1}})
    assert ranker.recommend(torch.tensor([known]), k=3).user_ids == [known]
