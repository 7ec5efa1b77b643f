"""The optimiser (`trainer.optimizer`) and the learning-rate schedule (`trainer/scheduler=...`), both built
from their config's `_target_`. A schedule is stepped once per optimiser step; a new one is a class
(here or anywhere importable) and a YAML file in conf/trainer/scheduler/."""

from __future__ import annotations

import math

import torch
from hydra.utils import get_class
from torch.optim.lr_scheduler import LRScheduler

from gcode_exp.config import build, keywords


def new_optimizer(spec, model: torch.nn.Module) -> torch.optim.Optimizer:
    """trainer.optimizer over the model's parameters."""
    return build(spec, "trainer.optimizer", params=model.parameters())


def new_scheduler(spec, opt: torch.optim.Optimizer, steps_per_epoch: int, max_epochs: int) -> LRScheduler:
    """trainer.scheduler for this optimiser; the run's length is passed where the class (or a base it hands
    `**kwargs` to) takes it: torch's own schedules take neither."""
    takes = keywords(get_class(str(spec._target_)))
    known = {"optimizer": opt, "steps_per_epoch": steps_per_epoch, "max_epochs": max_epochs}
    return build(spec, "trainer.scheduler", **{k: v for k, v in known.items() if k in takes})


class StepSchedule(LRScheduler):
    """A learning rate that is the peak (`lr` of the optimiser) times `factor(step)`. Its state is the step
    count alone, so a resumed run follows the schedule of its current settings (trainer.max_epochs, the
    schedule's own keys) from where it stopped."""

    def factor(self, step: int) -> float:
        raise NotImplementedError

    def get_lr(self) -> list[float]:
        return [base * self.factor(self.last_epoch) for base in self.base_lrs]

    def state_dict(self) -> dict:
        return {"last_epoch": self.last_epoch, "_step_count": self._step_count}

    def load_state_dict(self, state_dict: dict) -> None:
        self.last_epoch, self._step_count = state_dict["last_epoch"], state_dict["_step_count"]


class Constant(StepSchedule):
    """The peak rate throughout."""

    def factor(self, step: int) -> float:
        return 1.0


class WarmupCosine(StepSchedule):
    """Linear warm-up over `warmup_epochs`, then cosine decay to 0 at the last epoch."""

    def __init__(self, optimizer: torch.optim.Optimizer, steps_per_epoch: int, max_epochs: int,
                 warmup_epochs: int = 2) -> None:
        self.warmup, self.total = warmup_epochs * steps_per_epoch, max_epochs * steps_per_epoch
        super().__init__(optimizer)

    def factor(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - self.warmup) / max(self.total - self.warmup, 1))))
