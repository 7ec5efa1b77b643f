"""Training and evaluation loops: plain PyTorch, one screen each."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from tqdm import tqdm

from gcode_exp import GcodeExpError, distributed
from gcode_exp.atomic import write_csv
from gcode_exp.data.augment import Augment, batches, epoch_order, rare_window_mask
from gcode_exp.data.dataset import HOW_READ, Features, Prepared, Split
from gcode_exp.data.vocab import BOS, Vocab
from gcode_exp.models import NearestModel, TokenModel, build_model
from gcode_exp.models.nearest import KEYS
from gcode_exp.training.checkpoint import load_checkpoint, save_checkpoint
from gcode_exp.training.metrics import line_exact, majority_line, token_metrics

log = logging.getLogger(__name__)
COLLAPSE_REMEDIES = (
    "remedies from the guide: check the vocabulary (vocab=v2), raise aug.oversample_factor (aug=5x), "
    "raise model.loss_weights.command (e.g. 5.0), lower trainer.batch_size (16)"
)


def pick_device(hw_cfg) -> torch.device:
    """`auto` takes cuda, then mps, then cpu; naming a device that is absent is an error."""
    if hw_cfg.threads:
        torch.set_num_threads(hw_cfg.threads)
    want = hw_cfg.device
    has = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if want == "auto":
        want = next(d for d in ("cuda", "mps", "cpu") if has[d])
    if not has.get(want, False):
        raise GcodeExpError(f"hardware.device={want}: no such device on this machine (try hardware=auto)")
    if want == "cuda" and distributed.active():  # hardware=ddp: each process its own GPU
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(want)


def autocast(device: torch.device, amp: bool):
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: TokenModel, split: Split, vocab: Vocab, cfg, device, with_lines: bool, limit: int = 0):
    """Metrics of one split: teacher-forced predictions, and free-running decoding for line_exact.
    `limit`: score only the split's first `limit` windows (0: all; `scored_windows`). Under hardware=ddp
    each rank scores a part and every rank gets the whole split's metrics (the same early-stopping calls)."""
    model.eval()
    n = min(len(split), limit) if limit else len(split)
    preds, gens, losses = [], [], []
    for x, y, _ in batches(split, cfg.data.window, 256, distributed.shard(torch.arange(n))):
        x, y = x.to(device), y.to(device)
        with autocast(device, cfg.hardware.amp):
            out = model(x, y[:, :-1])
            losses.append(model.loss(out, y[:, 1:])[0].item() * len(x))
            preds.append(model.predict(out).cpu())
            if with_lines:
                gens.append(model.generate(x, y.shape[1] - 1, BOS).cpu())
    preds, gens, loss = distributed.gather(preds, gens, sum(losses))
    pred, target = torch.cat(preds), split.targets[:n, 1:]
    metrics = token_metrics(pred, target, vocab)
    metrics["loss"] = loss / max(n, 1)
    if with_lines:
        metrics["line_exact"] = line_exact(torch.cat(gens), target)
    return metrics, pred


def scored_windows(tc) -> int:
    """How many windows of a split are scored: 0 (all), or trainer.limit_batches batches' worth."""
    return tc.limit_batches * tc.batch_size


