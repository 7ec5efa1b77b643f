"""Toolpath reconstruction: the G-code lines of a program never seen, read from the work position.

A reference (nearest, align) can only answer lines it has seen; a shop's new program has none. With the
controller's work position among the inputs (features=all), the lines can be rebuilt from geometry: the
G-code's X/Y/Z words are end points in that frame. Rows come at ~4 Hz while a line may last one row or
forty, so the move each row is on is read from the path around it:

- A **straight move** is a run of rows each on the chord of its neighbours (within `line_tol`). Its line
  ends where the path leaves it, which falls between two samples: on the circle of an arc that follows
  (where the move touches it), at the corner with the next straight move, brought back by the fillet that
  rounds the corner where the path per row shows one (the machine keeps its pace, so a rounded corner is
  crossed in fewer rows than a sharp one), or where a circle tangent to the move meets the samples on the
  turn after it (a U-turn between parallel passes, a fillet). Its line names the axes that change along
  it, `G0` where the feed reads 0, and the mode again after the joins `g_after` names.
- An **arc** is a run of rows at one height whose every three lie on one circle: its lines end on the
  circle's quarter points (G2 clockwise, G3 counterclockwise, with R), as CAM output splits arcs.
- Any **other row** (short moves, one or two rows each, as in a pocket's helix) is its own line, ending
  where the row is (the controller reports the line it is finishing); a row standing idle (feed 0) is the
  line the training rows report so (M30 in the shared runs).

A window is answered with the line holding most of its rows, as its target is defined; each row with its
own line. Nothing else is trained. Not rebuilt (docs/RESULTS.md): feed words (F), commands no path shows
(G53, M3, T), one straight move written as several lines, and anything without the work position
(features=side_channel).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gcode_exp.config import ConfigError
from gcode_exp.data.windows import Features, Split, encode_target
from gcode_exp.models.base import Answer, Reference, Windows
from gcode_exp.models.nearest import POSITION, most_rows
from gcode_exp.rules import Each, Float, OneOf

FEED = "feed"  # the controller's feed rate: 0 while the machine moves rapid (G0)
JOINS = ("arc", "corner", "other", "mode")  # how a straight move is entered: see `Path.join`


class ToolpathModel(Reference):
    """Where the work position (and the feed rate) is among the inputs, and their scale: nothing of the
    training data. The lines come from `trace`."""

    rules = {"line_tol": Float(gt=0), "still": Float(ge=0), "written": Float(ge=0, lt=1), "min_cut": Float(ge=0),
             "pace_change": Float(ge=0), "arc_tol": Float(gt=0), "g_after": Each(OneOf(*JOINS))}

    def __init__(self, cfg, vocab, max_len: int, **shapes):
        super().__init__()
        self.cfg, self.vocab, self.max_len = cfg, vocab, max_len
        for name in ("columns", "mean", "std", "idle_line"):
            self.register_buffer(name, torch.zeros(0))
        self.lines = torch.zeros(0, max_len, dtype=torch.long)  # those of the last `predict` (not in the state)

    def fit(self, split: Split, feats: Features, window: int) -> None:
        if not all(c in feats.channels for c in POSITION):
            raise ConfigError(f"model=toolpath: needs the inputs {', '.join(POSITION)} (features=all), which these "
                              "features lack")
        self.columns = torch.tensor([feats.channels.index(c) for c in (*POSITION, FEED) if c in feats.channels])
        self.mean = torch.tensor([feats.mean[int(i)] for i in self.columns], dtype=torch.float64)
        self.std = torch.tensor([feats.std[int(i)] for i in self.columns], dtype=torch.float64)
        # what a controller reports while the machine stands idle (feed 0): the program's end, M30 in the
        # shared runs; the most frequent line of the training rows so (none where the feed is not an input)
        idle = torch.zeros(len(split.rows), dtype=torch.bool)
        for a, b in Windows.of_split(split, window).recordings():
            idle[a:b] = torch.from_numpy(idle_rows(*self.read(split.gather(torch.arange(a, b))), self.cfg.still))
        ids = split.row_lines[idle]
        if (ids != 0).any():
            most = ids[ids != 0].mode().values
            self.idle_line = split.row_targets[idle][ids == most][0].long()

    def read(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """Inputs [T, n_inputs] of one recording -> its work positions [T, 3] and feed rates [T] (or None)."""
        raw = (x[:, self.columns].double() * self.std + self.mean).numpy()
        return raw[:, :3], (raw[:, 3] if raw.shape[1] > 3 else None)

    def brief(self) -> str:
        return f"toolpath from the work position; G0/G1 written after: {', '.join(self.cfg.g_after) or 'nothing'}"

    @torch.no_grad()
    def predict(self, windows: Windows, batch_size: int = 256) -> Answer:
        if not len(windows):
            return Answer(torch.zeros(0, self.max_len - 1, dtype=torch.long), torch.zeros(0))
        idle = self.vocab.decode(self.idle_line.tolist()[1:]) if len(self.idle_line) else ""
        row_texts = {a: lines(trace(*self.read(windows.gather(torch.arange(a, b))), cfg=self.cfg), self.cfg, idle)
                     for a, b in windows.recordings()}
        texts = list(dict.fromkeys(t for rows in row_texts.values() for t in rows if t))
        ids = {t: i for i, t in enumerate(texts)} | {"": len(texts)}  # a standing machine's row: no line
        row_ids = {a: torch.tensor([ids[t] for t in rows]) for a, rows in row_texts.items()}
        steps = torch.arange(windows.length)
        rows = torch.stack([row_ids[f][s - f + steps] for s, f in zip(windows.starts.tolist(), windows.first.tolist(),
                                                                      strict=True)])
        best = most_rows(rows, none=len(texts))
        table = torch.tensor([encode_target([t], self.vocab, self.max_len) for t in [*texts, ""]], dtype=torch.long)
        self.lines = table[:-1]  # the lines this answer's rows name: each row's own, not a window's vote
        one_hot = torch.nn.functional.one_hot(rows, len(texts) + 1).float()
        return Answer(table[best][:, 1:], (rows == best[:, None]).float().mean(1), one_hot)

    def answer(self, x: torch.Tensor) -> Answer:
        """Windows without their recording: each read on its own."""
        return self.predict(Windows.alone(x))


@dataclass
class Path:
    """What the geometry says of one recording's rows."""

    ends: np.ndarray  # [T, 3] where the move each row is on ends
    starts: np.ndarray  # [T, 3] where it began (a straight move: its first row)
    straight: np.ndarray  # bool [T] on a straight move
    radius: np.ndarray  # float [T] on an arc: its radius (NaN elsewhere: a row of its own, or standing)
    mode: np.ndarray  # int [T] the motion mode of a straight move or arc: 0 rapid (the feed reads 0), 1 feed,
    #                   2 clockwise, 3 counterclockwise
    idle: np.ndarray  # bool [T] standing with the feed at 0 (the program ended, or not begun)
    join: np.ndarray  # int [T] how its move was entered (index into JOINS, -1: within one): an arc fitted
    #                   before it, a sharp corner, anything else (samples that fit no arc, the first move), or a
    #                   change of mode (an arc's first quarter)


