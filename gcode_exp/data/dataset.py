"""From recordings to tensors: file-level split, channels, normalisation, windows, targets, cache.

Everything the model sees is fitted on training files only (channel list, normalisation, vocabulary),
and files, not windows, are split, because neighbouring windows overlap by 75 %.
Rows with an empty `gcode_string` keep their sensor values but carry no label: they never vote for
a window's target, and a window with no labelled row at all is dropped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import random
import re
import zlib
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, fields, replace
from itertools import repeat
from pathlib import Path

import numpy as np
import torch

from gcode_exp.data.cache import (
    CACHE_VERSION,
    DamagedEntry,
    RowFile,
    cache_off,
    file_hashes,
    load_entry,
    load_recording,
    recording_entry,
    row_file,
    save_entry,
    save_recording,
    writable_folder,
)
from gcode_exp.data.read import DataError, RecordedRun, channel_group, find_recordings, read_run, run_name
from gcode_exp.data.vocab import BOS, EOS, PAD, UNK, Vocab

log = logging.getLogger(__name__)
ELAPSED_SCALE = 1000.0  # features.elapsed: rows per unit of the elapsed input (~4 min at 3.9 Hz)
SPLITS = ("train", "val", "test")
SPLIT_DEFAULTS = {"split_by": "file", "folds": 0, "fold": 0, "train_share": 1.0}  # left out of the cache key
HOW_READ = ("cache_dir", "workers")  # data keys that change how recordings are read and kept, never what
NOT_IN_KEY = ("dir", *HOW_READ)  # data keys left out of the prepared data's cache key (dir: hashed apart)
PARALLEL_BYTES = 16 << 20  # fewer bytes to read are read in this process: starting a pool costs more (the
# 7.7 MB sample: 0.5 s in one process, 0.8 s in two; the 58 MB dataset: 3.2 s in one, 2.1 s in two)
POOL_CONTEXT = None  # the platform's default start method for the reading processes
WINDOW_WARNING = ("data.split_by=window: windows of one recording are shuffled across train, val and test and "
                  "overlap their neighbours, so these numbers measure memorised recordings, not generalisation "
                  "to a new run (kept only to measure that inflation)")


@dataclass
class Split:
    """All windows of one split. Windows are views into `rows` (no copies): window i covers
    rows[starts[i] : starts[i] + window]; `lo`/`hi` bound how far augmentation may shift it."""

    rows: torch.Tensor  # float32 [total_rows, channels], normalised, missing = 0
    starts: torch.Tensor  # int64 [windows]
    lo: torch.Tensor  # int64 [windows] first allowed start (file's first row)
    hi: torch.Tensor  # int64 [windows] last allowed start
    targets: torch.Tensor  # int64 [windows, max_len] BOS ... EOS PAD ...
    files: list[str]
    file_windows: list[int]
    row_targets: torch.Tensor  # int16 [total_rows, max_len] each row's own line, all PAD where unlabelled
    row_lines: torch.Tensor  # int64 [total_rows] which text line each row executes (line_id), 0 where unlabelled
    target_lengths: torch.Tensor  # int64 [windows] BOS + tokens + EOS before cutting to max_len
    # `rows` in its cache entry (load_prepared; None: in memory), never cached itself
    rows_file: RowFile | None = field(default=None, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.starts)

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """Input rows at an index tensor of any shape ([B, window] for a batch of windows): a new tensor
        [*rows.shape, channels]. Training and evaluation read `rows` through this alone: from the cache
        file with pread where the split was loaded from one, so that an epoch does not leave the pages it
        read mapped in the process. `rows` itself is then the file's bytes: writing into it is not supported."""
        if self.rows_file is not None:
            return self.rows_file.take(rows.flatten()).view(*rows.shape, self.rows.shape[1])
        return self.rows.index_select(0, rows.flatten()).view(*rows.shape, self.rows.shape[1])

    def stored(self) -> dict:
        """What the cache keeps of the split: every field but where this process reads its rows from."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}


@dataclass
class Features:
    """What a checkpoint needs to turn new recordings into inputs exactly like its training data."""

    channels: list[str]  # sensor columns, in input order
    boards: list[str]  # one presence flag each, appended after the channels (empty: no flags)
    mean: list[float]
    std: list[float]
    elapsed: bool = False  # one more input, last: rows since the recording's first row / ELAPSED_SCALE

    @property
    def n_inputs(self) -> int:
        return len(self.channels) + len(self.boards) + int(self.elapsed)


# --- splitting -----------------------------------------------------------------------------------
def op_groups(runs: list[RecordedRun]) -> list[list[RecordedRun]]:
    """Runs grouped by operation type, in name order; operations with fewer than 3 files are pooled
    into one group, so that stratified splits of tiny samples still fill every part."""
    by_op: dict[str, list[RecordedRun]] = {}
    for run in sorted(runs, key=lambda r: r.name):
        by_op.setdefault(run.op, []).append(run)
    groups = [g for g in by_op.values() if len(g) >= 3]
    pool = [r for g in by_op.values() if len(g) < 3 for r in g]
    return groups + [pool] if pool else groups


def split_files(runs: list[RecordedRun], fractions: tuple[float, float, float],
                seed: int) -> dict[str, list[RecordedRun]]:
    """Seeded split of whole files, stratified by operation type.

    Each operation with at least 3 files gives round(n * frac) files (at least 1) to val and test;
    operations with fewer files are pooled and split the same way, so tiny samples still get all splits.
    """
    rng = random.Random(seed)
    groups = op_groups(runs)
    out: dict[str, list[RecordedRun]] = {s: [] for s in SPLITS}
    for group in groups:
        group = group[:]
        rng.shuffle(group)
        n = len(group)
        n_val = max(1, round(n * fractions[1])) if n >= 3 else 0
        n_test = max(1, round(n * fractions[2])) if n >= 2 else 0
        out["test"] += group[:n_test]
        out["val"] += group[n_test : n_test + n_val]
        out["train"] += group[n_test + n_val :]
    for name in SPLITS:
        if not out[name]:
            raise DataError(f"split '{name}' got no files: {len(runs)} usable files are too few (need 3)")
    return out


def family(op: str) -> str:
    """The program family of an operation type: its prefix without `damage` and digits (face150025,
    damageface -> face), so leaving a family out leaves out every variant of that program."""
    return re.sub(r"\d+$", "", op.removeprefix("damage")) or op


def _fold_error(key: str, value, why: str) -> Exception:
    from gcode_exp.config import ConfigError

    return ConfigError(f"{key}={value}: {why}")


def carve_val(runs: list[RecordedRun], share: float, rng: random.Random) -> tuple[list[RecordedRun], list[RecordedRun]]:
    """(train, val) from one fold's training part, stratified like split_files: each operation with at
    least 3 files gives round(n * share) files (at least 1) to val; smaller ones are pooled."""
    groups = op_groups(runs)
    train, val = [], []
    for group in groups:
        group = group[:]
        rng.shuffle(group)
        n_val = max(1, round(len(group) * share)) if len(group) >= 2 else 0
        val += group[:n_val]
        train += group[n_val:]
    if not train or not val:
        raise DataError(f"the training part of the fold has {len(runs)} usable files, too few for train and val")
    return train, val


def fold_of_files(runs: list[RecordedRun], folds: int, seed: int) -> dict[str, int]:
    """Run name -> fold, k-fold stratified by operation: each operation's files, shuffled (seeded), are
    dealt to the folds in turn, continuing where the previous operation stopped, so fold sizes differ
    by at most one file and an operation with n <= k files has them in n different folds."""
    if folds > len(runs):
        raise _fold_error("data.folds", folds, f"more folds than the {len(runs)} usable files")
    rng = random.Random(seed)
    by_op: dict[str, list[RecordedRun]] = {}
    for run in sorted(runs, key=lambda r: r.name):
        by_op.setdefault(run.op, []).append(run)
    out, k = {}, 0
    for op in sorted(by_op):
        group = by_op[op][:]
        rng.shuffle(group)
        for run in group:
            out[run.name] = k % folds
            k += 1
    return out


def split_runs(runs: list[RecordedRun], data_cfg) -> tuple[dict[str, list[RecordedRun]], dict]:
    """The files of train/val/test under data.split_by=file|operation, data.folds and data.fold, and
    what was held out (`split` of data_summary.json). split_by=window is split_windows."""
    by, folds, fold, seed = data_cfg.split_by, data_cfg.folds or 0, data_cfg.fold, data_cfg.split_seed
    fractions = tuple(data_cfg.split)
    info: dict = {"split_by": by, "folds": folds, "fold": fold}
    if by == "file" and not folds:
        if fold:
            raise _fold_error("data.fold", fold, "needs data.folds >= 2 (data.folds=0 is one split by data.split)")
        parts = split_files(runs, fractions, seed)
        return {**parts, "train": fewer(parts["train"], getattr(data_cfg, "train_share", 1.0), seed)}, info
    if by == "file":
        if fold >= folds:
            raise _fold_error("data.fold", fold, f"must be < data.folds={folds}")
        assigned = fold_of_files(runs, folds, seed)
        test = [r for r in runs if assigned[r.name] == fold]
    else:  # operation: leave one program family out
        families = sorted({family(r.op) for r in runs})
        info["families"] = families
        if len(families) < 2:
            raise DataError(f"data.split_by=operation needs two program families or more; the files hold "
                            f"{', '.join(families) or 'none'}")
        if folds and folds != len(families):
            raise _fold_error("data.folds", folds, f"split_by=operation has one fold per program family "
                              f"({', '.join(families)}): use {len(families)} or 0")
        if fold >= len(families):
            raise _fold_error("data.fold", fold, f"must be < {len(families)} with data.split_by=operation "
                              f"({', '.join(f'{i}: {f}' for i, f in enumerate(families))})")
        info["test_family"] = families[fold]
        test = [r for r in runs if family(r.op) == families[fold]]
    held = {r.name for r in test}
    rest = [r for r in runs if r.name not in held]
    train, val = carve_val(rest, fractions[1] / (fractions[0] + fractions[1]), random.Random(seed))
    return {"train": fewer(train, getattr(data_cfg, "train_share", 1.0), seed), "val": val, "test": test}, info


def fewer(train: list[RecordedRun], share: float, seed: int) -> list[RecordedRun]:
    """`data.train_share` of the training files, per operation (at least one each), seeded; validation
    and test stay as they are, so runs with different shares measure how quality grows with data."""
    if share >= 1:
        return train
    rng, keep = random.Random(seed), []
    by_op: dict[str, list[RecordedRun]] = {}
    for run in sorted(train, key=lambda r: r.name):
        by_op.setdefault(run.op, []).append(run)
    for op in sorted(by_op):
        group = by_op[op][:]
        rng.shuffle(group)
        keep += group[: max(1, round(len(group) * share))]
    return keep


def window_starts(run: RecordedRun, data_cfg) -> list[int]:
    """The starts of the windows build_split makes from this run (those holding a labelled row)."""
    n, w = len(run.lines), data_cfg.window
    labelled = np.concatenate([[0], np.cumsum([bool(t) for t in run.lines])])
    return [s for s in range(0, n - w + 1, data_cfg.stride) if labelled[s + w] > labelled[s]]


def split_windows(runs: list[RecordedRun], data_cfg) -> tuple[dict[str, dict[str, set[int]]], dict]:
    """The leaky protocol: every window of every file, shuffled (data.split_seed) into train/val/test
    by data.split, or with data.folds=k dealt into k folds (data.fold's is test, val carved at random
    from the rest). Split -> run name -> window starts."""
    log.warning("%s", WINDOW_WARNING)
    folds, fold, fractions = data_cfg.folds or 0, data_cfg.fold, tuple(data_cfg.split)
    windows = [(r.name, s) for r in sorted(runs, key=lambda r: r.name) for s in window_starts(r, data_cfg)]
    random.Random(data_cfg.split_seed).shuffle(windows)
    n = len(windows)
    if folds:
        if fold >= folds:
            raise _fold_error("data.fold", fold, f"must be < data.folds={folds}")
        test = windows[fold::folds]
        rest = [w for i, w in enumerate(windows) if i % folds != fold]
        n_val = max(1, round(len(rest) * fractions[1] / (fractions[0] + fractions[1])))
        parts = {"test": test, "val": rest[:n_val], "train": rest[n_val:]}
    elif fold:
        raise _fold_error("data.fold", fold, "needs data.folds >= 2 (data.folds=0 is one split by data.split)")
    else:
        n_test, n_val = max(1, round(n * fractions[2])), max(1, round(n * fractions[1]))
        parts = {"test": windows[:n_test], "val": windows[n_test : n_test + n_val], "train": windows[n_test + n_val :]}
    out: dict[str, dict[str, set[int]]] = {}
    for name in SPLITS:
        if not parts[name]:
            raise DataError(f"split '{name}' got no windows: {n} windows are too few")
        out[name] = {}
        for run_name_, s in parts[name]:
            out[name].setdefault(run_name_, set()).add(s)
    return out, {"split_by": "window", "folds": folds, "fold": fold}


def covered_rows(run: RecordedRun, starts: set[int], window: int) -> RecordedRun:
    """The run cut to the rows its `starts` windows cover: what normalisation and vocabulary are fitted
    on under split_by=window (rows only val/test windows cover stay out of the fit)."""
    mask = np.zeros(len(run.lines), dtype=bool)
    for s in starts:
        mask[s : s + window] = True
    return replace(run, values=run.values[mask], lines=[t for t, m in zip(run.lines, mask) if m])


# --- features and windows -----------------------------------------------------------------------
def fit_features(train: list[RecordedRun], groups: list[str], board_flags: bool, elapsed: bool = False) -> Features:
    """Channel list (union over training files) and per-channel mean/std from training rows."""
    channels = sorted({c for r in train for c in r.columns if channel_group(c) in groups})
    if not channels:
        raise DataError(f"no training file has a column of features.groups={groups}")
    boards = sorted({c.split(".")[0] for c in channels if "." in c}) if board_flags else []
    total = np.zeros(len(channels))
    square = np.zeros(len(channels))
    count = np.zeros(len(channels))
    col = {c: i for i, c in enumerate(channels)}
    for r in train:
        idx = [col[c] for c in r.columns if c in col]
        v = r.values[:, [j for j, c in enumerate(r.columns) if c in col]].astype(np.float64)
        ok = np.isfinite(v)
        v = np.where(ok, v, 0.0)
        total[idx] += v.sum(0)
        square[idx] += (v * v).sum(0)
        count[idx] += ok.sum(0)
    mean = total / np.maximum(count, 1)
    std = np.sqrt(np.maximum(square / np.maximum(count, 1) - mean**2, 0.0))
    std = np.where(std > 1e-8, std, 1.0)
    return Features(channels=channels, boards=boards, mean=mean.tolist(), std=std.tolist(), elapsed=elapsed)


def run_inputs(run: RecordedRun, feats: Features, first_row: int = 0) -> np.ndarray:
    """[rows, n_inputs] normalised inputs; channels the run lacks (or cells it lost) read as 0 = mean.
    `first_row`: the recording's row the run's first row is (live mode reads a recording in pieces)."""
    x = np.zeros((len(run.lines), feats.n_inputs), dtype=np.float32)
    col = {c: i for i, c in enumerate(feats.channels)}
    src = [j for j, c in enumerate(run.columns) if c in col]
    dst = [col[run.columns[j]] for j in src]
    if not dst:
        raise DataError(f"{run.name}: none of the model's {len(feats.channels)} input channels are in this file")
    mean, std = np.asarray(feats.mean, np.float32), np.asarray(feats.std, np.float32)
    x[:, dst] = (run.values[:, src] - mean[dst]) / std[dst]
    present = {c.split(".")[0] for c in run.columns}
    for k, board in enumerate(feats.boards):
        x[:, len(feats.channels) + k] = float(board in present)
    if feats.elapsed:
        x[:, -1] = (first_row + np.arange(len(run.lines))) / ELAPSED_SCALE
    np.nan_to_num(x, copy=False, nan=0.0)
    return x


def window_target(lines: list[str], mode: str, max_lines: int) -> list[str] | None:
    """Target text(s) of one window: the line with the most rows (ties: the earliest), or with
    mode='lines' the distinct consecutive lines, at most max_lines. None if no row is labelled."""
    labelled = [t for t in lines if t]
    if not labelled:
        return None
    if mode == "lines":
        seq = [t for i, t in enumerate(labelled) if i == 0 or t != labelled[i - 1]]
        return seq[:max_lines]
    counts = Counter(labelled)
    best = max(counts.values())
    return [next(t for t in labelled if counts[t] == best)]


def encode_target(texts: list[str], vocab: Vocab, max_len: int) -> list[int]:
    """BOS + tokens of each line + EOS, cut to max_len (EOS kept last) and PAD-filled."""
    ids = [i for text in texts for i in vocab.encode(text)[1:-1]]
    ids = [BOS, *ids[: max_len - 2], EOS]
    return ids + [PAD] * (max_len - len(ids))


def build_split(runs: list[RecordedRun], feats: Features, vocab: Vocab, data_cfg,
                keep: dict[str, set[int]] | None = None) -> Split:
    """Window every run and stack the results; one code path for train, val, test and eval.
    `keep` (split_by=window): run name -> the window starts of this split; others are left out."""
    rows, starts, lo, hi, targets, files, counts, row_targets, lengths, row_lines = ([] for _ in range(10))
    offset = 0
    w, stride, mode, max_lines, max_len = (data_cfg[k] for k in ("window", "stride", "target", "max_lines", "max_len"))
    for run in runs:
        n = len(run.lines)
        if n < w:
            raise DataError(f"{run.name}: {n} rows, fewer than one window (data.window={w})")
        made = 0
        for s in range(0, n - w + 1, stride):
            if keep is not None and s not in keep[run.name]:
                continue
            texts = window_target(run.lines[s : s + w], mode, max_lines)
            if texts is None:
                continue
            starts.append(offset + s)
            lo.append(offset)
            hi.append(offset + n - w)
            targets.append(encode_target(texts, vocab, max_len))
            lengths.append(2 + sum(len(vocab.encode(t)) - 2 for t in texts))
            made += 1
        rows.append(run_inputs(run, feats))
        row_targets.append(encode_rows(run.lines, vocab, max_len))
        ids = {t: line_id(t) for t in set(run.lines)}
        row_lines.append(np.fromiter((ids[t] for t in run.lines), dtype=np.int64, count=len(run.lines)))
        files.append(run.name)
        counts.append(made)
        offset += n
    return Split(
        rows=torch.from_numpy(np.concatenate(rows)),
        starts=torch.tensor(starts, dtype=torch.long),
        lo=torch.tensor(lo, dtype=torch.long),
        hi=torch.tensor(hi, dtype=torch.long),
        targets=torch.tensor(targets, dtype=torch.long).reshape(-1, max_len),
        files=files,
        file_windows=counts,
        row_targets=torch.from_numpy(np.concatenate(row_targets)),
        row_lines=torch.from_numpy(np.concatenate(row_lines)),
        target_lengths=torch.tensor(lengths, dtype=torch.long),
    )


def line_id(text: str) -> int:
    """A number naming a line's text (0: no line). Two texts may share their tokens (numbers in one
    bucket) but a window's target is the text with the most rows, so rows are also told apart by text."""
    return zlib.crc32(text.encode()) + 1 if text else 0


