"""From a folder of recordings to a prepared dataset: reading every file (in parallel, skipping bad ones,
through the recording cache), then split, fit and window it, or load it all from the prepared cache.

Everything the model sees is fitted on training files only (channel list, normalisation, vocabulary):
the split is `splits`, the inputs and targets are `windows`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path

import numpy as np

from gcode_exp.data.cache import (
    CACHE_VERSION,
    DamagedEntry,
    cache_off,
    file_hashes,
    load_entry,
    load_recording,
    recording_entry,
    row_file,
    save_entry,
    save_recording,
    writable_folder,
)
from gcode_exp.data.read import (
    DataError,
    RecordedRun,
    channel_group,
    find_recordings,
    read_run,
    recording_key,
    run_name,
)
from gcode_exp.data.splits import SPLITS, WINDOW_WARNING, covered_rows, split_runs, split_windows
from gcode_exp.data.vocab import PAD, UNK, Vocab
from gcode_exp.data.windows import Features, Split, build_split, fit_features

log = logging.getLogger(__name__)
SPLIT_DEFAULTS = {"split_by": "file", "folds": 0, "fold": 0, "train_share": 1.0}  # left out of the cache key
HOW_READ = ("cache_dir", "workers")  # data keys that change how recordings are read and kept, never what
NOT_IN_KEY = ("dir", *HOW_READ)  # data keys left out of the prepared data's cache key (dir: hashed apart)
PARALLEL_BYTES = 16 << 20  # fewer bytes to read are read in this process: starting a pool costs more (the
# 7.7 MB sample: 0.5 s in one process, 0.8 s in two; the 58 MB dataset: 3.2 s in one, 2.1 s in two)
POOL_CONTEXT = None  # the platform's default start method for the reading processes


# --- reading many files -----------------------------------------------------------------------------
def read_runs(paths: list[Path], data_cfg, cache: Path | None = None,
              hashes: dict[Path, str] | None = None) -> tuple[list[RecordedRun], list[dict]]:
    """Read files, `data.workers` processes at once; with a `cache` folder, a file read before (same
    bytes) is loaded from it instead, and newly read files are added once every file passed. With
    data.on_error=skip, unusable files are skipped (warned and returned as records). What a file's
    reading fixed by a rule is warned about here, once per file (RecordedRun.warnings)."""
    twice = same_recording_twice(paths)
    if cache and hashes is None:
        hashes = file_hashes(paths)
    entries = {p: recording_entry(cache, p, hashes[p], data_cfg.max_nonfinite) for p in paths} if cache else {}
    known = {p: run for p in paths if p not in twice and (run := load_recording(entries.get(p))) is not None}
    unread = [p for p in paths if p not in twice and p not in known]
    fresh = dict(zip(unread, read_files(unread, data_cfg.max_nonfinite, data_cfg.get("workers", 0)), strict=True))
    runs, skipped = [], []
    for path in paths:
        try:
            run = known.get(path) or fresh.get(path) or DataError(twice[path])
            if isinstance(run, DataError):
                raise run
            check_windows(run, path, data_cfg)
            runs.append(run)
        except DataError as e:
            if data_cfg.on_error != "skip":
                raise
            log.warning("skipping %s", e)
            skipped.append({"file": path.name, "error": str(e)})
            continue
        for note in run.warnings:
            log.warning("%s", note)
    for path, run in fresh.items():
        if cache and isinstance(run, RecordedRun):
            save_recording(run, entries[path])
    return runs, skipped


def read_files(paths: list[Path], max_nonfinite: float, workers: int) -> list[RecordedRun | DataError]:
    """Each file read, or why it cannot be; by `workers` processes (0: one per core) when the files hold
    PARALLEL_BYTES or more, else in this process."""
    n = min(workers or cores(), len(paths))
    small = sum(p.stat().st_size for p in paths if p.is_file()) < PARALLEL_BYTES
    if n <= 1 or small or multiprocessing.current_process().daemon:  # a pool's worker may not start processes
        return [read_or_error(p, max_nonfinite) for p in paths]
    try:
        with ProcessPoolExecutor(n, mp_context=POOL_CONTEXT) as pool:
            return list(pool.map(read_or_error, paths, repeat(max_nonfinite)))
    except BrokenProcessPool:  # a reading process was killed (out of memory?): what it did is lost, not the run
        log.warning("a process reading recordings died (killed, out of memory?); reading the %d files in this "
                    "process instead (data.workers=1 does so from the start)", len(paths))
        return [read_or_error(p, max_nonfinite) for p in paths]


def cores() -> int:
    """CPU cores this process may use (a container's or taskset's share, not the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def read_or_error(path: Path, max_nonfinite: float) -> RecordedRun | DataError:
    try:
        return read_run(path, max_nonfinite)
    except DataError as e:
        return e


def same_recording_twice(paths: list[Path]) -> dict[Path, str]:
    """`x_aligned.csv` beside `x_aligned.csv.gz`: which one is the run? Each such path -> why it is refused."""
    by_name: dict[str, list[Path]] = {}
    for path in paths:
        by_name.setdefault(recording_key(run_name(path)[0]), []).append(path)
    return {path: f"{', '.join(map(str, same))}: the same recording twice (each reads as run '{name}'); keep one"
            for name, same in by_name.items() if len(same) > 1 for path in same}


def with_every_channel(runs: list[RecordedRun], skipped: list[dict], groups: list[str],
                       data_cfg) -> list[RecordedRun]:
    """A recording without a controller or motor channel the others have is refused, as task=eval and
    task=predict refuse it (an input read as its mean would be a guess); data.on_error=skip skips it.
    IMU boards may be absent: their presence flag says so."""
    wanted = {c for r in runs for c in r.columns if channel_group(c) in groups and channel_group(c) != "boards"}
    kept = []
    for r in runs:
        missing = sorted(wanted - set(r.columns))
        if not missing:
            kept.append(r)
            continue
        error = DataError(f"{r.path}: lacks channels the other recordings have: {', '.join(missing[:5])}")
        if data_cfg.on_error != "skip":
            raise error
        log.warning("skipping %s", error)
        skipped.append({"file": Path(r.path).name, "error": str(error)})
    return kept


def check_windows(run: RecordedRun, path: Path, data_cfg) -> None:
    """A file must give at least one window with a labelled row (the windows build_split makes)."""
    n, w, stride = len(run.lines), data_cfg.window, data_cfg.stride
    if n < w:
        raise DataError(f"{path}: {n} rows, fewer than one window (data.window={w})")
    labelled = np.concatenate([[0], np.cumsum([bool(t) for t in run.lines])])
    starts = np.arange(0, n - w + 1, stride)
    if not (labelled[starts + w] > labelled[starts]).any():
        raise DataError(f"{path}: no window holds a labelled row (its {labelled[-1]} rows with a gcode_string "
                        f"fall outside the windows of data.window={w}, data.stride={stride})")


# --- the prepared dataset and its cache ---------------------------------------------------------------
@dataclass
class Prepared:
    splits: dict[str, Split]
    vocab: Vocab
    features: Features
    summary: dict


def prepared_key(paths: list[Path], hashes: dict[Path, str], cfg) -> str:
    """The prepared dataset's cache key: the folder read, as spelled and resolved (a cache hit's summary
    and messages name exactly the folder this run read), the data config and every file's name and bytes."""
    h = hashlib.sha256(f"v{CACHE_VERSION}".encode())
    keys = {k: cfg.data[k] for k in cfg.data if k not in NOT_IN_KEY
            and not (k in SPLIT_DEFAULTS and (cfg.data[k] or 0) == SPLIT_DEFAULTS[k])}  # older caches stay valid
    h.update(json.dumps([keys, dict(cfg.vocab), dict(cfg.features)], sort_keys=True, default=str).encode())
    h.update(f"{Path(cfg.data.dir)}\0{Path(cfg.data.dir).resolve()}".encode())
    for p in paths:
        h.update(f"{p.name}\0{hashes[p]}".encode())
    return h.hexdigest()[:24]


def save_prepared(prepared: Prepared, cfg, path: Path) -> None:
    """The prepared data, split by split, as one memory-mappable entry. A cache that cannot be written
    (disk full) is a warning: this run goes on without it."""
    from omegaconf import OmegaConf

    blob = {
        "splits": {k: v.stored() for k, v in prepared.splits.items()},
        "vocab": prepared.vocab.to_dict(),
        "features": vars(prepared.features),
        "summary": prepared.summary,
        "config": OmegaConf.to_container(cfg.data),
    }
    try:
        save_entry(blob, path)
    except OSError as e:
        cache_off(Path(cfg.data.cache_dir), e)


def load_prepared(path: Path) -> Prepared | None:
    """The cached data, its tensors mapped from disk, or None if there is none; a damaged entry is
    warned about, never trusted, and rebuilt by the caller."""
    try:
        blob = load_entry(path)
    except (DamagedEntry, OSError) as e:
        log.warning("ignoring unreadable cache %s (%s); rebuilding it", path, e)
        return None
    if blob is None:
        return None
    splits = {k: Split(**v) for k, v in blob["splits"].items()}
    for split in splits.values():
        split.rows_file = row_file(path, split.rows)
    return Prepared(splits=splits, vocab=Vocab.from_dict(blob["vocab"]), features=Features(**blob["features"]),
                    summary=blob["summary"])


def prepare(cfg) -> Prepared:
    """Read, split, fit and window the data of `cfg.data.dir`, or load it from the cache."""
    paths, ignored = find_recordings(cfg.data.dir, cfg.data.pattern)
    hashes = file_hashes(paths) if cfg.data.cache_dir else {}
    cache = Path(cfg.data.cache_dir) / f"{prepared_key(paths, hashes, cfg)}.pt" if cfg.data.cache_dir else None
    cached = load_prepared(cache) if cache else None
    if cached is not None:
        log.info("data cache hit: %s", cache)
        for s in cached.summary["skipped_files"]:  # the warnings of the run that built it, again
            log.warning("skipping %s", s["error"])
        for w in [*(w["warning"] for w in cached.summary["file_warnings"]), *cached.summary["vocab_warnings"]]:
            log.warning("%s", w)
        cached.summary["ignored_files"] = ignored  # not part of the key: what the folder holds now
        if cfg.data.split_by == "window":
            log.warning("%s", WINDOW_WARNING)
        return cached
    folder = writable_folder(cfg.data.cache_dir)
    runs, skipped = read_runs(paths, cfg.data, folder, hashes)
    runs = with_every_channel(runs, skipped, list(cfg.features.groups), cfg.data)
    if cfg.data.split_by == "window":  # every file in every split; each split keeps its own windows
        keep, split_info = split_windows(runs, cfg.data)
        parts = {name: [r for r in runs if r.name in keep[name]] for name in SPLITS}
        fit_on = [covered_rows(r, keep["train"][r.name], cfg.data.window) for r in parts["train"]]
    else:
        parts, split_info = split_runs(runs, cfg.data)
        keep, fit_on = None, parts["train"]
    vocab = Vocab.build((t for r in fit_on for t in r.lines if t), cfg.vocab.digits)
    feats = fit_features(fit_on, list(cfg.features.groups), cfg.features.board_flags, cfg.features.elapsed)
    splits = {name: build_split(parts[name], feats, vocab, cfg.data, keep[name] if keep else None) for name in SPLITS}
    oddities = {k: sum(getattr(r, k) for r in runs) for k in ("nonfinite_cells", "silent_rows", "unparsed_chunks")}
    listing = {"skipped_files": skipped, "ignored_files": ignored,
               "file_warnings": [{"file": Path(r.path).name, "warning": w} for r in runs for w in r.warnings]}
    summary = data_summary(splits, vocab, feats, listing, oddities, cfg)
    summary["split"] = split_info
    for note in summary["vocab_warnings"]:
        log.warning("%s", note)
    prepared = Prepared(splits=splits, vocab=vocab, features=feats, summary=summary)
    if folder:
        save_prepared(prepared, cfg, cache)
        return load_prepared(cache) or prepared  # trained from the map like a cache hit; the copies are freed
    return prepared


def data_summary(splits: dict[str, Split], vocab: Vocab, feats: Features, listing: dict, oddities: dict, cfg) -> dict:
    """The facts a reader checks first: which files went where, how many windows, vocabulary, channels.
    `listing`: skipped_files (unusable), ignored_files (not recordings), file_warnings (read by a rule)."""
    out = {
        "data_dir": str(cfg.data.dir),
        "vocab_size": len(vocab),
        "vocab_digits": vocab.digits,
        "token_counts_by_type": vocab.type_counts(),
        "n_channels": len(feats.channels),
        "n_board_flags": len(feats.boards),
        "feature_groups": list(cfg.features.groups),
        "channels": feats.channels,
        **listing,
        "nonfinite_cells_filled": oddities["nonfinite_cells"],  # read as the channel's training mean
        "silent_rows_dropped": oddities["silent_rows"],  # rows where every sensor column was empty
        "unparsed_chunks_dropped": oddities["unparsed_chunks"],  # G-code text the tokenizer could not read
        "vocab_warnings": vocab.range_notes(),  # numbers left out of their letter's bucket range
    }
    for name, split in splits.items():
        t = split.targets[:, 1:]
        unk = int((t == UNK).sum())
        out[name] = {
            "files": split.files,
            "windows": len(split),
            "oov_rate": unk / max(int((t != PAD).sum()), 1),
            "distinct_target_lines": len({tuple(r.tolist()) for r in split.targets}),
            "targets_cut_share": float((split.target_lengths > cfg.data.max_len).float().mean()) if len(split) else 0.0,
            "longest_target": int(split.target_lengths.max()) if len(split) else 0,
        }
    return out
