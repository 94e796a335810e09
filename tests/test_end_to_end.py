"""End to end on a tiny synthetic data set (a few hundred rows): train, checkpoint, reload with
identical predictions, resume exactly, loss weightings, and the evaluation's top-k path."""

import math

import numpy as np
import pytest
import torch

from mtkernels import evaluation
from mtkernels.training import TrainConfig, build_model, fit, load_checkpoint
from synthetic import make_data, one_thread, tiny_model  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def data():
    return make_data()


def _config(**kw):
    values = dict(epochs=2, batch_size=64, lr=1e-2, progress=False, patience=0, seed=3)
    values.update(kw)
    return TrainConfig(**values)


def _first_batch_loss(model, data):
    from mtkernels.training import masked_task_losses

    model.train()
    batch = next(data.batches("train", 10_000))
    with torch.no_grad():
        return float(masked_task_losses(model(batch.sparse, batch.dense), batch.labels, data.tasks).sum())


@pytest.mark.parametrize("backbone", ["shared_bottom", "mmoe", "ple"])
def test_train_save_reload_identical_predictions(data, tmp_path, backbone):
    model = tiny_model(data, backbone)
    before = _first_batch_loss(model, data)
    path = str(tmp_path / "model.pt")
    result = fit(model, data, _config(epochs=3), checkpoint_path=path)
    assert len(result.history) == 3 and 0 <= result.best_epoch < 3
    assert result.seconds_per_epoch > 0
    assert _first_batch_loss(model, data) < before  # it learned
    model.eval()
    expected = evaluation.predict(model, data, "test_warm")
    assert expected.shape == (data.splits["test_warm"].num_rows, 3)
    assert torch.isfinite(expected).all()
    assert ((expected[:, :2] > 0) & (expected[:, :2] < 1)).all()

    checkpoint = load_checkpoint(path)
    assert checkpoint["trainer"]["epoch"] == 2 and checkpoint["tasks"][2] == {"name": "rating", "kind": "regression"}
    reloaded = build_model(checkpoint, best=True)
    assert torch.equal(evaluation.predict(reloaded, data, "test_warm"), expected)


def test_resume_equals_uninterrupted_run(data, tmp_path):
    straight = tiny_model(data, "mmoe", seed=1)
    fit(straight, data, _config(epochs=3))
    straight_state = straight.state_dict()

    path = str(tmp_path / "resume.pt")
    first = tiny_model(data, "mmoe", seed=1)
    fit(first, data, _config(epochs=1), checkpoint_path=path)
    resumed = tiny_model(data, "mmoe", seed=99)  # different init: the checkpoint overrides it
    result = fit(resumed, data, _config(epochs=3), checkpoint_path=path, resume=True)
    assert result.resumed_from_epoch == 0 and len(result.history) == 3
    for key, value in straight_state.items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_resume_refuses_another_model(data, tmp_path):
    path = str(tmp_path / "a.pt")
    fit(tiny_model(data, "mmoe"), data, _config(epochs=1), checkpoint_path=path)
    with pytest.raises(ValueError, match="cannot resume"):
        fit(tiny_model(data, "ple"), data, _config(epochs=2), checkpoint_path=path, resume=True)
    # the message names what differs, not two whole configs (the feature list alone is long)
    with pytest.raises(ValueError) as error:
        fit(tiny_model(data, "ple"), data, _config(epochs=2), checkpoint_path=path, resume=True)
    message = str(error.value)
    assert "its model config differs in backbone ('mmoe' in the checkpoint, 'ple' here), backbone_kwargs" in message
    assert "features" not in message and len(message) < 600


def test_early_stopping_keeps_best_epoch(data):
    model = tiny_model(data, "mmoe")
    result = fit(model, data, _config(epochs=30, patience=1, lr=0.2))
    monitors = [h["monitor"] for h in result.history]
    assert result.best_epoch == int(np.argmax(monitors))
    assert result.stopped_early == (len(result.history) < 30)
    if result.stopped_early:
        assert result.best_epoch == len(result.history) - 2


@pytest.mark.parametrize("weighting", ["uncertainty", "gradnorm"])
def test_adaptive_loss_weightings_train(data, weighting):
    model = tiny_model(data, "mmoe")
    result = fit(model, data, _config(epochs=2, loss_weighting=weighting))
    first, last = result.history[0]["task_weights"], result.history[-1]["task_weights"]
    assert all(math.isfinite(w) for w in last)
    assert first != [1.0, 1.0, 1.0] or last != [1.0, 1.0, 1.0]  # the weights moved
    if weighting == "gradnorm":
        assert sum(last) == pytest.approx(3.0, abs=1e-4)


def _brute_force_topk(model, data, split, k, weights):
    evaluation_set = data.topk_eval(split)
    batch = data.pair_batch(evaluation_set.users)
    model.eval()
    with torch.no_grad():
        pred = model(batch.sparse, batch.dense).reshape(len(evaluation_set), data.num_items, 3)
    score = sum(w * pred[:, :, [t.name for t in data.tasks].index(n)] for n, w in weights.items())
    lists = []
    for u in range(len(evaluation_set)):
        s = score[u].clone()
        s[evaluation_set.exclude_indices[evaluation_set.exclude_offsets[u]:evaluation_set.exclude_offsets[u + 1]]] = -math.inf
        order = sorted(range(data.num_items), key=lambda i: (-float(s[i]), i))[:k]
        lists.append([i if s[i] > -math.inf else -1 for i in order])
    return torch.tensor(lists)


