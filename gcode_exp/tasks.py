"""The jobs behind `run.py task=...`: prepare, train, eval (and predict, in gcode_exp/predict.py). Each
writes into the run folder and returns its metrics; `run` returns the number a sweeper optimises."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from omegaconf import OmegaConf

from gcode_exp import GcodeExpError, distributed, run_folder, trust
from gcode_exp.atomic import write_csv, write_json
from gcode_exp.config_checks import check_against_data, validate
from gcode_exp.data import perturb
from gcode_exp.data.dataset import Prepared, prepare, read_runs
from gcode_exp.data.read import DataError, list_runs
from gcode_exp.data.windows import build_split
from gcode_exp.logger import make_logger
from gcode_exp.sweeps import TrialLink, pruning, record_optuna_trial
from gcode_exp.training.checkpoint import Checkpoint
from gcode_exp.training.device import pick_device
from gcode_exp.training.evaluate import evaluate, scored_windows
from gcode_exp.training.metrics import majority_metrics, per_class
from gcode_exp.training.trainer import fit

log = logging.getLogger(__name__)


def run(cfg, run_dir: Path, hydra_cfg=None) -> dict:
    """Validate the config, claim the run folder (gcode_exp/run_folder.py), then run the job it names."""
    run_dir = Path(run_dir)
    trust.use(cfg)  # what a checkpoint's config may name: from this command, before any checkpoint is read
    cfg = run_folder.resumed_config(cfg, run_dir, list(hydra_cfg.overrides.task) if hydra_cfg is not None else None)
    validate(cfg)
    distributed.setup(cfg)  # hardware=ddp: checked, the process group joined; else nothing
    distributed.on_main(run_folder.claim, run_dir, cfg)  # rank 0 alone touches the folder
    if distributed.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
    with run_folder.record(run_dir, cfg, hydra_cfg) if distributed.is_main() else contextlib.nullcontext():
        trial = None
        if hydra_cfg is not None and hydra_cfg.mode.name == "MULTIRUN":
            trial = record_optuna_trial(run_dir)  # an Optuna trial records which folder it wrote
        if cfg.task == "prepare":
            out = prepare_job(cfg, run_dir)
        elif cfg.task == "predict":
            from gcode_exp.predict import predict_job

            out = predict_job(cfg, run_dir)
        elif cfg.task == "serve":
            from gcode_exp.serve import serve_job

            out = serve_job(cfg, run_dir)
        else:
            out = train_job(cfg, run_dir, trial) if cfg.task == "train" else eval_job(cfg, run_dir)
    distributed.finish()  # hardware=ddp: every rank done (rank 0 has written all) before any leaves
    return out


def prepare_checked(cfg) -> Prepared:
    """The prepared data, and the config checks only the training data can answer (gcode_exp/config_checks.py)."""
    data = prepare(cfg)
    train = data.summary["train"]
    check_against_data(cfg, data.vocab.tokens, train["targets_cut_share"], train["longest_target"])
    return data


def prepare_job(cfg, run_dir: Path) -> dict:
    data = prepare_checked(cfg)
    write_json(run_dir / "data_summary.json", data.summary)
    s = data.summary
    print(f"vocab {cfg.vocab.name}: {s['vocab_size']} tokens {s['token_counts_by_type']}; "
          f"{s['n_channels']} channels + {s['n_board_flags']} board flags ({'+'.join(s['feature_groups'])})")
    for name in ("train", "val", "test"):
        print(f"{name:5s}: {len(s[name]['files']):3d} files {s[name]['windows']:5d} windows "
              f"{s[name]['distinct_target_lines']:4d} distinct targets, OOV {s[name]['oov_rate']:.2%}")
    if s["skipped_files"]:
        print(f"skipped {len(s['skipped_files'])} unusable files (see data_summary.json)")
    return s


def train_job(cfg, run_dir: Path, trial: TrialLink | None = None) -> dict:
    """Train, then score the best epoch on val and test. hardware=ddp: every rank trains and scores its
    part; rank 0 writes. `trial`: the Optuna trial this run is, which its pruner may stop early."""
    main = distributed.is_main()
    data = distributed.main_first(prepare_checked, cfg)
    if main:
        write_json(run_dir / "data_summary.json", data.summary)
        data.vocab.save(run_dir / "vocab.json")
    logger = make_logger(cfg, run_dir) if main else None
    try:
        state = fit(cfg, data, run_dir, logger, pruning(cfg, trial))
        device = pick_device(cfg.hardware)
        ckpt = Checkpoint.load(run_dir / "checkpoints" / "best.pt")
        model, vocab = ckpt.model(device)
        metrics = {}
        for split in ("val", "test"):
            m, pred, _ = evaluate(model, data.splits[split], vocab, cfg, device, with_lines=cfg.trainer.line_exact,
                                  limit=scored_windows(cfg.trainer))
            metrics.update({f"{split}/{k}": v for k, v in m.items()})
        test = data.splits["test"].targets[: len(pred)]  # the windows scored (trainer.limit_batches: the first ones)
        majority = majority_metrics(ckpt.majority_line, test, vocab)
        history = state["history"]
        metrics.update({f"majority/{k}": v for k, v in majority.items()})
        metrics.update(
            best_epoch=state["best_epoch"],
            epochs=len(history),
            sec_per_epoch=sum(r["sec"] for r in history) / max(len(history), 1),
            collapsed=state["collapsed"],
            pruned_epoch=state.get("pruned_epoch", 0),  # the epoch after which an Optuna pruner stopped it; 0: never
            n_params=sum(p.numel() for p in model.parameters()),
        )
        if main:
            write_outputs(cfg, run_dir, metrics, pred, test[:, 1:], vocab, history)
        if logger is not None:
            logger.finish(metrics, run_dir / "plots")
            logger = None
        return metrics
    finally:
        if logger is not None:
            logger.finish(None, None)


def eval_job(cfg, run_dir: Path) -> dict:
    """Score a checkpoint on every window of every file in data.dir, read the way it was trained."""
    ckpt = Checkpoint.load(cfg.ckpt_path)
    feats = ckpt.features
    data_cfg = OmegaConf.create(ckpt.config["data"])
    for key in ("dir", "pattern", "on_error", "max_nonfinite"):
        data_cfg[key] = cfg.data[key]
    runs, skipped = read_runs(list_runs(data_cfg.dir, data_cfg.pattern), data_cfg)
    runs = perturb.perturb_recordings(runs, cfg.get("perturb"), window=data_cfg.window, stride=data_cfg.stride,
                                      on_error=data_cfg.on_error, skipped=skipped)  # perturb=...: shop conditions
    if not runs:
        raise DataError(f"{data_cfg.dir}: no usable recordings")
    required = [c for c in feats.channels if "." not in c]
    for r in runs:
        missing = [c for c in required if c not in r.columns]
        if missing:
            raise DataError(f"{r.path}: lacks channels the checkpoint was trained on: {', '.join(missing[:5])}")
    device = pick_device(cfg.hardware)
    model, vocab = ckpt.model(device)
    split = build_split(runs, feats, vocab, data_cfg)
    eval_cfg = OmegaConf.merge(ckpt.config, {"hardware": cfg.hardware, "data": data_cfg})
    m, pred, hits = evaluate(model, split, vocab, eval_cfg, device, with_lines=cfg.trainer.line_exact,
                             limit=scored_windows(cfg.trainer))
    metrics = {f"test/{k}": v for k, v in m.items()}
    targets = split.targets[: len(pred)]  # the windows scored (trainer.limit_batches: the first ones)
    majority = majority_metrics(ckpt.majority_line, targets, vocab)
    metrics.update({f"majority/{k}": v for k, v in majority.items()})
    metrics["ckpt_path"] = str(cfg.ckpt_path)
    metrics["perturb"] = perturb.describe(cfg.get("perturb"))
    summary = {"data_dir": str(data_cfg.dir), "test": {"files": split.files, "windows": len(split)},
               "seen_in_training": ckpt.seen_in_training(split.files),
               "skipped_files": skipped, "perturb": perturb.summary(cfg.get("perturb"))}
    write_json(run_dir / "data_summary.json", summary)
    if hits is not None:
        write_csv(run_dir / "per_recording.csv", per_recording(split, hits), ["recording", "windows", "line_exact"])
    write_outputs(cfg, run_dir, metrics, pred, targets[:, 1:], vocab, None)
    return metrics


def per_recording(split, hits) -> list[dict]:
    """Each scored recording's windows and line exact: which recordings a score comes from (one recording
    placed in another program moves a folder's figure by a fifteenth)."""
    rows, start = [], 0
    for name, n in zip(split.files, split.file_windows):
        mine = hits[start : start + n]
        start += n
        if len(mine):
            rows.append({"recording": name, "windows": len(mine), "line_exact": round(float(mine.float().mean()), 4)})
    return rows


