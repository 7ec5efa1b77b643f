"""Read one recorded run (an "aligned" CSV, optionally gzip-compressed) into arrays.

Only sensor and controller channels ever become inputs. The target (`gcode_string`) and its
proxies never do: `gcode_line`, `line` (the controller's line number), `raw_json` (repeats the
report), `t_console` (wall clock) and `momo` (the controller's motion mode, i.e. G0/G1/G2/G3).
"""

from __future__ import annotations

import gzip
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from gcode_exp import GcodeExpError
from gcode_exp.data.vocab import parse_line

TARGET_AND_PROXIES = ("gcode_line", "gcode_string", "line", "raw_json", "t_console", "momo")
ALWAYS_EMPTY = ("vel", "plane")
CONTROLLER = ("posx", "posy", "posz", "mpox", "mpoy", "mpoz", "feed", "stat", "unit", "dist", "coor")
MOTORS = ("spindle", "x_motor", "y_motor", "z_motor")
RUN_NAME = re.compile(r"^(?P<op>[a-z]+\d*)_(?P<idx>\d+)")


class DataError(GcodeExpError):
    """A recording that cannot be used; the message names the file (and row where known)."""


@dataclass
class Run:
    """One recording: sensor values (NaN where a cell was missing) and the executing G-code line."""

    name: str
    op: str  # operation type: the file-name prefix, e.g. "face150025"
    columns: list[str]
    values: np.ndarray  # float32 [rows, len(columns)]
    lines: list[str]  # G-code text per row; "" where the controller reported none
    nonfinite_cells: int  # cells that were empty, NaN or inf and will read as the channel mean
    silent_rows: int  # rows dropped because no sensor column held a finite value
    unparsed_chunks: int  # G-code text the tokenizer could not read (e.g. `#5`), dropped from targets
    path: str = ""  # the file it was read from, for messages


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
    name = path.name.removesuffix(".gz").removesuffix(".csv").removesuffix("_aligned")
    m = RUN_NAME.match(name)
    return name, (m.group("op") if m else name.split("_")[0])


def read_run(path: str | Path, max_nonfinite: float = 0.05) -> Run:
    """Parse one run; raise DataError with a one-line reason for anything unusable."""
    path = Path(path)
    try:
        frame = pd.read_csv(path, low_memory=False, dtype={"gcode_string": str}, encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"{path}: truncated or corrupt gzip ({e})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason})") from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: empty file") from None
    except (pd.errors.ParserError, ValueError, OSError) as e:
        raise DataError(f"{path}: cannot parse CSV ({str(e).splitlines()[0]})") from None
    if "gcode_string" not in frame.columns:
        raise DataError(f"{path}: missing column 'gcode_string' (the target)")
    if len(frame) == 0:
        raise DataError(f"{path}: header only, no rows")
    columns = [c for c in frame.columns if channel_group(c) is not None]
    if not columns:
        raise DataError(f"{path}: no sensor columns (expected motor currents or '<board>.<axis>' columns)")
    values = np.empty((len(frame), len(columns)), dtype=np.float32)
    for j, col in enumerate(columns):
        raw = frame[col]
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
    nonfinite = int(bad.sum())
    if nonfinite > max_nonfinite * values.size:
        row, j = np.argwhere(bad)[0]
        raise DataError(
            f"{path}: {nonfinite / values.size:.0%} of sensor cells are empty/NaN/inf "
            f"(limit data.max_nonfinite={max_nonfinite}; first at row {row + 2}, column '{columns[j]}')"
        )
    values[bad] = np.nan
    lines = frame["gcode_string"].fillna("").astype(str).str.strip()[alive].tolist()
    dropped = {line: parse_line(line)[1] for line in set(lines)}
    name, op = run_name(path)
    return Run(name=name, op=op, columns=columns, values=values, lines=lines, nonfinite_cells=nonfinite,
               silent_rows=int((~alive).sum()), unparsed_chunks=sum(dropped[line] for line in lines),
               path=str(path))


def list_runs(data_dir: str | Path, pattern: str) -> list[Path]:
    """The recordings in a folder, sorted by name; an error if there are none."""
    folder = Path(data_dir)
    if not folder.is_dir():
        raise DataError(f"{folder}: data.dir is not a folder")
    files = sorted(p for p in folder.glob(pattern) if p.is_file())
    if not files:
        raise DataError(f"{folder}: no files match data.pattern={pattern!r}")
    return files
