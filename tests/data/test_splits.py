"""Split protocols (data.split_by, data.folds, data.fold) and their aggregation in summarize: folds
partition the files, no file is in two parts of a fold, operation folds hold out exactly one program
family, and only the window protocol puts windows of one file into two splits."""

from __future__ import annotations

import csv
import json
import logging
import math
import statistics
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from omegaconf import open_dict

from gcode_exp import summarize
from gcode_exp.config import ConfigError
from gcode_exp.config_checks import validate
from gcode_exp.data.cache import file_hashes
from gcode_exp.data.dataset import prepare, prepared_key
from gcode_exp.data.read import RecordedRun, find_recordings, run_name
from gcode_exp.data.splits import WINDOW_WARNING, covered_rows, family, fold_of_files, split_runs
from gcode_exp.summary.tables import t975
from tests.conftest import ROOT, SAMPLE, make_cfg, run_py

SAMPLE_NAMES = sorted(run_name(p)[0] for p in SAMPLE.glob("*_aligned.csv*"))


def fake_run(name: str, rows: int = 8) -> RecordedRun:
    op = name.split("_")[0]
    return RecordedRun(name, op, ["spindle"], np.zeros((rows, 1), np.float32), ["G1 X1"] * rows, 0, 0, 0)


def data_cfg(**kw) -> SimpleNamespace:
    return SimpleNamespace(**{"split": [0.7, 0.15, 0.15], "split_seed": 0, "split_by": "file", "folds": 0, "fold": 0,
                              **kw})


def names(parts: dict[str, list[RecordedRun]]) -> dict[str, set[str]]:
    return {k: {r.name for r in v} for k, v in parts.items()}


def assert_one_part_each(parts: dict[str, set[str]], everything: set[str]) -> None:
    """No file in two parts of a fold, and every file in one."""
    assert not (parts["train"] & parts["val"] or parts["train"] & parts["test"] or parts["val"] & parts["test"])
    assert parts["train"] | parts["val"] | parts["test"] == everything
    assert all(parts.values())


def test_family_strips_damage_and_digits():
    assert [family(op) for op in ("face", "face150025", "damageface", "adaptive150025", "damageadaptive",
                                  "pocket150025", "damagepocket")] == \
        ["face", "face", "face", "adaptive", "adaptive", "pocket", "pocket"]
    assert sorted({family(n.split("_")[0]) for n in SAMPLE_NAMES}) == ["adaptive", "face", "pocket"]


@pytest.mark.parametrize("runs", [
    [fake_run(n) for n in SAMPLE_NAMES],  # the embedded sample: 9 operations x 2 files
    [fake_run(f"{op}_{i:03d}") for op in ("face", "face150025", "damageface", "pocket", "adaptive") for i in range(12)],
], ids=["sample", "5x12"])
def test_file_folds_partition_the_files_stratified_by_operation(runs):
    everything = {r.name for r in runs}
    tests = []
    for fold in range(5):
        parts, info = split_runs(runs, data_cfg(folds=5, fold=fold))
        assert info == {"split_by": "file", "folds": 5, "fold": fold}
        got = names(parts)
        assert_one_part_each(got, everything)
        tests.append(got["test"])
    assert set().union(*tests) == everything and sum(map(len, tests)) == len(runs)  # a partition
    assert max(map(len, tests)) - min(map(len, tests)) <= 1
    for op in {r.op for r in runs}:  # each operation spread as evenly as the folds allow
        counts = [sum(n.split("_")[0] == op for n in t) for t in tests]
        assert max(counts) - min(counts) <= 1, (op, counts)
    again = fold_of_files(runs, 5, seed=0)
    assert again == fold_of_files(runs, 5, seed=0) and again != fold_of_files(runs, 5, seed=1)


@pytest.mark.parametrize("folds", [0, 5])
def test_train_share_keeps_part_of_each_operations_training_files(folds):
    runs = [fake_run(f"{op}_{i:03d}") for op in ("face", "face150025", "pocket", "adaptive") for i in range(12)]
    full = names(split_runs(runs, data_cfg(folds=folds))[0])
    half = names(split_runs(runs, data_cfg(folds=folds, train_share=0.5))[0])
    assert half["val"] == full["val"] and half["test"] == full["test"]  # the same yardstick
    assert half["train"] < full["train"] and len(half["train"]) < 0.75 * len(full["train"])
    ops = {n.split("_")[0] for n in full["train"]}
    assert {n.split("_")[0] for n in half["train"]} == ops  # every operation keeps a file
    assert names(split_runs(runs, data_cfg(folds=folds, train_share=0.5))[0]) == half  # seeded


