import json

import pytest

from gcode_exp import tasks
from gcode_exp.training.checkpoint import Checkpoint
from tests.conftest import SAMPLE

RUN_FOLDER = ["metrics.json", "history.csv", "vocab.json", "data_summary.json", "per_class.csv",
              "checkpoints/best.pt", "checkpoints/last.pt"]


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [("model=multihead", "aug=3x"), ("model=baseline", "aug=none")])
def test_train_round_trip_writes_complete_run_folder(tiny_cfg, tmp_path, overrides):
    cfg = tiny_cfg(*overrides, "trainer.max_epochs=2", "trainer.plots=true")
    metrics = tasks.run(cfg, tmp_path / "run")
    run = tmp_path / "run"
    for name in RUN_FOLDER:
        assert (run / name).is_file(), name
    assert sorted(p.name for p in (run / "plots").iterdir()) == [
        "command_confusion.png", "command_recall.png", "learning_curves.png", "token_frequencies.png"]
    saved = json.loads((run / "metrics.json").read_text())
    for key in ("val/overall_acc", "test/command_acc", "test/token_macro_recall", "test/line_exact",
                "majority/command_macro_recall", "best_epoch", "epochs", "sec_per_epoch", "collapsed"):
        assert key in saved, key
    assert saved["epochs"] == 2 and 1 <= saved["best_epoch"] <= 2
    assert 0 <= saved["test/overall_acc"] <= 1
    assert len((run / "history.csv").read_text().splitlines()) == 3
    ckpt = Checkpoint.load(run / "checkpoints" / "best.pt")
    assert ckpt.config["model"]["name"] == cfg.model.name and ckpt.stored["epoch"] == saved["best_epoch"]
    assert metrics == saved


@pytest.mark.slow
def test_eval_of_saved_checkpoint_reproduces_test_metrics(tiny_cfg, tmp_path):
    metrics = tasks.run(tiny_cfg(), tmp_path / "train")
    test_files = json.loads((tmp_path / "train" / "data_summary.json").read_text())["test"]["files"]
    only_test = tmp_path / "only_test"
    only_test.mkdir()
    for name in test_files:
        (only_test / f"{name}_aligned.csv.gz").symlink_to(SAMPLE / f"{name}_aligned.csv.gz")
    ckpt = tmp_path / "train" / "checkpoints" / "best.pt"
    evaluated = tasks.run(tiny_cfg("task=eval", f"ckpt_path={ckpt}", f"data.dir={only_test}"), tmp_path / "eval")
    for key in ("overall_acc", "command_acc", "token_macro_recall", "unique_tokens", "line_exact"):
        assert evaluated[f"test/{key}"] == pytest.approx(metrics[f"test/{key}"]), key
    assert (tmp_path / "eval" / "metrics.json").is_file() and (tmp_path / "eval" / "per_class.csv").is_file()


@pytest.mark.slow
def test_same_seed_same_metrics(tiny_cfg, tmp_path):
    a = tasks.run(tiny_cfg("model=multihead", "seed=3"), tmp_path / "a")
    b = tasks.run(tiny_cfg("model=multihead", "seed=3"), tmp_path / "b")
    c = tasks.run(tiny_cfg("model=multihead", "seed=4"), tmp_path / "c")
    drop = ("sec_per_epoch",)
    assert {k: v for k, v in a.items() if k not in drop} == {k: v for k, v in b.items() if k not in drop}
    assert a["val/loss"] != c["val/loss"]


