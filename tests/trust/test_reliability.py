"""Issue 5, reliability: every kind of damaged recording and bad config stops with one line naming the
file (row) or key, exit code 2, no traceback and nothing half-written; `data.on_error=skip` goes on
without the bad files; recoverable oddities are handled by a rule and counted; finished results are
never overwritten unasked (run folders, kill -9 and resume: tests/cli/test_run_folder.py).

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
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import torch

from gcode_exp import GcodeExpError, summarize, tasks
from gcode_exp.config import ConfigError
from gcode_exp.config_checks import validate
from gcode_exp.data.dataset import load_prepared, prepare, read_runs
from gcode_exp.data.read import FROZEN_ROWS, RUNNING, DataError, list_runs, read_run
from gcode_exp.data.vocab import parse_line
from gcode_exp.data.windows import run_inputs
from gcode_exp.training.checkpoint import Checkpoint, save_checkpoint
from tests import forked_python
from tests.conftest import ROOT, SAMPLE, TINY, make_cfg
from tests.tasks.test_summarize import make_run

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


def _zip(data: bytes):
    """An Excel workbook is a ZIP archive; so is a zipped CSV: the same first bytes."""
    def make(path):
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("sheet.csv", data)
    return make


def _link(target: str):
    return lambda path: path.symlink_to(target)


def _lines(text: bytes, edit) -> bytes:
    """The recording with `edit(row_index, line)` applied to each data line (row 2 of the file is index 0)."""
    head, *rows = text.rstrip(b"\n").split(b"\n")
    return b"\n".join([head, *(edit(i, row) for i, row in enumerate(rows))]) + b"\n"


def _edit(frame, column, rows, value):
    df = frame.copy()
    df[column] = df[column].astype(object)
    df.loc[rows, column] = value
    return df


def bad_cases(frame: pd.DataFrame) -> dict[str, tuple[str, object, str]]:
    raw = GOOD.read_bytes()
    text = gzip.decompress(raw)
    nonfinite = frame.copy()
    nonfinite.loc[10:150, boards(frame)[::2]] = float("nan")  # every board keeps a value: damage, not a failed board
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
        # --- folder mess (issue 6) ---
        "duplicate column header": ("dupcol_001_aligned.csv", _csv(frame.rename(columns={"y_motor": "x_motor"})),
                                    r"duplicate column 'x_motor' \(columns \d+ and \d+\)$"),
        "duplicate once spaces are removed": ("dupspace_001_aligned.csv",
                                              _csv(frame.rename(columns={"y_motor": " x_motor "})),
                                              r"duplicate column 'x_motor' \(columns \d+ and \d+\)$"),
        "semicolon-separated": ("semi_001_aligned.csv", lambda path: frame.to_csv(path, sep=";", index=False),
                                r"not comma-separated \(the header is one column holding ';'\); "
                                r"save it with ',' between columns$"),
        "semicolons and decimal commas (Excel, German locale)": (
            "decomma_001_aligned.csv", lambda path: frame.to_csv(path, sep=";", decimal=",", index=False),
            r"not comma-separated \(the header is one column holding ';'\)"),
        "tab-separated": ("tab_001_aligned.csv", lambda path: frame.to_csv(path, sep="\t", index=False),
                          r"not comma-separated \(the header is one column holding tabs\)"),
        "gzip data named .csv": ("gzipped_001_aligned.csv", _bytes(raw),
                                 r"gzip-compressed data, not CSV text \(rename it to .csv.gz\)$"),
        "ZIP/Excel file named .csv": ("excel_001_aligned.csv", _zip(text),
                                      r"a ZIP archive \(an Excel .xlsx\?\), not CSV text \(export it as CSV\)$"),
        "every row one field longer than the header": (
            "extra_001_aligned.csv", _bytes(_lines(text, lambda i, row: row + b",7")),
            r"rows with more fields than the header's 197 names \(their extra values would be lost\)$"),
        "one row one field longer": ("ragged_001_aligned.csv",
                                     _bytes(_lines(text, lambda i, row: row + b",7" if i == 41 else row)),
                                     r"row 43: 198 fields, but the header has 197 names$"),
        "no labelled row": ("unlabelled_001_aligned.csv", _csv(_edit(frame, "gcode_string", slice(None), None)),
                            r"gcode_string is empty on every row: no labelled row to learn from or score$"),
        "labelled rows outside every window": (
            "tail_001_aligned.csv", _csv(_edit(frame.iloc[:40], "gcode_string", slice(0, 34), None)),
            r"no window holds a labelled row \(its 5 rows with a gcode_string fall outside the windows of "
            r"data.window=32, data.stride=16\)$"),
        "broken symlink": ("broken_001_aligned.csv", _link("moved_away.csv"),
                           r"broken symlink \(its target moved_away.csv does not exist\)$"),
        "symlink loop": ("loop_001_aligned.csv", _link("loop_001_aligned.csv"),
                         r"symlink loop \(the link leads back to itself\)$"),
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


@pytest.mark.parametrize("damage", ["truncated", "one byte changed"])
def test_damaged_cache_file_is_rebuilt_not_trusted(tmp_path, frame, caplog, damage):
    """A flipped byte in the middle of the tensors would load without complaint: the checksum catches it."""
    cfg = make_cfg(f"data.dir={good_folder(tmp_path / 'data', frame)}", tmp=tmp_path)
    first = prepare(cfg).summary
    (cache,) = (tmp_path / "cache").glob("*.pt")  # the prepared data; recordings/ holds each file's table
    data = bytearray(cache.read_bytes())
    if damage == "truncated":
        del data[1000:]
    else:
        data[len(data) // 2] ^= 0x01
    cache.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        assert load_prepared(cache) is None
        again = prepare(cfg).summary
    assert f"ignoring unreadable cache {cache} (checksum mismatch: its bytes were damaged)" in caplog.text
    assert again == first
    assert load_prepared(cache).summary == first  # whole again


# --- folder mess: names that are not recordings, twins, odd tables, G-code number forms (issue 6) ---------
NOT_RECORDINGS = {  # name the pattern `*.csv*` matches -> the reason data_summary.json gives
    "pocket_101_aligned.csv.bak": "name ends in '.bak', not .csv or .csv.gz (a backup or temporary copy?), "
                                  "not a recording",
    "pocket_101_aligned.csv~": "name ends in '~', not .csv or .csv.gz (a backup or temporary copy?), not a recording",
    "pocket_101_aligned.csv.zip": "name ends in '.zip', not .csv or .csv.gz (a backup or temporary copy?), "
                                  "not a recording",
    ".#pocket_101_aligned.csv": "hidden file (an editor lock or swap file, or a macOS '._' file?), not a recording",
    ".pocket_101_aligned.csv.swp": "hidden file (an editor lock or swap file, or a macOS '._' file?), "
                                   "not a recording",
    "._pocket_101_aligned.csv": "hidden file (an editor lock or swap file, or a macOS '._' file?), not a recording",
    ".~lock.pocket_101_aligned.csv#": "hidden file (an editor lock or swap file, or a macOS '._' file?), "
                                      "not a recording",
    "old_runs.csv": "a folder, not a recording",
}


def mess(folder: Path) -> None:
    """What editors, backups and Finder leave beside recordings; none of it is a recording."""
    good = folder / "pocket_101_aligned.csv"
    for name in NOT_RECORDINGS:
        path = folder / name
        if name == "old_runs.csv":
            path.mkdir()
        elif name.startswith(".#"):  # Emacs' lock: a symlink to user@host.pid, which does not exist
            path.symlink_to("root@host.4242:1700000000")
        elif name.startswith("._"):  # macOS AppleDouble: binary resource fork
            path.write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
        else:
            shutil.copy(good, path)


def test_names_that_are_not_recordings_are_ignored_warned_and_listed(tmp_path, frame, caplog):
    folder = good_folder(tmp_path / "data", frame)
    mess(folder)
    with caplog.at_level(logging.WARNING):
        summary = prepare(make_cfg(f"data.dir={folder}", tmp=tmp_path)).summary
    assert {i["file"]: i["reason"] for i in summary["ignored_files"]} == NOT_RECORDINGS
    for name, reason in NOT_RECORDINGS.items():
        assert caplog.text.count(f"ignoring {folder / name}: {reason}") == 1, name
    assert sorted(f for split in ("train", "val", "test") for f in summary[split]["files"]) == [
        "pocket_101", "pocket_102", "pocket_103"]
    again = prepare(make_cfg(f"data.dir={folder}", tmp=tmp_path)).summary  # a cache hit lists them too
    assert again["ignored_files"] == summary["ignored_files"]


def test_folder_of_only_non_recordings_names_them(tmp_path, frame):
    folder = tmp_path / "data"
    folder.mkdir()
    frame.to_csv(folder / "pocket_101_aligned.csv.bak", index=False)
    message = (f"{folder}: no recordings among the files matching data.pattern='*.csv*' "
               "(not read: pocket_101_aligned.csv.bak; recordings end in .csv or .csv.gz)")
    with pytest.raises(DataError, match=re.escape(message)):
        prepare(make_cfg(f"data.dir={folder}", tmp=tmp_path))


def test_recording_without_a_motor_channel_is_refused_as_eval_refuses_it(tmp_path, frame):
    """Training reads a file lacking spindle and x_motor no more than eval would: refused naming the
    file and the channels; with data.on_error=skip, skipped and listed."""
    folder = good_folder(tmp_path / "data", frame, n=4)
    short = folder / "pocket_104_aligned.csv"
    frame.drop(columns=["spindle", "x_motor"]).to_csv(short, index=False)
    message = f"{short}: lacks channels the other recordings have: spindle, x_motor"
    with pytest.raises(DataError, match=re.escape(message)):
        prepare(make_cfg(f"data.dir={folder}", tmp=tmp_path))
    data = prepare(make_cfg(f"data.dir={folder}", "data.on_error=skip", tmp=tmp_path))
    assert [s["file"] for s in data.summary["skipped_files"]] == [short.name]


@pytest.mark.parametrize("twin", ["pocket_101_aligned.csv.gz", "POCKET_101_ALIGNED.CSV.GZ"])
def test_same_recording_twice_is_an_error_naming_both(tmp_path, frame, caplog, twin):
    folder = good_folder(tmp_path / "data", frame, n=4)
    csv_path = folder / "pocket_101_aligned.csv"
    gz_path = folder / twin
    gz_path.write_bytes(gzip.compress(csv_path.read_bytes()))
    first, second = sorted([csv_path, gz_path])
    message = f"{first}, {second}: the same recording twice (each reads as run 'pocket_101'); keep one"
    with pytest.raises(DataError, match=re.escape(message)):
        prepare(make_cfg(f"data.dir={folder}", tmp=tmp_path))
    with caplog.at_level(logging.WARNING):  # skip mode: both are left out, neither is picked silently
        summary = prepare(make_cfg(f"data.dir={folder}", "data.on_error=skip", tmp=tmp_path)).summary
    assert summary["skipped_files"] == [{"file": first.name, "error": message},
                                        {"file": second.name, "error": message}]
    assert sorted(f for split in ("train", "val", "test") for f in summary[split]["files"]) == [
        "pocket_102", "pocket_103", "pocket_104"]


@pytest.mark.parametrize("variant", ["CRLF line ends", "UTF-8 BOM", "every field quoted",
                                     "trailing comma on every line", "trailing comma on data lines only",
                                     "pandas index column"])
def test_table_variants_read_exactly_like_the_plain_file(tmp_path, frame, variant):
    plain = tmp_path / "plain_001_aligned.csv"
    frame.to_csv(plain, index=False)
    text = plain.read_bytes()
    path = tmp_path / "variant_001_aligned.csv"
    if variant == "CRLF line ends":
        path.write_bytes(text.replace(b"\n", b"\r\n"))
    elif variant == "UTF-8 BOM":
        path.write_bytes(b"\xef\xbb\xbf" + text)
    elif variant == "every field quoted":
        frame.to_csv(path, index=False, quoting=csv.QUOTE_ALL)
    elif variant == "trailing comma on every line":
        path.write_bytes(text.replace(b"\n", b",\n"))
    elif variant == "trailing comma on data lines only":
        path.write_bytes(_lines(text, lambda i, row: row + b","))
    else:
        frame.to_csv(path, index=True)
    want, got = read_run(plain), read_run(path)
    assert (got.columns, got.lines, got.warnings) == (want.columns, want.lines, [])
    assert got.values.shape == want.values.shape
    assert ((got.values == want.values) | (got.values != got.values) & (want.values != want.values)).all()


def test_spaces_around_column_names_are_removed_with_a_warning(tmp_path, frame, caplog):
    folder = good_folder(tmp_path / "data", frame)
    path = folder / "pocket_103_aligned.csv"
    frame.rename(columns={"x_motor": " x_motor", "gcode_string": "gcode_string "}).to_csv(path, index=False)
    run, plain = read_run(path), read_run(folder / "pocket_101_aligned.csv")
    assert run.columns == plain.columns and run.lines == plain.lines
    warning = f"{path}: spaces around column names removed: ' x_motor', 'gcode_string '"
    assert run.warnings == [warning]
    with caplog.at_level(logging.WARNING):
        summary = prepare(make_cfg(f"data.dir={folder}", tmp=tmp_path)).summary
    assert summary["file_warnings"] == [{"file": path.name, "warning": warning}]
    assert caplog.text.count(warning) == 1
    caplog.clear()
    with caplog.at_level(logging.INFO):  # a cache hit warns again: the user sees it every time
        assert prepare(make_cfg(f"data.dir={folder}", tmp=tmp_path)).summary == summary
    assert "data cache hit" in caplog.text and caplog.text.count(warning) == 1


@pytest.mark.parametrize("line,words,dropped", [
    ("G1 X1e3", [("G", 1), ("X", 1000)], 0),                      # exponent straight after the number
    ("G1 X1.5E-3 Y-2e+1", [("G", 1), ("X", 0.0015), ("Y", -20)], 0),
    ("G1 X.5", [("G", 1), ("X", 0.5)], 0),                        # no leading zero
    ("G1 X-.5 Y+.25", [("G", 1), ("X", -0.5), ("Y", 0.25)], 0),   # signed, no leading zero
    ("G53 Z0.", [("G", 53), ("Z", 0)], 0),                        # trailing dot
    ("g1 x1.5 y-2", [("G", 1), ("X", 1.5), ("Y", -2)], 0),        # lower case
    ("G1X10Y-2.5F40.", [("G", 1), ("X", 10), ("Y", -2.5), ("F", 40)], 0),  # no spaces
    ("G1 X 1.5", [("G", 1), ("X", 1.5)], 0),                      # space after the letter
    ("G1 X1 E3", [("G", 1), ("X", 1), ("E", 3)], 0),              # with a space, E is a word
    ("G1 X1 (move to X5", [("G", 1), ("X", 1)], 1),               # unclosed comment: never read X5
    ("G1 X1 (a) Y2 (b", [("G", 1), ("X", 1), ("Y", 2)], 1),
    ("G1 X1e999", [("G", 1)], 1),                                 # beyond float range: dropped, counted
    ("G1 X1.2.3", [("G", 1), ("X", 1.2)], 1),                     # two decimal points
    ("G1 X1,5", [("G", 1), ("X", 1)], 1),                         # decimal comma
])
def test_gcode_number_forms(line, words, dropped):
    assert parse_line(line) == ([(k, float(v)) for k, v in words], dropped)


def test_gcode_number_forms_in_a_recording(tmp_path, frame, caplog):
    """Exponents read as numbers (X up to 1000 in the vocabulary); the unclosed comment is flagged:
    a warning naming the file and its first row, listed in data_summary.json, counted."""
    folder = good_folder(tmp_path / "data", frame)
    path = folder / "pocket_103_aligned.csv"
    df = _edit(frame, "gcode_string", slice(0, 9), "G1 X1e3 Y.5 Z-.5")
    df = _edit(df, "gcode_string", slice(10, 19), "G1 X1 (move to X5")
    df.to_csv(path, index=False)
    with caplog.at_level(logging.WARNING):
        data = prepare(make_cfg(f"data.dir={folder}", "data.split_seed=1", tmp=tmp_path))
    warning = (f"{path}: 10 chunks of G-code text that are not words (a letter and a number) were dropped "
               "from the targets (first at row 12: 'G1 X1 (move to X5')")
    assert data.summary["unparsed_chunks_dropped"] == 10
    assert data.summary["file_warnings"] == [{"file": path.name, "warning": warning}]
    assert caplog.text.count(warning) == 1
    if "pocket_103" in data.splits["train"].files:
        assert data.vocab.ranges["X"][1] == 1000.0


def test_cache_never_reports_another_folder(tmp_path, frame):
    """Two folders with the same bytes: each run's summary names the folder it read, and its files."""
    first = good_folder(tmp_path / "a", frame)
    bad_cases(frame)["empty file"][1](first / "empty_001_aligned.csv")
    second = tmp_path / "b"
    shutil.copytree(first, second)
    for folder in (first, second, first):
        s = prepare(make_cfg(f"data.dir={folder}", "data.on_error=skip", tmp=tmp_path)).summary
        assert s["data_dir"] == str(folder)
        assert s["skipped_files"] == [{"file": "empty_001_aligned.csv", "error": f"{folder / 'empty_001_aligned.csv'}: "
                                                                                 "empty file"}]


