"""What the alignment learns of its training recordings as runs: which ran the same program, and at which
shift two runs match best (how far one's sensor boards trail its controller rows against another's).
Pure functions over tensors; `gcode_exp/models/align.py` keeps the results as buffers."""

from __future__ import annotations

from collections.abc import Callable

import torch


def same_program(line_ids: torch.Tensor, firsts: torch.Tensor, overlap: float = 0.5) -> torch.Tensor:
    """[recordings] a program number per training recording: recordings whose sets of lines overlap by at
    least `overlap` (shared / either's) ran the same program. Runs of one program share nearly all lines,
    different programs (feed variants included) a few of 50-300."""
    sets, programs = [], []
    for a, b in zip(firsts[:-1].tolist(), firsts[1:].tolist()):
        lines = set(line_ids[a:b].unique().tolist())
        match = [i for i, s in enumerate(sets) if len(s & lines) >= overlap * len(s | lines)]
        if not match:
            sets.append(lines)
        programs.append(match[0] if match else len(sets) - 1)
    return torch.tensor(programs, dtype=torch.long)


def best_offset(x: torch.Tensor, other: torch.Tensor, most: int, cost: Callable) -> tuple[int, float]:
    """The shift o in -most .. most at which rows r of `x` against rows r + o of `other` (those both have, at
    least half the shorter's) have the lowest mean `cost(x rows, other rows)` (a cost per row), and that mean."""
    at = torch.arange(len(x))[None] + torch.arange(-most, most + 1)[:, None]  # [shifts, rows] rows of `other`
    both = (at >= 0) & (at < len(other))
    per_row = cost(x[None].expand(len(at), *x.shape), other[at.clamp(0, len(other) - 1)]).float() * both
    mean = per_row.sum(1) / both.sum(1).clamp(min=1)
    mean[both.sum(1) < min(len(x), len(other)) // 2] = torch.inf
    o = int(mean.argmin())
    return o - most, float(mean[o])
