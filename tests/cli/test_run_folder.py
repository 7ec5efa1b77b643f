"""Run folders through the real entry point (`python run.py` subprocesses, tiny settings): a command
never changes what an earlier command left in its folder unless told to (`overwrite=true`,
`trainer.resume=true`), a refusal is one line with exit code 2, and a run killed with SIGKILL
resumes to the metrics of an uninterrupted run.

Interruptions come from the run itself: GCODE_EXP_KILL_AFTER_EPOCH=k makes the training process
SIGKILL itself right after epoch k's checkpoint and history are written (tests/faults/sitecustomize.py),
so no test depends on how fast the machine is."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, kill_after, run_py, run_py_command

pytestmark = pytest.mark.slow



def run_in(run_dir: Path, *args: str, cache: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """A trained model's run (the default model trains nothing), unless `args` choose one."""
    model = [] if any(a.startswith(("model=", "task=")) for a in args) else ["model=multihead"]
    return run_py(f"hydra.run.dir={run_dir}", *model, *args, cache=cache, env=env)


def ok(res: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert res.returncode == 0, res.stderr[-2000:]
    return res


def one_error_line(res: subprocess.CompletedProcess) -> str:
    """The only stderr line, `error: ...`; exit code 2; no traceback anywhere."""
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.stderr[-2000:]
    assert "Traceback" not in res.stdout + res.stderr
    return lines[0].removeprefix("error: ")


def hashes(folder: Path) -> dict[str, str]:
    """Every file under `folder` (hidden ones, .hydra/ included) by relative path: its SHA-256."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def history(run: Path) -> list[dict]:
    """history.csv without the per-epoch seconds."""
    with open(run / "history.csv") as f:
        return [{k: v for k, v in row.items() if k != "sec"} for row in csv.DictReader(f)]


def last_epoch(run: Path) -> int:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)["epoch"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, cache) -> Path:
    """A finished 2-epoch run with plots (never modified: tests work on copies)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    ok(run_in(run, "trainer.max_epochs=2", "trainer.plots=true", cache=cache))
    return run


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory, cache) -> Path:
    """A 2-epoch run killed right after epoch 1 (never modified: tests work on copies)."""
    run = tmp_path_factory.mktemp("interrupted") / "run"
    res = run_in(run, "trainer.max_epochs=2", cache=cache, env=kill_after(1))
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    assert last_epoch(run) == 1 and not (run / "metrics.json").exists()
    return run


def copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def test_sigterm_stops_training_in_one_line_and_its_last_pt_resumes(tmp_path, cache):
    """SIGTERM, as a scheduler sends it at its time limit, whenever it comes after the first epoch: one
    line, exit code 2, no traceback, and the run resumes from the last whole epoch's last.pt."""
    run = tmp_path / "run"
    cmd, env = run_py_command(f"hydra.run.dir={run}", "model=multihead", "data.stride=8", "trainer.max_epochs=200",
                              "trainer.patience=1000", cache=cache)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (run / "checkpoints" / "last.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    line = one_error_line(subprocess.CompletedProcess(cmd, proc.returncode, out, err))
    assert line == "stopped by SIGTERM (a scheduler's time limit, or kill)"
    done = last_epoch(run)
    assert done >= 1 and not (run / "metrics.json").exists()
    resumed = ok(run_in(run, "data.stride=8", f"trainer.max_epochs={done + 1}", "trainer.patience=1000",
                        "trainer.resume=true", cache=cache))
    assert f"resuming after epoch {done} from {run / 'checkpoints' / 'last.pt'}" in resumed.stdout
    assert json.loads((run / "metrics.json").read_text())


def test_kill_9_mid_training_then_resume_matches_an_uninterrupted_run(tmp_path, cache):
    train = ["data.stride=8", "trainer.max_epochs=5", "trainer.patience=100"]
    ref, run = tmp_path / "ref", tmp_path / "cut"
    ok(run_in(ref, *train, cache=cache))

    killed = run_in(run, *train, cache=cache, env=kill_after(2))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert last_epoch(run) == 2 and len(history(run)) == 2 and not (run / "metrics.json").exists()

    resumed = ok(run_in(run, *train, "trainer.resume=true", cache=cache))
    assert f"resuming after epoch 2 from {run / 'checkpoints' / 'last.pt'}" in resumed.stdout
    want = json.loads((ref / "metrics.json").read_text())
    got = json.loads((run / "metrics.json").read_text())
    want.pop("sec_per_epoch"), got.pop("sec_per_epoch")
    assert got == want
    assert history(run) == history(ref)


@pytest.mark.parametrize("args,message", [
    (["seed=1", "model.d_model=64"],
     "{run} already holds finished results (metrics.json); pass overwrite=true to replace them"),
    (["task=prepare"], "{run} already holds finished results (metrics.json)"),
    (["task=eval", "ckpt_path={run}/checkpoints/best.pt", "trainer.resume=true"],
     "{run} already holds finished results (metrics.json)"),
    (["trainer.resume=true"], "trainer.resume=true: cannot resume {run}: it already finished (metrics.json)"),
], ids=["other-settings", "prepare", "eval-with-resume", "resume"])
def test_finished_folder_is_left_byte_for_byte(tmp_path, cache, finished_run, args, message):
    run = copy(finished_run, tmp_path)
    before = hashes(run)
    assert {".hydra/config.yaml", "run.log", "metrics.json", "checkpoints/last.pt"} <= set(before)
    line = one_error_line(run_in(run, *(a.format(run=run) for a in args), cache=cache))
    assert line.startswith(message.format(run=run)), line
    assert hashes(run) == before


def test_plain_rerun_into_an_interrupted_folder_asks_for_resume(tmp_path, cache, interrupted_run):
    run = copy(interrupted_run, tmp_path)
    before = hashes(run)
    line = one_error_line(run_in(run, "trainer.max_epochs=2", cache=cache))
    assert line == (f"{run} holds an interrupted run (checkpoints/last.pt); pass trainer.resume=true "
                    "to continue it or overwrite=true to start afresh")
    assert hashes(run) == before


def test_overwrite_replaces_a_finished_run_and_leaves_nothing_of_it(tmp_path, cache, finished_run):
    run = copy(finished_run, tmp_path)
    old = set(hashes(run))
    assert any(name.startswith("plots/") for name in old)
    ok(run_in(run, "overwrite=true", cache=cache))  # 1 epoch, no plots
    new = hashes(run)
    assert set(new) == {name for name in old if not name.startswith("plots/")}  # the same files, minus plots/
    assert not (run / "plots").exists()
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 1 and len(history(run)) == 1
    assert last_epoch(run) == 1
    log = (run / "run.log").read_text()
    assert " epoch   1 |" in log and " epoch   2 |" not in log  # the old run's log is gone, not appended to
    assert "overwrite=true" in (run / ".hydra" / "overrides.yaml").read_text()


@pytest.mark.parametrize("args,message", [
    (["data.dir={bad}"], "{bad}/x_001.csv: missing column 'gcode_string'"),
    (["task=eval", "ckpt_path={run}/checkpoints/best.pt"], "ckpt_path={run}/checkpoints/best.pt: inside the run"),
], ids=["failing-run", "its-own-checkpoint"])
def test_failed_overwrite_leaves_the_earlier_run_byte_for_byte(tmp_path, cache, finished_run, args, message):
    """overwrite=true replaces a run only once the new one has finished: a new run that fails, or one
    that would read the checkpoint it replaces, leaves the earlier run as it was."""
    run, bad = copy(finished_run, tmp_path), tmp_path / "bad"
    bad.mkdir()
    (bad / "x_001.csv").write_text("a,b\n1,2\n")
    before = hashes(run)
    line = one_error_line(run_in(run, "overwrite=true", *(a.format(run=run, bad=bad) for a in args), cache=cache))
    assert line.startswith(message.format(run=run, bad=bad)), line
    assert hashes(run) == before and not (run / ".replaced").exists()


def test_resume_with_another_model_is_refused_naming_the_key(tmp_path, cache, interrupted_run):
    run = copy(interrupted_run, tmp_path)
    before = hashes(run)
    line = one_error_line(run_in(run, "trainer.max_epochs=2", "trainer.resume=true", "model.d_model=64",
                                 cache=cache))
    assert line == ("trainer.resume=true: the run was trained with other settings (model.d_model); "
                    "resume with the same ones, or start a new run")
    assert hashes(run) == before  # still the interrupted run, resumable as it was


def test_resume_takes_the_interrupted_runs_own_settings(tmp_path, cache, interrupted_run):
    """`trainer.resume=true` alone continues the run as it was trained (multihead here), whatever the
    defaults are now (the nearest model)."""
    run = copy(interrupted_run, tmp_path)
    ok(run_py(f"hydra.run.dir={run}", "trainer.max_epochs=2", "trainer.resume=true", cache=cache))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["n_params"] > 0
    assert "name: multihead" in (run / ".hydra" / "config.yaml").read_text()


def test_resume_of_a_run_older_than_a_config_key(tmp_path, cache, interrupted_run):
    """A run started before `data.train_share` existed resumes with the key's default, not a refusal."""
    run = copy(interrupted_run, tmp_path)
    last = run / "checkpoints" / "last.pt"
    blob = torch.load(last, weights_only=True)
    del blob["config"]["data"]["train_share"]
    torch.save(blob, last)
    ok(run_py(f"hydra.run.dir={run}", "trainer.max_epochs=2", "trainer.resume=true", cache=cache))
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 2


def test_resume_applies_a_changed_learning_rate(tmp_path, cache, interrupted_run):
    """...and takes another data.workers or cache folder: they change how recordings are read, not what."""
    run = copy(interrupted_run, tmp_path)
    old = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["optimizer"]["param_groups"]
    assert {g["lr"] for g in old} == {0.001}
    res = ok(run_in(run, "trainer.max_epochs=2", "trainer.resume=true", "trainer.lr=0.0005", "data.workers=1",
                    cache=cache))
    assert "resuming after epoch 1 from" in res.stdout
    assert "resume: trainer.lr changed to 0.0005" in (run / "run.log").read_text()
    blob = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert blob["epoch"] == 2 and {g["lr"] for g in blob["optimizer"]["param_groups"]} == {0.0005}
    assert blob["config"]["trainer"]["lr"] == 0.0005
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 2


def test_a_failed_resume_attempt_leaves_the_run_resumable(tmp_path, cache, interrupted_run):
    """An attempt that fails after taking the folder (here: a device this machine lacks) says why in
    error.txt; the next resume continues the run and leaves no stale error.txt beside metrics.json."""
    run = copy(interrupted_run, tmp_path)
    absent = "cuda" if torch.backends.mps.is_available() else "mps"
    resume = ["trainer.max_epochs=2", "trainer.resume=true"]
    line = one_error_line(run_in(run, *resume, f"hardware.device={absent}", cache=cache))
    assert line.startswith(f"hardware.device={absent}: no such device")
    assert (run / "error.txt").read_text().strip() == line and last_epoch(run) == 1
    ok(run_in(run, *resume, cache=cache))
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 2 and not (run / "error.txt").exists()


def test_multirun_into_an_earlier_sweep_folder_is_refused_at_once(tmp_path, cache):
    """Hydra would rewrite the earlier sweep's multirun.yaml before any job's `claim` refuses its folder."""
    sweep = tmp_path / "s"
    ok(run_py("-m", "task=prepare", "seed=0,1", f"hydra.sweep.dir={sweep}", cache=cache))
    before = hashes(sweep)
    assert {"multirun.yaml", "0_align-none-v2/data_summary.json", "1_align-none-v2/run.log"} <= set(before)

    line = one_error_line(run_py("-m", "task=prepare", "seed=2,3", f"hydra.sweep.dir={sweep}", cache=cache))
    assert line == (f"{sweep} already holds an earlier sweep (multirun.yaml); pass overwrite=true to replace it, "
                    "trainer.resume=true to continue its interrupted jobs, or choose another hydra.sweep.dir")
    assert hashes(sweep) == before  # multirun.yaml included

    ok(run_py("-m", "task=prepare", "seed=2,3", "overwrite=true", f"hydra.sweep.dir={sweep}", cache=cache))
    assert "seed=2,3" in (sweep / "multirun.yaml").read_text()
    assert "seed: 3" in (sweep / "1_align-none-v2" / ".hydra" / "config.yaml").read_text()


def test_sweep_overwrite_replaces_the_whole_earlier_sweep_once_a_job_works(tmp_path, cache):
    """overwrite=true into a sweep folder: the earlier sweep's job folders go (none left to mix into
    summaries) when a job of the new one works; when every new job fails, they come back as they were."""
    sweep, bad = tmp_path / "s", tmp_path / "bad"
    ok(run_py("-m", "task=prepare", "seed=0,1", f"hydra.sweep.dir={sweep}", cache=cache))
    ok(run_py("-m", "task=prepare", "model=baseline", "overwrite=true", f"hydra.sweep.dir={sweep}", cache=cache))
    assert sorted(os.listdir(sweep)) == ["0_baseline-3x-v2", "multirun.yaml"]

    before = hashes(sweep)
    bad.mkdir()
    (bad / "x_001.csv").write_text("a,b\n1,2\n")
    failed = run_py("-m", "task=prepare", "seed=5", "overwrite=true", f"data.dir={bad}", f"hydra.sweep.dir={sweep}",
                    cache=cache)
    assert failed.returncode == 2
    assert {k: v for k, v in hashes(sweep).items() if not k.startswith("0_align")} == before
    assert not (sweep / ".replaced").exists()


def test_multirun_into_a_sweep_folder_that_is_a_file_is_one_line(tmp_path, cache):
    (tmp_path / "s").write_text("a file where the sweep folder should be")
    line = one_error_line(run_py("-m", "task=prepare", "seed=0,1", f"hydra.sweep.dir={tmp_path / 's'}", cache=cache))
    assert line == f"{tmp_path / 's'}: the sweep folder is a file; choose another hydra.sweep.dir"


@pytest.mark.parametrize("sweep", [["task=prepare", "data.window=0,-4"],
                                   ["hparams_search=optuna", "hydra.sweeper.n_trials=2", "optimized_metric=val/nope",
                                    "optuna_storage=sqlite:///{tmp}/o.db"]], ids=["basic", "optuna"])
def test_a_sweep_whose_every_job_failed_exits_2(tmp_path, cache, sweep):
    """run.py returns NaN for a failed job so that a sweep goes on; if none succeeded, the command fails.
    (Optuna's sweeper alone ends such a sweep with a traceback, "Record does not exist", exit code 1.)"""
    s = tmp_path / "s"
    res = run_py("-m", *(a.format(tmp=tmp_path) for a in sweep), f"hydra.sweep.dir={s}", cache=cache)
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert res.returncode == 2 and "Traceback" not in res.stdout + res.stderr, res.stderr[-2000:]
    jobs = sorted(p.parent for p in s.glob("*/error.txt"))
    assert len(jobs) == 2 and len(errors) == 3  # each job's reason, then the summary
    assert errors[-1] == f"error: all 2 jobs of the sweep failed: see error.txt in each job folder of {s}"


def test_a_sweep_where_one_job_succeeded_exits_0(tmp_path, cache):
    s = tmp_path / "s"
    res = ok(run_py("-m", "task=prepare", "data.window=0,32", f"hydra.sweep.dir={s}", cache=cache))
    assert [line for line in res.stderr.splitlines() if line.startswith("error: ")] == [
        "error: data.window=0: must be a whole number >= 1"]
    assert (s / "0_align-none-v2" / "error.txt").exists() and (s / "1_align-none-v2" / "data_summary.json").exists()


def test_resume_without_a_checkpoint_is_one_line(tmp_path, cache):
    run = tmp_path / "run"
    line = one_error_line(run_in(run, "trainer.resume=true", cache=cache))
    assert line == f"trainer.resume=true: cannot resume {run}: it holds no checkpoints/last.pt"
    assert [p.name for p in run.iterdir()] == ["error.txt"]  # why it failed; no config, log or checkpoint