def rng_state(gen: torch.Generator) -> dict:
    """Every random stream a resumed run must continue: the loop's generator, torch's, and CUDA's."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"gen": gen.get_state(), "torch": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(rng: dict, gen: torch.Generator) -> None:
    gen.set_state(rng["gen"])
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])


class NoProfiler:
    def step(self) -> None:
        pass


@contextlib.contextmanager
def profiled(steps: int, out: Path, device: torch.device):
    """trainer.profile_steps > 0: the PyTorch profiler over the first `steps` training steps (the first
    one a warm-up), its trace in out/trace.json and its costliest operators in the log. 0: a no-op."""
    if steps <= 0:
        yield NoProfiler()
        return
    from torch.profiler import ProfilerActivity, profile, schedule

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    out.mkdir(parents=True, exist_ok=True)
    with profile(activities=activities, schedule=schedule(wait=0, warmup=1, active=max(steps - 1, 1), repeat=1),
                 record_shapes=True) as prof:
        yield prof
    prof.export_chrome_trace(str(out / "trace.json"))
    log.info("profile of %d training steps: %s\n%s", max(steps - 1, 1), out / "trace.json",
             prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def progress_bar(epoch: int, max_epochs: int, steps: int, on: bool) -> tqdm:
    """Epoch k/N, steps, rate, ETA and the running loss on a terminal; nothing in logs or pipes."""
    return tqdm(total=steps, desc=f"epoch {epoch}/{max_epochs}", unit="step", leave=False, dynamic_ncols=True,
                disable=not (on and sys.stderr.isatty()))


def fit(cfg, data: Prepared, run_dir: Path, logger=None) -> dict:
    """Train with early stopping; checkpoints/best.pt holds the best epoch, last.pt the latest state.
    hardware=ddp: every rank runs this on its share of each batch (gcode_exp/distributed.py); rank 0 writes."""
    device, main = pick_device(cfg.hardware), distributed.is_main()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    train, val, tc = data.splits["train"], data.splits["val"], cfg.trainer
    model, lines = new_model(cfg, data)
    model = model.to(device)
    common = {
        "vocab": data.vocab.to_dict(),
        "features": vars(data.features),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "majority_line": majority_line(train.targets),
        "lines": lines,
        # what task=predict names programs from: the training windows' targets per file
        "train_windows": {"files": train.files, "file_windows": train.file_windows, "targets": train.targets},
    }
    state = {"epoch": 0, "best": -math.inf, "best_epoch": 0, "bad_epochs": 0, "collapsed": False, "history": []}
    ckpt_dir = run_dir / "checkpoints"
    if isinstance(model, NearestModel):  # a reference, not trained: its checkpoint is its training data
        log.info("%s: %d reference keys (%s)", cfg.name, len(model.keys), KEYS[int(model.mode)])
        for name in ("best.pt", "last.pt"):
            save_checkpoint(ckpt_dir / name, model=model.state_dict(), epoch=0, state=state, **common)
        return state
    rows = model.row_labels(train.row_targets)
    net = distributed.wrap(model, device)  # the model itself in one process
    opt = new_optimizer(tc.optimizer, model)
    rare = rare_window_mask(train.targets, data.vocab, cfg.aug.rare_commands)
    steps_per_epoch = math.ceil((len(train) + int(rare.sum()) * (cfg.aug.oversample_factor - 1)) / tc.batch_size)
    kept = None  # trainer.limit_batches: the same windows every epoch (drawn once from the seed), so one batch can be
    if tc.limit_batches:  # overfitted; reshuffled among themselves each epoch
        kept = epoch_order(len(train), rare, cfg.aug.oversample_factor, torch.Generator().manual_seed(cfg.seed))
        kept = kept[: tc.limit_batches * tc.batch_size]
        log.info("trainer.limit_batches=%d: %d of %d batches per epoch, always the same %d windows; val and test "
                 "scored on their first %d windows", tc.limit_batches, math.ceil(len(kept) / tc.batch_size),
                 steps_per_epoch, len(kept), scored_windows(tc))
        steps_per_epoch = math.ceil(len(kept) / tc.batch_size)
    sched = lr_schedule(opt, tc, steps_per_epoch)
    sign = 1 if tc.monitor_mode == "max" else -1
    if tc.resume:
        blob = load_checkpoint(ckpt_dir / "last.pt")
        resumed_settings(blob["config"], cfg)
        model.load_state_dict(blob["model"])
        wanted = dict(opt.defaults)  # the command line's optimiser settings win over the checkpoint's
        opt.load_state_dict(blob["optimizer"])
        sched.load_state_dict(blob["scheduler"])
        sched.base_lrs = [wanted["lr"]] * len(opt.param_groups)
        for group, factor in zip(opt.param_groups, sched.lr_lambdas, strict=True):
            group.update({k: v for k, v in wanted.items() if k in group}, lr=wanted["lr"] * factor(sched.last_epoch))
        set_rng_state(blob["rng"], gen)
        state = blob["state"]
        log.info("resuming after epoch %d from %s", state["epoch"], ckpt_dir / "last.pt")
    aug = Augment.from_config(cfg.aug, data.features)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("%s: %d params on %s; %d train windows (%d rare, x%d)", cfg.name, n_params, device, len(train),
             int(rare.sum()), cfg.aug.oversample_factor)
    for epoch in range(state["epoch"] + 1, tc.max_epochs + 1):
        t0 = time.perf_counter()
        model.train()
        if kept is None:
            order = epoch_order(len(train), rare, cfg.aug.oversample_factor, gen)
        else:
            order = kept[torch.randperm(len(kept), generator=gen)]
        batch_size, aug_gen = tc.batch_size, gen
        if net is not model:  # hardware=ddp: this rank's part of every batch, its own augmentation stream
            order, batch_size, aug_gen = distributed.epoch_share(order, tc.batch_size, gen)
        total, seen, n_steps = 0.0, 0, math.ceil(len(order) / batch_size)
        epoch_batches = batches(train, cfg.data.window, batch_size, order, aug, aug_gen, trim=True, row_labels=rows)
        steps = 0
        with progress_bar(epoch, tc.max_epochs, n_steps, tc.progress and main) as bar, \
                profiled(tc.profile_steps if epoch == 1 and main else 0, run_dir / "profile", device) as prof:
            for batch in epoch_batches:
                loss = train_step(net, opt, batch, device, cfg, sched)
                total, seen, steps = total + loss * len(batch[0]), seen + len(batch[0]), steps + 1
                bar.set_postfix(loss=f"{total / seen:.3f}", refresh=False)
                bar.update()
                prof.step()
            bar.refresh()  # the epoch's final loss shows even when the whole epoch beat tqdm's redraw interval
        train_sec = time.perf_counter() - t0
        total, seen = distributed.total(total, seen)  # hardware=ddp: the loss over every rank's windows
        val_metrics, _ = evaluate(model, val, data.vocab, cfg, device, with_lines=tc.monitor == "val/line_exact",
                                  limit=scored_windows(tc))
        row = {"epoch": epoch, "train/loss": total / max(seen, 1), "steps": steps, "sec": train_sec,
               **{f"val/{k}": v for k, v in val_metrics.items()}}
        state["history"].append(row)
        score = row.get(tc.monitor, float("nan"))
        if not math.isnan(score) and sign * score > state["best"]:
            state.update(best=sign * score, best_epoch=epoch, bad_epochs=0)
            if main:
                save_checkpoint(ckpt_dir / "best.pt", model=model.state_dict(), epoch=epoch, **common)
        else:
            state["bad_epochs"] += 1
        n_target = len(set(val.targets[:, 1:].flatten().tolist()) - {0})
        threshold = min(tc.collapse_min_unique, math.ceil(0.5 * n_target))
        collapsed_now = val_metrics["unique_tokens"] < threshold
        if collapsed_now and not state["collapsed"]:
            log.warning("collapse: %d distinct tokens predicted on val (< %d); %s",
                        val_metrics["unique_tokens"], threshold, COLLAPSE_REMEDIES)
        state["collapsed"] = state["collapsed"] or collapsed_now
        state["epoch"] = epoch
        if main:
            save_checkpoint(ckpt_dir / "last.pt", model=model.state_dict(), optimizer=opt.state_dict(), epoch=epoch,
                            scheduler=sched.state_dict(), state=state, rng=rng_state(gen), **common)
            write_csv(run_dir / "history.csv", state["history"])
        log.info("epoch %3d | train loss %.4f | val loss %.4f | %s %.4f | cmd %.3f | uniq %d | %.1fs",
                 epoch, row["train/loss"], row["val/loss"], tc.monitor, score, row["val/command_acc"],
                 row["val/unique_tokens"], train_sec)
        if logger is not None:
            logger.log(row, step=epoch)
        if os.environ.get("GCODE_EXP_KILL_AFTER_EPOCH") == str(epoch):  # fault injection for the resume tests
            distributed.barrier()  # hardware=ddp: rank 0 has written last.pt
            os.kill(os.getpid(), signal.SIGKILL)
        if state["bad_epochs"] >= tc.patience or (collapsed_now and tc.stop_on_collapse):
            log.info("stopping after epoch %d (best epoch %d)", epoch, state["best_epoch"])
            break
    distributed.barrier()  # hardware=ddp: best.pt written before any rank reads it
    return state


def new_model(cfg, data: Prepared) -> tuple[TokenModel | NearestModel, torch.Tensor]:
    """The untrained model of this config for this data, and the distinct training target lines its row
    head names (one builder for `fit` and the benchmark)."""
    lines = torch.unique(data.splits["train"].targets, dim=0)
    model = build_model(cfg.model, data.vocab, data.features.n_inputs, cfg.data.window, cfg.data.max_len, lines)
    if isinstance(model, NearestModel):
        model.fit_reference(data.splits["train"], data.features, cfg.data.window)
    return model, lines


def check_resumable(old: dict, cfg) -> None:
    """Resuming must continue the same experiment: a changed model, data, vocabulary, feature set or seed
    is refused with the keys that differ. Also called by run_folder.claim, before the folder is touched."""
    new = OmegaConf.to_container(cfg, resolve=True)
    known = OmegaConf.create(old)  # a key the run's config lacks is newer than the run: not a change
    fixed = [k for k in diff_keys(old, new) if (k.split(".")[0] in ("model", "vocab", "features", "seed")
             or k == "trainer.optimizer._target_"  # its state would not load into another class
             or (k.startswith("data.") and k.removeprefix("data.") not in ("on_error", *HOW_READ)))
             and OmegaConf.select(known, k, default="<absent>") != "<absent>"]
    if fixed:
        raise GcodeExpError(f"trainer.resume=true: the run was trained with other settings ({', '.join(fixed)}); "
                            "resume with the same ones, or start a new run")


def resumed_settings(old: dict, cfg) -> None:
    """`check_resumable`, then log the changed trainer settings (they are applied)."""
    check_resumable(old, cfg)
    new = OmegaConf.to_container(cfg, resolve=True)
    for key in diff_keys(old.get("trainer", {}), new["trainer"], "trainer."):
        if key != "trainer.resume":
            log.info("resume: %s changed to %s", key, OmegaConf.select(cfg, key))


def diff_keys(a, b, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [k for key in sorted(set(a) | set(b)) for k in diff_keys(a.get(key), b.get(key), f"{prefix}{key}.")]
    return [] if a == b else [prefix.rstrip(".")]


def new_optimizer(spec, model: torch.nn.Module) -> torch.optim.Optimizer:
    """trainer.optimizer built with the model's parameters; a setting the class refuses is one line. The
    target is trusted by name: config.validate accepted it as a torch.optim.Optimizer subclass."""
    try:
        return instantiate(spec, params=model.parameters(), _execution_whitelist_=(str(spec._target_),))
    except Exception as e:  # Hydra wraps the class's TypeError/ValueError
        why = str(e.__cause__ or e).splitlines()[0]
        raise GcodeExpError(f"trainer.optimizer._target_={spec._target_}: cannot be built ({why})") from None


def lr_schedule(opt: torch.optim.Optimizer, tc, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """`constant`, or `cosine`: linear warm-up over `warmup_epochs`, then cosine decay to 0 at max_epochs."""
    warmup, total = tc.warmup_epochs * steps_per_epoch, tc.max_epochs * steps_per_epoch

    def factor(step: int) -> float:
        if tc.scheduler == "constant":
            return 1.0
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(total - warmup, 1))))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train_step(model: TokenModel, opt: torch.optim.Optimizer, batch, device: torch.device, cfg,
               sched: torch.optim.lr_scheduler.LRScheduler | None = None) -> float:
    """One optimiser step on (inputs, targets, row labels); the loop and the benchmark both time this."""
    x, y, rows = (t.to(device, non_blocking=True) if t is not None else None for t in batch)
    with autocast(device, cfg.hardware.amp):
        loss, _ = model.loss(model(x, y[:, :-1]), y[:, 1:], rows)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.trainer.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.grad_clip)
    opt.step()
    if sched is not None:
        sched.step()
    return loss.item()


def load_model(blob: dict, device) -> tuple[TokenModel | NearestModel, Vocab]:
    """Rebuild the model a checkpoint was trained with, weights loaded, in eval mode."""
    cfg = OmegaConf.create(blob["config"])
    vocab = Vocab.from_dict(blob["vocab"])
    n_inputs = Features(**blob["features"]).n_inputs
    try:
        model = build_model(cfg.model, vocab, n_inputs, cfg.data.window, cfg.data.max_len, blob.get("lines"))
        model.load_state_dict(blob["model"])
    except (RuntimeError, KeyError, TypeError, ValueError, AttributeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GcodeExpError(f"ckpt_path={blob.get('path', '?')}: its weights do not fit the model its config "
                            f"describes ({first[:200]})") from None
    return model.to(device).eval(), vocab
