"""The measured comparison table, from run folders alone (no dashboard, no code of the runs needed).

    python -m gcode_exp.summarize PATH [PATH ...] [--metrics A,B,...] [--compare A B] [--storage URL --study NAME]

Finds every run folder (a folder with `.hydra/config.yaml`) under the paths, groups runs that differ
only in `seed` and `data.fold` (cross-validation folds) into mean ± sd with a t-based 95 % interval of
the mean over the n = folds x seeds runs, adds the majority reference, lists unfinished and failed runs,
and writes summary.csv, summary.md and summary.png into the first path. `--compare A B` (approach
names, repeatable) pairs A's and B's runs on the same data, fold and seed and gives the mean paired
difference A - B with its 95 % interval (compare.csv). Jobs of an Optuna sweep are listed
as trials (parameters, value, folder) from their own `optuna_trial.json`, with the best result of each
sweep; with --storage it lists every trial of the study straight from the storage (any machine's),
with its state and the folder it wrote. `--metrics` chooses the metric columns of the tables and CSVs
(any test metric the runs hold, and sec_per_epoch, epochs, collapsed), in the order given.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import io
import json
import math
import re
import statistics
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from gcode_exp import GcodeExpError
from gcode_exp.data.dataset import HOW_READ
from gcode_exp.run_folder import RUN_FILES
from gcode_exp.sweeps import TRIAL_FILE, display_url, same_params

METRICS = ("unique_tokens", "command_acc", "overall_acc", "type_acc", "param_type_acc", "command_macro_recall",
           "token_macro_recall", "token_coverage", "line_exact")
RUN_COLUMNS = ("sec_per_epoch", "epochs", "collapsed")  # of the run, not of its test set: after the metrics


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


@dataclass
class Group:
    label: dict
    runs: list[RunResult] = field(default_factory=list)

    def values(self, key: str) -> list[float]:
        out = []
        for r in self.runs:
            v = r.metrics.get(key)
            if isinstance(v, (int, float)) and not math.isnan(float(v)):
                out.append(float(v))
        return out


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


def describe(cfg: dict, trial: dict | None = None) -> dict:
    """The columns that say what a run was (an Optuna trial is told apart by its number)."""
    model, aug, feats, data = cfg.get("model", {}), cfg.get("aug", {}), cfg.get("features", {}), cfg.get("data", {})
    approach = str(cfg.get("name", "?"))
    if trial is not None:
        approach += f" #{trial['trial']}"
    return {
        "approach": approach,
        "features": feats.get("name", "?") + ("" if feats.get("board_flags", True) else "-noflags"),
        "vocab": cfg.get("vocab", {}).get("name", "?"),
        "aug": "-" if model.get("name") == "nearest" else  # nothing trained: no augmentation
               f"{aug.get('oversample_factor', 1)}x" if aug.get("name") != "none" else "none",
        "multihead": model.get("name") == "multihead",
        "split": str(data.get("split_by", "file")) + (f" {data['folds']}-fold" if data.get("folds") else ""),
    }


def leaf_keys(cfg: dict, prefix: str = "") -> set[str]:
    """Dotted keys of the leaves of a nested dict."""
    out: set[str] = set()
    for k, v in cfg.items():
        out |= leaf_keys(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}"}
    return out


def only_shared_keys(runs: list[RunResult]) -> None:
    """Runs written by different versions of the code: a config key that only some of them have (added in
    between, at its default) is left out of their configs, so they still group and pair by what they share."""
    finished = [r for r in runs if r.status == "finished"]
    if not finished:
        return
    shared = set.intersection(*(leaf_keys(r.config) for r in finished))

    def prune(cfg: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in cfg.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict) and v:
                out[k] = prune(v, key + ".")
            elif key in shared:
                out[k] = v
        return out

    for r in finished:
        r.config = prune(r.config)


def group_runs(runs: list[RunResult]) -> list[Group]:
    """Finished runs whose configs are equal but for the seed and the fold (data.fold) form one group."""
    groups: dict[str, Group] = {}
    for r in runs:
        if r.status != "finished":
            continue
        same = {k: v for k, v in r.config.items() if k not in ("seed", "hydra")}
        if isinstance(same.get("data"), dict):
            same["data"] = {k: v for k, v in same["data"].items() if k != "fold"}
        if r.trial is not None:  # two trials never form a group, even with equal parameters
            same["optuna_trial"] = [r.trial.get("study"), r.trial.get("trial")]
        key = json.dumps(same, sort_keys=True, default=str)
        groups.setdefault(key, Group(describe(r.config, r.trial))).runs.append(r)
    return list(groups.values())


def fmt(values: list[float], digits: int = 3) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def t975(df: int) -> float:
    """The 97.5 % quantile of Student's t with `df` degrees of freedom (two-sided 95 % interval):
    a table to 10, then the Cornish-Fisher series (error < 2e-4 beyond)."""
    if df in T975:
        return T975[df]
    z = 1.959964
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


def interval(values: list[float]) -> tuple[float, float] | None:
    """The t-based 95 % interval of the mean; None for fewer than two values."""
    if len(values) < 2:
        return None
    mean, half = statistics.fmean(values), t975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean - half, mean + half


def fmt_interval(values: list[float], digits: int = 3) -> str:
    ci = interval(values)
    return "-" if ci is None else f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def known_metrics(runs: list[RunResult]) -> list[str]:
    """What --metrics may name: the table's metrics, any other test metric of the runs, the run columns."""
    found = {k.split("/", 1)[1] for r in runs if r.metrics for k in r.metrics if k.startswith("test/")}
    return [*METRICS, *sorted(found - set(METRICS)), *RUN_COLUMNS]


