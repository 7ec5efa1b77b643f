"""Link an Optuna trial and the run folder it wrote, in both directions.

The Hydra Optuna sweeper never tells a job which trial it is, and its job numbers restart at 0 when a
study is continued or shared by several workers, so neither number names a trial. A job of an Optuna
sweep therefore looks itself up at start: the RUNNING trial of its study whose parameters are this
job's overrides. It then stores its folder (and host) as user attributes of that trial, where every
reader of the storage sees them, and writes `optuna_trial.json` (study, trial number, parameters)
into the folder (with host and process id), where `summarize` sees it without the storage.

`CreateStorage` creates the storage's tables before the sweeper opens it: workers started at the same
moment on a brand-new database would otherwise all create them, and all but one die.

`PruneTrial` reports a trial's validation after each epoch to its study and stops the training when the
study's pruner (`hparams_search.pruner`: median, hyperband) says it falls behind the trials before it. The
sweeper still records the trial as complete, with the value it reached (TPE learns from it as from any
trial); the epoch it was stopped after is the trial's user attribute `pruned_epoch` and `metrics.json`'s.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from gcode_exp import distributed
from gcode_exp.atomic import write_text
from gcode_exp.training import callbacks

if TYPE_CHECKING:
    from gcode_exp.training.trainer import Trainer

log = logging.getLogger(__name__)

TRIAL_FILE = "optuna_trial.json"
# what a database says when another process creates the same tables at the same moment
RACE_SIGNS = ("already exists", "locked", "deadlock")
PRUNERS = ("median", "hyperband", "none")


@dataclass(frozen=True)
class TrialLink:
    """The Optuna trial a job runs: where its study is stored, the study's name and the trial's number."""

    url: str
    study: str
    number: int


def display_url(url: str) -> str:
    """The storage URL without its password, and with an sqlite path made absolute (it is relative to
    the folder the sweep was started from, which a later reader need not share)."""
    from sqlalchemy.engine import make_url

    u = make_url(url)
    if u.get_backend_name() == "sqlite" and u.database and u.database != ":memory:":
        u = u.set(database=str(Path(u.database).resolve()))
    return u.render_as_string(hide_password=True)


def create_storage(url: str, attempts: int = 8) -> None:
    """Create Optuna's tables in `url` unless they exist, retrying while other workers create them.

    Optuna's RDBStorage runs CREATE TYPE/TABLE and inserts its version row; two processes doing it at
    once on a new PostgreSQL database collide (UniqueViolation on pg_type, DuplicateTable). The
    loser only has to try again, a little later: then it finds the tables."""
    import optuna
    from sqlalchemy import exc

    for attempt in range(attempts):
        try:
            optuna.storages.RDBStorage(url).engine.dispose()
            return
        except (exc.IntegrityError, exc.ProgrammingError, exc.OperationalError) as e:
            race = isinstance(e, exc.IntegrityError) or any(s in str(e) for s in RACE_SIGNS)
            if not race or attempt == attempts - 1:
                raise
            log.info("Optuna storage being created by another worker (%s); retrying", type(e.orig).__name__)
            time.sleep(random.uniform(0.5, 1.0) * 0.1 * 2**attempt)


class CreateStorage(Callback):
    """Hydra callback (conf/hparams_search/optuna.yaml): `create_storage` before the sweeper opens
    hydra.sweeper.storage, so no one-off setup step is needed on a new database."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        url = OmegaConf.select(config, "hydra.sweeper.storage")
        if url and "optuna" in str(OmegaConf.select(config, "hydra.sweeper._target_", default="")).lower():
            create_storage(str(url))


def same_params(overrides: dict[str, str], params: dict) -> bool:
    """True when every trial parameter is set to the same value by the job's overrides."""
    if not params:
        return False
    for key, value in params.items():
        given = overrides.get(key)
        if given is None:
            return False
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                if not math.isclose(float(given), float(value), rel_tol=1e-12, abs_tol=0.0):
                    return False
            except ValueError:
                return False
        elif given != str(value):
            return False
    return True


def record_optuna_trial(run_dir: Path) -> TrialLink | None:
    """In a job of an Optuna sweep, tag its trial with this folder; return the trial.

    Outside an Optuna sweep this is a no-op returning None. It never fails the job: a storage that
    cannot be read only costs the link (logged as a warning).
    """
    from hydra.core.hydra_config import HydraConfig

    try:
        hc = HydraConfig.get()
    except ValueError:  # not under Hydra
        return None
    if hc.mode.name != "MULTIRUN" or "optuna" not in str(hc.sweeper.get("_target_", "")).lower():
        return None
    try:
        return _record(hc, Path(run_dir))
    except Exception as e:  # the link is a convenience; the trial itself must run
        log.warning("could not link this job to its Optuna trial: %s: %s", type(e).__name__, e)
        return None


