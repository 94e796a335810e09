"""Causal user-history bags (`mtkernels.data.history`, ``load_ml100k_mtl_v1(history_length=L)``):
the bag cutting against a per-row reference, causality on the real protocol splits (no row sees its
own item or a later one; negatives get their positive's bag), val / test_warm / cold bags, batches of
1 and 37 rows, split-aware ranking bags, and a model that trains and serves with the feature."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtkernels.data import load_ml100k_mtl_v1
from mtkernels.data.history import UserHistory, causal_user_history
from mtkernels.data.movielens import build_ml100k_mtl_v1

try:
    from tests.data_fixtures import synthetic_movielens
    from tests.test_data_ml100k import ml100k_dir
except ImportError:  # tests/ on sys.path instead of the repo root
    from data_fixtures import synthetic_movielens
    from test_data_ml100k import ml100k_dir

L = 20


def reference_bag(history: UserHistory, user_row: int, prefix: int):
    """Readable spec: the last L of the user's first ``prefix`` sequence items."""
    if user_row < 0:
        return []
    sequence = history.items[history.offsets[user_row] : history.offsets[user_row + 1]].tolist()
    return sequence[: min(prefix, len(sequence))][-history.max_length:]


def bag_lists(values: torch.Tensor, lengths: torch.Tensor):
    out, start = [], 0
    for n in lengths.tolist():
        out.append(values[start : start + n].tolist())
        start += n
    return out


# --- the cutting itself ---------------------------------------------------------------------
@pytest.mark.parametrize("max_length", [1, 3, 100])
def test_bags_match_reference(max_length):
    generator = torch.Generator().manual_seed(0)
    lengths = torch.tensor([0, 5, 1, 0, 9, 4])
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.long)
    torch.cumsum(lengths, 0, out=offsets[1:])
    items = torch.randint(1, 50, (int(offsets[-1]),), generator=generator)
    history = UserHistory("history", offsets, items, max_length, {}, {None: lengths.clone()})
    user_rows = torch.tensor([1, 1, 4, 4, 4, 0, 3, 2, 5, -1, 4])
    prefix = torch.tensor([0, 3, 9, 12, 2, 4, 1, 1, 4, 3, 7])  # 12 > 9 and 4 > 0: clipped
    values, got = history.bags(user_rows, prefix)
    assert got.dtype == torch.long and got.shape == (11,)
    expected = [reference_bag(history, u, k) for u, k in zip(user_rows.tolist(), prefix.tolist())]
    assert bag_lists(values, got) == expected
    values, got = history.bags(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    assert values.numel() == 0 and got.numel() == 0


def test_bad_history_raises():
    offsets, items = torch.tensor([0, 2]), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="max_length"):
        UserHistory("history", offsets, items, 0, {}, {None: torch.tensor([2])})
    with pytest.raises(ValueError, match="offsets"):
        UserHistory("history", torch.tensor([0, 3]), items, 5, {}, {None: torch.tensor([2])})
    with pytest.raises(ValueError, match="int64"):
        UserHistory("history", offsets, items, 5, {"train": torch.tensor([1.0])}, {None: torch.tensor([2])})
    with pytest.raises(ValueError, match="train"):
        causal_user_history({}, 2, 5)
    split = {"user_row": torch.tensor([1, 1]), "item_row": torch.tensor([3, 4]), "timestamp": torch.tensor([5, 5]),
             "positive": torch.tensor([False, True])}
    with pytest.raises(ValueError, match="start with a positive"):
        causal_user_history({"train": split}, 2, 5)
    split["positive"] = torch.tensor([True, False])
    split["timestamp"] = torch.tensor([5, 6])
    with pytest.raises(ValueError, match="same user and timestamp"):
        causal_user_history({"train": split}, 2, 5)


# --- the real protocol splits ---------------------------------------------------------------
@pytest.fixture(scope="module")
def data():
    return load_ml100k_mtl_v1(ml100k_dir(), history_length=L)


def _frame(split):
    return {"user": split.user_row.numpy(), "item": split.item.numpy(), "time": split.extra["timestamp"].numpy(),
            "positive": split.labels[:, 0].numpy() == 1}