def encode_rows(lines: list[str], vocab: Vocab, max_len: int) -> np.ndarray:
    """int16 [rows, max_len]: each row's own line as a target (all PAD where the row has none), so
    models can learn which line every row executes, not only the window's."""
    texts = list(dict.fromkeys(lines))
    where = {t: i for i, t in enumerate(texts)}
    table = np.array([encode_target([t], vocab, max_len) if t else [PAD] * max_len for t in texts], dtype=np.int16)
    return table.reshape(-1, max_len)[np.fromiter((where[t] for t in lines), dtype=np.int64, count=len(lines))]


# --- reading many files -----------------------------------------------------------------------------
def read_runs(paths: list[Path], data_cfg, cache: Path | None = None,
              hashes: dict[Path, str] | None = None) -> tuple[list[RecordedRun], list[dict]]:
    """Read files, `data.workers` processes at once; with a `cache` folder, a file read before (same
    bytes) is loaded from it instead, and newly read files are added once every file passed. With
    data.on_error=skip, unusable files are skipped (warned and returned as records). What a file's
    reading fixed by a rule is warned about here, once per file (RecordedRun.warnings)."""
    twice = same_recording_twice(paths)
    if cache and hashes is None:
        hashes = file_hashes(paths)
    entries = {p: recording_entry(cache, p, hashes[p], data_cfg.max_nonfinite) for p in paths} if cache else {}
    known = {p: run for p in paths if p not in twice and (run := load_recording(entries.get(p))) is not None}
    unread = [p for p in paths if p not in twice and p not in known]
    fresh = dict(zip(unread, read_files(unread, data_cfg.max_nonfinite, data_cfg.get("workers", 0)), strict=True))
    runs, skipped = [], []
    for path in paths:
        try:
            run = known.get(path) or fresh.get(path) or DataError(twice[path])
            if isinstance(run, DataError):
                raise run
            check_windows(run, path, data_cfg)
            runs.append(run)
        except DataError as e:
            if data_cfg.on_error != "skip":
                raise
            log.warning("skipping %s", e)
            skipped.append({"file": path.name, "error": str(e)})
            continue
        for note in run.warnings:
            log.warning("%s", note)
    for path, run in fresh.items():
        if cache and isinstance(run, RecordedRun):
            save_recording(run, entries[path])
    return runs, skipped


