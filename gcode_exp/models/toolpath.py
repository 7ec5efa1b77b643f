"""Toolpath reconstruction: the G-code lines of a program never seen, read from the work position.

A reference (nearest, align) can only answer lines it has seen; a shop's new program has none. With the
controller's work position among the inputs (features=all), the lines can be rebuilt from geometry: the
G-code's X/Y/Z words are end points in that frame. Rows come at ~4 Hz while a line may last one row or
forty, so the move each row is on is read from the path around it:

- A **straight move** is a run of rows each on the chord of its neighbours (within `line_tol`). Its line
  ends where the path leaves it, which falls between two samples: at the corner with the next straight
  move, brought back by the fillet that rounds the corner where the path per row shows one (the machine
  keeps its pace, so a rounded corner is crossed in fewer rows than a sharp one), or at the point where a
  circle tangent to the move meets the samples on the arc after it (a U-turn: the arc joins two parallel
  passes; a fillet: the arc is tangent to both moves). The line names the axes that change along the move,
  and `G1` after an arc (the mode was G2/G3).
- Any **other row** (short moves, one or two rows each, as in a pocket's spiral) is its own line, ending
  where the row is: the controller reports the line it is finishing.

A window is answered with the line holding most of its rows, as its target is defined. Nothing is
trained; fitting keeps where the work position is among the inputs and how it was normalised. Not
rebuilt (measured in docs/RESULTS.md): arcs' own lines (G2/G3 with R), rapid moves (G0), feed words (F),
and anything without the work position (features=side_channel).
"""

from __future__ import annotations

import numpy as np
import torch

from gcode_exp.config import ConfigError, Float
from gcode_exp.data.windows import Features, Split, encode_target
from gcode_exp.models.base import Answer, Reference, Windows
from gcode_exp.models.nearest import POSITION, most_rows


class ToolpathModel(Reference):
    """Where the work position is among the inputs, and its scale; the lines come from `reconstruct`."""

    rules = {"line_tol": Float(gt=0), "still": Float(ge=0), "written": Float(ge=0, lt=1), "min_cut": Float(ge=0),
             "pace_change": Float(ge=0)}

    def __init__(self, cfg, vocab, max_len: int, **shapes):
        super().__init__()
        self.cfg, self.vocab, self.max_len = cfg, vocab, max_len
        for name in ("columns", "mean", "std"):
            self.register_buffer(name, torch.zeros(0))
        self.register_buffer("lines", torch.zeros(0, max_len, dtype=torch.long))  # no fixed table of lines

    def fit(self, split: Split, feats: Features, window: int) -> None:
        if not all(c in feats.channels for c in POSITION):
            raise ConfigError(f"model=toolpath: needs the inputs {', '.join(POSITION)} (features=all), which these "
                              "features lack")
        self.columns = torch.tensor([feats.channels.index(c) for c in POSITION])
        self.mean = torch.tensor([feats.mean[int(i)] for i in self.columns], dtype=torch.float64)
        self.std = torch.tensor([feats.std[int(i)] for i in self.columns], dtype=torch.float64)

    def brief(self) -> str:
        return "toolpath from the work position (nothing kept of the training data)"

    @torch.no_grad()
    def predict(self, windows: Windows, batch_size: int = 256) -> Answer:
        if not len(windows):
            return Answer(torch.zeros(0, self.max_len - 1, dtype=torch.long), torch.zeros(0))
        row_texts = {a: reconstruct((windows.gather(torch.arange(a, b))[:, self.columns].double() * self.std
                                     + self.mean).numpy(), self.cfg)
                     for a, b in torch.unique(torch.stack([windows.first, windows.end], 1), dim=0).tolist()}
        texts = list(dict.fromkeys(t for rows in row_texts.values() for t in rows if t))
        ids = {t: i for i, t in enumerate(texts)} | {"": len(texts)}  # a standing machine's row: no line
        row_ids = {a: torch.tensor([ids[t] for t in rows]) for a, rows in row_texts.items()}
        steps = torch.arange(windows.length)
        rows = torch.stack([row_ids[f][s - f + steps] for s, f in zip(windows.starts.tolist(), windows.first.tolist(),
                                                                      strict=True)])
        best = most_rows(rows, none=len(texts))
        table = torch.tensor([encode_target([t], self.vocab, self.max_len) for t in [*texts, ""]], dtype=torch.long)
        return Answer(table[best][:, 1:], (rows == best[:, None]).float().mean(1))

    def answer(self, x: torch.Tensor) -> Answer:
        """Windows without their recording: each read on its own."""
        n, w = x.shape[:2]
        flat, starts = x.reshape(n * w, -1), torch.arange(0, n * w, w)
        return self.predict(Windows(lambda i: flat[i], starts, starts, starts + w, w))


def reconstruct(P: np.ndarray, cfg) -> list[str]:
    """[T, 3] work positions of one recording -> each row's line (G-code text, values to 4 decimals)."""
    T = len(P)
    ends, starts = P.copy(), P.copy()  # a row of its own ends where it is
    moving = np.zeros(T, dtype=bool)
    g_word = [""] * T
    runs = straight_runs(P, cfg.line_tol, cfg.still)
    after_arc = False
    for i, (a, b) in enumerate(runs):
        end, arc = move_end(P, (a, b), runs[i + 1] if i + 1 < len(runs) else None, cfg)
        ends[a : b + 1], starts[a : b + 1], moving[a : b + 1] = end, P[a], True
        g_word[a : b + 1] = ["G1 " if after_arc else ""] * (b + 1 - a)
        after_arc = arc
    for t in np.flatnonzero(~moving[1:]) + 1:  # ... and starts where the move before it ended
        starts[t] = ends[t - 1]
    out = []
    for t in range(T):
        change = ends[t] - starts[t]
        least = max(cfg.still, cfg.written * float(np.linalg.norm(change)) if moving[t] else 0.0)
        words = [f"{axis}{ends[t, k]:.4f}" for k, axis in enumerate("XYZ") if abs(change[k]) > least]
        out.append(g_word[t] + " ".join(words) if words else "")
    return out


