"""Files from someone else run no code, and a storage URL's password stays out of everything a run leaves,
through `python run.py` as users type it (the sample data, the default model: it trains nothing, seconds).

A shared checkpoint or run folder names classes in its stored config; `task=eval`, `task=predict` and
`trainer.resume=true` build only gcode_exp's, those of `trusted_modules` and those the command line names
(gcode_exp/trust.py). Each malicious config here would create a marker file if it ran. docs/SECURITY.md
says what is trusted and how."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gcode_exp.training.checkpoint import FORMAT
from tests.cli.test_run_folder import hashes, one_error_line
from tests.conftest import ROOT, default_run_and_two_programs, run_py

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> dict:
    """A finished run of the default model (its checkpoints are what a colleague would share) and a folder
    of two recordings to score; never modified (tests tamper with copies)."""
    return default_run_and_two_programs(tmp_path_factory.mktemp("shared"))


def tamper(src: Path, dst: Path, key: str, value) -> Path:
    """A copy of checkpoint `src` whose stored config has `value` at the dotted `key` (made if absent)."""
    blob = torch.load(src, weights_only=True)
    node = blob["config"]
    *parents, last = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save(blob, dst)
    return dst


def malicious(marker: Path) -> dict[str, tuple[str, object, str]]:
    """id -> (key, value, the `_target_` key the refusal names): each would create `marker` if built."""
    touch = f"touch {marker}"
    return {
        "os.system-as-encoder": ("model.encoder", {"_target_": "os.system", "_args_": [touch]},
                                 "model.encoder._target_=os.system"),
        "builtins.exec-as-aug": ("aug", {"_target_": "builtins.exec", "_args_": [f"open({str(marker)!r}, 'w')"]},
                                 "aug._target_=builtins.exec"),
        "torch.hub.load-as-encoder": ("model.encoder", {"_target_": "torch.hub.load", "_args_": ["evil/repo", "m"]},
                                      "model.encoder._target_=torch.hub.load"),
        "a class outside gcode_exp": ("model._target_", "subprocess.Popen", "model._target_=subprocess.Popen"),
        "Popen reached through a gcode_exp module": ("model._target_", "gcode_exp.bench_scale.subprocess.Popen",
                                                     "model._target_=gcode_exp.bench_scale.subprocess.Popen"),
        "nested under the encoder": ("model.encoder.kernel", {"_target_": "os.system", "_args_": [touch]},
                                     "model.encoder.kernel._target_=os.system"),
    }


CASES = list(malicious(Path("m")))


@pytest.mark.parametrize("case", CASES)
def test_a_checkpoint_that_names_code_is_refused_by_eval(tmp_path, shared, case):
    marker = tmp_path / "ran"
    key, value, names = malicious(marker)[case]
    ckpt = tamper(shared["ckpt"], tmp_path / "shared" / "best.pt", key, value)
    res = run_py("task=eval", f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / 'eval'}", cache=shared["cache"])
    line = one_error_line(res)
    assert line.startswith(f"ckpt_path={ckpt}: {names}: "), line
    assert not marker.exists()


@pytest.mark.parametrize("case", ["os.system-as-encoder", "builtins.exec-as-aug"])
def test_a_checkpoint_that_names_code_is_refused_by_predict(tmp_path, shared, case):
    marker = tmp_path / "ran"
    key, value, names = malicious(marker)[case]
    ckpt = tamper(shared["ckpt"], tmp_path / "shared" / "best.pt", key, value)
    res = run_py("task=predict", f"ckpt_path={ckpt}", f"data.dir={shared['two']}",
                 f"hydra.run.dir={tmp_path / 'predict'}", cache=shared["cache"])
    line = one_error_line(res)
    assert line.startswith(f"ckpt_path={ckpt}: {names}: "), line
    assert not marker.exists() and not (tmp_path / "predict" / "predictions").exists()


def test_a_fallback_checkpoint_that_names_code_is_refused_by_its_key(tmp_path, shared):
    """predict.fallback is a checkpoint someone may share too: the same rules, the refusal naming that key."""
    marker = tmp_path / "ran"
    key, value, names = malicious(marker)["os.system-as-encoder"]
    bad = tamper(shared["ckpt"], tmp_path / "shared" / "fallback.pt", key, value)
    res = run_py("task=predict", f"ckpt_path={shared['ckpt']}", f"predict.fallback={bad}", f"data.dir={shared['two']}",
                 f"hydra.run.dir={tmp_path / 'predict'}", cache=shared["cache"])
    line = one_error_line(res)
    assert line.startswith(f"predict.fallback={bad}: {names}: "), line
    assert not marker.exists() and not (tmp_path / "predict" / "predictions").exists()


def shared_run_folder(shared: dict, tmp_path: Path) -> Path:
    """A copy of the shared run, made interrupted (no metrics.json), as one resumes it."""
    run = Path(shutil.copytree(shared["ws"] / "train", tmp_path / "run"))
    (run / "metrics.json").unlink()
    return run


@pytest.mark.parametrize("case", ["builtins.exec-as-aug", "torch.hub.load-as-encoder"])
def test_a_tampered_run_folder_is_refused_by_resume_and_left_as_it_was(tmp_path, shared, case):
    """Its last.pt and its recorded configs (.hydra/config.yaml, resolved_config.yaml) name code: resume
    refuses the checkpoint in one line naming it, before anything is written; the YAML files are never
    built from (the run's own checkpoint decides), nor read by summarize as code."""
    marker = tmp_path / "ran"
    key, value, names = malicious(marker)[case]
    run = shared_run_folder(shared, tmp_path)
    tamper(run / "checkpoints" / "last.pt", run / "checkpoints" / "last.pt", key, value)
    for recorded in (run / ".hydra" / "config.yaml", run / "resolved_config.yaml"):
        recorded.write_text(recorded.read_text() + f"evil:\n  _target_: os.system\n  _args_: ['touch {marker}']\n")
    before = hashes(run)
    res = run_py("trainer.resume=true", f"hydra.run.dir={run}", cache=shared["cache"])
    line = one_error_line(res)
    assert line.startswith(f"trainer.resume=true: {run}: checkpoints/last.pt: {names}: "), line
    assert hashes(run) == before and not marker.exists()
    summary = subprocess.run([sys.executable, "-m", "gcode_exp.summarize", str(run)], cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
    assert summary.returncode == 0, summary.stderr[-2000:]
    assert not marker.exists()


def test_a_run_folder_whose_recorded_configs_name_code_evaluates_its_own_checkpoint(tmp_path, shared):
    marker = tmp_path / "ran"
    run = Path(shutil.copytree(shared["ws"] / "train", tmp_path / "run"))
    for recorded in (run / ".hydra" / "config.yaml", run / "resolved_config.yaml"):
        text = recorded.read_text().replace("gcode_exp.data.augment.Augment", "os.system")
        recorded.write_text(text + f"evil:\n  _target_: os.system\n  _args_: ['touch {marker}']\n")
    res = run_py("task=eval", f"ckpt_path={run / 'checkpoints' / 'best.pt'}", f"data.dir={shared['two']}",
                 f"hydra.run.dir={tmp_path / 'eval'}", cache=shared["cache"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert not marker.exists()


class Payload:
    """What a pickle runs when it is loaded: os.system(touch MARKER)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("how", ["eval", "predict", "resume"])
def test_a_checkpoint_with_a_pickle_payload_is_refused(tmp_path, shared, how):
    """torch.load with weights_only: the payload inside a checkpoint-shaped dict is never run."""
    marker = tmp_path / "ran"
    blob = torch.load(shared["ckpt"], weights_only=True)
    blob["model"] = Payload(marker)
    assert blob["format"] == FORMAT
    if how == "resume":
        run = shared_run_folder(shared, tmp_path)
        torch.save(blob, run / "checkpoints" / "last.pt")
        res = run_py("trainer.resume=true", f"hydra.run.dir={run}", cache=shared["cache"])
        start = f"trainer.resume=true: cannot resume {run}: checkpoints/last.pt: not a readable checkpoint"
    else:
        ckpt = tmp_path / "shared.pt"
        torch.save(blob, ckpt)
        res = run_py(f"task={how}", f"ckpt_path={ckpt}", f"data.dir={shared['two']}",
                     f"hydra.run.dir={tmp_path / how}", cache=shared["cache"])
        start = f"ckpt_path={ckpt}: not a readable checkpoint (UnpicklingError)"
    line = one_error_line(res)
    assert line.startswith(start), line
    assert not marker.exists()


LAB_MODULE = '''
import os
from pathlib import Path

Path(os.environ["LABAUG_IMPORTED"]).write_text("imported")  # shows whether the module was ever imported

from gcode_exp.data.augment import Augment


class LabAugment(Augment):
    """A user's own augmentation."""
'''


@pytest.mark.parametrize("trusting", [None, "trusted_modules=[labaug]", "aug._target_=labaug.LabAugment"])
def test_a_users_own_module_is_built_only_where_the_command_line_trusts_it(tmp_path, shared, trusting):
    """A checkpoint naming a class of the user's own module (on PYTHONPATH): refused, the module not even
    imported, unless the command line lists it in trusted_modules or names that class itself."""
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "labaug.py").write_text(LAB_MODULE)
    imported = tmp_path / "imported"
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "lib"), str(ROOT)]), "LABAUG_IMPORTED": str(imported)}
    ckpt = tamper(shared["ckpt"], tmp_path / "shared" / "best.pt", "aug._target_", "labaug.LabAugment")
    res = run_py("task=eval", f"ckpt_path={ckpt}", f"data.dir={shared['two']}", f"hydra.run.dir={tmp_path / 'eval'}",
                 *([trusting] if trusting else []), cache=shared["cache"], env=env)
    if trusting is None:
        line = one_error_line(res)
        assert line.startswith(f"ckpt_path={ckpt}: aug._target_=labaug.LabAugment: outside gcode_exp and "
                               "trusted_modules=[], so not imported"), line
        assert not imported.exists()
    else:
        assert res.returncode == 0, res.stderr[-2000:]
        assert imported.exists() and (tmp_path / "eval" / "metrics.json").exists()


def test_a_malformed_trusted_modules_is_one_line(tmp_path, shared):
    res = run_py("task=eval", f"ckpt_path={shared['ckpt']}", "trusted_modules=notalist",
                 f"hydra.run.dir={tmp_path / 'eval'}", cache=shared["cache"])
    assert one_error_line(res).startswith("trusted_modules=notalist: must be a list of module names"), res.stderr


# --- secrets ----------------------------------------------------------------------------------------------
def holds(folder: Path, secret: str) -> list[str]:
    """The files under `folder` (any depth, hidden ones, checkpoints and binary logs too) whose bytes hold it."""
    return [str(p) for p in sorted(folder.rglob("*")) if p.is_file() and secret.encode() in p.read_bytes()]


def test_a_storage_password_is_in_no_file_of_the_run_and_no_output(tmp_path, shared):
    """The password of an Optuna storage URL, given the three ways the docs name (the environment,
    optuna_storage=, hydra.sweeper.storage=), with wandb recording the run too: absent from every file of
    the run folder (checkpoints, .hydra/, resolved_config.yaml, run.log, wandb's) and from stdout/stderr;
    the URL is recorded with *** instead."""
    secrets = {"env": "S3cretEnv", "cli": "S3cretCli", "hydra": "S3cretHydra"}
    run = tmp_path / "run"
    res = run_py("hparams_search=optuna", "model=align", "logger=wandb", "logger.mode=offline",
                 f"hydra.run.dir={run}", f"optuna_storage=postgresql://lab:{secrets['cli']}@db.example:5432/optuna",
                 f"hydra.sweeper.storage=postgresql://lab:{secrets['hydra']}@db.example/optuna",
                 cache=shared["cache"],
                 env={"GCODE_EXP_OPTUNA_STORAGE": f"postgresql://lab:{secrets['env']}@db.example/optuna"})
    assert res.returncode == 0, res.stderr[-2000:]
    for secret in secrets.values():
        assert secret not in res.stdout + res.stderr
        assert holds(run, secret) == []
    assert "optuna_storage: postgresql://lab:***@db.example:5432/optuna" in (run / "resolved_config.yaml").read_text()
    assert "storage: postgresql://lab:***@db.example/optuna" in (run / ".hydra" / "hydra.yaml").read_text()
    assert (run / "wandb").is_dir()
    env_only = tmp_path / "env"  # the environment's URL, the one the config reads when none is given
    res = run_py("hparams_search=optuna", "model=align", f"hydra.run.dir={env_only}", cache=shared["cache"],
                 env={"GCODE_EXP_OPTUNA_STORAGE": f"postgresql://lab:{secrets['env']}@db.example/optuna"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert secrets["env"] not in res.stdout + res.stderr and holds(env_only, secrets["env"]) == []
    assert "optuna_storage: postgresql://lab:***@db.example/optuna" in (env_only / "resolved_config.yaml").read_text()


def test_a_storage_password_is_in_no_file_of_a_sweep_and_no_output(tmp_path, shared):
    """A sweep (-m): Hydra's multirun.yaml, the job's .hydra/ and Hydra's own log line of each job's overrides
    (which escapes the URL's colons) hold *** instead."""
    secret = "S3cretSweep"
    sweep = tmp_path / "sweep"
    res = run_py("-m", f"+optuna_storage=postgresql://lab:{secret}@db.example/optuna", "seed=0",
                 f"hydra.sweep.dir={sweep}", cache=shared["cache"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert secret not in res.stdout + res.stderr and holds(sweep, secret) == []
    assert "postgresql://lab:***@db.example/optuna" in (sweep / "multirun.yaml").read_text()
    assert (sweep / "0_align-none-v2" / "metrics.json").exists()


@pytest.mark.parametrize("arg,says", [
    ("hydra.sweeper.storage=postgresql://lab:{secret}@db.example/optuna", "Could not override 'hydra.sweeper.storage'"),
    ("+logger.password={secret}", "logger.password=***: unknown key"),
], ids=["refused-by-hydra", "refused-by-validate"])
def test_a_refused_command_line_does_not_repeat_a_secret(tmp_path, shared, arg, says):
    """A refusal names the override, with the password (a URL's, a secret-named key's) as ***, on the
    console and in error.txt."""
    secret = "S3cretRefused"
    run = tmp_path / "run"
    res = run_py(f"hydra.run.dir={run}", arg.format(secret=secret), cache=shared["cache"])
    line = one_error_line(res)
    assert says in line and secret not in res.stdout + res.stderr, line
    assert not run.exists() or holds(run, secret) == []
