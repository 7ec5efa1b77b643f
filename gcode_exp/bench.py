"""Benchmark: `python -m gcode_exp.bench [--data-dir DIR] [--out bench.json] [hydra overrides ...]`.

Prints a table and writes JSON: training throughput of the full pipeline (batch gathering +
augmentation + step) against the bare step on pre-built tensors, per token model; inference latency per
window at batch 1 and 256, and live mode's cost per new window (greedy decoding at batch 1); for the
default model, the seconds to fit it and its latency; cold vs cached
`prepare`; epoch time of the multi-head model at 1x/2x/4x the data; peak memory.

Hydra overrides apply to every model timed; a model key (`model.d_model=32`, `model/encoder=lstm`) only
to the models that have it (the token models' sizes mean nothing to the default). Bad input (data folder,
override, --steps, --out) is refused before any timing, with one line on stderr, `error: <file or key>:
<what is wrong>`, and exit code 2; --out is written whole or not at all.
"""

from __future__ import annotations

import argparse
import difflib
import json
import platform
import resource
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from gcode_exp import GcodeExpError
from gcode_exp.atomic import write_text
from gcode_exp.config import ConfigError
from gcode_exp.config_checks import validate
from gcode_exp.data.dataset import cores, prepare
from gcode_exp.data.sampler import batches
from gcode_exp.models import Windows, new_model
from gcode_exp.training.trainer import Trainer

CONF = Path(__file__).resolve().parents[1] / "conf"
# what is timed: the default and the toolpath (nothing trained) and the token models, each composed with these
MODELS = {"default": [], "default_side": ["features=side_channel"], "baseline": ["model=baseline", "aug=3x"],
          "multihead": ["model=multihead", "aug=3x"],
          "new_programs": ["experiment=new_programs"], "toolpath": ["model=toolpath"], "rocket": ["model=rocket"]}
FITTED = ("toolpath", "rocket")  # fitted once, no optimiser steps: timed like the default


def machine() -> str:
    """What the figures were measured on: the CPU's threads, torch, and the GPU where there is one."""
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}{gpu}"


def timed(fn, repeat: int = 1) -> float:
    """Best of `repeat` runs, in seconds: the least disturbed by other work on the machine."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():  # GPU work is queued: the clock stops when it is done
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def trainer_for(cfg, data) -> Trainer:
    """The Trainer `fit` builds for this config (model, optimiser, schedule, sampler), without callbacks or a
    run folder: what is timed is its own `step`."""
    torch.manual_seed(0)
    model, _ = new_model(cfg, data)
    return Trainer(cfg, data, model, Path(tempfile.gettempdir()), checkpoint={})  # only `step`: nothing written


def train_steps(trainer: Trainer, batches_) -> None:
    trainer.model.train()
    for batch in batches_:
        trainer.step(batch)


def bench_model(cfg, data, steps: int) -> dict:
    """Windows/s of the Trainer's real step on batches gathered once vs the full per-epoch pipeline (the
    Sampler's gathering, oversampling and augmentation, then the same step)."""
    trainer = trainer_for(cfg, data)
    epoch = lambda: islice(trainer.batches(torch.Generator().manual_seed(0)), steps)  # noqa: E731
    prebuilt = list(epoch())
    n = sum(len(b[0]) for b in prebuilt)
    train_steps(trainer, prebuilt[:3])  # warm-up
    bare = timed(lambda: train_steps(trainer, prebuilt), 3)
    full = timed(lambda: train_steps(trainer, epoch()), 3)
    model = trainer.model.eval()
    out = {"params": sum(p.numel() for p in model.parameters()), "bare_windows_per_s": n / bare,
           "pipeline_windows_per_s": n / full, "pipeline_vs_bare": bare / full,
           "device": str(trainer.device) + (", windows on it" if trainer.sampler.device is not None else "")}
    with torch.no_grad():
        x1, y1 = (t[:1].to(trainer.device) for t in prebuilt[0][:2])
        big = [t.to(trainer.device) for t in next(batches(data.splits["train"], cfg.data.window, 256))[:2]]
        out["latency_ms_batch1"] = 1e3 * timed(lambda: model(x1, y1[:, :-1]), 20)
        # what live mode (task=predict predict.follow=true) spends on each new window: greedy decoding
        out["live_ms_per_window"] = 1e3 * timed(lambda: model.answer(x1), 10)
        out["latency_ms_per_window_batch256"] = 1e3 * timed(lambda: model(big[0], big[1][:, :-1]), 3) / len(big[0])
    return out


