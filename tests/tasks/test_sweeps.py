"""Optuna sweeps, launchers and wandb through the real entry point (subprocesses, tiny data, 1 epoch)."""

import json
import os
import subprocess
import sys
import uuid

import optuna
import pytest
import yaml

from gcode_exp.summary.runs import find_runs
from gcode_exp.summary.trials import study_trials
from tests.conftest import ROOT, SAMPLE, TINY, run_py

STUDY = "gcode-exp-multihead-all"
SEARCHED = {"aug.oversample_factor", "model.loss_weights.type", "model.loss_weights.command",
            "model.loss_weights.param_type", "model.loss_weights.param_value"}
pytestmark = pytest.mark.slow


def trial_file(folder) -> dict:
    return json.loads((folder / "optuna_trial.json").read_text())


def test_sweep_run_twice_continues_one_study_and_records_failures(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    common = ["-m", "hparams_search=optuna", "hydra.sweeper.n_trials=2", f"optuna_storage={storage}"]
    for call in ("a", "b"):
        res = run_py(*common, f"hydra.sweep.dir={tmp_path / call}", cache=tmp_path / "cache")
        assert res.returncode == 0, res.stderr[-2000:]
        assert "best_value" in (tmp_path / call / "optimization_results.yaml").read_text()
    trials = optuna.load_study(study_name=STUDY, storage=storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    assert all(set(t.params) == SEARCHED for t in trials)
    assert all(t.params["aug.oversample_factor"] in range(1, 8) for t in trials)
    assert len({t.params["model.loss_weights.command"] for t in trials}) == 4  # the second call explored anew
    # every trial names the folder it wrote, and the folder names the trial
    folders = [t.user_attrs["folder"] for t in trials]
    assert folders == [str(tmp_path / c / f"{i}_optuna") for c in "ab" for i in (0, 1)]
    for t, folder in zip(trials, folders):
        info = trial_file(tmp_path / folder)
        assert (info["study"], info["trial"], info["params"]) == (STUDY, t.number, t.params)
        metrics = json.loads((tmp_path / folder / "metrics.json").read_text())
        assert t.value == pytest.approx(metrics["val/token_macro_recall"])  # the value Optuna got

    # a trial that fails (here: the metric to optimise does not exist) is recorded as failed; the sweep goes on,
    # and ends with exit code 2 because every one of its jobs (here, the only one) failed
    res = run_py(*common, "hydra.sweeper.n_trials=1", "optimized_metric=val/nope",
                 f"hydra.sweep.dir={tmp_path / 'c'}", cache=tmp_path / "cache")
    assert res.returncode == 2 and res.stderr.splitlines()[-1].startswith("error: all 1 jobs of the sweep failed"), \
        res.stderr[-2000:]
    trials = optuna.load_study(study_name=STUDY, storage=storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4 + ["FAIL"]
    assert "optimized_metric=val/nope" in (tmp_path / "c" / "0_optuna" / "error.txt").read_text()
    assert trials[4].user_attrs["folder"] == str(tmp_path / "c" / "0_optuna")

    rows = study_trials(storage, STUDY, find_runs([tmp_path]))
    assert [r["state"] for r in rows] == ["COMPLETE"] * 4 + ["FAIL"]
    assert [r["folder"] for r in rows] == [*folders, str(tmp_path / "c" / "0_optuna")]


def test_joblib_runs_two_trials_at_once(tmp_path):
    # each trial waits at a file barrier (tests/hydra_barrier.py) until both trials' processes reached it:
    # both passing proves they ran at the same time, in two processes, however busy the machine is
    barrier = tmp_path / "barrier"
    res = run_py("-m", "hparams_search=optuna", "hydra/launcher=joblib", "hydra.sweeper.n_jobs=2",
                 "hydra.launcher.n_jobs=2", "hydra.sweeper.n_trials=2",
                 "+hydra.callbacks.barrier._target_=tests.hydra_barrier.Barrier",
                 f"+hydra.callbacks.barrier.dir={barrier}", "+hydra.callbacks.barrier.parties=2",
                 f"optuna_storage=sqlite:///{tmp_path}/s.db", f"hydra.sweep.dir={tmp_path / 's'}", cache=tmp_path / "c",
                 env={"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Joblib.Parallel(n_jobs=2" in res.stdout + res.stderr
    infos = [trial_file(tmp_path / "s" / f"{i}_optuna") for i in (0, 1)]
    assert sorted(info["trial"] for info in infos) == [0, 1]
    pids = {info["pid"] for info in infos}
    assert len(pids) == 2 and os.getpid() not in pids  # two worker processes, neither of them the sweeper
    # the trials' own processes both passed the barrier
    assert {int(p.name): p.read_text().strip() for p in barrier.iterdir()} == {pid: "passed" for pid in pids}


@pytest.mark.parametrize("launcher", [[], ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]],
                         ids=["basic", "joblib"])
def test_wandb_offline_one_run_per_job(tmp_path, launcher):
    # the basic launcher runs both jobs in one process (runs merge unless each job finishes its own);
    # joblib runs them in two at once (hydra#1320). No network: an unreachable server must not matter.
    res = run_py("-m", "model=multihead", "logger=wandb", "seed=0,1", *launcher, f"hydra.sweep.dir={tmp_path / 's'}",
                 cache=tmp_path / "c", timeout=240, env={"WANDB_MODE": "offline", "WANDB_BASE_URL": "http://127.0.0.1:9"})
    assert res.returncode == 0, res.stderr[-2000:]
    run_ids = set()
    for i in (0, 1):
        job = tmp_path / "s" / f"{i}_multihead-3x-v2"
        runs = list((job / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, runs  # finished per job: the second job did not log into the first run
        run_ids.add(runs[0].name.rsplit("-", 1)[-1])
        assert list(runs[0].glob("run-*.wandb")) and (job / "history.csv").exists()
        assert json.loads((job / "metrics.json").read_text())["epochs"] == 1
    assert len(run_ids) == 2


def test_submitit_local_runs_jobs_as_separate_processes(tmp_path):
    res = run_py("-m", "model=multihead", "hydra/launcher=submitit_local", "seed=0,1",
                 f"hydra.sweep.dir={tmp_path / 's'}", cache=tmp_path / "c")
    assert res.returncode == 0, res.stderr[-2000:]
    assert all((tmp_path / "s" / f"{i}_multihead-3x-v2" / "metrics.json").exists() for i in (0, 1))
    logs = list((tmp_path / "s" / ".submitit").rglob("*_log.out"))
    assert len(logs) == 2  # one submitit job (its own process and log) per Hydra job


def start_workers(tmp_path, names, url: str, study: str, n_trials: int) -> list[tuple[int, str]]:
    """Optuna sweep workers on `url`, all started at once, each in its own sweep folder: (exit code, output)."""
    env = {**os.environ, "GCODE_EXP_OPTUNA_STORAGE": url}  # the cluster way: no storage on the command line
    workers = []
    for w in names:
        cmd = [sys.executable, str(ROOT / "run.py"), "-m", "hparams_search=optuna",
               f"hydra.sweeper.n_trials={n_trials}", f"hydra.sweeper.study_name={study}",
               f"hydra.sweep.dir={tmp_path / w}", f"data.dir={SAMPLE}",
               f"data.cache_dir={tmp_path / 'cache'}", *TINY, "trainer.line_exact=false", "hardware.threads=1"]
        workers.append(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env=env))
    outputs = [p.communicate(timeout=300)[0] for p in workers]
    return [(p.returncode, out) for p, out in zip(workers, outputs)]


def check_study(tmp_path, url: str, study: str, folders_of: dict[str, int]) -> None:
    """Every trial of `study` once, COMPLETE, in its own folder: `folders_of[w]` jobs of worker `w`."""
    trials = optuna.load_study(study_name=study, storage=url).trials
    assert sorted(t.number for t in trials) == list(range(sum(folders_of.values())))  # each trial once
    assert all(t.state.name == "COMPLETE" for t in trials)
    folders = [t.user_attrs["folder"] for t in trials]
    assert sorted(os.path.relpath(f, tmp_path) for f in folders) == sorted(
        os.path.join(w, f"{i}_optuna") for w, n in folders_of.items() for i in range(n))  # no folder shared
    for t in trials:
        assert trial_file(tmp_path / t.user_attrs["folder"])["trial"] == t.number
    rows = study_trials(url, study, [])  # folders straight from the storage
    assert [r["folder"] for r in rows] == folders


def test_two_concurrent_workers_share_one_postgresql_study(tmp_path, pg_url):
    study = f"test-{uuid.uuid4().hex[:8]}"
    try:  # the study does not exist yet: the two workers race to create it
        results = start_workers(tmp_path, ("w0", "w1"), pg_url, study, n_trials=2)
        assert [rc for rc, _ in results] == [0, 0], "".join(out[-1500:] for _, out in results)
        check_study(tmp_path, pg_url, study, {"w0": 2, "w1": 2})
    finally:
        optuna.delete_study(study_name=study, storage=pg_url)


@pytest.fixture
def new_pg_database(pg_url):
    """The URL of a brand-new, empty database on the server of GCODE_EXP_PG_URL (dropped afterwards)."""
    import sqlalchemy
    from sqlalchemy.engine import make_url

    name = f"gcode_exp_test_{uuid.uuid4().hex[:8]}"
    admin = sqlalchemy.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(pg_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def test_workers_started_together_on_a_new_postgresql_database_all_run(tmp_path, new_pg_database):
    """No setup step: four workers at the same moment all create Optuna's tables in the empty database;
    PostgreSQL lets one do it and refuses the others (UniqueViolation), which try again (CreateStorage)."""
    names = ("w0", "w1", "w2", "w3")
    results = start_workers(tmp_path, names, new_pg_database, "gcode-exp-race", n_trials=1)
    outputs = "".join(out[-1500:] for _, out in results)
    assert [rc for rc, _ in results] == [0] * 4 and "Traceback" not in outputs, outputs
    check_study(tmp_path, new_pg_database, "gcode-exp-race", dict.fromkeys(names, 1))


def test_sweep_over_models_takes_keys_the_default_model_lacks(tmp_path):
    """`-m model=baseline,nearest model.row_weight=0`: Hydra checks plain keys against the default
    model (nearest, no row_weight) before any job runs; the sweep must still run each model with it,
    and a misspelt key is still refused, by name, in every job."""
    sweep = tmp_path / "sweep"
    res = run_py("-m", "task=prepare", "model=baseline,nearest", "model.row_weight=0", f"hydra.sweep.dir={sweep}",
                 cache=tmp_path / "cache")
    assert res.returncode == 0, res.stderr[-2000:]
    configs = [yaml.safe_load((sweep / job / ".hydra" / "config.yaml").read_text())["model"]
               for job in sorted(os.listdir(sweep)) if (sweep / job / ".hydra").is_dir()]
    assert [(c["name"], c.get("row_weight")) for c in configs] == [("baseline", 0), ("nearest", 0)], configs

    typo = run_py("-m", "task=prepare", "model=baseline,nearest", "model.row_wieght=0",
                  f"hydra.sweep.dir={tmp_path / 'typo'}", cache=tmp_path / "cache")
    refused = [line for line in typo.stderr.splitlines() if line.startswith("error: model.row_wieght=0")]
    assert len(refused) == 2 and "did you mean model.row_weight?" in refused[0], typo.stderr[-2000:]


class FakeTrainer:
    """What a callback may touch of the Trainer: its reason to stop and its loop state."""

    def __init__(self) -> None:
        self.stop_reason, self.state = None, {}


def study_with_a_perfect_trial(url: str, name: str) -> optuna.Study:
    """A study whose one finished trial scored 1.0 at every epoch: any trial below it is the one behind."""
    study = optuna.create_study(study_name=name, storage=url, direction="maximize")
    study.add_trial(optuna.trial.create_trial(value=1.0, intermediate_values={1: 1.0, 2: 1.0, 3: 1.0}))
    return study


@pytest.mark.parametrize("value, pruned", [(0.2, True), (1.0, False)])
def test_a_trial_behind_the_earlier_ones_is_stopped_and_says_after_which_epoch(tmp_path, value, pruned):
    from gcode_exp.sweeps import PruneTrial, TrialLink, make_pruner

    url = f"sqlite:///{tmp_path / 'p.db'}"
    study = study_with_a_perfect_trial(url, "s")
    running = study.ask()
    trainer = FakeTrainer()
    callback = PruneTrial(TrialLink(url, "s", running.number), make_pruner("median", 3, 1, 1), "val/x")
    callback.on_epoch_end(trainer, {"epoch": 1, "val/x": value})
    assert (trainer.stop_reason is not None) == pruned
    stored = optuna.load_study(study_name="s", storage=url).trials[-1]
    assert stored.intermediate_values == {1: value}  # reported, pruned or not
    assert stored.user_attrs.get("pruned_epoch") == (1 if pruned else None)
    if pruned:
        assert trainer.state["pruned_epoch"] == 1 and "after epoch 1 (val/x 0.2000)" in trainer.stop_reason


def test_a_pruned_sweep_stops_its_trials_early_and_summarize_counts_them(tmp_path):
    """`hparams_search.pruner=median` on a study whose earlier trial did better at every epoch: each new trial
    stops after its warm-up epoch, is recorded COMPLETE with the value it reached and its pruned epoch, and
    summarize says how many were pruned and the training time that saved."""
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study_with_a_perfect_trial(storage, STUDY)
    res = run_py("-m", "hparams_search=optuna", "hydra.sweeper.n_trials=2", f"optuna_storage={storage}",
                 "trainer.max_epochs=3", "hparams_search.pruner=median", "hparams_search.startup_trials=1",
                 "hparams_search.warmup_epochs=1", f"hydra.sweep.dir={tmp_path / 's'}", cache=tmp_path / "cache")
    assert res.returncode == 0, res.stderr[-2000:]
    trials = optuna.load_study(study_name=STUDY, storage=storage).trials[1:]
    assert [t.state.name for t in trials] == ["COMPLETE"] * 2
    assert [t.user_attrs["pruned_epoch"] for t in trials] == [1, 1] and all(len(t.intermediate_values) == 1
                                                                             for t in trials)
    for i in (0, 1):
        metrics = json.loads((tmp_path / "s" / f"{i}_optuna" / "metrics.json").read_text())
        assert metrics["epochs"] == 1 and metrics["pruned_epoch"] == 1
    out = subprocess.run([sys.executable, "-m", "gcode_exp.summarize", str(tmp_path / "s")], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0 and "pruned: 2 of 2 trials" in out.stdout, out.stdout + out.stderr
