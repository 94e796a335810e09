"""Bring your own data: a CSV or Parquet interaction log plus a small schema -> `MultiTaskData`.

Schema (a dict, or the path of a YAML file holding one)::

    user: user_id                  # user column (required)
    item: item_id                  # item column (required)
    labels:                        # label columns and their task kinds (required, >= 1)
      click: binary                #   binary: 0/1, regression: a number; empty cells = no label (NaN)
      rating: regression
    user_features: [age, gender]   # optional categorical side features (one value per user)
    item_features: [category]      # optional categorical side features (one value per item)
    context_features: [device]     # optional categorical per-row features
    multi_valued: {genres: "|"}    # optional: which of the feature columns hold separated lists
    dense: [price]                 # optional numeric per-row columns (standardised on train)
    timestamp: ts                  # optional (Unix seconds or dates -> int64 seconds, each split's
                                   #   extra["timestamp"]); needed by split: temporal
    item_title: title              # optional, for printing recommendations
    split: random                  # random | temporal (by timestamp, over all rows) | a column name
    val_fraction: 0.1              # random / temporal split shares
    test_fraction: 0.1
    seed: 0
    topk_task: click               # binary task whose 1s are the relevant items of topk_eval
    sep: ","                       # CSV separator (default: "," or tab for .tsv)

With ``split: <column>``, that column names each row's split (``train``, ``val``, ``test``).
Encoding follows `load_ml100k_mtl_v1`: users seen in train get ids 1..U (others the unknown 0 but
their own user-table row, so they are served from side features), items 1..I in ascending id order,
vocabularies of categorical features from the training rows (0 = unknown).
"""

from __future__ import annotations

import numbers
from pathlib import Path
from typing import Dict, Optional, Union

import numpy as np
import pandas as pd
import torch
import yaml

from .dataset import EntityTable, MultiTaskData, SplitRows, csr_from_pairs
from .types import FeatureSpec, TaskSpec, TopKEval
from .vocabulary import Vocabulary, encode_multi

DEFAULTS = {"user_features": [], "item_features": [], "context_features": [], "multi_valued": {}, "dense": [],
            "timestamp": None, "item_title": None, "split": "random", "val_fraction": 0.1, "test_fraction": 0.1,
            "seed": 0, "topk_task": None, "sep": None}
KNOWN_KEYS = set(DEFAULTS) | {"user", "item", "labels"}
SPLITS = ("train", "val", "test")


def read_schema(schema: Union[dict, str, Path]) -> dict:
    """The schema with defaults filled in; ``schema`` is a dict or a YAML file path.

    Raises:
        ValueError: missing ``user``/``item``/``labels``, an unknown key, a task kind other than
        binary/regression, feature or dense columns not given as a list, ``multi_valued`` not a mapping,
        a ``seed`` that is not an integer or a split fraction that is not a number.
    """
    if isinstance(schema, (str, Path)):
        with open(schema, encoding="utf-8") as handle:
            schema = yaml.safe_load(handle)
    if not isinstance(schema, dict):
        raise ValueError(f"schema must be a dict (or a YAML file holding one), got {type(schema).__name__}")
    unknown = set(schema) - KNOWN_KEYS
    if unknown:
        raise ValueError(f"schema: unknown keys {sorted(unknown)}; known: {sorted(KNOWN_KEYS)}")
    for key in ("user", "item", "labels"):
        if not schema.get(key):
            raise ValueError(f"schema: {key!r} is required")
    out = {**DEFAULTS, **schema}
    if not isinstance(out["labels"], dict):
        raise ValueError("schema: 'labels' must map label columns to 'binary' or 'regression'")
    for key in ("user_features", "item_features", "context_features", "dense"):
        if not isinstance(out[key], (list, tuple)) or not all(isinstance(c, str) for c in out[key]):
            raise ValueError(f"schema: {key!r} must be a list of column names (YAML: [a, b]), got {out[key]!r}")
    if isinstance(out["seed"], bool) or not isinstance(out["seed"], numbers.Integral):
        raise ValueError(f"schema: 'seed' must be an integer, got {out['seed']!r}")
    for key in ("val_fraction", "test_fraction"):
        if isinstance(out[key], bool) or not isinstance(out[key], numbers.Real):
            raise ValueError(f"schema: {key!r} must be a number in [0, 1), got {out[key]!r}")
    if not isinstance(out["multi_valued"], dict):
        raise ValueError(f"schema: 'multi_valued' must be a mapping of column to separator (e.g. {{genres: '|'}}), "
                         f"got {out['multi_valued']!r}")
    for column, kind in out["labels"].items():
        if kind not in ("binary", "regression"):
            raise ValueError(f"schema: label {column!r} has kind {kind!r}; expected 'binary' or 'regression'")
    return out