def _sequences(data):
    """Per user row: train positives then val positives as (timestamp, item) pairs, sorted."""
    out = {}
    for name in ("train", "val"):
        f = _frame(data.splits[name])
        for u, i, t in zip(f["user"][f["positive"]], f["item"][f["positive"]], f["time"][f["positive"]]):
            out.setdefault(int(u), {}).setdefault(name, []).append((int(t), int(i)))
    return {u: sorted(parts.get("train", [])) + sorted(parts.get("val", [])) for u, parts in out.items() if "train" in parts}


def test_feature_spec_and_no_per_row_storage(data):
    spec = data.feature("history")
    assert spec.multi_valued and spec.side == "user" and spec.num_embeddings == data.num_items + 1
    assert "history" not in data.splits["train"].multi  # cut per batch, never materialised per row
    base = load_ml100k_mtl_v1(ml100k_dir())
    assert [f.name for f in data.features] == [f.name for f in base.features] + ["history"]
    assert torch.equal(data.splits["train"].dense, base.splits["train"].dense)


def test_train_bags_are_causal(data):
    split = data.splits["train"]
    batch = data.batch("train", torch.arange(split.num_rows))
    values, lengths = batch.sparse["history"]["values"], batch.sparse["history"]["lengths"]
    assert lengths.shape == (split.num_rows,) and int(lengths.max()) == L
    f = _frame(split)
    stamp = {(int(u), int(i)): int(t) for u, i, t in zip(f["user"][f["positive"]], f["item"][f["positive"]],
                                                           f["time"][f["positive"]])}
    sequences = _sequences(data)
    positive_rows = np.flatnonzero(f["positive"])
    bags = bag_lists(values, lengths)
    rng = np.random.default_rng(0)
    for row in rng.choice(positive_rows, size=3000, replace=False):
        user, item, time = int(f["user"][row]), int(f["item"][row]), int(f["time"][row])
        bag = bags[row]
        assert item not in bag
        # every bag item was rated strictly before the row, in (timestamp, item_id) order
        assert all((stamp[(user, b)], b) < (time, item) for b in bag)
        earlier = [i for t, i in sequences[user] if (t, i) < (time, item)]
        assert bag == earlier[-L:]
        # the row's 4 sampled negatives get exactly the positive's bag
        for j in range(row + 1, row + 5):
            assert not f["positive"][j] and bags[j] == bag
    # vectorised over every row: negatives equal their positive
    owner = np.maximum.accumulate(np.where(f["positive"], np.arange(split.num_rows), -1))
    offsets = torch.zeros(split.num_rows + 1, dtype=torch.long)
    torch.cumsum(lengths, 0, out=offsets[1:])
    assert torch.equal(lengths, lengths[owner])
    assert all(bags[j] == bags[owner[j]] for j in rng.choice(split.num_rows, size=5000, replace=False))


def test_val_test_and_cold_bags(data):
    sequences = _sequences(data)
    train = _frame(data.splits["train"])
    train_counts = dict(zip(*(a.tolist() for a in np.unique(train["user"][train["positive"]], return_counts=True))))
    for name in ("val", "test_warm", "test_cold"):
        split = data.splits[name]
        rows = torch.arange(0, split.num_rows, 97)
        batch = data.batch(name, rows)
        bags = bag_lists(batch.sparse["history"]["values"], batch.sparse["history"]["lengths"])
        for row, bag in zip(rows.tolist(), bags):
            user = int(split.user_row[row])
            if name == "test_cold":
                assert bag == []
                continue
            sequence = [i for _, i in sequences[user]]
            known = sequence[: train_counts[user]] if name == "val" else sequence
            assert bag == known[-L:]


@pytest.mark.parametrize("batch_size", [1, 37])
def test_batches_equal_row_batches(data, batch_size):
    for shuffle in (False, True):
        seen = 0
        for batch in data.batches("val", batch_size, shuffle=shuffle, seed=3):
            expected = data.batch("val", batch.index)
            assert batch.sparse["history"]["lengths"].shape == (batch.batch_size,)
            assert torch.equal(batch.sparse["history"]["values"], expected.sparse["history"]["values"])
            assert torch.equal(batch.sparse["history"]["lengths"], expected.sparse["history"]["lengths"])
            seen += 1
            if seen == 40:
                break