@pytest.mark.parametrize("weights", [None, {"click": 1.0, "rating": 0.25}])
def test_topk_lists_and_metrics(data, weights):
    model = tiny_model(data, "mmoe")
    fit(model, data, _config(epochs=1))
    indices, evaluation_set = evaluation.topk_lists(model, data, "test_warm", k=5, task_weights=weights,
                                                    users_per_block=7)
    expected = _brute_force_topk(model, data, "test_warm", 5, weights or {"click": 1.0})
    assert torch.equal(indices, expected)
    # no excluded (seen) item is ever recommended
    for u in range(len(evaluation_set)):
        seen = set(evaluation_set.exclude_indices[evaluation_set.exclude_offsets[u]:evaluation_set.exclude_offsets[u + 1]].tolist())
        assert not seen & set(indices[u].tolist())
    # NDCG@5 / Recall@5 by hand (PROTOCOL.md §5)
    ndcg, recall = [], []
    for u in range(len(evaluation_set)):
        rel = set(evaluation_set.relevant_indices[evaluation_set.relevant_offsets[u]:evaluation_set.relevant_offsets[u + 1]].tolist())
        hits = [1.0 if i in rel else 0.0 for i in indices[u].tolist()]
        dcg = sum(h / math.log2(r + 2) for r, h in enumerate(hits))
        idcg = sum(1 / math.log2(r + 2) for r in range(min(5, len(rel))))
        ndcg.append(dcg / idcg)
        recall.append(sum(hits) / len(rel))
    metrics = evaluation.topk_metrics(model, data, "test_warm", k=5, task_weights=weights)
    assert metrics["ndcg@5"] == pytest.approx(np.mean(ndcg))
    assert metrics["recall@5"] == pytest.approx(np.mean(recall))


def test_evaluate_reports_every_task(data):
    model = tiny_model(data, "ple")
    fit(model, data, _config(epochs=1))
    result = evaluation.evaluate(model, data, "test_cold", k=10)
    assert set(result) == {"click", "like", "rating", "topk"}
    assert 0 <= result["click"]["auc"] <= 1 and result["click"]["logloss"] > 0
    assert result["rating"]["rmse"] > 0
    assert 0 <= result["topk"]["ndcg@10"] <= 1
    without = evaluation.evaluate(model, data, "val", topk=False)
    assert "topk" not in without
    with pytest.raises(ValueError, match="unknown task"):
        evaluation.topk_metrics(model, data, "val", task_weights={"purchase": 1.0})


def test_esmm_trains_post_click_tasks_over_the_entire_space(data):
    model = tiny_model(data, "esmm")
    labels = data.splits["train"].labels
    targets = evaluation.scored_labels(model, labels)  # what fit trains on and evaluate scores against
    negatives = labels[:, 0] == 0
    # like is NaN on sampled negatives in the data; ESMM trains pCTCVR on them as 0
    assert torch.isnan(labels[negatives, 1]).all() and (targets[negatives, 1] == 0).all()
    result = fit(model, data, _config(epochs=1))
    assert all(math.isfinite(v) for v in result.history[0]["task_losses"].values())
    assert result.history[0]["val"]["like"]["auc"] == result.history[0]["val"]["like"]["auc"]  # not NaN


def test_a_model_of_other_tasks_is_refused_by_evaluate_and_fit(data):
    # column t of the model's output is its t-th task: on data whose tasks differ (another order, a
    # subset) the metrics compared the wrong columns (or failed with a reshape error) and fit
    # trained each head on another task's labels
    from mtkernels.transfer import select_tasks

    model = tiny_model(data, "mmoe")
    reordered = select_tasks(data, ["rating", "click", "like"])
    message = r"the model's tasks \['click', 'like', 'rating'\] differ from the data's \['rating', 'click', 'like'\]"
    with pytest.raises(ValueError, match=message):
        evaluation.evaluate(model, reordered, "val")
    with pytest.raises(ValueError, match=message):
        evaluation.topk_metrics(model, reordered, "val")
    with pytest.raises(ValueError, match=message):
        fit(model, reordered, _config(epochs=1))
    with pytest.raises(ValueError, match=r"differ from the data's \['click'\]"):
        evaluation.evaluate(model, select_tasks(data, ["click"]), "val")
    assert set(evaluation.evaluate(model, data, "val")) == {"click", "like", "rating", "topk"}


def test_evaluate_on_the_training_split_gives_its_pointwise_metrics(data):
    # train has no top-k set (its positives are what the other splits exclude): `mtkernels evaluate
    # --split train` computed the pointwise metrics, then failed on the ranking part
    model = tiny_model(data, "mmoe")
    result = evaluation.evaluate(model, data, "train")
    assert set(result) == {"click", "like", "rating"}
    labels, predictions = data.splits["train"].labels, evaluation.predict(model, data, "train")
    assert result == evaluation.pointwise_metrics(data.tasks, labels, predictions)


def test_resume_refuses_a_checkpoint_that_is_not_a_training_run(data, tmp_path):
    # a fused or cold-start checkpoint has no trainer state: the error compared configs ("kind (NoneType ...)")
    from mtkernels.training import save_checkpoint

    path = str(tmp_path / "fused.pt")
    save_checkpoint(path, {"fusion": {"weights": [1.0]}, "serving": None})
    with pytest.raises(ValueError, match=r"cannot resume from .*fused.pt: not the checkpoint of a training run"):
        fit(tiny_model(data, "mmoe"), data, _config(epochs=1), checkpoint_path=path, resume=True)
