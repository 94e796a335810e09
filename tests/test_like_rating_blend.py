"""evaluation.LikeRatingBlend / choose_like_rating_blend: the blended like score against its formula,
the weight chosen on the validation split's like AUC, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mtkernels import evaluation, metrics
from mtkernels.data import protocol
from mtkernels.data.movielens import build_ml100k_mtl_v1, read_grouplens
from mtkernels.training import presets

try:
    from tests.data_fixtures import synthetic_movielens, write_grouplens
except ImportError:  # tests/ on sys.path instead of the repo root
    from data_fixtures import synthetic_movielens, write_grouplens


@pytest.fixture(scope="module")
def data_and_model(tmp_path_factory):
    ratings, users, items = synthetic_movielens()
    movielens = read_grouplens(write_grouplens(tmp_path_factory.mktemp("ml") / "ml-100k", ratings, users, items))
    data = build_ml100k_mtl_v1(movielens, protocol.build_splits(movielens.ratings, np.arange(1, 61)))
    torch.manual_seed(0)
    model = presets.build_model(data, "mmoe")
    model.eval()
    return data, model


def test_blend_output_is_the_formula(data_and_model):
    data, model = data_and_model
    batch = next(data.batches("val", 64))
    with torch.no_grad():
        raw = model(batch.sparse, batch.dense)
        for weight in (0.0, 1.5):
            out = evaluation.LikeRatingBlend(model, 1, 2, weight)(batch.sparse, batch.dense)
            want = torch.sigmoid(torch.logit(raw[:, 1].clamp(1e-7, 1 - 1e-7)) + weight * raw[:, 2])
            torch.testing.assert_close(out[:, 1], want)
            assert torch.equal(out[:, [0, 2]], raw[:, [0, 2]])


def test_weight_chosen_on_validation(data_and_model):
    data, model = data_and_model
    blend, aucs = evaluation.choose_like_rating_blend(model, data, "val", weights=(0.0, 0.5, 2.0, 8.0))
    assert set(aucs) == {0.0, 0.5, 2.0, 8.0} and blend.weight == max(aucs, key=aucs.get)
    labels = data.splits["val"].labels
    rows = ~torch.isnan(labels[:, 1])
    output = evaluation.predict(model, data, "val")
    for weight, auc in aucs.items():
        score = torch.logit(output[rows, 1].double().clamp(1e-7, 1 - 1e-7)) + weight * output[rows, 2].double()
        assert auc == pytest.approx(metrics.auc(labels[rows, 1].double().numpy(), score.numpy()), abs=1e-6)
    assert aucs[0.0] == pytest.approx(evaluation.evaluate(model, data, "val", topk=False)["like"]["auc"], abs=1e-6)
    got = evaluation.evaluate(blend, data, "val", topk=False)
    assert got["like"]["auc"] == pytest.approx(aucs[blend.weight], abs=1e-5)
    assert not math.isnan(got["rating"]["rmse"])


def test_blend_errors(data_and_model):
    data, model = data_and_model
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="weight must be a finite number >= 0"):
            evaluation.LikeRatingBlend(model, 1, 2, bad)
    with pytest.raises(KeyError, match="'taste'"):
        evaluation.choose_like_rating_blend(model, data, like="taste")
    with pytest.raises(ValueError, match="weights"):
        evaluation.choose_like_rating_blend(model, data, weights=())
    # a bad candidate weight is named as such (NaN used to surface as "predictions hold NaN")
    for bad in (float("nan"), -0.5, float("inf")):
        with pytest.raises(ValueError, match=r"weights: every candidate must be a finite number >= 0, got \[0.0, "):
            evaluation.choose_like_rating_blend(model, data, weights=(0.0, bad))
    # an unknown split is named (it was a bare KeyError: 'tset')
    with pytest.raises(ValueError, match=r"split: 'tset' is not a split of .*val"):
        evaluation.choose_like_rating_blend(model, data, "tset")


def test_rating_calibration_is_least_squares_on_validation(data_and_model):
    data, model = data_and_model
    calibration = evaluation.choose_rating_calibration(model, data, "val")
    labels = data.splits["val"].labels[:, 2]
    rows = ~torch.isnan(labels)
    x = evaluation.predict(model, data, "val")[rows, 2].double().numpy()
    y = labels[rows].double().numpy()
    scale, shift = np.polyfit(x, y, 1)  # reference least-squares line
    assert calibration.scale == pytest.approx(scale, rel=1e-6, abs=1e-9)
    assert calibration.shift == pytest.approx(shift, rel=1e-6, abs=1e-9)
    batch = next(data.batches("val", 64))
    with torch.no_grad():
        raw = model(batch.sparse, batch.dense)
        out = calibration(batch.sparse, batch.dense)
    torch.testing.assert_close(out[:, 2], raw[:, 2] * calibration.scale + calibration.shift)
    assert torch.equal(out[:, :2], raw[:, :2])
    # least squares on val: no other line is better there, and it is at least as good as the raw head
    rmse = evaluation.evaluate(calibration, data, "val", topk=False)["rating"]["rmse"]
    assert rmse == pytest.approx(math.sqrt(np.mean((scale * x + shift - y) ** 2)), rel=1e-5)
    assert rmse <= evaluation.evaluate(model, data, "val", topk=False)["rating"]["rmse"] + 1e-9
    assert rmse < math.sqrt(np.mean(((scale + 0.05) * x + shift - y) ** 2))


def test_rating_calibration_errors(data_and_model):
    data, model = data_and_model
    with pytest.raises(KeyError, match="'score'"):
        evaluation.choose_rating_calibration(model, data, rating="score")
    with pytest.raises(ValueError, match="finite"):
        evaluation.RatingCalibration(model, 2, float("nan"), 0.0)
    with pytest.raises(ValueError, match=r"split: 'tset' is not a split of .*val"):
        evaluation.choose_rating_calibration(model, data, "tset")


def test_wrappers_of_an_esmm_model_are_scored_on_its_entire_space_labels(data_and_model):
    # ESMM's like output is P(click and like): evaluate scores it on entire-space labels (0 where not
    # clicked), which a wrapper must keep; a blend of weight 0 and the identity calibration are the model
    data, _ = data_and_model
    torch.manual_seed(0)
    esmm = presets.build_model(data, "esmm").eval()
    labels = data.splits["val"].labels
    assert bool(torch.isnan(labels[:, 1]).any())  # non-clicked rows: no like label, entire-space target 0
    want = evaluation.evaluate(esmm, data, "val", topk=False)
    for wrapped in (evaluation.LikeRatingBlend(esmm, 1, 2, 0.0), evaluation.RatingCalibration(esmm, 2, 1.0, 0.0)):
        torch.testing.assert_close(wrapped.targets(labels), esmm.targets(labels), rtol=0, atol=0, equal_nan=True)
        got = evaluation.evaluate(wrapped, data, "val", topk=False)
        assert got["like"]["auc"] == pytest.approx(want["like"]["auc"], abs=1e-9)
        assert got["like"]["logloss"] == pytest.approx(want["like"]["logloss"], rel=1e-5)
    # the blend weight is chosen on the like AUC that evaluate reports
    _, aucs = evaluation.choose_like_rating_blend(esmm, data, "val", weights=(0.0, 1.0))
    assert aucs[0.0] == pytest.approx(want["like"]["auc"], abs=1e-6)
