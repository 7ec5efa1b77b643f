"""task=predict: the vote, the .gcode reconstruction, program naming, and the job offline and live."""

from __future__ import annotations

import contextlib
import csv
import gzip
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from gcode_exp.data.read import text_rows
from gcode_exp.predict import axis_moves, edit_similarity, endpoints, move_types, reconstruct, score_rows
from gcode_exp.programs import name_program
from gcode_exp.row_votes import Guess, RowVote, position_weights, row_head_answers, vote, window_starts
from gcode_exp.run_folder import RUN_FILES
from tests import forked_python
from tests.conftest import ROOT, SAMPLE, default_run_and_two_programs, run_py

LIVE_LINE = re.compile(r"^\S+  .*  \(p=\d\.\d\d\)$")


# --- pure functions, hand-made answers -----------------------------------------------------------------
def test_windows_cover_every_row():
    assert window_starts(8, 4, 2) == [0, 2, 4]
    assert window_starts(9, 4, 2) == [0, 2, 4, 5]  # one more, flush with the end
    assert window_starts(3, 4, 2) == []
    assert position_weights(4).tolist() == [0.5, 1.0, 1.0, 0.5]


def test_vote_weighs_confidence_and_centre():
    # window 4 (position weights 0.5 1 1 0.5), 8 rows: [0,4) -> A at 0.8, [2,6) -> B at 0.6, [4,8) -> B at 1.0
    rows = vote(8, [Guess(0, "A", 0.8), Guess(2, "B", 0.6), Guess(4, "B", 1.0)], 4)
    assert [r.line for r in rows] == ["A", "A", "A", "B", "B", "B", "B", "B"]
    assert rows[0] == RowVote("A", pytest.approx(0.8), "", 0.0)  # one window: its confidence
    # row 2: A at window 0's centre (1 x 0.8) beats B at window 1's edge (0.5 x 0.6); p over 1 + 0.5
    assert (rows[2].line, rows[2].p, rows[2].runner_up, rows[2].runner_up_p) == \
        ("A", pytest.approx(0.8 / 1.5), "B", pytest.approx(0.3 / 1.5))
    # row 3: at window 0's edge (0.5 x 0.8 = 0.4) and window 1's centre (1 x 0.6): the less confident
    # window wins, because the row sits at its centre
    assert (rows[3].line, rows[3].p, rows[3].runner_up, rows[3].runner_up_p) == \
        ("B", pytest.approx(0.4), "A", pytest.approx(0.4 / 1.5))
    assert rows[5].p == pytest.approx((0.5 * 0.6 + 1.0) / 1.5) and rows[5].runner_up == ""


def test_vote_ties_go_to_the_line_voted_first():
    rows = vote(4, [Guess(0, "A", 0.5), Guess(0, "B", 0.5)], 4)
    assert {r.line for r in rows} == {"A"} and {r.runner_up for r in rows} == {"B"}


def test_row_head_names_rows_it_knows_and_leaves_the_rest_to_the_vote():
    # 2 training lines + "another line"; window 4, windows at rows 0 and 2 (6 rows)
    first = np.array([[0.9, 0.02, 0.08]] * 2 + [[0.1, 0.1, 0.8]] * 2)   # rows 0-1: line A; 2-3: another
    second = np.array([[0.1, 0.1, 0.8]] * 2 + [[0.05, 0.9, 0.05]] * 2)  # rows 2-3: another; 4-5: line B
    guesses = [Guess(0, "G1 X9", 0.6, first), Guess(2, "G1 X9", 0.6, second)]
    votes = vote(6, guesses, 4)
    rows = row_head_answers(votes, guesses, ["G1 X1", "G1 X2"], 4)
    assert [r.line for r in rows] == ["G1 X1", "G1 X1", "G1 X9", "G1 X9", "G1 X2", "G1 X2"]
    # second: the head's "another line" (0.08), which the decoder names; its p is the head's, not the vote's
    assert (rows[0].p, rows[0].runner_up, rows[0].runner_up_p) == (pytest.approx(0.9), "G1 X9", pytest.approx(0.08))
    assert rows[2] == votes[2]  # "another line": the decoder's vote stands, new lines stay possible
    no_head = [Guess(0, "G1 X9", 0.6), Guess(2, "G1 X9", 0.6)]
    assert row_head_answers(votes, no_head, ["G1 X1", "G1 X2"], 4) == votes


