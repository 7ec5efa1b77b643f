"""A checkpoint is one dict: model, optimiser, vocabulary, features, config, epoch, RNG and loop state.
Everything `task=eval` needs to read new recordings exactly as the training data was read. Written by
`save_checkpoint`; read only through `Checkpoint`, which checks it and says what it imposes on a run."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from gcode_exp import GcodeExpError, trust
from gcode_exp.atomic import torch_save
from gcode_exp.config import READS_CHECKPOINT
from gcode_exp.data.dataset import HOW_READ, Prepared
from gcode_exp.data.read import recording_key
from gcode_exp.data.vocab import Vocab
from gcode_exp.data.windows import Features
from gcode_exp.models import Model, build_model
from gcode_exp.training.metrics import majority_line

log = logging.getLogger(__name__)

FORMAT = "gcode-exp/2"  # /1: the development format before 2026-12-07 (configs of several spellings)
EARLIER = ("gcode-exp/1",)
REQUIRED = ("format", "model", "vocab", "features", "config", "epoch", "majority_line", "lines", "train_windows")
# what a checkpoint's own config decides: of an interrupted run when resumed (its experiment, not the
# trainer's knobs); of the model task=eval and task=predict read recordings for (all but the data's place)
RESUMED_GROUPS = ("model", "vocab", "features", "data", "aug", "seed", "name")
USERS_DATA = ("dir", "pattern", "on_error", "max_nonfinite", "path", *HOW_READ)  # eval/predict: the command's


def save_checkpoint(path: Path, **blob) -> None:
    torch_save({"format": FORMAT, **blob}, path)


def describe(cfg, data: Prepared, lines: torch.Tensor) -> dict:
    """What every checkpoint of a run carries besides its weights: all that `Checkpoint.model`, task=eval
    and task=predict need, so that none of them reads a model setting from the command line."""
    train = data.splits["train"]
    return {
        "vocab": data.vocab.to_dict(),
        "features": vars(data.features),
        "config": trust.redact(OmegaConf.to_container(cfg, resolve=True)),  # no storage password in a .pt
        "majority_line": majority_line(train.targets),
        "lines": lines,
        # what task=predict names programs from: the training windows' targets per file
        "train_windows": {"files": train.files, "file_windows": train.file_windows, "targets": train.targets},
    }


class Checkpoint:
    """One checked checkpoint: the only place that knows what a checkpoint imposes on a run that reads
    it (the model, how recordings are read, what a resumed run may change), and where a checkpoint from
    someone else is refused before anything it names is imported (gcode_exp/trust.py). Made by `load`."""

    def __init__(self, stored: dict, path: Path, features: Features, vocab: Vocab):
        self.stored = stored  # as saved: weights, optimiser, schedule, RNG and loop state, epoch
        self.path, self.features, self.vocab = path, features, vocab
        self.config: dict = stored["config"]  # as trained, checked against the allow-list

    @property
    def majority_line(self) -> torch.Tensor:
        return self.stored["majority_line"]

    @property
    def train_windows(self) -> dict:
        """The training split's files, windows per file and targets."""
        return self.stored["train_windows"]

    @classmethod
    def load(cls, path: str | Path, source: str | None = None) -> Checkpoint:
        """Load and check a checkpoint; a missing file or a foreign one is a one-line error, which begins
        with `source`, where the path came from (default: `ckpt_path=PATH`, what the user typed). A checkpoint
        may come from someone else: its config may name only allowed classes (gcode_exp/trust.py)."""
        path = Path(path)
        where = source or f"ckpt_path={path}"
        if path.is_dir():
            why = folder_hint(path) if source is None else "a folder, not a checkpoint file"
            raise GcodeExpError(f"{where}: {why}")
        if not path.is_file():
            raise GcodeExpError(f"{where}: no such file")
        try:  # tensors, numbers, strings and containers only: loading a checkpoint runs no code from it
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise GcodeExpError(f"{where}: not a readable checkpoint ({type(e).__name__})") from None
        if isinstance(blob, dict) and blob.get("format") in EARLIER:
            raise GcodeExpError(f"{where}: a checkpoint of an earlier development format ({blob['format']}; this "
                                f"version reads {FORMAT}): fit or train it again with this version")
        if not isinstance(blob, dict) or blob.get("format") != FORMAT or any(k not in blob for k in REQUIRED):
            raise GcodeExpError(f"{where}: not a gcode-exp checkpoint (format {FORMAT})")
        try:  # what every reader rebuilds from it: a damaged part is named here, not met as a bug later
            features, vocab = Features(**blob["features"]), Vocab.from_dict(blob["vocab"])
        except Exception as e:
            raise GcodeExpError(f"{where}: a damaged checkpoint ({type(e).__name__} reading its "
                                "features and vocabulary)") from None
        if not isinstance(blob["config"], dict):
            raise GcodeExpError(f"{where}: a damaged checkpoint (its config is not a mapping)")
        data = blob["config"].get("data")
        for key in ("window", "stride", "max_len"):  # the window geometry every reader takes from it
            value = data.get(key) if isinstance(data, dict) else None
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise GcodeExpError(f"{where}: a damaged checkpoint (its config's data.{key} is {value!r}, not a "
                                    "whole number >= 1)")
        trust.check_stored(blob["config"], where)  # before any reader imports or builds what it names
        return cls(blob, path, features, vocab)

    def model(self, device) -> tuple[Model, Vocab]:
        """Rebuild the model the checkpoint was trained with, weights loaded, in eval mode."""
        try:  # a config that does not compose (a key cut, `???`, a broken interpolation) is damage, not a bug
            cfg = OmegaConf.create(self.config)
            shapes = (cfg.model, cfg.data.window, cfg.data.max_len)
        except (OmegaConfBaseException, TypeError, ValueError, AttributeError) as e:
            why = " ".join(str(e).split())[:200] or type(e).__name__
            raise GcodeExpError(f"ckpt_path={self.path}: a damaged checkpoint (its config: {why})") from None
        try:
            model = build_model(shapes[0], self.vocab, self.features.n_inputs, shapes[1], shapes[2],
                                self.stored["lines"])
            model.load_state(self.stored["model"])
        except (RuntimeError, KeyError, TypeError, ValueError, AttributeError) as e:
            why = " ".join(str(e).split()) or type(e).__name__  # torch names the missing keys on its second line
            raise GcodeExpError(f"ckpt_path={self.path}: its weights do not fit the model its config "
                                f"describes ({why[:300]})") from None
        return model.to(device).eval(), self.vocab

    def seen_in_training(self, names: list[str]) -> list[str]:
        """The recordings among `names` (a perturbed `a+b`: either part) that were in the checkpoint's own
        training split, warned about: their scores are of memorised recordings, not unseen ones."""
        train = {recording_key(n) for n in self.train_windows["files"]}
        seen = [n for n in names if any(recording_key(part) in train for part in n.split("+"))]
        if seen:
            log.warning("%d of the %d scored recordings were in the checkpoint's training split (%s%s): their "
                        "scores are not those of unseen recordings", len(seen), len(names), ", ".join(seen[:5]),
                        " ..." if len(seen) > 5 else "")
        return seen

    def check_resume(self, cfg: DictConfig) -> list[str]:
        """Resuming must continue the same experiment: a changed model, data, vocabulary, feature set or seed
        is refused with the keys that differ (run_folder.claim asks before the folder is touched). Returns
        the trainer keys the command changes: those are applied."""
        old, new = self.config, OmegaConf.to_container(cfg, resolve=True)
        known = OmegaConf.create(old)  # a key the run's config lacks is newer than the run: not a change
        fixed = [k for k in diff_keys(old, new) if (k.split(".")[0] in ("model", "vocab", "features", "seed")
                 or k in ("trainer.optimizer._target_", "trainer.scheduler._target_")  # state of another class
                 or (k.startswith("data.") and k.removeprefix("data.") not in ("on_error", *HOW_READ)))
                 and OmegaConf.select(known, k, default="<absent>") != "<absent>"]
        if fixed:
            raise GcodeExpError(f"trainer.resume=true: the run was trained with other settings "
                                f"({', '.join(fixed)}); resume with the same ones, or start a new run")
        return [k for k in diff_keys(old.get("trainer", {}), new["trainer"], "trainer.") if k != "trainer.resume"]

    def reading_config(self, cfg: DictConfig, explicit: list[str]) -> DictConfig:
        """`cfg` with the settings this checkpoint decides taken from it, so that a default changed since it
        was written never changes what it does, and the run folder records what ran:

        - `trainer.resume=true` (task=train): the run's own model, data, vocabulary, features,
          augmentation and seed. Keys set on the command line (`explicit`) are kept, so that
          `check_resume` refuses them if they differ.
        - task=eval, predict, serve: the same, but the data's place (data.dir, pattern, path, ...) from
          the command; a command-line key that would read the recordings another way than the model was
          trained is refused, naming it."""
        old, scoring = self.config, cfg.task in READS_CHECKPOINT
        if scoring:
            _refuse_changed(cfg, OmegaConf.create(old), explicit)
        out = cfg.copy()
        with open_dict(out):
            for group in RESUMED_GROUPS:
                if group in old and group not in explicit:
                    kept = {k: OmegaConf.select(cfg, k) for k in explicit if k.startswith(group + ".")}
                    same_kind = isinstance(old[group], dict) and old[group].get("name") == cfg[group].get("name")
                    # keys added since the run started keep their defaults; another model's keys do not mix in
                    out[group] = OmegaConf.merge(cfg[group], old[group]) if same_kind else old[group]
                    for key, value in kept.items():
                        OmegaConf.update(out, key, value, force_add=True)
            if scoring:
                for key in USERS_DATA:
                    if key in cfg.data:
                        out.data[key] = cfg.data[key]
        return out