def pick_metrics(spec: str | None, runs: list[RunResult]) -> list[str]:
    """The metric columns, `--metrics a,b,c` in that order (the default: every one of METRICS, then the
    run columns); an unknown name is refused, naming it and listing the known ones."""
    if spec is None:
        return [*METRICS, *RUN_COLUMNS]
    known = known_metrics(runs)
    names = list(dict.fromkeys(m.strip() for m in spec.split(",") if m.strip()))
    if not names:
        raise GcodeExpError(f"--metrics {spec!r}: name at least one metric (known: {', '.join(known)})")
    unknown = [m for m in names if m not in known]
    if unknown:
        near = difflib.get_close_matches(unknown[0], known, n=1, cutoff=0.75)
        hint = f"; did you mean {near[0]}?" if near else ""
        raise GcodeExpError(f"--metrics {spec}: unknown metric {', '.join(unknown)}{hint} "
                            f"(known: {', '.join(known)})")
    return names


def table(groups: list[Group], metrics: list[str] | None = None) -> list[dict]:
    metrics = [*METRICS, *RUN_COLUMNS] if metrics is None else metrics
    rows = []
    for g in groups:
        per_fold = Counter(r.fold for r in g.runs)  # seeds: runs per fold (the most of any fold)
        row = {**g.label, "seeds": max(per_fold.values()), "folds": len(per_fold), "n": len(g.runs)}
        for m in metrics:
            if m == "sec_per_epoch":
                row[m] = fmt(g.values("sec_per_epoch"), 1)
            elif m == "epochs":
                row[m] = fmt(g.values("epochs"), 0)
            elif m == "collapsed":
                row[m] = f"{sum(bool(r.metrics.get('collapsed')) for r in g.runs)}/{len(g.runs)}"
            else:
                row[m] = fmt(g.values(f"test/{m}"), 1 if m == "unique_tokens" else 3)
        rows.append(row)
    finished = [r for g in groups for r in g.runs]
    if finished:  # the always-the-most-frequent-line reference, on the same test windows
        ref = Group({"approach": "majority reference", "features": "-", "vocab": "-", "aug": "-", "multihead": "-",
                     "split": "-"},
                    finished)
        row = {**ref.label, "seeds": "-", "folds": "-", "n": "-"}
        for m in metrics:  # one number per test set (data config, fold included): seeds and models share it
            if m in RUN_COLUMNS:
                row[m] = "-"
                continue
            per_test: dict[str, float] = {}
            for r in finished:
                if _is_value(v := r.metrics.get(f"majority/{m}")):
                    key = json.dumps([_data_of(r), r.config.get("vocab")], sort_keys=True, default=str)
                    per_test.setdefault(key, float(v))
            row[m] = fmt(list(per_test.values()), 1 if m == "unique_tokens" else 3)
        rows.append(row)
    return rows