def test_runner_up_comes_from_the_distribution_p_comes_from():
    # the head unsure between three training lines (0.4, 0.35, 0.2; 0.05 another line), the decoder sure
    # (0.95) of a line it does not know: the runner-up is the head's second line, never the vote's 0.95
    unsure = np.array([[0.4, 0.35, 0.2, 0.05]] * 4)
    guesses = [Guess(0, "G1 X9", 0.95, unsure)]
    rows = row_head_answers(vote(4, guesses, 4), guesses, ["G1 X1", "G1 X2", "G1 X3"], 4)
    assert {(r.line, r.p, r.runner_up, r.runner_up_p) for r in rows} == {("G1 X1", 0.4, "G1 X2", 0.35)}
    # "another line" second, but the decoder names a training line: that class has no name, the next counts
    other = np.array([[0.6, 0.1, 0.0, 0.3]] * 4)
    guesses = [Guess(0, "G1 X1", 0.9, other)]
    rows = row_head_answers(vote(4, guesses, 4), guesses, ["G1 X1", "G1 X2", "G1 X3"], 4)
    assert (rows[0].runner_up, rows[0].runner_up_p) == ("G1 X2", pytest.approx(0.1))
    # the head certain (one-hot, as the nearest model's rows): no runner-up, whatever the windows decoded
    sure = np.array([[0.0, 1.0, 0.0, 0.0]] * 4)
    guesses = [Guess(0, "G1 X9", 0.7, sure), Guess(0, "G1 X3", 0.7, sure)]
    rows = row_head_answers(vote(4, guesses, 4), guesses, ["G1 X1", "G1 X2", "G1 X3"], 4)
    assert {(r.line, r.p, r.runner_up, r.runner_up_p) for r in rows} == {("G1 X2", 1.0, "", 0.0)}


def test_reconstruction_merges_repeats_and_marks_low_confidence():
    votes = [RowVote("G0 Z5", 0.9, "", 0), RowVote("G0 Z5", 0.7, "", 0), RowVote("G1 X1", 0.3, "G1 X2", 0.2),
             RowVote("G0 Z5", 0.95, "", 0)]
    text = reconstruct(votes, ["10:00:00.0", "10:00:00.3", "10:00:00.6", "10:00:00.9"], 0.5, "demo")
    body = [line for line in text.splitlines() if not line.startswith(";")]
    assert body == ["G0 Z5 ; t=10:00:00.0 p=0.80", "G1 X1 ; t=10:00:00.6 p=0.30 LOW", "G0 Z5 ; t=10:00:00.9 p=0.95"]


def test_axis_moves_and_sequence_similarity():
    moves = axis_moves(["G0 X0 Y0 Z5", "G0 X0 Y0 Z5", "G1 Z-1", "G1 X2", "G1 Y-3"])
    assert moves == [(0, 0, 0), (0, 0, 0), (0, 0, -1), (1, 0, 0), (0, -1, 0)]
    # each line's own words: its motion word, else arc parameters (an arc goes on), else X/Y/Z (a straight move)
    assert move_types(["M3 S1000", "G0 X0 Y0 Z5", "G1 Z-1 F40", "G17 G2 Y2 R1", "X3 Y1 R0.5", "X4", "G3 X4 I1 J0",
                       "X2 J1", "M30"]) == ["", "rapid", "line", "arc", "arc", "line", "arc", "arc", ""]
    assert edit_similarity(["a", "b", "c"], ["a", "b", "c"]) == 1.0
    assert edit_similarity(["a", "b", "c", "d"], ["a", "x", "c"]) == pytest.approx(0.5)  # 2 edits / 4


