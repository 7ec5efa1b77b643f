"""The config schema: every key of every conf/ group with its type, range or choices (SCHEMA).

gcode_exp/config_checks.py `validate` checks the composed config against it before any data file is read,
so a bad value stops the run with one line naming the key (`error: trainer.lr=abc: must be a number in
(0, 1]`, exit code 2) instead of a traceback, a training run against a metric that does not exist, or a
silently meaningless run. The rule types (Int, Float, OneOf, ...) are gcode_exp/rules.py's.

Why a table read by `validate` and not dataclasses in Hydra's ConfigStore: Hydra rejects a typed
field before run.py's `main` starts, so the message would be Hydra's (several lines, exit code 1),
and a dataclass cannot state ranges, rules between keys or the metric names a run produces.

Adding a key: one line in SCHEMA (and its comment in conf/). A key composed into the config but
missing from SCHEMA is refused as unknown, so a misspelled `+trainer.monitr=...` never passes.
"""

from __future__ import annotations

import logging
import re
import zlib
from typing import Any

from omegaconf import DictConfig, OmegaConf

from gcode_exp import GcodeExpError
from gcode_exp.rules import Bool, Each, Float, Importable, Int, Nullable, OneOf, Rule, Text, is_int, is_number

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


READS_CHECKPOINT = ("eval", "predict", "serve")  # the tasks that read ckpt_path, its settings imposed on the run
LOOPBACK = ("127.0.0.1", "localhost", "::1")  # task=serve: addresses that need no token
SERVE_TOKEN_ENV = "GCODE_EXP_SERVE_TOKEN"  # task=serve: the token, kept out of the command line and run folder
TOKEN_MODELS = "model.name=baseline|multihead"  # only_if of the keys every token model has


def build(spec: DictConfig, key: str, **given: Any) -> Any:
    """The object a config names (`_target_`), given the arguments the project passes; a setting its class
    refuses is one line naming `key`. The target is trusted by name: `validate` accepted its class."""
    from hydra.utils import instantiate

    try:
        return instantiate(spec, **given, _convert_="all", _execution_whitelist_=(str(spec._target_),))
    except Exception as e:  # Hydra wraps the class's TypeError/ValueError
        why = str(e.__cause__ or e).splitlines()[0]
        raise GcodeExpError(f"{key}._target_={spec._target_}: cannot be built ({why})") from None


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
    return isinstance(v, list) and len(v) == 3 and all(is_number(f) and f > 0 for f in v) and abs(sum(v) - 1) < 1e-6


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
    "data.folds": Nullable(Rule("0 (one split) or a whole number >= 2", lambda v: is_int(v) and (v == 0 or v >= 2))),
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
    "perturb.unplug_from": Float(ge=0, le=0.9, note="share of rows before unplug's boards fail"),
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


# --- how a refusal or a warning about a key reads ------------------------------------------------
def shown(value: Any) -> str:
    """A value as the command line writes it (null, true, [a, b]), for the messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return f"[{', '.join(shown(v) for v in value)}]"
    return str(value)


def fail(key: str, value: Any, why: str) -> ConfigError:
    """The one-line refusal `key=value: why`, to raise."""
    return ConfigError(f"{key}={shown(value)}: {why}")


def warn(key: str, value: Any, why: str) -> None:
    """A setting that works but is ignored or unwise: logged as gcode_exp.config's warning, the run goes on."""
    log.warning("config: %s=%s: %s", key, shown(value), why)

