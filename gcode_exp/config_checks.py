"""`validate`: a composed config checked against the schema (gcode_exp/config.py SCHEMA), key by key and
between keys, before any data file is read; `check_against_data`: the few checks that need the training data.

A refusal is a ConfigError of one line naming the key; a warning is logged as gcode_exp.config's.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Sequence
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gcode_exp.config import (
    BUILT,
    COMMAND_WORD,
    LOOPBACK,
    READS_CHECKPOINT,
    SCHEMA,
    SERVE_TOKEN_ENV,
    ConfigError,
    fail,
    keywords,
    shown,
    warn,
)
from gcode_exp.rules import Rule, named_class
from gcode_exp.training.metrics import LOWER_IS_BETTER, metric_names


def _flatten(node: DictConfig, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> plain value, resolving interpolations one key at a time so that a broken one
    (`${oc.env:UNSET}`, `???`) is reported against its key."""
    out: dict[str, Any] = {}
    for key in node:
        path = f"{prefix}{key}"
        if path == "hydra":  # present only in configs composed with return_hydra_config
            continue
        if OmegaConf.is_missing(node, key):
            raise ConfigError(f"{path}=???: needs a value")
        try:
            value = node[key]
            if isinstance(value, ListConfig):
                value = OmegaConf.to_container(value, resolve=True)
        except OmegaConfBaseException as e:
            raise ConfigError(f"{path}: cannot be resolved: {str(e).splitlines()[0]}") from None
        if isinstance(value, DictConfig):  # an empty one adds nothing: its keys are reported missing
            out.update(_flatten(value, path + "."))
        else:
            out[path] = value
    return out


def _condition(flat: dict[str, Any], only_if: str) -> tuple[bool, str]:
    key, _, wanted = only_if.partition("=")
    return shown(flat.get(key)) in wanted.split("|"), f"{key}={shown(flat.get(key))}"


def validate(cfg: DictConfig) -> None:
    """Refuse (ConfigError naming the key) or warn about a config before any file is read."""
    flat = _flatten(cfg)
    for group, folder, what in (("model.encoder", "model/encoder", "encoder"),
                                ("trainer.scheduler", "trainer/scheduler", "schedule")):
        if isinstance(flat.get(group), str):  # the spelling of before the group
            raise fail(group, flat[group], f"the {what} is a config group: {folder}={flat[group]} (conf/{folder}/)")
    own = model_rules(flat)
    for key, rule in own.items():
        if key not in flat:
            raise ConfigError(f"{key}: missing from the config")
        if not rule.ok(flat[key]):
            raise fail(key, flat[key], f"must be {rule.what}")
    for key, value in flat.items():
        built = next((b for b in BUILT if key.startswith(b + ".") and key != b + "._target_"), None)
        if built:
            _check_kwarg(flat, key, built)
            continue
        if key not in SCHEMA and key not in own:
            near = difflib.get_close_matches(key, list(SCHEMA), n=1)
            hint = f"; did you mean {near[0]}?" if near else ""
            raise fail(key, value, f"unknown key{hint} (gcode_exp/config.py SCHEMA lists every key)")
    for key, rule in SCHEMA.items():
        if rule.only_if:
            needed, because = _condition(flat, rule.only_if)
            if not needed:
                if key in flat:
                    warn(key, flat[key], f"ignored with {because}")
                continue
        if key not in flat:
            if rule.optional:
                continue
            raise ConfigError(f"{key}: missing from the config")
        if not rule.ok(flat[key]):
            raise fail(key, flat[key], f"must be {rule.what}")
    _check_rules(cfg, flat)


def model_rules(flat: dict[str, Any]) -> dict[str, Rule]:
    """The rules of the keys a model class declares itself (`Model.rules`, by key under `model.`), so that
    a new approach brings its keys in its own module; none where the class does not import."""
    cls = named_class(flat.get("model._target_"), "gcode_exp.models.base:Model")
    return {f"model.{k}": rule for k, rule in getattr(cls, "rules", {}).items()}


def _check_kwarg(flat: dict[str, Any], key: str, built: str) -> None:
    """The keys of a config that builds an object (`_target_`) are its class's keyword arguments, less
    those the project passes itself (a user's encoder or optimiser brings its own)."""
    base, given, by = BUILT[built]
    cls = named_class(flat.get(f"{built}._target_"), base)
    if cls is None:
        return  # the _target_ rule reports it
    name, takes = key[len(built) + 1 :], keywords(cls)
    if name in given:
        raise fail(key, flat[key], f"set by {by} ({', '.join(given)})")
    if name not in takes:
        own = [p for p in takes if p not in given]
        raise fail(key, flat[key], f"unknown key: {cls.__name__} takes {', '.join(own) or 'no keys of its own'}")


