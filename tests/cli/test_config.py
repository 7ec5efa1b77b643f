"""The config schema (gcode_exp/config.py): good configs pass in silence, a bad value fails in one
line naming the key before any file is read, a meaningless setting is refused or warned about."""

from __future__ import annotations

import logging
import re
import sys

import pytest
import torch

from gcode_exp.config import SCHEMA, ConfigError
from gcode_exp.config_checks import check_against_data, validate
from gcode_exp.data.vocab import Vocab
from gcode_exp.training.metrics import TOKEN_METRICS, metric_names, token_metrics
from tests import forked_python
from tests.conftest import ROOT, make_cfg, run_py

GROUPS = ("data", "features", "vocab", "model", "aug", "trainer", "hardware", "logger", "experiment", "hparams_search",
          "debug")
OPTIONS = [f"{g}={p.stem}" for g in GROUPS for p in sorted((ROOT / "conf" / g).glob("*.yaml"))]
ZERO_WEIGHTS = [f"model.loss_weights.{k}=0" for k in ("type", "command", "param_type", "param_value")]


def config_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "gcode_exp.config"]


@pytest.mark.parametrize("overrides", [[o] for o in OPTIONS] + [
    ["task=prepare"],
    ["task=eval", "ckpt_path=runs/x/checkpoints/best.pt"],
    ["hparams_search=optuna", "optimized_metric=test/line_exact"],
    ["trainer.monitor=val/loss", "trainer.monitor_mode=min"],
    ["data.target=lines", "aug=3x", "aug.rare_commands=[G0,G2,G3]", "trainer.lr=1"],
], ids=lambda o: " ".join(o))
def test_good_configs_validate_in_silence(overrides, caplog):
    with caplog.at_level(logging.WARNING):
        validate(make_cfg(*overrides))
    assert config_warnings(caplog) == []


def test_schema_covers_every_key_of_every_option():
    """Each key a conf/ file sets is in SCHEMA (else validate would call it unknown): compose them all."""
    seen = set()
    for option in OPTIONS:
        cfg = make_cfg(option)
        validate(cfg)
        seen |= {k for k in SCHEMA if _has(cfg, k)}
    assert seen == set(SCHEMA)


def _has(cfg, key: str) -> bool:
    node = cfg
    for part in key.split("."):
        if part not in node:
            return False
        node = node[part]
    return True


