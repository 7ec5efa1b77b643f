"""Approach 3: hierarchical heads (type, command, parameter letter, bucket) composed back into tokens.

Each head is trained only where its answer is defined (the command head on command positions, ...),
so frequent parameter tokens no longer compete with rare commands for the same softmax.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gcode_exp.data.vocab import COMMAND, EOS, NUMERIC, PAD, PARAMETER, TYPES, UNK, Vocab
from gcode_exp.models.encoder import TokenModel


class MultiHeadModel(TokenModel):
    def __init__(self, cfg, vocab: Vocab, n_inputs: int, window: int, max_len: int, lines=None):
        super().__init__(cfg, vocab, n_inputs, window, max_len, lines)
        s = vocab.structure()
        n_cmd, n_letter, n_bucket = len(vocab.commands), len(vocab.letters), vocab.n_buckets
        d = cfg.d_model
        self.type_head = nn.Linear(d, len(TYPES))
        self.command_head = nn.Linear(d, max(n_cmd, 1))
        self.letter_head = nn.Linear(d, max(n_letter, 1))
        self.value_head = nn.Linear(d, n_bucket)
        self.weights = {k: float(v) for k, v in cfg.loss_weights.items()}
        # decomposition of target ids, and the inverse (head answers -> token id; UNK if not in vocab)
        for key in ("type", "command", "letter", "bucket"):
            self.register_buffer(f"tok_{key}", torch.tensor(s[key]), persistent=False)
        cmd_token = torch.full((max(n_cmd, 1),), UNK)
        letter_token = torch.full((max(n_letter, 1),), UNK)
        num_token = torch.full((max(n_letter, 1), n_bucket), UNK)
        for i in range(len(vocab)):
            kind = s["type"][i]
            if kind == COMMAND:
                cmd_token[s["command"][i]] = i
            elif kind == PARAMETER:
                letter_token[s["letter"][i]] = i
            elif kind == NUMERIC:
                num_token[s["letter"][i], s["bucket"][i]] = i
        self.register_buffer("cmd_token", cmd_token, persistent=False)
        self.register_buffer("letter_token", letter_token, persistent=False)
        self.register_buffer("num_token", num_token, persistent=False)

    def heads(self, h):
        return {
            "type": self.type_head(h),
            "command": self.command_head(h),
            "param_type": self.letter_head(h),
            "param_value": self.value_head(h),
        }

    def token_loss(self, out, target):
        valid = target != PAD
        labels = {
            "type": torch.where(valid, self.tok_type[target], -1),
            "command": self.tok_command[target],
            "param_type": self.tok_letter[target],
            "param_value": self.tok_bucket[target],
        }
        total, parts = 0.0, {}
        for key, y in labels.items():
            if (y >= 0).any():
                part = F.cross_entropy(out[key].flatten(0, 1).float(), y.flatten(), ignore_index=-1)
                total = total + self.weights[key] * part
                parts[key] = part.item()
        return total, parts

    def step_p(self, out):
        """The product of the maxima of the heads that made the token: type, then command, or letter, or
        letter and bucket."""
        probs = {k: torch.softmax(v[:, -1].float(), -1).max(-1).values for k, v in out.items() if k != "rows"}
        kind = out["type"][:, -1].argmax(-1)
        one = torch.ones_like(probs["type"])
        p = probs["type"] * torch.where(kind == COMMAND, probs["command"], one)
        p = p * torch.where((kind == PARAMETER) | (kind == NUMERIC), probs["param_type"], one)
        return p * torch.where(kind == NUMERIC, probs["param_value"], one)

    def token_ids(self, out):
        kind = out["type"].argmax(-1)
        letter = out["param_type"].argmax(-1)
        token = torch.full_like(kind, EOS)  # the only SPECIAL ever predicted is EOS
        token = torch.where(kind == COMMAND, self.cmd_token[out["command"].argmax(-1)], token)
        token = torch.where(kind == PARAMETER, self.letter_token[letter], token)
        return torch.where(kind == NUMERIC, self.num_token[letter, out["param_value"].argmax(-1)], token)
