import logging
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gcode_exp.data.dataset import prepare
from gcode_exp.data.read import RecordedRun, read_run
from gcode_exp.data.splits import split_files
from gcode_exp.data.vocab import BOS, EOS, PAD, Vocab
from gcode_exp.data.windows import encode_target, fit_features, run_inputs, window_target
from tests.conftest import SAMPLE, make_cfg


def fake_run(name: str, op: str, value: float = 0.0, rows: int = 8) -> RecordedRun:
    cols = ["spindle", "b1.Ax", "posx"]
    return RecordedRun(name, op, cols, np.full((rows, 3), value, np.float32), ["G1 X1"] * rows, 0, 0, 0)


def test_split_is_by_file_stratified_and_seeded():
    runs = [fake_run(f"{op}_{i:03d}", op) for op in ("face", "pocket", "adaptive") for i in range(10)]
    runs += [fake_run("damageface_001", "damageface"), fake_run("damagepocket_001", "damagepocket")]
    parts = split_files(runs, (0.7, 0.15, 0.15), seed=0)
    names = {k: {r.name for r in v} for k, v in parts.items()}
    assert not (names["train"] & names["val"] or names["train"] & names["test"] or names["val"] & names["test"])
    assert sum(len(v) for v in names.values()) == len(runs)
    for op in ("face", "pocket", "adaptive"):  # every operation type reaches every split
        for split in names.values():
            assert any(n.startswith(op + "_") for n in split)
    assert {r.name for r in split_files(runs, (0.7, 0.15, 0.15), seed=0)["test"]} == names["test"]
    assert {r.name for r in split_files(runs, (0.7, 0.15, 0.15), seed=1)["test"]} != names["test"]


def test_normalisation_uses_training_files_only():
    train = [fake_run("a_001", "a", 1.0), fake_run("a_002", "a", 3.0)]
    feats = fit_features(train, ["motors", "boards"], board_flags=True)
    assert feats.channels == ["b1.Ax", "spindle"]  # controller columns excluded by the feature groups
    assert feats.boards == ["b1"]
    assert feats.mean == pytest.approx([2.0, 2.0]) and feats.std == pytest.approx([1.0, 1.0])


def test_elapsed_input_counts_rows_since_the_recording_began_even_read_in_pieces():
    run = fake_run("a_001", "a", 1.0, rows=40)
    feats = fit_features([run], ["motors", "boards"], board_flags=True, elapsed=True)
    whole = run_inputs(run, feats)
    assert feats.n_inputs == 4 and whole[:, -1] == pytest.approx(np.arange(40) / 1000)  # 2 channels, 1 flag
    tail = RecordedRun("a_001", "a", run.columns, run.values[25:], run.lines[25:], 0, 0, 0)  # live mode's later piece
    assert run_inputs(tail, feats, first_row=25) == pytest.approx(whole[25:])
    assert not fit_features([run], ["motors"], board_flags=False).elapsed  # off unless asked for


def test_window_target_longest_line_ties_and_unlabelled_rows():
    assert window_target(["A", "B", "B", "A"], "longest", 3) == ["A"]  # tie: the earliest line
    assert window_target(["", "", "B", "A", "A"], "longest", 3) == ["A"]  # empty rows never vote
    assert window_target(["", ""], "longest", 3) is None
    assert window_target(["A", "A", "B", "", "B", "C", "D"], "lines", 3) == ["A", "B", "C"]


def test_encode_target_starts_with_bos_and_is_padded():
    v = Vocab.build(["G1 X1 Y2 Z3"], 2)
    ids = encode_target(["G1 X1 Y2 Z3"], v, 16)
    assert ids[0] == BOS and ids[8] == EOS and ids[9:] == [PAD] * 7 and len(ids) == 16
    short = encode_target(["G1 X1 Y2 Z3"], v, 5)
    assert short == [BOS, v.index["G1"], v.index["X"], v.index[v.line_tokens("X1")[1]], EOS]