def read_files(paths: list[Path], max_nonfinite: float, workers: int) -> list[RecordedRun | DataError]:
    """Each file read, or why it cannot be; by `workers` processes (0: one per core) when the files hold
    PARALLEL_BYTES or more, else in this process."""
    n = min(workers or cores(), len(paths))
    small = sum(p.stat().st_size for p in paths if p.is_file()) < PARALLEL_BYTES
    if n <= 1 or small or multiprocessing.current_process().daemon:  # a pool's worker may not start processes
        return [read_or_error(p, max_nonfinite) for p in paths]
    try:
        with ProcessPoolExecutor(n, mp_context=POOL_CONTEXT) as pool:
            return list(pool.map(read_or_error, paths, repeat(max_nonfinite)))
    except BrokenProcessPool:  # a reading process was killed (out of memory?): what it did is lost, not the run
        log.warning("a process reading recordings died (killed, out of memory?); reading the %d files in this "
                    "process instead (data.workers=1 does so from the start)", len(paths))
        return [read_or_error(p, max_nonfinite) for p in paths]


def cores() -> int:
    """CPU cores this process may use (a container's or taskset's share, not the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def read_or_error(path: Path, max_nonfinite: float) -> RecordedRun | DataError:
    try:
        return read_run(path, max_nonfinite)
    except DataError as e:
        return e


def same_recording_twice(paths: list[Path]) -> dict[Path, str]:
    """`x_aligned.csv` beside `x_aligned.csv.gz`: which one is the run? Each such path -> why it is refused."""
    by_name: dict[str, list[Path]] = {}
    for path in paths:
        by_name.setdefault(run_name(path)[0], []).append(path)
    return {path: f"{', '.join(map(str, same))}: the same recording twice (each reads as run '{name}'); keep one"
            for name, same in by_name.items() if len(same) > 1 for path in same}


def with_every_channel(runs: list[RecordedRun], skipped: list[dict], groups: list[str],
                       data_cfg) -> list[RecordedRun]:
    """A recording without a controller or motor channel the others have is refused, as task=eval and
    task=predict refuse it (an input read as its mean would be a guess); data.on_error=skip skips it.
    IMU boards may be absent: their presence flag says so."""
    wanted = {c for r in runs for c in r.columns if channel_group(c) in groups and channel_group(c) != "boards"}
    kept = []
    for r in runs:
        missing = sorted(wanted - set(r.columns))
        if not missing:
            kept.append(r)
            continue
        error = DataError(f"{r.path}: lacks channels the other recordings have: {', '.join(missing[:5])}")
        if data_cfg.on_error != "skip":
            raise error
        log.warning("skipping %s", error)
        skipped.append({"file": Path(r.path).name, "error": str(error)})
    return kept


def check_windows(run: RecordedRun, path: Path, data_cfg) -> None:
    """A file must give at least one window with a labelled row (the windows build_split makes)."""
    n, w, stride = len(run.lines), data_cfg.window, data_cfg.stride
    if n < w:
        raise DataError(f"{path}: {n} rows, fewer than one window (data.window={w})")
    labelled = np.concatenate([[0], np.cumsum([bool(t) for t in run.lines])])
    starts = np.arange(0, n - w + 1, stride)
    if not (labelled[starts + w] > labelled[starts]).any():
        raise DataError(f"{path}: no window holds a labelled row (its {labelled[-1]} rows with a gcode_string "
                        f"fall outside the windows of data.window={w}, data.stride={stride})")


# --- the prepared dataset and its cache ---------------------------------------------------------------
@dataclass
class Prepared:
    splits: dict[str, Split]
    vocab: Vocab
    features: Features
    summary: dict


def prepared_key(paths: list[Path], hashes: dict[Path, str], cfg) -> str:
    """The prepared dataset's cache key: the folder read, as spelled and resolved (a cache hit's summary
    and messages name exactly the folder this run read), the data config and every file's name and bytes."""
    h = hashlib.sha256(f"v{CACHE_VERSION}".encode())
    keys = {k: cfg.data[k] for k in cfg.data if k not in NOT_IN_KEY
            and not (k in SPLIT_DEFAULTS and (cfg.data[k] or 0) == SPLIT_DEFAULTS[k])}  # older caches stay valid
    h.update(json.dumps([keys, dict(cfg.vocab), dict(cfg.features)], sort_keys=True, default=str).encode())
    h.update(f"{Path(cfg.data.dir)}\0{Path(cfg.data.dir).resolve()}".encode())
    for p in paths:
        h.update(f"{p.name}\0{hashes[p]}".encode())
    return h.hexdigest()[:24]


