"""Perturbations of the *scored* recordings (`perturb=...`, task=eval and task=predict): the conditions of
real shop use, applied to each recording as a whole before it is windowed. Training data never passes here.

- `concat`: recordings of different programs (`op`) joined back to back: a monitor left running over two jobs.
- `crop_start`: a share of each recording's first rows dropped: a monitor switched on mid-job.
- `shift`: a number of first rows dropped: the windows fall on another grid than in training.
- `pace`: the job runs `pace` times as fast (a feed override): the rows are resampled in time.
- `unplug`: a share of each recording's IMU boards removed, its columns gone (boards unplugged); with
  `unplug_from` > 0 they fail that share of rows into the recording instead, their cells empty from there on.

They are applied in that fixed order (ORDER), each only where its value is not neutral (NEUTRAL); a
neutral config returns the recordings as they are (the same objects). `seed` makes the random choices,
concat's pairing and unplug's boards, reproducible. Every function is pure: it returns new RecordedRuns,
never changes one.
"""

from __future__ import annotations

import logging
import re
import zlib
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from gcode_exp.data.read import CLOCK, DAY, DataError, RecordedRun, board_columns, silent_boards, time_seconds
from gcode_exp.data.vocab import parse_line

log = logging.getLogger(__name__)

ORDER = ("concat", "crop_start", "shift", "pace", "unplug")  # the order the transforms are applied in
NEUTRAL: dict[str, Any] = {"concat": False, "crop_start": 0.0, "shift": 0, "pace": 1.0, "unplug": 0.0}  # unchanged
STATE_COLUMNS = ("stat", "unit", "dist", "coor")  # controller state codes: taken from a row, never interpolated


# --- the settings ------------------------------------------------------------------------------------------
def settings(perturb_cfg: Mapping | None) -> dict[str, Any]:
    """The four transforms' values and the seed, with the neutral value where the config has none."""
    cfg = perturb_cfg or {}
    out = {key: cfg.get(key, NEUTRAL[key]) for key in ORDER}
    out["seed"] = int(cfg.get("seed", 0))
    out["unplug_from"] = float(cfg.get("unplug_from", 0.0))  # how unplug's boards go: not a transform of its own
    return out


def applied(perturb_cfg: Mapping | None) -> list[str]:
    """`perturb.<key>=<value>` of each transform that changes something, in the order they are applied."""
    s = settings(perturb_cfg)
    out = [f"perturb.{key}={str(s[key]).lower() if isinstance(s[key], bool) else s[key]}"
           for key in ORDER if s[key] != NEUTRAL[key]]
    return out + [f"perturb.unplug_from={s['unplug_from']}"] if s["unplug"] and s["unplug_from"] else out


def is_neutral(perturb_cfg: Mapping | None) -> bool:
    """True where no transform changes anything."""
    return not applied(perturb_cfg)


def describe(perturb_cfg: Mapping | None) -> str:
    """One text for metrics.json and messages: `none`, or the applied transforms (`crop_start=0.25 pace=1.25`)."""
    return " ".join(a.removeprefix("perturb.") for a in applied(perturb_cfg)) or "none"


def summary(perturb_cfg: Mapping | None) -> dict[str, Any]:
    """What data_summary.json records: the option's name, every value, and what was applied, in order."""
    cfg = perturb_cfg or {}
    return {"name": str(cfg.get("name", "none")), **settings(cfg), "order": list(ORDER),
            "applied": [a.removeprefix("perturb.") for a in applied(cfg)]}


# --- rows ----------------------------------------------------------------------------------------------------
def take_rows(run: RecordedRun, idx: np.ndarray) -> RecordedRun:
    """The run reduced (or repeated) to the rows `idx`, in that order; its counts follow its rows."""
    values = run.values[idx]
    lines = np.asarray(run.lines, dtype=object)[idx].tolist()
    times = np.asarray(run.times, dtype=object)[idx].tolist() if len(run.times) == len(run.lines) else run.times
    return recounted(replace(run, values=values, lines=lines, times=times))