def test_targets_and_proxies_are_never_inputs():
    run = read_run(next(SAMPLE.glob("pocket_*")))
    for col in ("momo", "gcode_line", "gcode_string", "line", "raw_json", "t_console", "spindle_A", "vel"):
        assert col not in run.columns
    assert "spindle" in run.columns and "posx" in run.columns


def test_prepare_on_sample_and_cache_hit(tiny_cfg):
    cfg = tiny_cfg()
    t0 = time.perf_counter()
    cold = prepare(cfg)
    t_cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    warm = prepare(cfg)
    t_warm = time.perf_counter() - t0
    assert t_warm < t_cold
    files = {k: set(s.files) for k, s in cold.splits.items()}
    assert files == {k: set(s.files) for k, s in warm.splits.items()}
    assert not (files["train"] & files["test"]) and len(files["val"]) >= 1
    for name in ("train", "val", "test"):
        assert torch.equal(cold.splits[name].targets, warm.splits[name].targets)
        assert torch.equal(cold.splits[name].rows, warm.splits[name].rows)
    assert cold.vocab.tokens == warm.vocab.tokens
    assert all((s.targets[:, 0] == BOS).all() for s in cold.splits.values())
    side = prepare(tiny_cfg("features=side_channel"))
    assert not any(c.startswith("pos") or c == "feed" for c in side.features.channels)
    assert side.features.n_inputs < cold.features.n_inputs


def _prepare_in_child(overrides: list[str]) -> int:
    from tests.conftest import make_cfg

    return len(prepare(make_cfg(*overrides)).splits["train"])


def test_concurrent_builders_share_one_intact_cache(tmp_path):
    import multiprocessing as mp

    overrides = [f"data.cache_dir={tmp_path}"]
    with mp.get_context("spawn").Pool(2) as pool:
        sizes = pool.map(_prepare_in_child, [overrides, overrides])
    assert sizes[0] == sizes[1] > 0
    assert len(list(tmp_path.glob("*.pt"))) == 1 and not list(tmp_path.glob(".*tmp"))
    assert _prepare_in_child(overrides) == sizes[0]  # the file left behind loads


# --- the per-recording cache, parallel reading, memory-mapped prepared data (issue 16) ------------
def _same_prepared(a, b) -> None:
    assert a.vocab.tokens == b.vocab.tokens and a.features == b.features
    for name in ("train", "val", "test"):
        sa, sb = a.splits[name], b.splits[name]
        assert sa.files == sb.files
        for key in ("rows", "starts", "targets", "row_targets", "row_lines"):
            assert torch.equal(getattr(sa, key), getattr(sb, key)), (name, key)


def test_adding_a_recording_reads_only_that_file(tmp_path, monkeypatch):
    """The folder grows by one file: the others come from their cache entries, and the result is
    exactly what a cold read of the whole folder gives (split, normalisation, vocabulary refitted)."""
    import shutil

    from gcode_exp.data import dataset

    folder = tmp_path / "data"
    folder.mkdir()
    names = sorted(p.name for p in SAMPLE.glob("*.csv*"))
    for name in names[:-1]:
        shutil.copy(SAMPLE / name, folder / name)
    cached = [f"data.dir={folder}", f"data.cache_dir={tmp_path / 'cache'}", "data.workers=1"]
    prepare(make_cfg(*cached))
    shutil.copy(SAMPLE / names[-1], folder / names[-1])
    read = []
    real = dataset.read_run
    monkeypatch.setattr(dataset, "read_run", lambda path, *a: read.append(Path(path).name) or real(path, *a))
    grown = prepare(make_cfg(*cached))
    assert read == [names[-1]]
    _same_prepared(grown, prepare(make_cfg(f"data.dir={folder}", "data.cache_dir=", "data.workers=1")))


