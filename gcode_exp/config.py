"""One validation step for the composed config: a nonsense value fails before any work starts,
with a message naming the key."""

from __future__ import annotations

import zlib

from omegaconf import DictConfig, OmegaConf

from gcode_exp import GcodeExpError

CHOICES = {
    "task": ("train", "eval", "prepare"),
    "data.target": ("longest", "lines"),
    "data.on_error": ("raise", "skip"),
    "model.name": ("baseline", "multihead"),
    "model.encoder": ("conv", "lstm"),
    "trainer.monitor_mode": ("max", "min"),
    "hardware.device": ("auto", "cpu", "cuda", "mps"),
}
POSITIVE_INTS = ("data.window", "data.stride", "data.max_len", "data.max_lines", "vocab.digits", "model.d_model",
                 "model.enc_layers", "model.dec_layers", "model.n_heads", "trainer.max_epochs", "trainer.patience",
                 "trainer.batch_size")
FEATURE_GROUPS = {"controller", "motors", "boards"}


class ConfigError(GcodeExpError):
    pass


def seed_of(text: str) -> int:
    """A stable seed from a string: `${seed_of:${hydra.sweep.dir}}` seeds each sweep call differently
    (a continued study must not replay the suggestions it already tried) yet reproducibly per folder."""
    return zlib.crc32(str(text).encode()) % 2**31


OmegaConf.register_resolver("seed_of", seed_of, replace=True)


def _get(cfg: DictConfig, key: str):
    node = cfg
    for part in key.split("."):
        if part not in node:
            raise ConfigError(f"{key}: missing from the config")
        node = node[part]
    return node


def validate(cfg: DictConfig) -> None:
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value}: must be one of {', '.join(allowed)}")
    for key in POSITIVE_INTS:
        value = _get(cfg, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{key}={value}: must be a whole number >= 1")
    if cfg.data.max_len < 3:
        raise ConfigError(f"data.max_len={cfg.data.max_len}: must be >= 3 (BOS, a token, EOS)")
    split = list(cfg.data.split)
    if len(split) != 3 or any(not isinstance(f, (int, float)) or f < 0 for f in split) or abs(sum(split) - 1) > 1e-6:
        raise ConfigError(f"data.split={split}: must be three non-negative fractions summing to 1")
    if not 0 <= cfg.data.max_nonfinite <= 1:
        raise ConfigError(f"data.max_nonfinite={cfg.data.max_nonfinite}: must be between 0 and 1")
    groups = list(cfg.features.groups)
    if not groups or not set(groups) <= FEATURE_GROUPS:
        raise ConfigError(f"features.groups={groups}: must be a non-empty subset of {sorted(FEATURE_GROUPS)}")
    factor = cfg.aug.oversample_factor
    if not isinstance(factor, int) or isinstance(factor, bool) or factor < 1:
        raise ConfigError(f"aug.oversample_factor={factor}: must be a whole number >= 1")
    for key in ("noise", "scale"):
        if not 0 <= cfg.aug[key] < 1:
            raise ConfigError(f"aug.{key}={cfg.aug[key]}: must be in [0, 1)")
    if not isinstance(cfg.aug.shift, int) or not 0 <= cfg.aug.shift < cfg.data.window:
        raise ConfigError(f"aug.shift={cfg.aug.shift}: must be a whole number in [0, data.window)")
    if cfg.model.d_model % cfg.model.n_heads:
        raise ConfigError(f"model.d_model={cfg.model.d_model}: must be divisible by model.n_heads={cfg.model.n_heads}")
    if not 0 <= cfg.model.dropout < 1:
        raise ConfigError(f"model.dropout={cfg.model.dropout}: must be in [0, 1)")
    for key, w in (cfg.model.get("loss_weights") or {}).items():
        if not isinstance(w, (int, float)) or w < 0:
            raise ConfigError(f"model.loss_weights.{key}={w}: must be a number >= 0")
    for key in ("lr", "weight_decay", "grad_clip"):
        if cfg.trainer[key] < 0:
            raise ConfigError(f"trainer.{key}={cfg.trainer[key]}: must be >= 0")
    if not cfg.trainer.monitor.startswith("val/"):
        raise ConfigError(f"trainer.monitor={cfg.trainer.monitor}: must be a validation metric (val/<metric>)")
    if cfg.task == "eval" and not cfg.ckpt_path:
        raise ConfigError("ckpt_path: task=eval needs ckpt_path=PATH to a checkpoint (checkpoints/best.pt)")
