"""The `mtkernels` command line: info, and train -> evaluate -> recommend on a tiny data set."""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from mtkernels import cli
from synthetic import make_data, one_thread  # noqa: F401 (autouse fixture)


def test_info_subprocess():
    out = subprocess.run([sys.executable, "-m", "mtkernels", "info"], capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert set(info["ops"]) == {"catalogue_score", "embedding_bags", "ensemble_topk", "expert_gate_mixture", "gated_mixture", "multi_task_score", "relu_dropout"}
    assert info["torch"] == torch.__version__


@pytest.fixture()
def tiny_data(monkeypatch):
    data = make_data()
    seen = []

    def load(spec):
        seen.append(spec)
        return data

    monkeypatch.setattr(cli, "load_data", load)
    return data, seen


def test_train_evaluate_recommend(tmp_path, tiny_data, capsys):
    data, seen = tiny_data
    checkpoint = str(tmp_path / "run" / "mmoe.pt")
    code = cli.main(["train", "--data", "ml100k", "--model", "mmoe", "--checkpoint", checkpoint, "--epochs", "2",
                     "--batch-size", "64", "--embedding-dim", "4", "--no-progress", "--evaluate", "val"])
    assert code == 0
    out = capsys.readouterr().out
    assert "best epoch" in out and "val: click: auc" in out
    assert os.path.isfile(checkpoint)

    assert cli.main(["evaluate", "--checkpoint", checkpoint, "--split", "test_warm", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["test_warm"]) == {"click", "like", "rating", "topk"}
    assert 0 <= result["test_warm"]["topk"]["ndcg@10"] <= 1
    assert seen[-1]["name"] == "ml100k"  # the checkpoint remembers its data set

    warm = int(data.user_ids[int(data.topk_eval("test_warm").users[0])])
    assert cli.main(["recommend", "--checkpoint", checkpoint, "--user", str(warm), "--user", "424242",
                     "--k", "3", "--json"]) == 0
    recs = json.loads(capsys.readouterr().out)
    assert [r["served_by"] for r in recs] == ["model", "popularity"]
    assert all(len(r["item_ids"]) == 3 for r in recs)
    assert cli.main(["recommend", "--checkpoint", checkpoint, "--user", str(warm), "--k", "3"]) == 0
    text = capsys.readouterr().out
    assert f"user {warm} (served by model)" in text and " 3. movie" in text

    # resume: a second run continues the same checkpoint up to 3 epochs
    assert cli.main(["train", "--model", "mmoe", "--checkpoint", checkpoint, "--epochs", "3", "--batch-size", "64",
                     "--embedding-dim", "4", "--no-progress", "--resume"]) == 0
    assert "resumed" not in capsys.readouterr().err
    from mtkernels.training import load_checkpoint

    assert load_checkpoint(checkpoint)["trainer"]["epoch"] == 2


def test_train_with_weight_averaging(tmp_path, tiny_data, capsys):
    from mtkernels.training import load_checkpoint, presets

    checkpoint = str(tmp_path / "ema.pt")
    assert cli.main(["train", "--model", "ple", "--checkpoint", checkpoint, "--epochs", "1", "--batch-size", "64",
                     "--embedding-dim", "4", "--no-progress", "--ema-decay", "0.9"]) == 0
    saved = load_checkpoint(checkpoint)
    assert saved["train_config"]["ema_decay"] == 0.9
    assert saved["trainer"]["weight_average"]["decay"] == 0.9 and saved["trainer"]["weight_average"]["num_updates"] > 0
    preset = str(tmp_path / "preset.pt")  # without --ema-decay: the backbone's preset
    for model, decay, weighting in (("ple", presets.EMA_DECAY["ple"], "uncertainty"), ("shared_bottom", 0.0, "fixed")):
        assert cli.main(["train", "--model", model, "--checkpoint", preset, "--epochs", "1", "--batch-size", "64",
                         "--embedding-dim", "4", "--no-progress"]) == 0
        assert load_checkpoint(preset)["train_config"]["ema_decay"] == decay
        assert load_checkpoint(preset)["train_config"]["loss_weighting"] == weighting
        os.remove(preset)
    assert presets.train_values("mmoe") == dict(presets.TRAIN_PRESET, ema_decay=0.999, loss_weighting="uncertainty")
    with pytest.raises(ValueError, match="backbone must be one of"):
        presets.train_values("dcn")
    assert cli.main(["train", "--model", "ple", "--checkpoint", checkpoint, "--epochs", "1", "--batch-size", "64",
                     "--embedding-dim", "4", "--no-progress", "--ema-decay", "1.5"]) == 2
    assert "ema_decay must be in [0, 1)" in capsys.readouterr().err


def test_errors_are_clean(tmp_path, capsys):
    assert cli.main(["recommend", "--checkpoint", str(tmp_path / "missing.pt"), "--user", "1"]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert cli.main(["train", "--data", str(tmp_path / "nope.csv"), "--checkpoint", str(tmp_path / "c.pt")]) == 2
    assert "--data must be" in capsys.readouterr().err
    log = tmp_path / "log.csv"
    log.write_text("uid,iid,click\n1,2,1\n")
    assert cli.main(["train", "--data", str(log), "--schema", '{"user": "uid"', "--checkpoint", str(tmp_path / "c.pt")]) == 2
    assert "--schema: not valid JSON" in capsys.readouterr().err
    assert cli.main(["train", "--data", str(log), "--schema", str(tmp_path / "none.yaml"),
                     "--checkpoint", str(tmp_path / "c.pt")]) == 2
    assert "--schema: no such YAML file" in capsys.readouterr().err
    assert cli.main(["evaluate", "--checkpoint", str(log), "--task-weight", "click=abc"]) == 2
    assert "is not an mtkernels checkpoint" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--task-weight 'click=abc': the weight must be a number"):
        cli._task_weights(["click=abc"])
    with pytest.raises(SystemExit):
        cli.main(["train"])  # --checkpoint is required


def test_demo_writes_report_and_learning_curves(tmp_path, monkeypatch, capsys):
    import mtkernels.data

    data = make_data()
    monkeypatch.setattr(mtkernels.data, "load_ml100k_mtl_v1", lambda data_dir=None: data)
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), "--models", "mmoe", "ple", "--seeds", "2", "--epochs", "1",
                     "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "test_warm (mean over 2 seeds" in text and "torch-rechub MMoE" in text
    assert "top-10 for user" in text and "cold, served from side features" in text
    report = json.loads((out / "report.json").read_text())
    assert set(report["models"]) == {"mmoe", "ple"}
    runs = report["models"]["mmoe"]["runs"]
    assert len(runs) == 2 and runs[0]["epochs"] == 1
    mean = report["models"]["mmoe"]["test_warm"]["mean"]["click_auc"]
    assert mean == pytest.approx((runs[0]["test_warm"]["click_auc"] + runs[1]["test_warm"]["click_auc"]) / 2)
    assert [u["served_by"] for u in report["recommendations"]["users"]] == ["model", "side_features"]
    png = (out / "learning_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["report.json", "learning_curves.png", "mmoe-seed0.pt", "mmoe-seed1.pt", "ple-seed0.pt", "ple-seed1.pt",
         "fused.pt"])
    # the fusion stage: both models, EASE and SequentialRules, weights on the simplex, a row per member and the fusion
    assert "fusion (seed-0 models + EASE + SequentialRules" in text
    assert set(report["fusion"]["weights"]) == {"MMoE", "PLE", "EASE", "SequentialRules"}
    assert sum(report["fusion"]["weights"].values()) == pytest.approx(1.0)
    assert set(report["fusion"]["members"]) == {"MMoE", "PLE", "EASE", "SequentialRules", "fusion"}


def test_cold_start_writes_a_checkpoint_that_serves_cold_users_by_their_features(tmp_path, tiny_data, capsys):
    from mtkernels.cold_start import ColdStartModel
    from mtkernels.serving import Ranker

    data, seen = tiny_data
    trained = str(tmp_path / "click.pt")
    assert cli.main(["train", "--model", "mmoe", "--checkpoint", trained, "--epochs", "1", "--batch-size", "64",
                     "--embedding-dim", "4", "--no-progress", "--id-dropout", "0.5"]) == 0
    capsys.readouterr()
    cold = str(tmp_path / "cold.pt")
    # this data set has no timestamps: the default time-aware share asks for --recent-share 0
    assert cli.main(["cold-start", "--checkpoint", trained, "--out", cold, "--features", "age", "--epochs", "1"]) == 2
    assert "--recent-share 0" in capsys.readouterr().err
    assert cli.main(["cold-start", "--checkpoint", trained, "--out", cold, "--features", "age", "--recent-share", "0",
                     "--l2", "1e-4", "--weight", "1", "--epochs", "5", "--evaluate", "test_cold"]) == 0
    out = capsys.readouterr().out
    assert "cold-start model" in out and "test_cold: click: auc" in out
    ranker = Ranker.load(cold)
    assert isinstance(ranker.model, ColdStartModel) and ranker.model.weight == 1.0
    assert ranker.model.prior.groups == (("age",),)
    sides = {9001: {"age": 1}, 9002: {"age": 3}}
    result = ranker.recommend([9001, 9002], k=5, side_features=sides)
    assert result.served_by == ["side_features", "side_features"]
    # the prior alone ranks: each list holds the top 5 of log P(item | that user's age group)
    with torch.no_grad():
        log_prior = ranker.model.prior({"age": torch.tensor([1, 3])})
    positions = torch.searchsorted(data.item_ids, result.item_ids)
    torch.testing.assert_close(log_prior.gather(1, positions), log_prior.topk(5).values)
    assert result.item_ids[0].tolist() != result.item_ids[1].tolist()
    # the written checkpoint evaluates like any other (its data spec is kept)
    assert cli.main(["evaluate", "--checkpoint", cold, "--split", "test_cold", "--json"]) == 0
    assert 0 <= json.loads(capsys.readouterr().out)["test_cold"]["topk"]["ndcg@10"] <= 1
    # a split the data set does not have is refused before any work (nothing written)
    never = str(tmp_path / "never.pt")
    assert cli.main(["cold-start", "--checkpoint", trained, "--out", never, "--features", "age", "--recent-share", "0",
                     "--evaluate", "test"]) == 2
    assert "--evaluate 'test' is not a split of this data set" in capsys.readouterr().err
    assert cli.main(["train", "--model", "mmoe", "--checkpoint", never, "--epochs", "1", "--no-progress",
                     "--evaluate", "test"]) == 2
    assert "--evaluate 'test' is not a split of this data set" in capsys.readouterr().err
    assert cli.main(["train", "--model", "mmoe", "--checkpoint", never, "--epochs", "0", "--no-progress"]) == 2
    assert "--epochs must be >= 1" in capsys.readouterr().err  # 0 trained nothing yet printed a checkpoint path
    assert not os.path.exists(never)
    assert cli.main(["cold-start", "--checkpoint", cold, "--out", never, "--features", "age", "--recent-share", "0"]) == 2
    assert "is already a cold-start checkpoint" in capsys.readouterr().err
    assert cli.main(["cold-start", "--checkpoint", trained, "--out", cold, "--weight", "2"]) == 2
    assert "weight" in capsys.readouterr().err
    assert cli.main(["cold-start", "--checkpoint", trained, "--out", cold, "--features", "genres"]) == 2
    assert "genres" in capsys.readouterr().err
    assert cli.main(["cold-start", "--checkpoint", trained, "--out", cold, "--features", "age", "--l2", "x"]) == 2
    assert "--l2" in capsys.readouterr().err
    assert cli.main(["cold-start", "--checkpoint", trained, "--out", cold, "--features", "age", "--l2", "1,2"]) == 2
    assert "one per group" in capsys.readouterr().err


def test_recommend_encodes_raw_side_features_of_unknown_users(tmp_path, capsys):
    from mtkernels.data import load_interactions
    from mtkernels.serving import Ranker

    rng = np.random.default_rng(0)
    n = 400
    log = pd.DataFrame({"uid": rng.integers(100, 130, n), "iid": rng.integers(1, 9, n),
                        "click": rng.integers(0, 2, n), "ts": rng.permutation(n)})
    log["age"] = log["uid"] % 4 * 10
    path = tmp_path / "log.csv"
    log.to_csv(path, index=False)
    schema = json.dumps({"user": "uid", "item": "iid", "labels": {"click": "binary"}, "user_features": ["age"],
                         "timestamp": "ts", "split": "temporal"})
    checkpoint = str(tmp_path / "log.pt")
    assert cli.main(["train", "--data", str(path), "--schema", schema, "--model", "mmoe", "--checkpoint", checkpoint,
                     "--epochs", "1", "--batch-size", "64", "--embedding-dim", "4", "--no-progress"]) == 0
    capsys.readouterr()
    assert cli.main(["recommend", "--checkpoint", checkpoint, "--k", "3", "--json",
                     "--side-features", '9001={"age": 30}', "--side-features", '9002={"age": 77}']) == 0
    served = json.loads(capsys.readouterr().out)
    assert [u["user_id"] for u in served] == [9001, 9002]
    assert [u["served_by"] for u in served] == ["side_features", "side_features"]
    # the same as the Python API given the ids the data set's encoders give (age 77 is unseen: id 0)
    data = load_interactions(path, json.loads(schema))
    encoded = data.new_user_rows([{"age": 30}, {"age": 77}]).sparse["age"].tolist()
    assert encoded[0] > 0 and encoded[1] == 0
    direct = Ranker.load(checkpoint).recommend([9001, 9002], k=3, side_features={9001: {"age": encoded[0]},
                                                                                  9002: {"age": encoded[1]}})
    assert [u["item_ids"] for u in served] == direct.item_ids.tolist()
    torch.testing.assert_close(torch.tensor([u["scores"] for u in served]), direct.scores)
    assert cli.main(["recommend", "--checkpoint", checkpoint, "--side-features", "9001=age30"]) == 2
    assert "--side-features must be USER=JSON-object" in capsys.readouterr().err
    assert cli.main(["recommend", "--checkpoint", checkpoint, "--side-features", '9001={"agee": 30}']) == 2
    assert "unknown side features ['agee']; known: age" in capsys.readouterr().err
    assert cli.main(["recommend", "--checkpoint", checkpoint]) == 2  # nobody to serve: an error, not an empty list
    assert "give at least one --user or --side-features" in capsys.readouterr().err
    # a fused checkpoint of the log: evaluate defaults to its test split and checks --split and --k
    fused = str(tmp_path / "fused.pt")
    assert cli.main(["fuse", "--member", checkpoint, "--cf", "ease", "--out", fused]) == 0
    capsys.readouterr()
    assert cli.main(["evaluate", "--checkpoint", fused]) == 0
    assert capsys.readouterr().out.startswith("test: topk: ndcg@10")
    assert cli.main(["evaluate", "--checkpoint", fused, "--split", "test_warm"]) == 2
    assert "--split 'test_warm' is not a split of this data set" in capsys.readouterr().err
    assert cli.main(["evaluate", "--checkpoint", fused, "--k", "0"]) == 2
    assert "k must be a positive number of items, got 0" in capsys.readouterr().err
    # string item ids: training works, the checkpoint says it cannot be served
    log.assign(iid=log["iid"].map(lambda i: f"item-{i}")).to_csv(path, index=False)
    assert cli.main(["train", "--data", str(path), "--schema", schema, "--model", "mmoe", "--checkpoint", checkpoint,
                     "--epochs", "1", "--batch-size", "64", "--embedding-dim", "4", "--no-progress"]) == 0
    assert "no serving tables" in capsys.readouterr().err
    assert cli.main(["recommend", "--checkpoint", checkpoint, "--user", "100"]) == 2
    assert "non-integer user/item ids" in capsys.readouterr().err


def test_cold_start_with_the_time_aware_prior_serves_by_request_time(tmp_path, monkeypatch, capsys):
    from mtkernels.cold_start import ColdStartModel
    from mtkernels.serving import Ranker

    data = make_data(num_warm=40, age_taste=True, timestamps=True)
    monkeypatch.setattr(cli, "load_data", lambda spec: data)
    trained = str(tmp_path / "click.pt")
    assert cli.main(["train", "--model", "mmoe", "--checkpoint", trained, "--epochs", "1", "--batch-size", "64",
                     "--embedding-dim", "4", "--no-progress", "--id-dropout", "0.5"]) == 0
    capsys.readouterr()
    cold = str(tmp_path / "cold.pt")
    assert cli.main(["cold-start", "--checkpoint", trained, "--out", cold, "--features", "age", "--epochs", "5",
                     "--weight", "1", "--recent-share", "1", "--half-life", "2", "--mix", "0.2", "--session-days", "0",
                     "--evaluate", "test_cold"]) == 0
    out = capsys.readouterr().out
    assert "time-aware prior share 1 (half-life 2 days, mix 0.2)" in out and "test_cold: click: auc" in out
    ranker = Ranker.load(cold)
    assert isinstance(ranker.model, ColdStartModel) and ranker.model.recent.half_life_days == 2.0
    lists = {}
    for at in (None, 1_000_000 + 3 * 86_400, 1_000_000 + 30 * 86_400):
        argv = ["recommend", "--checkpoint", cold, "--k", "5", "--json", "--user", "141"]  # a cold user of the data
        assert cli.main(argv + ([] if at is None else ["--at", str(at)])) == 0
        served = json.loads(capsys.readouterr().out)[0]
        assert served["served_by"] == "side_features"
        lists[at] = served["item_ids"]
    # the time-aware prior alone ranks by the decayed counts at --at; the default is the latest training timestamp
    for at, items in lists.items():
        with torch.no_grad():
            log_prior = ranker.model.recent(ranker.model.recent.latest if at is None else at)[0]
        positions = torch.searchsorted(data.item_ids, torch.tensor(items))
        torch.testing.assert_close(log_prior[positions], log_prior.topk(5).values)  # ties may swap items
    assert lists[1_000_000 + 3 * 86_400] != lists[1_000_000 + 30 * 86_400]
    assert cli.main(["cold-start", "--checkpoint", trained, "--out", cold, "--recent-share", "0.5",
                     "--half-life", "-1"]) == 2
    assert "--half-life" in capsys.readouterr().err
    assert cli.main(["cold-start", "--checkpoint", trained, "--out", cold, "--recent-share", "2"]) == 2
    assert "--recent-share" in capsys.readouterr().err
    assert cli.main(["recommend", "--checkpoint", trained, "--user", "101", "--at", "1000000"]) == 2
    assert "at" in capsys.readouterr().err
    # --session-days D: the time-aware prior over each training user's first D days (here their first positive)
    first = str(tmp_path / "first.pt")
    assert cli.main(["cold-start", "--checkpoint", trained, "--out", first, "--features", "age", "--epochs", "1",
                     "--recent-share", "0.5", "--half-life", "2", "--session-days", "1"]) == 0
    assert "first sessions of 1 days" in capsys.readouterr().out
    loaded = Ranker.load(first).model.recent
    assert type(loaded).__name__ == "FirstSessionPrior" and loaded.session_days == 1.0
    assert loaded.items.numel() == 40 and ranker.model.recent.items.numel() > 40  # one per warm user, against all
    # the defaults are RECOMMENDED's first-session recipe
    from mtkernels.cold_start import RECOMMENDED

    assert cli.main(["cold-start", "--checkpoint", trained, "--out", first, "--features", "age", "--epochs", "1"]) == 0
    capsys.readouterr()
    default = Ranker.load(first).model
    assert (default.recent.session_days, default.recent.half_life_days, default.recent_share, default.weight) == (
        RECOMMENDED["session_days"], RECOMMENDED["half_life_days"], RECOMMENDED["recent_share"], RECOMMENDED["weight"])
    for bad in ("-1", "nan"):
        assert cli.main(["cold-start", "--checkpoint", trained, "--out", first, "--session-days", bad]) == 2
        assert "--session-days" in capsys.readouterr().err

def test_train_history_length_is_kept_in_the_data_spec(tmp_path, tiny_data):
    data, seen = tiny_data
    checkpoint = str(tmp_path / "h.pt")
    assert cli.main(["train", "--model", "mmoe", "--checkpoint", checkpoint, "--epochs", "1", "--batch-size", "64",
                     "--embedding-dim", "4", "--no-progress", "--history-length", "30"]) == 0
    assert seen[0]["history_length"] == 30
    from mtkernels.training import load_checkpoint

    assert load_checkpoint(checkpoint)["data"]["history_length"] == 30  # evaluate reloads the same bags


def _small_log(folder, n=300, seed=0):
    """A tiny interaction log (uid, iid, click, age, ts) written to ``folder/log.csv``."""
    rng = np.random.default_rng(seed)
    log = pd.DataFrame({"uid": rng.integers(100, 120, n), "iid": rng.integers(1, 9, n),
                        "click": rng.integers(0, 2, n), "ts": rng.permutation(n)})
    log["age"] = log["uid"] % 4 * 10
    log.to_csv(folder / "log.csv", index=False)
    return log


def test_a_checkpoint_trained_from_relative_paths_is_evaluated_from_another_folder(tmp_path, monkeypatch, capsys):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    _small_log(work)
    (work / "schema.yaml").write_text("user: uid\nitem: iid\nlabels: {click: binary}\nuser_features: [age]\n"
                                      "timestamp: ts\nsplit: temporal\n")
    monkeypatch.chdir(work)
    assert cli.main(["train", "--data", "log.csv", "--schema", "schema.yaml", "--model", "mmoe", "--checkpoint", "m.pt",
                     "--epochs", "1", "--batch-size", "64", "--embedding-dim", "4", "--no-progress"]) == 0
    assert cli.main(["evaluate", "--checkpoint", "m.pt", "--json"]) == 0
    here = json.loads(capsys.readouterr().out.split("\n", 1)[1])  # after the "trained ..." line
    monkeypatch.chdir(elsewhere)
    assert cli.main(["evaluate", "--checkpoint", str(work / "m.pt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == here


def test_history_length_on_a_data_set_without_histories_is_an_error(tmp_path, capsys):
    _small_log(tmp_path)
    schema = json.dumps({"user": "uid", "item": "iid", "labels": {"click": "binary"}})
    assert cli.main(["train", "--data", str(tmp_path / "log.csv"), "--schema", schema, "--history-length", "5",
                     "--checkpoint", str(tmp_path / "m.pt"), "--epochs", "1", "--no-progress"]) == 2
    assert "--history-length applies to ml100k only" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "m.pt")


def test_embedding_lr_is_honoured_or_refused(tmp_path, tiny_data, capsys):
    from mtkernels.training import load_checkpoint

    checkpoint = str(tmp_path / "m.pt")
    common = ["train", "--model", "mmoe", "--checkpoint", checkpoint, "--epochs", "1", "--batch-size", "64",
              "--embedding-dim", "4", "--no-progress"]
    assert cli.main(common + ["--embedding-lr", "0"]) == 2  # refused, not silently the preset's 0.05
    assert "lr must be > 0, got 0.0" in capsys.readouterr().err
    assert cli.main(common + ["--embedding-lr", "0.2", "--embedding-optimizer", "sgd"]) == 0
    assert load_checkpoint(checkpoint)["model_config"]["embedding_optimizer"] == {"kind": "sgd", "lr": 0.2, "eps": 1e-8}
    capsys.readouterr()
    # without a fused optimizer the tables train with Adam at --lr: an --embedding-lr would be ignored
    assert cli.main(common + ["--embedding-lr", "0.2", "--embedding-optimizer", "none"]) == 2
    assert "--embedding-lr needs a fused --embedding-optimizer" in capsys.readouterr().err


def test_evaluate_refuses_task_weights_for_a_fused_checkpoint(tmp_path, tiny_data, capsys):
    checkpoint, fused = str(tmp_path / "m.pt"), str(tmp_path / "fused.pt")
    assert cli.main(["train", "--model", "mmoe", "--checkpoint", checkpoint, "--epochs", "1", "--batch-size", "64",
                     "--embedding-dim", "4", "--no-progress"]) == 0
    assert cli.main(["fuse", "--member", checkpoint, "--cf", "none", "--out", fused]) == 0
    capsys.readouterr()
    # a fused checkpoint ranks by its learned source weights: the weights would be ignored
    assert cli.main(["evaluate", "--checkpoint", fused, "--split", "test_warm", "--task-weight", "like=1"]) == 2
    assert "--task-weight does not apply to a fused checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["train", "--checkpoint", "m.pt"], ["fuse", "--out", "f.pt"],
                                     ["cold-start", "--checkpoint", "m.pt", "--out", "c.pt"], ["demo"]])
@pytest.mark.parametrize("threads", ["0", "-2", "two"])
def test_threads_must_be_a_positive_integer(command, threads, capsys):
    # 0 was silently torch's default, -2 a RuntimeError traceback from torch.set_num_threads
    with pytest.raises(SystemExit):
        cli.main(command + ["--threads", threads])
    assert f"--threads: expected an integer >= 1, got {threads!r}" in capsys.readouterr().err


@pytest.mark.parametrize("option, message", [
    (["--seeds", "0"], "seeds must be an integer >= 1, got 0"),  # was an IndexError after training nothing
    (["--epochs", "0"], "epochs must be an integer >= 1, got 0"),  # the same
    (["--models", "bogus"], "models: unknown backbones ['bogus']"),  # was an error only after loading the data
])
def test_demo_checks_its_options_before_any_work(tmp_path, monkeypatch, capsys, option, message):
    import mtkernels.data

    def no_load(data_dir=None):
        raise AssertionError("the data set was loaded")

    monkeypatch.setattr(mtkernels.data, "load_ml100k_mtl_v1", no_load)
    assert cli.main(["demo", "--out", str(tmp_path / "demo"), "--no-progress"] + option) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


def test_demo_checkpoints_keep_an_absolute_data_dir(tmp_path, monkeypatch, capsys):
    import mtkernels.data
    from mtkernels.training import load_checkpoint

    data = make_data()
    monkeypatch.setattr(mtkernels.data, "load_ml100k_mtl_v1", lambda data_dir=None: data)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["demo", "--out", "demo", "--data-dir", "raw", "--models", "mmoe", "--epochs", "1",
                     "--no-progress", "--no-fusion"]) == 0
    # `mtkernels evaluate --checkpoint demo/mmoe-seed0.pt` from another folder reloads the same files
    assert load_checkpoint("demo/mmoe-seed0.pt")["data"]["data_dir"] == str(tmp_path / "raw")


def test_transfer_options_that_would_be_ignored_are_errors(tmp_path, tiny_data, capsys):
    source = str(tmp_path / "source.pt")
    common = ["--model", "mmoe", "--epochs", "1", "--batch-size", "64", "--embedding-dim", "4", "--no-progress"]
    assert cli.main(["train", "--checkpoint", source] + common) == 0
    capsys.readouterr()
    # every copied part frozen: a learning-rate scale has nothing to scale (it was silently ignored)
    assert cli.main(["train", "--checkpoint", str(tmp_path / "t.pt"), "--init-from", source, "--freeze",
                     "embeddings,experts", "--transfer-lr-scale", "0.3"] + common) == 2
    assert "--transfer-lr-scale 0.3 has no fine-tuned part to scale" in capsys.readouterr().err
    # without --init-from the transfer options were ignored and the model trained from scratch
    for option in (["--transfer", "embeddings"], ["--transfer-lr-scale", "0.3"], ["--freeze", "experts"]):
        assert cli.main(["train", "--checkpoint", str(tmp_path / "t.pt")] + option + common) == 2
        assert f"{option[0]} needs --init-from CHECKPOINT" in capsys.readouterr().err


def _strict_json(text):
    """json.loads that refuses NaN / Infinity, as jq and JavaScript do."""
    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=refuse)


