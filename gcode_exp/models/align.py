"""Recognition by alignment: where in which training recording each row of a recording is, found by
matching the signal, not the clock. Nothing is trained.

A recording made in a shop does not start with its job (a monitor switched on mid-job), runs at another
pace (the feed override) and may hold several jobs. A window's summary cannot place it in its program
(side-channel line exact 0.33 without the elapsed time, docs/RESULTS.md); a path through the training
recordings can. Every training row is a state; the recording is walked row by row, and each of its rows
moves the path on by 0 to `max_step` rows of the same training recording (a pace between about 1/2 and
`max_step` times the training runs'), or jumps anywhere at cost `jump` (a new job, another training run of
the same program, the first row). The cost of a row at a state is how far its key is from that training
row's, clipped at `clip` so that one odd row cannot break a path. Costs are counted in one row of progress
for the work position (exact up to when rows were taken) and in two random training rows' distance for a
signal (noisy); `clip` in the latter for both. Each row is answered with the line of its state on the best
path through the whole recording (past `max_cells`: the best path ending `lag` rows later), a window with
the line holding most of its rows, as its target is defined.

The key (`model.key`): `position` (features=all) compares the work position, the G-code's own frame;
`signal` every input but the elapsed time, each channel smoothed over `smooth` rows, with `shared_boards` only
on the boards both rows' recordings have (models/board_keys.py: an unplugged board is no evidence either
way). A signal places a row only roughly, so there each stretch of the path in one program is read at one pace
(`straightened`), and each training run's lines are moved by how far its sensor boards trail its controller
rows (`lagged`). It answers only lines of programs seen.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from gcode_exp.data.windows import Features, Split
from gcode_exp.models import board_keys
from gcode_exp.models.base import Answer, Reference, Windows
from gcode_exp.models.nearest import POSITION, most_rows, pick_key
from gcode_exp.models.training_runs import best_offset, same_program
from gcode_exp.rules import Bool, Float, Int, OneOf

KEYS = ("position", "signal")


def smoothed(x: torch.Tensor, rows: int) -> torch.Tensor:
    """[T, C] -> each row the mean of the `rows` rows centred on it (inside the recording)."""
    if rows <= 1:
        return x
    k = torch.ones(1, 1, rows, dtype=x.dtype, device=x.device) / rows
    padded = torch.nn.functional.pad(x.T[:, None], (rows // 2, (rows - 1) // 2), mode="replicate")
    return torch.nn.functional.conv1d(padded, k)[:, 0].T


class AlignModel(Reference):
    """Training rows (keys, lines, recording boundaries) as buffers; `predict` aligns whole recordings."""

    rules = {"key": OneOf("auto", *KEYS), "smooth": Int(ge=1), "dims": Int(ge=0), "max_step": Int(ge=1, le=8),
             "stay": Float(ge=0), "skip": Float(ge=0), "jump": Float(gt=0), "clip": Float(gt=0), "lag": Int(ge=0),
             "max_cells": Int(ge=0), "straight": Bool(), "snap": Int(ge=0),
             "max_lag": Int(ge=0), "off_path": Float(gt=0), "shared_boards": Bool(), "snap_rows": Int(ge=0),
             "snap_margin": Float(ge=0), "merge": Bool(), "late_boards": Bool(),
             "steady_pace": Bool()}

    def __init__(self, cfg, max_len: int, **shapes):
        super().__init__()
        self.cfg, self.max_len = cfg, max_len
        for name in ("keys", "line_ids", "lines", "columns", "same_before", "scale", "clip_at", "centre", "basis",
                     "firsts", "programs", "key_mask", "group_of", "flag_columns", "dim_group", "run_lags"):
            self.register_buffer(name, torch.zeros(0))
        self.register_buffer("mode", torch.tensor(-1))  # index into KEYS, set by fit
        # each training row's line where its board signal says the job was (from run_lags: not stored)
        self.register_buffer("lagged_ids", torch.zeros(0, dtype=torch.long), persistent=False)

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state(state)
        self.lagged_ids = self.lagged_lines()

    def fit(self, split: Split, feats: Features, window: int) -> None:
        key = pick_key(self.cfg.key, feats, otherwise="signal")
        self.mode = torch.tensor(KEYS.index(key))
        if key == "position":
            self.columns = torch.tensor([feats.channels.index(c) for c in POSITION])
        elif self.cfg.shared_boards and feats.boards:  # the channels, each board's compared only where both have it
            self.columns = torch.arange(len(feats.channels))
            self.flag_columns = torch.arange(len(feats.channels), len(feats.channels) + len(feats.boards))
            board = {b: i for i, b in enumerate(feats.boards)}  # motors (no board): group len(boards), always there
            self.group_of = torch.tensor([board.get(c.split(".")[0], len(feats.boards)) if "." in c
                                          else len(feats.boards) for c in feats.channels])
        else:  # every input but the elapsed time (the clock is what this model does without)
            self.columns = torch.arange(feats.n_inputs - int(feats.elapsed))
        labelled = torch.nonzero(split.row_lines != 0).flatten()
        texts, ids = torch.unique(split.row_lines[labelled], return_inverse=True)
        first = torch.full((len(texts),), len(labelled)).scatter_reduce(0, ids, torch.arange(len(labelled)), "amin")
        self.lines = split.row_targets[labelled[first]].long()
        self.line_ids = torch.full((len(split.rows),), len(texts))
        self.line_ids[labelled] = ids
        bounds = torch.unique(torch.cat([split.lo, split.hi + window]))  # every recording's first and end row
        n, firsts = len(split.rows), bounds[bounds < len(split.rows)]
        recording = torch.searchsorted(firsts, torch.arange(n), right=True) - 1
        # how many rows before each belong to its recording, up to max_step: the steps a path may take to it
        self.same_before = (torch.arange(n) - firsts[recording]).clamp(max=self.cfg.max_step)
        self.firsts = torch.cat([firsts, torch.tensor([n])])  # each training recording's first row, and the end
        self.programs = same_program(self.line_ids, self.firsts)
        rows = split.gather(torch.arange(len(split.rows)))
        keys = self.key_rows(rows, bounds)
        self.key_mask = self.mask_rows(rows)
        self.centre, self.basis = keys.mean(0), torch.eye(keys.shape[1])
        if self.masked:
            self.centre, self.basis, self.dim_group = board_keys.group_basis(keys, self.key_mask, self.group_of,
                                                                             self.cfg.dims)
        elif 0 < self.cfg.dims < keys.shape[1]:  # the training keys' principal directions (SVD of a sample)
            sample = keys[torch.randperm(len(keys), generator=torch.Generator().manual_seed(0))[:20000]]
            self.basis = torch.linalg.svd(sample - self.centre, full_matrices=False)[2][: self.cfg.dims].T
        keys = self.project(keys, self.key_mask)
        # the unit of every cost: the work position is exact up to when rows were taken, so there it is the
        # median distance of a row to the next one (one row of progress); a signal is noisy, so there it
        # is the mean distance of two training rows drawn at random. `clip` is in the latter unit for both.
        pairs = torch.randint(len(keys), (2, 4096), generator=torch.Generator().manual_seed(0))
        random_pair = self.row_cost(keys[pairs[0]], self.key_mask[pairs[0]], keys[pairs[1]],
                                    self.key_mask[pairs[1]]).mean().clamp(min=1e-12)
        if key == "position":
            next_row = (keys[1:] - keys[:-1]).square().sum(1)[self.same_before[1:] > 0]
            self.scale = next_row[next_row > 0].median().clamp(min=1e-12) if (next_row > 0).any() else random_pair
        else:
            self.scale = random_pair
        self.clip_at = self.cfg.clip * random_pair / self.scale
        self.keys = keys / self.scale.sqrt()
        self.run_lags = self.lags() if key == "signal" and self.cfg.max_lag else torch.zeros(len(self.firsts) - 1,
                                                                                            dtype=torch.long)
        self.lagged_ids = self.lagged_lines()

    def key_rows(self, x: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
        """[T, n_inputs] rows of recordings starting at `bounds` -> [T, k] keys, smoothed per recording."""
        x = x[:, self.columns].float()
        edges = [int(b) for b in bounds] + [len(x)]
        parts = [smoothed(x[a:b], self.cfg.smooth) for a, b in zip(edges[:-1], edges[1:]) if b > a]
        return torch.cat(parts) / (1 if self.masked else parts[0].shape[1] ** 0.5)

    @property
    def masked(self) -> bool:
        return len(self.group_of) > 0

    def mask_rows(self, x: torch.Tensor) -> torch.Tensor:
        """[T, n_inputs] -> [T, groups] 1 where the row's recording has the board (the last group, the
        motors: always); [T, 0] where keys are not masked."""
        if not self.masked:
            return x.new_zeros(len(x), 0)
        return torch.cat([x[:, self.flag_columns].float().round(), x.new_ones(len(x), 1)], 1)

    def query(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[T, n_inputs] one recording -> its keys [T, k] in the unit of every cost, and its masks [T, groups]."""
        qm = self.mask_rows(x)
        return self.project(self.key_rows(x, torch.tensor([0])), qm) / self.scale.sqrt(), qm

    def row_cost(self, u: torch.Tensor, um: torch.Tensor, v: torch.Tensor, vm: torch.Tensor) -> torch.Tensor:
        """[..., k] keys and [..., groups] masks -> [...] squared distance per pair of rows (with masks: over the
        boards both have, gcode_exp/models/board_keys.py)."""
        return board_keys.row_cost(u, um, v, vm, self.dim_group) if self.masked else (u - v).square().sum(-1)

    def distances(self, q: torch.Tensor, qm: torch.Tensor) -> torch.Tensor:
        """[A, k] keys, [A, groups] masks -> [A, S] squared distance to every training row (`row_cost`)."""
        if not self.masked:
            return torch.cdist(q, self.keys).square_()
        if getattr(self, "_reference", None) is None or self._reference.keys is not self.keys:
            self._reference = board_keys.Reference(self.keys, self.key_mask, self.dim_group)
        return self._reference.distances(q, qm)

    def project(self, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Keys on the `model.dims` principal directions of the training keys (all of them: unchanged but for
        the centring), so that comparing a row with every training row costs dims, not channels, per pair."""
        out = (keys - self.centre) @ self.basis
        return out * mask[:, self.dim_group] if self.masked else out

    def brief(self) -> str:
        return f"{len(self.keys)} reference rows ({KEYS[int(self.mode)]})"

    @torch.no_grad()
    def predict(self, windows: Windows, batch_size: int = 256) -> Answer:
        out_rows, out_off, spans = [], [], windows.recordings()
        # recordings aligned side by side, one per torch thread: the walk is numpy, which lets go of the GIL
        with ThreadPoolExecutor(max(1, min(len(spans), torch.get_num_threads()))) as pool:
            walks = pool.map(lambda span: self.align(windows.gather(torch.arange(*span))), spans)
            aligned = dict(zip([a for a, _ in spans], walks))
        steps = torch.arange(windows.length)
        for i, s in enumerate(windows.starts.tolist()):
            lines, off = aligned[a := int(windows.first[i])]
            out_rows.append(lines[s - a + steps])
            out_off.append(off[s - a + steps] if off is not None else None)
        if not out_rows:
            return Answer(torch.zeros(0, self.max_len - 1, dtype=torch.long), torch.zeros(0))
        rows = torch.stack(out_rows)
        best = most_rows(rows, none=len(self.lines))
        one_hot = torch.nn.functional.one_hot(rows, len(self.lines) + 1).float()
        novelty = torch.stack(out_off).float().mean(1) if out_off[0] is not None else None
        # the window's probability: the share of its rows on its line (the path gives no other measure)
        return Answer(self.lines[best][:, 1:], (rows == best[:, None]).float().mean(1), one_hot, novelty)

    def answer(self, x: torch.Tensor) -> Answer:
        """Windows without their recording: each aligned on its own."""
        return self.predict(Windows.alone(x))

    def align(self, x: torch.Tensor, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[T, n_inputs] one recording -> [T] each row's line (index into `lines`; len(lines): none), and with
        key=position [T] whether the row lies off every training path (`off_path`; None with a signal key).

        Viterbi in numpy over float32 costs (its per-step overhead is a fraction of torch's at these sizes);
        each step keeps, per state, how it was reached: 0 .. K rows on, or K + 1 for a jump (from `tops`)."""
        cfg, T = self.cfg, len(x)
        q, qm = self.query(x)
        jump_cost = np.float32(cfg.jump)
        S, K, lag = len(self.keys), int(cfg.max_step), int(cfg.lag)
        # the cost of reaching row s from s - k (k = 0 .. K) of the same training recording; inf from another
        step = torch.tensor([cfg.stay, 0.0, *(cfg.skip * (k - 1) for k in range(2, K + 1))])
        penalty = torch.where(self.same_before.cpu() >= torch.arange(K + 1)[:, None], step[:, None], torch.inf)
        penalty = penalty.float().cpu().numpy()  # the walk runs on the CPU; distances where the keys are
        whole = T * S <= cfg.max_cells  # the whole path is kept (offline); else the last `lag` steps
        codes = np.zeros((T if whole else lag + 1, S), dtype=np.int8)
        tops = np.zeros(T, dtype=np.int64)
        states = np.zeros(T, dtype=np.int64)
        padded = np.full(S + K, np.inf, dtype=np.float32)
        best, cand, better = np.empty(S, np.float32), np.empty(S, np.float32), np.empty(S, bool)
        prev, near = None, torch.zeros(T, dtype=torch.long)

        def trace(s: int, t: int, steps: int) -> int:
            """The state `steps` rows before t on the path that is at state s at row t."""
            for u in range(t, t - steps, -1):
                c = int(codes[u if whole else u % (lag + 1)][s])
                s = int(tops[u]) if c == K + 1 else s - c
            return s

        for c0 in range(0, T, chunk):
            d = self.distances(q[c0 : c0 + chunk], qm[c0 : c0 + chunk]).clamp_(max=float(self.clip_at))
            near[c0 : c0 + len(d)] = d.argmin(1).cpu()
            d = d.cpu().numpy()
            for j in range(len(d)):
                t = c0 + j
                code = codes[t if whole else t % (lag + 1)]
                if prev is None:
                    prev = d[j].copy()
                    code[:] = 0
                    continue
                padded[K:] = prev  # padded[K - k + s] = prev[s - k]
                np.add(prev, penalty[0], out=best)
                code[:] = 0
                for k in range(1, K + 1):
                    np.add(padded[K - k : K - k + S], penalty[k], out=cand)
                    np.less(cand, best, out=better)
                    np.minimum(best, cand, out=best)
                    code[better] = k
                tops[t] = int(prev.argmin())
                jump = prev[tops[t]] + jump_cost
                code[best > jump] = K + 1
                np.minimum(best, jump, out=best)
                best += d[j]
                best -= best.min()
                prev, best = best, prev
                if not whole and t >= lag:  # fixed lag: the state `lag` rows ago on the best path ending now
                    states[t - lag] = trace(int(prev.argmin()), t, lag)
        end = int(prev.argmin())
        for t in range(T - 1, (-1 if whole else max(T - 1 - lag, -1)), -1):
            states[t] = end
            end = trace(end, t, 1)
        states = torch.from_numpy(states).to(self.line_ids.device)
        if KEYS[int(self.mode)] == "position":
            return self.lagged_ids[states], self.distance_to_paths(q, near.to(q.device)) > cfg.off_path
        if whole and cfg.straight and len(self.firsts):
            states, clocked = self.straightened(states, q, qm)
            return torch.where(clocked, self.line_ids[states], self.lagged_ids[states]), None
        return self.lagged_ids[states], None

    def distance_to_paths(self, q: torch.Tensor, near: torch.Tensor) -> torch.Tensor:
        """[T] each key's distance to the nearest training path: the segments from its nearest training row
        `near` to the rows before and after it in the same training recording (in the key's unit: rows of
        progress for the work position).

        A recording of a known program lies on the training paths (within 0.06 rows of progress at the
        median, docs/RESULTS.md), at any pace (a paced row lies on a segment, not on a row); one of a
        program never seen lies a fraction of a row off them on most of its rows, except where the
        programs share a move."""
        S, p = len(self.keys), self.keys[near]
        best = (q - p).square().sum(1)
        after = (near + 1).clamp(max=S - 1)
        neighbours = ((near - 1, self.same_before[near] >= 1), (after, (near + 1 < S) & (self.same_before[after] >= 1)))
        for other, same in neighbours:
            seg = self.keys[other.clamp(min=0)] - p
            t = ((q - p) * seg).sum(1).div(seg.square().sum(1).clamp(min=1e-12)).clamp(0, 1)
            best = torch.where(same, torch.minimum(best, (q - p - t[:, None] * seg).square().sum(1)), best)
        return best.sqrt()

    def straightened(self, states: torch.Tensor, q: torch.Tensor, qm: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each stretch of the path in one program read at one pace: a line fitted to its places in the
        training run it is most in, the line's ends put on that run's first or last row where they come
        within `snap` rows of it, or the stretch taken as the whole job where both do or that matches the
        signal better; stretches of one program side by side read as one where a line over both matches
        better (`merged`). Also, per row, whether it was so placed from a run's first or last row (the
        controller's clock) rather than by the signal alone.

        A signal places a row only to within several rows (smoothed, repeated motions) while a line of
        G-code may last one row, and a job keeps its pace; so the stretch's pace and offset, fitted over all
        its rows, place each row better than the path does, and a job's first and last rows fix them. The
        work position (key=position) places rows exactly, pauses included, and is left as traced."""
        cfg = self.cfg
        recording = torch.searchsorted(self.firsts, states, right=True) - 1
        # a stretch may pass through several training runs of its program, at about the same place in each;
        # it ends where the program changes, or the place moves far as it enters another run (a new job)
        program, place = self.programs[recording], states - self.firsts[recording]
        moved = (recording[1:] != recording[:-1]) & ((place[1:] - place[:-1]).abs() > 2 * cfg.snap)
        cuts = (torch.nonzero((program[1:] != program[:-1]) | moved).flatten() + 1).tolist()
        placed = [(t0, t1, *self.stretch_line(q, qm, t0, t1, recording, place))
                  for t0, t1 in zip([0, *cuts], [*cuts, len(states)]) if t1 - t0 >= max(2 * cfg.snap, 2 * cfg.max_step)]
        if cfg.get("merge", False):  # a checkpoint from before model.merge reads as it did
            placed = self.merged(q, qm, placed)
        out, clocked = states.clone(), torch.zeros(len(states), dtype=torch.bool)
        for t0, t1, home, a, b, by_clock in placed:
            first, n = int(self.firsts[home]), int(self.firsts[home + 1] - self.firsts[home])
            out[t0:t1] = (a + b * torch.arange(t0, t1, dtype=torch.float64)).round().long().clamp(0, n - 1) + first
            clocked[t0:t1] = by_clock
        return out, clocked

    def stretch_line(self, q: torch.Tensor, qm: torch.Tensor, t0: int, t1: int, recording: torch.Tensor,
                     place: torch.Tensor) -> tuple[int, float, float, bool]:
        """The training run a stretch of the path is most in, the line place = a + b t on it (`straightened`),
        and whether that line was placed from the run's first or last row (the controller's clock, not the
        signal: its rows take the controller's lines, not the lagged ones)."""
        cfg = self.cfg
        home = int(recording[t0:t1].mode().values)  # the run most of the stretch is in: its rows are the answer
        first, n = int(self.firsts[home]), int(self.firsts[home + 1] - self.firsts[home])
        t = torch.arange(t0, t1, dtype=torch.float64)

        def cost(a: float, b: float) -> torch.Tensor:
            """The stretch's rows laid on the run at place a + b t: their mean clipped cost."""
            return self.line_cost(q[t0:t1], qm[t0:t1], first, n, a + b * t)

        def anchored(a: float, b: float) -> tuple[bool, bool]:
            """Whether the line puts the stretch's first row on the run's first, its last on the run's last."""
            return abs(a + b * t0) < 0.5, abs(a + b * (t1 - 1) - (n - 1)) < 0.5

        fit, rows = torch.stack([torch.ones_like(t), t], 1), place[t0:t1].double()
        keep = torch.ones(len(t), dtype=torch.bool)
        for _ in range(4):  # least squares, then again on the 70 % of rows nearest the line
            a, b = torch.linalg.lstsq(fit[keep], rows[keep, None]).solution.flatten().tolist()
            miss = (rows - (a + b * t)).abs()
            keep = miss <= miss.quantile(0.7)
        b = min(max(b, 1 / (cfg.max_step + 1)), float(cfg.max_step))
        whole = (n - 1) / max(t1 - 1 - t0, 1)  # the pace at which the stretch is the whole job
        paces = [b, whole] if 1 / (cfg.max_step + 1) <= whole <= cfg.max_step else [b]
        starts = abs(a + b * t0) <= cfg.snap and self.starts_there(q, qm, t0, t1, home, paces)
        ends = abs(a + b * (t1 - 1) - (n - 1)) <= cfg.snap
        # the recording's own boards trailing its controller: its path starts on the job's first rows and its
        # line lies behind them (a recording that starts late lies ahead). Its rows are the job's from its first,
        # and its last row is the job's where the controller's clock (not the late signal) ends there.
        # cfg.get: a checkpoint from before model.late_boards reads as it did
        if not starts and cfg.get("late_boards", False) and t0 == 0 and int(place[0]) <= cfg.snap and (
                -(cfg.max_lag + cfg.snap) <= a < 0):
            a, starts, ends = 0.0, True, abs(b * (t1 - 1) - (n - 1)) <= cfg.snap
        if starts:
            a = -b * t0
        elif ends:
            a = (n - 1) - b * (t1 - 1)
        # the stretch as the whole job, its first and last rows on the run's: taken where both ends came
        # near, or where its rows match the run better than the line fitted (a pace the path did not follow)
        if len(paces) > 1 and ((starts and ends) or cost(-whole * t0, whole) < cost(a, b)):
            a, b = -whole * t0, whole
        # most jobs run at the training runs' pace: a line anchored on a job's first or last row whose pace
        # differs from theirs by at most `snap` rows over the stretch is read at theirs, unless its own
        # matches better by `snap_margin` (a recording a few rows short of its job read whole drifts by those rows)
        if cfg.get("steady_pace", False) and 1e-6 < abs(b - 1) * (t1 - t0) <= cfg.snap:
            own = cost(a, b)
            for steady, on in zip((-t0, (n - 1) - (t1 - 1)), anchored(a, b)):
                if not on:
                    continue
                if (c := cost(steady, 1.0)) <= own + cfg.snap_margin:
                    a, b, own = float(steady), 1.0, c
        return home, a, b, any(anchored(a, b))

    def merged(self, q: torch.Tensor, qm: torch.Tensor, placed: list[tuple]) -> list[tuple]:
        """Stretches of one program side by side taken as one where a line of either, carried over both, matches
        their rows (on the program's best-matching training run) within `model.jump` of the two lines apart: a
        job keeps its pace, and a path that crossed a stretch where the program looks alike everywhere
        (repeated passes) and jumped is mended."""
        out = placed[:1]
        for nxt in placed[1:]:
            (t0, t1, *line), (_, t2, *line2) = out[-1], nxt
            if int(self.programs[line[0]]) != int(self.programs[line2[0]]):
                out.append(nxt)
                continue
            apart = self.best_run(q, qm, t0, t1, *line)[0] + self.best_run(q, qm, t1, t2, *line2)[0]
            joined = min(self.best_run(q, qm, t0, t2, *line), self.best_run(q, qm, t0, t2, *line2))
            if joined[0] <= apart + self.cfg.jump:
                out[-1] = (t0, t2, *joined[1:])
            else:
                out.append(nxt)
        return out

    def best_run(self, q: torch.Tensor, qm: torch.Tensor, t0: int, t1: int, run: int, a: float, b: float,
                 by_clock: bool) -> tuple[float, int, float, float, bool]:
        """Rows t0..t1 laid at place a + b t of training `run` (on its controller's clock where `by_clock`,
        else on its boards'), moved to the run of its program they match best (the runs' controller rows line
        up; their boards trail them by `run_lags`): the summed clipped cost, and the line on that run."""
        t = torch.arange(t0, t1, dtype=torch.float64)
        best = (float("inf"), run, a, b, by_clock)
        for other in torch.nonzero(self.programs == self.programs[run]).flatten().tolist():
            first, n = int(self.firsts[other]), int(self.firsts[other + 1] - self.firsts[other])
            moved = a if by_clock else a + int(self.run_lags[other]) - int(self.run_lags[run])
            signal = moved + (int(self.run_lags[other]) if by_clock else 0)  # where its boards are at that row
            cost = float(self.line_cost(q[t0:t1], qm[t0:t1], first, n, signal + b * t)) * (t1 - t0)
            best = min(best, (cost, other, moved, b, by_clock))
        return best

    def starts_there(self, q: torch.Tensor, qm: torch.Tensor, t0: int, t1: int, run: int, paces: list[float]
                     ) -> bool:
        """Whether the stretch t0..t1, its first row on training `run`'s first, at one of `paces`, matches the
        signal of its first `snap_rows` rows within `snap_margin` of the best shift of up to `snap` rows (the
        run's board lag allowed for). A recording that starts a few rows into its job would be pulled onto
        the job's first row by the path's start alone; there a shift matches better (`snap_rows=0`: it is not
        checked). Nor is the end: a job's last rows (spindle stopping, idle) place it too loosely (docs/RESULTS.md)."""
        cfg, rows = self.cfg, int(self.cfg.snap_rows)
        if not rows:
            return True
        first, n, r = int(self.firsts[run]), int(self.firsts[run + 1] - self.firsts[run]), int(cfg.snap)
        hi = min(t0 + rows, t1)
        t = torch.arange(t0, hi, dtype=torch.float64)
        for b in paces:
            at = b * (t - t0) + int(self.run_lags[run])
            cost = self.line_cost(q[t0:hi], qm[t0:hi], first, n, at + torch.arange(-r, r + 1)[:, None])
            if cost[r] <= cost.min() + cfg.snap_margin:
                return True
        return False

    def lags(self) -> torch.Tensor:
        """[training runs] how many rows each run's board signal trails its controller rows against the other
        training runs of its program (up to `model.max_lag` rows either way; the median over those runs and
        itself, 0 where fewer than two others match).

        The boards keep their own clock: runs of one program whose G-code lines line up at the same row
        match best with their signals shifted by up to ~25 rows (docs/RESULTS.md). A row placed by the
        signal takes its line from where the signal was (`lagged_lines`); one placed from its recording's
        first row (the controller's clock, `straightened`) keeps the controller's line."""
        firsts, most, clip = self.firsts.tolist(), int(self.cfg.max_lag), float(self.clip_at)
        spans = list(zip(firsts[:-1], firsts[1:]))
        out = torch.zeros(len(spans), dtype=torch.long)
        both, k = torch.cat([self.keys, self.key_mask], 1), self.keys.shape[1]  # keys and masks, cut as one
        for i, (a, b) in enumerate(spans):
            lags = [0]  # the run against itself: with one other run, or two that disagree, nothing moves
            for j, (c, d) in enumerate(spans):
                if j == i or self.programs[j] != self.programs[i]:
                    continue
                signal, cost = best_offset(both[a:b], both[c:d], most, lambda u, v: self.row_cost(
                    u[..., :k], u[..., k:], v[..., :k], v[..., k:]).clamp(max=clip))
                label, differ = best_offset(self.line_ids[a:b], self.line_ids[c:d], most, torch.ne)
                if cost < 0.8 * clip and differ < 0.5:  # runs whose boards match at all, and whose lines do
                    lags.append(label - signal)
            if len(lags) > 2:
                out[i] = int(torch.tensor(lags, dtype=torch.float).median().round())
        return out

    def lagged_lines(self) -> torch.Tensor:
        """Each training row's line where its board signal says the job was: row r of run i, the line its
        controller ran `run_lags[i]` rows before (clamped to the run)."""
        out = self.line_ids.clone()
        firsts = self.firsts.tolist()
        for i, (a, b) in enumerate(zip(firsts[:-1], firsts[1:])):
            if int(self.run_lags[i]):
                out[a:b] = self.line_ids[(torch.arange(a, b) - int(self.run_lags[i])).clamp(a, b - 1)]
        return out

    def line_cost(self, q: torch.Tensor, qm: torch.Tensor, first: int, n: int, place: torch.Tensor) -> torch.Tensor:
        """[..., T] places -> [...] the mean clipped cost of rows `q` [T, k] laid at `place` (rows into the
        training run at `first` of `n` rows); a row placed off the run costs the clip."""
        at = place.round().long()
        inside = (at >= 0) & (at < n)
        rows = first + at.clamp(0, n - 1)
        d = self.row_cost(q, qm, self.keys[rows], self.key_mask[rows]).clamp(max=float(self.clip_at))
        return torch.where(inside, d, self.clip_at.to(d.dtype)).mean(-1)

