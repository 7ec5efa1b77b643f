"""The one model interface. Tasks, evaluation, prediction, checkpoints and the bench see every approach
through it and never ask which one they hold: a reference search that trains nothing and a token model
trained for an hour are peers.

- `fit(train, features, window)`: what the model keeps of the training split before any optimiser step
  (a reference; nothing for a token model). `learns` says whether optimiser steps follow (the Trainer).
- `predict(windows)`: an `Answer` per window: its line's tokens, their probability, per row the
  probabilities over `lines` (the runner-up is the second of those), and where the model can tell, how far
  the window lies from everything it was fitted on (`novelty`: a program never seen). `Windows` carries
  whole recordings, so a model that reads a window in the context of its recording (an alignment) has what it needs.
- `state()` / `load_state(...)`: what a checkpoint stores, and a model built from the same config given it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from gcode_exp.data.windows import Features, Split
    from gcode_exp.rules import Rule


@dataclass
class Answer:
    """What a model says of a batch of windows."""

    tokens: torch.Tensor  # int64 [B, L] the answered line's tokens after BOS (EOS, then PAD)
    p: torch.Tensor  # float [B] the model's probability of that answer (1: a reference's certain answer)
    rows: torch.Tensor | None = None  # float [B, window, len(lines) + 1] per row over `lines`, last: another line
    novelty: torch.Tensor | None = None  # float [B] share of the window's rows off every training path, where known

    @staticmethod
    def cat(parts: list[Answer]) -> Answer:
        def joined(name: str) -> torch.Tensor | None:
            each = [getattr(a, name) for a in parts]
            return torch.cat(each) if parts and all(e is not None for e in each) else None

        return Answer(torch.cat([a.tokens for a in parts]), torch.cat([a.p for a in parts]), joined("rows"),
                      joined("novelty"))


@dataclass
class Windows:
    """Windows of one or more recordings laid end to end: window i covers rows `starts[i]` to
    `starts[i] + length - 1` of `gather`'s row index, inside its recording's rows `first[i]` to `end[i] - 1`."""

    gather: Callable[[torch.Tensor], torch.Tensor]  # a row index of any shape -> inputs [*shape, n_inputs]
    starts: torch.Tensor  # int64 [B]
    first: torch.Tensor  # int64 [B] the first row of each window's recording
    end: torch.Tensor  # int64 [B] one past its last row
    length: int  # rows per window

    @staticmethod
    def of_split(split: Split, window: int, index: torch.Tensor | None = None) -> Windows:
        """The windows of a split (`index`: some of them, in that order)."""
        i = torch.arange(len(split)) if index is None else index
        return Windows(split.gather, split.starts[i], split.lo[i], split.hi[i] + window, window)

    @staticmethod
    def of_rows(rows: torch.Tensor, starts: torch.Tensor, window: int) -> Windows:
        """The windows at `starts` of one recording's inputs [rows, n_inputs]."""
        n = torch.full_like(starts, len(rows))
        return Windows(lambda i: rows[i], starts, torch.zeros_like(starts), n, window)

    @staticmethod
    def alone(x: torch.Tensor) -> Windows:
        """Windows [B, length, n_inputs] without their recordings: each a recording of its own."""
        n, w = x.shape[:2]
        flat, starts = x.reshape(n * w, -1), torch.arange(0, n * w, w)
        return Windows(lambda i: flat[i], starts, starts, starts + w, w)

    def recordings(self) -> list[tuple[int, int]]:
        """(first row, end row) of each recording the windows are in, in order."""
        return [tuple(r) for r in torch.unique(torch.stack([self.first, self.end], 1), dim=0).tolist()]

    def __len__(self) -> int:
        return len(self.starts)

    def inputs(self, batch_size: int = 256) -> Iterator[torch.Tensor]:
        """The windows' inputs [b, length, n_inputs], `batch_size` at a time, in order."""
        steps = torch.arange(self.length)
        for i in range(0, len(self), batch_size):
            yield self.gather(self.starts[i : i + batch_size, None] + steps)


class Model(nn.Module):
    """Every approach. A subclass that answers each window on its own implements `answer`; one that reads
    whole recordings overrides `predict`."""

    learns: ClassVar[bool] = True  # trained by optimiser steps after `fit` (the Trainer), or done once fitted
    rules: ClassVar[dict[str, Rule]] = {}  # the model's own config keys (under `model.`) and what each accepts
    lines: torch.Tensor  # int64 [n, max_len] the lines its row answers name (BOS ... EOS PAD)

    def fit(self, train: Split, features: Features, window: int) -> None:
        """Keep what the model needs of the training split before any optimiser step (default: nothing)."""

    @torch.no_grad()
    def predict(self, windows: Windows, batch_size: int = 256) -> Answer:
        device = next(itertools.chain(self.parameters(), self.buffers())).device
        return Answer.cat([self.answer(x.to(device)) for x in windows.inputs(batch_size)])

    def answer(self, x: torch.Tensor) -> Answer:
        """The answer for each window of inputs [B, window, n_inputs]."""
        raise NotImplementedError

    def brief(self) -> str:
        """One line for the log: what the model is and holds."""
        return f"{sum(p.numel() for p in self.parameters())} params"

    def state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint stores of the model."""
        return self.state_dict()

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """The inverse of `state`, on a model built from the same config and shapes."""
        self.load_state_dict(state)


class Reference(Model):
    """A model that keeps (part of) the training data and trains nothing: its tables are buffers whose size
    is the training data's, so a checkpoint's are taken at their own size."""

    learns = False

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in self._buffers:
            if prefix + name in state_dict:
                self._buffers[name] = state_dict[prefix + name].clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