def trace(P: np.ndarray, feed: np.ndarray | None, cfg) -> Path:
    """[T, 3] work positions of one recording (and its feed rate, if known) -> its moves."""
    T = len(P)
    path = Path(P.copy(), P.copy(), np.zeros(T, dtype=bool), np.full(T, np.nan), np.ones(T, dtype=np.int64),
                idle_rows(P, feed, cfg.still), np.full(T, -1, dtype=np.int64))
    runs = straight_runs(P, cfg.line_tol, cfg.still)
    for t in (t for a, b in runs for t in range(a, b + 1)):
        path.straight[t] = True
    centres = {}
    for a, b, centre, radius, ccw in arc_runs(P, path.straight, cfg):
        centres[a] = centre
        quarter = np.pi / 2
        for t in range(a, b + 1):
            angle = np.arctan2(P[t, 1] - centre[1], P[t, 0] - centre[0])
            to = (np.floor(angle / quarter) + 1) * quarter if ccw else (np.ceil(angle / quarter) - 1) * quarter
            path.ends[t] = [centre[0] + radius * np.cos(to), centre[1] + radius * np.sin(to), P[t, 2]]
            path.radius[t], path.mode[t] = radius, 3 if ccw else 2
            path.join[t] = JOINS.index("mode") if np.allclose(path.ends[t], path.ends[a]) else -1
    entered, mode_before = JOINS.index("other"), None
    for i, (a, b) in enumerate(runs):
        if b + 1 in centres:  # an arc follows: the move ends where it touches the arc's circle
            u = unit(P[b] - P[a])
            end, exit_ = P[b] + ((centres[b + 1] - P[b][:2]) @ u[:2]) * u, "arc"
        else:
            end, exit_ = move_end(P, (a, b), runs[i + 1] if i + 1 < len(runs) else None, cfg)
        mode = int(not (feed is not None and np.median(feed[a : b + 1]) == 0))
        rows = slice(a, b + 1)
        path.ends[rows], path.starts[rows], path.mode[rows] = end, P[a], mode
        path.join[rows] = JOINS.index("mode") if mode_before is not None and mode != mode_before else entered
        if a - 1 >= 0 and not np.isnan(path.radius[a - 1]):
            path.join[rows] = JOINS.index("arc")  # after an arc's G2/G3 the mode is said again
        entered, mode_before = JOINS.index(exit_), mode
    for t in np.flatnonzero(~path.straight[1:]) + 1:  # a row of its own starts where the move before it ended
        path.starts[t] = path.ends[t - 1]
    return path


