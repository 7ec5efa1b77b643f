"""Which program a recording, or each stretch of it, ran: the recognised lines against the lines each
training operation executes (multinomial naive Bayes). A recording that starts mid-job still names its
program; one that holds several jobs is cut into segments where the program of its rows changes."""

from __future__ import annotations

import logging
import math
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gcode_exp.data.read import run_name
from gcode_exp.data.vocab import Vocab

if TYPE_CHECKING:
    from gcode_exp.training.checkpoint import Checkpoint

log = logging.getLogger(__name__)


def op_line_counts(ckpt: Checkpoint, vocab: Vocab) -> dict[str, Counter]:
    """Per training operation: how many training windows have each target line (from the checkpoint's
    `train_windows`, the training split's files, windows per file and targets)."""
    train = ckpt.train_windows
    counts: dict[str, Counter] = {}
    row = 0
    for name, n in zip(train["files"], train["file_windows"]):
        op = run_name(Path(name))[1]
        lines = [vocab.decode(t[1:]) for t in train["targets"][row : row + n].tolist()]
        counts.setdefault(op, Counter()).update(lines)
        row += n
    return counts


def name_program(lines: list[str], counts: dict[str, Counter], overlap: float, alpha: float = 1.0
                 ) -> list[tuple[str, float]]:
    """(operation, probability), most probable first: naive Bayes with a uniform prior and Laplace
    smoothing over the windows' predicted lines. Overlapping windows repeat the same evidence, so the
    log-likelihood is divided by the overlap (window/stride) before the softmax."""
    known = set().union(*counts.values(), lines)
    score = {}
    for op, c in counts.items():
        total = sum(c.values()) + alpha * (len(known) + 1)
        score[op] = sum(math.log((c[t] + alpha) / total) for t in lines) / overlap
    top = max(score.values())
    z = sum(math.exp(s - top) for s in score.values())
    return sorted(((op, math.exp(s - top) / z) for op, s in score.items()), key=lambda kv: -kv[1])


def row_programs(lines: list[str], counts: dict[str, Counter], rows: int, per_row: float, alpha: float = 1.0
                 ) -> tuple[list[str], np.ndarray]:
    """Each row's program and its probability: naive Bayes over the lines of the `rows` rows centred on it
    (each row's evidence weighted `per_row`: neighbouring rows repeat a line), so that where a second job
    starts the rows after it name the second program."""
    ops = sorted(counts)
    known = set().union(*counts.values(), lines)
    logp = np.empty((len(lines), len(ops)))
    for j, op in enumerate(ops):
        c, total = counts[op], sum(counts[op].values()) + alpha * (len(known) + 1)
        table = {t: math.log((c[t] + alpha) / total) for t in set(lines)}
        logp[:, j] = [table[t] for t in lines]
    cum = np.vstack([np.zeros(len(ops)), np.cumsum(logp, axis=0)])
    lo = np.clip(np.arange(len(lines)) - rows // 2, 0, len(lines))
    hi = np.clip(np.arange(len(lines)) + (rows + 1) // 2, 0, len(lines))
    score = (cum[hi] - cum[lo]) * per_row
    score -= score.max(1, keepdims=True)
    p = np.exp(score)
    p /= p.sum(1, keepdims=True)
    best = p.argmax(1)
    return [ops[i] for i in best], p[np.arange(len(lines)), best]


def segments(programs: list[str], p: np.ndarray, min_rows: int) -> list[dict]:
    """Runs of rows of one program, a run shorter than `min_rows` absorbed by the one before it (or after,
    at the start): [{first_row, last_row, program, p (mean over its rows)}]."""
    runs: list[list] = []
    for i, prog in enumerate(programs):
        if runs and runs[-1][2] == prog:
            runs[-1][1] = i
        else:
            runs.append([i, i, prog])
    merged: list[list] = []
    for run in runs:
        if merged and (run[1] - run[0] + 1 < min_rows or merged[-1][2] == run[2]):
            merged[-1][1] = run[1]
        elif merged and merged[-1][1] - merged[-1][0] + 1 < min_rows:
            merged[-1] = [merged[-1][0], run[1], run[2]]
        else:
            merged.append(list(run))
    return [{"first_row": a, "last_row": b, "program": prog, "p": float(p[a : b + 1].mean())}
            for a, b, prog in merged]
