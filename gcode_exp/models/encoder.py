"""The shared trunk: a sensor encoder over the window and a causal token decoder that attends to it."""

from __future__ import annotations

import torch
from torch import nn


class SensorEncoder(nn.Module):
    """[B, window, n_inputs] -> memory [B, steps, d_model].

    `conv`: strided temporal convolutions, each halving the time axis (64 rows -> 16 steps with 2
    layers); `lstm`: a bidirectional LSTM over all rows. The conv encoder is the default because it
    trains ~1.8x faster on CPU (docs/RESULTS.md, `python -m gcode_exp.bench`); the LSTM's accuracy on
    the real data has not been compared yet.
    """

    def __init__(self, n_inputs: int, window: int, d_model: int, layers: int, kind: str, dropout: float):
        super().__init__()
        self.kind = kind
        self.proj = nn.Linear(n_inputs, d_model)
        if kind == "conv":
            self.body = nn.Sequential(
                *[
                    nn.Sequential(nn.Conv1d(d_model, d_model, 5, stride=2, padding=2), nn.GELU(), nn.Dropout(dropout))
                    for _ in range(layers)
                ]
            )
            steps = window
            for _ in range(layers):
                steps = (steps + 1) // 2
        elif kind == "lstm":
            self.body = nn.LSTM(d_model, d_model // 2, layers, batch_first=True, bidirectional=True, dropout=dropout)
            steps = window
        else:
            raise ValueError(f"model.encoder must be conv or lstm, got {kind!r}")
        self.pos = nn.Parameter(torch.zeros(steps, d_model))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        if self.kind == "conv":
            h = self.body(h.transpose(1, 2)).transpose(1, 2)
        else:
            h, _ = self.body(h)
        return self.norm(h + self.pos[: h.shape[1]])


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


class TokenModel(nn.Module):
    """Encoder + decoder; subclasses add heads, a loss and the mapping from head outputs to token ids."""

    def __init__(self, n_inputs: int, vocab_size: int, window: int, max_len: int, cfg):
        super().__init__()
        self.encoder = SensorEncoder(n_inputs, window, cfg.d_model, cfg.enc_layers, cfg.encoder, cfg.dropout)
        self.decoder = TokenDecoder(vocab_size, max_len, cfg.d_model, cfg.dec_layers, cfg.n_heads, cfg.dropout)

    def heads(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.heads(self.decoder(tokens, self.encoder(x)))

    def loss(self, out: dict[str, torch.Tensor], target: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def predict(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """Token ids [B, L] from head outputs."""
        raise NotImplementedError

    @torch.no_grad()
    def generate(self, x: torch.Tensor, length: int, bos: int) -> torch.Tensor:
        """Free-running greedy decoding of `length` tokens after BOS (the encoder runs once)."""
        memory = self.encoder(x)
        tokens = torch.full((len(x), 1), bos, dtype=torch.long, device=x.device)
        for _ in range(length):
            out = self.heads(self.decoder(tokens, memory)[:, -1:])
            tokens = torch.cat([tokens, self.predict(out)], dim=1)
        return tokens[:, 1:]
