"""Small synthetic MovieLens-like folders (GroupLens and RecBole layouts) for the data tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from mtkernels.data.movielens import GROUPLENS_GENRES

OCCUPATIONS = ["artist", "doctor", "engineer", "student", "writer"]


def synthetic_movielens(num_users: int = 30, num_items: int = 60, seed: int = 0):
    """(ratings, users, items) frames with >= 20 ratings per user, tied timestamps, a Latin-1 title."""
    rng = np.random.default_rng(seed)
    rows = []
    for user in range(1, num_users + 1):
        count = int(rng.integers(20, 31))
        items = rng.choice(np.arange(1, num_items + 1), size=count, replace=False)
        base = 880_000_000 + int(rng.integers(0, 10_000))
        # Several ratings share a timestamp: the protocol breaks those ties by item id.
        stamps = base + np.sort(rng.integers(0, 6, size=count)) * 1000
        for item, stamp in zip(items, stamps):
            rows.append((user, int(item), int(rng.integers(1, 6)), int(stamp)))
    ratings = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"]).sample(frac=1.0, random_state=seed)
    users = pd.DataFrame({
        "user_id": np.arange(1, num_users + 1),
        "age": rng.integers(10, 70, size=num_users),
        "gender": rng.choice(["M", "F"], size=num_users),
        "occupation": rng.choice(OCCUPATIONS, size=num_users),
        "zip_code": [f"{z:05d}" for z in rng.integers(0, 99999, size=num_users)],
    })
    genre_flags = rng.random((num_items, len(GROUPLENS_GENRES))) < 0.15
    years = rng.integers(1930, 1999, size=num_items)
    titles = [f"Film {i}" for i in range(1, num_items + 1)]
    titles[0] = "Café Olé"  # Latin-1 in the GroupLens file
    items = pd.DataFrame({
        "item_id": np.arange(1, num_items + 1),
        "title": titles,
        "release_year": years.astype(float),
        "genres": [[g for g, on in zip(GROUPLENS_GENRES, row) if on] for row in genre_flags],
    })
    items.loc[num_items - 1, "release_year"] = np.nan  # one unknown year, as in ml-100k
    return ratings, users, items


def write_grouplens(folder: Path, ratings, users, items, with_genre_file: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    ratings.to_csv(folder / "u.data", sep="\t", header=False, index=False, encoding="latin-1")
    users.to_csv(folder / "u.user", sep="|", header=False, index=False, encoding="latin-1")
    lines = []
    for row in items.itertuples(index=False):
        date = "" if np.isnan(row.release_year) else f"01-Jan-{int(row.release_year)}"
        title = row.title if np.isnan(row.release_year) else f"{row.title} ({int(row.release_year)})"
        flags = ["1" if g in row.genres else "0" for g in GROUPLENS_GENRES]
        lines.append("|".join([str(row.item_id), title, date, "", "http://example.invalid/x"] + flags))
    (folder / "u.item").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    if with_genre_file:
        text = "".join(f"{g}|{i}\n" for i, g in enumerate(GROUPLENS_GENRES)) + "\n"
        (folder / "u.genre").write_bytes(text.encode("latin-1"))
    return folder


def write_recbole(folder: Path, ratings, users, items) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    inter = ratings.rename(columns={"user_id": "user_id:token", "item_id": "item_id:token",
                                    "rating": "rating:float", "timestamp": "timestamp:float"})
    inter.to_csv(folder / "ml-100k.inter", sep="\t", index=False)
    users.rename(columns=lambda c: f"{c}:token").to_csv(folder / "ml-100k.user", sep="\t", index=False)
    item = pd.DataFrame({
        "item_id:token": items["item_id"],
        "movie_title:token_seq": items["title"],
        "release_year:token": [("" if np.isnan(y) else str(int(y))) for y in items["release_year"]],
        "class:token_seq": [" ".join(g) for g in items["genres"]],
    })
    item.to_csv(folder / "ml-100k.item", sep="\t", index=False)
    return folder
