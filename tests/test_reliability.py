"""Issue 5, reliability: every kind of damaged recording and bad config stops with one line naming the
file (row) or key, exit code 2, no traceback and nothing half-written; `data.on_error=skip` goes on
without the bad files; recoverable oddities are handled by a rule and counted; a run killed with
SIGKILL resumes to the same metrics; finished results are never overwritten unasked.

Damaged files are made from a real recording (data/sample/pocket_016_aligned.csv.gz). The subprocess
tests drive `run.py` itself; the rest use the Python API so the module stays fast."""

from __future__ import annotations

import csv
import gzip
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from gcode_exp import GcodeExpError, tasks
from gcode_exp.config import ConfigError, validate
from gcode_exp.data.dataset import prepare, read_runs
from gcode_exp.data.read import DataError, list_runs
from gcode_exp.data.vocab import parse_line
from gcode_exp.training.checkpoint import load_checkpoint, save_checkpoint
from tests.conftest import ROOT, SAMPLE, TINY, make_cfg

GOOD = SAMPLE / "pocket_016_aligned.csv.gz"
ONE_THREAD = "hardware.threads=1"  # fast and fair on a shared 2-core machine, and deterministic on CPU
FAST = [*TINY, ONE_THREAD, "trainer.line_exact=false"]


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return pd.read_csv(GOOD, low_memory=False)


def boards(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if "." in c]


def sensors(frame: pd.DataFrame) -> list[str]:
    return [*boards(frame), "spindle", "x_motor", "y_motor", "z_motor"]


# --- the damaged files: name, how to make it from the good recording, the message it must produce -----
def _csv(df: pd.DataFrame):
    return lambda path: df.to_csv(path, index=False)


def _bytes(data: bytes):
    return lambda path: path.write_bytes(data)


def _edit(frame, column, rows, value):
    df = frame.copy()
    df[column] = df[column].astype(object)
    df.loc[rows, column] = value
    return df


