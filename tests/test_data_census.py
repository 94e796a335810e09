"""Census-Income (KDD) two-task set: labels, features, splits, batches."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mtkernels.data import load_census_income
from mtkernels.data.census import CATEGORICAL, COLUMNS, CONTINUOUS, find_census_file

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MTKERNELS_SHARED_DATA", REPO.parent / "shared" / "data"))
CENSUS = SHARED / "census-income-kdd" / "census-income.test.gz"


def write_tiny_census(path: Path, rows: int = 200, seed: int = 0) -> pd.DataFrame:
    """A census-shaped file (42 columns, leading spaces, '?' values) with known labels."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({c: rng.choice([" A", " B", " ?", " Not in universe"], size=rows) for c in COLUMNS})
    for column in CONTINUOUS + ["instance weight"]:
        frame[column] = rng.integers(0, 100, size=rows)
    frame["marital status"] = rng.choice([" Never married", " Divorced"], size=rows)
    frame["income"] = rng.choice([" - 50000.", " 50000+."], size=rows)
    frame.to_csv(path, header=False, index=False, compression="gzip")
    return frame


def test_tiny_census_labels_features_splits(tmp_path):
    raw = write_tiny_census(tmp_path / "census-income.test.gz")
    data = load_census_income(tmp_path, seed=1)
    assert [t.name for t in data.tasks] == ["income", "never_married"]
    assert [t.kind for t in data.tasks] == ["binary", "binary"]
    assert len(data.features) == 32 == len(CATEGORICAL)
    assert "marital_status" not in [f.name for f in data.features] and "income" not in [f.name for f in data.features]
    assert all(f.side == "context" and not f.multi_valued for f in data.features)
    assert data.dense_dim == 7
    assert {k: s.num_rows for k, s in data.splits.items()} == {"train": 160, "val": 20, "test": 20}
    order = torch.cat([data.splits[k].extra["row"] for k in ("train", "val", "test")])
    assert torch.equal(order.sort().values, torch.arange(200))
    for split in data.splits.values():
        rows = split.extra["row"].numpy()
        np.testing.assert_array_equal(split.labels[:, 0].numpy(), (raw["income"].iloc[rows] == " 50000+.").to_numpy())
        np.testing.assert_array_equal(split.labels[:, 1].numpy(), (raw["marital status"].iloc[rows] == " Never married").to_numpy())
        age = (raw["age"].iloc[rows].to_numpy() - raw["age"].iloc[data.splits["train"].extra["row"].numpy()].mean())
        assert np.corrcoef(age, split.dense[:, 0].numpy())[0, 1] > 0.999
    train = data.splits["train"]
    assert train.dense.mean(0).abs().max() < 1e-5
    assert torch.allclose(train.dense.std(0, unbiased=False), torch.ones(7), atol=1e-4)
    # Vocabulary: values stripped, 4 values + unknown.
    assert data.feature("education").num_embeddings == 5
    assert (train.user == 0).all() and (train.item == 0).all()
    batch = next(data.batches("val", 8))
    assert batch.sparse.keys() == [f.name for f in data.features] and batch.dense.shape == (8, 7)
    with pytest.raises(ValueError, match="no items"):
        data.topk_eval("test")
    again = load_census_income(tmp_path, seed=1)
    assert torch.equal(again.splits["test"].extra["row"], data.splits["test"].extra["row"])
    other = load_census_income(tmp_path, seed=2)
    assert not torch.equal(other.splits["test"].extra["row"], data.splits["test"].extra["row"])


def test_census_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="census-income"):
        find_census_file(tmp_path)
    write_tiny_census(tmp_path / "census-income.test.gz")
    with pytest.raises(ValueError, match="fraction"):
        load_census_income(tmp_path, val_fraction=0.6, test_fraction=0.5)


@pytest.mark.skipif(not CENSUS.is_file(), reason=f"{CENSUS} absent")
def test_real_census_rates():
    data = load_census_income(CENSUS)
    total = sum(s.num_rows for s in data.splits.values())
    assert total == 99_762
    labels = torch.cat([s.labels for s in data.splits.values()])
    assert int(labels[:, 0].sum()) == 6_186 and int(labels[:, 1].sum()) == 43_143
    for f in data.features:
        assert int(data.splits["train"].sparse[f.name].max()) < f.num_embeddings
