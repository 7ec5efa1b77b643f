"""Data-parallel training (hardware=ddp, gcode_exp/distributed.py) through the real command line:
`python -m torch.distributed.run` (torchrun) with 2 CPU processes and gloo on the embedded sample."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, SAMPLE, TINY, kill_after, run_py

# no augmentation and no dropout: the two processes then differ from one only in how the loss of a batch
# is averaged (per process, then over the processes) and in the up to 1 window per epoch they leave out
SAME = ["model=baseline", "aug=none", "model.dropout=0", "trainer.max_epochs=2", "trainer.line_exact=false"]
FILES = {".hydra", "checkpoints", "data_summary.json", "history.csv", "metrics.json", "per_class.csv",
         "resolved_config.yaml", "run.log", "vocab.json"}


def run(args: list[str], cwd: Path, cache: Path, procs: int = 0, env: dict | None = None):
    """run.py (under torchrun with `procs` processes) in `cwd`, on tiny settings."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] if procs else []
    cmd = [sys.executable, *launcher, str(ROOT / "run.py"), f"data.dir={SAMPLE}", f"data.cache_dir={cache}", *TINY,
           *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, env=full_env)


def history(folder: Path) -> list[dict]:
    with open(folder / "history.csv") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def only_folder(cwd: Path) -> Path:
    folders = sorted(cwd.glob("outputs/*/*"))
    assert len(folders) == 1, f"expected one run folder, got {folders}"
    return folders[0]


def test_each_rank_trains_its_part_of_every_batch(monkeypatch):
    """epoch_share: per global batch of one process, the ranks' batches are disjoint and together that batch;
    every rank takes as many steps; each rank its own augmentation stream, the shared generator in step."""
    import torch

    from gcode_exp import distributed

    order, batch, world = torch.randperm(103), 8, 2
    shares, streams, after = [], [], []
    for rank in range(world):
        monkeypatch.setattr(distributed, "world", lambda: world)
        monkeypatch.setattr(distributed, "rank", lambda r=rank: r)
        gen = torch.Generator().manual_seed(0)
        with torch.random.fork_rng():  # it seeds torch's own stream (dropout) too
            mine, size, aug_gen = distributed.epoch_share(order, batch, gen)
        assert size == batch // world
        shares.append(mine.split(size))
        streams.append(torch.rand(3, generator=aug_gen))
        after.append(gen.get_state())
    assert len(shares[0]) == len(shares[1]) == 13
    for k, parts in enumerate(zip(*shares, strict=True)):
        whole = order[k * batch : (k + 1) * batch]
        joined = torch.cat(parts)
        assert sorted(joined.tolist()) == sorted(whole[: len(joined)].tolist()) and len(whole) - len(joined) <= 1
    assert not torch.equal(streams[0], streams[1]) and torch.equal(after[0], after[1])


def test_ddp_without_torchrun_is_one_line(tmp_path):
    res = run_py("hardware=ddp", "model=baseline", cache=tmp_path / "cache")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: hardware.distributed=true: no torchrun environment"), \
        res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
    """2 gloo processes, each half of every batch, train what one process trains on the whole batch; one run
    folder, written by rank 0 only; an interrupted run resumes under torchrun to the same result."""
    cache = tmp_path / "cache"
    one = run([*SAME, "hardware.threads=1", f"hydra.run.dir={tmp_path / 'one'}"], tmp_path, cache)
    assert one.returncode == 0, one.stderr[-2000:]
    (tmp_path / "two").mkdir()
    two = run(["hardware=ddp", *SAME], tmp_path / "two", cache, procs=2)
    assert two.returncode == 0, two.stderr[-3000:]
    folder = only_folder(tmp_path / "two")
    assert {p.name for p in folder.iterdir()} == FILES
    assert {p.name for p in (folder / "checkpoints").iterdir()} == {"best.pt", "last.pt"}
    assert (two.stdout + two.stderr).count("epoch   2 |") == 1, "rank 0 alone logs"
    h1, h2 = history(tmp_path / "one"), history(folder)
    assert [r["steps"] for r in h1] == [r["steps"] for r in h2]
    # the losses are means over a batch's tokens, and a process's half of a batch holds another share of them
    # than half: the averaged gradient differs a little (measured: train loss 0.2 %, val loss 2 % after 2 epochs)
    tolerance = {"train/loss": 0.01, "val/loss": 0.05, "test/loss": 0.05}
    for a, b in zip(h1, h2, strict=True):
        for key in ("train/loss", "val/loss", "val/overall_acc", "val/token_macro_recall"):
            assert b[key] == pytest.approx(a[key], rel=tolerance.get(key, 0), abs=0.02), (key, a[key], b[key])
    m1, m2 = (json.loads((f / "metrics.json").read_text()) for f in (tmp_path / "one", folder))
    for key in ("test/loss", "test/overall_acc", "test/command_acc"):
        assert m2[key] == pytest.approx(m1[key], rel=tolerance.get(key, 0), abs=0.02), (key, m1[key], m2[key])

    # interrupted after epoch 1 (both processes killed), then resumed: the uninterrupted run's epochs
    (tmp_path / "three").mkdir()
    killed = run(["hardware=ddp", *SAME], tmp_path / "three", cache, procs=2, env=kill_after(1))
    assert killed.returncode != 0
    run_dir = only_folder(tmp_path / "three")
    resumed = run(["hardware=ddp", *SAME, "trainer.resume=true", f"hydra.run.dir={run_dir}"], tmp_path / "three",
                  cache, procs=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after epoch 1 from" in resumed.stdout + resumed.stderr
    h3 = history(run_dir)
    assert [{k: v for k, v in r.items() if k != "sec"} for r in h3] == \
        [{k: v for k, v in r.items() if k != "sec"} for r in h2]
    assert only_folder(tmp_path / "three") == run_dir


@pytest.mark.slow
def test_what_ddp_cannot_run_is_refused_in_one_line(tmp_path):
    """Under torchrun: the nearest model (nothing to train) and several processes without hardware=ddp."""
    for args, message in ((["hardware=ddp"], "error: hardware.distributed=true: model=align trains nothing"),
                          (["model=baseline"], "error: hardware.distributed=false: torchrun started several")):
        res = run(args, tmp_path, tmp_path / "cache", procs=2)
        assert res.returncode != 0
        errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and errors[0].startswith(message), res.stderr
