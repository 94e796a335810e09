"""mtkernels.metrics: hand-computed cases, NaN labels, -1 top-k entries, users without relevant items."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mtkernels import metrics
from mtkernels.data.types import TaskSpec, TopKEval

NAN = float("nan")


def csr(lists):
    offsets = np.cumsum([0] + [len(x) for x in lists])
    values = [v for x in lists for v in x]
    return torch.tensor(offsets), torch.tensor(values, dtype=torch.long)


def test_auc_skips_nan_labels_and_counts_ties_half():
    y = torch.tensor([0.0, 1.0, 1.0, 0.0, NAN])
    p = torch.tensor([0.1, 0.4, 0.35, 0.8, 0.9])
    assert metrics.auc(y, p) == pytest.approx(0.5)  # 2 of 4 (pos, neg) pairs ordered
    assert metrics.auc([0, 1, 1], [0.5, 0.5, 0.7]) == pytest.approx(0.75)  # one tie = 1/2
    assert math.isnan(metrics.auc([1, 1, NAN], [0.2, 0.3, 0.1]))  # one class only


def test_logloss_clips_and_skips_nan():
    assert metrics.logloss([1, 0, NAN], [0.8, 0.3, 0.5]) == pytest.approx((-math.log(0.8) - math.log(0.7)) / 2)
    assert metrics.logloss([1.0], [0.0]) == pytest.approx(-math.log(1e-7))
    assert metrics.logloss([0.0, 1.0], [0.0, 1.0]) == pytest.approx(-math.log(1 - 1e-7), rel=1e-6)
    assert math.isnan(metrics.logloss([NAN], [0.3]))


def test_rmse_raw_predictions():
    assert metrics.rmse(torch.tensor([3.0, NAN, 5.0]), torch.tensor([2.5, 100.0, 6.0])) == pytest.approx(math.sqrt(0.625))
    assert metrics.rmse([1.0], [7.5]) == pytest.approx(6.5)  # no clipping to the rating range
    with pytest.raises(ValueError, match="same number"):
        metrics.rmse([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        metrics.rmse([1.0], [NAN])


def test_ndcg_and_recall_hand_computed():
    topk = torch.tensor([[3, 1, 7], [-1, -1, -1], [4, 2, 0], [5, 8, 9]])
    relevant = csr([[1, 7, 9], [0], [], [5]])
    # user 0: hits at ranks 2 and 3, |R| = 3; user 1: nothing (-1 never hits); user 2 left out;
    # user 3: the one relevant item first.
    dcg0 = 1 / math.log2(3) + 1 / math.log2(4)
    idcg0 = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert metrics.ndcg_at_k(topk, relevant, 3) == pytest.approx((dcg0 / idcg0 + 0 + 1) / 3)
    assert metrics.recall_at_k(topk, relevant, 3) == pytest.approx((2 / 3 + 0 + 1) / 3)
    # k = 2 truncates the lists, and the IDCG to min(2, |R|) ones; recall divides by |R| regardless.
    assert metrics.ndcg_at_k(topk, relevant, 2) == pytest.approx(((1 / math.log2(3)) / (1 + 1 / math.log2(3)) + 0 + 1) / 3)
    assert metrics.recall_at_k(topk, relevant, 2) == pytest.approx((1 / 3 + 0 + 1) / 3)
    # A TopKEval works as the relevant CSR too; k defaults to the list width.
    sets = TopKEval(torch.arange(4), torch.zeros(5, dtype=torch.long), torch.zeros(0, dtype=torch.long), *relevant)
    assert metrics.ndcg_at_k(topk, sets) == metrics.ndcg_at_k(topk, relevant, 3)
    assert math.isnan(metrics.ndcg_at_k(topk[2:3], csr([[]])))


def test_recall_not_truncated_and_duplicates_counted_once():
    topk = torch.tensor([[0, 1]])
    assert metrics.recall_at_k(topk, csr([[0, 1, 2, 3]]), 2) == pytest.approx(0.5)
    assert metrics.ndcg_at_k(topk, csr([[0, 1, 2, 3]]), 2) == pytest.approx(1.0)
    assert metrics.recall_at_k(topk, csr([[1, 1]]), 2) == pytest.approx(1.0)


def brute_force(topk, lists, k):
    ndcg, recall = [], []
    for row, rel in zip(topk.tolist(), lists):
        rel = set(rel)
        if not rel:
            continue
        hits = [1.0 if item in rel else 0.0 for item in row[:k]]
        dcg = sum(h / math.log2(r + 2) for r, h in enumerate(hits))
        idcg = sum(1 / math.log2(r + 2) for r in range(min(k, len(rel))))
        ndcg.append(dcg / idcg)
        recall.append(sum(hits) / len(rel))
    return np.mean(ndcg), np.mean(recall)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_topk_metrics_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    num_users, num_items, width = 40, 30, 10
    topk = torch.from_numpy(np.stack([rng.permutation(num_items)[:width] for _ in range(num_users)]))
    topk[rng.random((num_users, width)) < 0.1] = -1
    lists = [sorted(rng.choice(num_items, size=rng.integers(0, 8), replace=False).tolist()) for _ in range(num_users)]
    for k in (1, 5, 10):
        ndcg, recall = brute_force(topk, lists, k)
        assert metrics.ndcg_at_k(topk, csr(lists), k) == pytest.approx(ndcg)
        assert metrics.recall_at_k(topk, csr(lists), k) == pytest.approx(recall)


def test_topk_errors():
    topk = torch.tensor([[0, 1]])
    with pytest.raises(ValueError, match="k must be"):
        metrics.ndcg_at_k(topk, csr([[0]]), 3)
    with pytest.raises(ValueError, match="offsets"):
        metrics.recall_at_k(topk, csr([[0], [1]]), 2)
    with pytest.raises(ValueError, match=r"\[U, k\]"):
        metrics.ndcg_at_k(torch.tensor([0, 1]), csr([[0]]), 1)


def test_task_metrics():
    tasks = [TaskSpec("click", "binary"), TaskSpec("rating", "regression")]
    labels = torch.tensor([[1.0, 4.0], [0.0, NAN], [1.0, 2.0], [0.0, NAN]])
    predictions = torch.tensor([[0.9, 3.5], [0.2, 9.0], [0.6, 2.0], [0.7, 0.0]])
    out = metrics.task_metrics(tasks, labels, predictions)
    assert set(out) == {"click_auc", "click_logloss", "rating_rmse"}
    assert out["click_auc"] == pytest.approx(0.75)
    assert out["rating_rmse"] == pytest.approx(math.sqrt(0.125))
    with pytest.raises(ValueError, match=r"\[n, 2\]"):
        metrics.task_metrics(tasks, labels[:, :1], predictions[:, :1])
