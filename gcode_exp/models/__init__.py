"""Model zoo: `model._target_` (conf/model/*.yaml) names the class, a `Model` (base.py), the one interface
the rest of the project sees. The token models share the encoder/decoder trunk in encoder.py; `nearest`
(nearest.py) is the reference search they are measured against."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from hydra.utils import get_class

from gcode_exp.data.vocab import Vocab
from gcode_exp.models.base import Answer, Model, Windows
from gcode_exp.models.baseline import BaselineModel
from gcode_exp.models.encoder import TokenModel
from gcode_exp.models.multihead import MultiHeadModel
from gcode_exp.models.nearest import NearestModel

if TYPE_CHECKING:
    from gcode_exp.data.dataset import Prepared

__all__ = ["Answer", "BaselineModel", "Model", "MultiHeadModel", "NearestModel", "TokenModel", "Windows",
           "build_model", "learns", "new_model"]


def build_model(model_cfg, vocab: Vocab, n_inputs: int, window: int, max_len: int, lines=None) -> Model:
    """The class `model._target_` names, built from the model config and the data's shapes. `lines`: the
    distinct target lines of the training windows [n, max_len], for a row head. Empty until `fit` (or
    `load_state` with a checkpoint's state) fills what it keeps of the training data."""
    cls = get_class(model_cfg._target_)
    return cls(model_cfg, vocab=vocab, n_inputs=n_inputs, window=window, max_len=max_len, lines=lines)


def new_model(cfg, data: Prepared) -> tuple[Model, torch.Tensor]:
    """The model of this config fitted to the training split (before any optimiser step), and the
    distinct training target lines a row head names."""
    lines = torch.unique(data.splits["train"].targets, dim=0)
    model = build_model(cfg.model, data.vocab, data.features.n_inputs, cfg.data.window, cfg.data.max_len, lines)
    model.fit(data.splits["train"], data.features, cfg.data.window)
    return model, lines


def learns(model_cfg) -> bool:
    """Whether the model a config names is trained by optimiser steps (before it is built)."""
    return bool(get_class(model_cfg._target_).learns)