def test_json_output_is_strict_json(tmp_path, tiny_data, capsys):
    data, _ = tiny_data
    checkpoint = str(tmp_path / "m.pt")
    assert cli.main(["train", "--model", "mmoe", "--checkpoint", checkpoint, "--epochs", "1", "--batch-size", "64",
                     "--embedding-dim", "4", "--no-progress"]) == 0
    capsys.readouterr()
    # k above the catalogue: the padding (item -1, score -inf) was written as -Infinity
    warm = int(data.user_ids[int(data.topk_eval("test_warm").users[0])])
    assert cli.main(["recommend", "--checkpoint", checkpoint, "--user", str(warm), "--k", str(data.num_items + 5),
                     "--json"]) == 0
    served = _strict_json(capsys.readouterr().out)[0]
    assert len(served["item_ids"]) == len(served["scores"]) == len(served["titles"]) < data.num_items
    assert min(served["item_ids"]) >= 0 and len(set(served["item_ids"])) == len(served["item_ids"])
    # an undefined metric (NaN) is null, not NaN
    assert cli.main(["evaluate", "--checkpoint", checkpoint, "--split", "val", "--json", "--task-weight", "click=1"]) == 0
    result = _strict_json(capsys.readouterr().out)
    assert set(result["val"]) == {"click", "like", "rating", "topk"}
    assert _strict_json(cli._strict_json({"auc": float("nan"), "lists": [1.5, float("-inf")]})) == {
        "auc": None, "lists": [1.5, None]}


