"""Run folders read back for the summary: config, overrides, metrics, error and Optuna trial of each.

Only the files a run wrote are read (no code of the runs): a damaged file is skipped with a warning
naming it, so one bad folder never stops a table.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from gcode_exp import GcodeExpError
from gcode_exp.run_folder import RUN_FILES
from gcode_exp.sweeps import TRIAL_FILE


@dataclass
class RunResult:
    """One run folder as summarize reads it back: its config, overrides and metrics (or why none)."""
    folder: Path
    config: dict
    overrides: list[str]
    metrics: dict | None
    error: str | None
    trial: dict | None = None   # optuna_trial.json: study, trial number, params (jobs of an Optuna sweep)

    @property
    def status(self) -> str:
        return "finished" if self.metrics else ("failed" if self.error else "unfinished")

    @property
    def fold(self):
        """The cross-validation fold (data.fold); None for runs made before folds existed."""
        return (self.config.get("data") or {}).get("fold")


def find_runs(paths: list[Path]) -> list[RunResult]:
    """Every run folder under the paths. A damaged file of a run is skipped with a warning naming it:
    without its config the run is left out; with a damaged metrics.json it is listed as failed. A job
    that failed before its config was recorded (error.txt, no .hydra/config.yaml) is listed as failed.
    A path holding no run folder at all (a typo, a data folder) is an error: no table is written there."""
    runs = []
    for root in paths:
        configs = {f.parent.parent for f in root.rglob(".hydra/config.yaml")}
        early = {f.parent for f in root.rglob("error.txt") if f.parent not in configs and failed_early(f.parent)}
        if not configs | early:
            raise GcodeExpError(f"{root}: no run folders in it")
        for folder in sorted(configs | early, key=natural_key):
            if folder in early:
                runs.append(RunResult(folder=folder, config={}, overrides=[], metrics=None,
                                      error=first_line(folder / "error.txt"), trial=read_trial(folder)))
                continue
            config = read_part(folder / ".hydra" / "config.yaml", load_config, dict)
            if config is None:
                continue
            overrides = read_part(folder / ".hydra" / "overrides.yaml", lambda text: yaml.safe_load(text) or [], list)
            metrics_file = folder / "metrics.json"
            metrics = read_part(metrics_file, json.loads, dict)
            error = first_line(folder / "error.txt")
            if metrics is None and metrics_file.exists() and error is None:
                error = "metrics.json is damaged"
            runs.append(RunResult(
                folder=folder,
                config=config,
                overrides=overrides or [],
                metrics=metrics,
                error=error,
                trial=read_trial(folder),
            ))
    return runs


def failed_early(folder: Path) -> bool:
    """A job folder that holds error.txt and only files a job writes, but no config: the job failed
    before it recorded one (a refused config in a sweep). A data folder's stray error.txt is not one."""
    return (folder / "error.txt").is_file() and all(p.name in RUN_FILES for p in folder.iterdir())


def read_part(path: Path, parse: Callable[[str], object], kind: type,
              check: Callable[[object], str | None] | None = None) -> object | None:
    """A run folder's file parsed, or None if there is none. A damaged one (cut short by a full disk,
    edited by hand, not UTF-8, or lacking what `check` asks for) is skipped with a warning naming it:
    one bad folder never stops a table."""
    if not path.is_file():
        return None
    try:
        value = parse(path.read_text())
        why = f"not a {'mapping' if kind is dict else 'list'}" if not isinstance(value, kind) else (
            check(value) if check else None)
        if why is None:
            return value
    except Exception as e:
        why = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
    print(f"warning: {path}: damaged, skipped ({why})", file=sys.stderr)
    return None


def read_trial(folder: Path) -> dict | None:
    """optuna_trial.json (gcode_exp/sweeps.py): a trial number, and the study's name and the parameters."""
    def check(trial: dict) -> str | None:
        if not isinstance(trial.get("trial"), int) or isinstance(trial.get("trial"), bool):
            return "no trial number"
        if not isinstance(trial.get("study", ""), str) or not isinstance(trial.get("params", {}), dict):
            return "study not a name or params not a mapping"
        return None

    return read_part(folder / TRIAL_FILE, json.loads, dict, check)


def first_line(path: Path) -> str | None:
    if not path.exists():
        return None
    lines = path.read_text(errors="replace").strip().splitlines()
    return lines[0] if lines else "(empty error.txt)"


def natural_key(path: Path) -> list:
    """Sort `2_x` before `10_x`: job folders in the order Hydra ran them."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def load_config(text: str) -> dict:
    """The job's config with interpolations such as `name: ${model.name}-...` resolved where possible."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(text)
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # an interpolation that needs Hydra at run time: keep it as written
        return OmegaConf.to_container(cfg, resolve=False)
