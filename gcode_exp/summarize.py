"""The measured comparison table, from run folders alone (no dashboard, no code of the runs needed).

    python -m gcode_exp.summarize PATH [PATH ...] [--metrics A,B,...] [--compare A B] [--storage URL --study NAME]

Finds every run folder (a folder with `.hydra/config.yaml`) under the paths, groups runs that differ
only in `seed` and `data.fold` (cross-validation folds) into mean ± sd with a t-based 95 % interval of
the mean over the n = folds x seeds runs, adds the majority reference, lists unfinished and failed runs,
and writes summary.csv, summary.md and summary.png into the first path. Each group is labelled by
approach, features, vocab, augmentation, model and split, plus a column for every other config key
whose values differ between groups that would otherwise read alike: no two rows look the same.
`--compare A B` (approach names, repeatable) pairs A's and B's runs on the same data, fold and seed and
gives the mean paired difference A - B with its 95 % interval (compare.csv). Jobs of an Optuna sweep
are listed as trials (parameters, value, folder) from their own `optuna_trial.json`, with the best
result of each sweep; with --storage it lists every trial of the study straight from the storage (any
machine's), with its state and the folder it wrote. `--metrics` chooses the metric columns of the tables
and CSVs (any test metric the runs hold, and sec_per_epoch, epochs, collapsed), in the order given.
The Markdown tables are padded so that their columns line up in a terminal too.
"""

from __future__ import annotations

import argparse
import difflib
import io
import json
import math
import re
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from gcode_exp import GcodeExpError
from gcode_exp.data.dataset import HOW_READ
from gcode_exp.run_folder import RUN_FILES
from gcode_exp.sweeps import TRIAL_FILE, display_url, same_params

METRICS = ("unique_tokens", "command_acc", "overall_acc", "type_acc", "param_type_acc", "command_macro_recall",
           "token_macro_recall", "token_coverage", "line_exact")
RUN_COLUMNS = ("sec_per_epoch", "epochs", "collapsed")  # of the run, not of its test set: after the metrics
DIGITS = {"unique_tokens": 1, "sec_per_epoch": 1, "epochs": 0}  # every other metric: 3
LABEL = ["approach", "features", "vocab", "aug", "multihead", "split"]  # describe()'s columns
SHORT_LABEL = ["approach", "features", "split"]  # the interval table's and the chart's
CHART_METRICS = ("line_exact", "command_macro_recall", "token_macro_recall", "overall_acc")
STATS = ["mean", "std", "count"]  # what a table cell is made of


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
        "aug": f"{aug.get('oversample_factor', 1)}x" if aug.get("name") != "none" else "none",
        "multihead": model.get("name") == "multihead",
        "split": str(data.get("split_by", "file")) + (f" {data['folds']}-fold" if data.get("folds") else ""),
    }


def flat(cfg: dict, prefix: str = "") -> dict[str, object]:
    """A nested config as dotted key -> leaf value."""
    out: dict[str, object] = {}
    for k, v in cfg.items():
        out |= flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v}
    return out


