"""`python -m gcode_exp.bench --scale 1,4,10`: how preparation and training grow with the data.

The recordings of --data-dir are replicated k times into a temporary folder (each copy a new name and
its motor currents and IMU values scaled by 1 % noise, so every copy is a new file to the cache), and
for each k this measures, each in a fresh process: preparing cold, preparing from the per-recording
cache (the prepared data removed), a cache hit, adding one recording to the prepared folder; then a
real training run (`run.py model=multihead aug=3x trainer.max_epochs=1`): its epoch time and its peak
memory, both the resident set (which would count every page of the memory-mapped cache the epoch read,
had the windows not been read with pread: data.cache.RowFile) and the anonymous memory the process
itself allocated.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from gcode_exp.data.read import channel_group, find_recordings, run_name

ROOT = Path(__file__).resolve().parents[1]
NOISE = 0.01  # relative noise on the sensor values of each copy
HEADS = {"files": "files", "windows": "train_windows", "cold s": "prepare_cold_s",
         "per-file s": "prepare_per_file_cache_s", "cached s": "prepare_cached_s", "add-1 s": "add_one_file_s",
         "epoch s": "epoch_s", "rss MB": "train_peak_rss_mb", "anon MB": "train_peak_anon_mb",
         "prep MB": "prepare_peak_rss_mb"}


def copy_recording(src: Path, dest: Path, seed: int) -> None:
    """`src` with its sensor values scaled by (1 + NOISE * N(0, 1)), every other cell as written."""
    frame = pd.read_csv(src, dtype=str, keep_default_na=False)
    rng = np.random.default_rng(seed)
    for col in frame.columns:
        if channel_group(col) in ("motors", "boards"):
            values = pd.to_numeric(frame[col], errors="coerce").to_numpy()
            ok = np.isfinite(values)
            cells = frame[col].to_numpy(copy=True)
            cells[ok] = np.char.mod("%.7g", values[ok] * (1 + NOISE * rng.standard_normal(int(ok.sum()))))
            frame[col] = cells
    frame.to_csv(dest, index=False, compression={"method": "gzip", "compresslevel": 1})


def copy_name(src: Path, k: int) -> str:
    """Copy k of `face150025_003_aligned.csv.gz`: `face150025_k0003_aligned.csv.gz` (k = 0: the original name)."""
    name, op = run_name(src)
    idx = name.removeprefix(f"{op}_")
    return src.name if k == 0 else src.name.replace(name, f"{op}_k{k}{idx}", 1)


def replicate(sources: list[Path], folder: Path, copies: int, workers: int) -> list[list[Path]]:
    """`copies` perturbed copies of each source in `folder` (copy 0 too: every file written the same way),
    listed copy by copy."""
    folder.mkdir(parents=True, exist_ok=True)
    out = [[folder / copy_name(src, k) for src in sources] for k in range(copies)]
    jobs = [(src, out[k][i], 1000 * k + i) for k in range(copies) for i, src in enumerate(sources)]
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(copy_recording, *zip(*jobs, strict=True)))
    return out


def linked(files: list[Path], folder: Path) -> Path:
    """A folder of symlinks to `files`: the data of one scale, without writing it again."""
    folder.mkdir(parents=True)
    for f in files:
        (folder / f.name).symlink_to(f)
    return folder


def _peak_anon_mb(pid: int, peak: float) -> float:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return peak
    kb = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("RssAnon:")), 0)
    return max(peak, kb / 1024)


def watched(cmd: list[str], **kw) -> tuple[float, float]:
    """Run `cmd` to its end: (peak resident set MB, peak anonymous memory MB sampled every 20 ms, 0 where
    /proc is not there). Its stderr goes to a file: a pipe nobody reads while waiting would fill and stall it."""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, **kw)
        anon = 0.0
        while not (done := os.wait4(proc.pid, os.WNOHANG))[0]:
            anon = _peak_anon_mb(proc.pid, anon)
            time.sleep(0.02)
        _, status, usage = done
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            err.seek(0)
            last = err.read().decode(errors="replace").strip().splitlines()[-1:]
            raise RuntimeError(f"{' '.join(cmd[:3])} ... exited {proc.returncode}: {last}")
    rss_kb = usage.ru_maxrss / (1024 if sys.platform == "darwin" else 1)
    return rss_kb / 1024, anon


def _timed_prepare(container: dict, out) -> None:
    from gcode_exp.data.dataset import prepare

    t0 = time.perf_counter()
    data = prepare(OmegaConf.create(container))
    out.put((time.perf_counter() - t0, len(data.splits["train"]),
             resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def prepare_in_child(cfg: DictConfig) -> tuple[float, int, float]:
    """(seconds, train windows, peak RSS MB) of `prepare` in a fresh process: no warm imports or memory."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    child = ctx.Process(target=_timed_prepare, args=(OmegaConf.to_container(cfg, resolve=True), out))
    child.start()
    result = out.get()
    child.join()
    return result


def bench_scale(cfg: DictConfig, scales: list[int], workers: int, overrides: list[str]) -> dict:
    """Each scale's figures (see the module's docstring), from one set of generated copies; `overrides`
    (the bench's Hydra overrides) go to the training run too."""
    sources, _ = find_recordings(cfg.data.dir, cfg.data.pattern)
    out = {}
    with tempfile.TemporaryDirectory(prefix="gcode-exp-scale-") as tmp:
        t0 = time.perf_counter()
        copies = replicate(sources, Path(tmp) / "pool", max(scales) + 1, workers)  # one more: "add a file"
        print(f"{len(copies) * len(sources)} copies of {len(sources)} recordings written in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        print("scale " + " ".join(f"{h:>9s}" for h in HEADS), flush=True)
        for k in scales:
            files, extra = [f for copy in copies[:k] for f in copy], copies[-1][0]
            folder = linked(files, Path(tmp) / f"x{k}")
            cache = Path(tmp) / f"cache{k}"
            c = cfg.copy()
            c.data.dir, c.data.cache_dir = str(folder), str(cache)
            row = {"files": len(files)}
            row["prepare_cold_s"], row["train_windows"], row["prepare_peak_rss_mb"] = prepare_in_child(c)
            for entry in cache.glob("*.pt*"):  # the prepared data gone, each recording's table kept
                entry.unlink()
            row["prepare_per_file_cache_s"] = prepare_in_child(c)[0]
            row["prepare_cached_s"] = prepare_in_child(c)[0]
            (folder / extra.name).symlink_to(extra)
            row["add_one_file_s"] = prepare_in_child(c)[0]
            (folder / extra.name).unlink()
            run = Path(tmp) / f"run{k}"
            cmd = [sys.executable, str(ROOT / "run.py"), "model=multihead", "aug=3x", "trainer.max_epochs=1",
                   f"data.dir={folder}", f"data.cache_dir={cache}", f"hydra.run.dir={run}", "logger=none",
                   f"hardware.threads={torch_threads()}", *overrides]
            env = {**os.environ, "WANDB_MODE": "offline"}
            row["train_peak_rss_mb"], row["train_peak_anon_mb"] = watched(cmd, cwd=ROOT, env=env)
            row["epoch_s"] = json.loads((run / "metrics.json").read_text())["sec_per_epoch"]
            out[f"{k}x"] = row
            print(f"{k:>4}x " + " ".join(f"{row[key]:>9.2f}" if isinstance(row[key], float) else f"{row[key]:>9d}"
                                         for key in HEADS.values()), flush=True)
    return out


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()
