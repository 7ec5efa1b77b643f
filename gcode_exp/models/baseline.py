"""Approach 1: one softmax over the flat vocabulary."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gcode_exp.data.vocab import PAD, Vocab
from gcode_exp.models.encoder import TokenModel


class BaselineModel(TokenModel):
    def __init__(self, cfg, vocab: Vocab, n_inputs: int, window: int, max_len: int, lines=None):
        super().__init__(cfg, vocab, n_inputs, window, max_len, lines)
        self.head = nn.Linear(cfg.d_model, len(vocab))

    def heads(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"token": self.head(h)}

    def token_loss(self, out, target):
        loss = F.cross_entropy(out["token"].flatten(0, 1).float(), target.flatten(), ignore_index=PAD)
        return loss, {"token": loss.item()}

    def token_ids(self, out):
        return out["token"].argmax(-1)

    def step_p(self, out):
        return torch.softmax(out["token"][:, -1].float(), -1).max(-1).values