def test_operation_folds_hold_out_exactly_one_family():
    runs = [fake_run(n) for n in SAMPLE_NAMES]
    everything = {r.name for r in runs}
    held = []
    for fold in range(3):
        parts, info = split_runs(runs, data_cfg(split_by="operation", folds=3, fold=fold))
        got = names(parts)
        assert_one_part_each(got, everything)
        fam = info["test_family"]
        assert info["families"] == ["adaptive", "face", "pocket"] and fam == info["families"][fold]
        assert got["test"] == {n for n in everything if family(n.split("_")[0]) == fam}  # every variant of it
        assert not any(family(n.split("_")[0]) == fam for n in got["train"] | got["val"])
        assert {family(n.split("_")[0]) for n in got["val"]} <= set(info["families"]) - {fam}
        held.append(fam)
    assert held == ["adaptive", "face", "pocket"]
    assert names(split_runs(runs, data_cfg(split_by="operation", folds=0, fold=2))[0])["test"] == \
        names(split_runs(runs, data_cfg(split_by="operation", folds=3, fold=2))[0])["test"]


@pytest.mark.parametrize("kw,message", [
    ({"folds": 5, "fold": 5}, "data.fold=5: must be < data.folds=5"),
    ({"folds": 0, "fold": 1}, "data.fold=1: needs data.folds >= 2"),
    ({"folds": 19, "fold": 0}, "data.folds=19: more folds than the 18 usable files"),
    ({"split_by": "operation", "folds": 5, "fold": 0}, "data.folds=5: split_by=operation has one fold per program "
                                                         "family (adaptive, face, pocket): use 3 or 0"),
    ({"split_by": "operation", "fold": 3}, "data.fold=3: must be < 3 with data.split_by=operation (0: adaptive, "
                                           "1: face, 2: pocket)"),
])
def test_impossible_folds_are_refused_in_one_line(kw, message):
    with pytest.raises(ConfigError) as e:
        split_runs([fake_run(n) for n in SAMPLE_NAMES], data_cfg(**kw))
    assert str(e.value).startswith(message)


def test_schema_refuses_one_fold_and_an_unknown_protocol():
    with pytest.raises(ConfigError, match=r"data.folds=1: must be 0 \(one split\) or a whole number >= 2"):
        validate(make_cfg("data.folds=1"))
    with pytest.raises(ConfigError, match="data.split_by=windows: must be one of file, operation, window"):
        validate(make_cfg("data.split_by=windows"))
    validate(make_cfg("data.folds=null"))


def window_ids(split) -> set[tuple[str, int]]:
    """(file, start within the file) of every window of a split."""
    files = [f for f, n in zip(split.files, split.file_windows) for _ in range(n)]
    return set(zip(files, (split.starts - split.lo).tolist()))


def test_only_the_window_protocol_puts_windows_of_one_file_in_two_splits(tiny_cfg, caplog):
    total = None
    for overrides in ([], ["data.folds=5", "data.fold=3"], ["data.split_by=operation", "data.fold=1"]):
        data = prepare(tiny_cfg(*overrides))
        files = {k: set(s.files) for k, s in data.splits.items()}
        assert_one_part_each(files, set(SAMPLE_NAMES))
        n = sum(len(s) for s in data.splits.values())
        assert total in (None, n)  # every protocol uses every window once
        total = n
    assert data.summary["split"]["test_family"] == "face"
    assert all(n.startswith(("face", "damageface")) for n in data.splits["test"].files)

    with caplog.at_level(logging.WARNING):
        for overrides in (["data.split_by=window"], ["data.split_by=window", "data.folds=5", "data.fold=4"]):
            data = prepare(tiny_cfg(*overrides))
            files = {k: set(s.files) for k, s in data.splits.items()}
            assert files["train"] & files["test"] and files["train"] & files["val"]  # files in several splits
            ids = {k: window_ids(s) for k, s in data.splits.items()}
            assert not (ids["train"] & ids["val"] or ids["train"] & ids["test"] or ids["val"] & ids["test"])
            assert sum(map(len, ids.values())) == total  # each window in exactly one split
        cached = prepare(tiny_cfg(*overrides))  # a cache hit warns again
    assert [r.getMessage() for r in caplog.records].count(WINDOW_WARNING) == 3
    assert cached.summary["split"] == {"split_by": "window", "folds": 5, "fold": 4}


