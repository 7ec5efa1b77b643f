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
import os
import random
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gcode_exp.data.read import DataError, Run, channel_group, list_runs, read_run
from gcode_exp.data.vocab import BOS, EOS, PAD, UNK, Vocab

log = logging.getLogger(__name__)
CACHE_VERSION = 2  # bump when what is cached changes
SPLITS = ("train", "val", "test")


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

    def __len__(self) -> int:
        return len(self.starts)


@dataclass
class Features:
    """What a checkpoint needs to turn new recordings into inputs exactly like its training data."""

    channels: list[str]  # sensor columns, in input order
    boards: list[str]  # one presence flag each, appended after the channels (empty: no flags)
    mean: list[float]
    std: list[float]

    @property
    def n_inputs(self) -> int:
        return len(self.channels) + len(self.boards)


# --- splitting -----------------------------------------------------------------------------------
def split_files(runs: list[Run], fractions: tuple[float, float, float], seed: int) -> dict[str, list[Run]]:
    """Seeded split of whole files, stratified by operation type.

    Each operation with at least 3 files gives round(n * frac) files (at least 1) to val and test;
    operations with fewer files are pooled and split the same way, so tiny samples still get all splits.
    """
    rng = random.Random(seed)
    by_op: dict[str, list[Run]] = {}
    for run in sorted(runs, key=lambda r: r.name):
        by_op.setdefault(run.op, []).append(run)
    groups = [g for g in by_op.values() if len(g) >= 3]
    pool = [r for g in by_op.values() if len(g) < 3 for r in g]
    if pool:
        groups.append(pool)
    out: dict[str, list[Run]] = {s: [] for s in SPLITS}
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


# --- features and windows -----------------------------------------------------------------------
def fit_features(train: list[Run], groups: list[str], board_flags: bool) -> Features:
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
    return Features(channels=channels, boards=boards, mean=mean.tolist(), std=std.tolist())


def run_inputs(run: Run, feats: Features) -> np.ndarray:
    """[rows, n_inputs] normalised inputs; channels the run lacks (or cells it lost) read as 0 = mean."""
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


def build_split(runs: list[Run], feats: Features, vocab: Vocab, data_cfg) -> Split:
    """Window every run and stack the results; one code path for train, val, test and eval."""
    rows, starts, lo, hi, targets, files, counts = [], [], [], [], [], [], []
    offset = 0
    w, stride = data_cfg.window, data_cfg.stride
    for run in runs:
        n = len(run.lines)
        if n < w:
            raise DataError(f"{run.name}: {n} rows, fewer than one window (data.window={w})")
        made = 0
        for s in range(0, n - w + 1, stride):
            texts = window_target(run.lines[s : s + w], data_cfg.target, data_cfg.max_lines)
            if texts is None:
                continue
            starts.append(offset + s)
            lo.append(offset)
            hi.append(offset + n - w)
            targets.append(encode_target(texts, vocab, data_cfg.max_len))
            made += 1
        rows.append(run_inputs(run, feats))
        files.append(run.name)
        counts.append(made)
        offset += n
    return Split(
        rows=torch.from_numpy(np.concatenate(rows)),
        starts=torch.tensor(starts, dtype=torch.long),
        lo=torch.tensor(lo, dtype=torch.long),
        hi=torch.tensor(hi, dtype=torch.long),
        targets=torch.tensor(targets, dtype=torch.long).reshape(-1, data_cfg.max_len),
        files=files,
        file_windows=counts,
    )


# --- reading many files -----------------------------------------------------------------------------
def read_runs(paths: list[Path], data_cfg) -> tuple[list[Run], list[dict]]:
    """Read files; with data.on_error=skip, unusable ones are skipped (warned and returned as records)."""
    runs, skipped = [], []
    for path in paths:
        try:
            run = read_run(path, data_cfg.max_nonfinite)
            if len(run.lines) < data_cfg.window:
                raise DataError(f"{path}: {len(run.lines)} rows, fewer than one window (data.window={data_cfg.window})")
            runs.append(run)
        except DataError as e:
            if data_cfg.on_error != "skip":
                raise
            log.warning("skipping %s", e)
            skipped.append({"file": path.name, "error": str(e)})
    return runs, skipped


# --- the prepared dataset and its cache ---------------------------------------------------------------
@dataclass
class Prepared:
    splits: dict[str, Split]
    vocab: Vocab
    features: Features
    summary: dict


def _digest(paths: list[Path], cfg) -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION}".encode())
    keys = {k: cfg.data[k] for k in cfg.data if k not in ("dir", "cache_dir")}
    h.update(json.dumps([keys, dict(cfg.vocab), dict(cfg.features)], sort_keys=True, default=str).encode())
    for p in paths:
        h.update(p.name.encode())
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()[:24]


def atomic_torch_save(obj, path: Path) -> None:
    """Write to a temp file in the same folder and rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def prepare(cfg) -> Prepared:
    """Read, split, fit and window the data of `cfg.data.dir`, or load it from the cache."""
    from omegaconf import OmegaConf

    paths = list_runs(cfg.data.dir, cfg.data.pattern)
    cache = Path(cfg.data.cache_dir) / f"{_digest(paths, cfg)}.pt"
    if cfg.data.cache_dir and cache.exists():
        try:
            blob = torch.load(cache, weights_only=False)
            log.info("data cache hit: %s", cache)
            return Prepared(
                splits={k: Split(**v) for k, v in blob["splits"].items()},
                vocab=Vocab.from_dict(blob["vocab"]),
                features=Features(**blob["features"]),
                summary=blob["summary"],
            )
        except Exception as e:  # a damaged cache file is rebuilt, never trusted
            log.warning("ignoring unreadable cache %s (%s)", cache, e)
    runs, skipped = read_runs(paths, cfg.data)
    fractions = tuple(cfg.data.split)
    parts = split_files(runs, fractions, cfg.data.split_seed)
    vocab = Vocab.build((t for r in parts["train"] for t in r.lines if t), cfg.vocab.digits)
    feats = fit_features(parts["train"], list(cfg.features.groups), cfg.features.board_flags)
    splits = {name: build_split(parts[name], feats, vocab, cfg.data) for name in SPLITS}
    oddities = {k: sum(getattr(r, k) for r in runs) for k in ("nonfinite_cells", "silent_rows", "unparsed_chunks")}
    summary = summarize(splits, vocab, feats, skipped, oddities, cfg)
    if cfg.data.cache_dir:
        blob = {
            "splits": {k: vars(v) for k, v in splits.items()},
            "vocab": vocab.to_dict(),
            "features": vars(feats),
            "summary": summary,
            "config": OmegaConf.to_container(cfg.data),
        }
        atomic_torch_save(blob, cache)
    return Prepared(splits=splits, vocab=vocab, features=feats, summary=summary)


def summarize(splits: dict[str, Split], vocab: Vocab, feats: Features, skipped: list, oddities: dict, cfg) -> dict:
    """The facts a reader checks first: which files went where, how many windows, vocabulary, channels."""
    out = {
        "data_dir": str(cfg.data.dir),
        "vocab_size": len(vocab),
        "vocab_digits": vocab.digits,
        "token_counts_by_type": vocab.type_counts(),
        "n_channels": len(feats.channels),
        "n_board_flags": len(feats.boards),
        "feature_groups": list(cfg.features.groups),
        "channels": feats.channels,
        "skipped_files": skipped,
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
        }
    return out
