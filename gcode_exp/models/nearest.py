"""A classical reference: answer each window with what the nearest training data executed. Nothing is trained.

The recordings repeat a few programs, so a window of a new run of a known program is best answered by
finding the same moment in a training run. Two keys, picked by what the inputs hold (`model.key`):

- `position` (features=all): a row's work position and its change since the row before place it on
  one segment of a program (the G-code's X/Y/Z values are work positions, ../shared/docs/DATA_NOTES.md).
  Each row takes the line of its nearest training row; the window takes the line with the most rows
  (ties: the one reached first), which is how its target is defined. Lines are told apart by text.
- `summary` (features=side_channel): the window's per-channel mean and spread, plus, with
  `features.elapsed`, how far into its recording it starts (runs of one program keep the same pace).
  Each row takes the line of the same row of the nearest training window, and the window, as above,
  the line with the most rows: that window's own target.

It answers only lines seen in training: for programs never seen, use the token models (docs/RESULTS.md
measures both on held-out program families).
"""

from __future__ import annotations

import torch

from gcode_exp.config import ConfigError
from gcode_exp.data.windows import Features, Split
from gcode_exp.models.base import Answer, Reference
from gcode_exp.rules import Float, OneOf

POSITION = ("posx", "posy", "posz")  # work position: the frame of the G-code's X/Y/Z words
KEYS = ("position", "summary")


def pick_key(key: str, feats: Features, otherwise: str) -> str:
    """`model.key`: auto is position where the inputs hold the work position, else `otherwise`; position
    without it is refused by name."""
    has_position = all(c in feats.channels for c in POSITION)
    if key == "auto":
        return "position" if has_position else otherwise
    if key == "position" and not has_position:
        raise ConfigError(f"model.key=position: needs the inputs {', '.join(POSITION)} (features=all), "
                          "which these features lack")
    return key


def row_keys(x: torch.Tensor, columns: torch.Tensor, motion_weight: float) -> torch.Tensor:
    """[B, W, n_inputs] -> [B, W, 2 * len(columns)]: position and `motion_weight` x its change since the
    row before (a window's first row: 0)."""
    p = x[..., columns].float()
    return torch.cat([p, motion_weight * torch.diff(p, dim=1, prepend=p[:, :1])], dim=-1)