def test_window_protocol_fits_on_the_rows_training_windows_cover():
    run = fake_run("face_001", rows=40)
    run.values[:, 0] = np.arange(40)
    run.lines[:] = [f"G1 X{i}" for i in range(40)]
    cut = covered_rows(run, {0, 24}, window=8)
    assert cut.values[:, 0].tolist() == [*range(8), *range(24, 32)]
    assert cut.lines == [f"G1 X{i}" for i in (*range(8), *range(24, 32))] and len(run.lines) == 40


def test_split_settings_are_in_the_cache_key_and_defaults_keep_old_keys():
    paths, _ = find_recordings(str(SAMPLE), "*.csv*")
    hashes = file_hashes(paths)
    base = make_cfg()
    old = make_cfg()
    with open_dict(old):
        for key in ("split_by", "folds", "fold", "workers"):
            del old.data[key]
    assert prepared_key(paths, hashes, base) == prepared_key(paths, hashes, old)  # older configs keep their key
    assert prepared_key(paths, hashes, make_cfg("data.folds=null")) == prepared_key(paths, hashes, base)
    assert prepared_key(paths, hashes, make_cfg("data.workers=1")) == prepared_key(paths, hashes, base)
    keys = {prepared_key(paths, hashes, make_cfg(*o)) for o in ([], ["data.folds=5"], ["data.folds=5", "data.fold=1"],
                                                                ["data.split_by=operation"], ["data.split_by=window"])}
    assert len(keys) == 5


def test_cv_experiment_sweeps_the_approaches_over_every_fold():
    cfg = yaml.safe_load((ROOT / "conf" / "experiment" / "cv.yaml").read_text())
    params = cfg["hydra"]["sweeper"]["params"]
    assert params["experiment@_global_"].split(",") == ["baseline", "augmented", "multihead", "multihead_aug",
                                                         "new_programs", "recommended"]
    assert params["data.fold"] == f"range({cfg['data']['folds']})"
    for name in ("baseline", "multihead", "recommended"):
        composed = make_cfg("experiment=cv", f"experiment@_global_={name}", "data.fold=4")
        validate(composed)
        assert (composed.name, composed.data.folds, composed.data.fold) == (name, 5, 4)


# --- summarize over folds and seeds ------------------------------------------------------------------
def make_run(folder: Path, name: str, fold: int, seed: int, acc: float, recall: float) -> None:
    (folder / ".hydra").mkdir(parents=True)
    config = {"name": name, "seed": seed, "model": {"name": "multihead"}, "aug": {"name": "none"},
              "vocab": {"name": "v2"}, "features": {"name": "all"},
              "data": {"dir": "d", "split_by": "file", "folds": 5, "fold": fold}}
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / "metrics.json").write_text(json.dumps({
        "test/command_acc": acc, "test/token_macro_recall": recall, "majority/command_acc": 0.9 + fold / 100,
        "epochs": 3, "collapsed": False}))


