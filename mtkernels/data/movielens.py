"""MovieLens-100K: reading the RecBole atomic files or the GroupLens folder, and the encoded
`ml100k-mtl-v1` multi-task data set (click, like, rating; warm and cold-start test users).

Data: F. M. Harper and J. A. Konstan, "The MovieLens Datasets: History and Context", ACM TiiS 5(4),
2015 (GroupLens terms: research use, no redistribution; the files are fetched, never committed).
"""

from __future__ import annotations

import copy
import csv
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Union

import numpy as np
import pandas as pd
import torch

from . import protocol
from .dataset import EntityTable, MultiTaskData, SplitRows, csr_from_pairs
from .history import causal_user_history
from .neighbourhood import item_knn_estimates
from .sources import SUBDIR, default_data_dir, fetch_ml100k
from .types import FeatureSpec, TaskSpec, TopKEval
from .vocabulary import Vocabulary, encode_multi

GROUPLENS_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
]
# MovieLens-1M's published age groups (README of ml-1m): under 18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+.
AGE_EDGES = [18, 25, 35, 45, 50, 56]
# Release years: most ML-100K films are from the 1990s, so those get a bucket per year, older ones per decade.
YEAR_EDGES = [1940, 1950, 1960, 1970, 1980, 1985, 1990, 1991, 1992, 1993, 1994, 1995, 1996, 1997, 1998]
ZIP_PREFIX = 2
# Pseudo-count of the smoothed (Bayesian) averages: an item with few training ratings is pulled
# towards the global mean instead of echoing its one or two labels.
SMOOTHING = 10.0
USER_DENSE = ["user_log_activity", "user_mean_rating", "user_like_rate", "user_history_popularity", "user_recent_popularity"]
ITEM_DENSE = ["item_log_popularity", "item_mean_rating", "item_like_rate"]
# rating_estimate -> the per-(user, item) column it adds
RATING_ESTIMATES = {"offset": "item_knn_offset", "estimate": "item_knn_rating"}
RECENT = 10  # ratings that make a user's "recent" history
HISTORY_FEATURE = "history"  # the causal user-history bag (history_length)
# ordinal_tasks: binary rating >= k auxiliary tasks (like is rating >= 4)
ORDINAL_THRESHOLDS = (2, 3, 5)
ORDINAL_TASKS = tuple(f"rating_ge{k}" for k in ORDINAL_THRESHOLDS)


@dataclass
class MovieLens:
    """Raw MovieLens-100K tables.

    Attributes:
        ratings: ``user_id, item_id, rating, timestamp`` (int64), one row per rating.
        users: ``user_id (int64), age (int64), gender, occupation, zip_code (str)``.
        items: ``item_id (int64), title (str), release_year (float, NaN if unknown), genres (list[str])``.
        source: ``"recbole"`` or ``"grouplens"``; path: the folder read.
    """

    ratings: pd.DataFrame
    users: pd.DataFrame
    items: pd.DataFrame
    source: str
    path: Path


def _read_tsv(path: Path, encoding: str) -> pd.DataFrame:
    frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, quoting=csv.QUOTE_NONE, encoding=encoding)
    frame.columns = [c.split(":")[0] for c in frame.columns]  # RecBole headers are "name:type"
    return frame


def read_recbole(folder: Union[str, Path]) -> MovieLens:
    """Read ``ml-100k.inter/.user/.item`` (RecBole atomic files, tab-separated, UTF-8)."""
    folder = Path(folder)
    inter = _read_tsv(folder / "ml-100k.inter", "utf-8")
    ratings = pd.DataFrame({c: pd.to_numeric(inter[c]).astype(np.int64) for c in ("user_id", "item_id", "rating", "timestamp")})
    user = _read_tsv(folder / "ml-100k.user", "utf-8")
    users = pd.DataFrame({
        "user_id": user["user_id"].astype(np.int64),
        "age": pd.to_numeric(user["age"], errors="coerce"),
        "gender": user["gender"], "occupation": user["occupation"], "zip_code": user["zip_code"],
    })
    item = _read_tsv(folder / "ml-100k.item", "utf-8")
    items = pd.DataFrame({
        "item_id": item["item_id"].astype(np.int64),
        "title": item["movie_title"],
        # One RecBole row (item 1412) lost its year to a parsing slip but keeps "(1995)" in its title.
        "release_year": pd.to_numeric(item["release_year"], errors="coerce").astype(float).fillna(
            pd.to_numeric(item["movie_title"].str.extract(r"\((\d{4})\)\s*$")[0], errors="coerce")),
        "genres": [[g for g in s.split(" ") if g] for s in item["class"]],
    })
    return MovieLens(ratings, users, items, "recbole", folder)


