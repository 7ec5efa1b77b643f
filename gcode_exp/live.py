"""Live mode: follow a recording while a logger writes it, and decode each window as soon as its last row
arrived. `LiveStream` is one followed stream (rows in, decoded windows out); `follow` is task=predict
predict.follow=true on a terminal, and the monitor page (gcode_exp/serve.py) runs one stream per machine."""

from __future__ import annotations

import csv
import logging
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gcode_exp.atomic import write_json
from gcode_exp.data.read import DAY, DataError, RecordedRun, channel_group, opener, run_name, seconds
from gcode_exp.data.windows import run_inputs
from gcode_exp.predict import Predictor, check_channels
from gcode_exp.programs import name_program

log = logging.getLogger(__name__)


# --- one followed stream ---------------------------------------------------------------------------------
@dataclass
class Window:
    """One decoded window of a followed stream."""

    time: str  # the time of its centre row
    start: int  # its first row, counted from the first row read
    line: str  # the line the model names
    p: float
    novelty: float | None  # share of its rows off every training path, where the model can tell
    true_line: str  # its centre row's recorded line ("" where the recording has none)
    program: str  # the program the last windows name ("" where naming is off)
    program_p: float
    lock: dict | None  # {"program", "row", "s"} where this window locks on a program, or on a new job


