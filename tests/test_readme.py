"""The README's commands are the product's front door: they must stay true."""

import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from gcode_exp.config import validate
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()


def quick_start() -> list[str]:
    block = re.search(r"^## Quick start\s*```bash\n(.*?)```", README, re.S | re.M).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_quick_start_has_two_commands_and_ci_runs_the_test_one():
    setup_and_run, setup_and_test = quick_start()
    assert "run.py" in setup_and_run and "pytest" in setup_and_test
    ci = (ROOT / ".ci" / "run").read_text()
    assert setup_and_test in ci.splitlines()


def readme_run_commands() -> list[list[str]]:
    """Every `python run.py ...` line in the README's code blocks, as override lists."""
    out = []
    for line in re.findall(r"^(?:\.venv/bin/)?python run\.py(.*?)(?:#.*)?$", README, re.M):
        args = [a for a in shlex.split(line) if a != "-m" and not a.startswith("hydra.")]
        out.append(args)
    return out


@pytest.mark.parametrize("args", readme_run_commands(), ids=lambda a: " ".join(a) or "defaults")
def test_readme_run_commands_compose_and_validate(args, tmp_path):
    placeholders = {"DIR": str(ROOT / "data" / "sample"), "RUN/checkpoints/best.pt": str(tmp_path / "best.pt"),
                    "N": "4"}
    overrides = []
    for a in args:
        key, _, value = a.partition("=")
        if "," in value and not value.startswith("["):  # a multirun sweep: compose its first choice
            value = value.split(",")[0]
        overrides.append(f"{key}={placeholders.get(value, value)}")
    with initialize_config_dir(config_dir=str(Path(ROOT, "conf"))):
        cfg = compose("config", overrides=overrides)
    validate(cfg)