@pytest.mark.parametrize("overrides,message", [
    (["seed=abc"], "seed=abc: must be a whole number >= 0"),
    (["seed=1.5"], "seed=1.5: must be a whole number >= 0"),
    (["trainer.lr=abc"], "trainer.lr=abc: must be a number in (0, 1]"),
    (["trainer.lr=nan"], "trainer.lr=nan: must be a number in (0, 1]"),
    (["trainer.lr=0"], "trainer.lr=0: must be a number in (0, 1]"),
    (["trainer.weight_decay=inf"], "trainer.weight_decay=inf: must be a number >= 0"),
    (["hardware.threads=-1"], "hardware.threads=-1: must be a whole number >= 0"),
    (["hardware.amp=maybe"], "hardware.amp=maybe: must be true or false"),
    (["hardware.data_on_device=maybe"], "hardware.data_on_device=maybe: must be auto, true or false"),
    (["data.split=[0.5,0.5]"], "data.split=[0.5, 0.5]: must be three fractions > 0 summing to 1"),
    (["data.split=[1.0,0,0]"], "data.split=[1.0, 0, 0]: must be three fractions > 0"),
    (["data.max_len=2"], "data.max_len=2: must be a whole number >= 3 (BOS, a token, EOS)"),
    (["data.max_nonfinite=2"], "data.max_nonfinite=2: must be between 0 and 1"),
    (["vocab.digits=9"], "vocab.digits=9: must be a whole number between 1 and 6"),
    (["model=multihead", "model.dropout=1"], "model.dropout=1: must be a number in [0, 1)"),
    (["model=multihead", "model.loss_weights.command=-1"], "model.loss_weights.command=-1: must be a number >= 0"),
    (["model=multihead", *ZERO_WEIGHTS], "model.loss_weights: every weight is 0"),
    (["model=multihead", "model.encoder=lstm"], "model.encoder=lstm: the encoder is a config group: model/encoder="),
    (["model=multihead", "+model.encoder.strides=3"], "model.encoder.strides=3: unknown key: ConvEncoder takes kernel"),
    (["model=multihead", "model/encoder=lstm", "+model.encoder.kernel=3"],
     "model.encoder.kernel=3: unknown key: LSTMEncoder takes no keys of its own"),
    (["model=multihead", "+model.encoder.d_model=64"], "model.encoder.d_model=64: set by the model"),
    (["trainer.optimizer._target_=torch.nn.Linear"],
     "trainer.optimizer._target_=torch.nn.Linear: must be an importable torch.optim.Optimizer subclass"),
    (["trainer.optimizer._target_=torch.optim.SGD", "+trainer.optimizer.momentom=0.9"],
     "trainer.optimizer.momentom=0.9: unknown key: SGD takes lr, momentum, dampening, weight_decay, nesterov"),
    (["+trainer.optimizer.params=[]"], "trainer.optimizer.params=[]: set by the trainer"),
    (["model=multihead", "model.encoder._target_=os.path"],
     "model.encoder._target_=os.path: must be an importable subclass of gcode_exp.models.encoder.SensorEncoder"),
    (["model=multihead", "model._target_=no.such.Model"],
     "model._target_=no.such.Model: must be an importable subclass of gcode_exp.models.base.Model"),
    (["model=nearest", "model.key=rows"], "model.key=rows: must be one of auto, position, summary"),
    (["model=nearest", "model.motion_weight=-1"], "model.motion_weight=-1: must be a number >= 0"),
    (["model=nearest", "model.key=position", "features=side_channel"],
     "model.key=position: needs the controller's work position among the inputs"),
    (["features.groups=[]"], "features.groups=[]: must be a non-empty list"),
    (["features.groups=[motors,motors]"], "features.groups=[motors, motors]: must be a non-empty list of distinct"),
    (["aug.rare_commands=G2"], "aug.rare_commands=G2: must be auto or a non-empty list"),
    (["aug.rare_commands=[G02]"], "aug.rare_commands=[G02]: G02 is written G2 in the vocabulary"),
    (["aug.rare_commands=[X1]"], "aug.rare_commands=[X1]: X1 is not a G/M command word"),
    (["logger=wandb", "logger.mode=off"], "logger.mode=off: must be one of online, offline, disabled"),
    (["trainer.monitor=val/token_macro_recal"],
     "trainer.monitor=val/token_macro_recal: not in the per-epoch validation row early stopping reads"
     "; did you mean val/token_macro_recall?"),
    (["trainer.monitor=val/line_exact", "trainer.line_exact=false"],
     "trainer.monitor=val/line_exact: needs trainer.line_exact=true"),
    (["trainer.monitor=train/loss"], "trainer.monitor=train/loss: not in the per-epoch validation row"),
    (["trainer.monitor=val/loss"], "trainer.monitor_mode=max: val/loss is better when lower: use min"),
    (["trainer.monitor_mode=min"], "trainer.monitor_mode=min: val/token_macro_recall is better when higher"),
    (["hparams_search=optuna", "optimized_metric=val/token_macro_recal"],
     "optimized_metric=val/token_macro_recal: not a metric this run writes; did you mean val/token_macro_recall?"),
    (["+optimized_metric=val/line_exact", "trainer.line_exact=false"],
     "optimized_metric=val/line_exact: not a metric this run writes"),
    (["task=eval"], "ckpt_path: task=eval needs ckpt_path=PATH"),
    (["task=serve"], "ckpt_path: task=serve needs ckpt_path=PATH"),
    (["task=serve", "ckpt_path=a.pt"], "serve.machines: task=serve needs the recordings to follow"),
    (["task=serve", "ckpt_path=a.pt", "data.path=a.csv", "serve.host=0.0.0.0"],
     "serve.host=0.0.0.0: listening beyond this machine needs a token"),
    (["task=serve", "ckpt_path=a.pt", "data.path=a.csv", "serve.port=70000"], "serve.port=70000: must be a whole"),
    (["task=serve", "ckpt_path=a.pt", "data.path=a.csv", "perturb=crop"], "perturb.crop_start=0.25: not with"),
    (["+trainer.monitr=val/loss"], "trainer.monitr=val/loss: unknown key; did you mean trainer.monitor?"),
    (["+model.loss_weight.command=3"], "model.loss_weight.command=3: unknown key; did you mean model.loss_weights"),
    (["~trainer.lr"], "trainer.optimizer.lr: cannot be resolved: Interpolation key 'trainer.lr' not found"),
    (["data.dir=???"], "data.dir=???: needs a value"),
    (["data.dir=${oc.env:GCODE_EXP_TEST_UNSET_VARIABLE}"], "data.dir: cannot be resolved"),
], ids=lambda x: " ".join(x) if isinstance(x, list) else "")
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        validate(make_cfg(*overrides))