def test_a_checkpoint_of_the_earlier_development_format_is_one_line(tmp_path):
    """Checkpoints of format gcode-exp/1 (configs of several spellings, read through upgrade shims until
    2026-12-07) are refused by eval, predict and resume in one line that says what to do, nothing written."""
    import torch

    from gcode_exp.training.checkpoint import FORMAT
    from tests.conftest import run_py

    run, cache = tmp_path / "run", tmp_path / "cache"
    assert run_py("model=multihead", f"hydra.run.dir={run}", cache=cache).returncode == 0
    for name in ("best.pt", "last.pt"):
        blob = torch.load(run / "checkpoints" / name, weights_only=True)
        assert blob["format"] == FORMAT
        torch.save({**blob, "format": "gcode-exp/1"}, run / "checkpoints" / name)
    best = run / "checkpoints" / "best.pt"
    says = ("a checkpoint of an earlier development format (gcode-exp/1; this version reads gcode-exp/2): fit or "
            "train it again with this version")
    for task in ("eval", "predict"):
        out = tmp_path / task
        res = run_py(f"task={task}", f"ckpt_path={best}", f"hydra.run.dir={out}", cache=cache)
        assert (res.returncode, res.stderr.splitlines()) == (2, [f"error: ckpt_path={best}: {says}"]), res.stderr
        assert not (out / "metrics.json").exists()
    (run / "metrics.json").unlink()  # as a run killed before its end leaves it: resumable
    res = run_py(f"hydra.run.dir={run}", "trainer.resume=true", "trainer.max_epochs=2", cache=cache)
    assert res.returncode == 2 and len(res.stderr.splitlines()) == 1 and says in res.stderr, res.stderr


def test_eval_and_predict_read_recordings_as_the_checkpoint_was_trained(tmp_path):
    """The checkpoint decides the model, features, vocabulary and windows: a command-line key that says
    otherwise is refused by name (not silently ignored), and the run folder records the checkpoint's."""
    import yaml

    from tests.conftest import run_py

    run, cache = tmp_path / "run", tmp_path / "cache"
    assert run_py("features=side_channel", f"hydra.run.dir={run}", cache=cache).returncode == 0
    ckpt = f"ckpt_path={run / 'checkpoints' / 'best.pt'}"
    for task in ("eval", "predict"):
        res = run_py(f"task={task}", ckpt, "features=all", f"hydra.run.dir={tmp_path / task}-refused", cache=cache)
        assert res.returncode == 2 and res.stderr.strip() == (
            f"error: features=all: task={task} reads recordings the way the checkpoint was trained "
            "(features.name=side_channel); drop it"), res.stderr
        out = tmp_path / task
        assert run_py(f"task={task}", ckpt, f"hydra.run.dir={out}", cache=cache).returncode == 0
        resolved = yaml.safe_load((out / "resolved_config.yaml").read_text())
        assert resolved["features"]["name"] == "side_channel" and resolved["model"]["name"] == "align"


@pytest.mark.slow
def test_optimizer_is_built_from_its_config(tmp_path):
    """trainer.optimizer._target_ names any torch optimiser; its own keys go to it; one it refuses is one line."""
    from tests.conftest import run_py

    run = tmp_path / "sgd"
    res = run_py("model=baseline", "trainer.max_epochs=1", "trainer.optimizer._target_=torch.optim.SGD",
                 "+trainer.optimizer.momentum=0.9", f"hydra.run.dir={run}", cache=tmp_path / "c")
    assert res.returncode == 0, res.stderr[-2000:]
    (group,) = Checkpoint.load(run / "checkpoints" / "last.pt").stored["optimizer"]["param_groups"]
    assert group["momentum"] == 0.9 and group["lr"] == 0.001 and "betas" not in group

    bad = run_py("model=baseline", "trainer.optimizer._target_=torch.optim.Adagrad", "+trainer.optimizer.lr_decay=-1",
                 f"hydra.run.dir={tmp_path / 'bad'}", cache=tmp_path / "c")
    refusal = "error: trainer.optimizer._target_=torch.optim.Adagrad: cannot be built (Invalid lr_decay value: -1)"
    assert bad.returncode == 2 and bad.stderr.splitlines() == [refusal], bad.stderr

    (run / "metrics.json").unlink()  # as if interrupted after epoch 1
    resumed = run_py("model=baseline", "trainer.max_epochs=2", "trainer.resume=true", f"hydra.run.dir={run}",
                     cache=tmp_path / "c")  # the default optimiser is AdamW: another class than the run's
    assert resumed.returncode == 2 and "trainer.optimizer._target_" in resumed.stderr, resumed.stderr
