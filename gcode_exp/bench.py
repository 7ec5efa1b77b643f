"""Benchmark: `python -m gcode_exp.bench [--data-dir DIR] [--out bench.json] [hydra overrides ...]`.

Prints a table and writes JSON: training throughput of the full pipeline (batch gathering +
augmentation + step) against the bare step on pre-built tensors, per token model; inference latency per
window at batch 1 and 256, and live mode's cost per new window (greedy decoding at batch 1); for the
default nearest-reference model, the seconds to build its reference and its latency; cold vs cached
`prepare`; epoch time of the multi-head model at 1x/2x/4x the data; peak memory.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from gcode_exp.data.augment import Augment, batches, epoch_order, rare_window_mask
from gcode_exp.data.dataset import prepare
from gcode_exp.data.vocab import BOS
from gcode_exp.models import NearestModel
from gcode_exp.training.loop import new_model, train_step

CONF = Path(__file__).resolve().parents[1] / "conf"


def timed(fn, repeat: int = 1) -> float:
    """Best of `repeat` runs, in seconds: the least disturbed by other work on the machine."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def train_steps(model, opt, batches_, cfg) -> None:
    for batch in batches_:
        train_step(model, opt, batch, torch.device("cpu"), cfg)


def build(cfg, data):
    """The model and optimiser `fit` builds for this config, and the row labels it trains with."""
    torch.manual_seed(0)
    model, _ = new_model(cfg, data)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, opt, model.row_labels(data.splits["train"].row_targets)


def bench_model(cfg, data, steps: int) -> dict:
    """Windows/s of the real training step (gcode_exp.training.loop.train_step) on tensors gathered once
    vs the full per-epoch pipeline (gathering, oversampling, augmentation, the same step)."""
    gen = torch.Generator().manual_seed(0)
    train, bs = data.splits["train"], cfg.trainer.batch_size
    model, opt, rows = build(cfg, data)
    aug = Augment.from_config(cfg.aug, data.features)
    rare = rare_window_mask(train.targets, data.vocab, cfg.aug.rare_commands)
    order = epoch_order(len(train), rare, cfg.aug.oversample_factor, gen)[: steps * bs]
    prebuilt = list(batches(train, cfg.data.window, bs, order, trim=True, row_labels=rows))
    n = sum(len(b[0]) for b in prebuilt)
    model.train()
    train_steps(model, opt, prebuilt[:3], cfg)  # warm-up
    bare = timed(lambda: train_steps(model, opt, prebuilt, cfg), 3)
    pipeline = lambda: batches(train, cfg.data.window, bs, order, aug, gen, trim=True, row_labels=rows)  # noqa: E731
    full = timed(lambda: train_steps(model, opt, pipeline(), cfg), 3)
    model.eval()
    out = {"params": sum(p.numel() for p in model.parameters()), "bare_windows_per_s": n / bare,
           "pipeline_windows_per_s": n / full, "pipeline_vs_bare": bare / full}
    with torch.no_grad():
        x1, y1 = prebuilt[0][0][:1], prebuilt[0][1][:1]
        big = next(batches(train, cfg.data.window, 256))
        out["latency_ms_batch1"] = 1e3 * timed(lambda: model(x1, y1[:, :-1]), 20)
        # what live mode (task=predict predict.follow=true) spends on each new window: greedy decoding
        out["live_ms_per_window"] = 1e3 * timed(lambda: model.generate(x1, cfg.data.max_len - 1, BOS), 10)
        out["latency_ms_per_window_batch256"] = 1e3 * timed(lambda: model(big[0], big[1][:, :-1]), 3) / len(big[0])
    return out


