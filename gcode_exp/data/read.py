"""Read one recorded run (an "aligned" CSV, optionally gzip-compressed) into arrays.

Only sensor and controller channels ever become inputs. The target (`gcode_string`) and its
proxies never do: `gcode_line`, `line` (the controller's line number), `raw_json` (repeats the
report), `t_console` (wall clock) and `momo` (the controller's motion mode, i.e. G0/G1/G2/G3).
"""

from __future__ import annotations

import errno
import fnmatch
import gzip
import logging
import os
import re
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from gcode_exp import GcodeExpError
from gcode_exp.data.vocab import parse_line

TARGET_AND_PROXIES = ("gcode_line", "gcode_string", "line", "raw_json", "t_console", "momo")
ALWAYS_EMPTY = ("vel", "plane")
CONTROLLER = ("posx", "posy", "posz", "mpox", "mpoy", "mpoz", "feed", "stat", "unit", "dist", "coor")
MOTORS = ("spindle", "x_motor", "y_motor", "z_motor")
RUN_NAME = re.compile(r"^(?P<op>[a-z]+\d*)_(?P<idx>\d+)", re.IGNORECASE)  # FACE_003 is face_003
CLOCK = re.compile(r"^(\d{1,2}):(\d{2}):(\d{2}(?:\.(\d+))?)$")  # t_console: 14:34:23.365
DAY = 86400.0
RECORDING_SUFFIXES = (".csv", ".csv.gz")  # any case; everything else the pattern matches is not read
SEPARATORS = {";": "';'", "\t": "tabs", "|": "'|'"}  # what a one-column header holding them was saved with
FIELDS = re.compile(r"Expected (?P<want>\d+) fields in line (?P<row>\d+), saw (?P<saw>\d+)")  # pandas' words
FROZEN_ROWS = 40  # the work position unchanged this long while running: a frozen channel (shared recordings: at most 6)
RUNNING = 5  # the controller's `stat` while it executes a program
GZIP = b"\x1f\x8b"
MAGIC = {GZIP: ("gzip-compressed data", "rename it to .csv.gz"),  # first bytes that are not CSV text
         b"PK\x03\x04": ("a ZIP archive (an Excel .xlsx?)", "export it as CSV")}

log = logging.getLogger(__name__)


class DataError(GcodeExpError):
    """A recording that cannot be used; the message names the file (and row where known)."""


@dataclass
class RecordedRun:
    """One recording: sensor values (NaN where a cell was missing) and the executing G-code line."""

    name: str
    op: str  # operation type: the file-name prefix, e.g. "face150025"
    columns: list[str]
    values: np.ndarray  # float32 [rows, len(columns)]
    lines: list[str]  # G-code text per row; "" where the controller reported none
    nonfinite_cells: int  # cells that were empty, NaN or inf and read as the channel mean (a silent board: absent)
    silent_rows: int  # rows dropped because no sensor column held a finite value
    unparsed_chunks: int  # G-code text the tokenizer could not read (e.g. `#5`), dropped from targets
    path: str = ""  # the file it was read from, for messages
    warnings: list[str] = field(default_factory=list)  # what was read by a rule, one line each, naming the file
    times: list[str] = field(default_factory=list)  # t_console per row (never an input), or the row number


def channel_group(column: str) -> str | None:
    """Which feature group a column belongs to: controller, motors, boards, or None (never an input)."""
    if "." in column:
        return "boards"
    if column in MOTORS:
        return "motors"
    if column in CONTROLLER:
        return "controller"
    return None  # target, proxies, always-empty columns and the `*_A` copies of the motor currents


def run_name(path: Path) -> tuple[str, str]:
    """(name, operation) from a file name such as `face150025_003_aligned.csv.gz`."""
    name = path.name
    for suffix in (".gz", ".csv", "_aligned"):  # in any case: FACE_003_ALIGNED.CSV.GZ is face_003's kind
        name = name[: -len(suffix)] if name.lower().endswith(suffix) else name
    name = name or path.name  # `_aligned.csv`: nothing left but the suffix, so the file keeps its name
    m = RUN_NAME.match(name)
    return name, (m.group("op") if m else name.split("_")[0]).lower()


def recording_key(name: str) -> str:
    """A recording's name as names are compared: FACE_003 and face_003 are one recording."""
    return name.lower()


