"""What watches a Trainer without changing what it learns: progress, logs, the profiler, fault injection.
Each hook does nothing unless a callback overrides it; the Trainer calls them in list order."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from gcode_exp import distributed

if TYPE_CHECKING:
    from gcode_exp.training.trainer import Trainer

log = logging.getLogger("gcode_exp.training.trainer")


class Callback:
    def on_epoch_start(self, trainer: Trainer, epoch: int, steps: int) -> None:
        """Before the first training step of `epoch`, which will take `steps` steps."""

    def on_step_end(self, trainer: Trainer, loss: float, mean_loss: float) -> None:
        """After every optimiser step: its loss and the epoch's running mean."""

    def on_train_end(self, trainer: Trainer, epoch: int) -> None:
        """After the epoch's last training step, before validation."""

    def on_epoch_end(self, trainer: Trainer, row: dict) -> None:
        """After validation and checkpoints: the epoch's row of history.csv."""


class ProgressBar(Callback):
    """Epoch k/N, steps, rate, ETA and the running loss on a terminal; nothing in logs or pipes."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None

    def on_epoch_start(self, trainer: Trainer, epoch: int, steps: int) -> None:
        self.bar = tqdm(total=steps, desc=f"epoch {epoch}/{trainer.tc.max_epochs}", unit="step", leave=False,
                        dynamic_ncols=True, disable=not sys.stderr.isatty())

    def on_step_end(self, trainer: Trainer, loss: float, mean_loss: float) -> None:
        self.bar.set_postfix(loss=f"{mean_loss:.3f}", refresh=False)
        self.bar.update()

    def on_train_end(self, trainer: Trainer, epoch: int) -> None:
        self.bar.refresh()  # the epoch's final loss shows even when the whole epoch beat tqdm's redraw interval
        self.bar.close()


class Profile(Callback):
    """The PyTorch profiler over the first `steps` training steps (the first one a warm-up): its trace in
    `out`/trace.json and its costliest operators in the log (debug=profile)."""

    def __init__(self, steps: int, out: Path) -> None:
        self.steps, self.out, self.prof = steps, out, None

    def on_epoch_start(self, trainer: Trainer, epoch: int, steps: int) -> None:
        if epoch != 1:
            return
        from torch.profiler import ProfilerActivity, profile, schedule

        cuda = [ProfilerActivity.CUDA] if trainer.device.type == "cuda" else []
        self.out.mkdir(parents=True, exist_ok=True)
        self.prof = profile(activities=[ProfilerActivity.CPU, *cuda], record_shapes=True,
                            schedule=schedule(wait=0, warmup=1, active=max(self.steps - 1, 1), repeat=1))
        self.prof.start()

    def on_step_end(self, trainer: Trainer, loss: float, mean_loss: float) -> None:
        if self.prof is not None:
            self.prof.step()

    def on_train_end(self, trainer: Trainer, epoch: int) -> None:
        if self.prof is None:
            return
        self.prof.stop()
        self.prof.export_chrome_trace(str(self.out / "trace.json"))
        log.info("profile of %d training steps: %s\n%s", max(self.steps - 1, 1), self.out / "trace.json",
                 self.prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
        self.prof = None


class EpochLog(Callback):
    """One line per epoch in run.log and on the console."""

    def on_epoch_end(self, trainer: Trainer, row: dict) -> None:
        monitor = trainer.tc.monitor
        log.info("epoch %3d | train loss %.4f | val loss %.4f | %s %.4f | cmd %.3f | uniq %d | %.1fs",
                 row["epoch"], row["train/loss"], row["val/loss"], monitor, row.get(monitor, float("nan")),
                 row["val/command_acc"], row["val/unique_tokens"], row["sec"])


class LoggerCallback(Callback):
    """Every epoch's row to an experiment tracker (logger=wandb: gcode_exp/logger.py)."""

    def __init__(self, logger) -> None:
        self.logger = logger

    def on_epoch_end(self, trainer: Trainer, row: dict) -> None:
        self.logger.log(row, step=row["epoch"])


def default_callbacks(cfg, run_dir: Path, logger=None) -> list[Callback]:
    """The callbacks a run's config asks for (progress and profile on rank 0 only)."""
    main, tc = distributed.is_main(), cfg.trainer
    out: list[Callback] = [ProgressBar()] if tc.progress and main else []
    if tc.profile_steps > 0 and main:
        out.append(Profile(tc.profile_steps, run_dir / "profile"))
    out.append(EpochLog())
    if logger is not None:
        out.append(LoggerCallback(logger))
    return out
