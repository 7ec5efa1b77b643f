"""The config schema: every key of every conf/ group with its type, range or choices.

`validate` checks the composed config before any data file is read, so a bad value stops the run
with one line naming the key (`error: trainer.lr=abc: must be a number in (0, 1]`, exit code 2)
instead of a traceback, a training run against a metric that does not exist, or a silently
meaningless run. `check_against_data` does the few checks that need the training data.

Why a table read by `validate` and not dataclasses in Hydra's ConfigStore: Hydra rejects a typed
field before run.py's `main` starts, so the message would be Hydra's (several lines, exit code 1),
and a dataclass cannot state ranges, rules between keys or the metric names a run produces.

Adding a key: one line in SCHEMA (and its comment in conf/). A key composed into the config but
missing from SCHEMA is refused as unknown, so a misspelled `+trainer.monitr=...` never passes.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gcode_exp import GcodeExpError

log = logging.getLogger(__name__)


class ConfigError(GcodeExpError):
    """A config value that cannot work; the message starts with `key=value:`."""


def seed_of(text: str) -> int:
    """A stable seed from a string: `${seed_of:${hydra.sweep.dir}}` seeds each sweep call differently
    (a continued study must not replay the suggestions it already tried) yet reproducibly per folder."""
    return zlib.crc32(str(text).encode()) % 2**31


def folder_label(task: str, name: str, perturb: str) -> str:
    """A run folder's label: what a run fits (`name`); for a job that scores a checkpoint, the task and
    the perturbation (`eval-crop`), since its model is the checkpoint's, unknown until it is read."""
    return name if task in ("train", "prepare") else f"{task}-{perturb}"


OmegaConf.register_resolver("seed_of", seed_of, replace=True)
OmegaConf.register_resolver("folder_label", folder_label, replace=True)


# --- metric names -------------------------------------------------------------------------------------
# keys of gcode_exp.training.metrics.token_metrics (tests/test_config.py keeps the two in step)
TOKEN_METRICS = ("overall_acc", "command_acc", "type_acc", "param_type_acc", "param_value_acc", "unique_tokens",
                 "token_coverage", "command_macro_recall", "token_macro_recall")
LOWER_IS_BETTER = ("loss",)


def metric_names(cfg: DictConfig, per_epoch: bool = False) -> list[str]:
    """Metric names (without the `val/`, `test/` prefix) a run of `cfg` writes for a split.

    Every token metric, the loss and `line_exact` (free-running decoding). Per epoch, validation
    decodes only when trainer.monitor asks for val/line_exact (it costs about a quarter of an epoch);
    at the end, when trainer.line_exact is on."""
    return [*TOKEN_METRICS, "loss", *(["line_exact"] if cfg.trainer.get("line_exact") or per_epoch else [])]


