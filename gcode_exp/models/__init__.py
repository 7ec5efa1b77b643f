"""Model zoo: `model.name` picks one; all share the encoder/decoder trunk in encoder.py."""

from __future__ import annotations

from gcode_exp.data.vocab import Vocab
from gcode_exp.models.baseline import BaselineModel
from gcode_exp.models.encoder import TokenModel
from gcode_exp.models.multihead import MultiHeadModel


def build_model(model_cfg, vocab: Vocab, n_inputs: int, window: int, max_len: int, lines=None) -> TokenModel:
    """`lines`: the distinct target lines of the training windows [n, max_len], for the row head."""
    if model_cfg.name == "baseline":
        return BaselineModel(n_inputs, len(vocab), window, max_len, model_cfg, lines)
    if model_cfg.name == "multihead":
        return MultiHeadModel(n_inputs, vocab, window, max_len, model_cfg, lines)
    raise ValueError(f"model.name must be baseline or multihead, got {model_cfg.name!r}")