def test_train_with_the_same_seed_gives_the_same_model(tmp_path, tiny_data):
    # the model was built (its weights initialised) before the run was seeded: --seed 0 twice gave two models
    from mtkernels.training import load_checkpoint

    states = []
    for run in ("a", "b"):
        path = str(tmp_path / f"{run}.pt")
        assert cli.main(["train", "--model", "mmoe", "--checkpoint", path, "--epochs", "1", "--batch-size", "64",
                         "--embedding-dim", "4", "--no-progress", "--seed", "3"]) == 0
        torch.rand(5)  # whatever ran in between
        states.append(load_checkpoint(path)["model_state"])
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


def test_init_from_a_fused_or_cold_start_checkpoint_is_an_error(tmp_path, tiny_data, capsys):
    source, fused, cold = (str(tmp_path / f"{n}.pt") for n in ("source", "fused", "cold"))
    common = ["--model", "mmoe", "--epochs", "1", "--batch-size", "64", "--embedding-dim", "4", "--no-progress"]
    assert cli.main(["train", "--checkpoint", source] + common) == 0
    assert cli.main(["fuse", "--member", source, "--cf", "none", "--out", fused]) == 0
    assert cli.main(["cold-start", "--checkpoint", source, "--out", cold, "--features", "age", "--epochs", "1",
                     "--recent-share", "0"]) == 0
    capsys.readouterr()
    # were a TypeError ("got dict") and an AttributeError ('ColdStartModel' has no 'embeddings') traceback
    for path, kind in ((fused, "fused"), (cold, "cold-start")):
        assert cli.main(["train", "--checkpoint", str(tmp_path / "t.pt"), "--init-from", path] + common) == 2
        assert f"--init-from {path} is a {kind} checkpoint; transfer copies from the checkpoint of `mtkernels train`" \
            in capsys.readouterr().err