# --- rules --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """What one key accepts: `ok(value)`, described by `what` in the message (`must be <what>`).

    `only_if="model.name=multihead"`: the key is needed only then; elsewhere it is ignored, so
    setting it is warned about. `optional`: the key may be absent (a group that adds it)."""

    what: str
    ok: Callable[[Any], bool]
    only_if: str | None = None
    optional: bool = False


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _range(ge=None, gt=None, le=None, lt=None) -> tuple[str, Callable[[Any], bool]]:
    lo, lo_open = (gt, True) if gt is not None else (ge, False)
    hi, hi_open = (lt, True) if lt is not None else (le, False)
    if lo is not None and hi is not None:
        text = f"between {lo} and {hi}" if not (lo_open or hi_open) else \
            f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    elif lo is not None:
        text = f"{'>' if lo_open else '>='} {lo}"
    elif hi is not None:
        text = f"{'<' if hi_open else '<='} {hi}"
    else:
        text = ""

    def inside(v) -> bool:
        return ((lo is None or (v > lo if lo_open else v >= lo))
                and (hi is None or (v < hi if hi_open else v <= hi)))

    return text, inside


def _note(what: str, note: str | None) -> str:
    return f"{what} ({note})" if note else what


def Int(ge=None, le=None, note: str | None = None, **kw) -> Rule:
    text, inside = _range(ge=ge, le=le)
    return Rule(_note(f"a whole number {text}".strip(), note), lambda v: _is_int(v) and inside(v), **kw)


def Float(ge=None, gt=None, le=None, lt=None, note: str | None = None, **kw) -> Rule:
    """A finite number (nan and inf are refused); a closed range reads `between 0 and 1`."""
    text, inside = _range(ge=ge, gt=gt, le=le, lt=lt)
    what = text if text.startswith("between") else f"a number {text}".strip()
    return Rule(_note(what, note), lambda v: _is_num(v) and inside(v), **kw)


def Bool(**kw) -> Rule:
    return Rule("true or false", lambda v: isinstance(v, bool), **kw)


def Text(**kw) -> Rule:
    """A non-empty name or path (a number such as `name=123` is fine too)."""
    return Rule("a non-empty text", lambda v: isinstance(v, (str, int, float)) and not isinstance(v, bool)
                and str(v) != "", **kw)


READS_CHECKPOINT = ("eval", "predict", "serve")  # the tasks that read ckpt_path, its settings imposed on the run
LOOPBACK = ("127.0.0.1", "localhost", "::1")  # task=serve: addresses that need no token
SERVE_TOKEN_ENV = "GCODE_EXP_SERVE_TOKEN"  # task=serve: the token, kept out of the command line and run folder
TOKEN_MODELS = "model.name=baseline|multihead"  # only_if of the keys every token model has


def OneOf(*choices: str, **kw) -> Rule:
    return Rule(f"one of {', '.join(choices)}", lambda v: v in choices, **kw)


def Each(rule: Rule, **kw) -> Rule:
    """A list (possibly empty) whose every item is `rule`'s."""
    return Rule(f"a list, each item {rule.what}", lambda v: isinstance(v, list) and all(rule.ok(x) for x in v), **kw)


def Nullable(rule: Rule) -> Rule:
    """`rule`, or null."""
    return Rule(f"{rule.what} or null", lambda v: v is None or rule.ok(v), rule.only_if, rule.optional)


def _class(path: Any, base: str) -> type | None:
    """The class `path` names if it imports and subclasses gcode_exp's `base` ("module:Class"), else None."""
    import importlib

    from hydra.utils import get_class

    module, _, name = base.partition(":")
    hydra_log = logging.getLogger("hydra.utils")  # it logs a failed import at ERROR: our refusal is the one line
    was, hydra_log.disabled = hydra_log.disabled, True
    try:
        cls = get_class(str(path))
    except Exception:
        return None
    finally:
        hydra_log.disabled = was
    return cls if isinstance(cls, type) and issubclass(cls, getattr(importlib.import_module(module), name)) else None


def build(spec: DictConfig, key: str, **given: Any) -> Any:
    """The object a config names (`_target_`), given the arguments the project passes; a setting its class
    refuses is one line naming `key`. The target is trusted by name: `validate` accepted its class."""
    from hydra.utils import instantiate

    try:
        return instantiate(spec, **given, _convert_="all", _execution_whitelist_=(str(spec._target_),))
    except Exception as e:  # Hydra wraps the class's TypeError/ValueError
        why = str(e.__cause__ or e).splitlines()[0]
        raise GcodeExpError(f"{key}._target_={spec._target_}: cannot be built ({why})") from None


def Importable(base: str, what: str, **kw) -> Rule:
    """A `_target_`: the dotted path of a class that imports and subclasses `base`."""
    return Rule(what, lambda v: _class(v, base) is not None, **kw)