def recounted(run: RecordedRun) -> RecordedRun:
    """nonfinite_cells and unparsed_chunks counted again on the run's rows as they now are."""
    dropped = {line: parse_line(line)[1] for line in set(run.lines)}
    bad = np.isnan(run.values)
    return replace(run, nonfinite_cells=int((bad & ~silent_boards(run.columns, bad)).sum()),
                   unparsed_chunks=sum(dropped[line] for line in run.lines))


def drop_start(run: RecordedRun, rows: int) -> RecordedRun:
    """The run without its first `rows` rows."""
    return take_rows(run, np.arange(min(rows, len(run.lines)), len(run.lines)))


def crop_rows(n: int, share: float) -> int:
    """How many first rows crop_start drops from n: floor(share * n) (a hair of float error forgiven)."""
    return min(n, int(np.floor(share * n + 1e-9)))


def crop_start(run: RecordedRun, share: float) -> RecordedRun:
    """Drop the first floor(share x rows) rows: a monitor switched on mid-job misses the job's start, so
    the recording no longer begins where the program does (what features.elapsed assumes)."""
    return drop_start(run, crop_rows(len(run.lines), share))


def shift_start(run: RecordedRun, rows: int) -> RecordedRun:
    """Drop the first `rows` rows: with rows < data.stride the windows fall between the training grid's."""
    return drop_start(run, rows)


# --- pace ----------------------------------------------------------------------------------------------------
def pace_positions(n: int, pace: float) -> np.ndarray:
    """Where new row k reads the recording, in original rows: k x pace, for every k with k x pace <= n - 1
    (pace 0.5: 2n - 1 rows; pace 2: ceil(n / 2))."""
    if n <= 1:
        return np.arange(n, dtype=np.float64)
    return np.arange(int(np.floor((n - 1) / pace + 1e-9)) + 1) * pace


def interpolate(values: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """values [rows, channels] read at fractional rows `pos`, linearly between the two neighbouring rows;
    where either neighbour is NaN the nearer row's value (so a NaN stays NaN, never spreads to a finite
    neighbour's share). Vectorised over rows and channels."""
    if len(pos) == 0:
        return values[:0].copy()
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, len(values) - 1)
    frac = (pos - lo)[:, None]
    a, b = values[lo].astype(np.float64), values[hi].astype(np.float64)
    with np.errstate(invalid="ignore"):
        mixed = a + frac * (b - a)
    nearest = np.where(frac <= 0.5, a, b)
    return np.where(np.isnan(a) | np.isnan(b), nearest, mixed).astype(values.dtype)


def paced_times(times: list[str], pos: np.ndarray, pace: float) -> list[str]:
    """The new rows' times. Numbers (the row number where the file has no t_console, or seconds) and clock
    times: the time at `pos` (interpolated), its distance from the first row's time divided by pace, so
    rows keep the recording's spacing (~4 Hz) and the job takes 1/pace as long; written as the originals
    are (whole numbers, or the clock with as many decimals). Times that are neither: the executing row's."""
    t = time_seconds(times)
    if not times or t is None:
        return [times[i] for i in executing(pos)]
    clock = all(CLOCK.match(x.strip()) for x in times)
    new = t[0] + (np.interp(pos, np.arange(len(t)), t) - t[0]) / pace
    if clock:
        digits = max((len(m[4] or "") for m in map(CLOCK.match, (x.strip() for x in times))), default=0)
        return [_clock(s, digits) for s in new]
    if all(re.fullmatch(r"-?\d+", x.strip()) for x in times):
        return [str(int(round(s))) for s in new]
    return [f"{s:.6g}" for s in new]


def _clock(seconds: float, digits: int) -> str:
    seconds = round(seconds % DAY, digits)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    width = 3 + digits if digits else 2
    return f"{int(h):02d}:{int(m):02d}:{s:0{width}.{digits}f}"