def test_folds_and_seeds_aggregate_into_one_row_with_an_interval_and_a_paired_comparison(tmp_path, capsys):
    a_acc, b_acc, job = {}, {}, 0
    for fold in range(5):
        for seed in (0, 1):
            fold_effect = 0.1 * fold  # folds differ a lot; A is better by 0.02 (+- 0.005) on every one
            b_acc[fold, seed] = 0.5 + fold_effect + 0.01 * seed
            a_acc[fold, seed] = b_acc[fold, seed] + 0.02 + 0.005 * (-1) ** (fold + seed)
            make_run(tmp_path / f"{job}_a", "a", fold, seed, a_acc[fold, seed], 0.4)
            make_run(tmp_path / f"{job + 1}_b", "b", fold, seed, b_acc[fold, seed], 0.4)
            job += 2
    rows = summarize.main([str(tmp_path), "--compare", "a", "b"])
    assert [r["approach"] for r in rows] == ["a", "b", "majority reference"]
    assert [(r["seeds"], r["folds"], r["n"]) for r in rows[:2]] == [(2, 5, 10), (2, 5, 10)]
    values = list(a_acc.values())
    mean, sd = statistics.fmean(values), statistics.stdev(values)
    assert rows[0]["command_acc"] == f"{mean:.3f} ± {sd:.3f}"
    assert rows[2]["command_acc"] == f"{statistics.fmean([0.9 + f / 100 for f in range(5)]):.3f} ± " \
        f"{statistics.stdev([0.9 + f / 100 for f in range(5)]):.3f}"  # one majority figure per test fold
    text = (tmp_path / "summary.md").read_text()
    half = 2.262 * sd / math.sqrt(10)  # t(0.975, 9 df)
    assert f"[{mean - half:.3f}, {mean + half:.3f}]" in text
    with open(tmp_path / "compare.csv") as f:
        pairs = {r["metric"]: r for r in csv.DictReader(f)}
    acc = pairs["command_acc"]
    diffs = [a_acc[k] - b_acc[k] for k in a_acc]
    half = 2.262 * statistics.stdev(diffs) / math.sqrt(10)
    assert (acc["a"], acc["b"], acc["pairs"], acc["mean diff"]) == ("a", "b", "10", "+0.020")
    assert acc["95% interval"] == f"[{0.02 - half:.3f}, {0.02 + half:.3f}]" and acc["verdict"] == "a higher"
    assert pairs["token_macro_recall"]["verdict"] == "not resolved"  # no difference: the interval holds 0
    assert "Paired comparison a - b" in capsys.readouterr().out
    # unpaired, the fold-to-fold spread (sd ~0.15) would hide a 0.02 difference
    assert statistics.stdev(values) > 5 * 0.02


def test_runs_of_two_code_versions_group_and_pair_by_the_keys_they_share(tmp_path):
    """A config key added between two sweeps (at its default) neither splits a group nor breaks pairs;
    a key both have with different values still does."""
    for fold in range(3):
        make_run(tmp_path / f"{fold}_a", "a", fold, 0, 0.6 + fold / 10, 0.4)
        make_run(tmp_path / f"{fold + 3}_b", "b", fold, 0, 0.5 + fold / 10, 0.4)
    for job in ("1_a", "2_a", "4_b"):  # written after data.train_share existed
        path = tmp_path / job / ".hydra" / "config.yaml"
        config = yaml.safe_load(path.read_text())
        config["data"]["train_share"] = 1.0
        path.write_text(yaml.safe_dump(config))
    rows = summarize.main([str(tmp_path), "--compare", "a", "b"])
    assert [(r["approach"], r["n"]) for r in rows[:2]] == [("a", 3), ("b", 3)]
    with open(tmp_path / "compare.csv") as f:
        assert {r["metric"]: r["pairs"] for r in csv.DictReader(f)}["command_acc"] == "3"
    path = tmp_path / "0_a" / ".hydra" / "config.yaml"
    path.write_text(path.read_text().replace("dir: d", "dir: other"))  # a value that differs: its own group
    assert [r["n"] for r in summarize.main([str(tmp_path)])[:3]] == [1, 2, 3]


def test_compare_names_the_approaches_it_knows(tmp_path):
    make_run(tmp_path / "0_a", "a", 0, 0, 0.5, 0.4)
    with pytest.raises(SystemExit, match="no finished run is named c .approaches: a."):
        summarize.main([str(tmp_path), "--compare", "a", "c"])


def test_t_quantiles():
    for df, t in ((1, 12.706), (4, 2.776), (9, 2.262), (11, 2.201), (14, 2.145), (29, 2.045), (40, 2.021),
                  (120, 1.980)):
        assert t975(df) == pytest.approx(t, abs=2e-3), df


@pytest.mark.slow
def test_cv_sweep_trains_and_compares(tmp_path):
    sweep = tmp_path / "cv"
    ran = run_py("-m", "experiment=cv", "experiment@_global_=baseline,multihead", "data.fold=0,1",
                 f"hydra.sweep.dir={sweep}", cache=tmp_path / "cache", timeout=600)
    assert ran.returncode == 0, ran.stderr[-3000:]
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0_baseline", "1_baseline", "2_multihead", "3_multihead"]
    for job in jobs:
        split = json.loads((sweep / job / "data_summary.json").read_text())["split"]
        assert split["folds"] == 5 and split["fold"] == int(job[0]) % 2
    rows = summarize.main([str(sweep), "--compare", "multihead", "baseline"])
    assert [(r["approach"], r["folds"], r["n"]) for r in rows[:2]] == [("baseline", 2, 2), ("multihead", 2, 2)]
    with open(sweep / "compare.csv") as f:
        assert {r["pairs"] for r in csv.DictReader(f)} == {"2"}
