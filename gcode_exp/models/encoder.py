"""The shared trunk: a sensor encoder over the window and a causal token decoder that attends to it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gcode_exp.config import build
from gcode_exp.data.vocab import BOS, EOS, PAD, Vocab
from gcode_exp.models.base import Answer, Model


class SensorEncoder(nn.Module):
    """[B, window, n_inputs] -> memory [B, steps, d_model]: rows projected to d_model, a subclass's
    `over_time`, a learnt position per step, layer norm.

    An encoder is a subclass and a YAML file naming it (`conf/model/encoder/*.yaml`, `_target_`); the
    token model builds it with `gcode_exp.config.build`, passing n_inputs, window, d_model, layers and
    dropout, and the YAML's own keys (README, "Adding an encoder")."""

    def __init__(self, n_inputs: int, window: int, d_model: int, steps: int):
        super().__init__()
        self.proj = nn.Linear(n_inputs, d_model)
        self.pos = nn.Parameter(torch.zeros(steps, d_model))
        self.norm = nn.LayerNorm(d_model)

    def over_time(self, h: torch.Tensor) -> torch.Tensor:
        """[B, window, d_model] -> [B, steps, d_model]."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.over_time(self.proj(x))
        return self.norm(h + self.pos[: h.shape[1]])


class ConvEncoder(SensorEncoder):
    """Strided temporal convolutions, each halving the time axis (64 rows -> 16 steps with 2 layers).
    The default: it trains ~1.8x faster on CPU than the LSTM (`python -m gcode_exp.bench`)."""

    def __init__(self, n_inputs: int, window: int, d_model: int, layers: int, dropout: float, kernel: int = 5):
        steps = window
        for _ in range(layers):
            steps = (steps + 1) // 2
        super().__init__(n_inputs, window, d_model, steps)
        self.body = nn.Sequential(*[
            nn.Sequential(nn.Conv1d(d_model, d_model, kernel, stride=2, padding=kernel // 2), nn.GELU(),
                          nn.Dropout(dropout))
            for _ in range(layers)
        ])

    def over_time(self, h: torch.Tensor) -> torch.Tensor:
        return self.body(h.transpose(1, 2)).transpose(1, 2)


class LSTMEncoder(SensorEncoder):
    """A bidirectional LSTM over all rows (one step per row)."""

    def __init__(self, n_inputs: int, window: int, d_model: int, layers: int, dropout: float):
        super().__init__(n_inputs, window, d_model, window)
        self.body = nn.LSTM(d_model, d_model // 2, layers, batch_first=True, bidirectional=True, dropout=dropout)

    def over_time(self, h: torch.Tensor) -> torch.Tensor:
        return self.body(h)[0]


class TokenDecoder(nn.Module):
    """Teacher-forced (or step-by-step) causal transformer decoder with cross-attention to the memory."""

    def __init__(self, vocab_size: int, max_len: int, d_model: int, layers: int, heads: int, dropout: float):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Parameter(torch.zeros(max_len, d_model))
        layer = nn.TransformerDecoderLayer(d_model, heads, 4 * d_model, dropout, batch_first=True, norm_first=True)
        self.body = nn.TransformerDecoder(layer, layers)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tokens: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[1]
        h = self.embed(tokens) + self.pos[:n]
        mask = nn.Transformer.generate_square_subsequent_mask(n, device=tokens.device, dtype=h.dtype)
        return self.norm(self.body(h, memory, tgt_mask=mask, tgt_is_causal=True))


class TokenModel(Model):
    """Encoder + decoder; subclasses add heads, a token loss and the mapping from head outputs to token ids.

    With `row_weight > 0` a row head is trained beside the decoder to name, for every input row, which
    training line it executes (one class per distinct target line of the training windows, plus one
    for any other line). A window's target is the line with the most rows, so this dense supervision
    teaches the encoder where each line starts and ends; the decoder still gives the answer, and can
    answer lines never seen in training. On the real data it lifted line exact most of all the ideas
    tried (docs/RESULTS.md).
    """

    def __init__(self, cfg, vocab: Vocab, n_inputs: int, window: int, max_len: int, lines: torch.Tensor | None):
        super().__init__()
        self.window, self.max_len = window, max_len
        # the one class the config names (validate checked it is a SensorEncoder), nothing else it could call
        self.encoder = build(cfg.encoder, "model.encoder", n_inputs=n_inputs, window=window, d_model=cfg.d_model,
                             layers=cfg.enc_layers, dropout=cfg.dropout)
        self.decoder = TokenDecoder(len(vocab), max_len, cfg.d_model, cfg.dec_layers, cfg.n_heads, cfg.dropout)
        use_rows = cfg.row_weight > 0 and lines is not None and len(lines) > 1
        self.row_weight = float(cfg.row_weight)
        self.register_buffer("lines", lines.long() if use_rows else torch.zeros(0, max_len, dtype=torch.long))
        self.row_head = nn.Linear(cfg.d_model, len(lines) + 1) if use_rows else None

    def heads(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def token_loss(self, out: dict[str, torch.Tensor], target: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def token_ids(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """Token ids [B, L] from head outputs."""
        raise NotImplementedError

    def step_p(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B] the probability of the token `token_ids` picks at the last step of `out`."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        memory = self.encoder(x)
        out = self.heads(self.decoder(tokens, memory))
        if self.row_head is not None:
            out["rows"] = self.rows(memory)
        return out

    def rows(self, memory: torch.Tensor) -> torch.Tensor:
        """Row-head logits [B, window, n_lines + 1]: memory steps back to rows (the conv encoder halves
        time per layer, so each step stands for several rows)."""
        per_row = memory.repeat_interleave(-(-self.window // memory.shape[1]), dim=1)[:, : self.window]
        return self.row_head(per_row)

    def loss(self, out: dict[str, torch.Tensor], target: torch.Tensor, rows: torch.Tensor | None = None):
        """Token loss (the subclass's), plus `row_weight` x the row head's loss where row labels are given."""
        total, parts = self.token_loss(out, target)
        if rows is not None and "rows" in out and (rows >= 0).any():
            row_loss = F.cross_entropy(out["rows"].flatten(0, 1).float(), rows.flatten(), ignore_index=-1)
            total = total + self.row_weight * row_loss
            parts["rows"] = row_loss.item()
        return total, parts

    def row_labels(self, row_targets: torch.Tensor) -> torch.Tensor | None:
        """Per row of a split: its class for the row head (-1 where the row has no line), or None."""
        if self.row_head is None:
            return None
        n = len(self.lines)
        both = torch.cat([self.lines.cpu(), row_targets.long()])
        _, inverse = torch.unique(both, dim=0, return_inverse=True)
        lookup = torch.full((int(inverse.max()) + 1,), n)  # any other line: the last class
        lookup[inverse[:n]] = torch.arange(n)
        labels = lookup[inverse[n:]]
        return torch.where((row_targets == 0).all(1), -1, labels)  # all PAD: an unlabelled row

    @torch.no_grad()
    def answer(self, x: torch.Tensor) -> Answer:
        """Greedy decoding after BOS (the encoder runs once), each sequence's probability up to and including
        its EOS, and the row head's probabilities where the model has one."""
        memory = self.encoder(x)
        rows = self.rows(memory).float().softmax(-1) if self.row_head is not None else None
        tokens = torch.full((len(x), 1), BOS, dtype=torch.long, device=x.device)
        p = torch.ones(len(x), device=x.device)
        done = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        for _ in range(self.max_len - 1):
            out = self.heads(self.decoder(tokens, memory)[:, -1:])
            nxt = self.token_ids(out)[:, -1]
            p = torch.where(done, p, p * self.step_p(out))
            nxt = torch.where(done, PAD, nxt)
            done = done | (nxt == EOS)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            if done.all():
                break
        tokens = F.pad(tokens[:, 1:], (0, self.max_len - tokens.shape[1]), value=PAD)
        return Answer(tokens, p.float(), rows)
