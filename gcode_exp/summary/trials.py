"""The Optuna part of the summary: a study's trials read from its storage (read only), or those the run
folders record, the best result of each sweep, and the training time a pruner saved.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import yaml

from gcode_exp import GcodeExpError
from gcode_exp.summary.runs import RunResult, natural_key, read_part
from gcode_exp.sweeps import display_url, same_params


def study_names(storage: str) -> list[str]:
    """The studies an existing Optuna storage holds. Read only: a URL that names no database file, or a
    database without Optuna's tables, is refused, never created (Optuna would create either)."""
    import sqlalchemy
    from sqlalchemy.engine import make_url

    try:
        url = make_url(storage)
        shown = display_url(storage)
    except Exception:
        raise GcodeExpError(f"--storage {storage}: not a database URL (sqlite:///FILE, postgresql://USER@HOST/DB)"
                            ) from None
    if url.get_backend_name() == "sqlite":
        if not url.database or url.database == ":memory:":
            raise GcodeExpError(f"--storage {shown}: an in-memory database holds no study; name the database file")
        file = Path(url.database)
        if not file.is_file():
            why = "is a folder" if file.is_dir() else "no such file"
            raise GcodeExpError(f"--storage {shown}: {why} (summarize reads a study's database, never creates one)")
    try:
        engine = sqlalchemy.create_engine(storage)
        try:
            tables = sqlalchemy.inspect(engine).get_table_names()
        finally:
            engine.dispose()
        if "studies" not in tables:
            raise GcodeExpError(f"--storage {shown}: not an Optuna storage (no 'studies' table)")
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        return sorted(optuna.study.get_all_study_names(storage=storage))
    except GcodeExpError:
        raise
    except Exception as e:
        raise GcodeExpError(f"--storage {shown}: cannot read it ({_first(e)})") from None


def _first(e: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


def study_trials(storage: str, study: str, runs: list[RunResult]) -> list[dict]:
    """Every trial of an Optuna study in the storage: state, value, parameters, the epoch a pruner stopped it
    after, when it finished (seconds since the study's first trial began) and the folder it wrote.

    The folder is the one the job stored on its trial (gcode_exp/sweeps.py); for trials run before
    that existed, a run folder among `runs` whose overrides carry the trial's parameters."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        loaded = optuna.load_study(study_name=study, storage=storage)
    except Exception as e:
        raise GcodeExpError(f"--study {study}: cannot be read from --storage {display_url(storage)} ({_first(e)})"
                            ) from None
    out = []
    began = min((t.datetime_start for t in loaded.trials if t.datetime_start), default=None)
    for t in loaded.trials:
        folder = t.user_attrs.get("folder")
        if folder is None:
            folder = next((str(r.folder) for r in runs if r.trial and r.trial.get("study") == study
                           and r.trial.get("trial") == t.number), None)
        if folder is None:
            overrides = [dict(o.split("=", 1) for o in r.overrides if "=" in o) for r in runs]
            folder = next((str(r.folder) for r, o in zip(runs, overrides) if same_params(o, t.params)), "-")
        done = f"{(t.datetime_complete - began).total_seconds():.0f}" if t.datetime_complete and began else ""
        out.append({"trial": t.number, "state": t.state.name, "value": _num(t.value), **_short(t.params),
                    "pruned_epoch": t.user_attrs.get("pruned_epoch", ""), "done_s": done, "folder": folder})
    return out


def folder_trials(runs: list[RunResult]) -> list[dict]:
    """The Optuna trials that the run folders themselves record (no storage needed)."""
    out = []
    for r in runs:
        if r.trial is None:
            continue
        metric = r.config.get("optimized_metric") or r.config.get("trainer", {}).get("monitor")
        value = r.metrics.get(metric) if r.metrics else None
        out.append({"study": r.trial.get("study"), "trial": r.trial.get("trial"), "run": r.status,
                    "value": _num(value), **_short(r.trial.get("params", {})),
                    "pruned_epoch": (r.metrics or {}).get("pruned_epoch") or "", "folder": str(r.folder)})
    return sorted(out, key=lambda row: (str(row["study"]), row["trial"]))


def pruned_line(runs: list[RunResult]) -> str:
    """How many finished trials a pruner stopped, and the training time that saved: each pruned trial's
    epochs not run, at its own seconds per epoch."""
    trials = [r for r in runs if r.trial is not None and r.metrics]
    pruned = [r for r in trials if r.metrics.get("pruned_epoch")]
    if not pruned:
        return ""
    ran = sum(r.metrics.get("sec_per_epoch", 0) * r.metrics.get("epochs", 0) for r in trials)
    saved = sum(r.metrics["sec_per_epoch"] * max(r.config["trainer"]["max_epochs"] - r.metrics["epochs"], 0)
                for r in pruned)
    return (f"pruned: {len(pruned)} of {len(trials)} trials, {saved:.0f} s of training saved "
            f"({ran:.0f} s trained; unpruned about {ran + saved:.0f} s)\n")


def best_results(paths: list[Path]) -> list[str]:
    """What the Optuna sweeper wrote at the end of each sweep folder (optimization_results.yaml)."""
    lines = []
    for root in paths:
        for f in sorted(root.rglob("optimization_results.yaml"), key=natural_key):
            res = read_part(f, lambda text: yaml.safe_load(text) or {}, dict)
            if res and "best_value" in res:
                lines.append(f"- {f.parent}: best value {_num(res['best_value'])}, params {res.get('best_params')}")
    return lines


def _short(params: dict) -> dict:
    return {k: f"{v:.4g}" if isinstance(v, float) else v for k, v in params.items()}


def _num(value) -> str | float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.4f}"
    return "-" if value is None else value


def pick_study(names: list[str], study: str | None, runs: list[RunResult]) -> str:
    """The study to read among the storage's `names`: --study, else the one the run folders name, else
    the storage's only one."""
    holds = f"the storage holds {', '.join(names) or 'no studies'}"
    if study is not None:
        if study not in names:
            raise GcodeExpError(f"--study {study}: no such study ({holds})")
        return study
    named = sorted({r.trial["study"] for r in runs if r.trial and r.trial.get("study")})
    if len(named) == 1:
        if named[0] not in names:
            raise GcodeExpError(f"--study: the run folders name study {named[0]}, which is not in the storage "
                                f"({holds})")
        return named[0]
    if len(names) == 1:
        return names[0]
    raise GcodeExpError(f"--study: name the study ({holds})")


def statistics_of(trials: list[dict]) -> str:
    """How many trials, and how many in each state (`12 trials: 10 complete, 2 pruned`)."""
    counts = Counter(t["state"] for t in trials)
    return f"{len(trials)} trials: " + ", ".join(f"{n} {state.lower()}" for state, n in sorted(counts.items()))