def read_grouplens(folder: Union[str, Path]) -> MovieLens:
    """Read the GroupLens ``ml-100k`` folder: ``u.data`` (tab), ``u.user``, ``u.item`` (``|``), Latin-1.

    ``u.item`` titles carry the year in brackets ("Toy Story (1995)"); it is stripped to match the
    RecBole titles, and the release year is taken from the release date ("01-Jan-1995"). Genre names
    come from ``u.genre`` when present, else the standard 19 in GroupLens order.
    """
    folder = Path(folder)
    ratings = pd.read_csv(folder / "u.data", sep="\t", header=None, names=["user_id", "item_id", "rating", "timestamp"],
                          dtype=np.int64, encoding="latin-1")
    users = pd.read_csv(folder / "u.user", sep="|", header=None, names=["user_id", "age", "gender", "occupation", "zip_code"],
                        dtype=str, keep_default_na=False, encoding="latin-1")
    users["user_id"] = users["user_id"].astype(np.int64)
    users["age"] = pd.to_numeric(users["age"], errors="coerce")
    genres = GROUPLENS_GENRES
    if (folder / "u.genre").is_file():
        genre_frame = pd.read_csv(folder / "u.genre", sep="|", header=None, names=["name", "index"], dtype=str,
                                  keep_default_na=False, encoding="latin-1")
        genre_frame = genre_frame[genre_frame["name"] != ""]
        genres = [name for name, _ in sorted(zip(genre_frame["name"], genre_frame["index"].astype(int)), key=lambda x: x[1])]
    item = pd.read_csv(folder / "u.item", sep="|", header=None, dtype=str, keep_default_na=False,
                       quoting=csv.QUOTE_NONE, encoding="latin-1")
    if item.shape[1] != 5 + len(genres):
        raise ValueError(f"{folder / 'u.item'}: expected {5 + len(genres)} '|'-separated fields, got {item.shape[1]}")
    flags = item.iloc[:, 5:].to_numpy() == "1"
    year = pd.to_numeric(item.iloc[:, 2].str.extract(r"(\d{4})\s*$")[0], errors="coerce")
    items = pd.DataFrame({
        "item_id": item.iloc[:, 0].astype(np.int64),
        "title": item.iloc[:, 1].str.replace(r"\s*\(\d{4}\)\s*$", "", regex=True),
        "release_year": year.astype(float),
        "genres": [[g for g, on in zip(genres, row) if on] for row in flags],
    })
    return MovieLens(ratings, users, items, "grouplens", folder)


def find_movielens_folder(data_dir: Optional[Union[str, Path]] = None) -> Path:
    """The folder holding ML-100K: ``data_dir`` itself or ``data_dir/ml-100k`` (RecBole or GroupLens files).

    Raises:
        FileNotFoundError: nothing found; the message says how to fetch the data.
    """
    base = Path(data_dir) if data_dir is not None else default_data_dir()
    for folder in (base, base / SUBDIR):
        if (folder / "ml-100k.inter").is_file() or (folder / "u.data").is_file():
            return folder
    raise FileNotFoundError(
        f"MovieLens-100K not found in {base} (nor {base / SUBDIR}): expected ml-100k.inter/.user/.item (RecBole) "
        f"or u.data/u.user/u.item (GroupLens). Run `python -m mtkernels.data.fetch --dest {base}` "
        "or set MTKERNELS_DATA."
    )


def read_movielens_100k(data_dir: Optional[Union[str, Path]] = None, download: bool = False) -> MovieLens:
    """Read ML-100K from a RecBole or GroupLens folder (see `find_movielens_folder`).

    Args:
        data_dir: folder (default ``$MTKERNELS_DATA``, else ``./.cache/data``).
        download: fetch the RecBole files from PyPI first when they are missing.
    """
    if download:
        try:
            find_movielens_folder(data_dir)
        except FileNotFoundError:
            fetch_ml100k(Path(data_dir) if data_dir is not None else None)
    folder = find_movielens_folder(data_dir)
    return read_recbole(folder) if (folder / "ml-100k.inter").is_file() else read_grouplens(folder)


