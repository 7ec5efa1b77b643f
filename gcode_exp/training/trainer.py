"""The Trainer: optimiser steps over the Sampler's batches, validation each epoch, checkpoints and early
stopping. Progress, logs and the profiler are callbacks (callbacks.py); the benchmark times `Trainer.step`.
hardware=ddp: every rank runs it on its share of each batch (gcode_exp/distributed.py); rank 0 writes."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from omegaconf import OmegaConf

from gcode_exp import distributed
from gcode_exp.atomic import write_csv
from gcode_exp.config import build
from gcode_exp.data.dataset import Prepared
from gcode_exp.data.sampler import Batch, Sampler, prefetched
from gcode_exp.models import Model, new_model
from gcode_exp.training import callbacks
from gcode_exp.training.callbacks import Callback
from gcode_exp.training.checkpoint import Checkpoint, describe, save_checkpoint
from gcode_exp.training.device import autocast, pick_device
from gcode_exp.training.evaluate import evaluate, scored_windows
from gcode_exp.training.optim import StepSchedule, new_optimizer, new_scheduler

log = logging.getLogger(__name__)
COLLAPSE_REMEDIES = (
    "remedies from the guide: check the vocabulary (vocab=v2), raise aug.oversample_factor (aug=5x), "
    "raise model.loss_weights.command (e.g. 5.0), lower trainer.batch_size (16)"
)


class Trainer:
    """Fits one token model to the training split of `data`, writing checkpoints/ and history.csv into
    `run_dir`: best.pt holds the best epoch by `trainer.monitor`, last.pt everything a resume needs."""

    def __init__(self, cfg, data: Prepared, model: Model, run_dir: Path, checkpoint: dict,
                 callbacks: Sequence[Callback] = ()) -> None:
        self.cfg, self.tc, self.data, self.checkpoint = cfg, cfg.trainer, data, checkpoint
        self.device = pick_device(cfg.hardware)
        self.model = model.to(self.device)
        self.net = distributed.wrap(self.model, self.device)  # the model itself in one process
        self.gen = torch.Generator().manual_seed(cfg.seed)
        train = data.splits["train"]
        aug = build(cfg.aug, "aug", features=data.features)
        self.sampler = Sampler(train, data.vocab, aug, cfg.data.window, self.tc.batch_size, self.tc.limit_batches,
                               cfg.seed, row_labels=model.row_labels(train.row_targets))
        if on_device(self.sampler, self.device, cfg.hardware.data_on_device):
            self.sampler.to(self.device)
            log.info("training windows on %s (%.0f MB)", self.device, self.sampler.nbytes() / 2**20)
        self.opt = new_optimizer(self.tc.optimizer, model)
        self.sched = new_scheduler(self.tc.scheduler, self.opt, len(self.sampler), self.tc.max_epochs)
        self.ckpt_dir, self.run_dir, self.callbacks = run_dir / "checkpoints", run_dir, list(callbacks)
        self.stop_reason: str | None = None  # set by a callback that ends training early (a pruned trial)
        self.state = new_state()

    def step(self, batch: Batch) -> float:
        """One optimiser step on (inputs, targets, row labels)."""
        x, y, rows = (t.to(self.device, non_blocking=True) if t is not None else None for t in batch)
        with autocast(self.device, self.cfg.hardware.amp):
            loss, _ = self.net.loss(self.net(x, y[:, :-1]), y[:, 1:], rows)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.tc.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tc.grad_clip)
        self.opt.step()
        self.sched.step()
        return loss.item()

    def batches(self, gen: torch.Generator) -> Iterator[Batch]:
        """An epoch's batches from `gen`; on CUDA with the windows left on the host, made ahead in pinned memory
        by a background thread (what the bench times as the pipeline)."""
        batches = self.sampler.epoch(gen)
        return prefetched(batches) if self.device.type == "cuda" and self.sampler.device is None else batches

    def train_epoch(self, epoch: int) -> dict:
        """One pass over the epoch's batches: the mean training loss (over every rank's windows)."""
        t0, total, seen, steps = time.perf_counter(), 0.0, 0, 0
        self.model.train()
        self.call("on_epoch_start", epoch, len(self.sampler))
        for batch in self.batches(self.gen):
            loss = self.step(batch)
            total, seen, steps = total + loss * len(batch[0]), seen + len(batch[0]), steps + 1
            self.call("on_step_end", loss, total / seen)
        self.call("on_train_end", epoch)
        sec = time.perf_counter() - t0
        total, seen = distributed.total(total, seen)
        return {"epoch": epoch, "train/loss": total / max(seen, 1), "steps": steps, "sec": sec}

    def validate(self) -> dict:
        with_lines = self.tc.monitor == "val/line_exact"
        metrics, _, _ = evaluate(self.model, self.data.splits["val"], self.data.vocab, self.cfg, self.device,
                                 with_lines=with_lines, limit=scored_windows(self.tc))
        return {f"val/{k}": v for k, v in metrics.items()}

    def fit(self) -> dict:
        """Epochs until trainer.max_epochs, patience or (with stop_on_collapse) collapse; returns the state."""
        if self.tc.resume:
            self.resume()
        self.log_start()
        for epoch in range(self.state["epoch"] + 1, self.tc.max_epochs + 1):
            row = {**self.train_epoch(epoch), **self.validate()}
            stop = self.end_epoch(row)
            self.call("on_epoch_end", row)
            self.stop_reason = distributed.from_main(self.stop_reason)  # hardware=ddp: every rank stops together
            if self.stop_reason:
                log.info("stopping: %s", self.stop_reason)
                break
            if stop:
                log.info("stopping after epoch %d (best epoch %d)", epoch, self.state["best_epoch"])
                break
        distributed.barrier()  # hardware=ddp: best.pt written before any rank reads it
        return self.state

    def end_epoch(self, row: dict) -> bool:
        """Record the epoch (history, best.pt, last.pt, collapse); whether training should stop."""
        state, epoch = self.state, row["epoch"]
        state["history"].append(row)
        score = row.get(self.tc.monitor, float("nan"))
        sign = 1 if self.tc.monitor_mode == "max" else -1
        if not math.isnan(score) and sign * score > state["best"]:
            state.update(best=sign * score, best_epoch=epoch, bad_epochs=0)
            self.save("best.pt", epoch)
        else:
            state["bad_epochs"] += 1
        collapsed_now = self.collapsed(row["val/unique_tokens"])
        state["collapsed"], state["epoch"] = state["collapsed"] or collapsed_now, epoch
        self.save("last.pt", epoch, optimizer=self.opt.state_dict(), scheduler=self.sched.state_dict(),
                  state=state, rng=rng_state(self.gen))
        if distributed.is_main():
            write_csv(self.run_dir / "history.csv", state["history"])
        return state["bad_epochs"] >= self.tc.patience or (collapsed_now and self.tc.stop_on_collapse)

    def collapsed(self, unique_tokens: float) -> bool:
        """The guide's collapse rule: fewer distinct tokens predicted on val than min(collapse_min_unique,
        half the distinct target tokens); warned once per run."""
        val = self.data.splits["val"]
        n_target = len(set(val.targets[:, 1:].flatten().tolist()) - {0})
        threshold = min(self.tc.collapse_min_unique, math.ceil(0.5 * n_target))
        now = unique_tokens < threshold
        if now and not self.state["collapsed"]:
            log.warning("collapse: %d distinct tokens predicted on val (< %d); %s", unique_tokens, threshold,
                        COLLAPSE_REMEDIES)
        return now

    def save(self, name: str, epoch: int, **extra) -> None:
        if distributed.is_main():
            save_checkpoint(self.ckpt_dir / name, model=self.model.state(), epoch=epoch, **self.checkpoint,
                            **extra)

    def resume(self) -> None:
        """Continue from last.pt: weights, optimiser, schedule, RNG and loop state. The command line's
        optimiser settings (trainer.lr, ...) win over the checkpoint's."""
        ckpt = Checkpoint.load(self.ckpt_dir / "last.pt")
        for key in ckpt.check_resume(self.cfg):
            log.info("resume: %s changed to %s", key, OmegaConf.select(self.cfg, key))
        blob = ckpt.stored
        self.model.load_state(blob["model"])
        wanted = dict(self.opt.defaults)
        self.opt.load_state_dict(blob["optimizer"])
        self.sched.load_state_dict(blob["scheduler"])
        self.sched.base_lrs = [wanted["lr"]] * len(self.opt.param_groups)
        for group, base in zip(self.opt.param_groups, self.sched.base_lrs, strict=True):
            lr = base * self.sched.factor(self.sched.last_epoch) if isinstance(self.sched, StepSchedule) else None
            group.update({k: v for k, v in wanted.items() if k in group}, lr=lr if lr is not None else group["lr"])
        set_rng_state(blob["rng"], self.gen)
        self.state = blob["state"]
        log.info("resuming after epoch %d from %s", self.state["epoch"], self.ckpt_dir / "last.pt")

    def log_start(self) -> None:
        s = self.sampler
        if s.kept is not None:
            log.info("trainer.limit_batches=%d: %d batches per epoch, always the same %d windows; val and test "
                     "scored on their first %d windows", self.tc.limit_batches, len(s), s.windows,
                     scored_windows(self.tc))
        log.info("%s: %d params on %s; %d train windows (%d rare, x%d)", self.cfg.name,
                 sum(p.numel() for p in self.model.parameters()), self.device, len(s.rare), int(s.rare.sum()),
                 s.aug.oversample_factor)

    def call(self, hook: str, *args) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)