def test_cache_folder_that_cannot_be_written_turns_the_cache_off(tmp_path, frame, caplog):
    folder = good_folder(tmp_path / "data", frame)
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be")
    cfg = make_cfg(f"data.dir={folder}", tmp=tmp_path)
    with caplog.at_level(logging.WARNING):
        summary = prepare(cfg).summary
    assert f"data.cache_dir={blocker}: cannot write the cache (not a folder): cache turned off for this run" \
        in caplog.text
    assert summary["train"]["files"] and files_under(tmp_path) == sorted([*files_under(folder), blocker])
    assert blocker.read_text() == "a file where the cache folder should be"


def test_summarize_skips_damaged_run_files_with_a_warning_naming_each(tmp_path, capsys):
    metrics = {"test/command_acc": 0.5, "majority/command_acc": 0.9, "epochs": 3, "collapsed": False}
    make_run(tmp_path / "0_good", metrics=metrics)
    cut = make_run(tmp_path / "1_cut", metrics=metrics)
    (cut / "metrics.json").write_text(json.dumps(metrics)[:20])  # a full disk cut it short
    noconfig = make_run(tmp_path / "2_noconfig", metrics=metrics)
    (noconfig / ".hydra" / "config.yaml").write_text("name: [unclosed\n")
    trial = make_run(tmp_path / "3_trial", metrics=metrics, trial={"study": "s", "trial": 0})
    (trial / "optuna_trial.json").write_bytes(b"\xff\xfe")
    rows = summarize.main([str(tmp_path)])
    out, err = capsys.readouterr()
    warnings = err.splitlines()
    assert len(warnings) == 3 and "Traceback" not in out + err
    assert warnings[0].startswith(f"warning: {cut / 'metrics.json'}: damaged, skipped (JSONDecodeError: ")
    assert warnings[1].startswith(f"warning: {noconfig / '.hydra' / 'config.yaml'}: damaged, skipped (")
    assert warnings[2].startswith(f"warning: {trial / 'optuna_trial.json'}: damaged, skipped (UnicodeDecodeError: ")
    assert [r["seeds"] for r in rows] == [2, "-"]  # 0_good and 3_trial (its trial file unread) group together
    assert f"{cut}: failed: metrics.json is damaged" in out
    assert "3 run folders (2 finished)" in out


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
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert files_under(tmp_path) == [path]