ENCODER = "gcode_exp.models.encoder:SensorEncoder"
ENCODER_GIVEN = ("n_inputs", "window", "d_model", "layers", "dropout")  # what the token model passes an encoder
OPTIMIZER = "torch.optim:Optimizer"
SCHEDULER = "torch.optim.lr_scheduler:LRScheduler"
AUGMENT = "gcode_exp.data.augment:Augment"
# configs that build an object: their class, the arguments the project passes, and who passes them
BUILT = {"model.encoder": (ENCODER, ENCODER_GIVEN, "the model: they come from model.*"),
         "trainer.optimizer": (OPTIMIZER, ("params",), "the trainer: the model's parameters"),
         "trainer.scheduler": (SCHEDULER, ("optimizer", "steps_per_epoch", "max_epochs"),
                               "the trainer: the optimiser and the run's length"),
         "aug": (AUGMENT, ("features",), "the trainer: the training data's features")}


def _split_ok(v: Any) -> bool:
    return isinstance(v, list) and len(v) == 3 and all(_is_num(f) and f > 0 for f in v) and abs(sum(v) - 1) < 1e-6


MODULE_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
COMMAND_WORD = re.compile(r"^([GM])(\d+(?:\.\d+)?)$")
FEATURE_GROUPS = ("controller", "motors", "boards")

