"""Token-level metrics. Every metric is over non-PAD target positions after BOS (EOS included);
docs/METRICS.md states each definition. A majority reference is scored with the same code."""

from __future__ import annotations

import torch

from gcode_exp.data.vocab import COMMAND, NUMERIC, PAD, PARAMETER, TYPES, Vocab


def _share(hit: torch.Tensor, where: torch.Tensor) -> float:
    n = int(where.sum())
    return float((hit & where).sum()) / n if n else float("nan")


def macro_recall(pred: torch.Tensor, target: torch.Tensor, classes: torch.Tensor) -> float:
    """Mean over the classes present in `target` of the share of their positions predicted right."""
    present = [c for c in classes.tolist() if (target == c).any()]
    if not present:
        return float("nan")
    return sum(float((pred[target == c] == c).float().mean()) for c in present) / len(present)


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


def line_exact(generated: torch.Tensor, target: torch.Tensor) -> float:
    """Share of windows whose free-running output equals the target up to and including EOS."""
    gen = generated[:, : target.shape[1]]
    mask = target != PAD
    return float(((gen == target) | ~mask).all(dim=1).float().mean()) if len(target) else float("nan")


def per_class(pred: torch.Tensor, target: torch.Tensor, vocab: Vocab) -> list[dict]:
    """Support, precision and recall of every token present in the targets, commands first."""
    types = vocab.structure()["type"]
    mask = target != PAD
    p, t = pred[mask], target[mask]
    rows = []
    for c in sorted(set(t.tolist()), key=lambda c: (types[c] != COMMAND, c)):
        hits = int(((p == c) & (t == c)).sum())
        n_pred, support = int((p == c).sum()), int((t == c).sum())
        rows.append(
            {
                "token": vocab.tokens[c],
                "type": TYPES[types[c]],
                "support": support,
                "predicted": n_pred,
                "precision": hits / n_pred if n_pred else 0.0,
                "recall": hits / support,
            }
        )
    return rows


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
