"""Model zoo: `model._target_` (conf/model/*.yaml) names the class. The token models share the
encoder/decoder trunk in encoder.py; `nearest` (nearest.py) is the classical reference they are
measured against."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from hydra.utils import get_class

from gcode_exp.data.vocab import Vocab
from gcode_exp.models.baseline import BaselineModel
from gcode_exp.models.encoder import TokenModel
from gcode_exp.models.multihead import MultiHeadModel
from gcode_exp.models.nearest import NearestModel

if TYPE_CHECKING:
    from gcode_exp.data.dataset import Prepared

__all__ = ["BaselineModel", "MultiHeadModel", "NearestModel", "TokenModel", "build_model", "new_model"]


def build_model(model_cfg, vocab: Vocab, n_inputs: int, window: int, max_len: int,
                lines=None) -> TokenModel | NearestModel:
    """The class `model._target_` names, built from the model config and the data's shapes. `lines`: the
    distinct target lines of the training windows [n, max_len], for the row head. A NearestModel is
    empty until `fit_reference` (or a checkpoint's state) fills it."""
    cls = get_class(model_cfg._target_)
    return cls(model_cfg, vocab=vocab, n_inputs=n_inputs, window=window, max_len=max_len, lines=lines)


def new_model(cfg, data: Prepared) -> tuple[TokenModel | NearestModel, torch.Tensor]:
    """The untrained model of this config for this data (a NearestModel: its reference filled from the
    training split), and the distinct training target lines its row head names."""
    lines = torch.unique(data.splits["train"].targets, dim=0)
    model = build_model(cfg.model, data.vocab, data.features.n_inputs, cfg.data.window, cfg.data.max_len, lines)
    if isinstance(model, NearestModel):
        model.fit_reference(data.splits["train"], data.features, cfg.data.window)
    return model, lines
