"""Census-Income (KDD) as a two-task tabular set: income > 50K and never married.

The multi-task benchmark of Ma et al., "Modeling Task Relationships in Multi-task Learning with
Multi-gate Mixture-of-Experts", KDD 2018 (section 4.3, as also used by PLE, Tang et al., RecSys 2020):
task 1 income > 50K, task 2 marital status == "Never married". Data: UCI ML Repository (Dua & Graff),
CC BY 4.0; only the 99,762-row test half is in shared/data (see its SOURCE.md), so train/val/test are
a seeded shuffle of that one file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import numpy as np
import pandas as pd
import torch

from .dataset import MultiTaskData, SplitRows
from .types import FeatureSpec, TaskSpec
from .vocabulary import Vocabulary

COLUMNS = [
    "age", "class of worker", "industry code", "occupation code", "education", "wage per hour",
    "enrolled in edu inst last wk", "marital status", "major industry code", "major occupation code", "race",
    "hispanic origin", "sex", "member of a labor union", "reason for unemployment",
    "full or part time employment stat", "capital gains", "capital losses", "divdends from stocks",
    "tax filer status", "region of previous residence", "state of previous residence",
    "detailed household and family stat", "detailed household summary in household", "instance weight",
    "migration code-change in msa", "migration code-change in reg", "migration code-move within reg",
    "live in this house 1 year ago", "migration prev res in sunbelt", "num persons worked for employer",
    "family members under 18", "country of birth father", "country of birth mother", "country of birth self",
    "citizenship", "own business or self employed", "fill inc questionnaire for veterans admin",
    "veterans benefits", "weeks worked in year", "year", "income",
]
CONTINUOUS = [
    "age", "wage per hour", "capital gains", "capital losses", "divdends from stocks",
    "num persons worked for employer", "weeks worked in year",
]
# Not features: the survey weight, the income label and marital status (the second label's source).
EXCLUDED = ["instance weight", "income", "marital status"]
CATEGORICAL = [c for c in COLUMNS if c not in CONTINUOUS and c not in EXCLUDED]
FILE_NAME = "census-income.test.gz"
FOLDER = "census-income-kdd"


def feature_name(column: str) -> str:
    """``"class of worker"`` -> ``"class_of_worker"`` (feature names are identifiers)."""
    return column.replace(" ", "_").replace("-", "_")


def find_census_file(path: Optional[Union[str, Path]] = None) -> Path:
    """The Census-Income file: ``path`` (file or folder), else the shared data folder.

    Shared folder: ``$MTKERNELS_SHARED_DATA``, else ``<repo>/../shared/data``, else ``./../shared/data``.

    Raises:
        FileNotFoundError: not found.
    """
    candidates = []
    if path is not None:
        path = Path(path)
        candidates += [path, path / FILE_NAME, path / FOLDER / FILE_NAME]
    else:
        env = os.environ.get("MTKERNELS_SHARED_DATA")
        roots = ([Path(env)] if env else []) + [Path(__file__).resolve().parents[3] / "shared" / "data",
                                                  Path.cwd().parent / "shared" / "data"]
        candidates += [root / FOLDER / FILE_NAME for root in roots]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"census-income.test.gz not found; looked at: {', '.join(map(str, candidates))}")


def load_census_income(
    path: Optional[Union[str, Path]] = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
) -> MultiTaskData:
    """Census-Income (KDD) as a `MultiTaskData` with tasks ``income`` and ``never_married`` (binary).

    Features: the 32 categorical columns (all but marital status, the label's source) as
    single-valued context features (vocabularies from the training rows; 0 = unknown), the 7
    continuous columns as dense features standardised with the training mean and std. Splits
    ``train``, ``val``, ``test``: a ``numpy.random.default_rng(seed)`` permutation of the rows cut by the
    fractions. No users or items: ``topk_eval`` raises, ``Split.user`` / ``item`` are zeros.

    Args:
        path: the ``census-income.test.gz`` file or a folder holding it (default: shared data).
        val_fraction, test_fraction: shares of the rows for val and test (each in [0, 1), sum < 1).
        seed: seed of the shuffle.

    Raises:
        FileNotFoundError: file not found. ValueError: fractions out of range.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction and test_fraction must be in [0, 1) with a sum < 1, got {val_fraction}, {test_fraction}")
    file = find_census_file(path)
    # pyarrow's reader is several times faster than the C engine on this 17 MB file.
    frame = pd.read_csv(file, header=None, names=COLUMNS, dtype=str, keep_default_na=False, engine="pyarrow")
    n = len(frame)
    labels = np.stack([
        (frame["income"].str.strip() == "50000+.").to_numpy(np.float32),
        (frame["marital status"].str.strip() == "Never married").to_numpy(np.float32),
    ], axis=1)
    order = np.random.default_rng(seed).permutation(n)
    num_test, num_val = int(round(test_fraction * n)), int(round(val_fraction * n))
    parts = {"train": order[: n - num_val - num_test], "val": order[n - num_val - num_test : n - num_test],
             "test": order[n - num_test :]}
    train_rows = parts["train"]

    codes = {}
    vocabularies = {}
    features = []
    for column in CATEGORICAL:
        values = frame[column].str.strip()
        vocab = Vocabulary(values.iloc[train_rows])
        codes[feature_name(column)] = vocab.encode(values)
        vocabularies[feature_name(column)] = vocab.row_keys()
        features.append(FeatureSpec(feature_name(column), vocab.num_embeddings, False, "context"))
    numbers = frame[CONTINUOUS].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    mean = np.nanmean(numbers[train_rows], axis=0)
    std = np.nanstd(numbers[train_rows], axis=0)
    dense = np.nan_to_num((numbers - mean) / np.where(std > 0, std, 1.0)).astype(np.float32)

    split_rows = {}
    for name, rows in parts.items():
        split_rows[name] = SplitRows(
            user_row=torch.zeros(len(rows), dtype=torch.long),
            item_row=torch.zeros(len(rows), dtype=torch.long),
            labels=torch.from_numpy(labels[rows]),
            context_sparse={k: torch.from_numpy(v[rows]) for k, v in codes.items()},
            context_dense=torch.from_numpy(dense[rows]),
            extra={"row": torch.from_numpy(rows.astype(np.int64))},
        )
    return MultiTaskData(
        name="census-income-kdd",
        tasks=[TaskSpec("income", "binary"), TaskSpec("never_married", "binary")],
        features=features,
        split_rows=split_rows,
        context_dense_names=[feature_name(c) for c in CONTINUOUS],
        user_id_feature=None,
        vocabularies=vocabularies,
        info={"path": str(file), "seed": seed, "rows": n},
    )
