"""Bad recordings and bad configs: one clear line naming the file or key, non-zero exit, nothing
half-written, and `data.on_error=skip` where a sweep must go on."""

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from gcode_exp import GcodeExpError, tasks
from gcode_exp.config import ConfigError, validate
from gcode_exp.data.read import DataError, list_runs, read_run
from tests.conftest import ROOT, SAMPLE, TINY

GOOD = SAMPLE / "pocket_016_aligned.csv.gz"


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return pd.read_csv(GOOD, low_memory=False)


def write(path, frame: pd.DataFrame):
    frame.to_csv(path, index=False)
    return path


def cli(*args: str, tmp) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "run.py"), f"data.cache_dir={tmp / 'cache'}", f"hydra.run.dir={tmp / 'run'}",
           *TINY, *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def assert_one_line_error(res: subprocess.CompletedProcess, *needles: str) -> str:
    assert res.returncode != 0
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr[-1500:]
    assert "Traceback" not in res.stderr + res.stdout
    for needle in needles:
        assert needle in lines[0]
    return lines[0]


# --- every damaged-file case, through read_run ------------------------------------------------------
def test_truncated_gzip(tmp_path):
    data = GOOD.read_bytes()
    bad = tmp_path / "cut_001_aligned.csv.gz"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut_001_aligned\.csv\.gz: truncated or corrupt gzip"):
        read_run(bad)


def test_empty_file_and_empty_gzip(tmp_path):
    (tmp_path / "e_001.csv").write_bytes(b"")
    with gzip.open(tmp_path / "e_002.csv.gz", "wb"):
        pass
    for name in ("e_001.csv", "e_002.csv.gz"):
        with pytest.raises(DataError, match=rf"{name}: empty file"):
            read_run(tmp_path / name)


def test_header_only(tmp_path, frame):
    with pytest.raises(DataError, match="h_001.csv: header only, no rows"):
        read_run(write(tmp_path / "h_001.csv", frame.iloc[:0]))


def test_missing_target_column(tmp_path, frame):
    with pytest.raises(DataError, match="m_001.csv: missing column 'gcode_string'"):
        read_run(write(tmp_path / "m_001.csv", frame.drop(columns="gcode_string")))


def test_non_numeric_sensor_cell_names_row_and_column(tmp_path, frame):
    bad = frame.copy()
    bad["x_motor"] = bad["x_motor"].astype(object)
    bad.loc[7, "x_motor"] = "oops"
    with pytest.raises(DataError, match=r"n_001.csv: row 9: column 'x_motor' holds non-numeric value 'oops'"):
        read_run(write(tmp_path / "n_001.csv", bad))


def test_nan_and_inf_runs(tmp_path, frame):
    sensors = [c for c in frame.columns if "." in c]
    many = frame.copy()
    many.loc[10:200, sensors] = float("nan")
    with pytest.raises(DataError, match=r"nan_001.csv: \d+% of sensor cells are empty/NaN/inf .*data.max_nonfinite"):
        read_run(write(tmp_path / "nan_001.csv", many))
    few = frame.copy()
    few.loc[10:12, sensors[0]] = float("inf")
    few.loc[20, sensors[1]] = float("nan")
    run = read_run(write(tmp_path / "nan_002.csv", few))
    assert run.nonfinite_cells == 4 and torch.isnan(torch.from_numpy(run.values)).sum() == 4


def test_unknown_words_and_comments_are_counted_not_fatal(tmp_path, frame):
    odd = frame.copy()
    odd["gcode_string"] = odd["gcode_string"].astype(object)
    odd.loc[0:4, "gcode_string"] = "G1 X1 #5 (comment) Y2 ; note"
    run = read_run(write(tmp_path / "w_001.csv", odd))
    assert run.unparsed_chunks == 5 and run.lines[0] == "G1 X1 #5 (comment) Y2 ; note"


def test_non_utf8_bytes(tmp_path):
    text = gzip.decompress(GOOD.read_bytes())
    bad = tmp_path / "u_001.csv"
    bad.write_bytes(text[:4000] + b"\xff\xfe" + text[4000:])
    with pytest.raises(DataError, match="u_001.csv: not UTF-8 text"):
        read_run(bad)


def test_folder_without_recordings(tmp_path):
    with pytest.raises(DataError, match="no files match data.pattern"):
        list_runs(tmp_path, "*.csv*")
    with pytest.raises(DataError, match="data.dir is not a folder"):
        list_runs(tmp_path / "nope", "*.csv*")