SCHEMA: dict[str, Rule] = {
    # top level (conf/config.yaml)
    "task": OneOf("train", "eval", "prepare", "predict", "serve"),
    "seed": Int(ge=0),
    "ckpt_path": Nullable(Text()),
    "overwrite": Bool(),
    "trusted_modules": Rule("a list of module names such as [mylab, mylab.models]", lambda v: isinstance(v, list)
                            and all(isinstance(m, str) and MODULE_NAME.fullmatch(m) for m in v)),  # gcode_exp/trust.py
    "name": Text(),
    "optimized_metric": Nullable(Text(optional=True)),  # hparams_search: checked against the run's metrics
    "optuna_storage": Text(optional=True),
    "hparams_search.pruner": OneOf("median", "hyperband", "none", optional=True),
    "hparams_search.startup_trials": Int(ge=0, optional=True),
    "hparams_search.warmup_epochs": Int(ge=0, optional=True),
    # data
    "data.dir": Text(),
    "data.pattern": Text(),
    "data.window": Int(ge=1),
    "data.stride": Int(ge=1),
    "data.target": OneOf("longest", "lines"),
    "data.max_lines": Int(ge=1),
    "data.max_len": Int(ge=3, note="BOS, a token, EOS"),
    "data.split": Rule("three fractions > 0 summing to 1 (train, val, test: every split gets files anyway)",
                       _split_ok),
    "data.split_seed": Int(ge=0),
    "data.split_by": OneOf("file", "operation", "window"),
    "data.folds": Nullable(Rule("0 (one split) or a whole number >= 2", lambda v: _is_int(v) and (v == 0 or v >= 2))),
    "data.fold": Int(ge=0, note="< data.folds; checked with the data"),
    "data.train_share": Float(gt=0, le=1),
    "data.max_nonfinite": Float(ge=0, le=1),
    "data.on_error": OneOf("raise", "skip"),
    "data.path": Nullable(Text()),  # task=predict predict.follow=true: the recording being written
    "data.cache_dir": Nullable(Rule("a folder or empty (no cache)", lambda v: isinstance(v, str))),
    "data.workers": Int(ge=0, note="0: one per core"),
    # features
    "features.name": Text(),
    "features.groups": Rule(f"a non-empty list of distinct groups from {', '.join(FEATURE_GROUPS)}",
                            lambda v: isinstance(v, list) and 0 < len(v) == len(set(map(str, v)))
                            and set(v) <= set(FEATURE_GROUPS)),
    "features.board_flags": Bool(),
    "features.elapsed": Bool(),
    # vocab
    "vocab.name": Text(),
    "vocab.digits": Int(ge=1, le=6, note="10**digits buckets per parameter letter"),
    # model
    "model._target_": Importable("gcode_exp.models.base:Model", "an importable subclass of gcode_exp.models.base.Model "
                                 "(conf/model/*.yaml)"),
    "model.name": Text(),
    "model.encoder._target_": Importable(ENCODER, "an importable subclass of gcode_exp.models.encoder.SensorEncoder "
                                         "(conf/model/encoder/*.yaml)", only_if=TOKEN_MODELS),
    "model.encoder.kernel": Int(ge=1, optional=True, only_if=TOKEN_MODELS),  # the conv encoder's
    "model.d_model": Int(ge=1, only_if=TOKEN_MODELS),
    "model.enc_layers": Int(ge=1, only_if=TOKEN_MODELS),
    "model.dec_layers": Int(ge=1, only_if=TOKEN_MODELS),
    "model.n_heads": Int(ge=1, only_if=TOKEN_MODELS),
    "model.dropout": Float(ge=0, lt=1, only_if=TOKEN_MODELS),
    "model.row_weight": Float(ge=0, only_if=TOKEN_MODELS),
    "model.loss_weights.type": Float(ge=0, only_if="model.name=multihead"),
    "model.loss_weights.command": Float(ge=0, only_if="model.name=multihead"),
    "model.loss_weights.param_type": Float(ge=0, only_if="model.name=multihead"),
    "model.loss_weights.param_value": Float(ge=0, only_if="model.name=multihead"),
    # aug
    "aug._target_": Importable(AUGMENT, "an importable subclass of gcode_exp.data.augment.Augment"),
    "aug.name": Text(),
    "aug.oversample_factor": Int(ge=1),
    "aug.rare_commands": Rule("auto or a non-empty list of G/M words such as [G0, G2, G3]",
                              lambda v: v == "auto" or (isinstance(v, list) and len(v) > 0
                                                        and all(isinstance(c, str) for c in v))),
    "aug.noise": Float(ge=0, lt=1, optional=True),  # optional: an Augment subclass may not take them
    "aug.shift": Int(ge=0, optional=True),
    "aug.scale": Float(ge=0, lt=1, optional=True),
    "aug.noise_pool": Int(ge=0, optional=True),
    # trainer
    "trainer.max_epochs": Int(ge=1),
    "trainer.limit_batches": Int(ge=0, note="0: all"),
    "trainer.patience": Int(ge=1),
    "trainer.monitor": Text(),  # checked against the run's metrics in validate
    "trainer.monitor_mode": OneOf("max", "min"),
    "trainer.batch_size": Int(ge=1),
    "trainer.lr": Float(gt=0, le=1),
    "trainer.optimizer._target_": Importable(OPTIMIZER, "an importable torch.optim.Optimizer subclass, e.g. "
                                             "torch.optim.SGD"),
    "trainer.scheduler._target_": Importable(SCHEDULER, "an importable torch.optim.lr_scheduler.LRScheduler "
                                             "subclass, e.g. gcode_exp.training.optim.WarmupCosine"),
    "trainer.weight_decay": Float(ge=0),
    "trainer.grad_clip": Float(ge=0, note="0: off"),
    "trainer.collapse_min_unique": Int(ge=0),
    "trainer.stop_on_collapse": Bool(),
    "trainer.resume": Bool(),
    "trainer.line_exact": Bool(),
    "trainer.profile_steps": Int(ge=0, note="0: off"),
    "trainer.progress": Bool(),
    "trainer.plots": Bool(),
    # predict (task=predict, gcode_exp/predict.py)
    "predict.follow": Bool(),
    "predict.idle_s": Float(gt=0),
    "predict.poll_s": Float(gt=0),
    "predict.min_p": Float(ge=0, le=1),
    "predict.batch_size": Int(ge=1),
    "predict.segment_rows": Int(ge=1),
    "predict.min_segment": Int(ge=1),
    "predict.lock_p": Float(ge=0, le=1),
    "predict.fallback": Nullable(Text()),
    "predict.novel_above": Float(ge=0, le=1),
    # serve (task=serve, gcode_exp/serve.py)
    "serve.machines": Each(Text()),
    "serve.host": Text(),
    "serve.port": Int(ge=0, le=65535, note="0: any free port"),
    "serve.token": Nullable(Text()),
    "serve.history": Int(ge=1),
    "serve.stopped_s": Float(gt=0),
    "serve.alert_windows": Int(ge=1),
    "serve.low_p": Float(ge=0, le=1),
    "serve.max_upload_mb": Float(gt=0),
    # perturb (task=eval and task=predict: the scored recordings changed as in shop use, gcode_exp/data/perturb.py)
    "perturb.name": Text(),
    "perturb.concat": Bool(),
    "perturb.crop_start": Float(ge=0, le=0.9, note="share of each recording's rows dropped from its start"),
    "perturb.shift": Int(ge=0, note="rows dropped from each recording's start"),
    "perturb.pace": Float(ge=0.5, le=2.0, note="the job N times as fast"),
    "perturb.unplug": Float(ge=0, le=0.9, note="share of each recording's IMU boards removed"),
    "perturb.seed": Int(ge=0),
    # hardware
    "hardware.device": OneOf("auto", "cpu", "cuda", "mps"),
    "hardware.amp": Bool(),
    "hardware.threads": Int(ge=0, note="0: torch's default"),
    "hardware.data_on_device": Rule("auto, true or false", lambda v: v in ("auto", True, False)),
    "hardware.distributed": Bool(),  # hardware=ddp; its rules need torchrun's env: gcode_exp/distributed.py setup
    # logger
    "logger.name": OneOf("none", "wandb"),
    "logger.project": Text(only_if="logger.name=wandb"),
    "logger.entity": Nullable(Text(only_if="logger.name=wandb")),
    "logger.group": Nullable(Text(only_if="logger.name=wandb")),
    "logger.tags": Rule("a list of texts", lambda v: isinstance(v, list) and all(isinstance(t, str) for t in v),
                        only_if="logger.name=wandb"),
    "logger.mode": OneOf("online", "offline", "disabled", only_if="logger.name=wandb"),
}