@pytest.mark.parametrize("overrides,message", [
    (["model=multihead", "model.loss_weights.command=0"], "model.loss_weights.command=0: this head is never trained"),
    (["model=baseline", "+model.loss_weights.command=5"],
     "model.loss_weights.command=5: ignored with model.name=baseline"),
    (["logger.name=none", "+logger.project=p"], "logger.project=p: ignored with logger.name=none"),
    (["ckpt_path=a.pt"], "ckpt_path=a.pt: ignored with task=train"),
    (["task=prepare", "hparams_search=optuna"], "optimized_metric=val/token_macro_recall: ignored with task=prepare"),
    (["aug=none", "aug.rare_commands=[G0]"], "aug.rare_commands=[G0]: ignored with aug.oversample_factor=1"),
])
def test_meaningless_settings_are_warned_about(overrides, message, caplog):
    with caplog.at_level(logging.WARNING):
        validate(make_cfg(*overrides))
    assert [m for m in config_warnings(caplog) if message in m], config_warnings(caplog)


def test_metric_names_are_what_the_metrics_code_writes():
    vocab = Vocab.build(["G1 X1 Y2", "G0 X3 Y-1", "G2 X0 Y0"], digits=2)
    target = torch.tensor([vocab.encode("G1 X1 Y2")[1:]])
    assert tuple(token_metrics(target, target, vocab)) == TOKEN_METRICS
    cfg = make_cfg()
    assert metric_names(cfg) == [*TOKEN_METRICS, "loss", "line_exact"]
    assert "line_exact" in metric_names(cfg, per_epoch=True)  # decoded every epoch when it is the monitor
    assert "line_exact" not in metric_names(make_cfg("trainer.line_exact=false"))


TOKENS = ["PAD", "BOS", "EOS", "UNK", "G0", "G1", "G2", "X", "NUM_X_00"]


@pytest.mark.parametrize("overrides,tokens,cut,message", [
    (["aug=3x", "aug.rare_commands=[G3,M30]"], TOKENS, 0.0,
     "aug.rare_commands=[G3, M30]: names no command of the training"),
    ([], TOKENS, 0.8, "data.max_len=16: cuts 80% of the targets; the longest needs data.max_len=40"),
])
def test_data_checks_refuse(overrides, tokens, cut, message):
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        check_against_data(make_cfg(*overrides), tokens, cut, longest=40)