# --- bad configuration ------------------------------------------------------------------------------
@pytest.mark.parametrize("override,message", [
    ("data.window=-4", "data.window=-4: must be a whole number >= 1"),
    ("data.window=0", "data.window=0: must be a whole number >= 1"),
    ("data.stride=0", "data.stride=0: must be a whole number >= 1"),
    ("data.stride=1.5", "data.stride=1.5: must be a whole number >= 1"),
    ("aug.oversample_factor=0", "aug.oversample_factor=0: must be a whole number >= 1"),
    ("model=multihead model.loss_weights.command=-1", "model.loss_weights.command=-1: must be a number >= 0"),
    ("model=multihead model.loss_weights.param_value=-0.5",
     "model.loss_weights.param_value=-0.5: must be a number >= 0"),
    ("data.split=[0.5,0.5,0.5]", "data.split="),
    ("data.max_nonfinite=2", "data.max_nonfinite=2: must be between 0 and 1"),
    ("data.on_error=ignore", "data.on_error=ignore: must be one of raise, skip"),
    ("features.groups=[momo]", "features.groups="),
    ("trainer.monitor=train/loss", "trainer.monitor=train/loss"),
    ("model=multihead model.n_heads=3", "model.d_model=32: must be divisible by model.n_heads=3"),
    ("aug.shift=100", "aug.shift=100"),
    ("task=eval", "ckpt_path: task=eval needs ckpt_path"),
    ("task=eval trainer.resume=true", "trainer.resume=true: only task=train resumes an interrupted run; task=eval "
                                      "reads a trained checkpoint: pass ckpt_path=RUN/checkpoints/best.pt instead"),
])
def test_validate_names_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(make_cfg(*override.split(" ")))


