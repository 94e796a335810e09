"""`mtkernels.fusion.ScoreFusion`, its members (factorised catalogue scoring of multi-task models,
ItemKNN, EASE, SequentialRules), fused checkpoints served by `Ranker`, and the `mtkernels fuse` command."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mtkernels import cli
from mtkernels._extension import has_kernel
from mtkernels.catalogue import CatalogueScorer, user_table
from mtkernels.data import TopKEval
from mtkernels.fusion import CFMember, ModelMember, ScoreFusion
from mtkernels.nn import EASE, ItemKNN, MultiTaskModel, SequentialRules
from mtkernels.serving import Ranker, serving_tables
from mtkernels.training import TrainConfig, fit
from synthetic import make_data, one_thread, tiny_model  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def data():
    return make_data()


@pytest.fixture(scope="module")
def tables(data):
    return serving_tables(data)


def _pair_predictions(data, model, rows):
    batch = data.pair_batch(torch.as_tensor(rows))
    with torch.no_grad():
        return model.eval()(batch.sparse, batch.dense).reshape(len(rows), data.num_items, -1)


# --- factorised catalogue scoring ---------------------------------------------------------------
@pytest.mark.parametrize("backbone, kwargs", [
    ("shared_bottom", {"hidden": [8, 6]}),
    ("mmoe", {"num_experts": 3, "expert_hidden": [8]}),
    ("mmoe", {"num_experts": 2, "expert_hidden": [8, 5]}),
    ("ple", {"num_shared_experts": 1, "num_task_experts": 2, "expert_hidden": [8]}),
    ("ple", {"num_levels": 2, "num_shared_experts": 1, "num_task_experts": 1, "expert_hidden": [8]}),  # fallback
    ("esmm", {"hidden": [8]}),
])
@pytest.mark.parametrize("native", [None, False])  # the catalogue_score op (where built), the PyTorch path
def test_catalogue_scorer_equals_the_model_on_every_pair(data, tables, backbone, kwargs, native):
    torch.manual_seed(3)
    model = MultiTaskModel(data.features, data.dense_dim, data.tasks, backbone=backbone, embedding_dim=4,
                           backbone_kwargs=kwargs, tower_hidden=[5, 3])
    with torch.no_grad():  # non-trivial biases so the user/item split of the first layer is exercised
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    rows = list(data.topk_eval("test_warm").users[:5].tolist()) + list(data.topk_eval("test_cold").users[:2].tolist())
    expected = _pair_predictions(data, model, rows)
    scorer = CatalogueScorer(model, tables, users_per_block=3, native=native)  # PyTorch path: blocks of 3, 3, 1
    got = scorer.score(user_table(tables), torch.tensor(rows))
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
    factorised = backbone != "ple" or kwargs.get("num_levels", 1) == 1
    assert scorer._use_op() == (native is None and factorised and has_kernel("catalogue_score", "cpu"))
    # a subset of the tasks, in any order: only their towers run
    some = scorer.score(user_table(tables), torch.tensor(rows), ["rating", "click"])
    torch.testing.assert_close(some, expected[:, :, [2, 0]], atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown tasks"):
        scorer.score(user_table(tables), torch.tensor(rows), ["ctr"])
    assert scorer.score(user_table(tables), torch.zeros(0, dtype=torch.long)).shape == (0, data.num_items, 3)


# --- collaborative-filtering members ------------------------------------------------------------
def _interactions(data):
    train = data.splits["train"]
    positive = train.labels[:, 0] > 0
    rows, items = train.user_row[positive], train.item[positive] - 1
    x = torch.zeros(data.num_user_rows, data.num_items, dtype=torch.float64)
    x[rows, items] = 1.0
    return rows, items, x


def test_itemknn_is_pruned_cosine_over_the_history(data):
    rows, items, x = _interactions(data)
    knn = ItemKNN(data.num_items, neighbours=5).fit(rows, items, data.num_user_rows)
    sim = np.zeros((data.num_items, data.num_items))
    xn = x.numpy()
    for i in range(data.num_items):
        for j in range(data.num_items):
            denominator = math.sqrt(xn[:, i].sum() * xn[:, j].sum())
            if i != j and denominator > 0:
                sim[i, j] = (xn[:, i] * xn[:, j]).sum() / denominator
    kept = np.zeros_like(sim)
    for i in range(data.num_items):
        top = np.argsort(-sim[i], kind="stable")[:5]
        kept[i, top] = sim[i, top]
    # ties at the 5th neighbour may keep a different item of the same value: compare the values
    np.testing.assert_allclose(np.sort(knn.similarity().numpy(), axis=1), np.sort(kept, axis=1), atol=1e-6)
    users = torch.tensor([1, 2, 3, data.num_user_rows - 1, data.num_user_rows + 4])  # a cold row, an appended row
    scores = knn.score(None, users)[..., 0]
    expected = x[users.clamp_max(data.num_user_rows - 1)].float() @ knn.similarity()
    expected[-1] = 0.0
    torch.testing.assert_close(scores, expected)
    assert torch.all(scores[-2:] == 0)  # cold users have no training history
    pairs = knn.score_pairs(None, torch.tensor([2, 1, 2]), torch.tensor([0, 5, 7]))[:, 0]
    torch.testing.assert_close(pairs, torch.stack([scores[1, 0], scores[0, 5], scores[1, 7]]))


def test_ease_columns_are_ridge_regressions_on_the_other_items(data):
    rows, items, x = _interactions(data)
    ease = EASE(data.num_items, l2=3.0).fit(rows, items, data.num_user_rows)
    weight = ease.similarity().double()
    assert torch.all(weight.diagonal() == 0)
    for j in (0, 7, data.num_items - 1):
        others = [i for i in range(data.num_items) if i != j]
        a = x[:, others]
        solution = torch.linalg.solve(a.t() @ a + 3.0 * torch.eye(len(others), dtype=torch.float64), a.t() @ x[:, j])
        torch.testing.assert_close(weight[others, j], solution, atol=1e-5, rtol=1e-4)


def _plain_sequential_rules(histories, num_items, window, half_life, skip=None):
    """Plain-Python sequential rules: B from each time-ordered history, then recency-weighted scores."""
    counts = [[0.0] * num_items for _ in range(num_items)]
    for items in histories.values():
        for p, a in enumerate(items):
            for d in range(1, window + 1):
                if p + d < len(items):
                    counts[a][items[p + d]] += 1.0 / d
    b = [[c / sum(row) if sum(row) > 0 else 0.0 for c in row] for row in counts]
    scores = {}
    for user, items in histories.items():
        items = items[: len(items) - (skip or {}).get(user, 0)] if skip else items
        scores[user] = [sum(0.5 ** (k / half_life) * b[i][n] for k, i in enumerate(reversed(items))) for n in range(num_items)]
    return b, scores


@pytest.mark.parametrize("window, half_life", [(1, 1.0), (2, 3.0), (10, 0.5)])
def test_sequential_rules_equal_plain_python(window, half_life):
    # user row -> items in time order (timestamps below), with a repeated item kept at its last occurrence
    histories = {0: [3, 1, 4, 0], 1: [1, 4, 2], 2: [], 3: [4], 4: [0, 2, 1, 3, 5]}
    num_items, num_rows = 6, 5
    rows, items, times = [], [], []
    for user, sequence in histories.items():
        for t, item in enumerate(sequence):
            rows.append(user), items.append(item), times.append(100 * user + 10 * t)
    rows.append(1), items.append(4), times.append(5)  # an earlier duplicate of (1, 4): ignored
    shuffle = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))  # input order must not matter
    rows, items, times = (torch.tensor(v)[shuffle] for v in (rows, items, times))
    sr = SequentialRules(num_items, window=window, half_life=half_life).fit(rows, items, num_rows, order=times)
    b, scores = _plain_sequential_rules(histories, num_items, window, half_life)
    torch.testing.assert_close(sr.similarity(), torch.tensor(b, dtype=torch.float32))
    got = sr.score(None, torch.tensor([4, 0, 2, 1, 9]))[..., 0]  # 2: no history; 9: an appended row
    expected = torch.tensor([scores[4], scores[0], scores[2], scores[1], [0.0] * num_items])
    torch.testing.assert_close(got, expected)
    # the history without each row's last skip_recent items (gap-matched validation)
    skip = {4: 2, 0: 1, 2: 3, 1: 5}
    _, truncated = _plain_sequential_rules(histories, num_items, window, half_life, skip)
    got = sr.score(None, torch.tensor([4, 0, 2, 1]), skip_recent=torch.tensor([2, 1, 3, 5]))[..., 0]
    torch.testing.assert_close(got, torch.tensor([truncated[4], truncated[0], truncated[2], [0.0] * num_items]))
    torch.testing.assert_close(sr.score(None, torch.tensor([4, 0]), skip_recent=torch.zeros(2, dtype=torch.long)),
                               sr.score(None, torch.tensor([4, 0])))
    pairs = sr.score_pairs(None, torch.tensor([4, 0, 4]), torch.tensor([1, 5, 3]))[:, 0]
    torch.testing.assert_close(pairs, torch.tensor([scores[4][1], scores[0][5], scores[4][3]]))
    # a checkpoint round trip keeps the ordered histories
    again = SequentialRules.from_config(sr.config)
    again.load_state_dict(sr.state_dict())
    torch.testing.assert_close(again.score(None, torch.tensor([4, 0])), sr.score(None, torch.tensor([4, 0])))
    empty = SequentialRules(num_items).fit(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), 3)
    assert torch.all(empty.score(None, torch.tensor([0, 2])) == 0)


def test_order_free_members_ignore_the_order_but_skip_the_most_recent(data):
    rows, items, x = _interactions(data)
    order = torch.randperm(rows.numel(), generator=torch.Generator().manual_seed(1))
    plain = EASE(data.num_items, l2=3.0).fit(rows, items, data.num_user_rows)
    ordered = EASE(data.num_items, l2=3.0).fit(rows, items, data.num_user_rows, order=order)
    users = torch.arange(data.num_user_rows)
    torch.testing.assert_close(ordered.score(None, users), plain.score(None, users))
    # skip_recent drops each row's latest items by `order`
    user = int(rows[0])
    mine = order[rows == user]
    latest = items[rows == user][torch.argsort(mine)][-2:]
    history = x[user].clone()
    history[latest] = 0.0
    expected = history.float() @ ordered.similarity()
    got = ordered.score(None, torch.tensor([user]), skip_recent=torch.tensor([2]))[0, :, 0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_cf_bad_input():
    with pytest.raises(ValueError, match="num_items"):
        ItemKNN(0)
    with pytest.raises(ValueError, match="neighbours"):
        ItemKNN(5, neighbours=-1)
    with pytest.raises(ValueError, match="l2"):
        EASE(5, l2=0.0)
    with pytest.raises(ValueError, match="items: positions must be in"):
        ItemKNN(5).fit(torch.tensor([0]), torch.tensor([5]), 2)
    with pytest.raises(ValueError, match="user_rows must be in"):
        EASE(5).fit(torch.tensor([3]), torch.tensor([1]), 2)
    with pytest.raises(ValueError, match="same length"):
        EASE(5).fit(torch.tensor([0, 1]), torch.tensor([1]), 2)
    with pytest.raises(ValueError, match="window"):
        SequentialRules(5, window=0)
    with pytest.raises(ValueError, match="half_life"):
        SequentialRules(5, half_life=0.0)
    with pytest.raises(ValueError, match="order must have one value per pair"):
        SequentialRules(5).fit(torch.tensor([0, 1]), torch.tensor([1, 2]), 2, order=torch.tensor([3]))
    sr = SequentialRules(5).fit(torch.tensor([0, 0, 1]), torch.tensor([1, 2, 3]), 2)
    with pytest.raises(ValueError, match="skip_recent must hold 2 counts"):
        sr.score(None, torch.tensor([0, 1]), skip_recent=torch.tensor([1]))
    with pytest.raises(ValueError, match="skip_recent must hold 2 counts"):
        sr.score(None, torch.tensor([0, 1]), skip_recent=torch.tensor([1, -1]))


# --- fusion on stub members ---------------------------------------------------------------------
class _Fixed:
    """A member whose scores are fixed matrices ``[R, N, T]`` indexed by user row."""

    kind = "fixed"

    def __init__(self, name, scores, task_names=("click",), task_kinds=None):
        self.name, self.scores, self.task_names = name, scores, tuple(task_names)
        self.task_kinds = tuple(task_kinds or ["score"] * len(task_names))

    def score(self, users, rows, tasks=None):
        columns = [self.task_names.index(t) for t in (tasks or self.task_names)]
        return self.scores[torch.as_tensor(rows)][:, :, columns]

    def score_pairs(self, users, pair_users, pair_items):
        return self.scores[pair_users, pair_items]


def _reference_rank(scores, exclude, k):
    order = sorted((n for n in range(len(scores)) if n not in exclude and not math.isnan(scores[n])),
                   key=lambda n: (-scores[n], n))
    return order[:k]


def test_one_member_with_weight_one_is_that_members_ranking(data, tables):
    model = tiny_model(data, "mmoe").eval()
    member = ModelMember("mmoe", model, tables)
    fusion = ScoreFusion([member], ["like"], weights=[1.0], transforms="identity", tables=tables, users_per_block=2)
    evaluation = data.topk_eval("test_warm")
    values, indices = fusion.topk(evaluation.users, 7, evaluation.exclude_offsets, evaluation.exclude_indices)
    predictions = _pair_predictions(data, model, evaluation.users.tolist())[:, :, 1]
    for u in range(evaluation.users.numel()):
        exclude = set(evaluation.exclude_indices[evaluation.exclude_offsets[u]:evaluation.exclude_offsets[u + 1]].tolist())
        expected = _reference_rank(predictions[u].tolist(), exclude, 7)
        assert indices[u].tolist() == expected
        torch.testing.assert_close(values[u], predictions[u][expected], atol=2e-5, rtol=1e-5)
    # the default transform of a probability (logit, then standardised per user) is monotone per user
    default = ScoreFusion([member], ["like"], tables=tables)
    assert default.transforms == ["logit_zscore"]
    _, again = default.topk(evaluation.users, 3, evaluation.exclude_offsets, evaluation.exclude_indices)
    assert torch.equal(again, indices[:, :3])


@pytest.mark.parametrize("mode", ["weighted", "rrf"])
def test_a_member_of_weight_zero_is_not_scored(mode):
    torch.manual_seed(3)
    kept, dropped = _Fixed("kept", torch.randn(4, 30, 1)), _Fixed("dropped", torch.randn(4, 30, 1))

    def refuse(*args, **kwargs):
        raise AssertionError("a member whose every source has weight 0 was scored")

    both = ScoreFusion([kept, dropped], ["click"], weights=[1.0, 0.0], transforms="identity", mode=mode)
    alone = ScoreFusion([kept], ["click"], weights=[1.0], transforms="identity", mode=mode)
    expected = alone.topk(torch.arange(4), 5, users={})
    dropped.score = refuse
    got = both.topk(torch.arange(4), 5, users={})
    assert torch.equal(got[1], expected[1])
    torch.testing.assert_close(got[0], expected[0])


def test_rrf_equals_plain_python_reciprocal_rank_fusion():
    generator = torch.Generator().manual_seed(5)
    num_rows, num_items = 6, 13
    a = torch.randn(num_rows, num_items, 1, generator=generator)
    b = torch.randint(0, 4, (num_rows, num_items, 1), generator=generator).float()  # many ties
    c = torch.randn(num_rows, num_items, 2, generator=generator)
    members = [_Fixed("a", a), _Fixed("b", b), _Fixed("c", c, ("click", "like"))]
    weights = [0.5, 1.5, 0.25, 1.0]
    fusion = ScoreFusion(members, ["click", "like"], weights=weights, mode="rrf", rrf_c=10.0, users_per_block=4)
    assert fusion.source_names == ["a/click", "b/click", "c/click", "c/like"]
    rows = torch.tensor([5, 0, 3, 2, 1])
    exclude = [[1, 2], [], [12], [0, 3, 4], []]
    offsets = torch.tensor([0, 2, 2, 3, 6, 6])
    indices_ex = torch.tensor([i for e in exclude for i in e])
    values, indices = fusion.topk(rows, 5, offsets, indices_ex, users={})
    sources = [a[..., 0], b[..., 0], c[..., 0], c[..., 1]]
    for j, row in enumerate(rows.tolist()):
        fused = [0.0] * num_items
        for w, source in zip(weights, sources):
            ranked = sorted(range(num_items), key=lambda n: (-float(source[row, n]), n))
            for rank, n in enumerate(ranked, start=1):
                fused[n] += w / (10.0 + rank)
        expected = _reference_rank(fused, set(exclude[j]), 5)
        assert indices[j].tolist() == expected
        torch.testing.assert_close(values[j], torch.tensor([fused[n] for n in expected], dtype=torch.float32))


def _toy_validation(true_scores, relevant_per_user):
    """A stand-in for MultiTaskData with only what fit_weights(objective="ndcg@10") reads."""
    num_users, num_items = true_scores.shape
    relevant = torch.topk(true_scores, relevant_per_user, dim=1).indices.sort(dim=1).values
    evaluation = TopKEval(
        users=torch.arange(num_users), exclude_offsets=torch.zeros(num_users + 1, dtype=torch.long),
        exclude_indices=torch.zeros(0, dtype=torch.long),
        relevant_offsets=torch.arange(0, (num_users + 1) * relevant_per_user, relevant_per_user),
        relevant_indices=relevant.reshape(-1))
    return SimpleNamespace(topk_eval=lambda split: evaluation)


def test_fit_weights_recovers_a_known_mixture():
    generator = torch.Generator().manual_seed(0)
    num_users, num_items = 60, 40
    a = torch.randn(num_users, num_items, generator=generator)
    b = torch.randn(num_users, num_items, generator=generator)
    noise = torch.randn(num_users, num_items, generator=generator)
    validation = _toy_validation(0.7 * a + 0.3 * b, relevant_per_user=10)
    members = [_Fixed("a", a[..., None]), _Fixed("noise", noise[..., None]), _Fixed("b", b[..., None])]
    fusion = ScoreFusion(members, ["click"], transforms="identity")
    report = fusion.fit_weights(validation, seed=1)
    w = dict(zip(fusion.source_names, fusion.weights))
    assert report["val_fitted"] > 0.99 > report["val_equal_weights"]
    assert w["noise/click"] == 0.0
    assert sum(fusion.weights) == pytest.approx(1.0)
    assert w["a/click"] / (w["a/click"] + w["b/click"]) == pytest.approx(0.7, abs=0.05)
    # deterministic for a seed
    again = ScoreFusion(members, ["click"], transforms="identity")
    again.fit_weights(validation, seed=1)
    assert again.weights == fusion.weights


def test_source_selection_and_bad_input():
    a = _Fixed("a", torch.randn(3, 5, 2), ("click", "rating"), ("binary", "regression"))
    b = _Fixed("b", torch.randn(3, 5, 1))
    fusion = ScoreFusion({"a": a, "b": b}, {"a": ["rating", "click"], "b": ["click"]})
    assert fusion.source_names == ["a/rating", "a/click", "b/click"]
    assert fusion.transforms == ["zscore", "logit_zscore", "zscore"]
    assert fusion.weights == pytest.approx([1 / 3] * 3)
    fusion.set_weights({"b/click": 2.0})
    assert fusion.weights == [0.0, 0.0, 2.0]
    with pytest.raises(ValueError, match="at least one member"):
        ScoreFusion([], ["click"])
    with pytest.raises(ValueError, match="unique"):
        ScoreFusion([a, a], ["click"])
    with pytest.raises(ValueError, match="select no"):
        ScoreFusion([a, b], ["like"])
    with pytest.raises(ValueError, match="unknown members"):
        ScoreFusion([a, b], {"c": ["click"]})
    with pytest.raises(ValueError, match="has no task 'like'"):
        ScoreFusion([a, b], {"a": ["like"]})
    with pytest.raises(ValueError, match="one weight per source"):
        ScoreFusion([a, b], ["click"], weights=[1.0])
    with pytest.raises(ValueError, match="finite"):
        ScoreFusion([a, b], ["click"], weights=[1.0, math.nan])
    with pytest.raises(ValueError, match="unknown sources"):
        ScoreFusion([a, b], ["click"], weights={"z/click": 1.0})
    with pytest.raises(ValueError, match="unknown transform"):
        ScoreFusion([a, b], ["click"], transforms="softmax")
    with pytest.raises(ValueError, match="one name per source"):
        ScoreFusion([a, b], ["click"], transforms=["zscore"])
    with pytest.raises(ValueError, match="mode must be"):
        ScoreFusion([a, b], ["click"], mode="max")
    with pytest.raises(ValueError, match="rrf_c"):
        ScoreFusion([a, b], ["click"], mode="rrf", rrf_c=-1.0)
    fusion = ScoreFusion([a, b], ["click"])
    with pytest.raises(ValueError, match="k must be"):
        fusion.topk(torch.tensor([0]), -1, users={})
    with pytest.raises(ValueError, match="together"):
        fusion.topk(torch.tensor([0]), 2, exclude_offsets=torch.tensor([0, 0]), users={})
    with pytest.raises(ValueError, match="len\\(rows\\) \\+ 1"):
        fusion.topk(torch.tensor([0]), 2, torch.tensor([0]), torch.zeros(0, dtype=torch.long), users={})
    with pytest.raises(ValueError, match="exclude_indices"):  # the op's own check, item out of range
        fusion.topk(torch.tensor([0]), 2, torch.tensor([0, 1]), torch.tensor([9]), users={})
    with pytest.raises(ValueError, match="objective must be"):
        fusion.fit_weights(None, objective="auc")
    with pytest.raises(ValueError, match="serving tables"):
        fusion.recommend([1], k=2)
    with pytest.raises(ValueError, match="no serving tables"):
        fusion.topk(torch.tensor([0]), 2)


# --- real members: fitted weights, checkpoints, Ranker, command line ------------------------------
@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fusion")
    paths = {}
    for backbone in ("mmoe", "shared_bottom"):
        model = tiny_model(data, backbone)
        paths[backbone] = str(folder / f"{backbone}.pt")
        fit(model, data, TrainConfig(epochs=2, batch_size=64, lr=1e-2, progress=False, patience=0),
            checkpoint_path=paths[backbone], checkpoint_extra={"serving": serving_tables(data)})
    return folder, paths


def test_fused_checkpoint_round_trips_and_ranker_serves_it(data, tables, trained):
    from mtkernels.fusion import model_member_from_checkpoint

    folder, paths = trained
    members = [model_member_from_checkpoint(p)[0] for p in paths.values()]
    members += [CFMember.fit(data, "ease", l2=5.0), CFMember.fit(data, "itemknn", neighbours=5),
                CFMember.fit(data, "sr", window=3, half_life=2.0)]
    fusion = ScoreFusion(members, ["click", "rating"], tables=tables, users_per_block=5)
    report = fusion.fit_weights(data, seed=0, rounds=2, gap_matched=True)
    assert report["val_fitted"] >= report["val_equal_weights"] and report["gap_matched"]
    assert sum(fusion.weights) == pytest.approx(1.0) and min(fusion.weights) >= 0
    path = str(folder / "fused.pt")
    fusion.save(path)

    loaded = ScoreFusion.load(path)
    assert loaded.source_names == fusion.source_names
    assert loaded.weights == fusion.weights and loaded.transforms == fusion.transforms
    assert loaded.fit_report["val_fitted"] == report["val_fitted"]
    evaluation = data.topk_eval("test_warm")
    before = fusion.topk(evaluation.users, 5, evaluation.exclude_offsets, evaluation.exclude_indices)
    after = loaded.topk(evaluation.users, 5, evaluation.exclude_offsets, evaluation.exclude_indices)
    assert torch.equal(before[1], after[1])
    torch.testing.assert_close(before[0], after[0])

    ranker = Ranker.load(path)
    warm = [int(data.user_ids[r]) for r in evaluation.users[:4].tolist()]
    cold = int(data.user_ids[int(data.topk_eval("test_cold").users[0])])
    result = ranker.recommend(warm + [cold, 99999], k=5)
    assert result.served_by == ["model"] * 4 + ["side_features", "popularity"]
    direct = fusion.recommend(warm + [cold, 99999], k=5)
    assert torch.equal(result.item_ids, direct.item_ids)
    expected_ids = torch.where(before[1][:4] >= 0, data.item_ids[before[1][:4].clamp_min(0)], before[1][:4])
    assert torch.equal(result.item_ids[:4], expected_ids)  # the ranker's lists are the fusion's top-k
    with pytest.raises(ValueError, match="task_weights does not apply"):
        ranker.recommend(warm, k=5, task_weights={"click": 1.0})
    with pytest.raises(ValueError, match="not a fused one"):
        ScoreFusion.load(paths["mmoe"])


def test_logistic_stacking_gives_a_click_probability(data, tables, trained):
    from mtkernels.fusion import model_member_from_checkpoint
    from mtkernels.metrics import logloss

    _, paths = trained
    members = [model_member_from_checkpoint(p)[0] for p in paths.values()] + [CFMember.fit(data, "ease", l2=5.0)]
    fusion = ScoreFusion(members, ["click"], tables=tables)
    report = fusion.fit_weights(data, objective="logloss", seed=0)
    assert fusion.transforms == ["logit", "logit", "identity"]
    val = data.splits["val"]
    p = fusion.click_probability(val.user_row, val.item - 1)
    assert torch.all((p > 0) & (p < 1))
    assert report["val_logloss"] == pytest.approx(logloss(val.labels[:, 0].double().numpy(), p.double().numpy()), abs=1e-5)
    # stacking fits the val labels at least as well as the best member's own click probability
    singles = [logloss(val.labels[:, 0].double().numpy(), m.score_pairs(user_table(tables), val.user_row, val.item - 1)[:, 0].double().numpy())
               for m in members[:2]]
    assert report["val_logloss"] <= min(singles) + 1e-9


def test_gap_matched_weights_score_val_without_the_last_val_count_items(data, tables):
    from mtkernels import metrics, ops

    sr = CFMember.fit(data, "sr", window=4, half_life=1.0)
    ease = CFMember.fit(data, "ease", l2=5.0)
    evaluation = data.topk_eval("val")
    gap = evaluation.relevant_offsets[1:] - evaluation.relevant_offsets[:-1]
    assert int(gap.max()) > 0

    def val_ndcg(member, skip):
        scores = member.score(None, evaluation.users, skip_recent=skip)[..., 0].contiguous()
        _, indices = ops.ensemble_topk(scores[None], [1.0], 10, exclude_offsets=evaluation.exclude_offsets,
                                       exclude_indices=evaluation.exclude_indices)
        return metrics.ndcg_at_k(indices, evaluation.relevant, 10)

    for gap_matched in (False, True):
        fusion = ScoreFusion([sr, ease], ["click"], transforms="identity", tables=tables)
        report = fusion.fit_weights(data, seed=0, rounds=1, gap_matched=gap_matched)
        skip = gap if gap_matched else None
        assert report["gap_matched"] is gap_matched
        assert report["val_single_sources"]["sr/click"] == pytest.approx(val_ndcg(sr.cf, skip), abs=1e-12)
        assert report["val_single_sources"]["ease/click"] == pytest.approx(val_ndcg(ease.cf, skip), abs=1e-12)
    # serving and the test metrics use the whole history
    alone = ScoreFusion([sr], ["click"], weights=[1.0], transforms="identity", tables=tables)
    torch.testing.assert_close(alone.source_scores(None, evaluation.users)[0][0], sr.cf.score(None, evaluation.users)[..., 0])
    with pytest.raises(ValueError, match="gap_matched applies to the ndcg@10 objective only"):
        fusion.fit_weights(data, objective="logloss", gap_matched=True)


def test_fuse_command_writes_a_checkpoint_that_recommend_and_evaluate_read(data, trained, monkeypatch, capsys):
    import mtkernels.data

    folder, paths = trained
    monkeypatch.setattr(mtkernels.data, "load_ml100k_mtl_v1", lambda data_dir=None: data)
    out = str(folder / "cli-fused.pt")
    assert cli.main(["fuse", "--member", paths["mmoe"] + "=m", "--member", paths["shared_bottom"], "--cf", "itemknn", "sr",
                     "--out", out, "--evaluate", "test_warm"]) == 0
    text = capsys.readouterr().out
    assert "m/click" in text and "shared_bottom/click" in text and "itemknn/click" in text and "sr/click" in text
    assert "test_warm: ndcg@10" in text
    assert ScoreFusion.load(out).fit_report["gap_matched"] is True
    user = int(data.user_ids[int(data.topk_eval("test_warm").users[0])])
    assert cli.main(["recommend", "--checkpoint", out, "--user", str(user), "--k", "3"]) == 0
    assert "served by model" in capsys.readouterr().out
    assert cli.main(["evaluate", "--checkpoint", out, "--split", "test_warm", "--json"]) == 0
    assert "ndcg@10" in capsys.readouterr().out
    assert cli.main(["fuse", "--out", out]) == 2
    assert "at least one --member" in capsys.readouterr().err
    # a cold-start checkpoint is not a member (its catalogue scoring is the wrapped model's): a clear error
    from mtkernels.cold_start import ColdStartModel, cold_start_checkpoint, fit_item_prior, item_prior_for
    from mtkernels.training import build_model, load_checkpoint, save_checkpoint

    prior = fit_item_prior(item_prior_for(data, ("age",)), data, epochs=1)
    cold = str(folder / "cold.pt")
    save_checkpoint(cold, cold_start_checkpoint(ColdStartModel(build_model(load_checkpoint(paths["mmoe"])), prior, 1.0), data))
    assert cli.main(["fuse", "--member", cold, "--cf", "none", "--out", out]) == 2
    assert "is not a checkpoint of `mtkernels train`" in capsys.readouterr().err


def test_members_of_another_data_set_are_refused_by_name(data, tables):
    # a member trained on another catalogue (or other users) would be scored with this data set's rows:
    # a KeyError on a missing feature at best, silently wrong items at worst
    other = make_data(num_items=20, seed=1)
    model = MultiTaskModel(other.features, other.dense_dim, other.tasks, backbone="mmoe", embedding_dim=4,
                           backbone_kwargs={"num_experts": 2, "expert_hidden": [8]}, tower_hidden=[5])
    stranger = ModelMember("stranger", model, serving_tables(other))
    with pytest.raises(ValueError, match="member 'stranger' was trained on another data set: its item_ids differ"):
        ScoreFusion([stranger], tasks=["click"], tables=tables)
    ScoreFusion([ModelMember("own", model, serving_tables(other))], tasks=["click"], tables=serving_tables(other))


def test_logistic_stacking_refuses_reciprocal_rank_fusion(data, tables, trained):
    # rrf ranks by reciprocal ranks and ignores transforms: the stacking's coefficients (some negative)
    # would silently weight ranks instead of the logits they were fitted on
    from mtkernels.fusion import model_member_from_checkpoint

    _, paths = trained
    members = [model_member_from_checkpoint(p)[0] for p in paths.values()]
    fusion = ScoreFusion(members, ["click"], mode="rrf", tables=tables)
    with pytest.raises(ValueError, match="objective 'logloss' needs mode 'weighted'"):
        fusion.fit_weights(data, objective="logloss", seed=0)
    assert fusion.objective is None


def test_a_member_without_any_of_the_listed_tasks_is_named():
    # `mtkernels fuse --tasks rating --cf sr` fused the model alone: the SequentialRules member (task
    # click) was silently left out
    a = _Fixed("a", torch.randn(3, 5, 2), ("click", "rating"), ("binary", "regression"))
    sr = _Fixed("sr", torch.randn(3, 5, 1))
    with pytest.raises(ValueError, match=r"member 'sr' has none of the tasks \['rating'\] \(its tasks: \['click'\]\)"):
        ScoreFusion([a, sr], ["rating"])
    assert ScoreFusion([a, sr], ["rating", "click"]).source_names == ["a/rating", "a/click", "sr/click"]
    assert ScoreFusion([a, sr], {"a": ["rating"]}).source_names == ["a/rating"]  # a mapping leaves members out on purpose
