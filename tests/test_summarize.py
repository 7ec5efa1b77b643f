"""summarize on hand-made run folders and a real (sqlite) Optuna study: no training needed."""

import csv
import json

import optuna
import pytest

from gcode_exp import summarize
from gcode_exp.sweeps import TRIAL_FILE, display_url, same_params

PARAMS = {"aug.oversample_factor": 3, "model.loss_weights.command": 2.718281828459045}


def make_run(folder, name="demo", seed=0, metrics=None, error=None, overrides=(), trial=None, model="multihead"):
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text(
        f"name: {name}\nseed: {seed}\noptimized_metric: val/token_macro_recall\nmodel: {{name: {model}}}\n"
        "aug: {name: 3x, oversample_factor: 3}\nvocab: {name: v2}\nfeatures: {name: all}\n")
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if metrics is not None:
        (folder / "metrics.json").write_text(json.dumps(metrics))
    if error is not None:
        (folder / "error.txt").write_text(error)
    if trial is not None:
        (folder / TRIAL_FILE).write_text(json.dumps(trial))
    return folder


def test_seeds_group_into_mean_and_sd_with_one_majority_row(tmp_path):
    for seed, acc in ((0, 0.5), (1, 0.7)):
        make_run(tmp_path / f"{seed}_demo", seed=seed, metrics={
            "test/command_acc": acc, "majority/command_acc": 0.9, "epochs": 3, "sec_per_epoch": 1.5,
            "collapsed": seed == 1})
    make_run(tmp_path / "2_other", name="other", seed=0, model="baseline",
             metrics={"test/command_acc": 0.2, "majority/command_acc": 0.9, "epochs": 5, "collapsed": False})
    rows = summarize.main([str(tmp_path)])
    assert [r["approach"] for r in rows] == ["demo", "other", "majority reference"]
    assert rows[0]["seeds"] == 2 and rows[0]["command_acc"] == "0.600 ± 0.141" and rows[0]["collapsed"] == "1/2"
    assert rows[0]["multihead"] is True and rows[1]["multihead"] is False and rows[0]["aug"] == "3x"
    assert rows[0]["sec_per_epoch"] == "1.5 ± 0.0" and rows[1]["epochs"] == "5"
    assert rows[2]["command_acc"] == "0.900"  # same test windows: one number, not a spread
    with open(tmp_path / "summary.csv") as f:
        assert [r["approach"] for r in csv.DictReader(f)] == ["demo", "other", "majority reference"]
    assert (tmp_path / "summary.png").read_bytes()[:4] == b"\x89PNG"


def test_unfinished_and_failed_runs_are_listed_not_fatal(tmp_path, capsys):
    make_run(tmp_path / "0_a")  # no metrics.json, no error.txt: still running or killed
    make_run(tmp_path / "1_b", error="")  # an empty error.txt must not crash either
    make_run(tmp_path / "10_c", error="DataError: data/x.csv: no rows\n")
    rows = summarize.main([str(tmp_path)])
    assert rows == []
    out = capsys.readouterr().out
    assert "(no finished runs)" in out and "0 finished" in out
    text = (tmp_path / "summary.md").read_text()
    assert "0_a: unfinished" in text and "1_b: failed: (empty error.txt)" in text
    assert text.index("1_b") < text.index("10_c")  # job folders in the order Hydra ran them
    assert "10_c: failed: DataError: data/x.csv: no rows" in text
    assert not (tmp_path / "summary.png").exists()


def test_not_a_folder_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit) as e:
        summarize.main([str(tmp_path / "nope")])
    assert e.value.code == 2


def test_trials_from_run_folders_and_optimization_results(tmp_path, capsys):
    for n, value in ((0, 0.25), (1, 0.5)):
        make_run(tmp_path / f"{n}_optuna", name="optuna", metrics={"val/token_macro_recall": value, "epochs": 1},
                 trial={"study": "s", "trial": n, "params": {**PARAMS, "aug.oversample_factor": n + 1}})
    (tmp_path / "optimization_results.yaml").write_text(
        "name: optuna\nbest_params:\n  aug.oversample_factor: 2\nbest_value: 0.5\n")
    rows = summarize.main([str(tmp_path)])
    assert [r["approach"] for r in rows] == ["optuna #0", "optuna #1", "majority reference"]  # never merged
    text = capsys.readouterr().out
    assert "best value 0.5000" in text and "'aug.oversample_factor': 2" in text
    with open(tmp_path / "trials.csv") as f:
        trials = list(csv.DictReader(f))
    assert [(t["trial"], t["value"], t["aug.oversample_factor"], t["run"]) for t in trials] == [
        ("0", "0.2500", "1", "finished"), ("1", "0.5000", "2", "finished")]
    assert trials[1]["model.loss_weights.command"] == "2.718" and trials[1]["folder"].endswith("1_optuna")


def test_study_from_storage_names_each_trials_folder(tmp_path, capsys):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    dist = {"aug.oversample_factor": optuna.distributions.IntDistribution(1, 7),
            "model.loss_weights.command": optuna.distributions.FloatDistribution(0.3, 30, log=True)}
    linked = make_run(tmp_path / "a" / "0_optuna", name="optuna", metrics={"epochs": 1})
    study.add_trial(optuna.trial.create_trial(params=PARAMS, distributions=dist, value=0.4,
                                              user_attrs={"folder": str(linked)}))
    # an older trial without the attribute: found by its parameters in the overrides
    old = {"aug.oversample_factor": 5, "model.loss_weights.command": 0.5}
    by_params = make_run(tmp_path / "b" / "0_optuna", name="optuna", error="boom",
                         overrides=["hparams_search=optuna", "aug.oversample_factor=5",
                                    "model.loss_weights.command=0.5"])
    study.add_trial(optuna.trial.create_trial(params=old, distributions=dist, state=optuna.trial.TrialState.FAIL))
    study.add_trial(optuna.trial.create_trial(params={**old, "aug.oversample_factor": 6}, distributions=dist,
                                              value=0.1))  # its folder is on another machine
    summarize.main([str(tmp_path), "--storage", storage])  # --study found: the storage holds one
    text = capsys.readouterr().out
    assert "Optuna study `s` (3 trials: 2 complete, 1 fail)" in text
    with open(tmp_path / "trials.csv") as f:
        trials = list(csv.DictReader(f))
    assert [t["state"] for t in trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert [t["folder"] for t in trials] == [str(linked), str(by_params), "-"]
    assert trials[0]["value"] == "0.4000" and trials[1]["value"] == "-"


def test_storage_with_several_studies_needs_a_name(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    for name in ("one", "two"):
        optuna.create_study(study_name=name, storage=storage)
    with pytest.raises(SystemExit, match="one, two"):
        summarize.main([str(tmp_path), "--storage", storage])
    summarize.main([str(tmp_path), "--storage", storage, "--study", "two"])
    assert "Optuna study `two` (0 trials" in (tmp_path / "summary.md").read_text()


def test_same_params_matches_the_sweepers_override_strings():
    overrides = {k: str(v) for k, v in PARAMS.items()} | {"seed": "0"}
    assert same_params(overrides, PARAMS)
    assert not same_params(overrides, {**PARAMS, "model.loss_weights.command": 2.7182})
    assert not same_params(overrides, {"model.loss_weights.type": 1.0}) and not same_params(overrides, {})


def test_display_url_hides_the_password_and_anchors_sqlite(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert display_url("postgresql://user:secret@db:5432/optuna") == "postgresql://user:***@db:5432/optuna"
    assert display_url("sqlite:///optuna.db") == f"sqlite:///{tmp_path.resolve() / 'optuna.db'}"