def shown(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


@dataclass
class Finished:
    """The finished runs, one row each in three frames that share an index: `info` (describe()'s label,
    and the group, fold, test set and pair each run belongs to), `settings` (what puts a run in its group:
    dotted config key -> value as shown) and `values` (the numbers of metrics.json; NaN where it has none)."""
    info: pd.DataFrame
    settings: pd.DataFrame
    values: pd.DataFrame

    def column(self, key: str) -> pd.Series:
        """A metrics.json entry of every run (all NaN where no run wrote it)."""
        return self.values[key] if key in self.values else pd.Series(math.nan, index=self.info.index)

    def per_group(self, key: str) -> pd.DataFrame:
        """mean, std and count of a metrics.json entry per group, the groups in the order of their first run."""
        return self.column(key).groupby(self.info["group"], sort=False).agg(STATS)


def finished_runs(runs: list[RunResult]) -> Finished:
    """The finished runs as frames. Runs that differ only in seed and fold form a group; runs on the same
    data (fold included, not how it is read) and vocab share a test set; runs on the same test set,
    feature set and seed pair. A config key that only some runs have, with one value wherever present (added
    by a later version of the code, at its default), is left out: runs of two versions still group and pair.
    One with several values (a model's own key, swept) is `-` where absent, and still splits groups."""
    done = [r for r in runs if r.status == "finished"]
    config = pd.DataFrame([{k: shown(v) for k, v in flat(r.config).items()} for r in done], dtype=object)
    added = [k for k in config if config[k].isna().any() and config[k].nunique() < 2]  # one value where present
    config = config.drop(columns=added).fillna("-")
    data = [k for k in config if k.startswith("data.") and k.split(".")[1] not in HOW_READ]
    data += [k for k in config if k.startswith("perturb.")]  # perturbed recordings are another test set
    settings = config.drop(columns=[k for k in config if k in ("seed", "data.fold") or k.split(".")[0] == "hydra"])
    settings["optuna_trial"] = [f"{r.trial.get('study')} #{r.trial.get('trial')}" if r.trial else "-" for r in done]
    info = pd.DataFrame([describe(r.config, r.trial) for r in done], columns=LABEL).assign(
        group=key_of(settings), fold=[shown(r.fold) for r in done],
        test_set=key_of(config[[*data, *(k for k in config if k.startswith("vocab."))]]),
        pair=key_of(config.reindex(columns=[*data, "features.name", "seed"])),
        trial=[r.trial is not None for r in done], folder=[str(r.folder) for r in done],
        collapsed=[bool(r.metrics.get("collapsed")) for r in done])
    values = pd.DataFrame([{k: float(v) for k, v in r.metrics.items() if _is_value(v)} for r in done])
    return Finished(info, settings, values)


def key_of(columns: pd.DataFrame) -> pd.Series:
    """One string per row, the same for rows with equal values in `columns`."""
    return pd.Series([json.dumps(row, default=str) for row in columns.values.tolist()], index=columns.index)


def _is_value(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(float(v))


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


T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def t975(df: int) -> float:
    """The 97.5 % quantile of Student's t with `df` degrees of freedom (two-sided 95 % interval):
    a table to 10, then the Cornish-Fisher series (error < 2e-4 beyond)."""
    if df in T975:
        return T975[df]
    z = 1.959964
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


def fmt(stats: pd.Series, digits: int = 3) -> str:
    """mean ± sd from `stats` (mean, std, count); the mean alone for one value, `-` for none."""
    if stats["count"] == 0:
        return "-"
    return f"{stats['mean']:.{digits}f}" + ("" if stats["count"] == 1 else f" ± {stats['std']:.{digits}f}")


def interval(stats: pd.Series) -> tuple[float, float] | None:
    """The t-based 95 % interval of the mean, from `stats` (mean, std, count); None for fewer than two values."""
    if stats["count"] < 2:
        return None
    half = t975(int(stats["count"]) - 1) * stats["std"] / math.sqrt(stats["count"])
    return stats["mean"] - half, stats["mean"] + half


def fmt_interval(stats: pd.Series, digits: int = 3) -> str:
    ci = interval(stats)
    return "-" if ci is None else f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def source(metric: str) -> str:
    """The metrics.json entry behind a column: a test metric, or sec_per_epoch / epochs of the run."""
    return metric if metric in RUN_COLUMNS else f"test/{metric}"


def distinct(labels: pd.DataFrame, extra: pd.DataFrame) -> pd.DataFrame:
    """`labels`, then each column of `extra` whose values differ between rows that `labels` shows alike:
    rows that differ anywhere in `extra` never read the same."""
    varies = extra.groupby([labels[c] for c in labels], sort=False).nunique(dropna=False).max() > 1
    return labels.join(extra.loc[:, varies])


def group_labels(runs: Finished) -> pd.DataFrame:
    """One row per group (indexed by group): describe()'s columns, and each config key that tells apart
    groups those columns would show alike (two sweeps of one approach at two learning rates)."""
    by = runs.info["group"]
    return distinct(runs.info[LABEL].groupby(by, sort=False).first(), runs.settings.groupby(by, sort=False).first())


def short_labels(labels: pd.DataFrame) -> pd.DataFrame:
    """The interval table's and the chart's labels: approach, features and split, and whichever other
    label column is still needed to tell the groups apart."""
    return distinct(labels[SHORT_LABEL], labels.drop(columns=SHORT_LABEL))


def run_counts(runs: Finished) -> pd.DataFrame:
    """seeds (the most runs of any one fold), folds and n (all runs) of each group."""
    per_fold = runs.info.groupby(["group", "fold"], sort=False).size().groupby(level="group", sort=False)
    return pd.DataFrame({"seeds": per_fold.max(), "folds": per_fold.size(), "n": per_fold.sum()})


def metric_column(runs: Finished, metric: str) -> pd.Series:
    """A metric's cells, one per group: mean ± sd, or for `collapsed` how many of the group's runs were."""
    if metric == "collapsed":
        return runs.info.groupby("group", sort=False)["collapsed"].agg(lambda c: f"{c.sum()}/{len(c)}")
    return runs.per_group(source(metric)).apply(fmt, axis=1, digits=DIGITS.get(metric, 3))


def majority_row(runs: Finished, metrics: list[str], columns: pd.Index) -> dict:
    """The always-the-most-frequent-line reference: one figure per test set (seeds and models share it),
    mean ± sd over the test sets."""
    row = dict.fromkeys(columns, "-") | {"approach": "majority reference"}
    for m in metrics:
        if m not in RUN_COLUMNS:
            per_test = runs.column(f"majority/{m}").groupby(runs.info["test_set"]).first()
            row[m] = fmt(per_test.agg(STATS), DIGITS.get(m, 3))
    return row


def summary_table(runs: Finished, labels: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """One row per group, its metrics as mean ± sd over its runs, then the majority reference."""
    if runs.info.empty:
        return pd.DataFrame()
    table = labels.join(run_counts(runs))
    for m in metrics:
        table[m] = metric_column(runs, m)
    table = table.reset_index(drop=True)
    return pd.concat([table, pd.DataFrame([majority_row(runs, metrics, table.columns)])], ignore_index=True)


def interval_table(runs: Finished, labels: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """One row per group: the t-based 95 % interval of the mean of each test metric over its n runs
    (folds x seeds); `-` where n < 2."""
    table = labels.join(run_counts(runs)["n"])
    for m in metrics:
        if m not in RUN_COLUMNS:
            table[m] = runs.per_group(source(m)).apply(fmt_interval, axis=1, digits=DIGITS.get(m, 3))
    return table.reset_index(drop=True)


def compare(runs: Finished, a: str, b: str, metrics: list[str] | None = None) -> list[dict]:
    """Paired comparison of approaches `a` and `b`: per metric, the mean of the differences A - B over
    the (data, fold, seed) both ran on, its sd, and the t-based 95 % interval of that mean. An interval
    that excludes 0 is the measured statement 'A beats B' (or loses to it) on this protocol."""
    info = runs.info[~runs.info["trial"].astype(bool)]
    names = sorted(set(info["approach"]))
    for name in (a, b):
        if name not in names:
            raise GcodeExpError(f"--compare {a} {b}: no finished run is named {name} "
                                f"(approaches: {', '.join(names) or 'none'})")
    side_a, side_b = (paired_side(runs, info[info["approach"] == name], f"--compare {a} {b}") for name in (a, b))
    if side_a.index.intersection(side_b.index).empty:
        raise GcodeExpError(f"--compare {a} {b}: no fold and seed on which both ran (pairs need the same data, "
                            "features, fold and seed)")
    diffs = side_a - side_b  # aligned on the pair key: NaN where only one of them ran
    rows = []
    for m in METRICS if metrics is None else [m for m in metrics if m not in RUN_COLUMNS]:
        d = diffs[source(m)].dropna() if source(m) in diffs else pd.Series()
        if d.empty:  # a metric these runs did not score (line_exact with trainer.line_exact=false)
            continue
        stats = d.agg(STATS)
        ci = interval(stats)
        verdict = "-" if ci is None else f"{a} higher" if ci[0] > 0 else f"{b} higher" if ci[1] < 0 else "not resolved"
        rows.append({"metric": m, "pairs": len(d), "mean diff": f"{stats['mean']:+.3f}",
                     "sd": f"{stats['std']:.3f}" if len(d) > 1 else "-", "95% interval": fmt_interval(stats),
                     "verdict": verdict})
    return rows


def paired_side(runs: Finished, info: pd.DataFrame, option: str) -> pd.DataFrame:
    """One approach's metrics indexed by pair key; two of its runs on the same data, fold and seed are
    refused (naming both): they would not pair."""
    again = info[info["pair"].duplicated()]
    if not again.empty:
        first = info.loc[info["pair"] == again["pair"].iloc[0], "folder"].iloc[0]
        raise GcodeExpError(f"{option}: {first} and {again['folder'].iloc[0]} are both {again['approach'].iloc[0]} on "
                            "the same data, fold and seed (other settings differ?): compare one sweep at a time")
    return runs.values.loc[info.index].set_axis(info["pair"])


def markdown(table: pd.DataFrame) -> str:
    """A Markdown table padded so that its columns line up in a terminal as well as when rendered."""
    if table.empty:
        return "(no finished runs)\n"
    cells = table.astype(object).fillna("").astype(str)
    widths = [max(len(str(name)), cells.iloc[:, i].str.len().max()) for i, name in enumerate(table.columns)]

    def line(values) -> str:
        return "| " + " | ".join(str(v).ljust(w) for v, w in zip(values, widths)) + " |"

    rows = [line(table.columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    return "\n".join([*rows, *map(line, cells.itertuples(index=False))]) + "\n"


def csv_text(table: pd.DataFrame) -> str:
    return "" if table.empty else table.to_csv(index=False, lineterminator="\r\n")


def as_table(rows: list[dict]) -> pd.DataFrame:
    """Rows of dicts as a table, values as given: trials of other studies may add columns (empty elsewhere)."""
    return pd.DataFrame(rows, dtype=object)


def chart(runs: Finished, labels: pd.DataFrame) -> bytes:
    """summary.png's bytes: the test metrics of each group, mean ± sd, each with the majority reference
    of the same test files as a black tick (what answering the most frequent line everywhere scores)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [chart_label(label) for _, label in labels.iterrows()]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(names)) + 1.8, 4))
    width = 0.8 / len(CHART_METRICS)
    for k, key in enumerate(CHART_METRICS):
        at = [i + k * width for i in range(len(names))]
        test = runs.per_group(f"test/{key}")
        ax.bar(at, test["mean"], width, yerr=test["std"].fillna(0), label=key, capsize=2)
        ax.hlines(runs.per_group(f"majority/{key}")["mean"], [x - width / 2 for x in at],
                  [x + width / 2 for x in at], colors="black", linewidth=2,
                  label="majority reference" if k == 0 else None)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, fontsize=7)
    ax.set(ylim=(0, 1), ylabel="test", title="approaches on unseen runs (mean ± sd over folds x seeds)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1, 1))  # beside the bars, never over them
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def chart_label(label: pd.Series) -> str:
    """approach, features, the split unless the default, then `key=value` of any other label column."""
    lines = [label["approach"], label["features"], *([] if label["split"] == "file" else [label["split"]])]
    return "\n".join([*lines, *(f"{k}={v}" for k, v in label.drop(SHORT_LABEL).items())])


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
    counts = Counter(t["state"] for t in trials)
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
    finished = finished_runs(runs)
    labels = group_labels(finished)
    short = short_labels(labels)
    table = summary_table(finished, labels, metrics)
    text = markdown(table)
    if (run_counts(finished)["n"] > 1).any() and any(m not in RUN_COLUMNS for m in metrics):
        text += ("\n95 % interval of the mean over the n runs (folds x seeds; t with n - 1 degrees of freedom):\n\n"
                 + markdown(interval_table(finished, short, metrics)))
    compared: list[dict] = []
    for a, b in args.compare:
        pairs = compare(finished, a, b, metrics)
        text += (f"\nPaired comparison {a} - {b} (the same data, fold and seed; 95 % interval of the mean "
                 f"difference; 'not resolved': the interval holds 0):\n\n" + markdown(as_table(pairs)))
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
        text += f"\nOptuna study `{study}` ({statistics_of(trials)}):\n\n" + markdown(as_table(trials))
    elif any(r.trial for r in runs):
        trials = folder_trials(runs)
        text += "\nOptuna trials recorded in the run folders (add --storage URL for the whole study):\n\n"
        text += markdown(as_table(trials))
    text += pruned_line(runs)
    out = args.paths[0]
    files: dict[Path, str | bytes] = {out / "summary.csv": csv_text(table), out / "summary.md": text}
    if trials:
        files[out / "trials.csv"] = csv_text(as_table(trials))
    if compared:
        files[out / "compare.csv"] = csv_text(as_table(compared))
    if not table.empty:
        files[out / "summary.png"] = chart(finished, short)
    write_all(files)
    print(text, end="")
    print(f"\n{len(runs)} run folders ({len(runs) - len(others)} finished); wrote {', '.join(p.name for p in files)} "
          f"in {out}")
    return table.to_dict("records")


if __name__ == "__main__":
    main()