def test_scores_of_a_perfect_and_of_a_majority_predictor():
    # "" is an unlabelled row: not scored
    true = ["G0 X0 Y0 Z5", "G0 X0 Y0 Z5", "", "G1 Z-1", "G1 X2", "G1 X2", "G0 Z5"]
    perfect = score_rows(true, true)
    assert {k: v for k, v in perfect.items() if k != "end_errors"} == {
        "rows": 6, "right": 6, "axis_right": 6, "moving_right": 6, "move_rows": 6, "move_right": 6, "similarity": 1.0}
    assert perfect["end_errors"].tolist() == [0.0] * 6
    majority = score_rows(["G0 X0 Y0 Z5"] * len(true), true)
    assert majority["rows"] == 6 and majority["right"] == 2  # the rows whose line is the majority line
    assert majority["axis_right"] == majority["moving_right"] == 2  # it never moves; only the first line's rows
    # (no move yet) agree, in direction and in which axes move
    assert majority["move_right"] == 3  # rapid on every row: right on the three G0 rows, wrong on the G1 ones
    wrong_way = score_rows(["G0 X0 Y0 Z5", "G0 X0 Y0 Z5", "", "G1 Z9", "G1 X-2", "G1 X-2", "G0 Z5"], true)
    assert (wrong_way["axis_right"], wrong_way["moving_right"]) == (2, 6)  # the right axes, the wrong way
    assert majority["similarity"] == pytest.approx(1 - 3 / 4)  # 1 merged line against 4: 3 edits / 4
    # its end stays at (0, 0, 5); the true ends: (0,0,5) x2, (0,0,-1), (2,0,-1) x2, (2,0,5) (modal axes kept)
    assert majority["end_errors"] == pytest.approx([0, 0, 6, (4 + 36) ** 0.5, (4 + 36) ** 0.5, 2])


def test_program_naming_picks_the_operation_whose_lines_match():
    counts = {"face": Counter({"G1 X1": 10, "G1 X2": 10}), "pocket": Counter({"G1 Y5": 10, "G2 X1": 10})}
    ranked = name_program(["G1 Y5", "G1 Y5", "G2 X1", "G9"], counts, overlap=2)
    assert ranked[0][0] == "pocket" and ranked[0][1] > 0.9
    assert sum(p for _, p in ranked) == pytest.approx(1.0)
    even = name_program(["G9"], counts, overlap=1)  # a line neither knows: no evidence either way
    assert even[0][1] == pytest.approx(0.5)


# --- the job, on a tiny model trained once ------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    return default_run_and_two_programs(tmp_path_factory.mktemp("predict"))


def predict_py(t: dict, out: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return forked_python.run(predict_cmd(t, out, *args), cwd=ROOT, timeout=timeout)


def predict_cmd(t: dict, out: Path, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / "run.py"), "task=predict", f"ckpt_path={t['ckpt']}", f"data.dir={t['two']}",
            f"data.cache_dir={t['cache']}", "hardware.threads=1", f"hydra.run.dir={out}", *args]


def sample_rows(name: str) -> list[str]:
    return text_rows(SAMPLE / f"{name}_aligned.csv.gz")


def test_endpoints_go_on_from_where_earlier_lines_left_the_tool():
    """G-code is modal: an axis a line does not name stays; carried in `pos`, a stream's toolpath read piece by
    piece (the monitor page, window by window) is the path of the whole."""
    lines = ["G0 Z0.6", "G1 X1 Y2", "Y3", "Y3", "G2 X4 Y5 R1", "Z-0.1"]
    whole = endpoints(lines)
    assert np.isnan(whole[0, 0]) and whole[0, 2] == 0.6 and whole[2].tolist() == [1.0, 3.0, 0.6]
    pos: dict = {}
    pieces = np.concatenate([endpoints(lines[:3], pos), endpoints(lines[3:4], pos), endpoints(lines[4:], pos)])
    assert np.array_equal(pieces, whole, equal_nan=True) and pos == {"X": 4.0, "Y": 5.0, "Z": -0.1}