def _bucket(values: pd.Series, edges: List[float], name: str) -> np.ndarray:
    """Fixed buckets 1..len(edges)+1 (``np.digitize`` + 1); missing values (None, NaN) -> 0.

    Raises:
        ValueError: a value that is present but not a number (e.g. a new user's ``age`` "abc"),
            naming ``name``: unknown, not silently the missing-value bucket; a negative or infinite
            number (not silently the first or last bucket).
    """
    numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype=float)
    unreadable = np.isnan(numbers) & values.notna().to_numpy()
    if unreadable.any():
        raise ValueError(f"{name}: expected a number, got {values[unreadable].iloc[0]!r}")
    impossible = np.isinf(numbers) | (numbers < 0)  # an age or a year: not silently the first or last bucket
    if impossible.any():
        raise ValueError(f"{name}: expected a finite number >= 0, got {numbers[impossible][0]:g}")
    ids = np.digitize(numbers, edges) + 1
    return np.where(np.isnan(numbers), 0, ids).astype(np.int64)


def _smoothed_stats(keys: np.ndarray, ratings: np.ndarray, num_keys: int, prior_rating: float, prior_like: float):
    """Per key (from training positives): log1p(count), smoothed mean rating, smoothed like rate."""
    count = np.bincount(keys, minlength=num_keys).astype(float)
    rating_sum = np.bincount(keys, weights=ratings, minlength=num_keys)
    like_sum = np.bincount(keys, weights=(ratings >= protocol.LIKE_THRESHOLD).astype(float), minlength=num_keys)
    mean_rating = (rating_sum + SMOOTHING * prior_rating) / (count + SMOOTHING)
    like_rate = (like_sum + SMOOTHING * prior_like) / (count + SMOOTHING)
    return np.stack([np.log1p(count), mean_rating, like_rate], axis=1)


def _user_taste_stats(user_rows: np.ndarray, item_log_count: np.ndarray, num_rows: int, recent: int = RECENT) -> np.ndarray:
    """Per user: mean log-popularity of the items in the user's training history, overall and over
    the last ``recent`` ratings (rows in protocol order: user, timestamp, item). Users drift towards
    rarer films over time (PROTOCOL.md 6), so the recent value tells how mainstream the next film is."""
    frame = pd.DataFrame({"user": user_rows, "pop": item_log_count})
    position_from_end = frame.groupby("user").cumcount(ascending=False).to_numpy()
    overall = frame.groupby("user")["pop"].mean()
    latest = frame[position_from_end < recent].groupby("user")["pop"].mean()
    out = np.zeros((num_rows, 2))
    out[overall.index.to_numpy(), 0] = overall.to_numpy()
    out[latest.index.to_numpy(), 1] = latest.to_numpy()
    return out


def _standardise(table: np.ndarray, fit_rows: np.ndarray, fill_rows: np.ndarray) -> np.ndarray:
    """Standardise columns with mean/std of ``fit_rows``; rows in ``fill_rows`` get the mean (0)."""
    mean = table[fit_rows].mean(axis=0)
    std = table[fit_rows].std(axis=0)
    std = np.where(std > 0, std, 1.0)
    out = (table - mean) / std
    out[fill_rows] = 0.0
    return out.astype(np.float32)


def _dense_tables(user_rows: np.ndarray, item_rows: np.ndarray, ratings: np.ndarray, rated: np.ndarray,
                  num_user_rows: int, num_item_rows: int, warm_rows: np.ndarray):
    """The standardised ``USER_DENSE`` ``[num_user_rows, 5]`` and ``ITEM_DENSE`` ``[num_item_rows, 3]``
    float32 tables from the training positives (``user_rows``, ``item_rows``, ``ratings``, in protocol
    order: user, timestamp, item). Counts and popularity use every positive (clicks); the mean rating
    and like rate only the positives with ``rated`` True (their priors too), so a label budget's
    statistics summarise the budget's labels only. Rows without history get the mean (0)."""
    rated = np.asarray(rated, dtype=bool)
    known = ratings[rated]
    prior_rating = float(known.mean()) if len(known) else 0.0
    prior_like = float((known >= protocol.LIKE_THRESHOLD).mean()) if len(known) else 0.0

    def side(keys: np.ndarray, num_keys: int) -> np.ndarray:
        stats = _smoothed_stats(keys[rated], known, num_keys, prior_rating, prior_like)
        stats[:, 0] = np.log1p(np.bincount(keys, minlength=num_keys))
        return stats

    user_dense, item_dense = side(user_rows, num_user_rows), side(item_rows, num_item_rows)
    user_taste = _user_taste_stats(user_rows, item_dense[item_rows, 0], num_user_rows)
    user_dense = np.concatenate([user_dense, user_taste], 1)
    user_dense = _standardise(user_dense, warm_rows, np.setdiff1d(np.arange(num_user_rows), warm_rows))
    item_dense = _standardise(item_dense, np.arange(1, num_item_rows), np.array([0]))
    return user_dense, item_dense


