"""Shared fixtures: a composed config on tiny settings, and the embedded sample data."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"
# small enough for a 1-epoch train + eval in a few seconds on 2 cores
TINY = [
    "data.window=32",
    "data.stride=16",
    "model.d_model=32",
    "model.n_heads=2",
    "model.dec_layers=1",
    "trainer.max_epochs=1",
    "trainer.progress=false",
    "trainer.plots=false",
]


def make_cfg(*overrides: str, tmp: Path | None = None):
    """Compose conf/ like run.py does, with tiny settings and (optionally) a private cache."""
    extra = [f"data.cache_dir={tmp / 'cache'}"] if tmp is not None else []
    with initialize_config_dir(config_dir=str(ROOT / "conf")):
        return compose("config", overrides=[f"data.dir={SAMPLE}", *TINY, *extra, *overrides])


@pytest.fixture
def tiny_cfg(tmp_path):
    return lambda *overrides: make_cfg(*overrides, tmp=tmp_path)
