"""Windows -> rows: each row's line, voted by the windows that cover it (task=predict, live mode, task=serve).

A trained model names the line of a *window*; a recording needs a line per *row*. Every row is
covered by up to window/stride overlapping windows, and the row takes the line those windows vote
for (`vote`). A window votes with its confidence (the product of the decoder's per-step probabilities
of the greedy tokens: the model's probability of the whole line), weighted by where the row sits in it:
the window's target is the line with the most rows, and a line holding most rows of a window covers
its centre, so a window knows the line of its central rows best and of its edge rows least (weights
rise linearly from the edges to the centre, never to 0). A row's probability is its line's weighted
vote over the weights of all windows covering it, so a row all windows agree on at p=0.9 gets 0.9, and
disagreement lowers it. Averaging whole token distributions instead is not possible: windows decode
different token sequences, so only the decoded lines can be compared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class Guess:
    """One window's answer: the line the model names for it, and how sure it is."""

    start: int  # first row of the window
    line: str  # decoded G-code text (numbers at bucket centres)
    p: float  # product of the per-step probabilities of the greedy tokens
    rows: np.ndarray | None = None  # row-head probabilities [window, n_lines + 1], where the model has one
    novelty: float | None = None  # share of the window's rows off every training path, where the model can tell


def window_starts(n: int, window: int, stride: int) -> list[int]:
    """The training windows' starts, plus one flush with the end so that the last rows are covered too."""
    if n < window:
        return []
    starts = list(range(0, n - window + 1, stride))
    return starts + [n - window] if starts[-1] != n - window else starts


def position_weights(window: int) -> np.ndarray:
    """1 at the centre, falling linearly to 1/ceil(window/2) at the edges (see the module docstring)."""
    i = np.arange(window)
    return (np.minimum(i, window - 1 - i) + 1) / math.ceil(window / 2)


@dataclass
class RowVote:
    """One row's answer: its line and probability, and the second answer of the same distribution."""

    line: str
    p: float
    runner_up: str  # the second answer, from the distribution `p` comes from; "" when it gives no other any
    runner_up_p: float  # <= p


def vote(n_rows: int, guesses: list[Guess], window: int) -> list[RowVote]:
    """Each row's line: the one with the largest sum of confidence x position weight over the windows
    covering it; p = that sum over the sum of their position weights. Ties: the line voted first."""
    k = position_weights(window)
    scores: list[dict[str, float]] = [{} for _ in range(n_rows)]
    weight = np.zeros(n_rows)
    for g in guesses:
        for i in range(window):
            row = scores[g.start + i]
            row[g.line] = row.get(g.line, 0.0) + g.p * k[i]
        weight[g.start : g.start + window] += k
    out = []
    for row, w in zip(scores, weight):
        ranked = sorted(row.items(), key=lambda kv: -kv[1])  # stable: ties keep the order of voting
        top = ranked[0] if ranked else ("", 0.0)
        second = ranked[1] if len(ranked) > 1 else ("", 0.0)
        out.append(RowVote(top[0], top[1] / w if w else 0.0, second[0], second[1] / w if w else 0.0))
    return out


def row_head_answers(votes: list[RowVote], guesses: list[Guess], lines: list[str], window: int) -> list[RowVote]:
    """Where the model has a row head, it names each row's line itself: its probabilities averaged over
    the windows covering the row (weighted like the vote). A row it gives to a training line takes that
    line; a row it calls "another line" keeps the window vote's answer, the decoder's, which can be new.

    `p` and the runner-up's `p` come from one distribution, so runner_up_p <= p and their sum <= 1: the
    row head's where it names the line, the vote's where the vote's answer stands. The runner-up is the
    head's next most probable class; its "another line" class is named by the decoder's line where that
    is not a training line (and passed over where it names none); "" where no other class has any."""
    if not guesses or guesses[0].rows is None:
        return votes
    k = position_weights(window)[:, None]
    total = np.zeros((len(votes), len(lines) + 1))
    for g in guesses:
        total[g.start : g.start + window] += k * g.rows
    total /= np.maximum(total.sum(1, keepdims=True), 1e-12)
    known = set(lines)
    out = []
    for v, probs in zip(votes, total):
        order = np.argsort(-probs, kind="stable")  # ties: the earlier class
        best = int(order[0])
        if best == len(lines):
            out.append(v)
            continue
        runner_up, runner_up_p = "", 0.0
        for j in order[1:]:
            if probs[j] <= 0:
                break
            name = lines[j] if j < len(lines) else (v.line if v.line and v.line not in known else "")
            if name:
                runner_up, runner_up_p = name, float(probs[j])
                break
        out.append(RowVote(lines[best], float(probs[best]), runner_up, runner_up_p))
    return out
