"""Scoring a model on a split: its answers (free-running) give line_exact, the metric users judge by; a
model that learns is also scored teacher-forced (token metrics and loss), as during training. Used for
validation, the final test and task=eval."""

from __future__ import annotations

import torch

from gcode_exp import distributed
from gcode_exp.data.sampler import batches
from gcode_exp.data.vocab import Vocab
from gcode_exp.data.windows import Split
from gcode_exp.models import Model, Windows
from gcode_exp.training.device import autocast
from gcode_exp.training.metrics import line_hits, token_metrics


@torch.no_grad()
def evaluate(model: Model, split: Split, vocab: Vocab, cfg, device, with_lines: bool, limit: int = 0):
    """Metrics of one split, its predicted tokens (teacher-forced where the model learns, else its answers)
    and per window whether its answered line was whole right (None where no line was answered). `limit`:
    score only the split's first `limit` windows (0: all; `scored_windows`). Under hardware=ddp each rank
    scores a part and every rank gets the whole split's metrics (the same early-stopping calls)."""
    model.eval()
    n = min(len(split), limit) if limit else len(split)
    mine = distributed.shard(torch.arange(n))
    preds, answers, losses = [], [], []
    with autocast(device, cfg.hardware.amp):
        if with_lines or not model.learns:
            answers.append(model.predict(Windows.of_split(split, cfg.data.window, mine)).tokens.cpu())
        if model.learns:
            for x, y, _ in batches(split, cfg.data.window, 256, mine):
                x, y = x.to(device), y.to(device)
                out = model(x, y[:, :-1])
                losses.append(model.loss(out, y[:, 1:])[0].item() * len(x))
                preds.append(model.token_ids(out).cpu())
    preds, answers, loss = distributed.gather(preds, answers, sum(losses))
    target = split.targets[:n, 1:]
    answered = torch.cat(answers)[:, : target.shape[1]] if answers else None
    pred = torch.cat(preds) if model.learns else answered
    metrics = token_metrics(pred, target, vocab)
    if model.learns:
        metrics["loss"] = loss / max(n, 1)
    hits = line_hits(answered, target) if with_lines or not model.learns else None
    if hits is not None:
        metrics["line_exact"] = float(hits.float().mean()) if len(hits) else float("nan")
    return metrics, pred, hits


def scored_windows(tc) -> int:
    """How many windows of a split are scored: 0 (all), or trainer.limit_batches batches' worth."""
    return tc.limit_batches * tc.batch_size
