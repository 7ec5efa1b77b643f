"""perturb=... (gcode_exp/data/perturb.py): each transform on hand-made recordings, their order, the config's
refusals, and task=eval / task=predict run on perturbed recordings the way a user types them."""

from __future__ import annotations

import csv
import json
import logging
import math
import sys

import numpy as np
import pytest

from gcode_exp.config import ConfigError
from gcode_exp.config_checks import validate
from gcode_exp.data.perturb import (
    ORDER,
    change_pace,
    concat_pairs,
    crop_start,
    describe,
    interpolate,
    is_neutral,
    pace_positions,
    perturb_recordings,
    perturb_with_rows,
    shift_start,
    unplug,
)
from gcode_exp.data.read import DataError, RecordedRun
from gcode_exp.data.windows import fit_features, run_inputs
from gcode_exp.run_folder import RUN_FILES
from tests import forked_python
from tests.conftest import ROOT, default_run_and_two_programs, make_cfg, run_py

OPTIONS = sorted(p.stem for p in (ROOT / "conf" / "perturb").glob("*.yaml"))


def recording(name: str, n: int = 20, columns: tuple[str, ...] = ("spindle", "x_motor"), clock: bool = False
              ) -> RecordedRun:
    """n rows: column j holds 100 j + the row number (a ramp), line k runs on rows 2k and 2k + 1."""
    values = (np.arange(n)[:, None] + 100.0 * np.arange(len(columns))[None, :]).astype(np.float32)
    times = [f"10:00:{i * 0.25:06.3f}" for i in range(n)] if clock else [str(i) for i in range(n)]
    return RecordedRun(name=name, op=name.split("_")[0], columns=list(columns), values=values,
                       lines=[f"G1 X{i // 2}" for i in range(n)], nonfinite_cells=0, silent_rows=0, unparsed_chunks=0,
                       path=f"/data/{name}_aligned.csv", times=times)


def same(a: RecordedRun, b: RecordedRun) -> bool:
    return (a.name == b.name and a.columns == b.columns and a.lines == b.lines and a.times == b.times
            and np.array_equal(a.values, b.values, equal_nan=True))


# --- each transform -----------------------------------------------------------------------------------
def test_neutral_config_returns_the_recordings_unchanged():
    runs = [recording("face_001"), recording("pocket_002")]
    for cfg in (None, {}, make_cfg("task=eval", "ckpt_path=x.pt").perturb, {"pace": 1, "crop_start": 0, "shift": 0}):
        assert is_neutral(cfg) and describe(cfg) == "none"
        out = perturb_recordings(runs, cfg, window=4)
        assert len(out) == 2 and all(o is r for o, r in zip(out, runs))


def test_crop_drops_exactly_the_first_share_of_rows():
    run = recording("face_001", n=10)
    out = crop_start(run, 0.25)  # floor(2.5) = 2 rows
    assert out.lines == run.lines[2:] and out.times == run.times[2:]
    assert np.array_equal(out.values, run.values[2:])
    assert len(crop_start(recording("face_001", n=100), 0.29).lines) == 71  # 0.29 x 100 is 28.999... in floats
    assert len(run.lines) == 10, "the input is never changed"


def test_shift_drops_that_many_rows():
    run = recording("face_001", n=10)
    out = shift_start(run, 3)
    assert out.lines == run.lines[3:] and np.array_equal(out.values, run.values[3:]) and out.times[0] == "3"


def test_unplug_removes_a_share_of_each_recordings_boards_by_seed():
    """ceil(share x boards) whole boards gone (every column of each), motor currents and rows kept; the
    boards drawn per recording from the seed and its name."""
    columns = ("spindle", "a.Ax", "a.Ay", "b.Ax", "c.Ax", "d.Ax", "d.Ay")
    run = recording("face_001", columns=columns)
    out = unplug(run, 0.25, seed=0)  # ceil(4 x 0.25) = 1 board
    gone = {c.split(".")[0] for c in columns if "." in c} - {c.split(".")[0] for c in out.columns if "." in c}
    assert len(gone) == 1 and "spindle" in out.columns and out.lines == run.lines
    assert out.columns == [c for c in columns if c.split(".")[0] not in gone]
    assert np.array_equal(out.values, run.values[:, [columns.index(c) for c in out.columns]])
    assert len({c.split(".")[0] for c in unplug(run, 0.3, seed=0).columns if "." in c}) == 2  # ceil(1.2)
    assert unplug(run, 0.25, seed=0).columns == out.columns, "deterministic"
    assert len({tuple(unplug(run, 0.25, seed=s).columns) for s in range(20)}) > 1, "another seed, other boards"
    assert unplug(recording("face_002"), 0.5, seed=0).columns == ["spindle", "x_motor"]  # no boards: unchanged
    assert run.columns == list(columns), "the input is never changed"