def _check_rules(cfg: DictConfig, flat: dict[str, Any]) -> None:
    """Rules between keys, and settings that would make the run meaningless."""
    get = flat.get
    if get("model.name") in ("baseline", "multihead") and get("model.d_model") % get("model.n_heads"):
        raise fail("model.d_model", get("model.d_model"), f"must be divisible by model.n_heads={get('model.n_heads')}")
    if get("model.key") == "position" and "controller" not in (get("features.groups") or []):
        raise fail("model.key", "position", "needs the controller's work position among the inputs "
                    "(features.groups with controller, e.g. features=all)")
    if get("data.train_share") < 1 and get("data.split_by") == "window":
        raise fail("data.train_share", get("data.train_share"), "needs data.split_by=file or operation "
                    "(it keeps a share of the training files)")
    if (get("aug.shift") or 0) >= get("data.window"):
        raise fail("aug.shift", get("aug.shift"), f"must be < data.window={get('data.window')}")
    weights = {k: v for k, v in flat.items() if k.startswith("model.loss_weights.")}
    if weights and get("model.name") == "multihead":
        if not any(weights.values()):
            raise ConfigError("model.loss_weights: every weight is 0, so the model learns nothing")
        for key, w in weights.items():
            if w == 0:
                warn(key, w, "this head is never trained, so what it predicts is random")
    rare = get("aug.rare_commands")
    if isinstance(rare, list):
        for word in rare:
            m = COMMAND_WORD.match(str(word).upper())
            if not m:
                raise fail("aug.rare_commands", rare, f"{word} is not a G/M command word such as G0, G2, M3")
            written = f"{m.group(1)}{float(m.group(2)):g}"  # how the vocabulary writes it (G01 -> G1)
            if word != written:
                raise fail("aug.rare_commands", rare, f"{word} is written {written} in the vocabulary")
        if get("aug.oversample_factor") == 1:
            warn("aug.rare_commands", rare, "ignored with aug.oversample_factor=1 (no oversampling)")

    monitor = get("trainer.monitor")
    _check_metric("trainer.monitor", monitor, [f"val/{m}" for m in metric_names(cfg, per_epoch=True)],
                  "not in the per-epoch validation row early stopping reads")
    if monitor == "val/line_exact" and not get("trainer.line_exact"):
        raise fail("trainer.monitor", monitor, "needs trainer.line_exact=true (the final scores must hold it too)")
    want = "min" if str(monitor).split("/")[-1] in LOWER_IS_BETTER else "max"
    if get("trainer.monitor_mode") != want:
        raise fail("trainer.monitor_mode", get("trainer.monitor_mode"),
                    f"{monitor} is better when {'lower' if want == 'min' else 'higher'}: use {want}")
    objective, task = get("optimized_metric"), get("task")
    if objective is not None and task == "train":
        _check_metric("optimized_metric", objective, [f"{s}/{m}" for s in ("val", "test") for m in metric_names(cfg)],
                      "not a metric this run writes")
    elif objective is not None:  # gcode_exp.tasks.objective: only a training run returns a number to optimise
        warn("optimized_metric", objective, f"ignored with task={task} (only task=train returns an objective)")

    reads_ckpt = task in READS_CHECKPOINT
    if task != "train" and get("trainer.resume"):  # only training resumes; eval/predict/serve read a checkpoint
        if reads_ckpt and not get("ckpt_path"):
            raise fail("trainer.resume", True, f"only task=train resumes an interrupted run; task={task} reads "
                        "a trained checkpoint: pass ckpt_path=RUN/checkpoints/best.pt instead")
        warn("trainer.resume", True, f"ignored with task={task} (only task=train resumes a run)")
    if reads_ckpt and not get("ckpt_path"):
        raise ConfigError(f"ckpt_path: task={task} needs ckpt_path=PATH to a checkpoint (checkpoints/best.pt)")
    if not reads_ckpt and get("ckpt_path"):
        warn("ckpt_path", get("ckpt_path"), f"ignored with task={task} (only task=eval, predict and serve read it)")
    live = task == "predict" and get("predict.follow")
    _check_perturb(flat, live or task == "serve")
    if live and not get("data.path"):
        raise ConfigError("data.path: predict.follow=true needs data.path=FILE.csv (the recording being written)")
    if task == "serve":
        _check_serve(get)
    elif get("data.path") and not live:
        warn("data.path", get("data.path"), "ignored without task=predict predict.follow=true or task=serve "
              "(data.dir is read)")
    if get("predict.fallback") and (task != "predict" or live):
        warn("predict.fallback", get("predict.fallback"), "ignored: only task=predict reads it, offline (a whole "
              "recording's novelty decides which checkpoint answers it)")


