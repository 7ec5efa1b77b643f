"""The guide's Approach 2 as one object, built from `conf/aug` (`_target_`): which training windows are
rare and how many times an epoch repeats them, and the perturbations every draw gets afresh (sensor
noise, temporal shift, magnitude scaling). A new augmentation is a subclass (override `perturb` or
`shift_starts`) and a YAML file in conf/aug/ that names it; `gcode_exp.data.sampler` applies it.
"""

from __future__ import annotations

from collections import Counter

import torch

from gcode_exp.data.vocab import COMMAND, Vocab
from gcode_exp.data.windows import Features


class Augment:
    """Oversampling of rare-command windows and per-draw perturbations of the sensor channels (never of
    board presence flags or the elapsed-time input, which follow the channels)."""

    def __init__(self, features: Features, oversample_factor: int = 1, rare_commands: str | list[str] = "auto",
                 noise: float = 0.0, shift: int = 0, scale: float = 0.0, noise_pool: int = 0,
                 name: str = "") -> None:
        self.oversample_factor, self.rare_commands, self.name = int(oversample_factor), rare_commands, name
        self.noise, self.shift, self.scale, self.noise_pool = float(noise), int(shift), float(scale), int(noise_pool)
        self.n_sensor = len(features.channels)
        # z = (raw - mean) / std; scaling raw by k gives k z + (k - 1) mean / std
        self.offset = (torch.tensor(features.mean) / torch.tensor(features.std)).float()
        self._scratch, self._pool, self._pool_stale = torch.empty(0), torch.empty(0), True

    def scratch(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        """A buffer for one batch's noise, reused while batches keep their shape: a fresh megabyte per batch
        costs more in page faults than drawing the noise (the same numbers as torch.randn)."""
        if self._scratch.shape != shape or self._scratch.device != device:
            self._scratch = torch.empty(shape, device=device)
        return self._scratch

    def start_epoch(self) -> None:
        """The sampler starts an epoch: with a noise pool, the epoch's first batch draws it afresh."""
        self._pool_stale = True

    def noise_like(self, s: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Standard normal noise of `s`'s shape. noise_pool=0: drawn for this batch alone (on a CPU, drawing
        it costs more than the rest of the batch's making). noise_pool=P: P batches' worth is drawn afresh
        each epoch, and a batch takes the sum of two random slices of it over sqrt(2): still standard
        normal, independent within the batch, and no two batches alike, for ~P/steps of the cost."""
        if not self.noise_pool:
            return self.scratch(s.shape, s.device).normal_(generator=gen)
        n = s.numel()
        if self._pool_stale or self._pool.numel() < n or self._pool.device != s.device:
            self._pool = torch.randn(self.noise_pool * n, generator=gen, device=s.device)
            self._pool_stale = False
        a, b = torch.randint(self._pool.numel() - n + 1, (2,), generator=gen, device=s.device).tolist()
        out = self.scratch(s.shape, s.device)
        torch.add(self._pool[a : a + n].view(s.shape), self._pool[b : b + n].view(s.shape), out=out)
        return out.mul_(2 ** -0.5)

    @property
    def perturbs(self) -> bool:
        """Whether a draw differs from the stored window at all (aug=none: batches skip `perturb`)."""
        return bool(self.noise or self.shift or self.scale)

    def rare_windows(self, targets: torch.Tensor, vocab: Vocab) -> torch.Tensor:
        """Mask of the windows whose target holds a rare command. `auto`: every command of the targets
        but the most frequent one."""
        cmd_ids = [i for i, t in enumerate(vocab.tokens) if vocab.token_type(t) == COMMAND]
        if self.rare_commands == "auto":
            counts = Counter({i: int((targets == i).sum()) for i in cmd_ids})
            rare = [i for i in cmd_ids if counts[i] > 0 and i != counts.most_common(1)[0][0]] if counts else []
        else:
            rare = [vocab.index[c] for c in self.rare_commands if c in vocab.index]
        if not rare:
            return torch.zeros(len(targets), dtype=torch.bool)
        return torch.isin(targets, torch.tensor(rare)).any(dim=1)

    def epoch_order(self, rare: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Shuffled window indices for one epoch; rare windows appear `oversample_factor` times."""
        extra = torch.nonzero(rare).flatten().repeat(max(self.oversample_factor, 1) - 1)
        order = torch.cat([torch.arange(len(rare)), extra])
        return order[torch.randperm(len(order), generator=gen)]

    def epoch_windows(self, rare: torch.Tensor) -> int:
        """How many windows `epoch_order` returns."""
        return len(rare) + int(rare.sum()) * (max(self.oversample_factor, 1) - 1)

    def shift_starts(self, starts: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                     gen: torch.Generator) -> torch.Tensor:
        """Window starts moved by up to +-shift rows, never past the recording's first or last start."""
        if not self.shift:
            return starts
        delta = torch.randint(-self.shift, self.shift + 1, starts.shape, generator=gen, device=starts.device)
        return torch.minimum(torch.maximum(starts + delta, lo), hi)

    def perturb(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Scale and add noise to the sensor channels of a batch [B, window, n_inputs], in place: `x` is
        the batch's own gathered copy, never the stored rows. Drawn on the batch's device (`gen` is there)."""
        s = x[..., : self.n_sensor]
        if self.scale:
            k = 1 + (torch.rand(len(x), 1, 1, generator=gen, device=x.device) * 2 - 1) * self.scale
            s.mul_(k).add_((k - 1) * self.offset.to(x.device))
        if self.noise:
            s.add_(self.noise_like(s, gen), alpha=self.noise)
        return x
