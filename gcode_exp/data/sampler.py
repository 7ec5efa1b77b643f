"""Batches of a split. `batches` walks windows in a given order (scoring reads a split this way);
`Sampler` makes each training epoch: the window order (rare windows repeated, or the fixed subset of
`trainer.limit_batches`), this process's share under hardware=ddp, and a fresh augmentation draw.

Windows are gathered from the split's row table per batch, so a temporal shift is a real shift of
the window inside its recording (never past the file's ends), not a roll with wrapped-around rows.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterator
from dataclasses import replace

import torch

from gcode_exp import distributed
from gcode_exp.data.augment import Augment
from gcode_exp.data.vocab import PAD, Vocab
from gcode_exp.data.windows import Split

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


def batches(
    split: Split,
    window: int,
    batch_size: int,
    order: torch.Tensor | None = None,
    aug: Augment | None = None,
    gen: torch.Generator | None = None,
    trim: bool = False,
    row_labels: torch.Tensor | None = None,
) -> Iterator[Batch]:
    """(inputs [B, window, n_inputs], targets [B, max_len], row labels [B, window] or None) in `order`
    (default: split order). `row_labels` holds one label per row of the split, gathered with the same
    (shifted) window starts as the inputs. `trim` cuts target columns that are PAD in the whole batch
    (less decoder work in training)."""
    order = torch.arange(len(split)) if order is None else order.to(split.starts.device)
    steps = torch.arange(window, device=split.starts.device)
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


class Sampler:
    """The training split's batches, one epoch at a time, every draw from the generator it is given (the
    trainer's, which checkpoints carry: a resumed run continues the same sequence)."""

    def __init__(self, split: Split, vocab: Vocab, aug: Augment, window: int, batch_size: int,
                 limit_batches: int = 0, seed: int = 0, row_labels: torch.Tensor | None = None) -> None:
        self.split, self.aug, self.window, self.batch_size, self.row_labels = split, aug, window, batch_size, row_labels
        self.device: torch.device | None = None  # where the windows were moved (`to`); None: where they were read
        self.rare = aug.rare_windows(split.targets, vocab)
        self.kept = None  # limit_batches: the same windows every epoch (drawn once from the seed), so that one
        if limit_batches:  # batch can be overfitted; reshuffled among themselves each epoch
            kept = aug.epoch_order(self.rare, torch.Generator().manual_seed(seed))
            self.kept = kept[: limit_batches * batch_size]

    @property
    def windows(self) -> int:
        """Windows drawn per epoch (over all processes)."""
        return len(self.kept) if self.kept is not None else self.aug.epoch_windows(self.rare)

    def __len__(self) -> int:
        """Optimiser steps per epoch."""
        return math.ceil(self.windows / self.batch_size)

    def to(self, device: torch.device) -> Sampler:
        """Keep the training windows (rows, starts, targets, row labels) on `device`, a GPU they fit on:
        gathering, oversampling and augmentation then run there, and a step copies nothing from the host."""
        s = self.split
        self.split = replace(s, rows=s.rows.to(device), starts=s.starts.to(device), lo=s.lo.to(device),
                             hi=s.hi.to(device), targets=s.targets.to(device))
        self.row_labels = None if self.row_labels is None else self.row_labels.to(device)
        self.device = device
        return self

    def nbytes(self) -> int:
        """Bytes `to` would move."""
        s, labels = self.split, [] if self.row_labels is None else [self.row_labels]
        return sum(t.nbytes for t in (s.rows, s.starts, s.lo, s.hi, s.targets, *labels))

    def epoch(self, gen: torch.Generator) -> Iterator[Batch]:
        """One epoch's batches, shuffled and augmented afresh from `gen`."""
        if self.kept is None:
            order = self.aug.epoch_order(self.rare, gen)
        else:
            order = self.kept[torch.randperm(len(self.kept), generator=gen)]
        batch_size, aug_gen = self.batch_size, gen
        if distributed.active():  # hardware=ddp: this rank's part of every batch, its own augmentation stream
            order, batch_size, aug_gen = distributed.epoch_share(order, batch_size, gen)
        if self.device is not None:  # the draws happen where the windows are, from a stream seeded by `gen`
            seed = int(torch.randint(2**62, (1,), generator=aug_gen))
            aug_gen = torch.Generator(self.device).manual_seed(seed)
        aug = self.aug if self.aug.perturbs else None
        self.aug.start_epoch()
        return batches(self.split, self.window, batch_size, order, aug, aug_gen, trim=True, row_labels=self.row_labels)


def prefetched(source: Iterator[Batch], depth: int = 2, pin: bool = True) -> Iterator[Batch]:
    """`source`'s batches made by a background thread up to `depth` ahead, in pinned (page-locked) memory
    with `pin`: a GPU whose windows stay on the host is fed while it computes, and the copy to it can be
    asynchronous. An error in the thread is raised here; stopping early stops the thread."""
    ready: queue.Queue = queue.Queue(depth)
    stop, end = threading.Event(), object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for batch in source:
                if not put(tuple(t.pin_memory() if pin and t is not None else t for t in batch)):
                    return
            put(end)
        except BaseException as e:  # handed to the consumer, which raises it
            put(e)

    threading.Thread(target=work, daemon=True, name="gcode-exp-prefetch").start()
    try:
        while (item := ready.get()) is not end:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