def save_prepared(prepared: Prepared, cfg, path: Path) -> None:
    """The prepared data, split by split, as one memory-mappable entry. A cache that cannot be written
    (disk full) is a warning: this run goes on without it."""
    from omegaconf import OmegaConf

    blob = {
        "splits": {k: v.stored() for k, v in prepared.splits.items()},
        "vocab": prepared.vocab.to_dict(),
        "features": vars(prepared.features),
        "summary": prepared.summary,
        "config": OmegaConf.to_container(cfg.data),
    }
    try:
        save_entry(blob, path)
    except OSError as e:
        cache_off(Path(cfg.data.cache_dir), e)


def load_prepared(path: Path) -> Prepared | None:
    """The cached data, its tensors mapped from disk, or None if there is none; a damaged entry is
    warned about, never trusted, and rebuilt by the caller."""
    try:
        blob = load_entry(path)
    except (DamagedEntry, OSError) as e:
        log.warning("ignoring unreadable cache %s (%s); rebuilding it", path, e)
        return None
    if blob is None:
        return None
    splits = {k: Split(**v) for k, v in blob["splits"].items()}
    for split in splits.values():
        split.rows_file = row_file(path, split.rows)
    return Prepared(splits=splits, vocab=Vocab.from_dict(blob["vocab"]), features=Features(**blob["features"]),
                    summary=blob["summary"])