def refit_dense_features(data: MultiTaskData, split: str = "train") -> MultiTaskData:
    """A copy of an ml100k-mtl-v1 `MultiTaskData` whose dense statistics (``USER_DENSE``,
    ``ITEM_DENSE``) are recomputed from the labels ``data`` holds in ``split``.

    For label-budget experiments (`mtkernels.transfer.keep_label_fraction`, by users or by rows):
    activity, popularity and history popularity come from the click labels (every positive), the
    mean ratings and like rates only from positives whose ``rating`` label is present (not NaN), so
    no feature summarises a withheld label: users and items whose rating labels are all withheld get
    the budget's prior, and with a row budget each user's and item's statistics summarise its kept
    rows only (smoothed towards that prior, as few kept rows say little).
    With every label present the result equals `build_ml100k_mtl_v1`'s tables. Other dense columns
    (if any) and everything else are shared with ``data``; every split is re-assembled.

    Raises:
        ValueError: ``data`` has no ``click`` or ``rating`` task, no ``split``, or lacks the
            ``USER_DENSE``/``ITEM_DENSE`` columns (built with ``dense_features=False``).
    """
    names = [t.name for t in data.tasks]
    if "click" not in names or "rating" not in names:
        raise ValueError(f"data must have the click and rating tasks, got {names}")
    if split not in data.splits:
        raise ValueError(f"no split {split!r}; splits: {list(data.splits)}")
    user_names, item_names = data._user_dense_names, data._item_dense_names
    if any(n not in user_names for n in USER_DENSE) or any(n not in item_names for n in ITEM_DENSE):
        raise ValueError(f"data must have the dense columns {USER_DENSE + ITEM_DENSE}, got {data.dense_names}")
    rows = data._split_rows[split]
    labels = rows.labels.double().numpy()
    positive = labels[:, names.index("click")] == 1
    user_rows, item_rows = rows.user_row.numpy()[positive], rows.item_row.numpy()[positive]
    ratings = labels[positive, names.index("rating")]
    order = np.lexsort((item_rows, rows.extra["timestamp"].numpy()[positive], user_rows))  # protocol order
    user_rows, item_rows, ratings = user_rows[order], item_rows[order], ratings[order]
    warm_rows = np.arange(1, int(data.info["num_warm_users"]) + 1)
    user_new, item_new = _dense_tables(user_rows, item_rows, np.nan_to_num(ratings), ~np.isnan(ratings),
                                       data._users.dense.shape[0], data._items.dense.shape[0], warm_rows)
    user_dense, item_dense = data._users.dense.clone(), data._items.dense.clone()
    user_dense[:, [user_names.index(n) for n in USER_DENSE]] = torch.from_numpy(user_new)
    item_dense[:, [item_names.index(n) for n in ITEM_DENSE]] = torch.from_numpy(item_new)
    out = copy.copy(data)
    out._users = dataclasses.replace(data._users, dense=user_dense)
    out._items = dataclasses.replace(data._items, dense=item_dense)
    out._split_single = dict(data._split_single)
    out.splits = {name: out._assemble(name, split_rows) for name, split_rows in data._split_rows.items()}
    return out


