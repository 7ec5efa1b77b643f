"""Token-level metrics. Every metric is over non-PAD target positions after BOS (EOS included);
docs/METRICS.md states each definition. A majority reference is scored with the same code.

Class-wise recall and precision come from one confusion count (`confusion`, a bincount). torchmetrics gave the
same numbers, but importing it took 1.2 s of every run that scored anything (docs/RESULTS.md, "Speed")."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from gcode_exp.data.vocab import COMMAND, NUMERIC, PAD, PARAMETER, TYPES, Vocab

if TYPE_CHECKING:
    from omegaconf import DictConfig

# the keys of token_metrics, by name, for the config checks (tests/cli/test_config.py keeps the two in step)
TOKEN_METRICS = ("overall_acc", "command_acc", "type_acc", "param_type_acc", "param_value_acc", "unique_tokens",
                 "token_coverage", "command_macro_recall", "token_macro_recall")
LOWER_IS_BETTER = ("loss",)


def metric_names(cfg: DictConfig, per_epoch: bool = False) -> list[str]:
    """Metric names (without the `val/`, `test/` prefix) a run of `cfg` writes for a split.

    Every token metric, the loss and `line_exact` (free-running decoding). Per epoch, validation
    decodes only when trainer.monitor asks for val/line_exact (it costs about a quarter of an epoch);
    at the end, when trainer.line_exact is on."""
    return [*TOKEN_METRICS, "loss", *(["line_exact"] if cfg.trainer.get("line_exact") or per_epoch else [])]


def _share(hit: torch.Tensor, where: torch.Tensor) -> float:
    n = int(where.sum())
    return float((hit & where).sum()) / n if n else float("nan")


def confusion(pred: torch.Tensor, target: torch.Tensor, n: int) -> torch.Tensor:
    """Counts [n, n] of class ids in 0 .. n - 1: row the target, column the prediction."""
    return torch.bincount(target.long() * n + pred.long(), minlength=n * n).view(n, n)


def recall_and_precision(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class of a confusion count: recall (NaN for a class absent from the targets) and precision (0 for
    a class never predicted)."""
    right = counts.diagonal().double()
    support, predicted = counts.sum(1).double(), counts.sum(0).double()
    recall = torch.where(support > 0, right / support.clamp(min=1), torch.nan)
    return recall, right / predicted.clamp(min=1)


def macro_recall(pred: torch.Tensor, target: torch.Tensor, classes: torch.Tensor) -> float:
    """Mean over the classes present in `target` of the share of their positions predicted right.

    A class predicted but absent from the targets is not counted (as recall 0, as some libraries' macro
    average does): its recall is NaN and the mean skips it."""
    if not len(target):
        return float("nan")
    n = max(int(pred.max()), int(target.max()), *classes.tolist()) + 1
    return float(recall_and_precision(confusion(pred, target, n))[0][classes].nanmean())


def token_metrics(pred: torch.Tensor, target: torch.Tensor, vocab: Vocab) -> dict[str, float]:
    """Teacher-forced metrics of predicted ids vs target ids, both [N, L] (targets without BOS)."""
    s = {k: torch.tensor(v) for k, v in vocab.structure().items()}
    mask = target != PAD
    p, t = pred[mask], target[mask]
    t_type, p_type = s["type"][t], s["type"][p]
    is_cmd = t_type == COMMAND
    is_param = (t_type == PARAMETER) | (t_type == NUMERIC)
    is_num = t_type == NUMERIC
    predicted, wanted = set(p.tolist()), set(t.tolist())
    commands = torch.nonzero(s["type"] == COMMAND).flatten()
    return {
        "overall_acc": _share(p == t, torch.ones_like(t, dtype=torch.bool)),
        "command_acc": _share(p == t, is_cmd),
        "type_acc": _share(p_type == t_type, torch.ones_like(t, dtype=torch.bool)),
        "param_type_acc": _share(s["letter"][p] == s["letter"][t], is_param),
        "param_value_acc": _share((p_type == NUMERIC) & (s["bucket"][p] == s["bucket"][t]), is_num),
        "unique_tokens": float(len(predicted)),
        "token_coverage": len(predicted & wanted) / len(wanted) if wanted else float("nan"),
        "command_macro_recall": macro_recall(p, t, commands),
        "token_macro_recall": macro_recall(p, t, torch.arange(len(vocab))),
    }


def line_hits(generated: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[windows] bool: whether the free-running output equals the target up to and including EOS."""
    gen = generated[:, : target.shape[1]]
    return ((gen == target) | (target == PAD)).all(dim=1)


def line_exact(generated: torch.Tensor, target: torch.Tensor) -> float:
    """Share of windows whose free-running output equals the target up to and including EOS."""
    return float(line_hits(generated, target).float().mean()) if len(target) else float("nan")


def per_class(pred: torch.Tensor, target: torch.Tensor, vocab: Vocab) -> list[dict]:
    """Support, predicted count, precision and recall of every token present in the targets, commands first.
    A token never predicted has precision 0."""
    types = vocab.structure()["type"]
    mask = target != PAD
    p, t, n = pred[mask], target[mask], len(vocab)
    if not len(t):
        return []
    counts = confusion(p, t, n)
    support, predicted = counts.sum(1).tolist(), counts.sum(0).tolist()
    recall, precision = (x.tolist() for x in recall_and_precision(counts))
    present = sorted((c for c in range(n) if support[c]), key=lambda c: (types[c] != COMMAND, c))
    return [
        {"token": vocab.tokens[c], "type": TYPES[types[c]], "support": support[c], "predicted": predicted[c],
         "precision": round(precision[c], 6), "recall": round(recall[c], 6)}
        for c in present
    ]


def command_confusion(pred: torch.Tensor, target: torch.Tensor, vocab: Vocab) -> torch.Tensor:
    """Counts [commands, commands + 1] over positions whose target is a command (vocabulary order): row the
    target, column the command predicted; the last column lumps every non-command prediction together."""
    index = torch.tensor(vocab.structure()["command"])  # per token id: its command index, -1 if not a command
    n = int((index >= 0).sum())
    t, p = index[target.flatten()], index[pred.flatten()]
    keep = t >= 0
    if not keep.any():
        return torch.zeros(n, n + 1, dtype=torch.long)
    p = torch.where(p >= 0, p, n)
    return confusion(p[keep], t[keep], n + 1)[:n]


def majority_line(train_targets: torch.Tensor) -> torch.Tensor:
    """The most frequent target row of the training split (ties: the smallest row, for determinism)."""
    rows, counts = torch.unique(train_targets, dim=0, return_counts=True)
    return rows[int(torch.argmax(counts))]


def majority_metrics(majority: torch.Tensor, target: torch.Tensor, vocab: Vocab) -> dict[str, float]:
    """Scores of a predictor that always emits the training split's most frequent line."""
    pred = majority[1:].expand(len(target), -1)
    out = token_metrics(pred, target[:, 1:], vocab)
    out["line_exact"] = line_exact(pred, target[:, 1:])
    return out