def straight_runs(P: np.ndarray, line_tol: float, still: float) -> list[tuple[int, int]]:
    """(first, last) rows of each straight move: rows whose every inner row lies within `line_tol` of the
    chord between its neighbours, strictly between them, the machine moving."""
    a, m, b = P[:-2], P[1:-1], P[2:]
    chord = b - a
    length = np.linalg.norm(chord, axis=1)
    unit = chord / np.maximum(length, 1e-12)[:, None]
    along = ((m - a) * unit).sum(1)
    off = np.linalg.norm(m - a - along[:, None] * unit, axis=1)
    inner = (length > still) & (off < line_tol) & (along > 0) & (along < length)  # inner[i]: row i + 1
    edges = np.diff(np.concatenate([[0], inner.astype(np.int8), [0]]))
    return [(int(s), int(e) + 1) for s, e in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True)]


def move_end(P: np.ndarray, run: tuple[int, int], following: tuple[int, int] | None, cfg) -> tuple[np.ndarray, bool]:
    """Where the straight move on rows `run` ends, and whether an arc follows it (the next line says G1)."""
    a, b = run
    u = unit(P[b] - P[a])
    if following is None:
        return P[b], False
    c, d = following
    u2 = unit(P[d] - P[c])
    if c > b + 1:  # samples on whatever joins the two moves: an arc tangent to this one, or not read
        e = tangent_arc_end(P[b], u, P[b + 1 : c], P[c], u2)
        return (P[b] + e * u, True) if e is not None else (P[b], False)
    # the moves meet between two rows: at their corner, if the machine can have passed it in one row
    s = corner(P[b], u, P[c], u2)
    pace = np.median(np.linalg.norm(np.diff(P[a : b + 1], axis=0), axis=1))  # path per row
    pace_after = np.median(np.linalg.norm(np.diff(P[c : d + 1], axis=0), axis=1))
    k = P[b] + (s or 0.0) * u
    sharp = np.linalg.norm(k - P[b]) + np.linalg.norm(P[c] - k)  # the path past a sharp corner
    if s is None or s < -cfg.line_tol or sharp > 2 * max(pace, pace_after):
        return P[b], False
    # ... and how much of it a fillet cut off, where the pace holds: a rounded corner is a shorter path
    theta = float(np.arccos(np.clip(u @ u2, -1, 1)))  # the turn
    if abs(pace_after - pace) <= cfg.pace_change * pace and 1e-3 < theta < np.pi - 1e-3:
        radius = max((sharp - pace) / (2 * np.tan(theta / 2) - theta), 0.0)
        cut = min(radius * np.tan(theta / 2), s)
        if cut > cfg.min_cut:
            return P[b] + (s - cut) * u, True
    return P[b] + s * u, False


def tangent_arc_end(p: np.ndarray, u: np.ndarray, arc: np.ndarray, q: np.ndarray, u2: np.ndarray) -> float | None:
    """How far past `p` along `u` a circle tangent to the move leaves it, from samples `arc` on the circle
    (median over them); the circle is also tangent to the next move (through `q` along `u2`). None where
    the moves are parallel the same way, or no sample fits."""
    found = []
    if u @ u2 < -0.999:  # a U-turn: a half circle between parallel passes, its radius half their distance
        gap = q - p
        radius = np.linalg.norm(gap - (gap @ u) * u) / 2
        for x in arc:
            w = x - p
            h = np.linalg.norm(w - (w @ u) * u)
            if 0 < h and 2 * radius * h >= h * h:
                found.append(w @ u - np.sqrt(2 * radius * h - h * h))
    elif abs(u @ u2) < 0.999:  # a fillet: centred on the bisector of the corner k
        s = corner(p, u, q, u2)
        if s is None:
            return None
        k = p + s * u
        normal = unit(u2 - (u2 @ u) * u)
        slope = 1 / np.tan(np.arccos(np.clip(u @ u2, -1, 1)) / 2)  # radius per unit cut off the move
        limit = min(s, np.linalg.norm(q - k))
        for x in arc:
            w = x - k  # |w + cut (u - slope normal)| = cut slope: a quadratic in the cut
            half_b = w @ (u - slope * normal)
            disc = half_b * half_b - w @ w
            if disc >= 0:
                cuts = [r for r in (-half_b - np.sqrt(disc), -half_b + np.sqrt(disc)) if 0 <= r <= limit]
                if cuts:
                    found.append(s - max(cuts))
    return float(np.median(found)) if found else None


def corner(p: np.ndarray, u: np.ndarray, q: np.ndarray, u2: np.ndarray) -> float | None:
    """How far along `u` from `p` the line through `p` comes nearest the line through `q` along `u2` (where
    two moves meet); None for parallel lines."""
    w, cos = p - q, u @ u2
    if 1 - cos * cos < 1e-6:
        return None
    return float((cos * (u2 @ w) - u @ w) / (1 - cos * cos))


def unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-12)