# --- the same through the real entry point ------------------------------------------------------------
@pytest.mark.slow
def test_cli_short_file_truncated_gzip_and_skip(tmp_path, frame):
    folder = tmp_path / "data"
    shutil.copytree(SAMPLE, folder)
    write(folder / "short_001_aligned.csv", frame.iloc[:20])
    res = cli("task=prepare", f"data.dir={folder}", tmp=tmp_path)
    assert_one_line_error(res, "short_001_aligned.csv: 20 rows, fewer than one window (data.window=32)")
    assert not list((tmp_path / "cache").glob("*.pt"))  # nothing cached from a failed prepare
    assert not (tmp_path / "run" / "data_summary.json").exists()
    (folder / "trunc_001_aligned.csv.gz").write_bytes(GOOD.read_bytes()[:5000])
    res = cli("task=prepare", f"data.dir={folder}", "data.on_error=skip", tmp=tmp_path)
    assert res.returncode == 0, res.stderr[-1500:]
    summary = json.loads((tmp_path / "run" / "data_summary.json").read_text())
    assert sorted(s["file"] for s in summary["skipped_files"]) == ["short_001_aligned.csv", "trunc_001_aligned.csv.gz"]
    assert "short_001" not in summary["train"]["files"] + summary["val"]["files"] + summary["test"]["files"]


@pytest.mark.slow
def test_cli_bad_config_values_name_the_key(tmp_path):
    for override, needle in (("data.window=-4", "data.window=-4"), ("data.stride=0", "data.stride=0"),
                             ("aug.oversample_factor=0", "aug.oversample_factor=0"),
                             ("model.loss_weights.command=-1", "model.loss_weights.command=-1")):
        res = cli(override, tmp=tmp_path)
        assert_one_line_error(res, needle)
    res = cli("model=transformer", tmp=tmp_path)  # an unknown group option: Hydra's own message
    assert res.returncode != 0 and "model" in res.stderr and "transformer" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("override,key", [
    ("data.window=0", "data.window"), ("data.stride=-1", "data.stride"), ("aug.oversample_factor=0", "aug.oversample"),
    ("model.loss_weights.param_value=-0.5", "model.loss_weights.param_value"),
    ("data.split=[0.5,0.5,0.5]", "data.split"),
    ("features.groups=[momo]", "features.groups"), ("trainer.monitor=train/loss", "trainer.monitor"),
    ("model.n_heads=3", "model.d_model"), ("task=eval", "ckpt_path"), ("aug.shift=100", "aug.shift"),
])
def test_validate_names_the_key(tiny_cfg, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(tiny_cfg(override))


def test_bad_checkpoints(tiny_cfg, tmp_path):
    with pytest.raises(GcodeExpError, match="ckpt_path=.*nope.pt: no such file"):
        tasks.run(tiny_cfg("task=eval", f"ckpt_path={tmp_path / 'nope.pt'}"), tmp_path / "a")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(GcodeExpError, match="not a readable checkpoint"):
        tasks.run(tiny_cfg("task=eval", f"ckpt_path={tmp_path / 'text.pt'}"), tmp_path / "b")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(GcodeExpError, match="not a gcode-exp checkpoint"):
        tasks.run(tiny_cfg("task=eval", f"ckpt_path={tmp_path / 'other.pt'}"), tmp_path / "c")


@pytest.mark.slow
def test_eval_folder_with_other_channels_and_refusing_to_overwrite(tiny_cfg, tmp_path, frame):
    tasks.run(tiny_cfg(), tmp_path / "run")
    with pytest.raises(GcodeExpError, match="already holds finished results"):
        tasks.run(tiny_cfg(), tmp_path / "run")
    before = (tmp_path / "run" / "metrics.json").read_text()
    assert (tmp_path / "run" / "metrics.json").read_text() == before
    other = tmp_path / "other"
    other.mkdir()
    write(other / "x_001_aligned.csv", frame.drop(columns=["spindle", "x_motor"]))
    ckpt = tmp_path / "run" / "checkpoints" / "best.pt"
    with pytest.raises(DataError, match="x_001: lacks channels the checkpoint was trained on: spindle, x_motor"):
        tasks.run(tiny_cfg("task=eval", f"ckpt_path={ckpt}", f"data.dir={other}"), tmp_path / "eval")


@pytest.mark.slow
def test_kill_9_then_resume_matches_uninterrupted_run(tmp_path):
    args = ["trainer.max_epochs=4", "trainer.patience=100", "trainer.plots=false", "trainer.line_exact=false"]
    full = cli(*args, tmp=tmp_path / "full")
    assert full.returncode == 0, full.stderr[-1500:]
    run = tmp_path / "cut" / "run"
    cmd = [sys.executable, str(ROOT / "run.py"), f"data.cache_dir={tmp_path / 'full' / 'cache'}",
           f"hydra.run.dir={run}", *TINY, *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        history = run / "history.csv"
        if history.exists() and len(history.read_text().splitlines()) >= 3:  # epoch 2 done, last.pt written
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (run / "metrics.json").exists()
    resumed = subprocess.run([*cmd, "trainer.resume=true"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-1500:]
    a = json.loads((tmp_path / "full" / "run" / "metrics.json").read_text())
    b = json.loads((run / "metrics.json").read_text())
    a.pop("sec_per_epoch"), b.pop("sec_per_epoch")
    assert a == b