class NearestModel(Reference):
    """Reference keys and answers from the training split (buffers, so a checkpoint carries them)."""

    rules = {"key": OneOf("auto", *KEYS), "motion_weight": Float(ge=0), "elapsed_weight": Float(ge=0)}

    def __init__(self, cfg, max_len: int, **shapes):
        """`shapes` (vocab, n_inputs, window, lines: what build_model gives every model) are not needed:
        the reference is filled by `fit`."""
        super().__init__()
        self.cfg, self.max_len = cfg, max_len
        for name in ("keys", "line_ids", "lines", "columns", "mean", "std"):
            self.register_buffer(name, torch.zeros(0))
        self.register_buffer("mode", torch.tensor(-1))  # index into KEYS, set by fit
        self.register_buffer("elapsed", torch.tensor(False))  # the last input is features.elapsed

    def fit(self, split: Split, feats: Features, window: int) -> None:
        """Store the training split's keys and answers. `auto`: position where the inputs hold it."""
        key = pick_key(self.cfg.key, feats, otherwise="summary")
        self.mode, self.elapsed = torch.tensor(KEYS.index(key)), torch.tensor(bool(feats.elapsed))
        covered = torch.zeros(len(split.rows), dtype=torch.bool)
        for s in split.starts.tolist():
            covered[s : s + window] = True
        rows = torch.nonzero(covered & (split.row_lines != 0)).flatten()  # labelled rows of training windows
        texts, line_ids = torch.unique(split.row_lines[rows], return_inverse=True)
        first = torch.full((len(texts),), len(rows)).scatter_reduce(0, line_ids, torch.arange(len(rows)), "amin")
        self.lines = split.row_targets[rows[first]].long()  # one per text; its index is the line's id
        if key == "position":
            self.columns = torch.tensor([feats.channels.index(c) for c in POSITION])
            keys = row_keys(split.rows[None], self.columns, self.cfg.motion_weight)[0][rows]
            pairs = torch.unique(torch.cat([keys, line_ids[:, None].float()], dim=1), dim=0)
            self.keys, self.line_ids = pairs[:, :-1], pairs[:, -1].long()
        else:  # each training window's rows, by line id (len(lines): a row without a line)
            row_ids = torch.full((len(split.rows),), len(texts))
            row_ids[rows] = line_ids
            steps = split.starts[:, None] + torch.arange(window)
            x = split.rows[steps]
            raw = self.spread(x)
            self.mean, self.std = raw.mean(0), raw.std(0).clamp(min=1e-6)
            self.keys, self.line_ids = self.window_key(x), row_ids[steps]

    def window_key(self, x: torch.Tensor) -> torch.Tensor:
        """[B, W, n_inputs] -> [B, k]: per-channel mean and std over the window (unit scale overall),
        then `elapsed_weight` x the elapsed input of the window's first row."""
        s = (self.spread(x) - self.mean) / self.std / len(self.mean) ** 0.5
        if not self.elapsed:
            return s
        return torch.cat([s, self.cfg.elapsed_weight * x[:, :1, -1].float()], dim=1)

    def spread(self, x: torch.Tensor) -> torch.Tensor:
        """Per-channel mean and std over each window's rows (the elapsed input left out)."""
        sensors = x[..., :-1] if self.elapsed else x
        return torch.cat([sensors.mean(1), sensors.std(1)], dim=1).float()

    @torch.no_grad()
    def answer(self, x: torch.Tensor) -> Answer:
        """Each window: the line with the most rows among its rows' answers, certain (p 1), and each row's
        answer as a one-hot over `lines` (last: a row without a line)."""
        rows = self.row_lines(x)
        tokens = self.lines[most_rows(rows, none=len(self.lines))][:, 1:]
        one_hot = torch.nn.functional.one_hot(rows, len(self.lines) + 1).float()
        return Answer(tokens, torch.ones(len(x), device=x.device), one_hot)

    @torch.no_grad()
    def row_lines(self, x: torch.Tensor) -> torch.Tensor:
        """[B, W] each row's line (index into `lines`; len(lines): none): the nearest training row's, or
        the same row of the nearest training window's."""
        if KEYS[int(self.mode)] == "summary":
            return self.line_ids[torch.cdist(self.window_key(x), self.keys).argmin(1)]
        q = row_keys(x, self.columns, self.cfg.motion_weight).flatten(0, 1)
        return self.line_ids[self.index.nearest(q)].view(x.shape[:2])

    @property
    def index(self) -> KeyIndex:
        """The position keys' index, built from the keys on first use (a fitted or a loaded model alike)."""
        if getattr(self, "_index", None) is None or self._index.keys is not self.keys:
            self._index = KeyIndex(self.keys)
        return self._index

    def brief(self) -> str:
        return f"{len(self.keys)} reference keys ({KEYS[int(self.mode)]})"


class KeyIndex:
    """Exact nearest neighbours of low-dimensional keys (the 6 of a row's position and motion) by a k-d tree
    (scipy's cKDTree): a query costs about log(rows), so the search grows little with the archive, where
    comparing a row with every training row grows with it (docs/RESULTS.md, "Scale"). Built in tens of
    milliseconds from the keys a checkpoint stores, never stored itself: a pickled tree in a checkpoint
    would be code. Identical keys answer as the first of them, as a brute-force argmin would."""

    def __init__(self, keys: torch.Tensor) -> None:
        from scipy.spatial import cKDTree

        self.keys = keys
        points = keys.detach().cpu().double()
        distinct, which = torch.unique(points, dim=0, return_inverse=True)
        self.first = torch.full((len(distinct),), len(points)).scatter_reduce(0, which, torch.arange(len(points)),
                                                                               "amin")
        self.tree = cKDTree(distinct.numpy())

    def nearest(self, q: torch.Tensor) -> torch.Tensor:
        """[n, k] queries -> [n] the index of each one's nearest key (on the keys' device)."""
        _, at = self.tree.query(q.detach().cpu().double().numpy(), k=1)
        return self.first[torch.from_numpy(at)].to(self.keys.device)


def most_rows(row_lines: torch.Tensor, none: int) -> torch.Tensor:
    """[B, W] line ids -> [B] the id with the most rows (rows of id `none` not counted); ties: the one
    whose first row comes first."""
    B, W = row_lines.shape
    counts = torch.zeros(B, none + 1, dtype=torch.long, device=row_lines.device)
    counts.scatter_add_(1, row_lines, (row_lines != none).long())
    mine = counts.gather(1, row_lines)
    is_best = (mine == counts.max(1, keepdim=True).values) & (row_lines != none)
    first = torch.where(is_best, torch.arange(W, device=row_lines.device), W).min(1).values
    return row_lines.gather(1, first.clamp(max=W - 1)[:, None])[:, 0]
