"""Every experiment, search and launcher config composes; the four-approach multirun runs end to end."""

import json

import pytest
from hydra import compose, initialize_config_dir

from gcode_exp import summarize
from gcode_exp.config_checks import validate
from tests.conftest import ROOT, run_py

EXPERIMENTS = ("baseline", "augmented", "multihead", "multihead_aug")
EXPECTED = {  # experiment: (model, oversample factor)
    "baseline": ("baseline", 1),
    "augmented": ("baseline", 3),
    "multihead": ("multihead", 1),
    "multihead_aug": ("multihead", 3),
}


def compose_conf(*overrides: str, hydra: bool = False):
    with initialize_config_dir(config_dir=str(ROOT / "conf")):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra)


def test_every_experiment_file_is_tested():
    # the guide's four here; `recommended` and `new_programs` below; `cv` in tests/data/test_splits.py
    assert {p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml")} == {
        *EXPERIMENTS, "recommended", "new_programs", "cv"}


def test_recommended_is_what_run_py_runs_by_default():
    recommended, default = compose_conf("experiment=recommended"), compose_conf()
    assert recommended.name == "recommended" and recommended.model.name == "align"
    recommended.name = default.name
    assert recommended == default
    side = compose_conf("features=side_channel")  # the same model picks its side-channel key itself
    assert side.model.key == "auto" and side.features.elapsed and side.model == default.model
    for e in EXPERIMENTS:  # the guide's, as they were: no row head, no elapsed-time input
        cfg = compose_conf(f"experiment={e}")
        assert cfg.model.row_weight == 0 and not cfg.features.elapsed


def test_new_programs_is_the_best_token_model():
    cfg = compose_conf("experiment=new_programs", "features=side_channel")
    validate(cfg)
    assert cfg.model.name == "multihead" and cfg.model.row_weight > 0 and cfg.aug.oversample_factor == 3
    assert not cfg.features.elapsed and cfg.features.name == "side_channel"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_validates(experiment):
    cfg = compose_conf(f"experiment={experiment}", hydra=True)
    validate(cfg)
    model, factor = EXPECTED[experiment]
    assert cfg.name == experiment and cfg.vocab.name == "v2"
    assert cfg.model.name == model and cfg.aug.oversample_factor == factor
    assert (cfg.aug.noise > 0) == (factor > 1)  # augmentation comes with oversampling, none without
    cfg.hydra.job.num = 7  # set by the launcher at run time
    assert cfg.hydra.sweep.subdir == f"7_{experiment}"


def test_experiment_still_takes_command_line_overrides():
    cfg = compose_conf("experiment=multihead_aug", "aug=5x", "features=side_channel")
    assert cfg.aug.oversample_factor == 5 and cfg.features.name == "side_channel" and cfg.name == "multihead_aug"


def test_optuna_search_composes_and_tunes_the_right_keys(monkeypatch):
    monkeypatch.delenv("GCODE_EXP_OPTUNA_STORAGE", raising=False)
    cfg = compose_conf("hparams_search=optuna", hydra=True)
    validate(cfg)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.sampler._target_.endswith("TPESampler")
    assert isinstance(sweeper.sampler.seed, int)  # seeded: the same sweep folder replays the same suggestions
    params = sweeper.params
    assert params["aug.oversample_factor"].startswith("range(")
    for head in ("type", "command", "param_type", "param_value"):
        assert params[f"model.loss_weights.{head}"].startswith("tag(log, interval(")
    assert len(params) == 5
    assert sweeper.direction == "maximize" and sweeper.n_jobs == 1 and sweeper.n_trials >= 1
    assert sweeper.study_name and sweeper.storage == cfg.optuna_storage == "sqlite:///optuna.db"
    assert cfg.optimized_metric == "val/token_macro_recall"  # balanced: always answering G1 cannot win
    assert cfg.model.name == "multihead" and cfg.aug.noise > 0  # the weights and the factor have an effect