def test_a_log_without_a_test_ranking_set_trains_without_serving_tables(tmp_path, capsys):
    # 5 rows: no val row and no positive in test, so no top-k set; train failed with "has no items to rank"
    log = tmp_path / "tiny.csv"
    log.write_text("u,i,click\n1,1,1\n1,2,0\n2,1,1\n2,3,1\n3,2,0\n")
    schema = '{"user": "u", "item": "i", "labels": {"click": "binary"}}'
    checkpoint = str(tmp_path / "tiny.pt")
    assert cli.main(["train", "--data", str(log), "--schema", schema, "--checkpoint", checkpoint, "--epochs", "1",
                     "--no-progress"]) == 0
    assert "no top-k set for its test split, so the checkpoint holds no serving tables" in capsys.readouterr().err
    from mtkernels.data import load_interactions

    with pytest.raises(ValueError, match=r"tiny.csv has no top-k evaluation set: no split has a user with a relevant "
                                         r"item \(its items: 3\)"):
        load_interactions(log, json.loads(schema)).topk_eval("test")


def test_a_data_set_name_stays_a_name_beside_a_file_of_that_name(tmp_path, monkeypatch):
    (tmp_path / "census").write_text("not a log")
    monkeypatch.chdir(tmp_path)
    assert cli._portable_spec({"name": "census", "data_dir": None, "schema": None})["name"] == "census"
    (tmp_path / "log.csv").write_text("u,i,click\n")
    assert cli._portable_spec({"name": "log.csv"})["name"] == str(tmp_path / "log.csv")