def idle_rows(P: np.ndarray, feed: np.ndarray | None, still: float) -> np.ndarray:
    """bool [T]: the machine stands (no move to or from the row) with the feed at 0; none without a feed."""
    if feed is None:
        return np.zeros(len(P), dtype=bool)
    stays = np.linalg.norm(np.diff(P, axis=0), axis=1) <= still
    return np.concatenate([[True], stays]) & np.concatenate([stays, [True]]) & (feed == 0)


def lines(path: Path, cfg, idle: str = "") -> list[str]:
    """Each row's line (G-code text, values to 4 decimals; "" standing, `idle` standing idle): the axes that
    change along its move (an arc: X and Y, and R), and its motion mode after the joins `cfg.g_after` names
    (G-code is modal: after an arc's G2/G3 a line must say G1; after a sharp corner between two G1 moves a
    program may or may not)."""
    g_after = [JOINS.index(j) for j in cfg.g_after]
    out = []
    for t in range(len(path.ends)):
        change = path.ends[t] - path.starts[t]
        arc = not np.isnan(path.radius[t])
        least = max(cfg.still, cfg.written * float(np.linalg.norm(change)) if path.straight[t] else 0.0)
        words = [f"{axis}{path.ends[t, k]:.4f}" for k, axis in enumerate("XYZ")
                 if abs(change[k]) > least or (arc and k < 2)]
        if arc:
            words.append(f"R{path.radius[t]:.4f}")
        if words and (path.straight[t] or arc) and path.join[t] in g_after:
            words.insert(0, f"G{path.mode[t]}")
        out.append(" ".join(words) or (idle if path.idle[t] else ""))
    return out


def reconstruct(P: np.ndarray, cfg, feed: np.ndarray | None = None) -> list[str]:
    """[T, 3] work positions of one recording (and its feed rates) -> each row's line."""
    return lines(trace(P, feed, cfg), cfg)


