"""Figures of a run folder: learning curves, command confusion, token frequencies, per-command recall."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from gcode_exp.atomic import atomic_write  # noqa: E402
from gcode_exp.data.vocab import PAD, Vocab  # noqa: E402
from gcode_exp.training import metrics  # noqa: E402


def learning_curves(history: list[dict], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    epochs = [r["epoch"] for r in history]
    axes[0].plot(epochs, [r["train/loss"] for r in history], label="train")
    axes[0].plot(epochs, [r["val/loss"] for r in history], label="val")
    axes[0].set(xlabel="epoch", ylabel="loss", title="loss")
    for key in ("overall_acc", "command_acc", "command_macro_recall", "token_macro_recall"):
        axes[1].plot(epochs, [r[f"val/{key}"] for r in history], label=key)
    axes[1].set(xlabel="epoch", title="validation", ylim=(0, 1))
    for ax in axes:
        ax.legend(fontsize=7)
    _save(fig, path)


def command_confusion(pred: torch.Tensor, target: torch.Tensor, vocab: Vocab, path: Path) -> None:
    """Rows: target command; columns: what was predicted at that position (other = any non-command)."""
    cmds = vocab.commands
    names = [*cmds, "other"]
    counts = metrics.command_confusion(pred, target, vocab)
    share = counts / counts.sum(1, keepdim=True).clamp(min=1)
    fig, ax = plt.subplots(figsize=(1 + 0.6 * len(names), 1 + 0.5 * len(cmds)))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=45)
    ax.set_yticks(range(len(cmds)), names[:-1])
    for i in range(len(cmds)):
        for j in range(len(names)):
            if counts[i, j]:
                ax.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=7)
    ax.set(xlabel="predicted", ylabel="target", title="commands (test)")
    _save(fig, path)


def token_frequencies(pred: torch.Tensor, target: torch.Tensor, vocab: Vocab, path: Path) -> None:
    mask = target != PAD
    n = len(vocab)
    true = torch.bincount(target[mask], minlength=n).float()
    got = torch.bincount(pred[mask], minlength=n).float()
    order = torch.argsort(true, descending=True)[:40]
    fig, ax = plt.subplots(figsize=(12, 3.5))
    xs = torch.arange(len(order))
    ax.bar(xs - 0.2, true[order], 0.4, label="target")
    ax.bar(xs + 0.2, got[order], 0.4, label="predicted")
    ax.set_xticks(xs.tolist(), [vocab.tokens[i] for i in order], rotation=90, fontsize=6)
    ax.set(yscale="log", title="token frequencies (test, 40 most frequent targets)")
    ax.legend()
    _save(fig, path)


def command_recall(rows: list[dict], path: Path) -> None:
    cmds = [r for r in rows if r["type"] == "COMMAND"]
    fig, ax = plt.subplots(figsize=(1.5 + 0.6 * len(cmds), 3))
    ax.bar([r["token"] for r in cmds], [r["recall"] for r in cmds])
    for i, r in enumerate(cmds):
        ax.text(i, r["recall"], f"n={r['support']}", ha="center", va="bottom", fontsize=7)
    ax.set(ylim=(0, 1.1), ylabel="recall", title="per-command recall (test, best epoch)")
    _save(fig, path)


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format=path.suffix.lstrip(".") or "png"))
    plt.close(fig)