def test_parallel_reading_gives_the_same_data(monkeypatch):
    from gcode_exp.data import dataset

    one = prepare(make_cfg("data.cache_dir=", "data.workers=1"))
    pools = []

    class Counted(dataset.ProcessPoolExecutor):
        def __init__(self, n, **kw):
            pools.append(n)
            super().__init__(n, **kw)

    monkeypatch.setattr(dataset, "ProcessPoolExecutor", Counted)
    monkeypatch.setattr(dataset, "PARALLEL_BYTES", 0)  # the sample is small enough to be read in-process
    _same_prepared(one, prepare(make_cfg("data.cache_dir=", "data.workers=2")))
    assert pools == [2]


def test_damaged_recording_entry_is_read_again(tmp_path, caplog):
    cfg = make_cfg(f"data.cache_dir={tmp_path}", "data.workers=1")
    first = prepare(cfg)
    entry = sorted((tmp_path / "recordings").glob("*.pt"))[0]
    data = bytearray(entry.read_bytes())
    data[len(data) // 2] ^= 0x01
    entry.write_bytes(bytes(data))
    for top in tmp_path.glob("*.pt*"):  # no prepared data: the recordings are read again
        top.unlink()
    with caplog.at_level(logging.WARNING):
        again = prepare(cfg)
    assert f"ignoring unreadable cache {entry} (checksum mismatch: its bytes were damaged)" in caplog.text
    _same_prepared(first, again)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps")
def test_cached_data_is_mapped_from_disk_not_copied(tmp_path):
    """A cache hit maps the prepared tensors from the cache file: the process holds no copy of them."""
    cfg = make_cfg(f"data.cache_dir={tmp_path}")
    prepare(cfg)
    hit = prepare(cfg)
    (entry,) = tmp_path.glob("*.pt")
    assert str(entry) in Path("/proc/self/maps").read_text()
    assert hit.splits["train"].rows.sum().isfinite()  # and reads like any tensor


def _resident_kb(entry: Path) -> int:
    """kB of `entry` resident in this process's memory, over every mapping of it."""
    total, mine = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):
            mine = line.endswith(f" {os.path.realpath(entry)}")
        elif mine and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads /proc/self/smaps")
def test_reading_every_window_of_a_cached_split_maps_none_of_it(tmp_path):
    """A cold build and a cache hit both read their rows from the cache file (pread): every window gathered
    equals an in-memory read, and none of the file is left resident in this process, so an epoch does not
    grow the resident set with the data (through the map, all 7.9 MB of the rows would be)."""
    cfg = make_cfg(f"data.cache_dir={tmp_path}")
    memory = prepare(make_cfg("data.cache_dir=")).splits["train"]
    windows = (memory.starts[:, None] + torch.arange(cfg.data.window)).split(16)
    for data in (prepare(cfg), prepare(cfg)):
        train = data.splits["train"]
        assert train.rows_file is not None and memory.rows_file is None
        for rows in windows:
            assert torch.equal(train.gather(rows), memory.gather(rows))
    (entry,) = tmp_path.glob("*.pt")
    assert _resident_kb(entry) << 10 < memory.rows.nbytes // 16
    with pytest.raises(IndexError):
        train.gather(torch.tensor([len(memory.rows)]))


PARENT = os.getpid()


def _dies_in_a_worker(path, max_nonfinite):
    """read_or_error, except in a pool's process, which exits as SIGKILL would leave it."""
    from gcode_exp.data.read import read_run

    if os.getpid() != PARENT:
        os._exit(9)
    return read_run(path, max_nonfinite)


def test_a_reading_process_that_dies_costs_only_time(monkeypatch, caplog):
    """A killed reading process (the out-of-memory killer) is warned about; the files are read here instead."""
    from gcode_exp.data import dataset

    monkeypatch.setattr(dataset, "read_or_error", _dies_in_a_worker)
    monkeypatch.setattr(dataset, "PARALLEL_BYTES", 0)
    with caplog.at_level(logging.WARNING):
        data = prepare(make_cfg("data.cache_dir=", "data.workers=2"))
    assert "a process reading recordings died" in caplog.text
    monkeypatch.undo()
    _same_prepared(data, prepare(make_cfg("data.cache_dir=", "data.workers=1")))