def bench_default(cfg, data) -> dict:
    """A model that trains nothing (the default, the toolpath, rocket): seconds to fit it to the training split, and
    its answer latency per window."""
    train, window = data.splits["train"], cfg.data.window
    model, _ = new_model(cfg, data)
    fit_s = timed(lambda: model.fit(train, data.features, window), 3)
    one, big = (Windows.of_split(train, window, torch.arange(min(n, len(train)))) for n in (1, 256))
    return {"reference": model.brief(), "fit_s": fit_s,
            "latency_ms_batch1": 1e3 * timed(lambda: model.predict(one), 20),
            "latency_ms_per_window_batch256": 1e3 * timed(lambda: model.predict(big), 3) / len(big)}


def bench_search(data, window: int, factors: tuple[int, ...] = (1, 4, 10)) -> dict:
    """model=nearest's reference search with the work position (gcode_exp/models/nearest.py, KeyIndex): ms
    per window at batch 1 and 256 with the archive 1x, 4x and 10x (the training keys replicated, each copy
    moved by 1 % of their spread: new points), beside comparing each row with every key (cdist in chunks of
    1024 rows, as before the index), and the index's build time."""
    from omegaconf import OmegaConf

    from gcode_exp.models.nearest import KeyIndex, NearestModel, row_keys

    model = NearestModel(OmegaConf.load(CONF / "model" / "nearest.yaml"), max_len=2)
    train = data.splits["train"]
    model.fit(train, data.features, window)  # ConfigError without the work position
    queries = {n: row_keys(train.rows[train.starts[:n, None] + torch.arange(window)], model.columns,
                           model.cfg.motion_weight).flatten(0, 1) for n in (1, 256)}  # n windows' rows
    base, spread, out = model.keys, model.keys.std(0), {}
    gen = torch.Generator().manual_seed(0)
    for k in factors:
        copies = [base + 0.01 * spread * torch.randn(base.shape, generator=gen) for _ in range(k - 1)]
        keys = torch.cat([base, *copies])
        build_s = timed(lambda ks=keys: KeyIndex(ks))
        index = KeyIndex(keys)
        row = {"keys": len(keys), "index_build_s": build_s}
        for n, q in queries.items():
            n_windows = len(q) // window  # fewer than n on a small training split
            row[f"index_ms_per_window_batch{n}"] = 1e3 * timed(lambda q=q, i=index: i.nearest(q), 5) / n_windows
            brute = 1e3 * timed(lambda q=q, ks=keys: [torch.cdist(q[i : i + 1024], ks).argmin(1)
                                                      for i in range(0, len(q), 1024)])  # in 1024-row chunks
            row[f"brute_ms_per_window_batch{n}"] = brute / n_windows
        out[f"{k}x"] = row
    return out


def bench_scaling(cfg, data) -> dict:
    """Seconds for one training epoch over the train split repeated 1x, 2x, 4x."""
    trainer, train = trainer_for(cfg, data), data.splits["train"]
    out = {}
    for k in (1, 2, 4):
        order = torch.arange(len(train)).repeat(k)
        out[f"{k}x"] = timed(lambda o=order: train_steps(trainer, batches(
            train, cfg.data.window, 32, o, trim=True, row_labels=trainer.sampler.row_labels)), 2)
    return out


def model_key(override: str) -> str | None:
    """The model key an override sets (`model.d_model` for `++model.d_model=32`, `model.encoder` for
    `model/encoder=lstm`); None for any other override."""
    key = override.lstrip("+~").split("=", 1)[0]
    return key.replace("/", ".") if key.startswith(("model.", "model/")) else None


def has_key(cfg: DictConfig, key: str) -> bool:
    missing = object()
    return OmegaConf.select(cfg, key, default=missing) is not missing