def test_ranking_bags_follow_the_split(data):
    users = data.topk_eval("val").users[:5]
    train_counts = data._history.user_prefix["val"]
    val_rows = data.user_feature_rows(split="val", users=users)
    latest = data.user_feature_rows(users=users)
    test_rows = data.user_feature_rows(split="test_warm", users=users)
    sequences = _sequences(data)
    for j, user in enumerate(users.tolist()):
        sequence = [i for _, i in sequences[user]]
        v, o = val_rows.multi["history"]
        assert v[o[j] : o[j + 1]].tolist() == sequence[: int(train_counts[user])][-L:]
        v, o = latest.multi["history"]
        assert v[o[j] : o[j + 1]].tolist() == sequence[-L:]
        assert torch.equal(test_rows.multi["history"][0], latest.multi["history"][0])
    items = torch.arange(7)
    pairs = data.pair_batch(users, items, split="val")
    bag = pairs.sparse["history"]
    assert bag["lengths"].shape == (5 * 7,)
    assert torch.equal(bag["lengths"], (val_rows.multi["history"][1].diff()).repeat_interleave(7))
    cold = data.user_feature_rows(split="test_cold")
    assert int(cold.multi["history"][0].numel()) == 0
    assert data.new_user_rows([{"age": 30}]).multi["history"][1].tolist() == [0, 0]


def test_synthetic_ties_broken_by_item_id():
    ratings, users, items = synthetic_movielens()
    data = build_ml100k_mtl_v1(type("M", (), {"ratings": ratings, "users": users, "items": items,
                                               "source": "test", "path": "."})(), history_length=3)
    split = data.splits["train"]
    batch = data.batch("train", torch.arange(split.num_rows))
    bags = bag_lists(batch.sparse["history"]["values"], batch.sparse["history"]["lengths"])
    f = _frame(split)
    for row in np.flatnonzero(f["positive"]):
        user, item, time = f["user"][row], f["item"][row], f["time"][row]
        mine = f["positive"] & (f["user"] == user)
        earlier = sorted((int(t), int(i)) for t, i in zip(f["time"][mine], f["item"][mine]) if (t, i) < (time, item))
        assert bags[row] == [i for _, i in earlier][-3:]


def test_model_trains_evaluates_and_serves_with_history(tmp_path):
    from mtkernels import evaluation
    from mtkernels.nn import MultiTaskModel
    from mtkernels.serving import Ranker, serving_tables
    from mtkernels.training import TrainConfig, fit

    ratings, users, items = synthetic_movielens()
    data = build_ml100k_mtl_v1(type("M", (), {"ratings": ratings, "users": users, "items": items,
                                               "source": "test", "path": "."})(), history_length=5)
    torch.manual_seed(0)
    model = MultiTaskModel(data.features, data.dense_dim, data.tasks, backbone="mmoe", embedding_dim=4,
                           backbone_kwargs={"num_experts": 2, "expert_hidden": [8]}, tower_hidden=[4])
    batch = data.batch("train", torch.arange(37))
    assert model(batch.sparse, batch.dense).shape == (37, 3)
    path = str(tmp_path / "model.pt")
    fit(model, data, TrainConfig(epochs=2, batch_size=37, lr=1e-2, progress=False, patience=0),
        checkpoint_path=path, checkpoint_extra={"serving": serving_tables(data)})
    history_weight = model.embeddings.embedding_bags["history"].weight
    assert history_weight.shape == (data.num_items + 1, 4)
    metrics = evaluation.evaluate(model, data, "val")
    assert 0.0 <= metrics["topk"]["ndcg@10"] <= 1.0
    # the Ranker serves each user with the latest history: equal to pair_batch without a split
    ranker = Ranker.load(path)
    row = int(data.topk_eval("test_warm").users[0])
    pairs = data.pair_batch(torch.tensor([row]))
    with torch.no_grad():
        expected = model.eval()(pairs.sparse, pairs.dense)[:, 0]
    seen = data.topk_eval("test_warm")
    exclude = set(seen.exclude_indices[seen.exclude_offsets[0] : seen.exclude_offsets[1]].tolist())
    order = [i for i in sorted(range(data.num_items), key=lambda i: (-float(expected[i]), i)) if i not in exclude][:5]
    result = ranker.recommend([int(data.user_ids[row])], k=5)
    assert result.served_by == ["model"]
    assert result.item_ids[0].tolist() == [int(data.item_ids[i]) for i in order]


