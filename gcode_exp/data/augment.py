"""Batches over a split, with the guide's Approach 2 for training: oversample rare-command windows
and perturb each draw afresh (sensor noise, temporal shift, magnitude scaling).

Windows are gathered from the split's row table per batch, so a temporal shift is a real shift of
the window inside its recording (never past the file's ends), not a roll with wrapped-around rows.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from gcode_exp.data.dataset import Features, Split
from gcode_exp.data.vocab import COMMAND, PAD, Vocab


def rare_window_mask(targets: torch.Tensor, vocab: Vocab, rare_commands) -> torch.Tensor:
    """Windows whose target holds a rare command. `auto`: every command but the most frequent one."""
    cmd_ids = [i for i, t in enumerate(vocab.tokens) if vocab.token_type(t) == COMMAND]
    if rare_commands == "auto":
        counts = Counter({i: int((targets == i).sum()) for i in cmd_ids})
        rare = [i for i in cmd_ids if counts[i] > 0 and i != counts.most_common(1)[0][0]] if counts else []
    else:
        rare = [vocab.index[c] for c in rare_commands if c in vocab.index]
    if not rare:
        return torch.zeros(len(targets), dtype=torch.bool)
    return torch.isin(targets, torch.tensor(rare)).any(dim=1)


def epoch_order(n: int, rare: torch.Tensor, factor: int, gen: torch.Generator) -> torch.Tensor:
    """Shuffled window indices for one epoch; rare windows appear `factor` times."""
    extra = torch.nonzero(rare).flatten().repeat(max(factor, 1) - 1)
    order = torch.cat([torch.arange(n), extra])
    return order[torch.randperm(len(order), generator=gen)]


@dataclass
class Augment:
    """Per-draw perturbations, applied to sensor channels only (never to board presence flags)."""

    noise: float
    shift: int
    scale: float
    n_sensor: int
    offset: torch.Tensor  # mean/std per channel: scaling the raw signal moves the normalised one by this

    @classmethod
    def from_config(cls, aug_cfg, feats: Features) -> Augment | None:
        if not (aug_cfg.noise or aug_cfg.shift or aug_cfg.scale):
            return None
        offset = torch.tensor(feats.mean) / torch.tensor(feats.std)
        return cls(aug_cfg.noise, int(aug_cfg.shift), aug_cfg.scale, len(feats.channels), offset.float())

    def shift_starts(self, starts, lo, hi, gen: torch.Generator) -> torch.Tensor:
        if not self.shift:
            return starts
        delta = torch.randint(-self.shift, self.shift + 1, starts.shape, generator=gen)
        return torch.minimum(torch.maximum(starts + delta, lo), hi)

    def perturb(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        s = x[..., : self.n_sensor]
        if self.scale:
            # z = (raw - mean) / std; scaling raw by k gives k z + (k - 1) mean / std
            k = 1 + (torch.rand(len(x), 1, 1, generator=gen) * 2 - 1) * self.scale
            s = k * s + (k - 1) * self.offset
        if self.noise:
            s = s + torch.randn(s.shape, generator=gen) * self.noise
        return torch.cat([s, x[..., self.n_sensor :]], dim=-1)


def batches(
    split: Split,
    window: int,
    batch_size: int,
    order: torch.Tensor | None = None,
    aug: Augment | None = None,
    gen: torch.Generator | None = None,
    trim: bool = False,
    row_labels: torch.Tensor | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """(inputs [B, window, n_inputs], targets [B, max_len], row labels [B, window] or None) in `order`
    (default: split order). `row_labels` holds one label per row of the split, gathered with the same
    (shifted) window starts as the inputs. `trim` cuts target columns that are PAD in the whole batch
    (less decoder work in training)."""
    order = torch.arange(len(split)) if order is None else order
    steps = torch.arange(window)
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        starts = split.starts[idx]
        if aug is not None:
            starts = aug.shift_starts(starts, split.lo[idx], split.hi[idx], gen)
        rows = starts[:, None] + steps
        x = split.gather(rows)
        if aug is not None:
            x = aug.perturb(x, gen)
        y = split.targets[idx]
        if trim:
            y = y[:, : int((y != PAD).sum(1).max())]
        yield x, y, None if row_labels is None else row_labels[rows]