def write_outputs(cfg, run_dir: Path, metrics: dict, pred, target, vocab, history) -> None:
    """metrics.json (last, so its presence means 'finished'), per_class.csv and plots/."""
    rows = per_class(pred, target, vocab)
    write_csv(run_dir / "per_class.csv", rows, list(rows[0]) if rows else ["token"])
    if cfg.trainer.plots:
        from gcode_exp import plots  # matplotlib: 0.4 s that a run without plots (or one refused) need not wait

        out = run_dir / "plots"
        if history:
            plots.learning_curves(history, out / "learning_curves.png")
        plots.command_confusion(pred, target, vocab, out / "command_confusion.png")
        plots.token_frequencies(pred, target, vocab, out / "token_frequencies.png")
        plots.command_recall(rows, out / "command_recall.png")
    write_json(run_dir / "metrics.json", metrics)
    keys = ("line_exact", "overall_acc", "command_acc", "command_macro_recall", "token_macro_recall", "unique_tokens")
    for label, prefix in (("test", "test/"), ("majority reference", "majority/")):
        shown = [k for k in keys if prefix + k in metrics]  # line_exact: not with trainer.line_exact=false
        log.info("%s: %s", label, " | ".join(f"{k} {metrics[prefix + k]:.3f}" for k in shown))


def objective(cfg, metrics: dict) -> float | None:
    """The number a sweeper optimises: `optimized_metric` (default: the early-stopping monitor) of a
    training run; None for prepare and eval, which have no validation metrics to optimise."""
    if cfg.task != "train":
        return None
    key = cfg.get("optimized_metric") or cfg.trainer.monitor
    value = metrics.get(key)
    if value is None:
        raise GcodeExpError(f"optimized_metric={key}: not a metric of this run (e.g. {', '.join(sorted(metrics)[:6])})")
    return float(value)