def _record(hc, run_dir: Path) -> TrialLink | None:
    import optuna
    from optuna.trial import TrialState

    url, study_name = hc.sweeper.storage, hc.sweeper.study_name
    if not url or not study_name:
        return None  # an in-memory study lives only in the sweeper's process
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.get_storage(url)
    study_id = storage.get_study_id_from_name(study_name)
    overrides = dict(o.split("=", 1) for o in hc.overrides.task if "=" in o)
    running = storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
    matches = [t for t in running if same_params(overrides, t.params)]
    # identical parameters in two running trials (a small integer space): take one not yet claimed
    free = [t for t in matches if "folder" not in t.user_attrs] or matches
    if not free:
        log.warning("no running trial of study %s has this job's parameters", study_name)
        return None
    trial = min(free, key=lambda t: t.number)
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
    storage.set_trial_user_attr(trial_id, "folder", str(run_dir.resolve()))
    storage.set_trial_user_attr(trial_id, "host", socket.gethostname())
    info = {"study": study_name, "trial": trial.number, "storage": display_url(url), "params": trial.params,
            "host": socket.gethostname(), "pid": os.getpid()}
    if not (run_dir / "metrics.json").exists():  # else: a finished earlier trial's folder; the job will refuse it
        write_text(run_dir / TRIAL_FILE, json.dumps(info, indent=1) + "\n")
    log.info("Optuna study %s, trial %d", study_name, trial.number)
    return TrialLink(url, study_name, trial.number)


def make_pruner(name: str, max_epochs: int, startup_trials: int, warmup_epochs: int):
    """The Optuna pruner `hparams_search.pruner` names (None for none). Both read the other trials' reported
    values from the storage, so a job in its own process (or on another machine) decides as the study would."""
    import optuna

    if name == "median":  # below the median of the earlier trials at the same epoch
        return optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=warmup_epochs)
    if name == "hyperband":  # successive halving over brackets of 1 .. max_epochs epochs
        return optuna.pruners.HyperbandPruner(min_resource=max(1, warmup_epochs), max_resource=max_epochs)
    return None


class PruneTrial(callbacks.Callback):
    """After each epoch: the trial's `metric` reported to its study; training stopped where the pruner says."""

    def __init__(self, link: TrialLink, pruner, metric: str) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = optuna.storages.get_storage(link.url)
        study = optuna.load_study(study_name=link.study, storage=storage, pruner=pruner)
        trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(link.study),
                                                                    link.number)
        self.trial, self.metric, self.name = optuna.trial.Trial(study, trial_id), metric, type(pruner).__name__
        self.warned = False

    def on_epoch_end(self, trainer: Trainer, row: dict) -> None:
        value = row.get(self.metric)
        if value is None and not self.warned:  # val/line_exact: decoded each epoch only as trainer.monitor
            log.warning("not pruning: %s is not measured each epoch (trainer.monitor=%s would)", self.metric,
                        self.metric)
            self.warned = True
        if value is None or math.isnan(value):
            return
        self.trial.report(float(value), row["epoch"])
        if self.trial.should_prune():
            self.trial.set_user_attr("pruned_epoch", row["epoch"])
            trainer.stop_reason = f"pruned by the {self.name} after epoch {row['epoch']} ({self.metric} {value:.4f})"
            trainer.state["pruned_epoch"] = row["epoch"]


def pruning(cfg, link: TrialLink | None) -> list[callbacks.Callback]:
    """The callback that prunes this run's trial, where it is one and hparams_search.pruner is set."""
    name = OmegaConf.select(cfg, "hparams_search.pruner", default="none")
    metric = cfg.get("optimized_metric") or cfg.trainer.monitor
    if link is None or name == "none" or not distributed.is_main():  # hardware=ddp: rank 0 decides for all
        return []
    if not metric.startswith("val/"):
        log.warning("hparams_search.pruner=%s: not pruning; optimized_metric=%s is not measured each epoch (a "
                    "val/ metric is)", name, metric)
        return []
    hs = cfg.hparams_search
    return [PruneTrial(link, make_pruner(name, cfg.trainer.max_epochs, hs.startup_trials, hs.warmup_epochs), metric)]
