"""Model zoo: `model.name` picks one. The token models share the encoder/decoder trunk in encoder.py;
`nearest` (nearest.py) is the classical reference they are measured against."""

from __future__ import annotations

from gcode_exp.data.vocab import Vocab
from gcode_exp.models.baseline import BaselineModel
from gcode_exp.models.encoder import TokenModel
from gcode_exp.models.multihead import MultiHeadModel
from gcode_exp.models.nearest import NearestModel


def build_model(model_cfg, vocab: Vocab, n_inputs: int, window: int, max_len: int,
                lines=None) -> TokenModel | NearestModel:
    """`lines`: the distinct target lines of the training windows [n, max_len], for the row head.
    A NearestModel is empty until `fit_reference` (or a checkpoint's state) fills it."""
    if model_cfg.name == "baseline":
        return BaselineModel(n_inputs, len(vocab), window, max_len, model_cfg, lines)
    if model_cfg.name == "multihead":
        return MultiHeadModel(n_inputs, vocab, window, max_len, model_cfg, lines)
    if model_cfg.name == "nearest":
        return NearestModel(max_len, model_cfg)
    raise ValueError(f"model.name must be baseline, multihead or nearest, got {model_cfg.name!r}")