def test_a_task_weight_given_twice_is_an_error():
    # the last one silently won
    with pytest.raises(ValueError, match="--task-weight names click twice"):
        cli._task_weights(["click=1", "like=0.5", "click=2"])
    assert cli._task_weights(["click=1", "like=0.5"]) == {"click": 1.0, "like": 0.5}


def test_train_says_when_it_replaces_an_existing_checkpoint(tmp_path, tiny_data, capsys):
    checkpoint = str(tmp_path / "m.pt")
    common = ["train", "--model", "mmoe", "--checkpoint", checkpoint, "--epochs", "1", "--batch-size", "64",
              "--embedding-dim", "4", "--no-progress"]
    assert cli.main(common) == 0
    assert "replaces the existing checkpoint" not in capsys.readouterr().err
    # a rerun of the same command started over and overwrote a trained model without a word
    assert cli.main(common) == 0
    assert f"note: training from scratch replaces the existing checkpoint {checkpoint} (--resume continues it)" \
        in capsys.readouterr().err
    assert cli.main(common + ["--resume"]) == 0
    assert "replaces the existing checkpoint" not in capsys.readouterr().err


def test_strict_json_of_report_values():
    # what the demo's report.json and the --json outputs are written with: no NaN / Infinity tokens
    import numpy as np

    from mtkernels.training.checkpoint import strict_json

    value = {"auc": float("nan"), "rmse": np.float32(0.5), "epochs": np.int64(3), "flag": True,
             "curve": (1.0, float("inf"), torch.tensor(2.5)), "name": "mmoe", "none": None}
    assert _strict_json(strict_json(value)) == {"auc": None, "rmse": 0.5, "epochs": 3, "flag": True,
                                                "curve": [1.0, None, 2.5], "name": "mmoe", "none": None}