def test_unplug_from_a_share_of_rows_blanks_the_same_boards_from_there():
    """unplug_from > 0: the boards unplug would remove keep their columns, their cells empty from that share
    of the rows on (a board failing mid-job, as a logger writes it); they count as a failed board, not as
    empty cells, and the run's inputs say each is absent from that row on."""
    columns = ("spindle", "a.Ax", "a.Ay", "b.Ax", "c.Ax", "d.Ax", "d.Ay")
    run = recording("face_001", columns=columns)
    removed = unplug(run, 0.5, seed=0)
    failed = unplug(run, 0.5, seed=0, from_share=0.25)  # from row floor(0.25 x 20) = 5
    gone = [j for j, c in enumerate(columns) if c not in removed.columns]
    assert failed.columns == list(columns) and failed.lines == run.lines and failed.nonfinite_cells == 0
    assert np.isnan(failed.values[5:, gone]).all() and not np.isnan(failed.values[:5]).any()
    kept = [j for j in range(len(columns)) if j not in gone]
    assert np.array_equal(failed.values[:, kept], run.values[:, kept])
    feats = fit_features([run], ["motors", "boards"], board_flags=True)
    flags = run_inputs(failed, feats)[:, len(feats.channels):]
    for k, board in enumerate(feats.boards):
        assert flags[:5, k].min() == 1 and flags[5:, k].max() == float(board not in {columns[j][0] for j in gone})
    assert describe({"unplug": 0.5, "unplug_from": 0.25}) == "unplug=0.5 unplug_from=0.25"