def hydra_reason(e: HydraException) -> str:
    """Hydra's message in one line: its first lines, the options it lists, without the search path."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    cut = next((i for i, line in enumerate(lines) if line.startswith(("Config search path", "See https"))), len(lines))
    lines = lines[:cut]
    if not lines:
        return type(e).__name__
    if lines[0].startswith("Error when parsing") and len(lines) > 1:  # its index counts the bench's own overrides
        return f"cannot be parsed: {lines[1]}"
    if any(line.startswith("Available options") for line in lines):
        at = next(i for i, line in enumerate(lines) if line.startswith("Available options"))
        return f"{' '.join(lines[:at])} (options: {', '.join(lines[at + 1:])})"
    return " ".join(lines[:2])


def compose_checked(base: list[str], user: list[str]) -> DictConfig:
    """conf/ composed with `base` then the user's overrides; Hydra's refusal names the override at fault."""
    def attempt(overrides: list[str]) -> DictConfig:
        with initialize_config_dir(config_dir=str(CONF)):
            return compose("config", overrides=overrides)

    try:
        return attempt([*base, *user])
    except HydraException as e:
        for o in user:  # the first override refused on its own; else the combination
            try:
                attempt([*base, o])
            except HydraException as alone:
                raise GcodeExpError(f"{o}: {hydra_reason(alone)}") from None
        raise GcodeExpError(f"{' '.join(user)}: {hydra_reason(e)}") from None


def configs(data_dir: str, overrides: list[str]) -> dict[str, DictConfig]:
    """The validated config of each model timed (MODELS). A model key goes only to the models that have it;
    one that none has, or an override choosing the model itself, is refused."""
    for o in overrides:
        if o.lstrip("+~").split("=", 1)[0] == "model":
            raise GcodeExpError(f"{o}: the bench times {', '.join(MODELS)} itself; give their keys as "
                                "model.KEY=VALUE (each goes to the models that have it)")
    shared = [o for o in overrides if model_key(o) is None]
    plain = {name: compose_checked([f"data.dir={data_dir}", *extra], shared) for name, extra in MODELS.items()}
    default = compose_checked([f"data.dir={data_dir}"], []).model.name
    if plain["default"].model.name != default:  # an experiment that picks a model
        chosen = [o for o in shared if o.lstrip("+~").startswith("experiment=")] or shared
        raise GcodeExpError(f"{' '.join(chosen)}: sets model={plain['default'].model.name}; the bench times "
                            f"{', '.join(MODELS)} itself")
    scoped = [o for o in overrides if model_key(o) is not None]
    for o in scoped:
        if not any(has_key(cfg, model_key(o)) for cfg in plain.values()):
            known = sorted({f"model.{k}" for cfg in plain.values() for k in cfg.model})
            near = difflib.get_close_matches(model_key(o), known, n=1)
            raise GcodeExpError(f"{o}: no model the bench times ({', '.join(MODELS)}) has the key {model_key(o)}"
                                + (f"; did you mean {near[0]}?" if near else ""))
    out = {}
    for name, cfg in plain.items():
        mine = [o.lstrip("+") for o in scoped if has_key(cfg, model_key(o))]  # `++model.x=1`: set, as it exists
        out[name] = compose_checked([f"data.dir={data_dir}", *MODELS[name], *shared], mine) if mine else cfg
        validate(out[name])
    return out


def check_out(path: Path) -> None:
    """--out can be written: its folder exists and takes a file (tried with a temp file, then removed)."""
    if path.is_dir():
        raise GcodeExpError(f"--out={path}: is a folder; name a file")
    folder = path.parent
    if not folder.is_dir():
        raise GcodeExpError(f"--out={path}: its folder {folder} " + ("is a file" if folder.exists() else
                                                                      "does not exist"))
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise GcodeExpError(f"--out={path}: cannot write in {folder} ({e.strerror or e})") from None


def prepared(cfg):
    """`prepare`, its error naming the data folder where the message does not already."""
    try:
        return prepare(cfg)
    except GcodeExpError as e:
        folder = str(cfg.data.dir)
        raise (e if str(e).startswith(folder) else GcodeExpError(f"{folder}: {e}")) from None


def main(argv: list[str] | None = None) -> dict:
    """The command; bad input is one line on stderr and exit code 2 (SystemExit), before any timing."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.error = lambda message: ap.exit(2, f"error: {message} (see --help)\n")  # type: ignore[method-assign]
    ap.add_argument("--data-dir", default="data/sample")
    ap.add_argument("--steps", type=int, default=30, help="training steps timed per model")
    ap.add_argument("--out", default="bench.json")
    ap.add_argument("--scale", help="instead: the data replicated at these factors, e.g. 1,4,10 (bench_scale.py)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model.d_model=64 (token models only)")
    args = ap.parse_args(argv)
    try:
        return bench(args)
    except (GcodeExpError, KeyboardInterrupt) as e:
        print(f"error: {str(e) or type(e).__name__}", file=sys.stderr)
        raise SystemExit(2) from None


def scales(text: str) -> list[int]:
    """`1,4,10` -> [1, 4, 10]; anything else is refused by name."""
    try:
        out = [int(v) for v in text.split(",")]
    except ValueError:
        out = []
    if not out or min(out) < 1 or out != sorted(set(out)):
        raise GcodeExpError(f"--scale={text}: give increasing whole factors >= 1, e.g. --scale 1,4,10")
    return out