def interval_table(groups: list[Group], metrics: list[str] | None = None) -> list[dict]:
    """One row per approach: the t-based 95 % interval of the mean of each test metric over its n runs
    (folds x seeds); `-` where n < 2."""
    rows = []
    for g in groups:
        row = {"approach": g.label["approach"], "features": g.label["features"], "split": g.label["split"],
               "n": len(g.runs)}
        for m in METRICS if metrics is None else [m for m in metrics if m not in RUN_COLUMNS]:
            row[m] = fmt_interval(g.values(f"test/{m}"), 1 if m == "unique_tokens" else 3)
        rows.append(row)
    return rows


def pair_key(r: RunResult) -> str:
    """Runs with equal keys were scored on the same windows: data config (fold included), feature set
    and seed. Within a feature set, input options (board flags, elapsed time) are what is compared."""
    return json.dumps([_data_of(r), (r.config.get("features") or {}).get("name"), r.config.get("seed")],
                      sort_keys=True, default=str)


def _data_of(r: RunResult) -> dict:
    """The data config that decides the test set (where the cache lives does not)."""
    return {k: v for k, v in (r.config.get("data") or {}).items() if k not in HOW_READ}


def compare(runs: list[RunResult], a: str, b: str, metrics: list[str] | None = None) -> list[dict]:
    """Paired comparison of approaches `a` and `b`: per metric, the mean of the differences A - B over
    the (data, fold, seed) both ran on, its sd, and the t-based 95 % interval of that mean. An interval
    that excludes 0 is the measured statement 'A beats B' (or loses to it) on this protocol."""
    finished = [r for r in runs if r.status == "finished" and r.trial is None]
    names = sorted({str(r.config.get("name", "?")) for r in finished})
    for name in (a, b):
        if name not in names:
            raise GcodeExpError(f"--compare {a} {b}: no finished run is named {name} "
                                f"(approaches: {', '.join(names) or 'none'})")
    sides: dict[str, dict[str, RunResult]] = {a: {}, b: {}}
    for r in finished:
        name = str(r.config.get("name", "?"))
        if name in sides:
            key = pair_key(r)
            if key in sides[name]:
                raise GcodeExpError(f"--compare {a} {b}: {sides[name][key].folder} and {r.folder} are both "
                                    f"{name} on the same data, fold and seed (other settings differ?): compare one "
                                    "sweep at a time")
            sides[name][key] = r
    keys = [k for k in sides[a] if k in sides[b]]
    if not keys:
        raise GcodeExpError(f"--compare {a} {b}: no fold and seed on which both ran (pairs need the same data, "
                            "features, fold and seed)")
    rows = []
    for m in METRICS if metrics is None else [m for m in metrics if m not in RUN_COLUMNS]:
        diffs = []
        for k in keys:
            va, vb = sides[a][k].metrics.get(f"test/{m}"), sides[b][k].metrics.get(f"test/{m}")
            if _is_value(va) and _is_value(vb):
                diffs.append(float(va) - float(vb))
        if not diffs:  # a metric these runs did not score (line_exact with trainer.line_exact=false)
            continue
        ci = interval(diffs)
        verdict = "-" if ci is None else f"{a} higher" if ci[0] > 0 else f"{b} higher" if ci[1] < 0 else "not resolved"
        rows.append({"metric": m, "pairs": len(diffs),
                     "mean diff": f"{statistics.fmean(diffs):+.3f}",
                     "sd": f"{statistics.stdev(diffs):.3f}" if len(diffs) > 1 else "-",
                     "95% interval": fmt_interval(diffs), "verdict": verdict})
    return rows


