"""The alignment model: rows placed on a path through the training recordings by their signal, so that a
recording that starts mid-job, runs at another pace or holds two jobs is still read line by line."""

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from gcode_exp.config import ConfigError
from gcode_exp.data.vocab import BOS, EOS, PAD
from gcode_exp.data.windows import Features, Split
from gcode_exp.models import Windows
from gcode_exp.models.align import KEYS, AlignModel, smoothed
from tests.conftest import ROOT

LINES, ROWS_PER_LINE, C = 12, 20, 3


def align_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf")):
        return compose("config", overrides=["model=align", "features=side_channel", *overrides]).model


def program(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A job of LINES lines, each a stretch of its own smooth signal; rows [n, C] and each row's line (0..)."""
    g = torch.Generator().manual_seed(seed)
    levels = torch.randn(LINES, C, generator=g) * 2
    t = torch.linspace(0, 1, ROWS_PER_LINE)[:, None]
    rows = torch.cat([lv + torch.sin(6 * t + k) for k, lv in enumerate(levels)])
    return rows, torch.arange(LINES).repeat_interleave(ROWS_PER_LINE)


def token(line: int) -> list[int]:
    return [BOS, 10 + line, EOS, PAD, PAD]


def split_of(recordings: list[tuple[torch.Tensor, torch.Tensor]], window: int) -> Split:
    """Recordings laid end to end as a Split: windows at stride `window`, each row labelled by its line."""
    rows, lines, starts, lo, hi, offset = [], [], [], [], [], 0
    for r, ln in recordings:
        n = len(r)
        rows.append(r)
        lines.append(ln)
        s = torch.arange(0, n - window + 1, window)
        starts.append(offset + s)
        lo.append(torch.full_like(s, offset))
        hi.append(torch.full_like(s, offset + n - window))
        offset += n
    rows_, lines_, starts_ = torch.cat(rows), torch.cat(lines), torch.cat(starts)
    row_targets = torch.tensor([token(int(i)) for i in lines_]).short()
    return Split(rows=rows_, starts=starts_, lo=torch.cat(lo), hi=torch.cat(hi),
                 targets=row_targets[starts_].long(), files=[str(i) for i in range(len(recordings))],
                 file_windows=[len(s) for s in starts], row_targets=row_targets,
                 target_lengths=torch.zeros_like(starts_), row_lines=lines_ + 1)


def fitted(*overrides: str) -> AlignModel:
    feats = Features(channels=[f"frame.A{i}" for i in range(C)], boards=[], mean=[0.0] * C, std=[1.0] * C)
    model = AlignModel(align_cfg("model.smooth=1", *overrides), max_len=5)
    model.fit(split_of([program(0), program(1)], window=10), feats, window=10)
    return model


def read_lines(model: AlignModel, rows: torch.Tensor) -> list[int]:
    """Each row's answered line number (-1: none)."""
    ids = model.align(rows)[0]
    return [int(model.lines[i][1]) - 10 if i < len(model.lines) else -1 for i in ids.tolist()]


def resampled(rows: torch.Tensor, lines: torch.Tensor, pace: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The job at `pace` times its speed: rows interpolated in time, each labelled by its nearest original row."""
    pos = np.arange(0, len(rows) - 1, pace)
    x = np.stack([np.interp(pos, np.arange(len(rows)), rows[:, c].numpy()) for c in range(C)], 1)
    return torch.tensor(x, dtype=torch.float32), lines[torch.from_numpy(np.rint(pos).astype(np.int64))]


def share_right(model, rows, lines) -> float:
    return float(np.mean(np.array(read_lines(model, rows)) == lines.numpy()))


def test_a_training_recording_is_read_back_line_by_line():
    rows, lines = program(0)
    assert share_right(fitted(), rows, lines) == 1.0


@pytest.mark.parametrize("pace", [0.6, 0.8, 1.25, 1.8])
def test_another_pace_is_followed(pace):
    rows, lines = resampled(*program(1), pace)
    assert share_right(fitted(), rows, lines) >= 0.95


def test_a_recording_that_starts_mid_job_is_placed_from_its_first_rows():
    rows, lines = program(0)
    late = rows[100:], lines[100:]
    assert share_right(fitted(), *late) >= 0.95


def test_two_jobs_back_to_back_are_split_where_the_second_begins():
    (a, la), (b, lb) = program(0), program(1)
    got = read_lines(fitted(), torch.cat([a[60:], b[:150]]))
    want = torch.cat([la[60:], lb[:150]]).tolist()
    assert np.mean(np.array(got) == np.array(want)) >= 0.95
    # the path leaves the first job within a few rows of its end
    boundary = len(a) - 60
    assert got[boundary - 5] == want[boundary - 5] and got[boundary + 5] == want[boundary + 5]


def test_the_fixed_lag_path_answers_like_the_whole_path_on_a_clear_signal():
    rows, lines = resampled(*program(0), 1.25)
    assert read_lines(fitted("model.max_cells=0", "model.lag=8"), rows) == read_lines(fitted(), rows)


def test_windows_take_the_line_of_most_rows_and_their_recording_is_read_whole():
    model = fitted()
    rows, lines = program(1)
    windows = Windows.of_rows(rows, torch.arange(0, len(rows) - 10, 10), 10)
    answer = model.predict(windows)
    want = torch.tensor([token(int(lines[s : s + 10].mode().values))[1:] for s in windows.starts.tolist()])
    assert torch.equal(answer.tokens, want)
    assert answer.rows.shape == (len(windows), 10, len(model.lines) + 1) and (answer.p <= 1).all()


def test_the_signal_key_leaves_out_the_elapsed_time_and_position_needs_position_inputs():
    feats = Features(channels=["x_motor"], boards=[], mean=[0.0], std=[1.0], elapsed=True)
    model = AlignModel(align_cfg(), max_len=5)
    one = split_of([(torch.cat([program(0)[0][:, :1], torch.arange(240.0)[:, None]], 1), program(0)[1])], 10)
    model.fit(one, feats, 10)
    assert model.columns.tolist() == [0]  # the elapsed input (last) is not compared
    with pytest.raises(ConfigError, match="model.key=position"):
        AlignModel(align_cfg("model.key=position"), max_len=5).fit(one, feats, 10)


def test_smoothing_stays_inside_the_recording():
    x = torch.tensor([[0.0], [0.0], [3.0], [0.0], [0.0]])
    assert smoothed(x, 3)[:, 0].tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    assert torch.equal(smoothed(x, 1), x)


@pytest.mark.slow
def test_run_py_fits_the_default_and_scores_it_as_recorded_and_started_mid_job(tmp_path):
    """`python run.py` fits the alignment (nothing trained); task=eval scores its checkpoint on the sample as
    recorded and with every recording started a quarter into its job, above the majority line both times."""
    import json

    from tests.conftest import run_py

    run = tmp_path / "run"
    res = run_py(f"hydra.run.dir={run}", cache=tmp_path / "c")
    assert res.returncode == 0 and "reference rows (position)" in res.stdout + res.stderr, res.stderr[-2000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs"] == 0 and "test/loss" not in metrics  # nothing trained, no loss computed
    assert metrics["test/line_exact"] > metrics["majority/line_exact"] + 0.3
    for perturb in ("none", "crop"):
        out = tmp_path / perturb
        ran = run_py("task=eval", f"ckpt_path={run / 'checkpoints' / 'best.pt'}", f"perturb={perturb}",
                     f"hydra.run.dir={out}", cache=tmp_path / "c")
        assert ran.returncode == 0, ran.stderr[-2000:]
        scored = json.loads((out / "metrics.json").read_text())
        assert scored["test/line_exact"] > scored["majority/line_exact"] + 0.3, (perturb, scored)


def test_windows_without_their_recording_are_each_aligned_alone():
    model = fitted()
    rows, lines = program(0)
    x = torch.stack([rows[30:40], rows[200:210]])  # two windows of one job, out of order
    answer = model.answer(x)
    assert answer.tokens[:, 0].tolist() == [10 + int(lines[35]), 10 + int(lines[205])]
    assert answer.rows.shape == (2, 10, len(model.lines) + 1)


def noisy_job(seed: int, n: int = 240) -> tuple[torch.Tensor, torch.Tensor]:
    """One smooth program signal under each recording's own noise, with lines of two rows: the signal places
    a row only to within several rows, as a side channel does on the real mill."""
    g = torch.Generator().manual_seed(100)
    t = torch.linspace(0, 1, n)[:, None]
    base = torch.sin((torch.rand(1, C, generator=g) * 6 + 2) * 6.28 * t + torch.rand(1, C, generator=g) * 6)
    return base + 0.6 * torch.randn(n, C, generator=torch.Generator().manual_seed(seed)), torch.arange(n) // 2


def fitted_on(recordings, channels: list[str], *overrides: str) -> AlignModel:
    feats = Features(channels=channels, boards=[], mean=[0.0] * C, std=[1.0] * C)
    model = AlignModel(align_cfg("model.smooth=1", *overrides), max_len=5)
    model.fit(split_of(recordings, window=10), feats, window=10)
    return model


@pytest.mark.parametrize("straight, at_least, below", [(True, 0.95, 1.01), (False, 0.0, 0.6)])
def test_a_signal_that_places_rows_roughly_is_read_at_one_pace(straight, at_least, below):
    """A path traced on the noisy signal wanders a few rows about the job; the line fitted to it does not."""
    channels = [f"frame.A{i}" for i in range(C)]
    model = fitted_on([noisy_job(0), noisy_job(1)], channels, f"model.straight={straight}")
    rows, lines = noisy_job(2)
    assert at_least <= share_right(model, rows, lines) < below


def test_the_work_position_is_left_as_traced_pause_and_all():
    """key=position follows a pause exactly; one pace fitted over the recording would walk through it."""
    rows, lines = program(0)
    model = fitted_on([program(0), program(1)], ["posx", "posy", "posz"])
    paused = torch.cat([rows[:100], rows[100:101].repeat(60, 1), rows[100:]]), torch.cat(
        [lines[:100], lines[100:101].repeat(60), lines[100:]])
    assert KEYS[int(model.mode)] == "position"
    assert share_right(model, *paused) >= 0.95
    assert read_lines(model, paused[0]) == read_lines(
        fitted_on([program(0), program(1)], ["posx", "posy", "posz"], "model.straight=false"), paused[0])


def job_alike_inside(seed: int, n: int = 300, edge: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """Idle, a long middle that looks alike everywhere (a repeated pass), a finishing pass of its own; lines
    of 10 rows. Only the job's ends say where a row of the middle is."""
    level = torch.zeros(n, C)
    level[edge:], level[n - edge :] = 2.0, 1.0
    return level + 0.3 * torch.randn(n, C, generator=torch.Generator().manual_seed(seed)), torch.arange(n) // 10


@pytest.mark.parametrize("pace", [0.8, 1.0, 1.25])
def test_a_whole_job_is_read_from_its_first_to_its_last_row_at_any_pace(pace):
    """The path may cross the alike middle at the training pace and catch up at the end; the job read whole
    (its first and last rows on the training run's) places every row, at the pace the recording ran."""
    model = fitted_on([job_alike_inside(0), job_alike_inside(1)], [f"frame.A{i}" for i in range(C)])
    assert share_right(model, *resampled(*job_alike_inside(2), pace)) >= 0.9


@pytest.mark.parametrize("dropped", [8, 16])
def test_a_recording_that_starts_a_few_rows_into_its_job_is_not_pulled_onto_the_jobs_first_row(dropped):
    """The path's first row lands within model.snap rows of the job's; taken as the job's own start, every row
    would be placed `dropped` rows behind the job (4-8 lines). The signal of the first rows matches the shifted start
    better, so the stretch is placed by the signal; as recorded it still starts on the job's first row."""
    channels = [f"frame.A{i}" for i in range(C)]
    rows, lines = noisy_job(2)
    checked = fitted_on([noisy_job(0), noisy_job(1)], channels)
    assert share_right(checked, rows, lines) == 1.0
    assert share_right(checked, rows[dropped:], lines[dropped:]) >= 0.6
    path_ends_alone = fitted_on([noisy_job(0), noisy_job(1)], channels, "model.snap_rows=0",
                                "model.steady_pace=false")
    assert share_right(path_ends_alone, rows[dropped:], lines[dropped:]) < 0.3


@pytest.mark.parametrize("late_boards, at_least, below", [(True, 0.95, 1.01), (False, 0.0, 0.2)])
def test_a_recording_whose_own_boards_trail_its_controller_is_read_from_its_jobs_start(late_boards, at_least, below):
    """The recording starts with its job (its controller's lines from row 0) but its boards' signal comes 24 rows
    late: its path starts on the job's first rows and its fitted line lies 24 rows behind them. A recording
    that starts late lies ahead instead, so this one is read from the job's start; placed by the signal alone
    (model.late_boards=false) every row would take the line the signal shows, 12 lines behind."""
    model = fitted_on([noisy_job(0), noisy_job(1)], [f"frame.A{i}" for i in range(C)],
                      f"model.late_boards={late_boards}")
    (rows, lines), late = noisy_job(2), 24
    assert at_least <= share_right(model, torch.cat([rows[:1].repeat(late, 1), rows[:-late]]), lines) < below


@pytest.mark.parametrize("cut", [slice(4, None), slice(16, None), slice(None, -4), slice(None, -16)])
def test_a_recording_a_few_rows_short_of_its_job_is_read_at_the_training_pace(cut):
    """A job missing a few rows at one end, read whole from its first to its last row, would run at a pace a
    few rows off the training runs' and drift by those rows (lines of 2 rows: most of them wrong); read at
    their pace from the end it keeps (model.steady_pace), every row is right."""
    rows, lines = noisy_job(2)
    for steady, at_least, below in ((True, 0.95, 1.01), (False, 0.0, 0.75)):
        model = fitted_on([noisy_job(0), noisy_job(1)], [f"frame.A{i}" for i in range(C)],
                          f"model.steady_pace={steady}")
        assert at_least <= share_right(model, rows[cut], lines[cut]) < below


def test_a_training_run_whose_boards_trail_its_controller_is_read_at_its_boards_place():
    """Three runs of one program with the same lines at the same rows; the third's signal comes 6 rows late
    (its boards' clock). A row of it placed by the signal takes the line from 6 rows before; the others keep
    theirs, and with model.max_lag=0 nothing moves."""
    (rows, lines), lag = program(0), 6
    late = torch.cat([rows[:1].repeat(lag, 1), rows[:-lag]]), lines
    channels = [f"frame.A{i}" for i in range(C)]
    model = fitted_on([(rows, lines), (rows.clone(), lines), late], channels)
    n = len(rows)
    assert torch.equal(model.lagged_ids[: 2 * n], model.line_ids[: 2 * n])
    assert torch.equal(model.lagged_ids[2 * n + lag :], model.line_ids[2 * n : 3 * n - lag])
    unmoved = fitted_on([(rows, lines), (rows.clone(), lines), late], channels, "model.max_lag=0")
    assert torch.equal(unmoved.lagged_ids, unmoved.line_ids)


def test_novelty_is_the_share_of_rows_off_every_training_path_at_any_pace():
    """key=position: a training job read again, at another pace (its rows between the training rows), lies on
    the training paths; a job never seen lies off them."""
    model = fitted_on([program(0), program(1)], ["posx", "posy", "posz"])
    rows, lines = program(0)
    seen = [Windows.of_rows(r, torch.arange(0, len(r) - 10, 10), 10) for r in (rows, resampled(rows, lines, 0.7)[0])]
    for windows in seen:
        assert float(model.predict(windows).novelty.mean()) <= 0.05
    new = program(7)[0]
    assert float(model.predict(Windows.of_rows(new, torch.arange(0, len(new) - 10, 10), 10)).novelty.mean()) >= 0.9
    assert fitted().predict(seen[0]).novelty is None  # a signal key cannot tell (docs/RESULTS.md)


def with_boards(rows: torch.Tensor, present: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
    """Rows of channels a.A0, a.A1 (board a) and b.A0 (board b) with the two presence flags the inputs carry;
    an absent board's channel reads 0 (the mean), as a recording without its columns does."""
    rows = rows.clone()
    rows[:, 2] *= present[1]
    rows[:, :2] *= present[0]
    return torch.cat([rows, torch.tensor(present).expand(len(rows), 2)], 1)


@pytest.mark.parametrize("shared, at_least, below", [(True, 0.95, 1.01), (False, 0.0, 0.6)])
def test_a_board_unplugged_in_the_scored_recording_is_no_evidence(shared, at_least, below):
    """Training runs with boards a and b; the scored run, started mid-job, lacks b. Compared on the boards
    both have (model.shared_boards=true) its rows are placed by board a; compared on every channel, b's
    zeros pull them to wherever the training signal of b is near its mean."""
    feats = Features(channels=["a.A0", "a.A1", "b.A0"], boards=["a", "b"], mean=[0.0] * C, std=[1.0] * C)
    model = AlignModel(align_cfg("model.smooth=1", f"model.shared_boards={shared}"), max_len=5)
    model.fit(split_of([(with_boards(r), ln) for r, ln in (program(0), program(1))], window=10), feats, window=10)
    rows, lines = program(0)
    rows = rows[100:] + 0.3 * torch.randn(len(rows) - 100, C, generator=torch.Generator().manual_seed(5))
    assert model.masked == shared
    assert at_least <= share_right(model, with_boards(rows, (1.0, 0.0)), lines[100:]) < below
    assert share_right(model, with_boards(rows), lines[100:]) >= 0.95  # with both boards: read as before


def test_stretches_of_one_program_split_by_a_jump_forward_are_read_as_one_and_two_jobs_are_not():
    """A path that jumped forward inside its program (a stretch alike everywhere) left two stretches, the second
    on a wrong line; the first's line carried over both matches better, so they are one. A job run twice in one
    recording is two: the first's line carried on runs off the training run."""
    model = fitted_on([noisy_job(0), noisy_job(1)], [f"frame.A{i}" for i in range(C)])
    rows, _ = noisy_job(2)
    q, qm = model.query(rows)
    jumped = [(0, 100, 0, 0.0, 1.0, True), (100, len(rows), 1, 160.0, 0.5, False)]
    (t0, t1, run, a, b, clocked), = model.merged(q, qm, jumped)
    assert (t0, t1, a, b, clocked) == (0, len(rows), 0.0, 1.0, True) and run in (0, 1)
    q2, qm2 = model.query(torch.cat([rows, rows]))
    twice = [(0, len(rows), 0, 0.0, 1.0, True), (len(rows), 2 * len(rows), 0, -float(len(rows)), 1.0, True)]
    assert model.merged(q2, qm2, twice) == twice
    assert model.merged(q, qm, jumped[:1]) == jumped[:1]