def test_bad_ckpt_path_fails_before_any_work(tmp_path):
    torch.save({"weights": torch.ones(2)}, tmp_path / "foreign.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    for name, message in (("nope.pt", "no such file"), ("text.pt", "not a readable checkpoint (UnpicklingError)"),
                          ("foreign.pt", "not a gcode-exp checkpoint (format gcode-exp/2)")):
        run_dir = tmp_path / f"eval_{name}"
        with pytest.raises(GcodeExpError, match=re.escape(f"ckpt_path={tmp_path / name}: {message}")):
            tasks.run(make_cfg("task=eval", f"ckpt_path={tmp_path / name}", tmp=tmp_path), run_dir)
        # the folder holds only the failure record (config, log, why), nothing cached
        assert sorted(p.name for p in run_dir.iterdir()) == [".hydra", "error.txt", "resolved_config.yaml", "run.log"]
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
        Checkpoint.load(cut)


@pytest.mark.slow
def missing_first_tensor(blob: dict) -> str:
    name = sorted(blob["model"])[0]
    del blob["model"][name]
    return name


@pytest.mark.parametrize("damage,message", [
    (missing_first_tensor,  # a tensor the model has is missing: the line names it
     "its weights do not fit the model its config describes (Error(s) in loading state_dict for"),
    (lambda b: b["features"].update(foo=1), "a damaged checkpoint (TypeError reading its features and vocabulary)"),
], ids=["weights-vs-config", "features"])
def test_damaged_parts_of_a_real_checkpoint_are_one_line(tmp_path, trained, damage, message):
    """A checkpoint that loads but whose parts do not fit together: one line naming it (and what does not
    fit), exit 2."""
    blob = torch.load(trained / "checkpoints" / "best.pt", weights_only=True)
    named = damage(blob)
    bad = tmp_path / "bad.pt"
    torch.save(blob, bad)
    line = one_error_line(cli(tmp_path, "task=eval", f"ckpt_path={bad}", f"data.dir={SAMPLE}"))
    assert line.startswith(f"ckpt_path={bad}: {message}"), line
    assert named is None or f'"{named}"' in line, line