def _check_serve(get: Callable[[str], Any]) -> None:
    """task=serve: something to follow, and a token before listening beyond this machine."""
    if not get("serve.machines") and not get("data.path"):
        raise ConfigError("serve.machines: task=serve needs the recordings to follow: serve.machines=[A.csv,B.csv] "
                          "(or data.path=FILE.csv for one)")
    if get("serve.machines") and get("data.path"):
        warn("data.path", get("data.path"), "ignored: serve.machines names the recordings to follow")
    if str(get("serve.host")) not in LOOPBACK and not (get("serve.token") or os.environ.get(SERVE_TOKEN_ENV)):
        raise fail("serve.host", get("serve.host"), f"listening beyond this machine needs a token: set "
                    f"{SERVE_TOKEN_ENV} (or serve.token=...), or keep serve.host=127.0.0.1")


def _check_perturb(flat: dict[str, Any], live: bool) -> None:
    """A perturbation changes a recording as a whole, and only the scored ones: refused in live mode (a file
    read while it grows), ignored by the tasks that score nothing."""
    from gcode_exp.data.perturb import applied

    changed = applied({k.removeprefix("perturb."): v for k, v in flat.items() if k.startswith("perturb.")})
    if not changed:
        return
    key, _, value = changed[0].partition("=")
    if live:
        raise ConfigError(f"{changed[0]}: not with predict.follow=true or task=serve (live mode reads a recording "
                          "while it is written; a perturbation changes a recording as a whole): use perturb=none")
    if flat.get("task") not in ("eval", "predict"):
        warn(key, value, f"ignored with task={flat.get('task')} (only task=eval and task=predict score perturbed "
              "recordings)")


def _check_metric(key: str, value: Any, allowed: list[str], why: str) -> None:
    if value in allowed:
        return
    near = difflib.get_close_matches(str(value), allowed, n=1, cutoff=0.8)
    hint = f"; did you mean {near[0]}?" if near else ""
    raise fail(key, value, f"{why}{hint} (choices: {', '.join(allowed)})")


# --- checks that need the data ---------------------------------------------------------------------------
MAX_CUT_SHARE = 0.5  # data.max_len cutting more than this share of the targets is refused


def check_against_data(cfg: DictConfig, tokens: Sequence[str], cut_share: float, longest: int | None = None) -> None:
    """The checks that need the training data; call once the vocabulary is built, before training.

    `tokens`: the vocabulary's tokens (fitted on training files). `cut_share`: the share of windows
    whose target (BOS + tokens + EOS) is longer than data.max_len and so gets cut; `longest`: the
    longest such target, suggested as the value to use."""
    commands = [t for t in tokens if COMMAND_WORD.match(t)]
    rare, factor = cfg.aug.rare_commands, cfg.aug.oversample_factor
    if factor > 1 and rare != "auto":
        rare = list(rare)
        known = [c for c in rare if c in commands]
        if not known:
            raise fail("aug.rare_commands", rare, "names no command of the training vocabulary "
                        f"({', '.join(commands)}), so nothing is oversampled")
        if len(known) < len(rare):
            warn("aug.rare_commands", rare, f"{', '.join(c for c in rare if c not in known)} never occurs in the "
                  "training targets")
    elif factor > 1 and len(commands) < 2:
        warn("aug.oversample_factor", factor, f"the training targets hold one command ({', '.join(commands)}), "
              "so aug.rare_commands=auto finds nothing to oversample")
    if cut_share > 0:
        suggest = f"; the longest needs data.max_len={longest}" if longest else ""
        why = f"cuts {cut_share:.0%} of the targets{suggest}"
        if cut_share > MAX_CUT_SHARE:
            raise fail("data.max_len", cfg.data.max_len, why)
        warn("data.max_len", cfg.data.max_len, why)