def build_ml100k_mtl_v1(movielens: MovieLens, splits: Optional[Dict[str, pd.DataFrame]] = None,
                        dense_features: bool = True, rating_estimate: Optional[str] = None,
                        history_length: Optional[int] = None, ordinal_tasks: bool = False) -> MultiTaskData:
    """Encode the protocol splits of ``movielens`` into a `MultiTaskData` (see `load_ml100k_mtl_v1`)."""
    ratings, users_raw, items_raw = movielens.ratings, movielens.users, movielens.items
    catalogue = np.sort(np.union1d(items_raw["item_id"].to_numpy(), ratings["item_id"].unique()))
    if splits is None:
        splits = protocol.build_splits(ratings, catalogue)
    train = splits["train"]
    train_pos = train[train["click"].to_numpy() == 1]

    # Users: row 0 unknown, rows 1..W the training (warm) users ascending, then every other user
    # (cold ones) ascending; only warm users get a user_id embedding, the others keep id 0.
    warm = np.unique(train["user_id"].to_numpy())
    all_users = np.union1d(users_raw["user_id"].to_numpy(), ratings["user_id"].unique())
    others = np.setdiff1d(all_users, warm)
    user_ids = np.concatenate([[-1], warm, others]).astype(np.int64)
    num_user_rows = len(user_ids)
    side = users_raw.set_index("user_id").reindex(user_ids)
    warm_rows = np.arange(1, len(warm) + 1)
    gender_vocab = Vocabulary(side["gender"].iloc[warm_rows])
    occupation_vocab = Vocabulary(side["occupation"].iloc[warm_rows])
    zip_prefix = side["zip_code"].astype("string").str.strip().str.upper().str[:ZIP_PREFIX]
    zip_vocab = Vocabulary(zip_prefix.iloc[warm_rows])

    def encode_user_side(frame: pd.DataFrame) -> Dict[str, np.ndarray]:
        """Raw ``age, gender, occupation, zip_code`` columns -> the user-side feature ids."""
        column = lambda name: frame[name] if name in frame else pd.Series([None] * len(frame), dtype=object)  # noqa: E731
        prefix = column("zip_code").astype("string").str.strip().str.upper().str[:ZIP_PREFIX]
        return {
            "age": _bucket(column("age"), AGE_EDGES, "age"),
            "gender": gender_vocab.encode(column("gender")),
            "occupation": occupation_vocab.encode(column("occupation")),
            "zip": zip_vocab.encode(prefix),
        }

    user_id_feature = np.zeros(num_user_rows, dtype=np.int64)
    user_id_feature[warm_rows] = warm_rows
    user_sparse = {"user_id": user_id_feature, **encode_user_side(side.reset_index(drop=True))}

    # Items: row p + 1 = catalogue position p (ascending external id); row 0 unknown.
    num_items = len(catalogue)
    item_side = items_raw.set_index("item_id").reindex(catalogue)
    genre_lists = [g if isinstance(g, list) else [] for g in item_side["genres"]]
    genre_vocab = Vocabulary([g for lst in genre_lists for g in lst])
    genre_values, genre_offsets = encode_multi([[]] + genre_lists, genre_vocab)
    item_sparse = {
        "item_id": np.arange(num_items + 1, dtype=np.int64),
        "release_year": np.concatenate([[0], _bucket(item_side["release_year"], YEAR_EDGES, "release_year")]),
    }

    # Dense features from training positives only (never val/test): activity/popularity and
    # smoothed rating and like averages; users/items without training history get the mean.
    user_row_of = pd.Series(np.arange(num_user_rows), index=user_ids)
    position_of = pd.Series(np.arange(num_items), index=catalogue)
    pos_user_rows = user_row_of.loc[train_pos["user_id"].to_numpy()].to_numpy()
    pos_item_rows = position_of.loc[train_pos["item_id"].to_numpy()].to_numpy() + 1
    pos_ratings = train_pos["rating"].to_numpy(dtype=float)
    user_dense, item_dense = _dense_tables(pos_user_rows, pos_item_rows, pos_ratings, np.ones(len(pos_ratings), bool),
                                           num_user_rows, num_items + 1, warm_rows)

    if not dense_features:
        user_dense, item_dense = user_dense[:, :0], item_dense[:, :0]
    users = EntityTable({k: torch.from_numpy(v) for k, v in user_sparse.items()}, {}, torch.from_numpy(user_dense))
    items = EntityTable(
        {k: torch.from_numpy(v) for k, v in item_sparse.items()},
        {"genres": (torch.from_numpy(genre_values), torch.from_numpy(genre_offsets))},
        torch.from_numpy(item_dense),
    )
    features = [
        FeatureSpec("user_id", len(warm) + 1, False, "user"),
        FeatureSpec("age", len(AGE_EDGES) + 2, False, "user"),
        FeatureSpec("gender", gender_vocab.num_embeddings, False, "user"),
        FeatureSpec("occupation", occupation_vocab.num_embeddings, False, "user"),
        FeatureSpec("zip", zip_vocab.num_embeddings, False, "user"),
        FeatureSpec("item_id", num_items + 1, False, "item"),
        FeatureSpec("release_year", len(YEAR_EDGES) + 2, False, "item"),
        FeatureSpec("genres", genre_vocab.num_embeddings, True, "item"),
    ]
    if history_length is not None:
        features.append(FeatureSpec(HISTORY_FEATURE, num_items + 1, True, "user"))
    tasks = [TaskSpec("click", "binary"), TaskSpec("like", "binary"), TaskSpec("rating", "regression")]
    if ordinal_tasks:
        tasks += [TaskSpec(name, "binary") for name in ORDINAL_TASKS]

    pair_dense = None
    if rating_estimate is not None and rating_estimate not in RATING_ESTIMATES:
        raise ValueError(f"rating_estimate must be None or one of {sorted(RATING_ESTIMATES)}, got {rating_estimate!r}")
    if rating_estimate is not None:
        train_users = user_row_of.loc[train["user_id"].to_numpy()].to_numpy()
        train_items = position_of.loc[train["item_id"].to_numpy()].to_numpy() + 1
        positive = train["click"].to_numpy() == 1
        # a sampled negative belongs to the positive before it (PROTOCOL.md 3 row layout)
        owner = np.maximum.accumulate(np.where(positive, np.cumsum(positive) - 1, -1))
        if len(owner) and owner[0] < 0:
            raise ValueError("rating_estimate: the train split must start with a positive row")
        table, train_values = item_knn_estimates(pos_user_rows, pos_item_rows, pos_ratings, num_user_rows, num_items + 1,
                                                 train_users, train_items, owner,
                                                 with_baseline=rating_estimate == "estimate")
        mean, std = train_values.mean(), train_values.std()
        pair_dense = torch.from_numpy(((table - mean) / std).astype(np.float32)).unsqueeze(2)
        train_dense = torch.from_numpy(((train_values - mean) / std).astype(np.float32)).unsqueeze(1)

    split_rows = {}
    for name, frame in splits.items():
        labels = frame[["click", "like", "rating"]].to_numpy(dtype=np.float32)
        if ordinal_tasks:
            labels = np.concatenate([labels, ordinal_labels(labels[:, 2])], axis=1)
        labels = torch.from_numpy(labels)
        user_row = torch.tensor(user_row_of.loc[frame["user_id"].to_numpy()].to_numpy())
        item_row = torch.tensor(position_of.loc[frame["item_id"].to_numpy()].to_numpy() + 1)
        context_dense = None
        if pair_dense is not None:
            # train rows: out-of-fold (their positive's rating never enters); others: all of train
            context_dense = train_dense if name == "train" else pair_dense[user_row, item_row]
        split_rows[name] = SplitRows(
            user_row=user_row,
            item_row=item_row,
            labels=labels,
            context_dense=context_dense,
            extra={"timestamp": torch.tensor(frame["timestamp"].to_numpy(dtype=np.int64))},
        )

    history = None
    if history_length is not None:
        history = causal_user_history(
            {name: {"user_row": rows.user_row, "item_row": rows.item_row, "timestamp": rows.extra["timestamp"],
                    "positive": rows.labels[:, 0] == 1} for name, rows in split_rows.items()},
            num_user_rows, history_length, HISTORY_FEATURE)
    topk = _topk_sets(splits, user_row_of, position_of)
    # Negative pools per user row (PROTOCOL.md 3: catalogue items the user rated nowhere), as item rows.
    rated = np.zeros((num_user_rows, num_items + 1), dtype=bool)
    rated[user_row_of.loc[ratings["user_id"].to_numpy()].to_numpy(), position_of.loc[ratings["item_id"].to_numpy()].to_numpy() + 1] = True
    rated[:, 0] = True  # the unknown item is never a negative
    pool_users, pool_items = np.nonzero(~rated)
    pool_offsets = np.zeros(num_user_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(pool_users, minlength=num_user_rows), out=pool_offsets[1:])
    titles = [str(t) if isinstance(t, str) else str(i) for i, t in zip(catalogue, item_side["title"])]
    user_side_frame = users_raw.set_index("user_id")[["age", "gender", "occupation", "zip_code"]]
    return MultiTaskData(
        name=protocol.PROTOCOL_NAME,
        tasks=tasks,
        features=features,
        split_rows=split_rows,
        users=users,
        items=items,
        user_dense_names=USER_DENSE if dense_features else [],
        item_dense_names=ITEM_DENSE if dense_features else [],
        context_dense_names=[RATING_ESTIMATES[rating_estimate]] if rating_estimate is not None else [],
        pair_dense=pair_dense,
        history=history,
        user_ids=torch.from_numpy(user_ids),
        item_ids=torch.from_numpy(catalogue.astype(np.int64)),
        item_titles=titles,
        user_side_frame=user_side_frame,
        topk_sets=topk,
        negative_pools=(torch.from_numpy(pool_offsets), torch.from_numpy(pool_items.astype(np.int64))),
        user_encoder=encode_user_side,
        user_side_columns=("age", "gender", "occupation", "zip_code"),
        # fixed buckets are their own keys; the other features' keys are their values
        vocabularies={"age": list(range(len(AGE_EDGES) + 2)), "gender": gender_vocab.row_keys(),
                      "occupation": occupation_vocab.row_keys(), "zip": zip_vocab.row_keys(),
                      "release_year": list(range(len(YEAR_EDGES) + 2)), "genres": genre_vocab.row_keys()},
        info={"source": movielens.source, "path": str(movielens.path), "num_warm_users": len(warm),
              "num_cold_users": len(np.setdiff1d(np.unique(splits["test_cold"]["user_id"]), warm))
              if "test_cold" in splits else 0},
    )