def arc_runs(P: np.ndarray, taken: np.ndarray, cfg) -> list[tuple[int, int, np.ndarray, float, bool]]:
    """(first, last, centre [2], radius, counterclockwise) of each arc in the XY plane: runs of at least four
    rows, none `taken`, at one height, whose every three neighbours lie on the same circle (centre and radius
    within `arc_tol` of the radius). A short move per row (a polyline, a helix) changes its circle or height."""
    a, m, b = P[:-2, :2], P[1:-1, :2], P[2:, :2]
    d = 2 * (a[:, 0] * (m[:, 1] - b[:, 1]) + m[:, 0] * (b[:, 1] - a[:, 1]) + b[:, 0] * (a[:, 1] - m[:, 1]))
    sq = [(p * p).sum(1) for p in (a, m, b)]
    with np.errstate(divide="ignore", invalid="ignore"):
        centre = np.stack([sq[0] * (m[:, 1] - b[:, 1]) + sq[1] * (b[:, 1] - a[:, 1]) + sq[2] * (a[:, 1] - m[:, 1]),
                           sq[0] * (b[:, 0] - m[:, 0]) + sq[1] * (a[:, 0] - b[:, 0]) + sq[2] * (m[:, 0] - a[:, 0])],
                          1) / d[:, None]
    centre[~np.isfinite(centre).all(1)] = np.nan  # three points on a line: no circle
    radius = np.linalg.norm(m - centre, axis=1)
    flat = np.ptp(np.stack([P[:-2, 2], P[1:-1, 2], P[2:, 2]]), axis=0) <= cfg.still
    free = ~(taken[:-2] | taken[1:-1] | taken[2:])
    ok = np.isfinite(radius) & flat & free & (np.abs(d) > 0)
    same = ok[:-1] & ok[1:] & (np.sign(d[:-1]) == np.sign(d[1:])) \
        & (np.linalg.norm(centre[:-1] - centre[1:], axis=1) <= cfg.arc_tol * radius[:-1]) \
        & (np.abs(radius[:-1] - radius[1:]) <= cfg.arc_tol * radius[:-1])  # same[i]: rows i .. i + 3 on one circle
    edges = np.diff(np.concatenate([[0], same.astype(np.int8), [0]]))
    out = []
    for s, e in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True):
        inner = slice(s, e + 1)  # the triples centred on rows s + 1 .. e + 1
        out.append((int(s), int(e) + 2, np.median(centre[inner], 0), float(np.median(radius[inner])),
                    bool(d[s] > 0)))
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


def move_end(P: np.ndarray, run: tuple[int, int], following: tuple[int, int] | None, cfg) -> tuple[np.ndarray, str]:
    """Where the straight move on rows `run` ends, and what follows it: an arc, a sharp corner, or other
    (a JOINS name)."""
    a, b = run
    u = unit(P[b] - P[a])
    if following is None:
        return P[b], "other"
    c, d = following
    u2 = unit(P[d] - P[c])
    if c > b + 1:  # samples on whatever joins the two moves: an arc tangent to this one, or not read
        e = tangent_arc_end(P[b], u, P[b + 1 : c], P[c], u2)
        return (P[b] + e * u, "arc") if e is not None else (P[b], "other")
    # the moves meet between two rows: at their corner, if the machine can have passed it in one row
    s = corner(P[b], u, P[c], u2)
    pace = np.median(np.linalg.norm(np.diff(P[a : b + 1], axis=0), axis=1))  # path per row
    pace_after = np.median(np.linalg.norm(np.diff(P[c : d + 1], axis=0), axis=1))
    k = P[b] + (s or 0.0) * u
    sharp = np.linalg.norm(k - P[b]) + np.linalg.norm(P[c] - k)  # the path past a sharp corner
    if s is None or s < -cfg.line_tol or sharp > 2 * max(pace, pace_after):
        return P[b], "other"
    # ... and how much of it a fillet cut off, where the pace holds: a rounded corner is a shorter path
    theta = float(np.arccos(np.clip(u @ u2, -1, 1)))  # the turn
    if abs(pace_after - pace) <= cfg.pace_change * pace and 1e-3 < theta < np.pi - 1e-3:
        radius = max((sharp - pace) / (2 * np.tan(theta / 2) - theta), 0.0)
        cut = min(radius * np.tan(theta / 2), s)
        if cut > cfg.min_cut:
            return P[b] + (s - cut) * u, "arc"
    return P[b] + s * u, "corner"


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