def write_csv(path: Path, rows: list[list[str]]) -> None:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def test_predict_writes_rows_program_gcode_and_metrics(trained):
    out = trained["ws"] / "pred"
    r = predict_py(trained, out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert {p.name for p in out.iterdir()} <= set(RUN_FILES)  # what overwrite=true sets aside and restores
    metrics = json.loads((out / "metrics.json").read_text())
    for prefix in ("predict", "majority"):
        for key in ("row_line_acc", "axis_acc", "moving_axes_acc", "move_type_acc", "sequence_similarity",
                    "program_acc"):
            assert 0.0 <= metrics[f"{prefix}/{key}"] <= 1.0, key
    known = []  # per labelled row: whether both its predicted and its recorded line's ends are known
    for name in ("face_003", "pocket_016"):
        with open(out / "predictions" / f"{name}.csv", newline="") as f:
            labelled = [row for row in csv.DictReader(f) if row["true_line"]]
        ends = [endpoints([row[k] for row in labelled]) for k in ("line", "true_line")]
        known += np.isfinite(ends[0] - ends[1]).all(1).tolist()
    assert metrics["predict/end_error_rows"] == pytest.approx(np.mean(known)) and 0 < np.mean(known) < 1
    with open(out / "predictions" / "face_003.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with gzip.open(SAMPLE / "face_003_aligned.csv.gz", "rt", newline="") as f:
        source = [row for row in csv.DictReader(f)]
    assert len(rows) == sum(1 for s in source if s["spindle"] != "")  # one per sensor row (silent rows dropped)
    assert rows[0]["time"] == source[0]["t_console"] and rows[0]["true_line"] == source[0]["gcode_string"]
    assert all(0.0 <= float(row["p"]) <= 1.0 and row["line"] for row in rows)
    runner_up_is_second(rows)  # the nearest model: its row answers are certain here, p 1 and no runner-up
    gcode = (out / "predictions" / "face_003.gcode").read_text().splitlines()
    body = [line for line in gcode if not line.startswith(";")]
    assert body and all(" ; t=" in line for line in body)
    assert all(a.split(" ; ")[0] != b.split(" ; ")[0] for a, b in zip(body, body[1:]))  # repeats merged
    with open(out / "program.csv", newline="") as f:
        programs = {row["recording"]: row for row in csv.DictReader(f)}
    assert set(programs) == {"face_003", "pocket_016"}
    assert programs["face_003"]["true_program"] == "face"
    ops = {"adaptive", "adaptive150025", "damageadaptive", "damageface", "damagepocket", "face", "face150025",
           "pocket", "pocket150025"}
    assert all(row["program"] in ops and 0 < float(row["p"]) <= 1 for row in programs.values())


def runner_up_is_second(rows: list[dict]) -> None:
    """The runner-up and its p come from the distribution p comes from: at most p, the two sum to <= 1."""
    for row in rows:
        p, q = float(row["p"]), float(row["runner_up_p"])
        assert q <= p and p + q <= 1.0 + 1e-3 and row["runner_up"] != row["line"], row
        assert (row["runner_up"] == "") == (q == 0.0), row


def test_token_model_reports_its_runner_up_below_p(trained):
    """A multi-head model with a row head, 1 epoch: unsure rows, whose runner-up the head names."""
    ws = trained["ws"]
    r = run_py(f"hydra.run.dir={ws / 'train_mh'}", "model=multihead", cache=trained["cache"])
    assert r.returncode == 0, r.stderr[-2000:]
    out = ws / "pred_mh"
    r = predict_py({**trained, "ckpt": ws / "train_mh" / "checkpoints" / "best.pt"}, out)
    assert r.returncode == 0, r.stderr[-2000:]
    for name in ("face_003", "pocket_016"):
        with open(out / "predictions" / f"{name}.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert any(row["runner_up"] for row in rows)
        runner_up_is_second(rows)


def test_unlabelled_recording_is_predicted_not_scored(trained):
    folder = trained["ws"] / "unlabelled"
    folder.mkdir()
    with gzip.open(SAMPLE / "face_004_aligned.csv.gz", "rt", newline="") as f:
        rows = list(csv.reader(f))
    drop = rows[0].index("gcode_string")
    write_csv(folder / "mystery.csv", [r[:drop] + r[drop + 1 :] for r in rows])
    out = trained["ws"] / "pred_unlabelled"
    r = predict_py(trained, out, f"data.dir={folder}")
    assert r.returncode == 0, r.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert "predict/row_line_acc" not in metrics and metrics["predict/files"] == 1
    assert (out / "predictions" / "mystery.gcode").is_file()
    program = next(csv.DictReader(open(out / "program.csv", newline="")))
    assert program["true_program"] == "" and program["program"]


@pytest.mark.parametrize("case, says", [
    ("missing_channel", "lacks channels the checkpoint was trained on: x_motor"),
    ("not_a_checkpoint", "not a readable checkpoint"),
    ("short", "rows, fewer than one window"),
])
def test_bad_input_is_one_line(trained, case, says):
    folder = trained["ws"] / f"bad_{case}"
    folder.mkdir()
    rows = list(csv.reader(sample_rows("face_003")))
    args = [f"data.dir={folder}"]
    if case == "missing_channel":
        drop = rows[0].index("x_motor")
        rows = [r[:drop] + r[drop + 1 :] for r in rows]
    elif case == "short":
        rows = rows[:11]
    else:
        args.append(f"ckpt_path={folder / 'face_003_aligned.csv'}")
    write_csv(folder / "face_003_aligned.csv", rows)
    r = predict_py(trained, trained["ws"] / f"out_{case}", *args)
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and says in errors[0] and "Traceback" not in r.stderr
    assert case == "not_a_checkpoint" or "face_003_aligned.csv" in errors[0]
    assert not (trained["ws"] / f"out_{case}" / "predictions").exists()  # nothing predicted, no folder for it


class Reader(threading.Thread):
    """Collects a subprocess's stdout lines as they come."""

    def __init__(self, stream):
        super().__init__(daemon=True)
        self.stream, self.lines = stream, []

    def run(self) -> None:
        for line in self.stream:
            self.lines.append(line.rstrip("\n"))


@contextlib.contextmanager
def live_process(cmd: list[str], feed=lambda: time.sleep(0.2), **popen):
    """A live-mode process and the reader of its stdout, once it printed its first line (`feed` runs
    while waiting); killed if it still runs when the block ends."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
    reader = Reader(proc.stdout)
    reader.start()
    try:
        deadline = time.monotonic() + 150
        while not any(LIVE_LINE.match(x) for x in reader.lines) and time.monotonic() < deadline and proc.poll() is None:
            feed()
        assert reader.lines, proc.stderr.read()[-2000:] if proc.poll() is not None else "nothing printed"
        yield proc, reader
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(5)


def test_live_mode_prints_lines_while_the_file_grows(trained):
    rows = sample_rows("face_003")
    path = trained["ws"] / "growing.csv"
    path.write_text("".join(rows[:41]))  # header + 40 rows: one window of 32, not two
    written = [41]

    def trickle() -> None:  # a slow trickle, so the file keeps growing while the process starts
        with open(path, "a") as f:
            f.write("".join(rows[written[0] : written[0] + 2]))
        written[0] += 2
        time.sleep(0.4)

    out = trained["ws"] / "live"
    cmd = predict_cmd(trained, out, "predict.follow=true", f"data.path={path}", "predict.idle_s=4",
                      "predict.poll_s=0.1")
    with live_process(cmd, trickle) as (proc, reader):
        assert written[0] < len(rows), "the whole file was written before the first line was printed"
        while written[0] < len(rows):
            with open(path, "a") as f:
                f.write("".join(rows[written[0] : written[0] + 100]))
            written[0] += 100
            time.sleep(0.2)
        code = proc.wait(timeout=120)
    assert code == 0, proc.stderr.read()[-2000:]
    printed = [line for line in reader.lines if not line.startswith(("[", "live: locked on"))]  # nor the log's
    assert all(LIVE_LINE.match(line) for line in printed[:-1]), [x for x in printed if not LIVE_LINE.match(x)]
    assert printed[-1].startswith(f"live: {len(rows) - 1} rows, ") and "(end of input)" in printed[-1], printed[-1]
    assert json.loads((out / "metrics.json").read_text())["live/rows"] == len(rows) - 1


def test_live_mode_started_mid_job_says_when_it_has_locked_on_the_program(trained):
    """A monitor switched on a quarter into a face job: live mode names the program once the last windows name
    it at predict.lock_p, with the row and the seconds of recording since the first row it read."""
    rows = sample_rows("face_003")
    path = trained["ws"] / "late.csv"
    path.write_text("".join([rows[0], *rows[1 + len(rows) // 4 :]]))
    out = trained["ws"] / "live_late"
    r = predict_py(trained, out, "predict.follow=true", f"data.path={path}", "predict.idle_s=1", "predict.poll_s=0.1")
    assert r.returncode == 0, r.stderr[-2000:]
    lock = [line for line in r.stdout.splitlines() if line.startswith("live: locked on")]
    assert len(lock) == 1 and lock[0].startswith("live: locked on program face (p="), r.stdout[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    first = metrics["live/jobs"][0]
    assert first["program"] == "face" and first["s"] == metrics["live/lock_s"] > 0
    assert f"at row {first['row']}, {first['s']:.1f} s after the first row read" in lock[0]
    said = [line for line in r.stdout.splitlines() if line.startswith("live: ")]
    assert said[-1].endswith(f"locked on face after {first['s']:.1f} s, 1 job(s) (end of input)"), said


def test_live_mode_ends_cleanly_on_ctrl_c(trained):
    path = trained["ws"] / "complete.csv"
    path.write_text("".join(sample_rows("pocket_016")))
    cmd = predict_cmd(trained, trained["ws"] / "live_int", "predict.follow=true", f"data.path={path}",
                      "predict.idle_s=120")
    # a shell without job control starts background jobs with SIGINT ignored, and a child inherits that:
    # restore the default so that Ctrl-C reaches the process as it does in a terminal
    with live_process(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                      preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)) as (proc, reader):
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    assert code == 0, proc.stderr.read()[-2000:]
    assert any(line.startswith("live: ") and "(interrupted)" in line for line in reader.lines), reader.lines[-3:]


@pytest.mark.parametrize("case, says", [
    ("missing", "no such file (data.path)"),
    ("no_sensors", "lacks channels the checkpoint was trained on"),
    ("short", "10 rows, fewer than one window"),
])
def test_live_mode_that_fails_before_any_window_leaves_no_predictions(trained, case, says):
    """A live run that fails is one line, exit 2, and leaves no header-only predictions/<run>.live.csv."""
    path = trained["ws"] / f"live_{case}.csv"
    if case == "no_sensors":
        path.write_text("t_console,gcode_string\n10:00:00.0,G1 X1\n")
    elif case == "short":
        path.write_text("".join(sample_rows("face_003")[:11]))
    out = trained["ws"] / f"live_fail_{case}"
    r = predict_py(trained, out, "predict.follow=true", f"data.path={path}", "predict.idle_s=1", "predict.poll_s=0.1")
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and says in errors[0] and str(path) in errors[0], r.stderr[-2000:]
    assert "Traceback" not in r.stdout + r.stderr
    assert not (out / "predictions").exists()  # neither the file nor its folder
    assert (out / "error.txt").is_file() and not (out / "metrics.json").exists()


def test_live_mode_that_fails_later_keeps_the_whole_rows_written(trained):
    """A bad row after some windows: exit 2 naming the row; the live CSV holds the windows already
    printed, every row whole, none from the bad row on."""
    rows = sample_rows("face_003")
    path = trained["ws"] / "live_bad_row.csv"
    path.write_text("".join(rows[:101]))  # header + 100 rows: windows up to row 100
    out = trained["ws"] / "live_fail_later"
    cmd = predict_cmd(trained, out, "predict.follow=true", f"data.path={path}", "predict.idle_s=30",
                      "predict.poll_s=0.1")
    with live_process(cmd) as (proc, reader):
        header = next(csv.reader([rows[0]]))
        bad = next(csv.reader([rows[101]]))
        bad[header.index("x_motor")] = "12,5"
        with open(path, "a", newline="") as f:
            csv.writer(f).writerow(bad)
        code = proc.wait(timeout=60)
        stderr = proc.stderr.read()
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 2 and errors == [f"error: {path}: row 102: a sensor column holds a non-numeric value"], stderr
    with open(out / "predictions" / "live_bad_row.live.csv", newline="") as f:
        written = list(csv.reader(f))
    assert written[0] == ["time", "start_row", "line", "p"] and len(written) > 1
    assert all(len(row) == 4 and int(row[1]) + 32 <= 100 for row in written[1:]), written


def test_recordings_named_in_upper_case_or_by_their_suffix_alone_are_predicted(trained, tmp_path):
    """A logger that writes FACE_003_ALIGNED.CSV.GZ, and a file called `_aligned.csv.gz`: both are read (not
    skipped by the pattern's case), the first as a face recording, the second under its file name."""
    folder = tmp_path / "named"
    folder.mkdir()
    (folder / "FACE_003_ALIGNED.CSV.GZ").symlink_to(SAMPLE / "face_003_aligned.csv.gz")
    (folder / "_aligned.csv.gz").symlink_to(SAMPLE / "pocket_016_aligned.csv.gz")
    out = tmp_path / "pred"
    r = predict_py({**trained, "two": folder}, out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in (out / "predictions").glob("*.csv")) == ["FACE_003.csv", "_aligned.csv.gz.csv"]
    with open(out / "program.csv", newline="") as f:
        programs = {row["recording"]: row for row in csv.DictReader(f)}
    assert programs["FACE_003"]["true_program"] == "face" and programs["FACE_003"]["program"] == "face"
    assert programs["_aligned.csv.gz"]["program"] == "pocket"


def test_scoring_recordings_the_checkpoint_trained_on_is_warned_and_recorded(trained, tmp_path):
    """task=eval of the sample with a checkpoint fitted on part of it: the training recordings among the
    scored ones are named in a warning and in data_summary.json (their scores are not of unseen runs)."""
    train_files = json.loads((trained["ws"] / "train" / "data_summary.json").read_text())["train"]["files"]
    out = tmp_path / "eval"
    r = forked_python.run([sys.executable, str(ROOT / "run.py"), "task=eval", f"ckpt_path={trained['ckpt']}",
                           f"data.dir={SAMPLE}", f"data.cache_dir={trained['cache']}", "hardware.threads=1",
                           f"hydra.run.dir={out}"], cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((out / "data_summary.json").read_text())
    assert sorted(summary["seen_in_training"]) == sorted(train_files)
    assert f"{len(train_files)} of the {len(summary['test']['files'])} scored recordings were in the checkpoint's " \
           "training split" in r.stdout + r.stderr


def test_live_mode_follows_a_log_rotated_under_it(trained):
    """A logger that rotates its file (the followed name replaced by a new file with the same header): the
    log says so, and the new file's rows are read on as more of the stream, its header skipped."""
    rows = sample_rows("face_003")
    path = trained["ws"] / "rotating.csv"
    path.write_text("".join(rows[:101]))
    out = trained["ws"] / "live_rotated"
    cmd = predict_cmd(trained, out, "predict.follow=true", f"data.path={path}", "predict.idle_s=4",
                      "predict.poll_s=0.1")
    with live_process(cmd) as (proc, reader):
        fresh = path.with_name("rotating.csv.new")
        fresh.write_text(rows[0] + "".join(rows[101:]))
        os.replace(fresh, path)  # as logrotate's create mode leaves it: another file under the name
        code = proc.wait(timeout=120)
        stderr = proc.stderr.read()
    assert code == 0, stderr[-2000:]
    assert any(f"{path}: the file was rotated" in line for line in reader.lines + stderr.splitlines())
    assert json.loads((out / "metrics.json").read_text())["live/rows"] == len(rows) - 1  # each data row once


@pytest.mark.parametrize("case", ["bom", "latin1"])
def test_live_mode_reads_text_as_the_offline_reader_does(trained, case):
    """A byte-order mark before the header is dropped (the columns keep their names, so `t_console` is the
    time); bytes that are not UTF-8 are one line naming the file, exit 2, as offline."""
    rows = sample_rows("face_003")[:101]
    path = trained["ws"] / f"live_{case}.csv"
    if case == "bom":
        path.write_bytes(b"\xef\xbb\xbf" + "".join(rows).encode())
    else:
        path.write_bytes("".join(rows).encode() + b"10:00:00.0,\xe9\n")
    out = trained["ws"] / f"live_text_{case}"
    r = predict_py(trained, out, "predict.follow=true", f"data.path={path}", "predict.idle_s=1", "predict.poll_s=0.1")
    if case == "bom":
        assert r.returncode == 0, r.stderr[-2000:]
        with open(out / "predictions" / f"live_{case}.live.csv", newline="") as f:
            first = next(csv.DictReader(f))
        assert first["time"] in {r["t_console"] for r in csv.DictReader(rows)}  # a time, not a row number
    else:
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert r.returncode == 2 and errors == [f"error: {path}: not UTF-8 text (invalid continuation byte)"], \
            r.stderr[-2000:]


def levenshtein(a: list[str], b: list[str]) -> int:
    """The textbook table, cell by cell: what edit_similarity's vector rows must equal."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def test_sequence_similarity_is_one_minus_the_edit_distance_over_the_longer_length():
    import random

    from gcode_exp.predict import edit_similarity

    r = random.Random(0)
    for _ in range(500):
        a = [r.choice(["G0 X1", "G1 X2", "M3", "G2 X1 R1"]) for _ in range(r.randint(0, 15))]
        b = [r.choice(["G0 X1", "G1 X2", "M3", "G2 X1 R1"]) for _ in range(r.randint(0, 15))]
        want = 1.0 if not a and not b else 1.0 - levenshtein(a, b) / max(len(a), len(b))
        assert edit_similarity(a, b) == pytest.approx(want), (a, b)