def change_pace(run: RecordedRun, pace: float) -> RecordedRun:
    """The job run `pace` times as fast (a feed override), sampled at the recording's own row rate: new row
    k reads the recording at row k x pace. Sensor and position channels are interpolated linearly (NaN-safe),
    controller state codes (STATE_COLUMNS) and the G-code line are those of the nearest row (`executing`);
    `times` are re-spaced (paced_times). Values are not scaled: only time changes."""
    return _paced(run, pace_positions(len(run.lines), pace), pace)


def executing(pos: np.ndarray) -> np.ndarray:
    """The row whose line a time between two rows takes: the nearer one (a tie: the earlier). Where a line
    ends between two rows is unknown; taken as anywhere between them alike, the line at a time is more
    likely the nearer row's (the earlier row's line, floor, would be wrong for most of the later half)."""
    return np.ceil(pos - 0.5).clip(min=0).astype(np.int64)


def _paced(run: RecordedRun, pos: np.ndarray, pace: float) -> RecordedRun:
    lo = executing(pos)
    values = interpolate(run.values, pos)
    state = [j for j, c in enumerate(run.columns) if c in STATE_COLUMNS]
    if state:
        values[:, state] = run.values[lo][:, state]
    lines = np.asarray(run.lines, dtype=object)[lo].tolist()
    times = paced_times(run.times, pos, pace) if len(run.times) == len(run.lines) else run.times
    return recounted(replace(run, values=values, lines=lines, times=times))


# --- concat --------------------------------------------------------------------------------------------------
def concat_partners(runs: list[RecordedRun], seed: int) -> list[int]:
    """For each run, the index of the run appended to it: one of another operation, drawn by `seed`.
    Refused (one line) where all runs are of one operation: there is nothing of another program to join."""
    ops = [r.op for r in runs]
    if len(set(ops)) < 2:
        what = f"every recording is of operation {ops[0]}" if ops else "no recordings"
        raise DataError(f"perturb.concat=true: {what}; concat joins recordings of different operations "
                        "(data.dir needs two)")
    rng = np.random.default_rng(seed)
    partners = []
    for op in ops:
        others = [j for j, o in enumerate(ops) if o != op]
        partners.append(others[int(rng.integers(len(others)))])
    return partners


def join(a: RecordedRun, b: RecordedRun) -> RecordedRun:
    """b's rows after a's, named `a+b`: columns are the union (a's first), NaN where a part lacks one;
    each part keeps its lines (labels) and times."""
    columns = [*a.columns, *(c for c in b.columns if c not in a.columns)]
    values = np.full((len(a.lines) + len(b.lines), len(columns)), np.nan, dtype=np.float32)
    col = {c: i for i, c in enumerate(columns)}
    values[: len(a.lines), [col[c] for c in a.columns]] = a.values
    values[len(a.lines) :, [col[c] for c in b.columns]] = b.values
    return recounted(RecordedRun(
        name=f"{a.name}+{b.name}", op=f"{a.op}+{b.op}", columns=columns, values=values, lines=[*a.lines, *b.lines],
        nonfinite_cells=0, silent_rows=a.silent_rows + b.silent_rows, unparsed_chunks=0,
        path=f"{a.path}+{Path(b.path).name}", warnings=[*a.warnings, *b.warnings], times=[*a.times, *b.times]))


def concat_pairs(runs: list[RecordedRun], seed: int) -> list[RecordedRun]:
    """Each run with one of another operation appended (concat_partners): a recording that holds two jobs,
    so the model must find where one program ends and the next begins."""
    return [join(r, runs[j]) for r, j in zip(runs, concat_partners(runs, seed))]


# --- boards ------------------------------------------------------------------------------------------------
def unplug(run: RecordedRun, share: float, seed: int, from_share: float = 0.0) -> RecordedRun:
    """The run without ceil(share x its boards) of its IMU boards, chosen at random per recording from `seed`
    and its name: boards come loose or fail, and a shop may fit fewer of them. `from_share` 0: their columns
    removed; else their cells empty from that share of the rows on (a board failing mid-job, as a logger
    writes it: the columns stay, the cells go blank)."""
    columns = board_columns(run.columns)
    boards = list(columns)
    n = min(len(boards), int(np.ceil(share * len(boards) - 1e-9)))
    rng = np.random.default_rng([seed, zlib.crc32(run.name.encode())])
    gone = [boards[i] for i in rng.choice(len(boards), size=n, replace=False)] if n else []
    failed = sorted(j for board in gone for j in columns[board])
    if from_share:
        values = run.values.copy()
        values[crop_rows(len(run.lines), from_share):, failed] = np.nan
        return recounted(replace(run, values=values))
    keep = sorted(set(range(len(run.columns))) - set(failed))
    return recounted(replace(run, columns=[run.columns[i] for i in keep], values=run.values[:, keep]))