def fit(cfg, data: Prepared, run_dir: Path, logger=None, extra: Sequence[Callback] = ()) -> dict:
    """Fit the config's model to `data` (tasks.train_job), then train it where it learns; a model that is
    done once fitted (a reference) is checkpointed as it is."""
    pick_device(cfg.hardware)  # torch's thread count, as every later step sees it
    torch.manual_seed(cfg.seed)  # the initial weights and dropout
    model, lines = new_model(cfg, data)
    checkpoint = describe(cfg, data, lines)
    if not model.learns:
        log.info("%s: %s", cfg.name, model.brief())
        state = new_state()
        for name in ("best.pt", "last.pt"):
            save_checkpoint(run_dir / "checkpoints" / name, model=model.state(), epoch=0, state=state, **checkpoint)
        return state
    chosen = callbacks.default_callbacks(cfg, run_dir, logger)
    return Trainer(cfg, data, model, run_dir, checkpoint, [*chosen, *extra]).fit()


def new_state() -> dict:
    """The loop's state before the first epoch (last.pt carries it: a resume continues from it)."""
    return {"epoch": 0, "best": -math.inf, "best_epoch": 0, "bad_epochs": 0, "collapsed": False, "history": []}


def on_device(sampler: Sampler, device: torch.device, wanted: str | bool) -> bool:
    """hardware.data_on_device: whether the training windows move to a CUDA device (auto: when they take at
    most half of its free memory). On the CPU they are there already."""
    if device.type != "cuda" or wanted is False:
        return False
    return wanted is True or sampler.nbytes() <= torch.cuda.mem_get_info(device)[0] // 2


def rng_state(gen: torch.Generator) -> dict:
    """Every random stream a resumed run must continue: the trainer's generator, torch's, and CUDA's."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"gen": gen.get_state(), "torch": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(rng: dict, gen: torch.Generator) -> None:
    gen.set_state(rng["gen"])
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
