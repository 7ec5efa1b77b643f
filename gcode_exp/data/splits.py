"""Which recordings go to train, val and test: file, program-family and window splits, and their folds.

Files, not windows, are split (except under the leaky data.split_by=window, kept to measure its
inflation), because neighbouring windows overlap by 75 %.
"""

from __future__ import annotations

import logging
import random
import re
from dataclasses import replace

import numpy as np

from gcode_exp.data.read import DataError, RecordedRun

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
WINDOW_WARNING = ("data.split_by=window: windows of one recording are shuffled across train, val and test and "
                  "overlap their neighbours, so these numbers measure memorised recordings, not generalisation "
                  "to a new run (kept only to measure that inflation)")


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