def test_shared_item_table():
    from mtkernels.nn import MultiTaskModel

    ratings, users, items = synthetic_movielens()
    data = build_ml100k_mtl_v1(type("M", (), {"ratings": ratings, "users": users, "items": items,
                                               "source": "test", "path": "."})(), history_length=4)
    torch.manual_seed(0)
    model = MultiTaskModel(data.features, data.dense_dim, data.tasks, backbone="ple", embedding_dim=4,
                           backbone_kwargs={"num_shared_experts": 1, "num_task_experts": 1, "expert_hidden": [8]},
                           tower_hidden=[4], shared_tables={"history": "item_id"})
    assert "history" not in model.embeddings.embedding_bags._modules
    assert "embedding_bags.history.weight" not in model.embeddings.state_dict()
    batch = data.batch("train", torch.arange(37))
    pooled = model.embeddings(batch.sparse)
    table = model.embeddings.embedding_bags["item_id"].weight
    history = batch.sparse["history"]
    start = 0
    for row, n in enumerate(history["lengths"].tolist()):
        expected = table[history["values"][start : start + n]].mean(0) if n else torch.zeros(4)
        torch.testing.assert_close(pooled[row, model.embeddings.feature_slice("history")], expected)
        start += n
    torch.testing.assert_close(pooled[:, model.embeddings.feature_slice("item_id")], table[batch.sparse["item_id"]["values"]])
    rebuilt = MultiTaskModel.from_config(model.config)
    rebuilt.load_state_dict(model.state_dict())
    old = MultiTaskModel(data.features, data.dense_dim, data.tasks, backbone="ple", embedding_dim=4,
                         backbone_kwargs={"num_shared_experts": 1, "num_task_experts": 1, "expert_hidden": [8]},
                         tower_hidden=[4])
    assert "shared_tables" not in old.config  # configs (checkpoints) without sharing are unchanged
    with pytest.raises(ValueError, match="shared_tables"):
        MultiTaskModel(data.features, data.dense_dim, data.tasks, shared_tables={"history": "genres"})
    with pytest.raises(ValueError, match="shared_tables"):
        MultiTaskModel(data.features, data.dense_dim, data.tasks, shared_tables={"history": "nope"})


def test_fusion_and_cold_scoring_use_the_right_bags(data):
    from mtkernels.fusion import user_table_of
    from mtkernels.transfer import as_cold_users

    assert data.history_feature == "history" and load_ml100k_mtl_v1(ml100k_dir()).history_feature is None
    users = data.topk_eval("val").users[:4]
    val_table = user_table_of(data, "val")["multi"]["history"]
    expected = data.user_feature_rows(split="val", users=users).multi["history"]
    lengths = val_table[1].diff()[users]
    assert torch.equal(lengths, expected[1].diff())
    assert torch.equal(val_table[0][val_table[1][users[0]] : val_table[1][users[0] + 1]],
                       expected[0][: int(expected[1][1])])
    assert not torch.equal(expected[0], data.user_feature_rows(users=users).multi["history"][0])  # no val items
    cold = as_cold_users(data.user_feature_rows(users=users), data)
    assert cold.multi["history"][0].numel() == 0 and cold.multi["history"][1].tolist() == [0] * 5


def test_dropping_unlabelled_rows_keeps_each_rows_bag():
    from mtkernels.transfer import drop_unlabelled_rows, select_tasks

    ratings, users, items = synthetic_movielens()
    data = build_ml100k_mtl_v1(type("M", (), {"ratings": ratings, "users": users, "items": items,
                                               "source": "test", "path": "."})(), history_length=5)
    before = data.batch("train", torch.arange(data.splits["train"].num_rows)).sparse["history"]
    positive = torch.nonzero(data.splits["train"].labels[:, 0] == 1).flatten()
    small = drop_unlabelled_rows(select_tasks(data, ["like", "rating"]))  # only the positives keep labels
    assert small.splits["train"].num_rows == positive.numel()
    after = small.batch("train", torch.arange(positive.numel())).sparse["history"]
    kept = bag_lists(before["values"], before["lengths"])
    assert bag_lists(after["values"], after["lengths"]) == [kept[j] for j in positive.tolist()]