def read_table(path: Union[str, Path], sep: Optional[str] = None) -> pd.DataFrame:
    """A CSV (``sep``, default "," or tab for .tsv) or Parquet (.parquet/.pq) file as a DataFrame.

    Raises:
        FileNotFoundError: no such file. ValueError: an empty text file.
    """
    path = Path(path)
    if path.suffix.lower() in (".parquet", ".pq"):
        return pd.read_parquet(path)
    try:
        return pd.read_csv(path, sep=sep or ("\t" if path.suffix.lower() == ".tsv" else ","))
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path} is empty (no header row)") from None


def _timestamps(frame: pd.DataFrame, column: str) -> np.ndarray:
    """int64 Unix seconds of the timestamp column: numbers are seconds (floored), text is parsed as dates
    (timezone-less ones as UTC).

    Raises:
        ValueError: a missing or unreadable value.
    """
    values = frame[column]
    numbers = pd.to_numeric(values, errors="coerce")
    seconds = numbers.to_numpy(np.float64)
    bad = ~np.isfinite(seconds)
    if bad.any() and not pd.api.types.is_numeric_dtype(values):
        dates = pd.to_datetime(values.astype("string"), errors="coerce", utc=True, format="mixed")
        if dates.isna().sum() < bad.sum():
            bad = dates.isna().to_numpy()
            seconds = np.zeros(len(values))
            seconds[~bad] = (dates[~bad] - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise ValueError(f"timestamp column {column!r}: {len(rows)} missing or unreadable values (expected Unix "
                         f"seconds or dates), first at row {rows[0]}: {values.iloc[rows[0]]!r}")
    return np.floor(seconds).astype(np.int64)


def _check_values(frame: pd.DataFrame, schema: dict) -> None:
    """Refuse what would silently train or rank wrong: a missing user or item id (it would become an
    entity of its own), a binary label other than 0/1 (the cross-entropy would fit it, top-k ignore it),
    and an infinite label or dense value (a NaN loss, a NaN standardised column).

    Raises:
        ValueError: naming the column and the first bad row (0-based, as read).
    """
    for column in (schema["user"], schema["item"]):
        missing = np.flatnonzero(frame[column].isna().to_numpy())
        if len(missing):
            raise ValueError(f"column {column!r}: {len(missing)} missing ids, first at row {missing[0]}")
    for column in list(schema["labels"]) + list(schema["dense"]):
        values = frame[column].to_numpy(np.float64)
        infinite = np.flatnonzero(np.isinf(values))
        if len(infinite):
            raise ValueError(f"column {column!r}: infinite value at row {infinite[0]}")
        if schema["labels"].get(column) == "binary":
            bad = np.flatnonzero(~np.isnan(values) & (values != 0) & (values != 1))
            if len(bad):
                raise ValueError(f"binary label {column!r} must be 0 or 1 (empty: no label), got {values[bad[0]]:g} "
                                 f"at row {bad[0]}")


def _split_labels(frame: pd.DataFrame, schema: dict, timestamps: Optional[np.ndarray]) -> np.ndarray:
    """0 = train, 1 = val, 2 = test per row."""
    n = len(frame)
    mode = schema["split"]
    val_fraction, test_fraction = float(schema["val_fraction"]), float(schema["test_fraction"])
    if mode in ("random", "temporal"):
        if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError(f"schema: val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}")
        if mode == "random":
            order = np.random.default_rng(int(schema["seed"])).permutation(n)
        else:
            if timestamps is None:
                raise ValueError("schema: split 'temporal' needs a 'timestamp' column")
            order = np.argsort(timestamps, kind="stable")
        num_test, num_val = int(round(test_fraction * n)), int(round(val_fraction * n))
        label = np.zeros(n, dtype=np.int64)
        label[order[n - num_val - num_test : n - num_test]] = 1
        label[order[n - num_test :]] = 2
        return label
    if mode not in frame.columns:
        raise ValueError(f"schema: split must be 'random', 'temporal' or a column name; no column {mode!r}")
    names = frame[mode].astype(str).str.strip().str.lower()
    bad = set(names.unique()) - set(SPLITS)
    if bad:
        raise ValueError(f"split column {mode!r}: values must be train/val/test, got {sorted(bad)}")
    return names.map({s: i for i, s in enumerate(SPLITS)}).to_numpy(np.int64)


def _with_unknown_row(sparse, jagged, specs, vocabularies):
    """Prepend the unknown entity (row 0: id 0, empty bags) to encoded user/item tables."""
    sparse = {k: torch.cat([torch.zeros(1, dtype=torch.long), v]) for k, v in sparse.items()}
    jagged = {k: (v, torch.cat([torch.zeros(1, dtype=torch.long), o])) for k, (v, o) in jagged.items()}
    return sparse, jagged, specs, vocabularies


def _lists(values: pd.Series, sep: str) -> list:
    return [[] if pd.isna(v) or str(v) == "" else [x.strip() for x in str(v).split(sep) if x.strip()] for v in values]


def _encode_side(frame: pd.DataFrame, columns, multi: dict, fit_rows: np.ndarray, side: str):
    """Encode categorical columns of a table (one row per entity, or per interaction)."""
    sparse, jagged, specs, vocabularies = {}, {}, [], {}
    for column in columns:
        if column in multi:
            lists = _lists(frame[column], multi[column])
            vocab = Vocabulary([x for i in fit_rows for x in lists[i]])
            values, offsets = encode_multi(lists, vocab)
            jagged[column] = (torch.from_numpy(values), torch.from_numpy(offsets))
            specs.append(FeatureSpec(column, vocab.num_embeddings, True, side))
        else:
            text = frame[column].astype("string")
            vocab = Vocabulary(text.iloc[fit_rows])
            sparse[column] = torch.from_numpy(vocab.encode(text))
            specs.append(FeatureSpec(column, vocab.num_embeddings, False, side))
            vocabularies[column] = vocab
    return sparse, jagged, specs, vocabularies


def load_interactions(path: Union[str, Path], schema: Union[dict, str, Path], **overrides) -> MultiTaskData:
    """An interaction log (CSV or Parquet) described by ``schema`` as a `MultiTaskData`.

    Splits ``train``, ``val``, ``test`` (see the module docstring for the schema and the encoding).
    Features, in order: ``user_id``, user features, ``item_id``, item features, context features;
    the dense columns are context-side and standardised with the training mean/std (missing -> 0).
    ``topk_eval("val")`` excludes each user's training positives, ``topk_eval("test")`` training and
    validation positives; relevant = the split's positives of ``topk_task`` (default: the first
    binary task; every row when there is none).

    Args:
        path: ``.csv``/``.tsv`` (or any text table) or ``.parquet``/``.pq`` file.
        schema: dict or YAML path. ``overrides``: schema keys to replace (e.g. ``seed=1``).

    Raises:
        ValueError: bad schema, missing columns, non-numeric label or dense values, a missing user or
            item id, a binary label other than 0/1, an infinite label or dense value, a missing or
            unreadable timestamp, empty train split.
        FileNotFoundError: ``path`` (or the YAML file) does not exist.
    """
    schema = read_schema({**(read_schema(schema) if not isinstance(schema, dict) else schema), **overrides})
    frame = read_table(path, schema["sep"])
    user_col, item_col = schema["user"], schema["item"]
    label_cols = list(schema["labels"])
    side_cols = schema["user_features"] + schema["item_features"] + schema["context_features"]
    needed = [user_col, item_col] + label_cols + side_cols + list(schema["dense"])
    needed += [c for c in (schema["timestamp"], schema["item_title"]) if c]
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: columns {missing} named by the schema are missing; the file has {list(frame.columns)}")
    for column in schema["multi_valued"]:
        if column not in side_cols:
            raise ValueError(f"schema: multi_valued column {column!r} is not listed as a user/item/context feature")
    for column in label_cols + list(schema["dense"]):
        if not pd.api.types.is_numeric_dtype(frame[column]):
            converted = pd.to_numeric(frame[column], errors="coerce")
            if converted.isna().sum() > frame[column].isna().sum():
                raise ValueError(f"column {column!r} must be numeric (a label or dense feature)")
            frame[column] = converted
    frame = frame.reset_index(drop=True)
    _check_values(frame, schema)
    timestamps = _timestamps(frame, schema["timestamp"]) if schema["timestamp"] else None
    split = _split_labels(frame, schema, timestamps)
    train_rows = np.flatnonzero(split == 0)
    if len(train_rows) == 0:
        raise ValueError("the train split is empty")

    # Users: row 0 unknown, then training users (ascending), then the others (ascending).
    users_all = pd.Index(pd.unique(frame[user_col])).sort_values()
    warm = pd.Index(pd.unique(frame[user_col].iloc[train_rows])).sort_values()
    user_order = warm.append(users_all.difference(warm).sort_values())
    user_row_of = pd.Series(np.arange(1, len(user_order) + 1), index=user_order)
    user_row = user_row_of.loc[frame[user_col].to_numpy()].to_numpy()
    user_first = frame.drop_duplicates(user_col).set_index(user_col).reindex(user_order)
    warm_rows = np.arange(1, len(warm) + 1)
    user_sparse, user_multi, user_specs, user_vocabularies = _with_unknown_row(
        *_encode_side(user_first, schema["user_features"], schema["multi_valued"], warm_rows - 1, "user"))

    def encode_user_side(records: pd.DataFrame) -> Dict[str, np.ndarray]:
        return {c: v.encode(records[c].astype("string") if c in records else pd.Series([None] * len(records)))
                for c, v in user_vocabularies.items()}

    user_id = np.zeros(len(user_order) + 1, dtype=np.int64)
    user_id[warm_rows] = warm_rows
    user_sparse = {"user_id": torch.from_numpy(user_id), **user_sparse}

    # Items: the catalogue is every item in the log, position p = ascending id order, row p + 1.
    catalogue = pd.Index(pd.unique(frame[item_col])).sort_values()
    item_row = catalogue.get_indexer(frame[item_col].to_numpy()) + 1
    item_first = frame.drop_duplicates(item_col).set_index(item_col).reindex(catalogue)
    item_sparse, item_multi, item_specs, _ = _with_unknown_row(
        *_encode_side(item_first, schema["item_features"], schema["multi_valued"], np.arange(len(catalogue)), "item"))
    item_sparse = {"item_id": torch.arange(len(catalogue) + 1), **item_sparse}

    context_sparse, context_multi, context_specs, _ = _encode_side(frame, schema["context_features"], schema["multi_valued"], train_rows, "context")
    dense = frame[list(schema["dense"])].to_numpy(np.float64) if schema["dense"] else np.zeros((len(frame), 0))
    mean = np.nanmean(dense[train_rows], axis=0) if dense.shape[1] else np.zeros(0)
    std = np.nanstd(dense[train_rows], axis=0) if dense.shape[1] else np.zeros(0)
    dense = np.nan_to_num((dense - mean) / np.where(std > 0, std, 1.0)).astype(np.float32)
    labels = frame[label_cols].to_numpy(np.float32)

    features = ([FeatureSpec("user_id", len(warm) + 1, False, "user")] + user_specs
                + [FeatureSpec("item_id", len(catalogue) + 1, False, "item")] + item_specs + context_specs)
    split_rows = {}
    for index, name in enumerate(SPLITS):
        rows = np.flatnonzero(split == index)
        rows_t = torch.from_numpy(rows)
        split_rows[name] = SplitRows(
            user_row=torch.from_numpy(user_row[rows].astype(np.int64)),
            item_row=torch.from_numpy(item_row[rows].astype(np.int64)),
            labels=torch.from_numpy(labels[rows]),
            context_sparse={k: v[rows_t] for k, v in context_sparse.items()},
            context_multi={k: _take_jagged(v, rows_t) for k, v in context_multi.items()},
            context_dense=torch.from_numpy(dense[rows]),
            extra={"row": rows_t, **({} if timestamps is None else {"timestamp": torch.from_numpy(timestamps[rows])})},
        )

    tasks = [TaskSpec(c, k) for c, k in schema["labels"].items()]
    topk_task = schema["topk_task"] or next((t.name for t in tasks if t.kind == "binary"), None)
    if topk_task is not None and topk_task not in label_cols:
        raise ValueError(f"schema: topk_task {topk_task!r} is not a label column")
    positive = (frame[topk_task].to_numpy() == 1) if topk_task else np.ones(len(frame), dtype=bool)
    topk = {}
    for name, index, seen in (("val", 1, [0]), ("test", 2, [0, 1])):
        rel = positive & (split == index)
        users = np.unique(user_row[rel])
        if len(users) == 0:
            continue
        rel_offsets, rel_indices = csr_from_pairs(np.searchsorted(users, user_row[rel]), item_row[rel] - 1, len(users))
        ex = positive & np.isin(split, seen) & np.isin(user_row, users)
        pairs = np.unique(np.stack([np.searchsorted(users, user_row[ex]), item_row[ex] - 1], axis=1), axis=0)
        ex_offsets, ex_indices = csr_from_pairs(pairs[:, 0], pairs[:, 1], len(users))
        topk[name] = TopKEval(torch.from_numpy(users.astype(np.int64)), ex_offsets, ex_indices, rel_offsets, rel_indices)

    side_columns = list(schema["user_features"])
    titles = None
    if schema["item_title"]:
        titles = [str(t) for t in item_first[schema["item_title"]]]
    ids = lambda index: torch.tensor(index.to_numpy(np.int64)) if pd.api.types.is_integer_dtype(index) else list(index)  # noqa: E731
    user_ids = ids(user_order)
    user_ids = torch.cat([torch.tensor([-1]), user_ids]) if isinstance(user_ids, torch.Tensor) else [None] + user_ids
    return MultiTaskData(
        name=f"interactions:{Path(path).name}",
        tasks=tasks,
        features=features,
        split_rows=split_rows,
        users=EntityTable(user_sparse, user_multi, torch.zeros(len(user_order) + 1, 0)),
        items=EntityTable(item_sparse, item_multi, torch.zeros(len(catalogue) + 1, 0)),
        context_dense_names=list(schema["dense"]),
        user_ids=user_ids,
        item_ids=ids(catalogue),
        item_titles=titles,
        user_side_frame=frame.drop_duplicates(user_col).set_index(user_col)[side_columns] if side_columns else None,
        topk_sets=topk,
        user_encoder=encode_user_side if user_vocabularies else None,
        user_side_columns=tuple(user_vocabularies),
        info={"path": str(path), "schema": schema, "num_warm_users": len(warm)},
    )


def _take_jagged(jagged, rows: torch.Tensor):
    from .dataset import gather_jagged, lengths_to_offsets

    values, lengths = gather_jagged(jagged[0], jagged[1], rows)
    return values, lengths_to_offsets(lengths)
