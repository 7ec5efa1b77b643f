"""A classical reference: random convolution features and a ridge classifier over whole training lines.

MiniRocket (Dempster, Schmidt and Webb, KDD 2021) in plain PyTorch: the 84 kernels of length 9 whose
weights are -1 but for three 2s, each applied at several dilations (exponentially spaced up to the window)
to a random few input channels summed, and each kernel's output turned into features by the proportion of
its values above a bias (PPV), the biases being quantiles of that output on random training windows. A
ridge classifier (one-hot lines as targets, the penalty picked over `alphas` by cross-validation over
whole training recordings) maps the features to the window's line; its score of the winning line is the answer's p (a
linear probability, clipped to [0, 1]).

Nothing is trained by optimiser steps and nothing pickled: the kernels, biases and ridge weights are tensors
in the checkpoint. Written here rather than taken from aeon: its numba code needs numpy < 2.4, and its fitted
transform is a Python object, which a checkpoint may not hold (docs/SECURITY.md).
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

from gcode_exp.data.windows import Features, Split
from gcode_exp.models.base import Answer, Reference, Windows
from gcode_exp.rules import Each, Float, Int

LENGTH = 9  # kernel length
KERNELS = torch.tensor([[2.0 if i in twos else -1.0 for i in range(LENGTH)]
                        for twos in itertools.combinations(range(LENGTH), 3)])  # [84, 9]


def dilations(window: int, most: int = 8) -> list[int]:
    """Up to `most` distinct dilations, exponentially spaced from 1 to where a kernel spans the window."""
    top = math.log2(max(1.0, (window - 1) / (LENGTH - 1)))
    return sorted({int(2 ** (top * i / max(1, most - 1))) for i in range(most)})


class RocketModel(Reference):
    """MiniRocket features + ridge over the training windows' target lines (buffers: a checkpoint carries them)."""

    rules = {"features": Int(ge=len(KERNELS), note="about this many; a multiple of 84 per dilation"),
             "alphas": Each(Float(gt=0)), "seed": Int(ge=0), "batch_size": Int(ge=1)}

    def __init__(self, cfg, max_len: int, **shapes):
        """`shapes` (vocab, n_inputs, window, lines) are not needed: everything is sized by `fit`."""
        super().__init__()
        self.cfg, self.max_len = cfg, max_len
        for name in ("weights", "dilation", "biases", "mean", "std", "coef", "intercept", "lines", "alpha"):
            self.register_buffer(name, torch.zeros(0))

    def fit(self, split: Split, feats: Features, window: int) -> None:
        g = torch.Generator().manual_seed(int(self.cfg.seed))
        n_inputs, dil = split.rows.shape[1], dilations(window)
        per = max(1, round(self.cfg.features / (len(KERNELS) * len(dil))))  # biases per kernel and dilation
        weights = torch.zeros(len(dil), len(KERNELS), n_inputs, LENGTH)
        for d, k in itertools.product(range(len(dil)), range(len(KERNELS))):
            few = int(torch.randint(1, min(n_inputs, LENGTH) + 1, (1,), generator=g))  # channels summed
            weights[d, k, torch.randperm(n_inputs, generator=g)[:few]] = KERNELS[k]
        self.weights, self.dilation = weights, torch.tensor(dil)
        x = torch.cat(list(Windows.of_split(split, window).inputs(self.cfg.batch_size))).float()
        # each kernel's biases: quantiles (a low-discrepancy sequence) of its output on one random window
        quantiles = torch.tensor([(i * (math.sqrt(5) - 1) / 2) % 1 for i in range(1, per + 1)])
        biases = []
        for d in range(len(dil)):
            pick = torch.randint(len(x), (len(KERNELS),), generator=g)
            out = self.convolve(x[pick], d)  # [84 windows, 84 kernels, T]: kernel k on window k
            own = out[torch.arange(len(KERNELS)), torch.arange(len(KERNELS))]
            biases.append(torch.quantile(own, quantiles, dim=1).T)  # [84, per]
        self.biases = torch.stack(biases)  # [dilations, 84, per]
        f = self.transform(x)
        self.mean, self.std = f.mean(0), f.std(0).clamp(min=1e-6)
        self.lines, y = torch.unique(split.targets.long(), dim=0, return_inverse=True)
        groups = torch.repeat_interleave(torch.arange(len(split.file_windows)), torch.tensor(split.file_windows))
        self.coef, self.intercept, self.alpha = ridge((f - self.mean) / self.std, y, len(self.lines),
                                                      [float(a) for a in self.cfg.alphas], groups)

    def convolve(self, x: torch.Tensor, d: int) -> torch.Tensor:
        """[B, T, n_inputs] -> [B, 84, T]: every kernel at dilation `d` (index), zero-padded to keep T."""
        step = int(self.dilation[d])
        return F.conv1d(x.transpose(1, 2), self.weights[d], dilation=step, padding=step * (LENGTH // 2))

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, n_inputs] -> [B, n_features]: per kernel, dilation and bias, the share of outputs above it."""
        out = []
        for i in range(0, len(x), self.cfg.batch_size):
            part = x[i : i + self.cfg.batch_size].float()
            out.append(torch.cat([(self.convolve(part, d)[..., None] > self.biases[d][None, :, None]).float()
                                  .mean(2).flatten(1) for d in range(len(self.dilation))], dim=1))
        return torch.cat(out)

    @torch.no_grad()
    def answer(self, x: torch.Tensor) -> Answer:
        scores = ((self.transform(x) - self.mean) / self.std) @ self.coef + self.intercept
        best, top = scores.max(1)
        return Answer(self.lines[top][:, 1:], best.clamp(0, 1))

    def brief(self) -> str:
        return (f"{self.coef.shape[0]} random convolution features ({len(self.dilation)} dilations), ridge over "
                f"{len(self.lines)} lines (alpha {float(self.alpha):g})")


def ridge(f: torch.Tensor, y: torch.Tensor, classes: int, alphas: list[float], groups: torch.Tensor, folds: int = 4
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ridge regression of one-hot `y` on standardised features `f`; the penalty is the one of `alphas` whose
    held-out line accuracy is best over `folds` folds of whole recordings (`groups`: each window's recording).
    Windows of one recording overlap, so leave-one-window-out would pick almost no penalty (measured: test line
    exact 0.25 against 0.55 at the penalty recordings pick, features=all). (coef, intercept, alpha)."""
    target = F.one_hot(y, classes).double()
    fold = torch.remainder(groups, folds) if int(groups.max()) + 1 >= folds else torch.zeros_like(groups)
    right = torch.zeros(len(alphas))
    for k in fold.unique().tolist() if int(fold.max()) > 0 else []:
        out = fold == k
        for i, (coef, intercept) in enumerate(ridge_path(f[~out], target[~out], alphas)):
            right[i] += ((f[out].double() @ coef + intercept).argmax(1) == y[out]).sum()
    a = alphas[max(range(len(alphas)), key=lambda i: (right[i], alphas[i]))]  # ties: the larger penalty
    coef, intercept = next(ridge_path(f, target, [a]))
    return coef.float(), intercept.float(), torch.tensor(a)


def ridge_path(f: torch.Tensor, target: torch.Tensor, alphas: list[float]):
    """(coef, intercept) of the ridge fit of `target` on `f` at each penalty, from one SVD."""
    f64 = f.double()
    fm, tm = f64.mean(0), target.mean(0)
    u, s, vh = torch.linalg.svd(f64 - fm, full_matrices=False)
    uy = u.T @ (target - tm)
    for a in alphas:
        coef = vh.T @ ((s / (s**2 + a))[:, None] * uy)
        yield coef, tm - fm @ coef