# --- validation ---------------------------------------------------------------------------------------
def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return f"[{', '.join(_show(v) for v in value)}]"
    return str(value)


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
    return _show(flat.get(key)) in wanted.split("|"), f"{key}={_show(flat.get(key))}"


def _fail(key: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"{key}={_show(value)}: {why}")


def _warn(key: str, value: Any, why: str) -> None:
    log.warning("config: %s=%s: %s", key, _show(value), why)


def validate(cfg: DictConfig) -> None:
    """Refuse (ConfigError naming the key) or warn about a config before any file is read."""
    flat = _flatten(cfg)
    for group, folder, what in (("model.encoder", "model/encoder", "encoder"),
                                ("trainer.scheduler", "trainer/scheduler", "schedule")):
        if isinstance(flat.get(group), str):  # the spelling of before the group
            raise _fail(group, flat[group], f"the {what} is a config group: {folder}={flat[group]} (conf/{folder}/)")
    own = model_rules(flat)
    for key, rule in own.items():
        if key not in flat:
            raise ConfigError(f"{key}: missing from the config")
        if not rule.ok(flat[key]):
            raise _fail(key, flat[key], f"must be {rule.what}")
    for key, value in flat.items():
        built = next((b for b in BUILT if key.startswith(b + ".") and key != b + "._target_"), None)
        if built:
            _check_kwarg(flat, key, built)
            continue
        if key not in SCHEMA and key not in own:
            near = difflib.get_close_matches(key, list(SCHEMA), n=1)
            hint = f"; did you mean {near[0]}?" if near else ""
            raise _fail(key, value, f"unknown key{hint} (gcode_exp/config.py SCHEMA lists every key)")
    for key, rule in SCHEMA.items():
        if rule.only_if:
            needed, because = _condition(flat, rule.only_if)
            if not needed:
                if key in flat:
                    _warn(key, flat[key], f"ignored with {because}")
                continue
        if key not in flat:
            if rule.optional:
                continue
            raise ConfigError(f"{key}: missing from the config")
        if not rule.ok(flat[key]):
            raise _fail(key, flat[key], f"must be {rule.what}")
    _check_rules(cfg, flat)


def model_rules(flat: dict[str, Any]) -> dict[str, Rule]:
    """The rules of the keys a model class declares itself (`Model.rules`, by key under `model.`), so that
    a new approach brings its keys in its own module; none where the class does not import."""
    cls = _class(flat.get("model._target_"), "gcode_exp.models.base:Model")
    return {f"model.{k}": rule for k, rule in getattr(cls, "rules", {}).items()}


