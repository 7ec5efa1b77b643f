"""Shared fixtures: a composed config on tiny settings, and the embedded sample data."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"
# small enough for a 1-epoch train + eval in a few seconds on 2 cores
TINY_MODEL = [  # token-model sizes; `++` so that they compose under model=nearest too (which ignores them)
    "++model.d_model=32",
    "++model.n_heads=2",
    "++model.dec_layers=1",
]
TINY = [
    "data.window=32",
    "data.stride=16",
    *TINY_MODEL,
    "trainer.max_epochs=1",
    "trainer.progress=false",
    "trainer.plots=false",
]


def tiny_for(overrides) -> list[str]:
    """TINY, without the token-model sizes where `overrides` compose a model that learns nothing (it has none)."""
    try:
        with initialize_config_dir(config_dir=str(ROOT / "conf")):
            probe = compose("config", overrides=[o for o in overrides if not o.startswith(("-", "hydra."))])
    except Exception:  # a sweep's comma lists, or a bad override a test wants run.py to refuse
        return TINY
    from gcode_exp.models import learns

    try:
        trains = learns(probe.model)
    except Exception:  # a model class that does not import, which the test wants refused
        return TINY
    return TINY if trains else [o for o in TINY if o not in TINY_MODEL]


def make_cfg(*overrides: str, tmp: Path | None = None):
    """Compose conf/ like run.py does, with tiny settings and (optionally) a private cache."""
    extra = [f"data.cache_dir={tmp / 'cache'}"] if tmp is not None else []
    tiny = tiny_for(overrides)
    with initialize_config_dir(config_dir=str(ROOT / "conf")):
        return compose("config", overrides=[f"data.dir={SAMPLE}", *tiny, *extra, *overrides])


@pytest.fixture
def tiny_cfg(tmp_path):
    return lambda *overrides: make_cfg(*overrides, tmp=tmp_path)


def run_py_command(*args: str, cache: Path, env: dict | None = None) -> tuple[list[str], dict]:
    """`python run.py` on tiny settings, one torch thread per job (a shared 2-core machine slows
    several-thread jobs down many times over), wandb offline: the command line and its environment."""
    import os
    import sys

    cmd = [sys.executable, str(ROOT / "run.py"), f"data.dir={SAMPLE}", f"data.cache_dir={cache}", *tiny_for(args),
           "trainer.line_exact=false", "hardware.threads=1", *args]
    return cmd, {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", **(env or {})}


def kill_after(epoch: int) -> dict:
    """The environment in which a training run SIGKILLs itself right after epoch `epoch`'s checkpoint: the
    fault lives in tests/faults/sitecustomize.py, outside the package."""
    return {"GCODE_EXP_KILL_AFTER_EPOCH": str(epoch), "PYTHONPATH": str(ROOT / "tests" / "faults")}


def run_py(*args: str, cache: Path, timeout: int = 300, env: dict | None = None):
    """`python run.py` in a process of its own (run_py_command; tests/forked_python.py), run to its end."""
    from tests import forked_python

    cmd, full_env = run_py_command(*args, cache=cache, env=env)
    return forked_python.run(cmd, cwd=ROOT, env=full_env, timeout=timeout)


def default_run_and_two_programs(ws: Path) -> dict:
    """The default model (nothing trained, seconds) run on the sample in `ws`, and a folder of two of its
    recordings of different programs: what the task=eval and task=predict tests score."""
    r = run_py(f"hydra.run.dir={ws / 'train'}", cache=ws / "cache")
    assert r.returncode == 0, r.stderr[-2000:]
    two = ws / "two"
    two.mkdir()
    for name in ("face_003", "pocket_016"):
        (two / f"{name}_aligned.csv.gz").symlink_to(SAMPLE / f"{name}_aligned.csv.gz")
    return {"ws": ws, "ckpt": ws / "train" / "checkpoints" / "best.pt", "two": two, "cache": ws / "cache"}


@pytest.fixture(scope="session")
def pg_url() -> str:
    """A running PostgreSQL server named by GCODE_EXP_PG_URL (CI: `bash .ci/postgres.sh start`).

    Unset: the test is skipped with the reason. Set but unreachable: the test fails, so a CI server
    that did not come up is never mistaken for a laptop without one."""
    import os

    url = os.environ.get("GCODE_EXP_PG_URL")
    if not url:
        pytest.skip("no PostgreSQL server: set GCODE_EXP_PG_URL, e.g. $(bash .ci/postgres.sh start)")
    import sqlalchemy

    engine = sqlalchemy.create_engine(url, connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("select 1"))
    except Exception as e:
        pytest.fail(f"GCODE_EXP_PG_URL={url} is set but the server does not answer: {e}", pytrace=False)
    finally:
        engine.dispose()
    return url


DOC_GROUPS = 3  # the documented commands run in this many groups, each in its own scratch session


def pytest_collection_modifyitems(config, items):
    """Each test file on one worker, so that its module fixtures are built once (`--dist loadgroup` with a
    group per file), except the documented commands: a third of the suite's time in one file, which alone
    would keep one worker busy after the rest had finished. Those run in DOC_GROUPS groups, each command
    with the commands it needs (tests/test_docs_commands.py runs a missing one first), and go first."""

    def documented(item) -> str | None:
        """The documented command the item runs, if it is one of tests/test_docs_commands.py's."""
        callspec = getattr(item, "callspec", None)
        return callspec.params.get("command") if callspec else None

    def first_needed(command: str) -> str:
        from tests.test_docs_commands import COMMANDS  # only where documented commands were collected

        needs = COMMANDS[command].needs if command in COMMANDS else ()
        return first_needed(needs[0]) if needs else command

    roots: dict[str, int] = {}
    for item in items:
        group, command = item.path.name, documented(item)
        if command:
            group += f"-{roots.setdefault(first_needed(command), len(roots) % DOC_GROUPS)}"
        item.add_marker(pytest.mark.xdist_group(group))
    items.sort(key=lambda item: documented(item) is None)
