"""A checkpoint is one dict: model, optimiser, vocabulary, features, config, epoch, RNG and loop state.
Everything `task=eval` needs to read new recordings exactly as the training data was read."""

from __future__ import annotations

from pathlib import Path

import torch

from gcode_exp import GcodeExpError
from gcode_exp.atomic import torch_save
from gcode_exp.data.dataset import Features
from gcode_exp.data.vocab import Vocab

FORMAT = "gcode-exp/1"
REQUIRED = ("format", "model", "vocab", "features", "config", "epoch", "majority_line")
# checkpoints written before the model and encoder configs named their classes (`_target_`)
OLD_MODELS = {"baseline": "gcode_exp.models.baseline.BaselineModel",
              "multihead": "gcode_exp.models.multihead.MultiHeadModel",
              "nearest": "gcode_exp.models.nearest.NearestModel"}
OLD_ENCODERS = {"conv": {"_target_": "gcode_exp.models.encoder.ConvEncoder", "kernel": 5},
                "lstm": {"_target_": "gcode_exp.models.encoder.LSTMEncoder"}}


def save_checkpoint(path: Path, **blob) -> None:
    torch_save({"format": FORMAT, **blob}, path)


def load_checkpoint(path: str | Path, source: str | None = None) -> dict:
    """Load and check a checkpoint; a missing file or a foreign one is a one-line error, which begins
    with `source`, where the path came from (default: `ckpt_path=PATH`, what the user typed)."""
    path = Path(path)
    where = source or f"ckpt_path={path}"
    if path.is_dir():
        raise GcodeExpError(f"{where}: {folder_hint(path) if source is None else 'a folder, not a checkpoint file'}")
    if not path.is_file():
        raise GcodeExpError(f"{where}: no such file")
    try:  # tensors, numbers, strings and containers only: loading a checkpoint runs no code from it
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise GcodeExpError(f"{where}: not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT or any(k not in blob for k in REQUIRED):
        raise GcodeExpError(f"{where}: not a gcode-exp checkpoint (format {FORMAT})")
    try:  # what every reader rebuilds from it: a damaged part is named here, not met as a bug later
        Features(**blob["features"])
        Vocab.from_dict(blob["vocab"])
    except Exception as e:
        raise GcodeExpError(f"{where}: a damaged checkpoint ({type(e).__name__} reading its "
                            "features and vocabulary)") from None
    blob["config"], blob["path"] = upgraded(blob["config"]), str(path)
    return blob


def folder_hint(path: Path) -> str:
    """`ckpt_path=` names a folder: say so, and name the checkpoint it holds (a run folder's best.pt)."""
    for inside in (path / "checkpoints" / "best.pt", path / "best.pt"):
        if inside.is_file():
            return f"a folder, not a checkpoint file; did you mean ckpt_path={inside}?"
    return "a folder, not a checkpoint file (a run folder holds its best as checkpoints/best.pt)"


def upgraded(config: dict) -> dict:
    """A checkpoint's config in today's spelling, so that an older checkpoint evaluates, predicts and
    resumes as before: the model and encoder classes it was built with, named (`_target_`)."""
    model = config.get("model")
    if isinstance(model, dict) and model.get("name") in OLD_MODELS:
        model = {"_target_": OLD_MODELS[model["name"]], **model}
        if isinstance(model.get("encoder"), str) and model["encoder"] in OLD_ENCODERS:
            model["encoder"] = dict(OLD_ENCODERS[model["encoder"]])
        config = {**config, "model": model}
    return config