def _is_value(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(float(v))


def markdown(rows: list[dict]) -> str:
    if not rows:
        return "(no finished runs)\n"
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def chart(groups: list[Group]) -> bytes:
    """summary.png's bytes: the test metrics of each group, mean ± sd, each with the majority reference
    of the same test files as a black tick (what answering the most frequent line everywhere scores)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("line_exact", "command_macro_recall", "token_macro_recall", "overall_acc")
    labels = [f"{g.label['approach']}\n{g.label['features']}" + ("" if g.label["split"] == "file" else
                                                                 f"\n{g.label['split']}") for g in groups]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)) + 1.8, 4))
    width = 0.8 / len(keys)
    for k, key in enumerate(keys):
        at = [i + k * width for i in range(len(groups))]
        means = [statistics.fmean(v) if (v := g.values(f"test/{key}")) else math.nan for g in groups]
        sds = [statistics.stdev(v) if len(v := g.values(f"test/{key}")) > 1 else 0 for g in groups]
        ax.bar(at, means, width, yerr=sds, label=key, capsize=2)
        majority = [statistics.fmean(v) if (v := g.values(f"majority/{key}")) else math.nan for g in groups]
        ax.hlines(majority, [x - width / 2 for x in at], [x + width / 2 for x in at], colors="black", linewidth=2,
                  label="majority reference" if k == 0 else None)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))], labels, fontsize=7)
    ax.set(ylim=(0, 1), ylabel="test", title="approaches on unseen runs (mean ± sd over folds x seeds)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1, 1))  # beside the bars, never over them
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


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
    """Every trial of an Optuna study in the storage: state, value, parameters and the folder it wrote.

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
    for t in loaded.trials:
        folder = t.user_attrs.get("folder")
        if folder is None:
            folder = next((str(r.folder) for r in runs if r.trial and r.trial.get("study") == study
                           and r.trial.get("trial") == t.number), None)
        if folder is None:
            overrides = [dict(o.split("=", 1) for o in r.overrides if "=" in o) for r in runs]
            folder = next((str(r.folder) for r, o in zip(runs, overrides) if same_params(o, t.params)), "-")
        out.append({"trial": t.number, "state": t.state.name, "value": _num(t.value), **_short(t.params),
                    "folder": folder})
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
                    "value": _num(value), **_short(r.trial.get("params", {})), "folder": str(r.folder)})
    return sorted(out, key=lambda row: (str(row["study"]), row["trial"]))


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


def csv_text(rows: list[dict]) -> str:
    buffer = io.StringIO(newline="")
    keys = list(dict.fromkeys(k for row in rows for k in row))  # trials of other studies may add columns
    writer = csv.DictWriter(buffer, fieldnames=keys, restval="")
    if keys:
        writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_all(files: dict[Path, str | bytes]) -> None:
    """Write every output, or refuse before writing any: a name taken by a folder (or anything but a
    file) is an error naming it. Each file is written whole (temp file, then rename)."""
    for path in files:
        if (path.exists() or path.is_symlink()) and not path.is_file():
            what = "a folder" if path.is_dir() else "not a file (a broken link?)"
            raise GcodeExpError(f"{path}: is {what}; move it away to write the summary")
    from gcode_exp.atomic import write_bytes, write_text

    for path, content in files.items():
        try:
            if isinstance(content, bytes):
                write_bytes(path, content)
            else:
                write_text(path, content)
        except OSError as e:
            raise GcodeExpError(f"{path}: cannot write it ({e.strerror or e})") from None


def statistics_of(trials: list[dict]) -> str:
    counts: dict[str, int] = {}
    for t in trials:
        counts[t["state"]] = counts.get(t["state"], 0) + 1
    return f"{len(trials)} trials: " + ", ".join(f"{n} {state.lower()}" for state, n in sorted(counts.items()))