def _check_kwarg(flat: dict[str, Any], key: str, built: str) -> None:
    """The keys of a config that builds an object (`_target_`) are its class's keyword arguments, less
    those the project passes itself (a user's encoder or optimiser brings its own)."""
    base, given, by = BUILT[built]
    cls = _class(flat.get(f"{built}._target_"), base)
    if cls is None:
        return  # the _target_ rule reports it
    name, takes = key[len(built) + 1 :], keywords(cls)
    if name in given:
        raise _fail(key, flat[key], f"set by {by} ({', '.join(given)})")
    if name not in takes:
        own = [p for p in takes if p not in given]
        raise _fail(key, flat[key], f"unknown key: {cls.__name__} takes {', '.join(own) or 'no keys of its own'}")


def keywords(cls: type) -> list[str]:
    """The keyword arguments a class takes: those of its __init__, and where that passes on **kwargs, those
    of the classes it inherits from (a subclass that adds one key and hands the rest to its base)."""
    import inspect

    names: list[str] = []
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass).parameters.values()
        names += [p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name not in names]
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return names


def _check_rules(cfg: DictConfig, flat: dict[str, Any]) -> None:
    """Rules between keys, and settings that would make the run meaningless."""
    get = flat.get
    if get("model.name") in ("baseline", "multihead") and get("model.d_model") % get("model.n_heads"):
        raise _fail("model.d_model", get("model.d_model"), f"must be divisible by model.n_heads={get('model.n_heads')}")
    if get("model.key") == "position" and "controller" not in (get("features.groups") or []):
        raise _fail("model.key", "position", "needs the controller's work position among the inputs "
                    "(features.groups with controller, e.g. features=all)")
    if get("data.train_share") < 1 and get("data.split_by") == "window":
        raise _fail("data.train_share", get("data.train_share"), "needs data.split_by=file or operation "
                    "(it keeps a share of the training files)")
    if (get("aug.shift") or 0) >= get("data.window"):
        raise _fail("aug.shift", get("aug.shift"), f"must be < data.window={get('data.window')}")
    weights = {k: v for k, v in flat.items() if k.startswith("model.loss_weights.")}
    if weights and get("model.name") == "multihead":
        if not any(weights.values()):
            raise ConfigError("model.loss_weights: every weight is 0, so the model learns nothing")
        for key, w in weights.items():
            if w == 0:
                _warn(key, w, "this head is never trained, so what it predicts is random")
    rare = get("aug.rare_commands")
    if isinstance(rare, list):
        for word in rare:
            m = COMMAND_WORD.match(str(word).upper())
            if not m:
                raise _fail("aug.rare_commands", rare, f"{word} is not a G/M command word such as G0, G2, M3")
            written = f"{m.group(1)}{float(m.group(2)):g}"  # how the vocabulary writes it (G01 -> G1)
            if word != written:
                raise _fail("aug.rare_commands", rare, f"{word} is written {written} in the vocabulary")
        if get("aug.oversample_factor") == 1:
            _warn("aug.rare_commands", rare, "ignored with aug.oversample_factor=1 (no oversampling)")

    monitor = get("trainer.monitor")
    _check_metric("trainer.monitor", monitor, [f"val/{m}" for m in metric_names(cfg, per_epoch=True)],
                  "not in the per-epoch validation row early stopping reads")
    if monitor == "val/line_exact" and not get("trainer.line_exact"):
        raise _fail("trainer.monitor", monitor, "needs trainer.line_exact=true (the final scores must hold it too)")
    want = "min" if str(monitor).split("/")[-1] in LOWER_IS_BETTER else "max"
    if get("trainer.monitor_mode") != want:
        raise _fail("trainer.monitor_mode", get("trainer.monitor_mode"),
                    f"{monitor} is better when {'lower' if want == 'min' else 'higher'}: use {want}")
    objective, task = get("optimized_metric"), get("task")
    if objective is not None and task == "train":
        _check_metric("optimized_metric", objective, [f"{s}/{m}" for s in ("val", "test") for m in metric_names(cfg)],
                      "not a metric this run writes")
    elif objective is not None:  # gcode_exp.tasks.objective: only a training run returns a number to optimise
        _warn("optimized_metric", objective, f"ignored with task={task} (only task=train returns an objective)")

    reads_ckpt = task in READS_CHECKPOINT
    if task != "train" and get("trainer.resume"):  # only training resumes; eval/predict/serve read a checkpoint
        if reads_ckpt and not get("ckpt_path"):
            raise _fail("trainer.resume", True, f"only task=train resumes an interrupted run; task={task} reads "
                        "a trained checkpoint: pass ckpt_path=RUN/checkpoints/best.pt instead")
        _warn("trainer.resume", True, f"ignored with task={task} (only task=train resumes a run)")
    if reads_ckpt and not get("ckpt_path"):
        raise ConfigError(f"ckpt_path: task={task} needs ckpt_path=PATH to a checkpoint (checkpoints/best.pt)")
    if not reads_ckpt and get("ckpt_path"):
        _warn("ckpt_path", get("ckpt_path"), f"ignored with task={task} (only task=eval, predict and serve read it)")
    live = task == "predict" and get("predict.follow")
    _check_perturb(flat, live or task == "serve")
    if live and not get("data.path"):
        raise ConfigError("data.path: predict.follow=true needs data.path=FILE.csv (the recording being written)")
    if task == "serve":
        _check_serve(get)
    elif get("data.path") and not live:
        _warn("data.path", get("data.path"), "ignored without task=predict predict.follow=true or task=serve "
              "(data.dir is read)")
    if get("predict.fallback") and (task != "predict" or live):
        _warn("predict.fallback", get("predict.fallback"), "ignored: only task=predict reads it, offline (a whole "
              "recording's novelty decides which checkpoint answers it)")