class LiveStream:
    """Rows in as a CSV reader gives them (the header first), decoded windows out: the same windows as
    offline (starts 0, stride, ...), each decoded as soon as its last row arrived.

    The program: named from the lines of the last `segment_rows` rows' windows; once named at `lock_p` or
    more the stream has locked on (the row, and the seconds since the first row read: a monitor switched on
    mid-job), and locks again where another program takes over (a new job in the same stream)."""

    def __init__(self, path: Path, pred: Predictor, counts: dict[str, Counter] | None, segment_rows: int,
                 lock_p: float):
        self.path, self.pred, self.counts, self.lock_p = path, pred, counts, lock_p
        self.recent: deque[str] = deque(maxlen=max(1, segment_rows // pred.stride))  # the last windows' lines
        self.header: list[str] | None = None
        self.rows = self.windows = 0  # rows read, windows decoded
        self.jobs: list[dict] = []  # each lock: program, row, seconds since the first row
        self.program, self.first_time, self.clock = None, None, False
        self._values: list[np.ndarray] = []
        self._times: list[str] = []
        self._true: list[str] = []
        self._base = self._next_start = 0  # the buffers hold rows from _base on

    def add(self, rows: list[list[str]]) -> list[Window]:
        """Take newly written rows; return the windows they completed."""
        if self.header is None:
            self._read_header([h.strip() for h in rows[0]])
            rows = rows[1:]
        for r in rows:
            self.rows += 1
            try:
                v = np.array([float(r[j]) if j < len(r) and r[j].strip() else np.nan for j in self._cols], np.float32)
            except ValueError:
                raise DataError(f"{self.path}: row {self.rows + 1}: a sensor column holds a non-numeric value"
                                ) from None
            self._values.append(v)
            self._times.append(r[self._t_col] if self.clock and self._t_col < len(r) else str(self.rows - 1))
            self._true.append(r[self._line_col].strip() if self._line_col is not None and self._line_col < len(r)
                              else "")
            self.first_time = self._times[-1] if self.first_time is None else self.first_time
        starts = []
        while self._next_start + self.pred.window <= self._base + len(self._values):
            starts.append(self._next_start)
            self._next_start += self.pred.stride
        if not starts:
            return []
        run = RecordedRun(name=self.path.name, op="", columns=self._columns, values=np.stack(self._values),
                          lines=[""] * len(self._values), nonfinite_cells=0, silent_rows=0, unparsed_chunks=0,
                          path=str(self.path))
        base = self._base
        guesses = self.pred.guess(run_inputs(run, self.pred.feats, first_row=base), [s - base for s in starts])
        out = [self._window(g.start + base, g.line, g.p, g.novelty) for g in guesses]
        drop = self._next_start - base  # rows no later window needs
        del self._values[:drop], self._times[:drop], self._true[:drop]
        self._base = self._next_start
        return out

    def _read_header(self, header: list[str]) -> None:
        self.header = header
        self._columns = [c for c in header if channel_group(c) is not None]
        check_channels(self.path, self._columns, self.pred.feats)
        self._cols = [header.index(c) for c in self._columns]
        self.clock = "t_console" in header
        self._t_col = header.index("t_console") if self.clock else -1
        self._line_col = header.index("gcode_string") if "gcode_string" in header else None

    def _window(self, start: int, line: str, p: float, novelty: float | None) -> Window:
        self.windows += 1
        i = start - self._base
        w = self.pred.window
        self.recent.append(line)
        # each window's line counted once (not divided by the overlap as offline): four windows then name a
        # program at p 0.9 in about 30 s (docs/RESULTS.md, "Live")
        op, op_p = name_program(list(self.recent), self.counts, 1.0)[0] if self.counts else ("", 0.0)
        lock = None
        if op_p >= self.lock_p and op != self.program:
            row, now = start + w - 1, self._times[i + w - 1]
            after = elapsed(self.first_time, now) if self.clock else None
            after = row / 4.0 if after is None else after  # no clock: the recordings' 4 rows a second
            lock = {"program": op, "row": row, "s": round(after, 2), "new_job": self.program is not None}
            self.program = op
            self.jobs.append(lock)
        return Window(time=self._times[i + w // 2], start=start, line=line, p=p, novelty=novelty,
                      true_line=self._true[i + w // 2], program=op, program_p=op_p, lock=lock)


# --- the file being written ------------------------------------------------------------------------------
def tail_rows(path: Path, poll_s: float, idle_s: float, stop: threading.Event | None = None
              ) -> Iterator[list[list[str]] | None]:
    """The header, then each batch of newly completed rows of a file being appended to; None when the
    file has not grown for idle_s seconds (the caller stops). Read as the offline reader reads: UTF-8, a
    byte-order mark dropped. A file rotated under it (truncated, or replaced by a new one) is said so in
    the log and followed from the new file's start, its header skipped where it is the same (else an error:
    the columns changed). `stop`: once set, ends as at idle_s (a server shutting down its followers)."""
    if not path.is_file():
        raise DataError(f"{path}: no such file (data.path)")
    header: list[str] | None = None
    while True:
        rotated = yield from tail_one(path, poll_s, idle_s, header, stop)
        if rotated is None:
            return
        header = rotated
        log.warning("%s: the file was rotated (truncated or replaced); following the new one from its start", path)


def tail_one(path: Path, poll_s: float, idle_s: float, header: list[str] | None, stop: threading.Event | None):
    """tail_rows over one file (`header`: the rotated file's, which this one repeats); returns the header
    once the file is rotated, None at idle_s without growth."""
    opens = opener(path)
    try:
        f = opens(path, "rt", encoding="utf-8-sig", newline="")
        inode = os.fstat(f.fileno()).st_ino if opens is open else None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    with f:
        pending, last, first = "", time.monotonic(), header
        while True:
            try:
                chunk = f.read()
            except (EOFError, OSError) as e:
                raise DataError(f"{path}: cannot read ({e})") from None
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: not UTF-8 text ({e.reason})") from None
            if chunk:
                pending += chunk.replace("\r\n", "\n").replace("\r", "\n")  # a lone CR ends a row, as offline
                last = time.monotonic()
                *done, pending = pending.split("\n")
                try:
                    rows = [r for r in csv.reader(done) if r]
                except csv.Error as e:
                    raise DataError(f"{path}: cannot parse CSV ({e})") from None
                if rows and header is None:
                    header = rows[0]
                elif rows and first is not None:  # the rotated-to file's header
                    if [h.strip() for h in rows[0]] != [h.strip() for h in first]:
                        raise DataError(f"{path}: rotated to a file with other columns than the one followed")
                    rows, first = rows[1:], None
                if rows:
                    yield rows
            elif inode is not None and rotated(path, f, inode):
                return header
            elif time.monotonic() - last > idle_s or (stop is not None and stop.is_set()):
                yield None
                return None
            else:
                time.sleep(poll_s)


def elapsed(first: str, now: str) -> float | None:
    """Seconds from time `first` to `now` (clock times or seconds); None where either is not a time."""
    a, b = seconds(first), seconds(now)
    return None if a is None or b is None else (b - a) % DAY  # a clock time may pass midnight


def rotated(path: Path, f, inode: int) -> bool:
    """Whether the followed file was replaced (another file under its name) or truncated below what was read."""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False  # moved away, the new one not there yet: wait for it (or idle_s)
    return now.st_ino != inode or now.st_size < f.buffer.tell()


def follow(cfg, run_dir: Path, pred: Predictor, counts: dict[str, Counter] | None) -> dict:
    """Read data.path while it grows (LiveStream), print each newly recognised line with the time of the
    window's centre row, and where the stream locks on a program (or a new job). Ends at idle_s without
    growth or on Ctrl-C, with a summary line.

    predictions/<recording>.live.csv gets a row per window, flushed as they come; it is created with the
    first one, so a recording that fails before any window (missing, broken, too short) leaves no file; one
    that fails later keeps the whole rows written so far (the lines already printed)."""
    path = Path(cfg.data.path)
    stream = LiveStream(path, pred, counts, cfg.predict.segment_rows, cfg.predict.lock_p)
    printed, last_line, why = 0, None, "end of input"
    live_path = run_dir / "predictions" / f"{run_name(path)[0]}.live.csv"
    live = writer = None
    try:
        for rows in tail_rows(path, cfg.predict.poll_s, cfg.predict.idle_s):
            if rows is None:
                break
            for w in stream.add(rows):
                if live is None:
                    live_path.parent.mkdir(exist_ok=True)
                    live = open(live_path, "w", newline="")
                    writer = csv.writer(live)
                    writer.writerow(("time", "start_row", "line", "p"))
                writer.writerow((w.time, w.start, w.line, f"{w.p:.4g}"))
                if w.line != last_line:
                    print(f"{w.time[:10]}  {w.line}  (p={w.p:.2f})", flush=True)
                    printed, last_line = printed + 1, w.line
                if w.lock:
                    print(f"live: {'a new job:' if w.lock['new_job'] else 'locked on'} program {w.lock['program']} "
                          f"(p={w.program_p:.2f}) at row {w.lock['row']}, {w.lock['s']:.1f} s after the first row "
                          "read", flush=True)
            if live is not None:
                live.flush()
    except KeyboardInterrupt:
        why = "interrupted"
    finally:
        if live is not None:
            live.close()
    if stream.windows == 0 and why == "end of input":
        raise DataError(f"{path}: {stream.rows} rows, fewer than one window (data.window={pred.window})")
    jobs = [{k: j[k] for k in ("program", "row", "s")} for j in stream.jobs]
    locked = f"locked on {jobs[0]['program']} after {jobs[0]['s']:.1f} s" if jobs else "no program locked on"
    print(f"live: {stream.rows} rows, {stream.windows} windows, {printed} lines recognised, {locked}, {len(jobs)} "
          f"job(s) ({why})", flush=True)
    metrics = {"ckpt_path": str(cfg.ckpt_path), "live/rows": stream.rows, "live/windows": stream.windows,
               "live/lines": printed, "live/lock_s": jobs[0]["s"] if jobs else None, "live/jobs": jobs}
    write_json(run_dir / "metrics.json", metrics)
    return metrics
