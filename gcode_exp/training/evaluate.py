"""Scoring a token model on a split: teacher-forced token metrics, and free-running decoding for
line_exact (the metric users judge by). Used for validation, the final test and task=eval."""

from __future__ import annotations

import torch

from gcode_exp import distributed
from gcode_exp.data.dataset import Split
from gcode_exp.data.sampler import batches
from gcode_exp.data.vocab import BOS, Vocab
from gcode_exp.models import TokenModel
from gcode_exp.training.device import autocast
from gcode_exp.training.metrics import line_exact, token_metrics


@torch.no_grad()
def evaluate(model: TokenModel, split: Split, vocab: Vocab, cfg, device, with_lines: bool, limit: int = 0):
    """Metrics of one split, and its teacher-forced predictions. `limit`: score only the split's first
    `limit` windows (0: all; `scored_windows`). Under hardware=ddp each rank scores a part and every rank
    gets the whole split's metrics (the same early-stopping calls)."""
    model.eval()
    n = min(len(split), limit) if limit else len(split)
    preds, gens, losses = [], [], []
    for x, y, _ in batches(split, cfg.data.window, 256, distributed.shard(torch.arange(n))):
        x, y = x.to(device), y.to(device)
        with autocast(device, cfg.hardware.amp):
            out = model(x, y[:, :-1])
            losses.append(model.loss(out, y[:, 1:])[0].item() * len(x))
            preds.append(model.predict(out).cpu())
            if with_lines:
                gens.append(model.generate(x, y.shape[1] - 1, BOS).cpu())
    preds, gens, loss = distributed.gather(preds, gens, sum(losses))
    pred, target = torch.cat(preds), split.targets[:n, 1:]
    metrics = token_metrics(pred, target, vocab)
    metrics["loss"] = loss / max(n, 1)
    if with_lines:
        metrics["line_exact"] = line_exact(torch.cat(gens), target)
    return metrics, pred


def scored_windows(tc) -> int:
    """How many windows of a split are scored: 0 (all), or trainer.limit_batches batches' worth."""
    return tc.limit_batches * tc.batch_size
