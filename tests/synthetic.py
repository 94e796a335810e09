"""A tiny synthetic ml100k-like data set (a few hundred rows) built with `mtkernels.data`'s own
classes, for fast training, checkpoint, serving and CLI tests.

Users (warm and cold) and items have latent tastes; a user's positives are the items closest to
its taste, each positive followed by 4 sampled negatives (click 0, like/rating NaN), like = rating
>= 4. Per user, positives split in time order into train / val / test_warm; cold users' rows go
to test_cold only, with the unknown user_id 0 (as PROTOCOL.md §2 asks).
"""

from __future__ import annotations

import numpy as np
import torch

from mtkernels.data import EntityTable, FeatureSpec, MultiTaskData, SplitRows, TaskSpec, TopKEval


def _csr(groups, values, num_groups):
    groups = np.asarray(groups, dtype=np.int64)
    values = np.asarray(values, dtype=np.int64)
    order = np.lexsort((values, groups))
    offsets = np.zeros(num_groups + 1, dtype=np.int64)
    np.cumsum(np.bincount(groups, minlength=num_groups), out=offsets[1:])
    return torch.from_numpy(offsets), torch.from_numpy(values[order].copy())


def make_data(num_warm: int = 24, num_cold: int = 4, num_items: int = 30, positives: int = 6, seed: int = 0,
              age_taste: bool = False, timestamps: bool = False) -> MultiTaskData:
    """``age_taste=True``: a user's taste is mostly its age group's (so side features predict it).
    ``timestamps=True``: every split gets a ``timestamp`` column (seconds): user row r's j-th
    positive (and its negatives) at day ``7 * j + r`` after 1,000,000 s, so users arrive on different days."""
    rng = np.random.default_rng(seed)
    num_users = num_warm + num_cold
    user_taste = rng.normal(size=(num_users + 1, 3))
    item_taste = rng.normal(size=(num_items + 1, 3))
    # user rows: 0 unknown, 1..num_warm warm, then cold; external ids 101.. for realism
    user_ids = np.concatenate([[-1], 101 + np.arange(num_users)])
    user_id_feature = np.concatenate([[0], np.arange(1, num_warm + 1), np.zeros(num_cold, dtype=np.int64)])
    age = np.concatenate([[0], rng.integers(1, 4, size=num_users)])
    if age_taste:  # no extra draws: the default data set stays the same
        centres = np.array([[0.0, 0.0, 0.0], [2.5, 0.0, 0.0], [-2.5, 0.0, 0.0], [0.0, 2.5, 0.0]])
        user_taste = centres[age] + 0.3 * user_taste
    users = EntityTable(
        {"user_id": torch.from_numpy(user_id_feature), "age": torch.from_numpy(age)},
        {},
        torch.from_numpy(user_taste[:, :1].astype(np.float32)),
    )
    genre_lists = [[]] + [list(rng.choice(np.arange(1, 5), size=rng.integers(1, 3), replace=False)) for _ in range(num_items)]
    genre_offsets = np.zeros(num_items + 2, dtype=np.int64)
    np.cumsum([len(g) for g in genre_lists], out=genre_offsets[1:])
    items = EntityTable(
        {"item_id": torch.arange(num_items + 1)},
        {"genres": (torch.tensor([g for lst in genre_lists for g in lst], dtype=torch.long), torch.from_numpy(genre_offsets))},
        torch.from_numpy(item_taste[:, :1].astype(np.float32)),
    )
    features = [
        FeatureSpec("user_id", num_warm + 1, False, "user"),
        FeatureSpec("age", 4, False, "user"),
        FeatureSpec("item_id", num_items + 1, False, "item"),
        FeatureSpec("genres", 5, True, "item"),
    ]
    tasks = [TaskSpec("click", "binary"), TaskSpec("like", "binary"), TaskSpec("rating", "regression")]

    rows = {s: [] for s in ("train", "val", "test_warm", "test_cold")}
    positives_of = {s: [] for s in rows}
    for row in range(1, num_users + 1):
        affinity = item_taste[1:] @ user_taste[row]
        chosen = np.argsort(-affinity)[:positives] + 1  # item rows
        unrated = np.setdiff1d(np.arange(1, num_items + 1), chosen)
        order = rng.permutation(chosen)
        for j, item in enumerate(order):
            if row > num_warm:
                split = "test_cold"
            else:
                split = "train" if j < positives - 2 else ("val" if j == positives - 2 else "test_warm")
            rating = float(np.clip(np.round(3 + affinity[item - 1] + rng.normal(scale=0.5)), 1, 5))
            rows[split].append((row, item, 1.0, float(rating >= 4), rating, 1_000_000 + 86_400 * (7 * j + row)))
            positives_of[split].append((row, item - 1))
            for negative in rng.choice(unrated, size=4):
                rows[split].append((row, int(negative), 0.0, np.nan, np.nan, 1_000_000 + 86_400 * (7 * j + row)))
    split_rows = {}
    for split, records in rows.items():
        a = np.array(records, dtype=np.float64)
        split_rows[split] = SplitRows(
            user_row=torch.from_numpy(a[:, 0].astype(np.int64)),
            item_row=torch.from_numpy(a[:, 1].astype(np.int64)),
            labels=torch.from_numpy(a[:, 2:5].astype(np.float32)),
            extra={"timestamp": torch.from_numpy(a[:, 5].astype(np.int64))} if timestamps else {},
        )

    def topk(split, excluded):
        rel = np.array(positives_of[split], dtype=np.int64)
        users_ = np.unique(rel[:, 0])
        rel_off, rel_idx = _csr(np.searchsorted(users_, rel[:, 0]), rel[:, 1], len(users_))
        ex = [np.array(positives_of[s], dtype=np.int64).reshape(-1, 2) for s in excluded]
        ex = np.concatenate(ex) if ex else np.zeros((0, 2), dtype=np.int64)
        ex = ex[np.isin(ex[:, 0], users_)]
        ex_off, ex_idx = _csr(np.searchsorted(users_, ex[:, 0]), ex[:, 1], len(users_))
        return TopKEval(torch.from_numpy(users_), ex_off, ex_idx, rel_off, rel_idx)

    topk_sets = {"val": topk("val", ["train"]), "test_warm": topk("test_warm", ["train", "val"]),
                 "test_cold": topk("test_cold", [])}
    import pandas as pd

    side = pd.DataFrame({"age": age[1:] * 10, "gender": ["M"] * num_users}, index=pd.Index(user_ids[1:], name="user_id"))
    return MultiTaskData(
        name="synthetic", tasks=tasks, features=features, split_rows=split_rows, users=users, items=items,
        user_dense_names=["user_taste"], item_dense_names=["item_taste"],
        user_ids=torch.from_numpy(user_ids), item_ids=torch.arange(1, num_items + 1) * 10,
        item_titles=[f"movie {i}" for i in range(1, num_items + 1)], user_side_frame=side, topk_sets=topk_sets,
    )


def fused_embedding_optimizer():
    """The fused row-wise Adagrad config when this build has it, else None (dense Adam)."""
    from mtkernels import ops

    if hasattr(ops, "FusedEmbeddingOptimizer"):
        return {"kind": "rowwise_adagrad", "lr": 0.1, "eps": 1e-8}
    return None


def tiny_model(data, backbone: str = "mmoe", seed: int = 0):
    """A small MultiTaskModel for ``data`` (fused embedding optimiser when available)."""
    from mtkernels.nn import MultiTaskModel

    kwargs = {
        "mmoe": {"num_experts": 2, "expert_hidden": [8]},
        "ple": {"num_shared_experts": 1, "num_task_experts": 1, "expert_hidden": [8]},
        "shared_bottom": {"hidden": [8]},
        "esmm": {"hidden": [8]},
    }[backbone]
    torch.manual_seed(seed)
    return MultiTaskModel(data.features, data.dense_dim, data.tasks, backbone=backbone, embedding_dim=4,
                          backbone_kwargs=kwargs, tower_hidden=[4], embedding_optimizer=fused_embedding_optimizer())


import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run faster on one thread (and do not spin against other processes); restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
