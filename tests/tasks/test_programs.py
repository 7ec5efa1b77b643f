"""Which program each stretch of a recording ran: per-row naming and segments (gcode_exp/programs.py), and
task=predict's segments.csv on a recording that holds two jobs."""

import csv
from collections import Counter

import numpy as np

from gcode_exp.programs import row_programs, segments
from tests.conftest import default_run_and_two_programs, run_py

COUNTS = {"face": Counter({"G1 Y1": 10, "G1 Y2": 10}), "pocket": Counter({"G2 X1": 10, "G3 X2": 10})}


def test_each_row_names_the_program_of_the_rows_around_it():
    lines = ["G1 Y1", "G1 Y2"] * 30 + ["G2 X1", "G3 X2"] * 30
    programs, p = row_programs(lines, COUNTS, rows=16, per_row=0.25)
    assert programs[:55] == ["face"] * 55 and programs[-55:] == ["pocket"] * 55
    assert programs.index("pocket") in range(58, 63)  # the change within a few rows of where the job changed
    assert ((0.5 < p) & (p <= 1)).all()


def test_a_stray_line_does_not_make_a_segment():
    lines = ["G1 Y1"] * 40 + ["G2 X1"] * 3 + ["G1 Y2"] * 40
    programs, p = row_programs(lines, COUNTS, rows=1, per_row=1.0)  # no smoothing: the stray rows flip
    assert programs[40:43] == ["pocket"] * 3
    found = segments(programs, p, min_rows=8)
    assert [(s["first_row"], s["last_row"], s["program"]) for s in found] == [(0, 82, "face")]


def test_segments_cover_every_row_once_and_a_short_first_run_joins_the_next():
    programs = ["pocket"] * 3 + ["face"] * 20 + ["pocket"] * 20
    found = segments(programs, np.ones(len(programs)), min_rows=5)
    assert [(s["first_row"], s["last_row"], s["program"]) for s in found] == [(0, 22, "face"), (23, 42, "pocket")]


def test_predict_cuts_two_jobs_in_one_recording_where_the_second_begins(tmp_path):
    t = default_run_and_two_programs(tmp_path)
    out = tmp_path / "pred"
    r = run_py("task=predict", f"ckpt_path={t['ckpt']}", f"data.dir={t['two']}", "perturb=concat",
               f"hydra.run.dir={out}", cache=t["cache"])
    assert r.returncode == 0, r.stderr[-2000:]
    with open(out / "segments.csv", newline="") as f:
        cuts = list(csv.DictReader(f))
    for name in ("face_003+pocket_016", "pocket_016+face_003"):
        with open(out / "predictions" / f"{name}.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        source = [int(row["row"]) for row in rows]
        joined = next(i for i in range(1, len(source)) if source[i] < source[i - 1])  # the second job's first row
        mine = [c for c in cuts if c["recording"] == name]
        first, second = name.split("+")
        assert [c["program"] for c in mine] == [first.split("_")[0], second.split("_")[0]], mine
        changed = next(i for i in range(1, len(rows)) if rows[i]["program"] != rows[i - 1]["program"])
        assert abs(changed - joined) <= 20, (changed, joined)
        want = [(first if i < joined else second).split("_")[0] for i in range(len(rows))]
        right = np.mean([row["program"] == w for row, w in zip(rows, want)])
        assert right >= 0.95, right
