"""What a model sees of a split: normalised input rows (channels fitted on training files), the windows
over them and each window's target tokens.

Rows with an empty `gcode_string` keep their sensor values but carry no label: they never vote for
a window's target, and a window with no labelled row at all is dropped.
"""

from __future__ import annotations

import zlib
from collections import Counter
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from gcode_exp.data.cache import RowFile
from gcode_exp.data.read import DataError, RecordedRun, board_columns, channel_group
from gcode_exp.data.vocab import BOS, EOS, PAD, Vocab

ELAPSED_SCALE = 1000.0  # features.elapsed: rows per unit of the elapsed input (~4 min at 3.9 Hz)


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

def fit_features(train: list[RecordedRun], groups: list[str], board_flags: bool, elapsed: bool = False) -> Features:
    """Channel list (union over training files) and per-channel mean/std from training rows."""
    channels = sorted({c for r in train for c in r.columns if channel_group(c) in groups})
    if not channels:
        raise DataError(f"no training file has a column of features.groups={groups}")
    boards = list(board_columns(channels)) if board_flags else []
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
    has = board_columns(run.columns)
    for k, board in enumerate(feats.boards):  # per row, a value in one of its columns: a failed board's are empty
        x[:, len(feats.channels) + k] = np.isfinite(run.values[:, has[board]]).any(1) if board in has else 0.0
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