def bench(args: argparse.Namespace) -> dict:
    if args.steps < 1:
        raise GcodeExpError(f"--steps={args.steps}: must be a whole number >= 1")
    factors = scales(args.scale) if args.scale is not None else None
    check_out(Path(args.out))
    cfgs = configs(args.data_dir, args.overrides)
    if factors:
        return scale_report(args, cfgs["multihead"], factors)
    cfg = cfgs["default"]
    with tempfile.TemporaryDirectory() as cache:  # a private cache: cold, then cached; nothing left behind
        cfg.data.cache_dir = cache
        cold = timed(lambda: prepared(cfg))
        cached = timed(lambda: prepared(cfg), 3)
        data = prepared(cfg)
    new_data = prepared(cfgs["new_programs"])  # its own features; refused here, not after the timings
    result = {
        "machine": machine(),
        "data_dir": args.data_dir,
        "train_windows": len(data.splits["train"]),
        "prepare_cold_s": cold,
        "prepare_cached_s": cached,
        "prepare_speedup": cold / cached,
        "models": {},
    }
    for name in ("baseline", "multihead", "new_programs"):
        mcfg = cfgs[name]
        result["models"][name] = bench_model(mcfg, data if name != "new_programs" else new_data, args.steps)
        if name == "multihead":
            result["epoch_s_by_data_size"] = bench_scaling(mcfg, data)
    result["default"] = bench_default(cfg, data)
    result["default_side"] = bench_default(cfgs["default_side"], prepared(cfgs["default_side"]))  # its signal key
    for name in FITTED:
        try:
            result[name] = bench_default(cfgs[name], data)
        except ConfigError as e:  # the toolpath without the work position: nothing to time
            result[name] = {"skipped": str(e)}
    try:
        result["reference_search"] = bench_search(data, cfg.data.window)
    except ConfigError as e:
        result["reference_search"] = {"skipped": str(e)}
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{result['machine']}; data {args.data_dir}: {result['train_windows']} train windows")
    print(f"prepare: cold {cold:.2f} s, cached {cached:.3f} s ({cold / cached:.0f}x); "
          f"training on {result['models']['baseline']['device']}")
    heads = ("params", "bare w/s", "pipe w/s", "pipe/bare", "b1 ms", "b256 ms/w", "live ms")
    print(f"{'model':16s} " + " ".join(f"{h:>9s}" for h in heads))
    for name, m in result["models"].items():
        print(f"{name:16s} {m['params']:9d} {m['bare_windows_per_s']:9.0f} {m['pipeline_windows_per_s']:9.0f} "
              f"{m['pipeline_vs_bare']:9.2f} {m['latency_ms_batch1']:9.2f} {m['latency_ms_per_window_batch256']:9.3f} "
              f"{m['live_ms_per_window']:9.2f}")
    for name, label in (("default", "default"), ("default_side", "default side-channel")):
        n = result[name]
        print(f"{label} ({cfg.model.name}, {n['reference']}): fitted in {n['fit_s']:.2f} s, "
              f"{n['latency_ms_batch1']:.2f} ms at batch 1, {n['latency_ms_per_window_batch256']:.3f} ms/window at 256")
    for name in FITTED:
        t = result[name]
        print(f"{name}: {t['skipped']}" if "skipped" in t else
              f"{name}: fitted in {t['fit_s']:.2f} s, {t['latency_ms_batch1']:.2f} ms at batch 1, "
              f"{t['latency_ms_per_window_batch256']:.3f} ms/window at 256")
    r = result["reference_search"]
    print(f"reference search (model=nearest): {r['skipped']}" if "skipped" in r else
          "reference search (model=nearest), ms/window at batch 1 / 256, index | every key: " + "; ".join(
              f"{k} ({v['keys']} keys) {v['index_ms_per_window_batch1']:.3f} / {v['index_ms_per_window_batch256']:.4f}"
              f" | {v['brute_ms_per_window_batch1']:.3f} / {v['brute_ms_per_window_batch256']:.4f}"
              for k, v in r.items()))
    s = result["epoch_s_by_data_size"]
    print("epoch seconds at 1x/2x/4x data: " + " / ".join(f"{v:.2f}" for v in s.values())
          + f" (4x/1x = {s['4x'] / s['1x']:.2f})")
    write_out(args.out, result)
    print(f"peak memory {result['peak_rss_mb']:.0f} MB; JSON in {args.out}")
    return result


def scale_report(args: argparse.Namespace, cfg: DictConfig, factors: list[int]) -> dict:
    from gcode_exp.bench_scale import bench_scale

    prepared(cfg)  # a folder that cannot be prepared is refused here, before copies are written
    mine = [o for o in args.overrides if model_key(o) is None or has_key(cfg, model_key(o))]  # for run.py
    result = {"machine": machine(),
              "data_dir": args.data_dir, "scale": bench_scale(cfg, factors, cores(), mine)}
    write_out(args.out, result)
    print(f"JSON in {args.out}")
    return result


def write_out(out: str, result: dict) -> None:
    text = json.dumps(result, indent=1)
    try:
        write_text(Path(out), text)
    except OSError as e:  # the folder went away during the run: the table above is printed all the same
        raise GcodeExpError(f"--out={out}: cannot write it ({e.strerror or e})") from None


if __name__ == "__main__":
    main()
