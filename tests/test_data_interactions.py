"""Generic interaction-log loader: CSV/Parquet, dict/YAML schema, splits, side features, top-k sets."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from mtkernels.data import load_interactions
from mtkernels.data.interactions import read_schema

SCHEMA = {
    "user": "uid", "item": "iid",
    "labels": {"click": "binary", "rating": "regression"},
    "user_features": ["age"], "item_features": ["genres"], "context_features": ["device"],
    "multi_valued": {"genres": "|"}, "dense": ["price"], "timestamp": "ts", "item_title": "title",
}


@pytest.fixture(scope="module")
def log():
    rng = np.random.default_rng(0)
    n = 600
    frame = pd.DataFrame({
        "uid": rng.integers(100, 140, n),
        "iid": rng.choice(["a", "b", "c", "d", "e", "f", "g", "h"], n),
        "click": rng.integers(0, 2, n),
        "rating": np.where(rng.random(n) < 0.5, np.nan, rng.integers(1, 6, n)),
        "device": rng.choice(["ios", "android"], n),
        "price": rng.normal(50, 10, n),
        "ts": rng.permutation(n),
    })
    frame["age"] = frame["uid"] % 5 * 10
    genres = {"a": "x|y", "b": "y", "c": "", "d": "z|x", "e": "x", "f": "y|z", "g": "z", "h": "x|y|z"}
    frame["genres"] = frame["iid"].map(genres)
    frame["title"] = "Title " + frame["iid"]
    return frame


@pytest.fixture(params=["csv", "parquet"])
def path(request, tmp_path, log):
    target = tmp_path / f"log.{request.param}"
    log.to_csv(target, index=False) if request.param == "csv" else log.to_parquet(target)
    return target


def test_loader_encodes_log(path, log):
    data = load_interactions(path, {**SCHEMA, "split": "temporal"})
    assert [t.name for t in data.tasks] == ["click", "rating"] and [t.kind for t in data.tasks] == ["binary", "regression"]
    assert [f.name for f in data.features] == ["user_id", "age", "item_id", "genres", "device"]
    assert [f.side for f in data.features] == ["user", "user", "item", "item", "context"]
    assert data.feature("genres").multi_valued and data.feature("genres").num_embeddings == 4
    assert data.dense_dim == 1 and data.num_items == 8 and data.item_ids == list("abcdefgh")
    assert {k: s.num_rows for k, s in data.splits.items()} == {"train": 480, "val": 60, "test": 60}
    # Temporal: every val/test row is later than every train row.
    assert log["ts"].iloc[data.splits["train"].extra["row"].numpy()].max() < log["ts"].iloc[data.splits["val"].extra["row"].numpy()].min()
    for name, split in data.splits.items():
        rows = split.extra["row"].numpy()
        part = log.iloc[rows]
        np.testing.assert_array_equal(split.labels.numpy(), part[["click", "rating"]].to_numpy(np.float32))
        assert [data.item_ids[i - 1] for i in split.item.tolist()] == part["iid"].tolist()
        assert data.user_ids[split.user_row].tolist() == part["uid"].tolist()
        genres_values, genres_offsets = split.multi["genres"]
        assert (genres_offsets[1:] - genres_offsets[:-1]).tolist() == [len([g for g in s.split("|") if g]) for s in part["genres"].fillna("")]
    train = data.splits["train"]
    assert abs(float(train.dense.mean())) < 1e-5
    assert data.item_titles[0] == "Title a" and data.user_side(100) == {"age": 0}
    batch = next(data.batches("test", 7, shuffle=True, seed=0))
    assert batch.sparse.stride() == 7 and batch.labels.shape == (7, 2)


def test_unknown_users_and_topk(path, log):
    data = load_interactions(path, {**SCHEMA, "split": "temporal"})
    train_users = set(log["uid"].iloc[data.splits["train"].extra["row"].numpy()])
    test = data.splits["test"]
    for row, user in zip(test.user.tolist(), data.user_ids[test.user_row].tolist()):
        assert (row == 0) == (user not in train_users)
    sets = data.topk_eval("test")
    positives = lambda rows: log.iloc[rows][log["click"].iloc[rows].to_numpy() == 1]  # noqa: E731
    test_pos = positives(test.extra["row"].numpy())
    seen = positives(np.concatenate([data.splits[s].extra["row"].numpy() for s in ("train", "val")]))
    assert data.user_ids[sets.users].tolist() == sorted(test_pos["uid"].unique())
    for i, user in enumerate(data.user_ids[sets.users].tolist()):
        rel = {data.item_ids[j] for j in sets.relevant_indices[sets.relevant_offsets[i]:sets.relevant_offsets[i + 1]].tolist()}
        ex = {data.item_ids[j] for j in sets.exclude_indices[sets.exclude_offsets[i]:sets.exclude_offsets[i + 1]].tolist()}
        assert rel == set(test_pos.loc[test_pos["uid"] == user, "iid"])
        assert ex == set(seen.loc[seen["uid"] == user, "iid"])
    newcomer = data.new_user_rows([{"age": 30}, {"age": 999}])
    with pytest.raises(ValueError, match=r"sides\[0\].*'agee'.*known: age"):
        data.new_user_rows([{"agee": 30}])
    assert newcomer.sparse["age"].tolist() == [data.splits["train"].sparse["age"][torch.tensor(log["age"].iloc[data.splits["train"].extra["row"].numpy()].to_numpy() == 30)][0].item(), 0]
    pairs = data.pair_batch(sets.users[:3])
    assert pairs.sparse.stride() == 3 * 8 and torch.isnan(pairs.labels).all()
    assert torch.equal(pairs.sparse["item_id"]["values"], torch.arange(1, 9).repeat(3))


def test_timestamp_column_reaches_the_splits(tmp_path, log):
    """The schema's timestamp becomes each split's ``timestamp`` (int64 Unix seconds), as ml100k's: what the
    time-aware cold-start prior and SequentialRules' time order read. Numbers are seconds; date strings parse."""
    from mtkernels.cold_start import recent_popularity_prior_for, request_times

    csv = tmp_path / "log.csv"
    log.to_csv(csv, index=False)
    data = load_interactions(csv, SCHEMA)  # random split: the timestamps travel with their rows
    for split in data.splits.values():
        stamps = split.extra["timestamp"]
        assert stamps.dtype == torch.int64
        assert stamps.tolist() == log["ts"].iloc[split.extra["row"].numpy()].tolist()
    prior = recent_popularity_prior_for(data, half_life_days=10, mix=0.1)
    assert prior.latest == int(log["ts"].iloc[data.splits["train"].extra["row"].numpy()][
        log["click"].iloc[data.splits["train"].extra["row"].numpy()].to_numpy() == 1].max())
    assert torch.isfinite(request_times(data, "test")[data.splits["test"].user_row]).all()
    dated = log.assign(ts=pd.Timestamp("2020-01-01") + pd.to_timedelta(log["ts"], unit="s"))
    dated.to_csv(csv, index=False)
    data = load_interactions(csv, SCHEMA)
    assert data.splits["train"].extra["timestamp"].tolist() == (
        1577836800 + log["ts"].iloc[data.splits["train"].extra["row"].numpy()]).tolist()
    log.assign(ts=log["ts"].where(log.index != 7)).to_csv(csv, index=False)
    with pytest.raises(ValueError, match="timestamp column 'ts': 1 missing or unreadable"):
        load_interactions(csv, SCHEMA)
    log.assign(ts=log["ts"].astype(str).where(log.index != 7, "soon")).to_csv(csv, index=False)
    with pytest.raises(ValueError, match="timestamp column 'ts': 1 missing or unreadable"):
        load_interactions(csv, SCHEMA)