def main(argv: list[str] | None = None) -> list[dict]:
    """The command: bad input (a path, --storage, --study, --compare, an output name taken by a folder)
    is one line on stderr, `error: <path or option>: <what is wrong>`, exit code 2, and nothing written."""
    ap = argparse.ArgumentParser(description="Comparison table from gcode-exp run folders.")
    ap.error = lambda message: ap.exit(2, f"error: {message} (see --help)\n")  # type: ignore[method-assign]
    ap.add_argument("paths", nargs="+", type=Path, help="sweep folders or single run folders")
    ap.add_argument("--storage", help="Optuna storage URL (sqlite:///..., postgresql://...)")
    ap.add_argument("--study", help="Optuna study name (default: the one the run folders name)")
    ap.add_argument("--compare", nargs=2, action="append", metavar=("A", "B"), default=[],
                    help="paired difference A - B over the folds and seeds both ran (approach names; repeatable)")
    ap.add_argument("--metrics", metavar="A,B,...",
                    help=f"the metric columns, in this order (default: {','.join(METRICS + RUN_COLUMNS)}; "
                         "any test metric of the runs)")
    args = ap.parse_args(argv)
    try:
        return summarize(args)
    except GcodeExpError as e:
        print(f"error: {e}", file=sys.stderr)
        raise Refused(f"error: {e}") from None


class Refused(SystemExit):
    """Exit code 2 once the one-line error is printed; its str() is that line, for callers in-process."""

    def __init__(self, line: str) -> None:
        super().__init__(2)
        self.line = line

    def __str__(self) -> str:
        return self.line


def summarize(args: argparse.Namespace) -> list[dict]:
    missing = [str(p) for p in args.paths if not p.is_dir()]
    if missing:
        raise GcodeExpError(f"{', '.join(missing)}: not a folder")
    names = study_names(args.storage) if args.storage else []  # a bad storage refused before any work
    runs = find_runs(args.paths)
    metrics = pick_metrics(args.metrics, runs)
    only_shared_keys(runs)
    groups = group_runs(runs)
    rows = table(groups, metrics)
    text = markdown(rows)
    if any(len(g.runs) > 1 for g in groups) and any(m not in RUN_COLUMNS for m in metrics):
        text += ("\n95 % interval of the mean over the n runs (folds x seeds; t with n - 1 degrees of freedom):\n\n"
                 + markdown(interval_table(groups, metrics)))
    compared: list[dict] = []
    for a, b in args.compare:
        pairs = compare(runs, a, b, metrics)
        text += (f"\nPaired comparison {a} - {b} (the same data, fold and seed; 95 % interval of the mean "
                 f"difference; 'not resolved': the interval holds 0):\n\n" + markdown(pairs))
        compared += [{"a": a, "b": b, **row} for row in pairs]
    others = [r for r in runs if r.status != "finished"]
    if others:
        text += "\nNot finished:\n\n" + "".join(f"- {r.folder}: {r.status}{': ' + r.error if r.error else ''}\n"
                                                for r in others)
    best = best_results(args.paths)
    if best:
        text += "\nOptuna sweeps (optimization_results.yaml):\n\n" + "\n".join(best) + "\n"
    trials: list[dict] = []
    if args.storage:
        study = pick_study(names, args.study, runs)
        trials = study_trials(args.storage, study, runs)
        states = statistics_of(trials)
        text += f"\nOptuna study `{study}` ({states}):\n\n" + markdown(trials)
    elif any(r.trial for r in runs):
        trials = folder_trials(runs)
        text += "\nOptuna trials recorded in the run folders (add --storage URL for the whole study):\n\n"
        text += markdown(trials)
    out = args.paths[0]
    files: dict[Path, str | bytes] = {out / "summary.csv": csv_text(rows), out / "summary.md": text}
    if trials:
        files[out / "trials.csv"] = csv_text(trials)
    if compared:
        files[out / "compare.csv"] = csv_text(compared)
    if groups:
        files[out / "summary.png"] = chart(groups)
    write_all(files)
    written = [p.name for p in files]
    print(text, end="")
    print(f"\n{len(runs)} run folders ({len(runs) - len(others)} finished); wrote {', '.join(written)} in {out}")
    return rows


if __name__ == "__main__":
    main()