# --- all of them ---------------------------------------------------------------------------------------------
def perturb_with_rows(runs: list[RecordedRun], perturb_cfg: Mapping | None, *, window: int | None = None,
                      stride: int | None = None, on_error: str = "raise", skipped: list[dict] | None = None
                      ) -> list[tuple[RecordedRun, np.ndarray]]:
    """perturb_recordings, with each new row's row number in the recording it was read from (after concat:
    in its part), for task=predict's per-row files."""
    s = settings(perturb_cfg)
    items = [(r, np.arange(len(r.lines))) for r in runs]
    if is_neutral(s) or not runs:
        return items
    if s["concat"]:
        partners = concat_partners(runs, s["seed"])
        items = [(join(r, runs[j]), np.concatenate([rows, items[j][1]])) for (r, rows), j in zip(items, partners)]
    if s["crop_start"]:
        items = [(drop_start(r, k), rows[k:]) for r, rows in items for k in [crop_rows(len(r.lines), s["crop_start"])]]
    if s["shift"]:
        items = [(drop_start(r, s["shift"]), rows[s["shift"] :]) for r, rows in items]
    if s["pace"] != NEUTRAL["pace"]:
        items = [(_paced(r, pos, s["pace"]), rows[executing(pos)])
                 for r, rows in items for pos in [pace_positions(len(r.lines), s["pace"])]]
    if s["unplug"]:
        items = [(unplug(r, s["unplug"], s["seed"], s["unplug_from"]), rows) for r, rows in items]
    return [item for item in items if usable(item[0], s, window, stride, on_error, skipped)]


def perturb_recordings(runs: list[RecordedRun], perturb_cfg: Mapping | None, *, window: int | None = None,
                       stride: int | None = None, on_error: str = "raise", skipped: list[dict] | None = None
                       ) -> list[RecordedRun]:
    """The recordings as perturb_cfg changes them (concat, crop_start, shift, pace, unplug, in that order); a neutral
    config returns them as they are. With `window`, a recording left with fewer rows than one window (with
    `stride` too: no window of that grid holding a labelled row, what task=eval scores) is handled like a
    short file (data.on_error): a one-line DataError naming it and the keys, or with on_error=skip a
    warning and a record in `skipped`."""
    kwargs = {"window": window, "stride": stride, "on_error": on_error, "skipped": skipped}
    return [r for r, _ in perturb_with_rows(runs, perturb_cfg, **kwargs)]


def usable(run: RecordedRun, perturb_cfg: Mapping, window: int | None, stride: int | None, on_error: str,
           skipped: list[dict] | None) -> bool:
    """True where the perturbed run still gives a window to score; else raise, or warn and record it."""
    if window is None:
        return True
    n, keys = len(run.lines), ", ".join(applied(perturb_cfg))
    why = None
    if n < window:
        why = f"{run.path}: {n} rows after {keys}, fewer than one window (data.window={window})"
    elif stride is not None:
        labelled = np.concatenate([[0], np.cumsum([bool(t) for t in run.lines])])
        starts = np.arange(0, n - window + 1, stride)
        if not (labelled[starts + window] > labelled[starts]).any():
            why = (f"{run.path}: no window holds a labelled row after {keys} "
                   f"(data.window={window}, data.stride={stride})")
    if why is None:
        return True
    if on_error != "skip":
        raise DataError(why)
    log.warning("skipping %s", why)
    if skipped is not None:
        skipped.append({"file": Path(run.path).name, "error": why})
    return False