def test_yaml_schema_random_and_column_splits(tmp_path, log):
    csv = tmp_path / "log.csv"
    frame = log.assign(part=np.where(np.arange(len(log)) % 10 == 0, "test", np.where(np.arange(len(log)) % 10 == 1, "val", "train")))
    frame.to_csv(csv, index=False)
    schema_file = tmp_path / "schema.yaml"
    schema_file.write_text(yaml.safe_dump({"user": "uid", "item": "iid", "labels": {"click": "binary"}, "seed": 5}))
    first = load_interactions(csv, schema_file)
    again = load_interactions(csv, schema_file)
    other = load_interactions(csv, schema_file, seed=6)
    assert [f.name for f in first.features] == ["user_id", "item_id"] and first.dense_dim == 0
    assert torch.equal(first.splits["test"].extra["row"], again.splits["test"].extra["row"])
    assert not torch.equal(first.splits["test"].extra["row"], other.splits["test"].extra["row"])
    by_column = load_interactions(csv, schema_file, split="part")
    assert by_column.splits["test"].extra["row"].tolist() == list(range(0, len(log), 10))


def test_schema_errors(tmp_path, log):
    csv = tmp_path / "log.csv"
    log.to_csv(csv, index=False)
    with pytest.raises(ValueError, match="'item' is required"):
        read_schema({"user": "uid", "labels": {"click": "binary"}})
    with pytest.raises(ValueError, match="kind"):
        read_schema({"user": "uid", "item": "iid", "labels": {"click": "ordinal"}})
    with pytest.raises(ValueError, match="unknown keys"):
        read_schema({"user": "uid", "item": "iid", "labels": {"click": "binary"}, "colour": 1})
    with pytest.raises(ValueError, match="missing"):
        load_interactions(csv, {"user": "uid", "item": "nope", "labels": {"click": "binary"}})
    with pytest.raises(ValueError, match="numeric"):
        load_interactions(csv, {"user": "uid", "item": "iid", "labels": {"device": "binary"}})
    with pytest.raises(ValueError, match="timestamp"):
        load_interactions(csv, {"user": "uid", "item": "iid", "labels": {"click": "binary"}, "split": "temporal"})
    with pytest.raises(ValueError, match="train/val/test"):
        load_interactions(csv, {"user": "uid", "item": "iid", "labels": {"click": "binary"}, "split": "device"})
    with pytest.raises(FileNotFoundError):
        load_interactions(tmp_path / "absent.csv", {"user": "uid", "item": "iid", "labels": {"click": "binary"}})


