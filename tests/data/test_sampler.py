"""The data side of training (Augment, Sampler) and what the Trainer builds from configs: the
augmentation, the learning-rate schedule and the optimiser, each by `_target_`, and its callbacks."""

import math

import pytest
import torch
from conftest import make_cfg

from gcode_exp.config import ConfigError
from gcode_exp.config_checks import validate
from gcode_exp.data.augment import Augment
from gcode_exp.data.dataset import prepare
from gcode_exp.data.sampler import Sampler, batches
from gcode_exp.data.vocab import PAD
from gcode_exp.data.windows import Features
from gcode_exp.models import new_model
from gcode_exp.training.callbacks import Callback
from gcode_exp.training.optim import WarmupCosine
from gcode_exp.training.trainer import Trainer

FEATS = Features(["a", "b"], ["b1"], mean=[0.0, 10.0], std=[1.0, 2.0])


class SilenceSensors(Augment):
    """A user's augmentation: sensor channels read as `level` (a test that `aug._target_` is obeyed), with a
    key of its own and its base's keys passed on."""

    def __init__(self, features: Features, level: float = 0.0, **keys) -> None:
        super().__init__(features, **keys)
        self.level = level

    def perturb(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        x[..., : self.n_sensor] = self.level
        return x

    @property
    def perturbs(self) -> bool:
        return True


def test_oversampling_and_augmentation_statistics():
    gen = torch.Generator().manual_seed(0)
    rare = torch.tensor([True, False, False, False])
    order = Augment(FEATS, oversample_factor=3).epoch_order(rare, gen)
    assert sorted(order.tolist()) == [0, 0, 0, 1, 2, 3]
    assert Augment(FEATS, oversample_factor=3).epoch_windows(rare) == 6
    x = torch.zeros(2000, 8, 3)
    x[..., 2] = 1.0
    noisy = Augment(FEATS, noise=0.02).perturb(x.clone(), gen)
    assert noisy[..., :2].std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.equal(noisy[..., 2], x[..., 2])  # board presence flags are never perturbed
    scaled = Augment(FEATS, scale=0.05).perturb(x.clone(), gen)
    k = 1 + scaled[:, 0, 1] / 5.0  # a raw value of 10 (z = 0) scaled by k reads (k - 1) * 10 / 2
    assert k.min() >= 0.95 - 1e-6 and k.max() <= 1.05 + 1e-6 and k.std() > 0.02
    assert not Augment(FEATS).perturbs and Augment(FEATS, shift=1).perturbs


def test_a_noise_pool_gives_fresh_standard_normal_noise_per_batch():
    """aug.noise_pool: each batch's noise is two random slices of a pool drawn afresh each epoch; standard
    normal, no two batches alike, the same draws from the same generator, a new pool each epoch."""
    aug = Augment(FEATS, noise=0.02, noise_pool=4)
    s = torch.zeros(64, 32, 2)

    def epoch(gen, steps=6):
        aug.start_epoch()
        return [aug.noise_like(s, gen).clone() for _ in range(steps)]

    first = epoch(torch.Generator().manual_seed(0))
    both = torch.stack(first)
    assert both.mean().abs() < 0.02 and both.std() == pytest.approx(1.0, abs=0.02)
    assert all(not torch.equal(a, b) for i, a in enumerate(first) for b in first[i + 1:])
    assert all(torch.equal(a, b) for a, b in zip(first, epoch(torch.Generator().manual_seed(0)), strict=True))
    pool = aug._pool.clone()
    epoch(torch.Generator().manual_seed(1))
    assert not torch.equal(pool, aug._pool) and aug._pool.numel() == 4 * s.numel()
    noisy = aug.perturb(torch.zeros(2000, 8, 3), torch.Generator().manual_seed(0))
    assert noisy[..., :2].std().item() == pytest.approx(0.02, rel=0.05) and (noisy[..., 2] == 0).all()


def test_shift_stays_inside_the_file(tiny_cfg):
    data = prepare(tiny_cfg())
    train = data.splits["train"]
    aug = Augment(data.features, shift=2)
    gen = torch.Generator().manual_seed(0)
    starts = aug.shift_starts(train.starts, train.lo, train.hi, gen)
    assert ((starts >= train.lo) & (starts <= train.hi)).all()
    assert (starts - train.starts).abs().max() <= 2 and (starts != train.starts).any()
    rare = aug.rare_windows(train.targets, data.vocab)
    others = torch.tensor([data.vocab.index[c] for c in data.vocab.commands if c != "G1"])
    assert rare.any() and torch.isin(train.targets[rare], others).any(dim=1).all()
    assert not torch.isin(train.targets[~rare], others).any()
    x, y, rows = next(batches(train, 32, 8))
    assert x.shape == (8, 32, data.features.n_inputs) and y.shape == (8, 16) and rows is None
    assert torch.equal(x[0], train.rows[train.starts[0] : train.starts[0] + 32])


def test_sampler_epochs(tiny_cfg):
    data = prepare(tiny_cfg())
    train, window = data.splits["train"], 32
    aug = Augment(data.features, oversample_factor=3, noise=0.02, scale=0.05)
    stored = train.rows.clone()
    sampler = Sampler(train, data.vocab, aug, window, batch_size=8)
    n_rare = int(sampler.rare.sum())
    assert sampler.windows == len(train) + 2 * n_rare and len(sampler) == math.ceil(sampler.windows / 8)
    one = list(sampler.epoch(torch.Generator().manual_seed(1)))
    again = list(sampler.epoch(torch.Generator().manual_seed(1)))
    assert len(one) == len(sampler) and sum(len(b[0]) for b in one) == sampler.windows
    assert all(torch.equal(a[0], b[0]) for a, b in zip(one, again))  # the generator decides every draw
    gen = torch.Generator().manual_seed(1)
    first, second = next(iter(sampler.epoch(gen))), next(iter(sampler.epoch(gen)))
    assert not torch.equal(first[0], second[0])  # each epoch draws afresh
    assert torch.equal(train.rows, stored)  # perturbed in place, but only the batch's own copy
    kept = Sampler(train, data.vocab, aug, window, batch_size=8, limit_batches=2, seed=0)
    assert kept.windows == 16 and len(kept) == 2
    def lines(epoch):  # each window's target without PAD (batches are trimmed to their longest target)
        return [tuple(t for t in row if t != PAD) for _, y, _ in epoch for row in y.tolist()]

    a, b = lines(kept.epoch(gen)), lines(kept.epoch(gen))
    assert sorted(a) == sorted(b) and len(a) == 16  # the same windows every epoch, reshuffled


def test_the_aug_config_names_the_augmentation_class(tmp_path):
    cfg = make_cfg("model=multihead", "aug._target_=test_sampler.SilenceSensors", "+aug.level=0.0", tmp=tmp_path)
    validate(cfg)
    with pytest.raises(ConfigError, match="aug.levle=0: unknown key: SilenceSensors takes level, oversample_factor"):
        validate(make_cfg("aug._target_=test_sampler.SilenceSensors", "+aug.levle=0"))
    data = prepare(cfg)
    model, _ = new_model(cfg, data)
    trainer = Trainer(cfg, data, model, tmp_path, checkpoint={})
    assert type(trainer.sampler.aug) is SilenceSensors
    assert trainer.sampler.aug.oversample_factor == cfg.aug.oversample_factor  # the keys of its base class
    x, _, _ = next(iter(trainer.sampler.epoch(trainer.gen)))
    n = len(data.features.channels)
    assert (x[..., :n] == 0).all() and x[..., n:].abs().sum() > 0  # board flags still as stored
    assert math.isfinite(trainer.step(next(iter(trainer.sampler.epoch(trainer.gen)))))


@pytest.mark.parametrize("override, message", [
    ("trainer.scheduler=cosine", "trainer.scheduler=cosine: the schedule is a config group: trainer/scheduler=cosine"),
    ("trainer.scheduler._target_=torch.optim.SGD", "trainer.scheduler._target_=torch.optim.SGD: must be"),
    ("+trainer.scheduler.optimizer=1", "trainer.scheduler.optimizer=1: set by the trainer"),
    ("+trainer.scheduler.warmup=1", "unknown key: WarmupCosine takes warmup_epochs"),
    ("aug._target_=torch.nn.Linear", "aug._target_=torch.nn.Linear: must be an importable subclass"),
    ("+aug.features=1", "aug.features=1: set by the trainer"),
])
def test_built_configs_refuse_bad_keys(override, message):
    group = ["trainer/scheduler=cosine"] if "warmup=" in override else []
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        validate(make_cfg(*group, override))


def test_schedules_from_their_config(tmp_path):
    data = prepare(make_cfg(tmp=tmp_path))
    model, _ = new_model(make_cfg("model=multihead"), data)
    cfg = make_cfg("model=multihead", "trainer/scheduler=cosine", "trainer.scheduler.warmup_epochs=1",
                   "trainer.max_epochs=3", "trainer.lr=0.01", tmp=tmp_path)
    trainer = Trainer(cfg, data, model, tmp_path, checkpoint={})
    steps = len(trainer.sampler)
    assert isinstance(trainer.sched, WarmupCosine) and trainer.sched.total == 3 * steps
    rates = []
    for _ in range(3 * steps):
        rates.append(trainer.opt.param_groups[0]["lr"])
        trainer.opt.step()
        trainer.sched.step()
    assert rates[0] == pytest.approx(0.01 / steps) and max(rates) == pytest.approx(0.01)
    assert rates[steps - 1] == pytest.approx(0.01) and rates[-1] < 0.01 * 0.05  # warm-up, then decay to ~0
    torch_cfg = make_cfg("model=multihead", "trainer.scheduler._target_=torch.optim.lr_scheduler.StepLR",
                         "+trainer.scheduler.step_size=1", "+trainer.scheduler.gamma=0.5", tmp=tmp_path)
    validate(torch_cfg)
    step_lr = Trainer(torch_cfg, data, model, tmp_path, checkpoint={})
    step_lr.opt.step()
    step_lr.sched.step()
    assert step_lr.opt.param_groups[0]["lr"] == pytest.approx(0.5 * torch_cfg.trainer.lr)


class Floored(WarmupCosine):
    """A user's schedule: one key of its own, the rest handed to its base with **kwargs."""

    def __init__(self, optimizer, floor: float = 0.1, **kwargs):
        self.floor = floor
        super().__init__(optimizer, **kwargs)

    def factor(self, step: int) -> float:
        return max(self.floor, super().factor(step))


def test_a_schedule_that_hands_on_kwargs_is_given_the_run_length(tmp_path):
    data = prepare(make_cfg(tmp=tmp_path))
    model, _ = new_model(make_cfg("model=multihead"), data)
    cfg = make_cfg("model=multihead", "trainer.scheduler._target_=tests.data.test_sampler.Floored",
                   "+trainer.scheduler.floor=0.2", "trainer.max_epochs=3", tmp=tmp_path)
    validate(cfg)
    sched = Trainer(cfg, data, model, tmp_path, checkpoint={}).sched
    assert type(sched).__name__ == "Floored" and sched.floor == 0.2  # (pytest imports this file under another name)
    assert sched.total == 3 * sched.warmup / 2  # max_epochs and steps_per_epoch reached the base class


class Recorder(Callback):
    def __init__(self):
        self.calls = []

    def on_epoch_start(self, trainer, epoch, steps):
        self.calls.append(("start", epoch, steps))

    def on_step_end(self, trainer, loss, mean_loss):
        self.calls.append(("step",))

    def on_train_end(self, trainer, epoch):
        self.calls.append(("train_end", epoch))

    def on_epoch_end(self, trainer, row):
        self.calls.append(("end", row["epoch"], "val/loss" in row))


def test_callbacks_see_every_step_and_epoch(tmp_path):
    cfg = make_cfg("model=multihead", "trainer.max_epochs=2", "trainer.limit_batches=2", tmp=tmp_path)
    data = prepare(cfg)
    model, _ = new_model(cfg, data)
    recorder = Recorder()
    state = Trainer(cfg, data, model, tmp_path, checkpoint={}, callbacks=[recorder]).fit()
    epoch = [("start", 1, 2), ("step",), ("step",), ("train_end", 1), ("end", 1, True)]
    assert recorder.calls == epoch + [("start", 2, 2), ("step",), ("step",), ("train_end", 2), ("end", 2, True)]
    assert [r["epoch"] for r in state["history"]] == [1, 2] and (tmp_path / "history.csv").is_file()
    assert (tmp_path / "checkpoints" / "last.pt").is_file()


def test_windows_moved_to_a_device_give_the_same_batches(tiny_cfg):
    """Sampler.to: what a GPU run does with windows that fit on it (here the CPU stands in for the device:
    the same code path, draws from a device generator seeded by the trainer's)."""
    data = prepare(tiny_cfg())
    train = data.splits["train"]
    labels = torch.arange(len(train.rows))
    plain = Sampler(train, data.vocab, Augment(data.features, oversample_factor=3), 32, 8, row_labels=labels)
    moved = Sampler(train, data.vocab, Augment(data.features, oversample_factor=3), 32, 8, row_labels=labels)
    moved.to(torch.device("cpu"))
    assert moved.device == torch.device("cpu") and moved.nbytes() >= train.rows.nbytes
    for (x, y, r), (x2, y2, r2) in zip(plain.epoch(torch.Generator().manual_seed(0)),
                                       moved.epoch(torch.Generator().manual_seed(0))):
        assert torch.equal(x, x2) and torch.equal(y, y2) and torch.equal(r, r2)  # no draws: the same windows
    noisy = Sampler(train, data.vocab, Augment(data.features, noise=0.02, shift=2), 32, 8).to(torch.device("cpu"))
    a = [b[0] for b in noisy.epoch(torch.Generator().manual_seed(0))]
    b = [b[0] for b in noisy.epoch(torch.Generator().manual_seed(0))]
    assert all(torch.equal(u, v) for u, v in zip(a, b))  # the trainer's generator decides the device's draws
    assert not torch.equal(a[0], next(iter(plain.epoch(torch.Generator().manual_seed(0))))[0])


def test_prefetched_batches_arrive_in_order_and_carry_errors(tiny_cfg):
    """The background loader of a GPU whose windows stay on the host (pinning needs a GPU: off here)."""
    import threading
    import time

    from gcode_exp.data.sampler import prefetched

    data = prepare(tiny_cfg())
    sampler = Sampler(data.splits["train"], data.vocab, Augment(data.features, noise=0.02), 32, 8)
    direct = list(sampler.epoch(torch.Generator().manual_seed(0)))
    ahead = list(prefetched(sampler.epoch(torch.Generator().manual_seed(0)), pin=False))
    assert len(ahead) == len(direct) and all(torch.equal(a[0], b[0]) for a, b in zip(ahead, direct))

    def broken():
        yield direct[0]
        raise ValueError("bad batch")

    with pytest.raises(ValueError, match="bad batch"):
        list(prefetched(broken(), pin=False))
    first = prefetched(iter(direct * 100), depth=1, pin=False)
    next(first)
    first.close()  # the consumer stops early: so does the thread
    time.sleep(0.5)
    assert not any(t.name == "gcode-exp-prefetch" for t in threading.enumerate())