@pytest.mark.slow
def test_a_board_failing_mid_recording_reads_as_absent_from_there_with_a_warning(tmp_path, frame, caplog):
    """Two boards whose every cell is empty from row 150 on (a logger writes a failed board so): more empty
    cells than data.max_nonfinite allows, yet not damage. The file is read, the boards named in a warning,
    and their presence flags are 0 from that row on (1 before), so a model compares them only where they were."""
    folder = good_folder(tmp_path / "data", frame)
    failed = [c for c in boards(frame) if c.split(".")[0] in ("frame_b2", "frame_l2")]
    assert 0.05 * len(frame) * len(sensors(frame)) < (len(frame) - 150) * len(failed)  # past the limit
    frame.pipe(_edit, failed, slice(150, None), None).to_csv(folder / "pocket_101_aligned.csv", index=False)
    with caplog.at_level(logging.WARNING):
        data = prepare(make_cfg(f"data.dir={folder}", tmp=tmp_path))
    warning = next(w["warning"] for w in data.summary["file_warnings"] if w["file"] == "pocket_101_aligned.csv")
    assert "IMU board frame_b2, frame_l2 silent (every cell empty) on 150 rows, first at row 152" in warning
    assert warning in caplog.text and data.summary["nonfinite_cells_filled"] == 0
    run = read_run(folder / "pocket_101_aligned.csv")
    flags = run_inputs(run, data.features)[:, len(data.features.channels):]
    for k, board in enumerate(data.features.boards):
        gone = board in ("frame_b2", "frame_l2")
        assert flags[:150, k].min() == 1 and flags[150:, k].max() == (0 if gone else 1), board


def test_a_clock_that_goes_backwards_and_rows_written_twice_are_named(tmp_path, frame, caplog):
    """A logger's clock set back mid-job, and a row it wrote twice: the rows are kept in file order (their
    row numbers the file's), and each oddity is a warning naming the file and its first row."""
    folder = good_folder(tmp_path / "data", frame)
    odd = frame.copy()
    odd.loc[100:, "t_console"] = odd.loc[100:, "t_console"].map(lambda t: f"{int(t[:2]) - 1:02d}{t[2:]}")
    odd = pd.concat([odd.iloc[:201], odd.iloc[200:201], odd.iloc[201:]], ignore_index=True)  # row 200 twice
    odd.to_csv(folder / "pocket_101_aligned.csv", index=False)
    with caplog.at_level(logging.WARNING):
        data = prepare(make_cfg(f"data.dir={folder}", tmp=tmp_path))
    notes = [w["warning"] for w in data.summary["file_warnings"] if w["file"] == "pocket_101_aligned.csv"]
    back, twice = frame["t_console"][99], frame["t_console"][100]
    assert notes == [
        f"{folder / 'pocket_101_aligned.csv'}: t_console goes backwards 1 times (first at row 102: "
        f"{int(twice[:2]) - 1:02d}{twice[2:]} after {back}): rows kept in file order",
        f"{folder / 'pocket_101_aligned.csv'}: 1 rows repeat the row before (its time and every value; first at "
        "row 203): kept, each read as a row of its own"], notes
    assert all(n in caplog.text for n in notes) and len(read_run(folder / "pocket_101_aligned.csv").lines) == 301