def test_pace_half_doubles_the_rows_and_labels_follow_the_executing_row():
    run = recording("face_001", n=10)
    out = change_pace(run, 0.5)
    assert len(out.lines) == 19  # rows 0, 0.5, ..., 9: twice the rows, up to the last one
    assert out.lines == [run.lines[k // 2] for k in range(19)]
    assert np.allclose(out.values[:, 0], np.arange(19) * 0.5)  # the ramp, between the rows too
    assert out.times == [str(k) for k in range(19)]  # row numbers: the new row's


def test_pace_two_halves_the_rows():
    run = recording("face_001", n=10)
    out = change_pace(run, 2.0)
    assert len(out.lines) == 5 and out.lines == run.lines[::2]
    assert np.array_equal(out.values, run.values[::2])
    assert out.times == ["0", "1", "2", "3", "4"]


def test_interpolation_is_exact_on_a_linear_ramp():
    run = recording("face_001", n=50, columns=("spindle", "x_motor", "y_bed.Ax"))
    out = change_pace(run, 0.8)
    pos = pace_positions(50, 0.8)
    assert len(out.lines) == len(pos) == math.floor(49 / 0.8) + 1
    want = pos[:, None] + 100.0 * np.arange(3)[None, :]
    assert np.allclose(out.values, want, atol=1e-4, rtol=0)
    # labels: the nearer row's (a tie: the earlier one), e.g. 0.8 -> row 1, 1.6 -> row 2, 2.4 -> row 2
    assert out.lines[:4] == [run.lines[i] for i in (0, 1, 2, 2)]
    assert out.lines == [run.lines[int(p)] for p in np.ceil(pos - 0.5)]


def test_interpolation_keeps_nan_where_the_nearest_row_is_nan():
    values = np.array([[0.0], [1.0], [np.nan], [3.0]], dtype=np.float32)
    got = interpolate(values, np.array([0.5, 1.25, 1.75, 2.0, 2.5, 2.75]))
    # 0.5: between two numbers; 1.25 nearer row 1; 1.75 and 2.0 nearest row 2 (NaN); 2.5 tie: the earlier (NaN)
    assert got[:, 0].tolist()[:2] == [0.5, 1.0]
    assert np.isnan(got[2:5, 0]).all() and got[5, 0] == 3.0


def test_pace_takes_controller_state_from_the_executing_row_and_respaces_clock_times():
    run = recording("face_001", n=8, columns=("stat", "spindle"), clock=True)
    run.values[:, 0] = [3, 3, 5, 5, 3, 3, 5, 5]
    out = change_pace(run, 0.5)
    assert out.values[:, 0].tolist() == [run.values[k // 2, 0] for k in range(15)]  # a state code, never 4
    assert out.times[:3] == ["10:00:00.000", "10:00:00.250", "10:00:00.500"]  # the recording's own row spacing
    assert out.times[-1] == "10:00:03.500"  # 1.75 s recorded at pace 0.5: the job takes twice as long
    fast = change_pace(run, 2.0)
    assert fast.times == ["10:00:00.000", "10:00:00.250", "10:00:00.500", "10:00:00.750"]


def test_concat_joins_different_operations_only_deterministic_by_seed():
    runs = [recording(n) for n in ("face_001", "face_002", "pocket_001", "pocket_002", "adaptive_001", "adaptive_002")]
    runs[2] = recording("pocket_001", columns=("spindle", "z_motor"))
    out = concat_pairs(runs, seed=0)
    assert [o.name.split("+")[0] for o in out] == [r.name for r in runs]  # each recording once, first
    by_name = {r.name: r for r in runs}
    for o, r in zip(out, runs):
        partner = by_name[o.name.split("+")[1]]
        assert partner.op != r.op and o.op == f"{r.op}+{partner.op}"
        assert o.lines == r.lines + partner.lines and o.times == r.times + partner.times  # both parts' labels
        assert len(o.values) == len(r.lines) + len(partner.lines)
    assert [o.name for o in concat_pairs(runs, seed=0)] == [o.name for o in out]
    assert [o.name for o in concat_pairs(runs, seed=1)] != [o.name for o in out]
    (joined, _) = concat_pairs([runs[0], runs[2]], seed=0)  # each one's only partner: the other
    assert joined.name == "face_001+pocket_001"
    assert joined.columns == ["spindle", "x_motor", "z_motor"]  # the union, the first part's first
    first = len(runs[0].lines)
    assert np.isnan(joined.values[:first, 2]).all() and np.isnan(joined.values[first:, 1]).all()
    assert joined.nonfinite_cells == 2 * first


def test_concat_refuses_a_single_operation():
    with pytest.raises(DataError, match=r"^perturb.concat=true: every recording is of operation face"):
        perturb_recordings([recording("face_001"), recording("face_002")], {"concat": True})


def test_combinations_apply_in_the_documented_order():
    assert ORDER == ("concat", "crop_start", "shift", "pace", "unplug")
    runs = [recording("face_001", n=40), recording("pocket_001", n=30)]
    cfg = {"pace": 1.25, "shift": 3, "crop_start": 0.1, "concat": True, "seed": 4}
    by_hand = [change_pace(shift_start(crop_start(r, 0.1), 3), 1.25) for r in concat_pairs(runs, 4)]
    out = perturb_recordings(runs, cfg)
    assert len(out) == 2 and all(same(a, b) for a, b in zip(out, by_hand))
    assert describe(cfg) == "concat=true crop_start=0.1 shift=3 pace=1.25"
    # crop before shift: 70 joined rows - floor(7) - 3 = 60, then paced 1.25: floor(59 / 1.25) + 1 = 48
    assert len(out[0].lines) == 48


def test_rows_keep_their_source_row_numbers():
    run = recording("face_001", n=20)
    ((out, rows),) = perturb_with_rows([run], {"crop_start": 0.25, "pace": 2.0})
    assert rows.tolist() == [5, 7, 9, 11, 13, 15, 17, 19] and len(rows) == len(out.lines)
    assert out.lines == [run.lines[i] for i in rows]


def test_too_short_after_perturbing_is_a_one_line_error_or_skipped():
    runs = [recording("face_001", n=40), recording("pocket_001", n=10)]
    with pytest.raises(DataError, match=r"^/data/pocket_001_aligned.csv: 5 rows after perturb.crop_start=0.5, "
                                        r"fewer than one window \(data.window=8\)$"):
        perturb_recordings(runs, {"crop_start": 0.5}, window=8)
    skipped: list[dict] = []
    out = perturb_recordings(runs, {"crop_start": 0.5}, window=8, on_error="skip", skipped=skipped)
    assert [r.name for r in out] == ["face_001"] and skipped[0]["file"] == "pocket_001_aligned.csv"


# --- the config --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("option", OPTIONS)
def test_every_option_validates_in_silence_for_eval(option, caplog):
    with caplog.at_level(logging.WARNING):
        cfg = make_cfg("task=eval", "ckpt_path=x.pt", f"perturb={option}")
        validate(cfg)
    assert cfg.perturb.name == option and not [r for r in caplog.records if r.name == "gcode_exp.config"]
    assert is_neutral(cfg.perturb) == (option == "none")


@pytest.mark.parametrize("override, message", [
    ("perturb.pace=7", "perturb.pace=7: must be between 0.5 and 2.0"),
    ("perturb.pace=fast", "perturb.pace=fast: must be between 0.5 and 2.0"),
    ("perturb.crop_start=0.95", "perturb.crop_start=0.95: must be between 0 and 0.9"),
    ("perturb.shift=-1", "perturb.shift=-1: must be a whole number >= 0"),
    ("perturb.shift=1.5", "perturb.shift=1.5: must be a whole number >= 0"),
    ("perturb.concat=2", "perturb.concat=2: must be true or false"),
    ("perturb.seed=-3", "perturb.seed=-3: must be a whole number >= 0"),
    ("perturb.unplug=1", "perturb.unplug=1: must be between 0 and 0.9"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=f"^{message.replace('(', '[(]')}"):
        validate(make_cfg("task=eval", "ckpt_path=x.pt", override))


def test_live_mode_refuses_and_training_ignores_a_perturbation(caplog):
    with pytest.raises(ConfigError, match=r"^perturb.pace=1.25: not with predict.follow=true"):
        validate(make_cfg("task=predict", "ckpt_path=x.pt", "predict.follow=true", "data.path=x.csv",
                          "perturb=pace_fast"))
    with caplog.at_level(logging.WARNING):
        validate(make_cfg("perturb=crop"))
    assert any("perturb.crop_start=0.25: ignored with task=train" in r.getMessage() for r in caplog.records)


# --- what users type -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> dict:
    return default_run_and_two_programs(tmp_path_factory.mktemp("perturb"))


def test_eval_sweep_over_perturbations_and_its_summary(checkpoint):
    """`-m task=eval ... perturb=none,crop,pace_slow`, then summarize: one row per perturbation, told apart."""
    sweep = checkpoint["ws"] / "sweep"
    r = run_py("-m", "task=eval", f"ckpt_path={checkpoint['ckpt']}", f"data.dir={checkpoint['two']}",
               "perturb=none,crop,pace_slow", f"hydra.sweep.dir={sweep}", cache=checkpoint["cache"])
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    jobs = sorted(sweep.glob("[0-9]_*"))
    assert [j.name for j in jobs] == ["0_eval-none", "1_eval-crop", "2_eval-pace_slow"]  # not the command's model
    assert [json.loads((j / "metrics.json").read_text())["perturb"] for j in jobs] == ["none", "crop_start=0.25",
                                                                                      "pace=0.8"]
    summary = json.loads((jobs[1] / "data_summary.json").read_text())
    assert summary["perturb"]["name"] == "crop" and summary["perturb"]["applied"] == ["crop_start=0.25"]
    assert summary["test"]["files"] == ["face_003", "pocket_016"]
    assert {p.name for p in jobs[1].iterdir()} <= set(RUN_FILES)  # what overwrite=true sets aside and restores
    with open(jobs[1] / "per_recording.csv", newline="") as f:  # which recordings the figure comes from
        per = list(csv.DictReader(f))
    assert [r["recording"] for r in per] == ["face_003", "pocket_016"]
    mean = sum(int(r["windows"]) * float(r["line_exact"]) for r in per) / sum(int(r["windows"]) for r in per)
    assert mean == pytest.approx(json.loads((jobs[1] / "metrics.json").read_text())["test/line_exact"], abs=1e-3)
    res = forked_python.run([sys.executable, "-m", "gcode_exp.summarize", str(sweep)], cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    with open(sweep / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["perturb.name"] for row in rows] == ["none", "crop", "pace_slow", "-"]  # then the majority row


def test_predict_on_faster_recordings_keeps_source_rows(checkpoint):
    out = checkpoint["ws"] / "pred_fast"
    r = run_py("task=predict", f"ckpt_path={checkpoint['ckpt']}", f"data.dir={checkpoint['two']}",
               "perturb=pace_fast", f"hydra.run.dir={out}", cache=checkpoint["cache"])
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert json.loads((out / "metrics.json").read_text())["perturb"] == "pace=1.25"
    with open(out / "predictions" / "face_003.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(row["row"]) for row in rows[:5]] == [0, 1, 2, 4, 5]  # the nearer row to k x 1.25 (3.75: 4)
    assert 600 < len(rows) < 630  # 775 rows / 1.25
    assert (out / "predictions" / "face_003.gcode").is_file() and (out / "program.csv").is_file()


def test_out_of_range_pace_is_one_line_and_exit_2(tmp_path):
    r = run_py("task=eval", f"ckpt_path={tmp_path / 'none.pt'}", "perturb.pace=7", f"hydra.run.dir={tmp_path / 'run'}",
               cache=tmp_path / "cache")
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: perturb.pace=7:") and "Traceback" not in r.stderr, r.stderr