def prepare(cfg) -> Prepared:
    """Read, split, fit and window the data of `cfg.data.dir`, or load it from the cache."""
    paths, ignored = find_recordings(cfg.data.dir, cfg.data.pattern)
    hashes = file_hashes(paths) if cfg.data.cache_dir else {}
    cache = Path(cfg.data.cache_dir) / f"{prepared_key(paths, hashes, cfg)}.pt" if cfg.data.cache_dir else None
    cached = load_prepared(cache) if cache else None
    if cached is not None:
        log.info("data cache hit: %s", cache)
        for s in cached.summary["skipped_files"]:  # the warnings of the run that built it, again
            log.warning("skipping %s", s["error"])
        for w in cached.summary["file_warnings"]:
            log.warning("%s", w["warning"])
        cached.summary["ignored_files"] = ignored  # not part of the key: what the folder holds now
        if cfg.data.split_by == "window":
            log.warning("%s", WINDOW_WARNING)
        return cached
    folder = writable_folder(cfg.data.cache_dir)
    runs, skipped = read_runs(paths, cfg.data, folder, hashes)
    runs = with_every_channel(runs, skipped, list(cfg.features.groups), cfg.data)
    if cfg.data.split_by == "window":  # every file in every split; each split keeps its own windows
        keep, split_info = split_windows(runs, cfg.data)
        parts = {name: [r for r in runs if r.name in keep[name]] for name in SPLITS}
        fit_on = [covered_rows(r, keep["train"][r.name], cfg.data.window) for r in parts["train"]]
    else:
        parts, split_info = split_runs(runs, cfg.data)
        keep, fit_on = None, parts["train"]
    vocab = Vocab.build((t for r in fit_on for t in r.lines if t), cfg.vocab.digits)
    feats = fit_features(fit_on, list(cfg.features.groups), cfg.features.board_flags, cfg.features.elapsed)
    splits = {name: build_split(parts[name], feats, vocab, cfg.data, keep[name] if keep else None) for name in SPLITS}
    oddities = {k: sum(getattr(r, k) for r in runs) for k in ("nonfinite_cells", "silent_rows", "unparsed_chunks")}
    listing = {"skipped_files": skipped, "ignored_files": ignored,
               "file_warnings": [{"file": Path(r.path).name, "warning": w} for r in runs for w in r.warnings]}
    summary = data_summary(splits, vocab, feats, listing, oddities, cfg)
    summary["split"] = split_info
    prepared = Prepared(splits=splits, vocab=vocab, features=feats, summary=summary)
    if folder:
        save_prepared(prepared, cfg, cache)
        return load_prepared(cache) or prepared  # trained from the map like a cache hit; the copies are freed
    return prepared