def test_token_model_search_tunes_architecture_and_optimiser(monkeypatch):
    monkeypatch.delenv("GCODE_EXP_OPTUNA_STORAGE", raising=False)
    cfg = compose_conf("hparams_search=token_model", "features=side_channel", hydra=True)
    validate(cfg)
    params = cfg.hydra.sweeper.params
    tuned = {k for k, v in params.items() if not (v.startswith("choice(") and "," not in v)}
    assert tuned == {"model.d_model", "model.enc_layers", "model.dec_layers", "model.dropout", "model.row_weight",
                     "trainer.lr", "trainer.weight_decay", "trainer/scheduler"}
    assert all(int(d) % cfg.model.n_heads == 0 for d in params["model.d_model"][7:-1].split(","))
    assert cfg.model.name == "multihead" and cfg.model.row_weight > 0 and not cfg.features.elapsed
    assert cfg.optimized_metric == "val/line_exact" and cfg.trainer.line_exact  # scored at the end of a trial
    assert cfg.hydra.sweeper.study_name == "gcode-exp-token_model-side_channel"


def test_optuna_storage_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("GCODE_EXP_OPTUNA_STORAGE", "postgresql://u:p@db.example:5432/optuna")
    cfg = compose_conf("hparams_search=optuna", hydra=True)
    assert cfg.hydra.sweeper.storage == "postgresql://u:p@db.example:5432/optuna"


@pytest.mark.parametrize("launcher", ["joblib", "submitit_local", "submitit_slurm", "slurm"])
def test_launchers_compose(launcher):
    cfg = compose_conf(f"hydra/launcher={launcher}", hydra=True)
    assert cfg.hydra.launcher._target_.startswith("hydra_plugins.")


def test_slurm_launcher_has_the_cluster_knobs():
    cfg = compose_conf("hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=1",
                       hydra=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.partition == "gpu" and launcher.gpus_per_node == 1
    assert {"timeout_min", "cpus_per_task", "mem_gb", "array_parallelism", "account", "qos"} <= set(launcher)


@pytest.mark.slow
def test_four_approach_multirun_and_summary(tmp_path):
    sweep = tmp_path / "sweep"
    res = run_py("-m", f"experiment={','.join(EXPERIMENTS)}", f"hydra.sweep.dir={sweep}", cache=tmp_path / "c")
    assert res.returncode == 0, res.stderr[-2000:]
    folders = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert folders == [f"{i}_{e}" for i, e in enumerate(EXPERIMENTS)]
    for i, e in enumerate(EXPERIMENTS):
        metrics = json.loads((sweep / f"{i}_{e}" / "metrics.json").read_text())
        assert metrics["epochs"] == 1 and 0 <= metrics["test/token_macro_recall"] <= 1
        assert (sweep / f"{i}_{e}" / "history.csv").exists()
    rows = summarize.main([str(sweep)])
    assert [r["approach"] for r in rows] == [*EXPERIMENTS, "majority reference"]
    assert [r["aug"] for r in rows[:4]] == ["none", "3x", "none", "3x"]
    assert [r["multihead"] for r in rows[:4]] == [False, False, True, True]
    assert all(r["epochs"] == "1" and r["seeds"] == 1 for r in rows[:4])
    csv_lines = (sweep / "summary.csv").read_text().splitlines()
    assert csv_lines[0].startswith("approach,") and len(csv_lines) == 6
    assert (sweep / "summary.png").read_bytes()[:4] == b"\x89PNG"

    # one run never finished, one failed: both are listed as such, the table keeps the others
    (sweep / "2_multihead" / "metrics.json").unlink()
    (sweep / "3_multihead_aug" / "metrics.json").unlink()
    (sweep / "3_multihead_aug" / "error.txt").write_text("RuntimeError: boom\ntraceback...\n")
    rows = summarize.main([str(sweep)])
    assert [r["approach"] for r in rows] == ["baseline", "augmented", "majority reference"]
    text = (sweep / "summary.md").read_text()
    assert "2_multihead: unfinished" in text and "3_multihead_aug: failed: RuntimeError: boom" in text