@pytest.mark.parametrize("overrides,tokens,cut,message", [
    (["aug=3x", "aug.rare_commands=[G2,G3]"], TOKENS, 0.0, "aug.rare_commands=[G2, G3]: G3 never occurs"),
    (["aug=3x"], TOKENS[:4] + ["G1", "X"], 0.0, "aug.oversample_factor=3: the training targets hold one command"),
    ([], TOKENS, 0.1, "data.max_len=16: cuts 10% of the targets"),
])
def test_data_checks_warn(overrides, tokens, cut, message, caplog):
    with caplog.at_level(logging.WARNING):
        check_against_data(make_cfg(*overrides), tokens, cut)
    assert [m for m in config_warnings(caplog) if message in m], config_warnings(caplog)


def test_data_checks_pass_in_silence(caplog):
    with caplog.at_level(logging.WARNING):
        check_against_data(make_cfg(), TOKENS, 0.0)
        check_against_data(make_cfg("aug=3x", "aug.rare_commands=[G0,G2]"), TOKENS, 0.0)
        check_against_data(make_cfg("aug=none", "aug.rare_commands=[M30]"), TOKENS, 0.0)  # no oversampling
    assert config_warnings(caplog) == []


# --- through run.py: one line on stderr, exit code 2, nothing written --------------------------------------
HYDRA_FILES = {".hydra", "run.log"}  # and error.txt: run.py's one-line record of why the run failed


@pytest.mark.slow
@pytest.mark.parametrize("override,key", [
    ("seed=abc", "seed"),
    ("trainer.lr=abc", "trainer.lr"),
    ("trainer.lr=nan", "trainer.lr"),
    ("hardware.threads=-1", "hardware.threads"),
    ("data.split=[0.5,0.5]", "data.split"),
    ("trainer.monitor=val/token_macro_recal", "trainer.monitor"),
])
def test_run_py_refuses_bad_config_in_one_line(override, key, tmp_path):
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    result = run_py(*override.split(), f"hydra.run.dir={run_dir}", cache=cache, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {key}="), result.stderr
    assert not cache.exists()  # no data file was read
    written = {p.name for p in run_dir.iterdir()} if run_dir.exists() else set()
    assert written <= HYDRA_FILES | {"error.txt"}, written


@pytest.mark.parametrize("override,line", [
    ("trainer.max_epoch=1", "trainer.max_epoch=1: unknown key; did you mean trainer.max_epochs?"),
    ("model.d_model=64", "model.d_model=64: not a key of this config (only with model.name=baseline|multihead)"),
    ("model=transformer", "model=transformer: no such option of model; options: align, baseline, multihead, nearest"),
    ("data.window=[1", "Error when parsing index"),
], ids=["typo", "other-model", "no-option", "syntax"])
def test_hydra_refusals_are_one_line_too(override, line, tmp_path):
    """What Hydra refuses while composing (it prints several lines, exit 1) reads like our own errors:
    one line naming the override, exit 2, no folder."""
    run_dir = tmp_path / "run"  # not run_py: its tiny token-model sizes would give model.d_model a place
    result = forked_python.run([sys.executable, str(ROOT / "run.py"), override, f"hydra.run.dir={run_dir}"],
                               cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and result.stderr.splitlines() == [result.stderr.strip()], result.stderr
    assert result.stderr.startswith(f"error: {line}"), result.stderr
    assert not run_dir.exists()


@pytest.mark.slow
@pytest.mark.parametrize("override,message", [
    ("aug=3x aug.rare_commands=[G99]", "aug.rare_commands=[G99]: names no command of the training vocabulary"),
    ("data.max_len=4", "data.max_len=4: cuts 78% of the targets; the longest needs data.max_len=9"),
])
def test_run_py_checks_settings_against_the_training_data(override, message, tmp_path):
    """Settings only the data can judge are refused once the sample is read, before any training."""
    result = run_py(*override.split(), f"hydra.run.dir={tmp_path / 'run'}", cache=tmp_path / "cache", timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {message}")
    assert not (tmp_path / "run" / "checkpoints").exists()