def bad_cases(frame: pd.DataFrame) -> dict[str, tuple[str, object, str]]:
    raw = GOOD.read_bytes()
    text = gzip.decompress(raw)
    nonfinite = frame.copy()
    nonfinite.loc[10:150, boards(frame)] = float("nan")
    nonfinite.loc[150:200, ["x_motor", "y_motor"]] = float("inf")
    return {
        "truncated .gz": ("truncgz_001_aligned.csv.gz", _bytes(raw[: len(raw) // 2]),
                          r"truncated or corrupt gzip \(Compressed file ended before the end-of-stream marker"),
        "plain text named .gz": ("notgz_001_aligned.csv.gz", _bytes(text),
                                 r"truncated or corrupt gzip \(Not a gzipped file"),
        "empty file": ("empty_001_aligned.csv", _bytes(b""), r"empty file$"),
        "empty .gz": ("emptygz_001_aligned.csv.gz", _bytes(gzip.compress(b"")), r"empty file$"),
        "header only": ("header_001_aligned.csv", _csv(frame.iloc[:0]), r"header only, no rows$"),
        "no gcode_string column": ("notarget_001_aligned.csv", _csv(frame.drop(columns="gcode_string")),
                                   r"missing column 'gcode_string' \(the target\)$"),
        "non-numeric sensor cell": ("text_001_aligned.csv", _csv(_edit(frame, "x_motor", 41, "12,5")),
                                    r"row 43: column 'x_motor' holds non-numeric value '12,5'$"),
        "NaN/inf run in sensors": ("nanrun_001_aligned.csv", _csv(nonfinite),
                                   r"\d\d% of sensor cells are empty/NaN/inf \(limit data.max_nonfinite=0.05; "
                                   r"first at row 12, column 'xa_motor.Ax'\)$"),
        "no sensor values at all": ("silent_001_aligned.csv", _csv(_edit(frame, sensors(frame), slice(None), None)),
                                    r"no row has any sensor value"),
        "no sensor columns": ("nocols_001_aligned.csv", _csv(frame[["t_console", "gcode_string"]]),
                              r"no sensor columns"),
        "non-UTF-8 bytes": ("latin_001_aligned.csv", _bytes(text[:4000] + b"\xe9t\xe9" + text[4000:]),
                            r"not UTF-8 text \(invalid continuation byte\)$"),
        "shorter than one window": ("short_001_aligned.csv", _csv(frame.iloc[:20]),
                                    r"20 rows, fewer than one window \(data.window=32\)$"),
    }


def good_folder(folder: Path, frame: pd.DataFrame, n: int = 3) -> Path:
    """n copies of the good recording under distinct names: the fewest files that still give all splits."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        frame.to_csv(folder / f"pocket_{101 + i}_aligned.csv", index=False)
    return folder


def says(text: str, path: Path, message: str) -> bool:
    """`text` is `<path>: <reason>` with the reason matching `message` from its start."""
    return re.match(re.escape(f"{path}: ") + message, text) is not None


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


@pytest.mark.parametrize("case", list(bad_cases(pd.read_csv(GOOD, nrows=2))))
def test_bad_file_raises_one_line_naming_it(tmp_path, frame, case):
    name, make, message = bad_cases(frame)[case]
    path = tmp_path / name
    make(path)
    with pytest.raises(DataError) as err:
        read_runs([path], make_cfg().data)  # read_run, plus the window-length check of a file
    assert says(str(err.value), path, message), str(err.value)
    assert "\n" not in str(err.value)


def test_folder_without_recordings(tmp_path):
    (tmp_path / "notes.txt").write_text("not a recording")
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}: no files match data.pattern='*.csv*'")):
        list_runs(tmp_path, "*.csv*")
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'nope'}: data.dir is not a folder")):
        list_runs(tmp_path / "nope", "*.csv*")


def test_raise_mode_stops_at_the_bad_file_and_caches_nothing(tmp_path, frame):
    folder = good_folder(tmp_path / "data", frame)
    name, make, _ = bad_cases(frame)["non-numeric sensor cell"]
    make(folder / name)
    cfg = make_cfg(f"data.dir={folder}", tmp=tmp_path)
    with pytest.raises(DataError, match=re.escape(str(folder / name))):
        prepare(cfg)
    assert files_under(tmp_path / "cache") == []


def test_skip_mode_leaves_out_every_bad_file_with_a_warning_each(tmp_path, frame, caplog):
    folder = good_folder(tmp_path / "data", frame)
    cases = bad_cases(frame)
    for name, make, _ in cases.values():
        make(folder / name)
    with caplog.at_level(logging.WARNING):
        summary = prepare(make_cfg(f"data.dir={folder}", "data.on_error=skip", tmp=tmp_path)).summary
    skipped = {s["file"]: s["error"] for s in summary["skipped_files"]}
    assert sorted(skipped) == sorted(name for name, _, _ in cases.values())
    for name, _, message in cases.values():
        assert says(skipped[name], folder / name, message), skipped[name]
        assert sum(name in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records) == 1, name
    used = sorted(f for split in ("train", "val", "test") for f in summary[split]["files"])
    assert used == ["pocket_101", "pocket_102", "pocket_103"]


def test_recoverable_oddities_follow_the_rule_and_are_counted(tmp_path, frame, caplog):
    """A few NaN/inf cells read as the channel's training mean (0 after normalisation); rows where no
    sensor has a value are dropped; G-code text the tokenizer cannot read is dropped from the target.
    Each is counted in data_summary.json."""
    folder = good_folder(tmp_path / "data", frame, n=0)
    cells = frame.copy()
    cells.loc[[5, 6, 7], "xa_motor.Ax"] = float("nan")
    cells.loc[9, "spindle"] = float("inf")
    cells.to_csv(folder / "pocket_101_aligned.csv", index=False)
    silent = _edit(frame, sensors(frame), slice(0, 9), None)
    silent.to_csv(folder / "pocket_102_aligned.csv", index=False)
    words = _edit(frame, "gcode_string", slice(0, 39), "G1 X1.4406 #5 Y1.652 (probe) ; note")
    words.to_csv(folder / "pocket_103_aligned.csv", index=False)

    runs = {r.name: r for r in read_runs(list_runs(folder, "*.csv*"), make_cfg().data)[0]}
    assert (runs["pocket_101"].nonfinite_cells, runs["pocket_102"].silent_rows) == (4, 10)
    assert runs["pocket_103"].unparsed_chunks == 40  # one chunk (`#5`) on each of 40 rows; comments are not counted
    assert len(runs["pocket_102"].lines) == len(frame) - 10

    data = prepare(make_cfg(f"data.dir={folder}", tmp=tmp_path))
    s = data.summary
    assert (s["nonfinite_cells_filled"], s["silent_rows_dropped"], s["unparsed_chunks_dropped"]) == (4, 10, 40)
    # the filled cells hold exactly the channel mean
    split = next(data.splits[k] for k in ("train", "val", "test") if "pocket_101" in data.splits[k].files)
    first = sum(len(runs[f].lines) for f in split.files[: split.files.index("pocket_101")])
    for row, col in ((5, "xa_motor.Ax"), (6, "xa_motor.Ax"), (7, "xa_motor.Ax"), (9, "spindle")):
        assert split.rows[first + row, data.features.channels.index(col)] == 0.0
    # the unreadable chunk and the comments are gone from the target, the rest of the line is kept
    assert data.vocab.line_tokens("G1 X1.4406 #5 Y1.652 (probe) ; note") == data.vocab.line_tokens("G1 X1.4406 Y1.652")


def test_unreadable_gcode_rule():
    """Comments are removed (not counted), N/O words ignored, any other text that is not a letter with
    a number is dropped and counted once per chunk."""
    assert parse_line("N10 G1 X1.5 #5 Y2. (probe) Q ; note") == ([("G", 1.0), ("X", 1.5), ("Y", 2.0)], 2)


def test_damaged_cache_file_is_rebuilt_not_trusted(tmp_path, frame, caplog):
    cfg = make_cfg(f"data.dir={good_folder(tmp_path / 'data', frame)}", tmp=tmp_path)
    first = prepare(cfg).summary
    (cache,) = files_under(tmp_path / "cache")
    cache.write_bytes(cache.read_bytes()[:1000])
    with caplog.at_level(logging.WARNING):
        again = prepare(cfg).summary
    assert "ignoring unreadable cache" in caplog.text and again == first
    torch.load(cache, weights_only=False)  # whole again


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """A crash (or kill) while writing leaves the previous checkpoint intact and no stray temp file."""
    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint(path, model={"w": torch.ones(3)}, epoch=1)

    def dies_half_way(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK\x03\x04 half a file")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError):
        save_checkpoint(path, model={"w": torch.zeros(3)}, epoch=2)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False)["epoch"] == 1
    assert files_under(tmp_path) == [path]


# --- bad configuration ------------------------------------------------------------------------------
@pytest.mark.parametrize("override,message", [
    ("data.window=-4", "data.window=-4: must be a whole number >= 1"),
    ("data.window=0", "data.window=0: must be a whole number >= 1"),
    ("data.stride=0", "data.stride=0: must be a whole number >= 1"),
    ("data.stride=1.5", "data.stride=1.5: must be a whole number >= 1"),
    ("aug.oversample_factor=0", "aug.oversample_factor=0: must be a whole number >= 1"),
    ("model.loss_weights.command=-1", "model.loss_weights.command=-1: must be a number >= 0"),
    ("model.loss_weights.param_value=-0.5", "model.loss_weights.param_value=-0.5: must be a number >= 0"),
    ("data.split=[0.5,0.5,0.5]", "data.split="),
    ("data.max_nonfinite=2", "data.max_nonfinite=2: must be between 0 and 1"),
    ("data.on_error=ignore", "data.on_error=ignore: must be one of raise, skip"),
    ("features.groups=[momo]", "features.groups="),
    ("trainer.monitor=train/loss", "trainer.monitor=train/loss"),
    ("model.n_heads=3", "model.d_model=32: must be divisible by model.n_heads=3"),
    ("aug.shift=100", "aug.shift=100"),
    ("task=eval", "ckpt_path: task=eval needs ckpt_path"),
])
def test_validate_names_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(make_cfg(override))


def test_bad_ckpt_path_fails_before_any_work(tmp_path):
    torch.save({"weights": torch.ones(2)}, tmp_path / "foreign.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    for name, message in (("nope.pt", "no such file"), ("text.pt", "not a readable checkpoint (UnpicklingError)"),
                          ("foreign.pt", "not a gcode-exp checkpoint (format gcode-exp/1)")):
        run_dir = tmp_path / f"eval_{name}"
        with pytest.raises(GcodeExpError, match=re.escape(f"ckpt_path={tmp_path / name}: {message}")):
            tasks.run(make_cfg("task=eval", f"ckpt_path={tmp_path / name}", tmp=tmp_path), run_dir)
        # the folder holds only the failure record (config, log, why), nothing cached
        assert sorted(p.name for p in run_dir.iterdir()) == [".hydra", "error.txt", "run.log"]
        assert message in (run_dir / "error.txt").read_text() and files_under(tmp_path / "cache") == []


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One tiny finished training run, shared by the tests below."""
    threads = torch.get_num_threads()
    run = tmp_path_factory.mktemp("trained") / "run"
    tasks.run(make_cfg(*FAST, "trainer.max_epochs=2", tmp=run.parent), run)
    torch.set_num_threads(threads)
    return run


@pytest.mark.slow
def test_truncated_real_checkpoint_is_refused(tmp_path, trained):
    cut = tmp_path / "cut.pt"
    data = (trained / "checkpoints" / "best.pt").read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(GcodeExpError, match=re.escape(f"ckpt_path={cut}: not a readable checkpoint")):
        load_checkpoint(cut)


@pytest.mark.slow
def test_eval_folder_whose_channels_do_not_match_the_checkpoint(tmp_path, trained, frame):
    other = tmp_path / "other"
    other.mkdir()
    frame.drop(columns=["spindle", "x_motor"]).to_csv(other / "pocket_201_aligned.csv", index=False)
    ckpt = trained / "checkpoints" / "best.pt"
    message = f"{other / 'pocket_201_aligned.csv'}: lacks channels the checkpoint was trained on: spindle, x_motor"
    with pytest.raises(DataError, match=re.escape(message)):
        tasks.run(make_cfg(*FAST, "task=eval", f"ckpt_path={ckpt}", f"data.dir={other}"), tmp_path / "eval")
    assert not (tmp_path / "eval" / "metrics.json").exists()


@pytest.mark.slow
def test_finished_run_folder_is_never_overwritten_unasked(tmp_path, trained):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = {p: p.read_bytes() for p in files_under(run)}
    ckpt = run / "checkpoints" / "best.pt"
    for overrides in ((), ("task=prepare",), ("task=eval", f"ckpt_path={ckpt}")):
        with pytest.raises(GcodeExpError, match=re.escape(f"{run} already holds finished results (metrics.json); "
                                                          "pass overwrite=true to replace them")):
            tasks.run(make_cfg(*FAST, *overrides, tmp=tmp_path), run)
        assert {p: p.read_bytes() for p in files_under(run)} == before
    tasks.run(make_cfg(*FAST, "task=prepare", "overwrite=true", tmp=tmp_path), run)  # told to: it proceeds


# --- through the real entry point ---------------------------------------------------------------------
def cli(tmp: Path, *args: str, cache: Path | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "run.py"), f"data.cache_dir={cache or tmp / 'cache'}",
           f"hydra.run.dir={tmp / 'run'}", *FAST, *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def one_error_line(res: subprocess.CompletedProcess) -> str:
    """The only stderr line, `error: ...`; exit code 2; no traceback anywhere."""
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.stderr[-2000:]
    assert "Traceback" not in res.stdout + res.stderr
    return lines[0].removeprefix("error: ")


@pytest.mark.slow
@pytest.mark.parametrize("case", ["truncated .gz", "non-numeric sensor cell", "NaN/inf run in sensors",
                                  "shorter than one window", "no folder"])
def test_cli_bad_data_one_line_exit_2_nothing_cached(tmp_path, frame, case):
    folder = good_folder(tmp_path / "data", frame, n=1)
    if case == "no folder":
        folder, path, message = tmp_path / "nope", tmp_path / "nope", "data.dir is not a folder"
    else:
        name, make, message = bad_cases(frame)[case]
        path = folder / name
        make(path)
    line = one_error_line(cli(tmp_path, "task=prepare", f"data.dir={folder}"))
    assert says(line, path, message), line
    assert files_under(tmp_path / "cache") == []
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".hydra", "error.txt", "run.log"]
    assert (tmp_path / "run" / "error.txt").read_text().strip() == line


@pytest.mark.slow
def test_cli_skip_mode_warns_and_lists_skipped_files(tmp_path, frame):
    folder = good_folder(tmp_path / "data", frame)
    cases = bad_cases(frame)
    for case in ("truncated .gz", "shorter than one window"):
        name, make, _ = cases[case]
        make(folder / name)
    res = cli(tmp_path, "task=prepare", f"data.dir={folder}", "data.on_error=skip")
    assert res.returncode == 0, res.stderr[-2000:]
    output = res.stdout + res.stderr
    for case in ("truncated .gz", "shorter than one window"):
        assert len(re.findall(r"WARNING\] - skipping " + re.escape(str(folder / cases[case][0])), output)) == 1
    assert "skipped 2 unusable files (see data_summary.json)" in res.stdout
    summary = json.loads((tmp_path / "run" / "data_summary.json").read_text())
    skipped = sorted(s["file"] for s in summary["skipped_files"])
    assert skipped == ["short_001_aligned.csv", "truncgz_001_aligned.csv.gz"]


@pytest.mark.slow
@pytest.mark.parametrize("args,message", [
    (["data.window=-4"], "data.window=-4: must be a whole number >= 1"),
    (["data.stride=0"], "data.stride=0: must be a whole number >= 1"),
    (["aug.oversample_factor=0"], "aug.oversample_factor=0: must be a whole number >= 1"),
    (["model.loss_weights.command=-1"], "model.loss_weights.command=-1: must be a number >= 0"),
    (["task=eval", "ckpt_path=/nonexistent/best.pt"], "ckpt_path=/nonexistent/best.pt: no such file"),
])
def test_cli_bad_config_names_the_key_before_any_work(tmp_path, args, message):
    assert one_error_line(cli(tmp_path, *args)) == message
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run" / "data_summary.json").exists()


@pytest.mark.slow
def test_cli_unknown_group_option_is_hydras_clear_error(tmp_path):
    res = cli(tmp_path, "model=transformer")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "Could not find 'model/transformer'" in res.stderr and "multihead" in res.stderr  # lists the options


# --- interrupted runs ---------------------------------------------------------------------------------
def history(run: Path) -> list[dict]:
    with open(run / "history.csv") as f:
        return [{k: v for k, v in row.items() if k != "sec"} for row in csv.DictReader(f)]


@pytest.mark.slow
def test_kill_9_mid_training_then_resume_matches_an_uninterrupted_run(tmp_path):
    train = ["data.window=32", "data.stride=8", "trainer.max_epochs=5", "trainer.patience=100"]
    cache = tmp_path / "cache"
    ref = cli(tmp_path / "ref", *train, cache=cache)
    assert ref.returncode == 0, ref.stderr[-2000:]

    run = tmp_path / "cut" / "run"
    cmd = [sys.executable, str(ROOT / "run.py"), f"data.cache_dir={cache}", f"hydra.run.dir={run}", *FAST, *train]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if (run / "history.csv").exists() and len(history(run)) >= 2:  # last.pt of epoch 2 is on disk
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "training finished before it could be killed"
    epoch = load_checkpoint(run / "checkpoints" / "last.pt")["epoch"]
    assert 2 <= epoch < 5 and not (run / "metrics.json").exists()

    resumed = cli(tmp_path / "cut", *train, "trainer.resume=true", cache=cache)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming after epoch {epoch} from" in resumed.stdout
    want = json.loads((tmp_path / "ref" / "run" / "metrics.json").read_text())
    got = json.loads((run / "metrics.json").read_text())
    want.pop("sec_per_epoch"), got.pop("sec_per_epoch")
    assert got == want
    assert history(run) == history(tmp_path / "ref" / "run")