def read_run(path: str | Path, max_nonfinite: float = 0.05, labelled: bool = True) -> RecordedRun:
    """Parse one run; raise DataError with a one-line reason for anything unusable. `labelled=False`
    (task=predict) accepts a recording without any gcode_string: what prediction is for."""
    path = Path(path)
    frame, notes = read_table(path)
    if labelled and "gcode_string" not in frame.columns:
        raise DataError(f"{path}: missing column 'gcode_string' (the target)")
    if len(frame) == 0:
        raise DataError(f"{path}: header only, no rows")
    columns = [c for c in frame.columns if channel_group(c) is not None]
    if not columns:
        raise DataError(f"{path}: no sensor columns (expected motor currents or '<board>.<axis>' columns)")
    values = np.empty((len(frame), len(columns)), dtype=np.float32)
    for j, col in enumerate(columns):
        raw = frame[col]
        if pd.api.types.is_numeric_dtype(raw.dtype) and not pd.api.types.is_bool_dtype(raw.dtype):
            with np.errstate(over="ignore"):  # parsed as numbers already: no text cell to report
                values[:, j] = raw.to_numpy(dtype=np.float64, na_value=np.nan)
            continue
        numeric = pd.to_numeric(raw, errors="coerce")
        text = raw.notna() & numeric.isna()
        if text.any():
            row = int(np.flatnonzero(text.to_numpy())[0])
            raise DataError(f"{path}: row {row + 2}: column '{col}' holds non-numeric value {raw.iloc[row]!r}")
        with np.errstate(over="ignore"):  # beyond float32 (|x| > 3.4e38) becomes inf: counted as non-finite
            values[:, j] = numeric.to_numpy(dtype=np.float64)
    sensors = [j for j, c in enumerate(columns) if channel_group(c) != "controller"]
    alive = np.isfinite(values[:, sensors]).any(axis=1) if sensors else np.ones(len(values), dtype=bool)
    if not alive.any():
        raise DataError(f"{path}: no row has any sensor value (motor currents or IMU boards)")
    values = values[alive]  # rows where every sensor is silent carry nothing to learn from
    bad = ~np.isfinite(values)
    silent = silent_boards(columns, bad)
    if silent.any():  # a board that fails mid-job: absent on those rows (its flag), not damage to the file
        boards = [b for b, mine in board_columns(columns).items() if silent[:, mine].any()]
        rows = np.flatnonzero(silent.any(1))
        notes.append(f"{path}: IMU board {', '.join(boards)} silent (every cell empty) on {len(rows)} rows, first "
                     f"at row {int(np.flatnonzero(alive)[rows[0]]) + 2}: read as absent there")
    nonfinite = int((bad & ~silent).sum())
    if nonfinite > max_nonfinite * values.size:
        row, j = np.argwhere(bad & ~silent)[0]
        raise DataError(
            f"{path}: {nonfinite / values.size:.0%} of sensor cells are empty/NaN/inf "
            f"(limit data.max_nonfinite={max_nonfinite}; first at row {row + 2}, column '{columns[j]}')"
        )
    values[bad] = np.nan
    lines = (frame["gcode_string"].fillna("").astype(str).str.strip()[alive].tolist()
             if "gcode_string" in frame.columns else [""] * len(values))
    times = (frame["t_console"].fillna("").astype(str)[alive].tolist() if "t_console" in frame.columns
             else [str(i) for i in np.flatnonzero(alive)])
    if "t_console" in frame.columns:
        notes += time_notes(path, times, values, np.flatnonzero(alive))
    notes += frozen_notes(path, columns, values, np.flatnonzero(alive))
    if labelled and not any(lines):
        raise DataError(f"{path}: gcode_string is empty on every row: no labelled row to learn from or score")
    dropped = {line: parse_line(line)[1] for line in set(lines)}
    unparsed = sum(dropped[line] for line in lines)
    if unparsed:
        first = next(i for i, line in enumerate(lines) if dropped[line])
        row = int(np.flatnonzero(alive)[first]) + 2
        notes.append(f"{path}: {unparsed} chunks of G-code text that are not words (a letter and a number) were "
                     f"dropped from the targets (first at row {row}: {lines[first][:60]!r})")
    name, op = run_name(path)
    return RecordedRun(name=name, op=op, columns=columns, values=values, lines=lines, nonfinite_cells=nonfinite,
               silent_rows=int((~alive).sum()), unparsed_chunks=unparsed, path=str(path), warnings=notes, times=times)


def seconds(text: str) -> float | None:
    """A time as seconds: a number, or a clock time HH:MM:SS(.fff); None for anything else."""
    m = CLOCK.match(text.strip())
    if m:
        return int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3])
    try:
        x = float(text)
    except ValueError:
        return None
    return x if np.isfinite(x) else None


def time_seconds(times: list[str]) -> np.ndarray | None:
    """[rows] each row's time in seconds (a clock past midnight counting on into the next day); None where
    a time is neither a number nor a clock time."""
    secs = [seconds(t) for t in times]
    if any(s is None for s in secs):
        return None
    t = np.asarray(secs, dtype=np.float64)
    if len(t) and all(CLOCK.match(x.strip()) for x in times):
        t = t + DAY * np.concatenate([[0], np.cumsum(np.diff(t) < -DAY / 2)])
    return t


