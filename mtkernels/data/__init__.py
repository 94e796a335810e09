"""Data sets for multi-task recommendation, encoded into tensors the models read directly.

- `load_ml100k_mtl_v1`: MovieLens-100K under the ``ml100k-mtl-v1`` protocol (click, like, rating;
  warm and cold-start test users), from the RecBole files (``python -m mtkernels.data.fetch``) or a
  GroupLens folder.
- `load_census_income`: Census-Income (KDD), the MMoE paper's two-task tabular set.
- `load_interactions`: any CSV/Parquet interaction log described by a small schema (dict or YAML).

Each returns a `MultiTaskData` (tasks, features, dense_dim, splits, ``batches()``, ``pair_batch()``,
``topk_eval()``); see `mtkernels.data.dataset`.
"""

from .census import load_census_income
from .dataset import EntityTable, MultiTaskData, SplitRows, gather_jagged
from .sources import default_data_dir, fetch_ml100k
from .interactions import load_interactions
from .movielens import MovieLens, load_ml100k_mtl_v1, read_movielens_100k, refit_dense_features
from .types import Batch, FeatureSpec, Split, TaskSpec, TopKEval, UserRows

__all__ = [
    "Batch", "EntityTable", "FeatureSpec", "MovieLens", "MultiTaskData", "Split", "SplitRows", "TaskSpec",
    "TopKEval", "UserRows", "default_data_dir", "fetch_ml100k", "gather_jagged", "load_census_income",
    "load_interactions", "load_ml100k_mtl_v1",
    "read_movielens_100k", "refit_dense_features",
]