def test_a_work_position_frozen_while_the_controller_runs_is_named(tmp_path, frame, caplog):
    """Position channels that stop updating while the job runs would read, with all inputs, as a machine
    standing still. Held for FROZEN_ROWS rows or more while `stat` says running: a warning naming the file,
    the first row and how long; a shorter stand (a dwell, a slow corner) and the recording as made: none."""
    folder = good_folder(tmp_path / "data", frame)
    pos = ["posx", "posy", "posz"]
    for name, first, rows in (("pocket_101", 120, FROZEN_ROWS + 20), ("pocket_102", 120, FROZEN_ROWS // 2)):
        odd = frame.copy()
        odd.loc[first : first + rows - 1, pos] = odd.loc[first - 1, pos].to_numpy()
        odd.loc[first - 1 : first + rows - 1, "stat"] = RUNNING
        odd.to_csv(folder / f"{name}_aligned.csv", index=False)
    with caplog.at_level(logging.WARNING):
        data = prepare(make_cfg(f"data.dir={folder}", tmp=tmp_path))
    notes = {w["file"]: w["warning"] for w in data.summary["file_warnings"]}
    assert list(notes) == ["pocket_101_aligned.csv"], notes
    said = re.fullmatch(rf"{re.escape(str(folder / 'pocket_101_aligned.csv'))}: the work position \(posx, posy, posz\) "
                        rf"stays the same for (\d+) rows from row (\d+) while the controller reports running "
                        rf"\(stat {RUNNING}\), 1 such stretch\(es\): a frozen position channel or a long pause; rows "
                        r"kept as recorded", notes["pocket_101_aligned.csv"])
    assert said and int(said[1]) >= FROZEN_ROWS + 21 and int(said[2]) <= 121, notes  # row 121: the file's row 119
    assert notes["pocket_101_aligned.csv"] in caplog.text


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
def test_predict_refuses_the_same_recording_twice_as_training_does(tmp_path, trained, frame):
    """task=predict reads the folder by the same rule as train and eval: `x.csv` beside `x.csv.gz` is
    one recording twice, refused naming both (not predicted twice, one output overwriting the other)."""
    folder = good_folder(tmp_path / "data", frame, n=1)
    twin = folder / "pocket_101_aligned.csv.gz"
    twin.write_bytes(gzip.compress((folder / "pocket_101_aligned.csv").read_bytes()))
    message = f"{folder / 'pocket_101_aligned.csv'}, {twin}: the same recording twice"
    with pytest.raises(DataError, match=re.escape(message)):
        tasks.run(make_cfg(*FAST, "task=predict", f"ckpt_path={trained / 'checkpoints' / 'best.pt'}",
                           f"data.dir={folder}"), tmp_path / "predict")
    assert not (tmp_path / "predict" / "program.csv").exists()


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
def cli(tmp: Path, *args: str, cache: Path | None = None, wrap: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    cmd = [*wrap, sys.executable, str(ROOT / "run.py"), f"data.cache_dir={cache or tmp / 'cache'}",
           f"hydra.run.dir={tmp / 'run'}", *FAST, *args]
    return forked_python.run(cmd, cwd=ROOT, timeout=300)  # `wrap`: a real interpreter under it


def file_modes_apply() -> tuple[str, ...]:
    """Root reads and writes every file whatever its mode: under root, a permission case runs without the
    two capabilities that allow that, so the modes bind it as they bind any user."""
    if os.geteuid() != 0:
        return ()
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: file modes cannot be made to apply")
    return ("setpriv", "--bounding-set=-dac_override,-dac_read_search")


def one_error_line(res: subprocess.CompletedProcess) -> str:
    """The only stderr line, `error: ...`; exit code 2; no traceback anywhere."""
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.stderr[-2000:]
    assert "Traceback" not in res.stdout + res.stderr
    return lines[0].removeprefix("error: ")


@pytest.mark.slow
@pytest.mark.parametrize("case", ["truncated .gz", "non-numeric sensor cell", "NaN/inf run in sensors",
                                  "shorter than one window", "no folder", "duplicate column header",
                                  "semicolon-separated", "gzip data named .csv", "no labelled row", "broken symlink",
                                  "same recording twice"])
def test_cli_bad_data_one_line_exit_2_nothing_cached(tmp_path, frame, case):
    folder = good_folder(tmp_path / "data", frame, n=1)
    if case == "no folder":
        folder, path, message = tmp_path / "nope", tmp_path / "nope", "data.dir is not a folder"
    elif case == "same recording twice":
        twin = folder / "pocket_101_aligned.csv.gz"
        twin.write_bytes(gzip.compress((folder / "pocket_101_aligned.csv").read_bytes()))
        path, message = f"{folder / 'pocket_101_aligned.csv'}, {twin}", re.escape(
            "the same recording twice (each reads as run 'pocket_101'); keep one")
    else:
        name, make, message = bad_cases(frame)[case]
        path = folder / name
        make(path)
    line = one_error_line(cli(tmp_path, "task=prepare", f"data.dir={folder}"))
    assert says(line, path, message), line
    assert files_under(tmp_path / "cache") == []
    left = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert left == [".hydra", "error.txt", "resolved_config.yaml", "run.log"], left
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
def test_cli_folder_mess_in_skip_mode_warns_once_each_and_lists_all(tmp_path, frame):
    """One real-looking messy folder: five good recordings (one with padded column names), the same run
    twice, editor and backup files, and four broken files. Exit 0; data_summary.json lists every one."""
    folder = good_folder(tmp_path / "data", frame, n=5)
    mess(folder)
    twin = folder / "pocket_101_aligned.csv.gz"
    twin.write_bytes(gzip.compress((folder / "pocket_101_aligned.csv").read_bytes()))
    padded = folder / "pocket_105_aligned.csv"
    frame.rename(columns={"x_motor": " x_motor"}).to_csv(padded, index=False)
    cases = bad_cases(frame)
    broken = ["duplicate column header", "semicolon-separated", "symlink loop", "no labelled row"]
    for case in broken:
        name, make, _ = cases[case]
        make(folder / name)
    res = cli(tmp_path, "task=prepare", f"data.dir={folder}", "data.on_error=skip")
    output = res.stdout + res.stderr
    assert res.returncode == 0 and "Traceback" not in output, output[-3000:]
    summary = json.loads((tmp_path / "run" / "data_summary.json").read_text())
    twins = f"{folder / 'pocket_101_aligned.csv'}, {twin}: the same recording twice"
    skipped = {s["file"]: s["error"] for s in summary["skipped_files"]}
    assert sorted(skipped) == sorted(["pocket_101_aligned.csv", twin.name, *(cases[c][0] for c in broken)])
    for case in broken:
        name, _, message = cases[case]
        assert says(skipped[name], folder / name, message), skipped[name]
        assert output.count(f"WARNING] - skipping {folder / name}: ") == 1, name
    assert skipped[twin.name].startswith(twins) and output.count(f"WARNING] - skipping {twins}") == 2
    assert {i["file"]: i["reason"] for i in summary["ignored_files"]} == NOT_RECORDINGS
    for name, reason in NOT_RECORDINGS.items():
        assert output.count(f"WARNING] - ignoring {folder / name}: {reason}") == 1, name
    warning = f"{padded}: spaces around column names removed: ' x_motor'"
    assert summary["file_warnings"] == [{"file": padded.name, "warning": warning}]
    assert output.count(f"WARNING] - {warning}") == 1
    used = sorted(f for split in ("train", "val", "test") for f in summary[split]["files"])
    assert used == ["pocket_102", "pocket_103", "pocket_104", "pocket_105"]


@pytest.mark.slow
@pytest.mark.parametrize("blocker", ["a file", "a read-only folder"])
def test_cli_cache_folder_that_cannot_be_written(tmp_path, frame, blocker):
    folder = good_folder(tmp_path / "data", frame)
    cache = tmp_path / "cache"
    if blocker == "a file":
        cache.write_text("not a folder")
    else:
        cache.mkdir()
        cache.chmod(0o555)
    res = cli(tmp_path, "task=prepare", f"data.dir={folder}", cache=cache, wrap=file_modes_apply())
    output = res.stdout + res.stderr
    assert res.returncode == 0 and "Traceback" not in output, output[-3000:]
    why = "not a folder" if blocker == "a file" else "Permission denied"
    assert output.count(f"data.cache_dir={cache}: cannot write the cache ({why}): cache turned off for this run") == 1
    assert json.loads((tmp_path / "run" / "data_summary.json").read_text())["train"]["files"]
    assert cache.is_file() or files_under(cache) == []


@pytest.mark.slow
def test_cli_unreadable_recording_one_line(tmp_path, frame):
    folder = good_folder(tmp_path / "data", frame)
    locked = folder / "pocket_102_aligned.csv"
    locked.chmod(0)
    line = one_error_line(cli(tmp_path, "task=prepare", f"data.dir={folder}", wrap=file_modes_apply()))
    assert line == f"{locked}: not readable (permission denied)"


@pytest.mark.slow
@pytest.mark.parametrize("inside", [True, False], ids=["run-folder-inside", "the-folder-itself"])
def test_cli_run_folder_that_cannot_be_written_one_line(tmp_path, inside):
    """A read-only place for the run folder: refused before anything is read or written (Hydra would
    give a PermissionError traceback)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    run = locked / "run" if inside else locked
    res = subprocess.run([*file_modes_apply(), sys.executable, str(ROOT / "run.py"), f"hydra.run.dir={run}",
                          f"data.cache_dir={tmp_path / 'cache'}", *FAST], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    where = f"folder's parent {locked}" if inside else "folder"
    assert one_error_line(res) == (f"{run}: the run {where} cannot be written (Permission denied); "
                                   "choose another hydra.run.dir")
    assert not (tmp_path / "cache").exists() and list(locked.iterdir()) == []


@pytest.mark.slow
def test_cli_run_folder_path_that_is_a_file(tmp_path):
    (tmp_path / "run").write_text("a file where the run folder should be")
    line = one_error_line(cli(tmp_path, "task=prepare"))
    assert line.startswith(f"{tmp_path / 'run'}: ")


@pytest.mark.slow
@pytest.mark.parametrize("args,message", [
    (["data.window=-4"], "data.window=-4: must be a whole number >= 1"),
    (["data.stride=0"], "data.stride=0: must be a whole number >= 1"),
    (["aug.oversample_factor=0"], "aug.oversample_factor=0: must be a whole number >= 1"),
    (["model=multihead", "model.loss_weights.command=-1"], "model.loss_weights.command=-1: must be a number >= 0"),
    (["task=eval", "ckpt_path=/nonexistent/best.pt"], "ckpt_path=/nonexistent/best.pt: no such file"),
])
def test_cli_bad_config_names_the_key_before_any_work(tmp_path, args, message):
    assert one_error_line(cli(tmp_path, *args)) == message
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run" / "data_summary.json").exists()


@pytest.mark.slow
def test_cli_predict_names_a_missing_fallback_checkpoint_by_its_key(tmp_path, trained):
    """predict.fallback is a second checkpoint: a wrong path is named by that key, not by ckpt_path, before
    any recording is read."""
    line = one_error_line(cli(tmp_path, "task=predict", f"ckpt_path={trained / 'checkpoints' / 'best.pt'}",
                              "predict.fallback=/nonexistent/best.pt"))
    assert line == "predict.fallback=/nonexistent/best.pt: no such file"
    assert not (tmp_path / "run" / "predictions").exists()


@pytest.mark.slow
@pytest.mark.parametrize("task", ["eval", "predict"])
def test_cli_resume_with_eval_or_predict_says_only_training_resumes(tmp_path, trained, task):
    """`task=eval trainer.resume=true` without ckpt_path: why it cannot, not only that ckpt_path is missing;
    with ckpt_path it scores the checkpoint, with a warning that trainer.resume is ignored."""
    line = one_error_line(cli(tmp_path, f"task={task}", "trainer.resume=true"))
    assert line == (f"trainer.resume=true: only task=train resumes an interrupted run; task={task} reads a trained "
                    "checkpoint: pass ckpt_path=RUN/checkpoints/best.pt instead")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run" / "data_summary.json").exists()
    ok = cli(tmp_path / "with_ckpt", f"task={task}", "trainer.resume=true", f"data.dir={SAMPLE}",
             f"ckpt_path={trained / 'checkpoints' / 'best.pt'}")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert f"config: trainer.resume=true: ignored with task={task} (only task=train resumes a run)" in ok.stdout


@pytest.mark.slow
def test_cli_ckpt_path_that_is_a_folder_names_the_checkpoint_inside(tmp_path, trained):
    """`ckpt_path=RUN` (the run folder, or its checkpoints/): not "no such file", but the best.pt to pass."""
    best = trained / "checkpoints" / "best.pt"
    for folder in (trained, trained / "checkpoints"):
        tmp = tmp_path / folder.name
        line = one_error_line(cli(tmp, "task=eval", f"ckpt_path={folder}", f"data.dir={SAMPLE}"))
        assert line == f"ckpt_path={folder}: a folder, not a checkpoint file; did you mean ckpt_path={best}?"
        assert not (tmp / "run" / "metrics.json").exists() and not (tmp / "cache").exists()
    line = one_error_line(cli(tmp_path, "task=predict", f"ckpt_path={SAMPLE}", f"data.dir={SAMPLE}"))
    assert line == f"ckpt_path={SAMPLE}: a folder, not a checkpoint file (a run folder holds its best as " \
        "checkpoints/best.pt)"


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["cut", "text", "folder"])
def test_cli_resume_of_a_damaged_last_pt_names_the_run_not_ckpt_path(tmp_path, trained, damage):
    """An interrupted run (last.pt, no metrics.json) whose last.pt is damaged: the message is about the
    run `trainer.resume=true` cannot resume, never about a ckpt_path the user did not give; nothing changes."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (run / "metrics.json").unlink()
    last = run / "checkpoints" / "last.pt"
    if damage == "cut":
        last.write_bytes(last.read_bytes()[:20000])
    elif damage == "text":
        last.write_text("not a checkpoint")
    else:
        last.unlink()
        last.mkdir()
    before = {p: p.read_bytes() for p in files_under(run)}
    line = one_error_line(cli(tmp_path, "trainer.resume=true", f"data.dir={SAMPLE}"))
    why = {"cut": "not a readable checkpoint (", "text": "not a readable checkpoint (UnpicklingError)",
           "folder": "a folder, not a checkpoint file"}[damage]
    assert line.startswith(f"trainer.resume=true: cannot resume {run}: checkpoints/last.pt: {why}"), line
    assert line.endswith("; pass overwrite=true to start the run afresh") and "ckpt_path" not in line, line
    assert {p: p.read_bytes() for p in files_under(run)} == before
    if damage == "cut":  # the advice works
        again = cli(tmp_path, "overwrite=true", f"data.dir={SAMPLE}")
        assert again.returncode == 0 and (run / "metrics.json").is_file(), again.stderr[-2000:]


@pytest.mark.slow
def test_cli_unknown_group_option_is_one_line_with_the_options(tmp_path):
    assert one_error_line(cli(tmp_path, "model=transformer")) == \
        "model=transformer: no such option of model; options: align, baseline, multihead, nearest, rocket, toolpath"


@pytest.mark.parametrize("override, key", [
    ("aug._target_=nosuch.Augment", "aug._target_=nosuch.Augment: must be an importable subclass"),
    ("trainer.optimizer._target_=nosuch.Optimizer", "trainer.optimizer._target_=nosuch.Optimizer: must be"),
    ("model/encoder=lstm model.encoder._target_=nosuch.Encoder", "model.encoder._target_=nosuch.Encoder: must be"),
])
def test_a_class_that_does_not_import_is_one_line(tmp_path, override, key):
    """A `_target_` naming nothing importable: the refusal alone, not Hydra's import log (on stdout) too."""
    res = cli(tmp_path, "model=multihead", *override.split(" "), f"data.dir={SAMPLE}")
    assert one_error_line(res).startswith(key), res.stderr
    assert "nosuch" not in res.stdout, res.stdout