def data_summary(splits: dict[str, Split], vocab: Vocab, feats: Features, listing: dict, oddities: dict, cfg) -> dict:
    """The facts a reader checks first: which files went where, how many windows, vocabulary, channels.
    `listing`: skipped_files (unusable), ignored_files (not recordings), file_warnings (read by a rule)."""
    out = {
        "data_dir": str(cfg.data.dir),
        "vocab_size": len(vocab),
        "vocab_digits": vocab.digits,
        "token_counts_by_type": vocab.type_counts(),
        "n_channels": len(feats.channels),
        "n_board_flags": len(feats.boards),
        "feature_groups": list(cfg.features.groups),
        "channels": feats.channels,
        **listing,
        "nonfinite_cells_filled": oddities["nonfinite_cells"],  # read as the channel's training mean
        "silent_rows_dropped": oddities["silent_rows"],  # rows where every sensor column was empty
        "unparsed_chunks_dropped": oddities["unparsed_chunks"],  # G-code text the tokenizer could not read
    }
    for name, split in splits.items():
        t = split.targets[:, 1:]
        unk = int((t == UNK).sum())
        out[name] = {
            "files": split.files,
            "windows": len(split),
            "oov_rate": unk / max(int((t != PAD).sum()), 1),
            "distinct_target_lines": len({tuple(r.tolist()) for r in split.targets}),
            "targets_cut_share": float((split.target_lengths > cfg.data.max_len).float().mean()) if len(split) else 0.0,
            "longest_target": int(split.target_lengths.max()) if len(split) else 0,
        }
    return out