@pytest.mark.parametrize("column", ["uid", "iid"])
def test_a_missing_user_or_item_id_is_an_error_naming_the_row(tmp_path, log, column):
    # a blank id would otherwise become a user / item of its own (NaN), and float ids leave the
    # checkpoint without serving tables
    frame = log.copy()
    frame[column] = frame[column].astype(object)
    frame.loc[7, column] = None
    csv = tmp_path / "log.csv"
    frame.to_csv(csv, index=False)
    with pytest.raises(ValueError, match=f"column '{column}': 1 missing ids, first at row 7"):
        load_interactions(csv, SCHEMA)


@pytest.mark.parametrize("value", [2.0, -1.0, 0.5])
def test_a_binary_label_other_than_0_or_1_is_an_error(tmp_path, log, value):
    # the binary cross-entropy would silently train towards it, and top-k would not count it
    frame = log.copy()
    frame["click"] = frame["click"].astype(float)
    frame.loc[11, "click"] = value
    csv = tmp_path / "log.csv"
    frame.to_csv(csv, index=False)
    with pytest.raises(ValueError, match=f"binary label 'click' must be 0 or 1 .empty: no label., got {value:g} at row 11"):
        load_interactions(csv, SCHEMA)


@pytest.mark.parametrize("column", ["rating", "price"])
def test_an_infinite_label_or_dense_value_is_an_error(tmp_path, log, column):
    # inf would make the loss (label) or the whole standardised column (dense) NaN
    frame = log.copy()
    frame.loc[5, column] = np.inf
    csv = tmp_path / "log.csv"
    frame.to_csv(csv, index=False)
    with pytest.raises(ValueError, match=f"column '{column}': infinite value at row 5"):
        load_interactions(csv, SCHEMA)


@pytest.mark.parametrize("key, value", [("user_features", "age"), ("dense", "price"), ("multi_valued", ["genres"]),
                                        ("context_features", {"device": 1})])
def test_schema_lists_of_the_wrong_type_are_named(key, value):
    # `user_features: age` (a YAML scalar) was "can only concatenate str (not "list") to str"
    kind = "a mapping" if key == "multi_valued" else "a list of column names"
    with pytest.raises(ValueError, match=f"schema: {key!r} must be {kind}"):
        read_schema({"user": "uid", "item": "iid", "labels": {"click": "binary"}, key: value})


def test_an_empty_log_is_an_error_naming_the_file(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"empty.csv is empty \(no header row\)"):  # was "No columns to parse from file"
        load_interactions(empty, {"user": "uid", "item": "iid", "labels": {"click": "binary"}})


@pytest.mark.parametrize("value", [["30"], {"a": 1}, (30,)])
def test_new_user_rows_refuses_a_side_feature_that_is_not_one_value(tmp_path, log, value):
    # `recommend --side-features 9999='{"age": ["30"]}'` was "TypeError: unhashable type: 'list'" from pandas
    csv = tmp_path / "log.csv"
    log.to_csv(csv, index=False)
    data = load_interactions(csv, SCHEMA)
    with pytest.raises(ValueError, match=r"sides\[1\]\['age'\]: expected one raw value \(a string or number\), got"):
        data.new_user_rows([{"age": 30}, {"age": value}])
    assert data.new_user_rows([{"age": 30}, {"age": None}]).sparse["age"][1] == 0  # missing: the unknown id


@pytest.mark.parametrize("key, value", [("seed", "abc"), ("val_fraction", "ten percent"), ("seed", 1.5)])
def test_a_schema_number_that_is_not_one_is_named(key, value):
    # `seed: abc` was "invalid literal for int() with base 10: 'abc'"
    with pytest.raises(ValueError, match=f"schema: {key!r} must be a"):
        read_schema({"user": "uid", "item": "iid", "labels": {"click": "binary"}, key: value})