def _topk_sets(splits: Dict[str, pd.DataFrame], user_row_of: pd.Series, position_of: pd.Series) -> Dict[str, TopKEval]:
    """PROTOCOL.md 5: val excludes train positives; test_warm excludes train + val; test_cold (and
    pseudo_cold) excludes nothing."""
    def positives(name):
        frame = splits[name]
        frame = frame[frame["click"].to_numpy() == 1]
        return user_row_of.loc[frame["user_id"].to_numpy()].to_numpy(), position_of.loc[frame["item_id"].to_numpy()].to_numpy()

    # pseudo_cold: warm users held out of training for cold-start selection (mtkernels.cold_start)
    seen = {"val": ["train"], "test_warm": ["train", "val"], "test_cold": [], "pseudo_cold": []}
    out = {}
    for name, excluded in seen.items():
        if name not in splits:
            continue
        rel_users, rel_items = positives(name)
        users = np.unique(rel_users)
        local = np.searchsorted(users, rel_users)
        relevant_offsets, relevant_indices = csr_from_pairs(local, rel_items, len(users))
        ex_users, ex_items = [], []
        for other in excluded:
            u, i = positives(other)
            keep = np.isin(u, users)
            ex_users.append(np.searchsorted(users, u[keep]))
            ex_items.append(i[keep])
        ex_users = np.concatenate(ex_users) if ex_users else np.zeros(0, np.int64)
        ex_items = np.concatenate(ex_items) if ex_items else np.zeros(0, np.int64)
        # A user may have rated nothing twice, but keep the CSR free of duplicates all the same.
        pairs = np.unique(np.stack([ex_users, ex_items], axis=1), axis=0) if len(ex_users) else np.zeros((0, 2), np.int64)
        exclude_offsets, exclude_indices = csr_from_pairs(pairs[:, 0], pairs[:, 1], len(users))
        out[name] = TopKEval(torch.from_numpy(users.astype(np.int64)), exclude_offsets, exclude_indices,
                             relevant_offsets, relevant_indices)
    return out