def _check_serve(get: Callable[[str], Any]) -> None:
    """task=serve: something to follow, and a token before listening beyond this machine."""
    if not get("serve.machines") and not get("data.path"):
        raise ConfigError("serve.machines: task=serve needs the recordings to follow: serve.machines=[A.csv,B.csv] "
                          "(or data.path=FILE.csv for one)")
    if get("serve.machines") and get("data.path"):
        _warn("data.path", get("data.path"), "ignored: serve.machines names the recordings to follow")
    if str(get("serve.host")) not in LOOPBACK and not (get("serve.token") or os.environ.get(SERVE_TOKEN_ENV)):
        raise _fail("serve.host", get("serve.host"), f"listening beyond this machine needs a token: set "
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
        _warn(key, value, f"ignored with task={flat.get('task')} (only task=eval and task=predict score perturbed "
              "recordings)")


def _check_metric(key: str, value: Any, allowed: list[str], why: str) -> None:
    if value in allowed:
        return
    near = difflib.get_close_matches(str(value), allowed, n=1, cutoff=0.8)
    hint = f"; did you mean {near[0]}?" if near else ""
    raise _fail(key, value, f"{why}{hint} (choices: {', '.join(allowed)})")


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
            raise _fail("aug.rare_commands", rare, "names no command of the training vocabulary "
                        f"({', '.join(commands)}), so nothing is oversampled")
        if len(known) < len(rare):
            _warn("aug.rare_commands", rare, f"{', '.join(c for c in rare if c not in known)} never occurs in the "
                  "training targets")
    elif factor > 1 and len(commands) < 2:
        _warn("aug.oversample_factor", factor, f"the training targets hold one command ({', '.join(commands)}), "
              "so aug.rare_commands=auto finds nothing to oversample")
    if cut_share > 0:
        suggest = f"; the longest needs data.max_len={longest}" if longest else ""
        why = f"cuts {cut_share:.0%} of the targets{suggest}"
        if cut_share > MAX_CUT_SHARE:
            raise _fail("data.max_len", cfg.data.max_len, why)
        _warn("data.max_len", cfg.data.max_len, why)