def time_notes(path: Path, times: list[str], values: np.ndarray, file_rows: np.ndarray) -> list[str]:
    """Warnings for a logger's clock and rows that cannot be what happened: time going backwards, a row
    written twice (its time and every value the row before's). The rows are kept, in file order."""
    t, notes = time_seconds(times), []
    if t is not None and len(t) > 1 and (back := np.flatnonzero(np.diff(t) < 0)).size:
        k = back[0] + 1
        notes.append(f"{path}: t_console goes backwards {back.size} times (first at row {file_rows[k] + 2}: "
                     f"{times[k].strip()} after {times[k - 1].strip()}): rows kept in file order")
    same = np.concatenate([[False], (np.asarray(times[1:]) == np.asarray(times[:-1]))
                           & ((values[1:] == values[:-1]) | (np.isnan(values[1:]) & np.isnan(values[:-1]))).all(1)])
    if same.any():
        notes.append(f"{path}: {int(same.sum())} rows repeat the row before (its time and every value; first at "
                     f"row {file_rows[np.flatnonzero(same)[0]] + 2}): kept, each read as a row of its own")
    return notes


def frozen_notes(path: Path, columns: list[str], values: np.ndarray, file_rows: np.ndarray) -> list[str]:
    """A warning where the work position stays exactly the same for FROZEN_ROWS rows or more while the
    controller reports running: a position channel that stopped updating (or a long dwell). features=all
    would read the machine as standing there; the rows are kept as recorded."""
    if not all(c in columns for c in ("posx", "posy", "posz", "stat")) or len(values) < FROZEN_ROWS:
        return []
    pos = values[:, [columns.index(c) for c in ("posx", "posy", "posz")]]
    held = np.concatenate([[False], (pos[1:] == pos[:-1]).all(1)]) & (values[:, columns.index("stat")] == RUNNING)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], held.astype(np.int8), [0]])))  # starts and ends, paired
    starts, ends = edges[::2], edges[1::2]
    long = np.flatnonzero(ends - starts + 1 >= FROZEN_ROWS)  # + 1: the row the position was first held at
    if not long.size:
        return []
    k = long[np.argmax((ends - starts)[long])]
    return [f"{path}: the work position (posx, posy, posz) stays the same for {ends[k] - starts[k] + 1} rows from "
            f"row {file_rows[starts[k] - 1] + 2} while the controller reports running (stat {RUNNING}), "
            f"{long.size} such stretch(es): a frozen position channel or a long pause; rows kept as recorded"]


def board_columns(columns: list[str]) -> dict[str, list[int]]:
    """Each IMU board (`frame_b1` of `frame_b1.Ax`) -> the indices of its columns, boards sorted by name."""
    out: dict[str, list[int]] = {}
    for j, c in enumerate(columns):
        if "." in c:
            out.setdefault(c.split(".")[0], []).append(j)
    return dict(sorted(out.items()))


def silent_boards(columns: list[str], bad: np.ndarray) -> np.ndarray:
    """[rows, columns] the empty cells of boards with every cell of the row empty (a board that failed)."""
    out = np.zeros_like(bad)
    for mine in board_columns(columns).values():
        out[np.ix_(bad[:, mine].all(1), mine)] = True
    return out


def opener(path: Path):
    """gzip.open for a `.gz` name (any case), else open: how a recording's text is opened by its name."""
    return gzip.open if path.name.lower().endswith(".gz") else open


def text_rows(path: Path) -> list[str]:
    """The recording's text lines, newlines kept, header first: what a logger wrote, to replay it row by row."""
    with opener(path)(path, "rt", newline="") as f:
        return f.read().splitlines(keepends=True)


def read_table(path: Path) -> tuple[pd.DataFrame, list[str]]:
    """The file as a table with checked column names, and warnings about what a rule fixed.

    The header is read on its own first because pandas renames a duplicate (`x_motor` twice reads as
    `x_motor` and `x_motor.1`, which looks like an IMU board column): a silent wrong reading."""
    check_opens(path)
    try:
        header = pd.read_csv(path, header=None, nrows=1, dtype=str, keep_default_na=False, encoding="utf-8")
        names, notes = column_names(path, header.iloc[0].tolist())
        target = {raw: str for raw, name in zip(header.iloc[0], names) if name == "gcode_string"}
        with warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)  # pandas would drop the extra values
            frame = pd.read_csv(path, low_memory=False, dtype=target, encoding="utf-8", index_col=False)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"{path}: truncated or corrupt gzip ({e})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason})") from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: empty file") from None
    except pd.errors.ParserWarning:
        raise DataError(f"{path}: rows with more fields than the header's {len(names)} names "
                        "(their extra values would be lost)") from None
    except (pd.errors.ParserError, ValueError, OSError) as e:
        if m := FIELDS.search(str(e)):
            why = f"row {m['row']}: {m['saw']} fields, but the header has {m['want']} names"
            raise DataError(f"{path}: {why}") from None
        raise DataError(f"{path}: cannot parse CSV ({str(e).splitlines()[0]})") from None
    if len(frame.columns) != len(names):
        raise DataError(f"{path}: cannot parse CSV (the header has {len(names)} names, the table "
                        f"{len(frame.columns)} columns)")
    frame.columns = names
    return frame, notes