def ordinal_labels(ratings: np.ndarray) -> np.ndarray:
    """The cumulative binary labels of ratings 1..5 (NaN: unrated rows, e.g. sampled negatives):
    float32 ``[n, 3]``, columns ``rating >= k`` for k in `ORDINAL_THRESHOLDS` (2, 3, 5), NaN where
    the rating is NaN. With ``like`` (rating >= 4) they are the four cumulative links of an
    ordinal regression (CORAL, Cao et al., Pattern Recognit. Lett. 2020)."""
    ratings = np.asarray(ratings, dtype=np.float32)
    columns = [np.where(np.isnan(ratings), np.float32(np.nan), (ratings >= k).astype(np.float32))
               for k in ORDINAL_THRESHOLDS]
    return np.stack(columns, axis=1).astype(np.float32).reshape(len(ratings), len(ORDINAL_THRESHOLDS))


def load_ml100k_mtl_v1(data_dir: Optional[Union[str, Path]] = None, download: bool = False,
                       dense_features: bool = True, rating_estimate: Optional[str] = None,
                       history_length: Optional[int] = None, ordinal_tasks: bool = False) -> MultiTaskData:
    """MovieLens-100K under the `ml100k-mtl-v1` protocol (shared/data/PROTOCOL.md), encoded.

    The splits are rebuilt from the ratings (cold users, temporal split, 4 sampled negatives per
    positive) exactly as the canonical ``protocol_v1/*.csv`` files.

    Tasks: ``click`` (binary, all rows), ``like`` (binary, rating >= 4, positives only),
    ``rating`` (regression 1..5, positives only); NaN where a task has no label.

    Sparse features (id 0 = unknown): user side ``user_id`` (training users 1..849; cold users 0),
    ``age`` (MovieLens-1M's 7 age groups), ``gender``, ``occupation``, ``zip`` (first 2 characters);
    item side ``item_id`` (1..1682, ascending external id), ``release_year`` (decades before 1980,
    half-decades in the 1980s, years from 1990), ``genres`` (multi-valued, 19 genres). User-side
    vocabularies come from training users only.

    Dense features (8, standardised, from training positives only; `USER_DENSE` then `ITEM_DENSE`):
    user log1p(#ratings), smoothed mean rating and like rate (pseudo-count 10 towards the global
    mean), mean log-popularity of the user's rated items (all, and the last 10: users drift to
    rarer films over time); item log1p(#ratings), smoothed mean rating and like rate. Users or
    items without training history (cold users) get the mean, i.e. 0.

    Splits: ``train``, ``val``, ``test_warm``, ``test_cold``; ``topk_eval(split)`` for val,
    test_warm, test_cold; ``resample_negatives(seed)`` draws fresh training negatives by the
    protocol's pool rule (the protocol's fixed ones are the default).

    Args:
        data_dir: folder with the RecBole files (``ml-100k.inter/.user/.item``) or a GroupLens
            folder (``u.data/u.user/u.item``), directly or in its ``ml-100k/`` subfolder. Default
            ``$MTKERNELS_DATA``, else ``./.cache/data``.
        download: fetch the RecBole files from PyPI (recbole==1.2.1 wheel) when they are missing.
        dense_features: False drops the dense features (``dense_dim`` 0), e.g. for an ablation.
        rating_estimate: None (default) or add one per-(user, item) dense column (``dense_dim``
            + 1, last), standardised, from an item-kNN model of the training positives (Koren KDD
            2008; `mtkernels.data.neighbourhood`): ``"offset"`` its neighbourhood term (the
            user's residuals on the most similar items they rated; column ``item_knn_offset``),
            ``"estimate"`` baseline + neighbourhood (``item_knn_rating``). Training positives get
            5-fold out-of-fold values (their own rating never enters them), and each sampled
            negative the value from its positive's fold model; every other row (evaluation
            splits, ``pair_batch``, negatives drawn by ``resample_negatives``) the value from all
            training positives.
        history_length: None (default) or L >= 1: add the multi-valued user-side feature
            ``history`` (table of ``num_items + 1`` rows, mean-pooled like every bag): the user's
            implicit feedback as SVD++'s N(u) (Koren KDD 2008) / the YouTube DNN's watch history
            (Covington et al. RecSys 2016), *causal*: a train row sees the user's train positives
            strictly before it in ``(timestamp, item_id)`` order, its sampled negatives the same bag
            as their positive (a full-history bag would hold each positive's own item and never a
            negative's: a label leak); val rows the whole train history; test_warm rows train +
            val (PROTOCOL.md 4: earlier interactions of a warm user may be input); cold users an
            empty bag. Only the most recent L items are kept. Top-k ranking gives each user the
            history of the split ranked (val: train; test_warm and serving: train + val). Cut per
            batch from one sequence per user (`mtkernels.data.history`), never stored per row.
        ordinal_tasks: add three binary auxiliary tasks after ``rating``, ``rating_ge2``,
            ``rating_ge3``, ``rating_ge5`` (rating >= 2, >= 3, >= 5 on positives, NaN on negatives;
            `ordinal_labels`): with ``like`` the cumulative links of the rating (CORAL-style ordinal
            targets), more training signal from the ratings for the shared experts. Training signal
            only: train with ``TrainConfig(monitor_tasks=["click", "like", "rating"])`` so early
            stopping watches the protocol's tasks, which are scored as without them.

    Raises:
        FileNotFoundError: no ML-100K files found (the message says how to fetch them).
        ValueError: ``history_length < 1``.
    """
    return build_ml100k_mtl_v1(read_movielens_100k(data_dir, download=download), dense_features=dense_features,
                               rating_estimate=rating_estimate, history_length=history_length,
                               ordinal_tasks=ordinal_tasks)
