"""`debug=fast` and `debug=overfit` (conf/debug/), trainer.limit_batches, the three entry points
(`python run.py`, `python -m gcode_exp`, `gcode-exp`) and the run folder's resolved_config.yaml."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import ROOT, SAMPLE, TINY, make_cfg, run_py

GCODE_EXP = Path(sys.executable).parent / "gcode-exp"  # the console script `pip install -e .` registers


def history(run: Path) -> list[dict]:
    with open(run / "history.csv") as f:
        return list(csv.DictReader(f))


def elsewhere(argv: list[str], cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    """A command run from a folder outside the checkout, without the checkout on PYTHONPATH: what an
    installed user gets."""
    cwd.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true")
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def tiny_args(cache: Path) -> list[str]:
    """The sample data and TINY sizes, as run_py passes them to run.py."""
    return [f"data.dir={SAMPLE}", f"data.cache_dir={cache}", *TINY, "trainer.line_exact=false", "hardware.threads=1"]


# --- trainer.limit_batches -----------------------------------------------------------------------------
def test_evaluate_scores_only_the_first_windows(tmp_path):
    from gcode_exp.models import new_model
    from gcode_exp.tasks import prepare_checked
    from gcode_exp.training.evaluate import evaluate, scored_windows

    cfg = make_cfg("model=multihead", "hardware.threads=1", tmp=tmp_path)
    data = prepare_checked(cfg)
    model, _ = new_model(cfg, data)
    split = data.splits["val"]
    assert len(split) > 5
    _, pred, hits = evaluate(model, split, data.vocab, cfg, torch.device("cpu"), with_lines=False, limit=5)
    assert len(pred) == 5 and hits is None  # a learning model answers no line unless asked
    _, pred, _ = evaluate(model, split, data.vocab, cfg, torch.device("cpu"), with_lines=False, limit=0)
    assert len(pred) == len(split)
    assert scored_windows(make_cfg("trainer.limit_batches=3", "trainer.batch_size=8").trainer) == 24
    assert scored_windows(cfg.trainer) == 0  # the default: every window


def test_debug_options_pick_a_model_that_trains():
    fast, overfit = make_cfg("debug=fast"), make_cfg("debug=overfit")
    assert fast.model.name == overfit.model.name == "multihead"
    assert (fast.trainer.max_epochs, fast.trainer.limit_batches, fast.trainer.plots) == (1, 2, False)
    assert (overfit.trainer.limit_batches, overfit.aug.name) == (1, "none")
    assert overfit.trainer.patience >= overfit.trainer.max_epochs  # never stops early
    assert make_cfg("model=baseline", "debug=fast").model.name == "baseline"  # the command line wins


def test_limit_batches_is_checked():
    from gcode_exp.config import ConfigError
    from gcode_exp.config_checks import validate

    with pytest.raises(ConfigError, match=r"trainer.limit_batches=-1: must be a whole number >= 0"):
        validate(make_cfg("trainer.limit_batches=-1"))


@pytest.mark.slow
def test_debug_fast_trains_and_scores_a_few_batches(tmp_path):
    run = tmp_path / "run"
    res = run_py("debug=fast", f"hydra.run.dir={run}", cache=tmp_path / "cache", timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs"] == 1 and "test/token_macro_recall" in metrics
    rows = history(run)
    assert len(rows) == 1 and rows[0]["steps"] == "2"  # 2 of the epoch's batches, not all of them
    summary = json.loads((run / "data_summary.json").read_text())
    batch = 32  # trainer.batch_size
    assert summary["train"]["windows"] > 2 * batch and summary["test"]["windows"] > 2 * batch
    with open(run / "per_class.csv") as f:
        eos = next(r for r in csv.DictReader(f) if r["token"] == "EOS")
    assert int(eos["support"]) == 2 * batch  # every target ends with one EOS: 64 test windows were scored
    assert "val and test scored on their first 64 windows" in res.stdout
    assert not (run / "plots").exists()


@pytest.mark.slow
def test_debug_overfit_drives_the_loss_of_one_batch_down(tmp_path):
    run = tmp_path / "run"
    res = run_py("debug=overfit", "trainer.max_epochs=150", f"hydra.run.dir={run}", cache=tmp_path / "cache",
                 timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = history(run)
    assert len(rows) == 150 and {r["steps"] for r in rows} == {"1"}  # one batch, every epoch, no early stop
    first, last = float(rows[0]["train/loss"]), float(rows[-1]["train/loss"])
    assert last < 0.2 * first, (first, last)
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 150


# --- the entry points ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_three_entry_points_say_the_same(tmp_path):
    """--help and a refused config: the same bytes and exit code from run.py, python -m and gcode-exp."""
    assert GCODE_EXP.is_file(), f"{GCODE_EXP} is missing: `pip install -e .` registers it (pyproject.toml)"
    commands = {"run.py": [sys.executable, str(ROOT / "run.py")], "python -m": [sys.executable, "-m", "gcode_exp"],
                "gcode-exp": [str(GCODE_EXP)]}
    seen: dict[str, dict[str, tuple[str, str]]] = {"help": {}, "refused": {}}
    for i, (name, argv) in enumerate(commands.items()):
        for case, args, code in (("help", ["--help"], 0),
                                 ("refused", ["trainer.lr=abc", f"hydra.run.dir={tmp_path / f'refused{i}'}"], 2)):
            res = elsewhere([*argv, *args], tmp_path / "cwd")
            assert res.returncode == code, f"{name} {case}: {res.stderr[-2000:]}"
            seen[case][name] = (res.stdout, res.stderr)
    for case, outputs in seen.items():
        assert outputs["python -m"] == outputs["run.py"] == outputs["gcode-exp"], (case, outputs)
    helped = seen["help"]["run.py"][0]
    assert helped.startswith("gcode-exp: which G-code") and "debug: fast, overfit, profile" in helped, helped
    assert "task=eval ckpt_path=RUN/checkpoints/best.pt" in helped and "docs/SWEEPS.md" in helped, helped
    assert seen["refused"]["run.py"] == ("", "error: trainer.lr=abc: must be a number in (0, 1]\n")


@pytest.mark.slow
def test_python_m_gcode_exp_runs_from_another_folder(tmp_path):
    """Hydra's outputs/ lands in the working folder; the config is the checkout's conf/."""
    cwd = tmp_path / "somewhere"
    res = elsewhere([sys.executable, "-m", "gcode_exp", "task=prepare", *tiny_args(tmp_path / "cache")], cwd)
    assert res.returncode == 0, res.stderr[-3000:]
    runs = list(cwd.glob("outputs/*/*"))
    assert len(runs) == 1 and (runs[0] / "data_summary.json").is_file()
    assert f"run folder: {runs[0]}" in res.stdout


@pytest.mark.slow
def test_gcode_exp_command_trains_with_debug_fast(tmp_path):
    assert GCODE_EXP.is_file(), f"{GCODE_EXP} is missing: `pip install -e .` registers it (pyproject.toml)"
    run = tmp_path / "run"
    res = elsewhere([str(GCODE_EXP), *tiny_args(tmp_path / "cache"), "debug=fast", f"hydra.run.dir={run}"],
                    tmp_path / "cwd")
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 1
    assert [r["steps"] for r in history(run)] == ["2"]


# --- resolved_config.yaml ------------------------------------------------------------------------------
@pytest.mark.slow
def test_run_folder_holds_the_resolved_config(tmp_path):
    run = tmp_path / "run"
    res = run_py("task=prepare", f"hydra.run.dir={run}", cache=tmp_path / "cache", timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    composed, resolved = (run / ".hydra" / "config.yaml").read_text(), (run / "resolved_config.yaml").read_text()
    assert "${" in composed and "${" not in resolved
    cfg = yaml.safe_load(resolved)
    assert cfg["name"] == "align-none-v2" and cfg["data"]["dir"] == str(SAMPLE)


def test_resolved_config_belongs_to_the_run(tmp_path):
    """Alone, it marks the folder as an earlier run's; overwrite=true removes it with the rest."""
    from gcode_exp.run_folder import claim, state

    (tmp_path / "resolved_config.yaml").write_text("seed: 0\n")
    assert state(tmp_path) == "used"
    claim(tmp_path, make_cfg("overwrite=true"))
    assert not (tmp_path / "resolved_config.yaml").exists()


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_progress_bar_on_a_terminal_only(tmp_path):
    """trainer.progress: a tqdm bar (epoch k/N, steps, loss) where stderr is a terminal; none in a pipe."""
    import fcntl
    import pty
    import struct
    import termios

    args = [sys.executable, str(ROOT / "run.py"), *tiny_args(tmp_path / "cache"), "model=multihead",
            "trainer.max_epochs=2", "trainer.progress=true"]
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    proc = subprocess.Popen([*args, f"hydra.run.dir={tmp_path / 'tty'}"], cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=child, env={**os.environ, "WANDB_MODE": "offline"})
    os.close(child)
    seen = b""
    while chunk := _read(main):
        seen += chunk
    assert proc.wait(timeout=120) == 0, seen.decode(errors="replace")[-2000:]
    bars = [b for b in seen.decode(errors="replace").split("\r") if b.startswith("epoch 2/2:")]
    assert bars and "loss=" in bars[-1] and "step" in bars[-1], seen[-2000:]

    piped = subprocess.run([*args, f"hydra.run.dir={tmp_path / 'pipe'}"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=120)
    assert piped.returncode == 0 and "epoch 1/2" not in piped.stderr + piped.stdout, piped.stderr[-2000:]


def _read(fd: int) -> bytes:
    """What a pseudo-terminal has next; b"" once the process on its other side has exited."""
    try:
        return os.read(fd, 4096)
    except OSError:
        return b""


def test_readme_layout_names_every_module():
    """README's 'Layout' is the package map a new reader starts from: each module must be on it."""
    text = (ROOT / "README.md").read_text()
    layout = text[text.index("## Layout"):].split("```")[1]
    named, folder = set(), ""
    for line in layout.splitlines():
        path, _, comment = line.partition("#")
        path = path.strip() or folder  # a comment alone continues the line above
        folder = path if path.endswith("/") else ""
        if path.endswith(".py"):
            named.add(path)
        elif path.endswith("/"):  # a folder: the modules its comment lists
            named |= {path + word.strip("(),;:") for word in comment.split() if word.strip("(),;:").endswith(".py")}
        named |= {f"gcode_exp/{w.strip('(),;:')}" for w in comment.split() if w.strip("(),;:").endswith(".py")
                  and "/" not in w}
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "gcode_exp").rglob("*.py") if not p.name.startswith("__")}
    assert modules - named == set(), f"README 'Layout' does not name: {sorted(modules - named)}"