def _refuse_changed(cfg: DictConfig, old: DictConfig, keys: list[str]) -> None:
    """task=eval/predict: a command-line key the checkpoint decides, set to another value than it has."""
    for key in keys:
        group = key.split(".")[0]
        if group not in ("model", "vocab", "features", "data") or (group == "data" and key[5:] in USERS_DATA):
            continue  # the run's label, seed and augmentation change nothing in what a trained model answers
        mine, theirs = (f"{key}.name", f"{key}.name") if key == group and group != "seed" else (key, key)
        now, then = OmegaConf.select(cfg, mine), OmegaConf.select(old, theirs, default="<absent>")
        if then != "<absent>" and now != then:
            shown = OmegaConf.select(cfg, key) if key == mine else now
            raise GcodeExpError(f"{key}={_text(shown)}: task={cfg.task} reads recordings the way the checkpoint "
                                f"was trained ({theirs}={_text(then)}); drop it")


def _text(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def folder_hint(path: Path) -> str:
    """`ckpt_path=` names a folder: say so, and name the checkpoint it holds (a run folder's best.pt)."""
    for inside in (path / "checkpoints" / "best.pt", path / "best.pt"):
        if inside.is_file():
            return f"a folder, not a checkpoint file; did you mean ckpt_path={inside}?"
    return "a folder, not a checkpoint file (a run folder holds its best as checkpoints/best.pt)"


def diff_keys(a, b, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [k for key in sorted(set(a) | set(b)) for k in diff_keys(a.get(key), b.get(key), f"{prefix}{key}.")]
    return [] if a == b else [prefix.rstrip(".")]