def check_opens(path: Path) -> None:
    """Why a file cannot be read as text, in words: a broken or looping symlink, no permission, or the
    bytes of a compressed file or a spreadsheet under a `.csv` name (pandas would misread them)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except FileNotFoundError:
        if path.is_symlink():
            raise DataError(f"{path}: broken symlink (its target {os.readlink(path)} does not exist)") from None
        raise DataError(f"{path}: no such file") from None
    except PermissionError:
        raise DataError(f"{path}: not readable (permission denied)") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise DataError(f"{path}: symlink loop (the link leads back to itself)") from None
        raise DataError(f"{path}: cannot open ({e.strerror})") from None
    for magic, (what, fix) in MAGIC.items():
        if head.startswith(magic) and not (magic == GZIP and path.name.lower().endswith(".gz")):
            raise DataError(f"{path}: {what}, not CSV text ({fix})")


def column_names(path: Path, header: list[str]) -> tuple[list[str], list[str]]:
    """Header names with surrounding spaces removed (a warning says so); an error for a duplicate name
    or for a header that shows the file was saved with another separator than ','."""
    if len(header) == 1:
        sep = next((s for s in SEPARATORS if s in header[0]), None)
        if sep is not None:
            raise DataError(f"{path}: not comma-separated (the header is one column holding {SEPARATORS[sep]}); "
                            "save it with ',' between columns")
    names = [h.strip() or f"Unnamed: {i}" for i, h in enumerate(header)]
    first: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in first:
            raise DataError(f"{path}: duplicate column {name!r} (columns {first[name] + 1} and {i + 1})")
        first[name] = i
    padded = [h for h in header if h.strip() and h != h.strip()]
    if not padded:
        return names, []
    shown = ", ".join(repr(h) for h in padded[:3]) + (f" and {len(padded) - 3} more" if len(padded) > 3 else "")
    return names, [f"{path}: spaces around column names removed: {shown}"]


def list_runs(data_dir: str | Path, pattern: str) -> list[Path]:
    """The recordings in a folder, sorted by name; an error if there are none."""
    return find_recordings(data_dir, pattern)[0]


def find_recordings(data_dir: str | Path, pattern: str) -> tuple[list[Path], list[dict]]:
    """The recordings in a folder, and the other names the pattern matched (each warned about once).

    A recording is a `.csv` or `.csv.gz` file whose name does not start with a dot: backups (`.bak`,
    `~`), editor locks and swap files (`.#x.csv`, `.x.csv.swp`), macOS `._` files and folders are not
    read. A broken or looping symlink with a recording's name is a recording that `read_run` refuses."""
    folder = Path(data_dir)
    if not folder.is_dir():
        raise DataError(f"{folder}: data.dir is not a folder")
    if "/" in pattern or os.sep in pattern:
        matched = sorted(folder.glob(pattern))
    else:  # in any case, as RECORDING_SUFFIXES: a logger that writes FACE_001.CSV.GZ is not ignored
        matched = sorted(p for p in folder.iterdir() if fnmatch.fnmatch(p.name.lower(), pattern.lower()))
    if not matched:
        raise DataError(f"{folder}: no files match data.pattern={pattern!r}")
    files, ignored = [], []
    for path in matched:
        why = not_a_recording(path)
        if why is None:
            files.append(path)
        else:
            log.warning("ignoring %s: %s", path, why)
            ignored.append({"file": path.name, "reason": why})
    if not files:
        names = ", ".join(i["file"] for i in ignored[:5]) + (" ..." if len(ignored) > 5 else "")
        raise DataError(f"{folder}: no recordings among the files matching data.pattern={pattern!r} "
                        f"(not read: {names}; recordings end in .csv or .csv.gz)")
    return files, ignored


def not_a_recording(path: Path) -> str | None:
    """Why a file the pattern matched is not read, or None for a recording."""
    name = path.name
    if name.startswith("."):
        return "hidden file (an editor lock or swap file, or a macOS '._' file?), not a recording"
    if path.is_dir():
        return "a folder, not a recording"
    if not name.lower().endswith(RECORDING_SUFFIXES):
        end = name[len(name.rstrip("~")):] or Path(name).suffix or name
        return f"name ends in {end!r}, not .csv or .csv.gz (a backup or temporary copy?), not a recording"
    return None
