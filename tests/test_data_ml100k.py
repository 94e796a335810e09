"""MovieLens-100K: readers (RecBole and GroupLens folders), the ml100k-mtl-v1 protocol rebuilt row for
row against the canonical CSVs, the encoded MultiTaskData, batches, pair batches and top-k sets."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mtkernels.data import load_ml100k_mtl_v1, read_movielens_100k
from mtkernels.data import protocol
from mtkernels.data.movielens import build_ml100k_mtl_v1, read_grouplens, read_recbole
from mtkernels.data.sources import default_data_dir, ml100k_complete

try:
    from tests.data_fixtures import synthetic_movielens, write_grouplens, write_recbole
except ImportError:  # tests/ on sys.path instead of the repo root
    from data_fixtures import synthetic_movielens, write_grouplens, write_recbole

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    env = os.environ.get("MTKERNELS_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


def ml100k_dir() -> Path:
    for base in (default_data_dir(), REPO / ".cache" / "data"):
        if ml100k_complete(base / "ml-100k"):
            return base
    pytest.skip("ml-100k files not fetched (run `python -m mtkernels.data.fetch --dest .cache/data`)")


PROTOCOL_DIR = shared_data_dir() / "ml-100k" / "protocol_v1"
needs_protocol = pytest.mark.skipif(not PROTOCOL_DIR.is_dir(), reason=f"{PROTOCOL_DIR} absent")


# --- the real data --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def movielens():
    return read_movielens_100k(ml100k_dir())


@pytest.fixture(scope="module")
def splits(movielens):
    return protocol.build_splits(movielens.ratings, np.arange(1, 1683))


@pytest.fixture(scope="module")
def data(movielens, splits):
    return build_ml100k_mtl_v1(movielens, splits)


@pytest.fixture(scope="module")
def canonical():
    return {name: pd.read_csv(PROTOCOL_DIR / f"{name}.csv") for name in protocol.SPLITS}


def test_recbole_files_as_described(movielens):
    assert movielens.source == "recbole"
    assert len(movielens.ratings) == 100_000
    assert movielens.ratings["user_id"].nunique() == 943
    assert movielens.ratings["item_id"].between(1, 1682).all()
    assert movielens.ratings["rating"].value_counts().sort_index().tolist() == [6110, 11370, 27145, 34174, 21201]
    assert len(movielens.users) == 943 and len(movielens.items) == 1682
    assert movielens.items["release_year"].isna().sum() == 1  # item 267, "unknown"
    assert movielens.items.loc[movielens.items["item_id"] == 1412, "release_year"].item() == 1995
    genres = {g for lst in movielens.items["genres"] for g in lst}
    assert len(genres) == 19 and "Film-Noir" in genres
    assert movielens.items.loc[movielens.items["item_id"] == 1, "title"].item() == "Toy Story"


@needs_protocol
def test_protocol_rebuild_matches_canonical_rows(splits, canonical):
    for name in protocol.SPLITS:
        ours, ref = splits[name], canonical[name]
        assert len(ours) == len(ref), name
        for column in protocol.COLUMNS:
            mine = ours[column].to_numpy(dtype=float)
            theirs = ref[column].to_numpy(dtype=float)
            np.testing.assert_array_equal(np.isnan(mine), np.isnan(theirs), err_msg=f"{name}.{column}")
            np.testing.assert_array_equal(np.nan_to_num(mine), np.nan_to_num(theirs), err_msg=f"{name}.{column}")


@needs_protocol
def test_protocol_rebuild_matches_checksums(splits):
    manifest = json.loads((PROTOCOL_DIR / "MANIFEST.json").read_text())
    for name in protocol.SPLITS:
        digest = hashlib.sha256(protocol.to_csv_text(splits[name]).encode()).hexdigest()
        assert digest == manifest["sha256"][f"{name}.csv"], name
        assert manifest["stats"][name]["rows"] == len(splits[name])


def test_protocol_counts(splits):
    positives = {k: int(v["click"].sum()) for k, v in splits.items()}
    assert positives == {"train": 71505, "val": 9433, "test_warm": 9433, "test_cold": 9629}
    assert splits["test_cold"]["user_id"].nunique() == 94
    assert not set(splits["test_cold"]["user_id"]) & set(splits["train"]["user_id"])


def test_encoded_data(data, splits):
    assert [t.name for t in data.tasks] == ["click", "like", "rating"]
    assert [t.kind for t in data.tasks] == ["binary", "binary", "regression"]
    names = [f.name for f in data.features]
    assert names == ["user_id", "age", "gender", "occupation", "zip", "item_id", "release_year", "genres"]
    assert data.feature("user_id").num_embeddings == 850 and data.feature("item_id").num_embeddings == 1683
    assert data.feature("genres").multi_valued and data.feature("genres").num_embeddings == 20
    assert data.num_items == 1682 and data.item_ids.tolist() == list(range(1, 1683))
    assert data.dense_dim == 8 and data.user_dense_dim == 5
    for name, split in data.splits.items():
        frame = splits[name]
        assert split.num_rows == len(frame)
        np.testing.assert_array_equal(split.labels.numpy(), frame[["click", "like", "rating"]].to_numpy(np.float32))
        assert torch.equal(split.item, torch.tensor(frame["item_id"].to_numpy()))  # index = id here
        assert torch.equal(data.user_ids[split.user_row], torch.tensor(frame["user_id"].to_numpy()))
        for f in data.features:
            values = split.multi[f.name][0] if f.multi_valued else split.sparse[f.name]
            assert int(values.min()) >= 0 and int(values.max()) < f.num_embeddings, (name, f.name)
        assert torch.isfinite(split.dense).all()
    cold = data.splits["test_cold"]
    assert (cold.user == 0).all() and (cold.sparse["user_id"] == 0).all()
    assert cold.user_row.unique().numel() == 94 and (cold.user_row > 849).all()
    # Cold users still carry their side features, and those equal the warm users' encoding.
    assert (cold.sparse["age"] > 0).all() and (cold.sparse["gender"] > 0).all()
    warm = data.splits["train"]
    assert (warm.user >= 1).all() and torch.equal(warm.user, warm.user_row)
    # History features of cold users are the (standardised) mean.
    assert torch.equal(cold.dense[:, :5], torch.zeros(cold.num_rows, 5))
    assert (warm.dense[:, :5] != 0).any(1).all()


def test_dense_features_use_train_only(data, movielens, splits):
    """Changing val/test labels must not change any feature; train popularity must drive item_log_popularity."""
    base = data
    altered = {k: v.copy() for k, v in splits.items()}
    for name in ("val", "test_warm", "test_cold"):
        positive = altered[name]["click"] == 1
        altered[name].loc[positive, "rating"] = 1.0
        altered[name].loc[positive, "like"] = 0.0
    other = build_ml100k_mtl_v1(movielens, altered)
    for name in data_splits(base):
        assert torch.equal(base.splits[name].dense, other.splits[name].dense)
    train_pos = splits["train"][splits["train"]["click"] == 1]
    counts = np.bincount(train_pos["item_id"], minlength=1683)[1:]
    popularity = base.pair_batch(torch.tensor([1]), torch.arange(1682)).dense[:, base.dense_names.index("item_log_popularity")].numpy()
    order = np.argsort(counts, kind="stable")
    assert np.all(np.diff(popularity[order]) >= -1e-6)
    # The users' history popularity is an affine map (standardisation) of the raw mean over the
    # last 10 training ratings.
    log_count = np.log1p(np.bincount(train_pos["item_id"], minlength=1683))
    recent = train_pos.groupby("user_id").tail(10).assign(pop=lambda f: log_count[f["item_id"]]).groupby("user_id")["pop"].mean()
    rows = base.user_row_of(recent.index.tolist())
    column = base.user_feature_rows(users=rows).dense[:, base.dense_names.index("user_recent_popularity")].numpy()
    assert np.corrcoef(recent.to_numpy(), column)[0, 1] > 0.9999
    bare = build_ml100k_mtl_v1(movielens, splits, dense_features=False)
    assert bare.dense_dim == 0 and bare.splits["train"].dense.shape == (357_525, 0)
    assert next(bare.batches("val", 4)).dense.shape == (4, 0)


def data_splits(data):
    return list(data.splits)


def test_batches_cover_split_in_order_and_shuffled(data):
    split = data.splits["val"]
    for shuffle in (False, True):
        seen = []
        for number, batch in enumerate(data.batches("val", 1000, shuffle=shuffle, seed=3)):
            index = batch.index
            seen.append(index)
            kjt = batch.sparse
            assert kjt.keys() == [f.name for f in data.features] and kjt.stride() == index.numel()
            for f in data.features:
                got = kjt[f.name]
                if f.multi_valued and number < 3:  # row-by-row reference: a few batches suffice
                    values, offsets = split.multi[f.name]
                    want = [values[offsets[i]:offsets[i + 1]] for i in index.tolist()]
                    assert torch.equal(got["lengths"], torch.tensor([len(w) for w in want]))
                    assert torch.equal(got["values"], torch.cat(want))
                elif not f.multi_valued:
                    assert torch.equal(got["values"], split.sparse[f.name][index])
                    assert (got["lengths"] == 1).all()
            assert torch.equal(batch.dense, split.dense[index])
            assert torch.equal(batch.labels, split.labels[index], ) if not torch.isnan(batch.labels).any() else \
                torch.equal(torch.nan_to_num(batch.labels, nan=-9), torch.nan_to_num(split.labels[index], nan=-9))
        order = torch.cat(seen)
        assert torch.equal(order.sort().values, torch.arange(split.num_rows))
        assert torch.equal(order, torch.arange(split.num_rows)) != shuffle
    first = [b.index for b in data.batches("val", 5000, shuffle=True, seed=7)]
    again = [b.index for b in data.batches("val", 5000, shuffle=True, seed=7)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert len(list(data.batches("val", 5000, drop_last=True))) == split.num_rows // 5000
    with pytest.raises(ValueError, match="batch_size"):
        next(data.batches("val", 0))
    with pytest.raises(KeyError, match="no split"):
        next(data.batches("nope", 10))


@needs_protocol
def test_topk_sets_follow_protocol(data, canonical):
    def positives(name):
        frame = canonical[name]
        frame = frame[frame["click"] == 1]
        return {u: set(g["item_id"]) for u, g in frame.groupby("user_id")}

    train, val, warm, cold = (positives(n) for n in protocol.SPLITS)
    for name, relevant, excluded in (("val", val, [train]), ("test_warm", warm, [train, val]), ("test_cold", cold, [])):
        sets = data.topk_eval(name)
        users = data.user_ids[sets.users].tolist()
        assert users == sorted(relevant)
        for i, user in enumerate(users):
            rel = data.item_ids[sets.relevant_indices[sets.relevant_offsets[i]:sets.relevant_offsets[i + 1]]]
            ex = data.item_ids[sets.exclude_indices[sets.exclude_offsets[i]:sets.exclude_offsets[i + 1]]]
            assert set(rel.tolist()) == relevant[user]
            assert set(ex.tolist()) == set().union(*[e.get(user, set()) for e in excluded])
    assert len(data.topk_eval("test_warm")) == 849 and len(data.topk_eval("test_cold")) == 94
    assert int(data.topk_eval("test_cold").exclude_offsets[-1]) == 0
    with pytest.raises(ValueError, match="no top-k"):
        data.topk_eval("train")


def test_pair_batch_user_major(data):
    sets = data.topk_eval("test_cold")
    rows = data.user_feature_rows("test_cold")
    assert torch.equal(rows.rows, sets.users) and (rows.sparse["user_id"] == 0).all()
    items = torch.tensor([0, 5, 1681])
    batch = data.pair_batch(rows.rows[:2], items)
    kjt = batch.sparse
    assert kjt.stride() == 6 and batch.dense.shape == (6, data.dense_dim) and torch.isnan(batch.labels).all()
    assert torch.equal(kjt["item_id"]["values"], (items + 1).repeat(2))
    assert torch.equal(kjt["age"]["values"], rows.sparse["age"][:2].repeat_interleave(3))
    assert torch.equal(batch.dense[:, :5], rows.dense[:2].repeat_interleave(3, 0))
    # The same (user, item) pair scores the same features as the split row that holds it.
    split = data.splits["test_cold"]
    r = 0
    user_row, item = split.user_row[r], split.item[r]
    pair = data.pair_batch(user_row.reshape(1), (item - 1).reshape(1))
    row_batch = data.batch("test_cold", torch.tensor([r]))
    for f in data.features:
        assert torch.equal(pair.sparse[f.name]["values"], row_batch.sparse[f.name]["values"]), f.name
    assert torch.equal(pair.dense, row_batch.dense)
    # Cold user's side features, raw.
    side = data.user_side(int(data.user_ids[user_row]))
    assert set(side) == {"age", "gender", "occupation", "zip_code"}
    with pytest.raises(IndexError, match="items"):
        data.pair_batch(rows.rows[:1], torch.tensor([1682]))
    with pytest.raises(KeyError):
        data.user_side(10_000)
    assert data.item_titles[0] == "Toy Story" and len(data.item_titles) == 1682
    assert data.user_row_of([1, 2]).tolist() == [1, 2] and data.item_position_of([1682]).tolist() == [1681]


def test_new_user_rows_match_cold_users(data):
    rows = data.user_feature_rows("test_cold")
    sides = [data.user_side(int(u)) for u in data.user_ids[rows.rows]]
    fresh = data.new_user_rows(sides)
    assert (fresh.rows == -1).all()
    for name, values in rows.sparse.items():
        assert torch.equal(fresh.sparse[name], values), name
    assert torch.equal(fresh.dense, rows.dense)
    odd = data.new_user_rows([{"age": 30, "gender": "X", "occupation": "astronaut"}])
    assert odd.sparse["age"].item() > 0 and odd.sparse["gender"].item() == 0 and odd.sparse["zip"].item() == 0
    batch = data.pair_batch(odd, torch.arange(4))
    assert batch.sparse.stride() == 4 and torch.equal(batch.sparse["user_id"]["values"], torch.zeros(4, dtype=torch.long))


def test_new_user_rows_rejects_unknown_side_feature_names(data):
    # a misspelt name must not be served as "no side features" without a word
    with pytest.raises(ValueError, match=r"sides\[1\].*'agee'.*age, gender, occupation, zip_code"):
        data.new_user_rows([{"age": 30}, {"agee": 30}])
    with pytest.raises(ValueError, match=r"sides\[0\]: expected a dict"):
        data.new_user_rows(["age=30"])


def test_new_user_rows_rejects_an_unreadable_age(data):
    with pytest.raises(ValueError, match="age: expected a number, got 'abc'"):
        data.new_user_rows([{"age": 30}, {"age": "abc"}])
    readable = data.new_user_rows([{"age": "30"}, {"age": None}, {"age": 30}]).sparse["age"].tolist()
    assert readable[0] == readable[2] != 0 and readable[1] == 0  # a numeric string reads; missing -> unknown


def test_resample_negatives(data, movielens):
    original = data.splits["train"]
    labels, user_row, item = original.labels.clone(), original.user_row.clone(), original.item.clone()
    try:
        fresh = data.resample_negatives(seed=11)
        assert data.splits["train"] is fresh
        assert torch.equal(torch.nan_to_num(fresh.labels, nan=-1), torch.nan_to_num(labels, nan=-1))
        assert torch.equal(fresh.user_row, user_row)
        negative = labels[:, 0] == 0
        assert torch.equal(fresh.item[~negative], item[~negative])
        assert (fresh.item[negative] != item[negative]).float().mean() > 0.9
        rated = set(zip(movielens.ratings["user_id"], movielens.ratings["item_id"]))
        pairs = zip(data.user_ids[fresh.user_row[negative]].tolist(), data.item_ids[fresh.item[negative] - 1].tolist())
        assert not any(p in rated for p in pairs)
        # Item-side features follow the new items.
        assert torch.equal(fresh.sparse["item_id"], fresh.item)
        batch = next(data.batches("train", 64))
        assert torch.equal(batch.sparse["item_id"]["values"], fresh.item[:64])
        again = data.resample_negatives(seed=11)
        assert torch.equal(again.item, fresh.item)
        assert not torch.equal(data.resample_negatives(seed=12).item, fresh.item)
    finally:
        restored = data.resample_negatives(seed=None)
    assert torch.equal(restored.item, item)


# --- synthetic folders (no download needed) ------------------------------------------------
@pytest.fixture(scope="module")
def synthetic():
    return synthetic_movielens()


def test_grouplens_folder_reads_like_recbole(tmp_path, synthetic):
    ratings, users, items = synthetic
    grouplens = read_grouplens(write_grouplens(tmp_path / "gl", ratings, users, items))
    recbole = read_recbole(write_recbole(tmp_path / "rb", ratings, users, items))
    assert grouplens.source == "grouplens"
    assert grouplens.items["title"].iloc[0] == "Café Olé"  # Latin-1 decoded, "(year)" stripped
    for got in (grouplens, recbole):
        pd.testing.assert_frame_equal(got.ratings.reset_index(drop=True), ratings.reset_index(drop=True), check_dtype=False)
        assert got.users["occupation"].tolist() == users["occupation"].tolist()
        assert got.users["zip_code"].tolist() == users["zip_code"].tolist()
        assert got.items["genres"].tolist() == items["genres"].tolist()
        np.testing.assert_array_equal(got.items["release_year"].to_numpy(), items["release_year"].to_numpy())
    assert recbole.items["title"].tolist() == grouplens.items["title"].tolist()
    without_genre_file = read_grouplens(write_grouplens(tmp_path / "gl2", ratings, users, items, with_genre_file=False))
    assert without_genre_file.items["genres"].tolist() == items["genres"].tolist()


def test_loader_on_grouplens_folder(tmp_path, synthetic):
    ratings, users, items = synthetic
    folder = write_grouplens(tmp_path / "ml-100k", ratings, users, items)
    from_folder = load_ml100k_mtl_v1(folder)
    from_parent = load_ml100k_mtl_v1(tmp_path)  # finds the ml-100k/ subfolder
    recbole = load_ml100k_mtl_v1(write_recbole(tmp_path / "rb", ratings, users, items))
    num_cold = int(np.floor(0.1 * 30 + 0.5))
    assert from_folder.info["num_cold_users"] == num_cold
    for other in (from_parent, recbole):
        for name in from_folder.splits:
            a, b = from_folder.splits[name], other.splits[name]
            assert torch.equal(a.user_row, b.user_row) and torch.equal(a.item, b.item)
            assert all(torch.equal(a.sparse[k], b.sparse[k]) for k in a.sparse)
            assert torch.equal(a.dense, b.dense)
    for name, split in from_folder.splits.items():
        positives = int(split.labels[:, 0].sum())
        assert split.num_rows == 5 * positives
        # Negatives carry no like/rating label and are items the user never rated.
        negative = split.labels[:, 0] == 0
        assert torch.isnan(split.labels[negative, 1:]).all() and not torch.isnan(split.labels[~negative]).any()
        rated = set(zip(ratings["user_id"], ratings["item_id"]))
        pairs = zip(from_folder.user_ids[split.user_row[negative]].tolist(), from_folder.item_ids[split.item[negative] - 1].tolist())
        assert not any(p in rated for p in pairs)


def test_protocol_split_rule_on_synthetic(synthetic):
    ratings, _, _ = synthetic
    splits = protocol.build_splits(ratings, np.arange(1, 61))
    for user, group in ratings.groupby("user_id"):
        n = len(group)
        ordered = group.sort_values(["timestamp", "item_id"])["item_id"].tolist()
        got = {name: frame.loc[(frame["user_id"] == user) & (frame["click"] == 1), "item_id"].tolist()
               for name, frame in splits.items()}
        if got["test_cold"]:
            assert got["test_cold"] == ordered and not got["train"]
            continue
        n_hold = int(np.ceil(0.1 * n))
        assert got["test_warm"] == ordered[n - n_hold:]
        assert got["val"] == ordered[n - 2 * n_hold: n - n_hold]
        assert got["train"] == ordered[: n - 2 * n_hold]


def test_missing_data_names_the_fetch_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="mtkernels.data.fetch"):
        load_ml100k_mtl_v1(tmp_path / "nothing-here")


@pytest.mark.parametrize("age", [-5, float("inf")])
def test_new_user_rows_rejects_an_impossible_age(data, age):
    # -5 was silently the youngest group and inf the oldest
    with pytest.raises(ValueError, match=rf"age: expected a finite number >= 0, got {age}"):
        data.new_user_rows([{"age": 30}, {"age": age}])


def test_ordinal_labels_of_ratings():
    from mtkernels.data.movielens import ordinal_labels

    got = ordinal_labels(np.array([1, 2, 3, 4, 5, np.nan], dtype=np.float32))
    want = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [1, 1, 0], [1, 1, 1], [np.nan] * 3], dtype=np.float32)
    np.testing.assert_array_equal(got, want)
    assert got.dtype == np.float32 and ordinal_labels(np.zeros(0)).shape == (0, 3)


def test_ordinal_tasks_option(tmp_path, synthetic):
    ratings, users, items = synthetic
    folder = write_grouplens(tmp_path / "ml-100k", ratings, users, items)
    plain = load_ml100k_mtl_v1(folder)
    ordinal = load_ml100k_mtl_v1(folder, ordinal_tasks=True)
    assert [t.name for t in ordinal.tasks] == ["click", "like", "rating", "rating_ge2", "rating_ge3", "rating_ge5"]
    assert all(t.kind == "binary" for t in ordinal.tasks[3:]) and ordinal.tasks[:3] == plain.tasks
    for name, split in ordinal.splits.items():
        labels = split.labels
        torch.testing.assert_close(labels[:, :3], plain.splits[name].labels, equal_nan=True)
        rating = labels[:, 2]
        for column, k in zip((3, 4, 5), (2, 3, 5)):
            rated = ~torch.isnan(rating)
            assert torch.equal(labels[rated, column], (rating[rated] >= k).float())
            assert torch.isnan(labels[~rated, column]).all()
        # the cumulative links are ordered: rating >= 2 >= like (>= 4) ... >= rating >= 5
        rated = ~torch.isnan(rating)
        assert (labels[rated, 3] >= labels[rated, 4]).all() and (labels[rated, 4] >= labels[rated, 1]).all()
        assert (labels[rated, 1] >= labels[rated, 5]).all()
