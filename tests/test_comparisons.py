"""Multiruns, Optuna sweeps and the summary, through the real entry point (subprocesses)."""

import json
import os
import subprocess
import sys
from datetime import datetime

import optuna
import pytest
from hydra import compose, initialize_config_dir

from gcode_exp import summarize
from gcode_exp.config import validate
from tests.conftest import ROOT, SAMPLE, TINY

EXPERIMENTS = ("baseline", "augmented", "multihead", "multihead_aug")


def run_py(*args: str, cache, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "run.py"), f"data.dir={SAMPLE}", f"data.cache_dir={cache}", *TINY,
           "trainer.line_exact=false", *args]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiments_compose(experiment):
    with initialize_config_dir(config_dir=str(ROOT / "conf")):
        cfg = compose("config", overrides=[f"experiment={experiment}"])
    validate(cfg)
    assert cfg.name == experiment and cfg.vocab.name == "v2"
    assert (cfg.model.name == "multihead") == experiment.startswith("multihead")
    assert (cfg.aug.oversample_factor == 3) == (experiment in ("augmented", "multihead_aug"))


def test_optuna_search_composes_and_tunes_the_right_keys():
    with initialize_config_dir(config_dir=str(ROOT / "conf")):
        cfg = compose("config", overrides=["hparams_search=optuna"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert set(params) == {"aug.oversample_factor", *(f"model.loss_weights.{k}" for k in
                                                      ("type", "command", "param_type", "param_value"))}
    assert "log" in params["model.loss_weights.command"] and cfg.hydra.sweeper.direction == "maximize"
    assert cfg.optimized_metric.startswith("val/") and "macro" in cfg.optimized_metric
    assert cfg.model.name == "multihead" and cfg.hydra.sweeper.n_jobs >= 1


@pytest.mark.slow
def test_four_approach_multirun_and_summary(tmp_path):
    sweep = tmp_path / "sweep"
    res = run_py("-m", f"experiment={','.join(EXPERIMENTS)}", f"hydra.sweep.dir={sweep}", cache=tmp_path / "c")
    assert res.returncode == 0, res.stderr[-2000:]
    folders = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert folders == [f"{i}_{e}" for i, e in enumerate(EXPERIMENTS)]
    (sweep / "2_multihead" / "metrics.json").unlink()  # pretend one run never finished
    (sweep / "3_multihead_aug" / "error.txt").write_text("RuntimeError: boom\n")
    (sweep / "3_multihead_aug" / "metrics.json").unlink()
    rows = summarize.main([str(sweep)])
    approaches = [r["approach"] for r in rows]
    assert approaches == ["baseline", "augmented", "majority reference"]
    assert rows[1]["aug"] == "3x" and rows[0]["multihead"] is False
    text = (sweep / "summary.md").read_text()
    assert "2_multihead: unfinished" in text and "3_multihead_aug: failed: RuntimeError: boom" in text
    assert (sweep / "summary.csv").read_text().startswith("approach,") and (sweep / "summary.png").stat().st_size


def test_summary_groups_seeds_into_mean_and_sd(tmp_path):
    for seed, acc in ((0, 0.5), (1, 0.7)):
        run = tmp_path / f"run{seed}"
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "config.yaml").write_text(f"name: demo\nseed: {seed}\nmodel: {{name: multihead}}\n")
        (run / "metrics.json").write_text(json.dumps({"test/command_acc": acc, "majority/command_acc": 0.9,
                                                      "epochs": 3, "collapsed": seed == 1}))
    rows = summarize.main([str(tmp_path)])
    assert rows[0]["seeds"] == 2 and rows[0]["command_acc"] == "0.600 ± 0.141" and rows[0]["collapsed"] == "1/2"
    assert rows[1]["approach"] == "majority reference" and rows[1]["command_acc"].startswith("0.900")


@pytest.mark.slow
def test_optuna_sweep_resumes_study_and_records_failures(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    common = ["-m", "hparams_search=optuna", "hydra.sweeper.n_trials=2", f"optuna_storage={storage}"]
    for call in ("a", "b"):
        res = run_py(*common, f"hydra.sweep.dir={tmp_path / call}", cache=tmp_path / "c")
        assert res.returncode == 0, res.stderr[-2000:]
        assert (tmp_path / call / "optimization_results.yaml").exists()
    study = optuna.load_study(study_name="gcode-exp-multihead-all", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4
    factors = {t.params["aug.oversample_factor"] for t in study.trials}
    weights = {round(t.params["model.loss_weights.command"], 6) for t in study.trials}
    assert len(weights) == 4 and factors <= set(range(1, 8))  # the second call explored new points
    # a trial that fails (here: a metric that does not exist) is recorded as failed; the sweep goes on
    res = run_py(*common, "optimized_metric=val/nope", f"hydra.sweep.dir={tmp_path / 'c'}", cache=tmp_path / "c")
    study = optuna.load_study(study_name="gcode-exp-multihead-all", storage=storage)
    assert [t.state.name for t in study.trials][4:] == ["FAIL", "FAIL"]
    assert "optimized_metric=val/nope" in (tmp_path / "c" / "0_optuna" / "error.txt").read_text()
    trials = summarize.study_trials(storage, "gcode-exp-multihead-all", summarize.find_runs([tmp_path]))
    assert trials[0]["folder"].endswith("a/0_optuna") and trials[3]["folder"].endswith("b/1_optuna")


@pytest.mark.slow
def test_joblib_runs_two_optuna_trials_at_once(tmp_path):
    res = run_py("-m", "hparams_search=optuna", "hydra/launcher=joblib", "hydra.sweeper.n_jobs=2",
                 "hydra.launcher.n_jobs=2", "hydra.sweeper.n_trials=2", f"optuna_storage=sqlite:///{tmp_path}/s.db",
                 f"hydra.sweep.dir={tmp_path / 's'}", cache=tmp_path / "c")
    assert res.returncode == 0, res.stderr[-2000:]
    spans = []
    for i in (0, 1):
        folder = tmp_path / "s" / f"{i}_optuna"
        assert (folder / "metrics.json").exists()
        stamps = [line[1:24] for line in (folder / "run.log").read_text().splitlines() if line.startswith("[20")]
        spans.append((datetime.fromisoformat(stamps[0]), datetime.fromisoformat(stamps[-1])))
    (a0, a1), (b0, b1) = spans
    assert a0 < b1 and b0 < a1  # the two trials' logs overlap in time: they ran at once


@pytest.mark.slow
def test_wandb_offline_logs_one_run_per_job(tmp_path):
    res = run_py("-m", "logger=wandb", "seed=0,1", f"hydra.sweep.dir={tmp_path / 's'}", cache=tmp_path / "c",
                 timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    for i in (0, 1):
        runs = list((tmp_path / "s" / f"{i}_multihead-3x-v2" / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, runs
        assert (tmp_path / "s" / f"{i}_multihead-3x-v2" / "history.csv").exists()


def test_slurm_launcher_config_composes():
    with initialize_config_dir(config_dir=str(ROOT / "conf")):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.partition == "gpu"
    assert {"timeout_min", "cpus_per_task", "gpus_per_node", "mem_gb", "array_parallelism"} <= set(launcher)


@pytest.mark.slow
def test_submitit_local_runs_jobs_as_separate_processes(tmp_path):
    res = run_py("-m", "hydra/launcher=submitit_local", "seed=0,1", f"hydra.sweep.dir={tmp_path / 's'}",
                 cache=tmp_path / "c")
    assert res.returncode == 0, res.stderr[-2000:]
    assert all((tmp_path / "s" / f"{i}_multihead-3x-v2" / "metrics.json").exists() for i in (0, 1))
    assert list((tmp_path / "s" / ".submitit").iterdir())  # submitit's per-job folders: real separate jobs