def bench_nearest(cfg, data) -> dict:
    """Seconds to build the reference from the training split, and answer latency per window."""
    train, window = data.splits["train"], cfg.data.window
    model = NearestModel(cfg.model, max_len=cfg.data.max_len)
    fit_s = timed(lambda: model.fit_reference(train, data.features, window), 3)
    x1 = train.rows[train.starts[:1, None] + torch.arange(window)]
    big = train.rows[train.starts[:256, None] + torch.arange(window)]
    return {"reference_keys": len(model.keys), "fit_s": fit_s,
            "latency_ms_batch1": 1e3 * timed(lambda: model.answer(x1), 20),
            "latency_ms_per_window_batch256": 1e3 * timed(lambda: model.answer(big), 3) / len(big)}


def bench_scaling(cfg, data) -> dict:
    """Seconds for one training epoch over the train split repeated 1x, 2x, 4x."""
    train = data.splits["train"]
    model, opt, rows = build(cfg, data)
    out = {}
    for k in (1, 2, 4):
        order = torch.arange(len(train)).repeat(k)
        out[f"{k}x"] = timed(lambda o=order: train_steps(
            model, opt, batches(train, cfg.data.window, 32, o, trim=True, row_labels=rows), cfg), 2)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default="data/sample")
    ap.add_argument("--steps", type=int, default=30, help="training steps timed per model")
    ap.add_argument("--out", default="bench.json")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model.d_model=64")
    args = ap.parse_args(argv)
    with initialize_config_dir(config_dir=str(CONF)):
        cfg = compose("config", overrides=[f"data.dir={args.data_dir}", *args.overrides])
    with tempfile.TemporaryDirectory() as cache:
        cfg.data.cache_dir = cache
        cold = timed(lambda: prepare(cfg))
        cached = timed(lambda: prepare(cfg), 3)
    data = prepare(cfg)
    result = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "data_dir": args.data_dir,
        "train_windows": len(data.splits["train"]),
        "prepare_cold_s": cold,
        "prepare_cached_s": cached,
        "prepare_speedup": cold / cached,
        "models": {},
    }
    token_models = {"baseline": ["model=baseline", "aug=3x"], "multihead": ["model=multihead", "aug=3x"],
                    "new_programs": ["experiment=new_programs"]}
    for name, extra in token_models.items():
        with initialize_config_dir(config_dir=str(CONF)):
            mcfg = compose("config", overrides=[f"data.dir={args.data_dir}", *args.overrides, *extra])
        result["models"][name] = bench_model(mcfg, data if name != "new_programs" else prepare(mcfg), args.steps)
        if name == "multihead":
            result["epoch_s_by_data_size"] = bench_scaling(mcfg, data)
    result["nearest"] = bench_nearest(cfg, data)  # the default model
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"{result['machine']}; data {args.data_dir}: {result['train_windows']} train windows")
    print(f"prepare: cold {cold:.2f} s, cached {cached:.3f} s ({cold / cached:.0f}x)")
    heads = ("params", "bare w/s", "pipe w/s", "pipe/bare", "b1 ms", "b256 ms/w", "live ms")
    print(f"{'model':16s} " + " ".join(f"{h:>9s}" for h in heads))
    for name, m in result["models"].items():
        print(f"{name:16s} {m['params']:9d} {m['bare_windows_per_s']:9.0f} {m['pipeline_windows_per_s']:9.0f} "
              f"{m['pipeline_vs_bare']:9.2f} {m['latency_ms_batch1']:9.2f} {m['latency_ms_per_window_batch256']:9.3f} "
              f"{m['live_ms_per_window']:9.2f}")
    n = result["nearest"]
    print(f"default (nearest, {n['reference_keys']} keys): reference built in {n['fit_s']:.2f} s, "
          f"{n['latency_ms_batch1']:.2f} ms at batch 1, {n['latency_ms_per_window_batch256']:.3f} ms/window at 256")
    s = result["epoch_s_by_data_size"]
    print("epoch seconds at 1x/2x/4x data: " + " / ".join(f"{v:.2f}" for v in s.values())
          + f" (4x/1x = {s['4x'] / s['1x']:.2f})")
    print(f"peak memory {result['peak_rss_mb']:.0f} MB; JSON in {args.out}")
    return result


if __name__ == "__main__":
    main()
