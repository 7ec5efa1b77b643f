"""The summary's tables: each group's metrics as mean ± sd, their t-based 95 % intervals, the majority
reference, the paired comparison of two approaches, and the tables as padded Markdown and CSV.
"""

from __future__ import annotations

import difflib
import math

import pandas as pd

from gcode_exp import GcodeExpError
from gcode_exp.summary.groups import STATS, Finished, run_counts
from gcode_exp.summary.runs import RunResult

METRICS = ("unique_tokens", "command_acc", "overall_acc", "type_acc", "param_type_acc", "command_macro_recall",
           "token_macro_recall", "token_coverage", "line_exact")
RUN_COLUMNS = ("sec_per_epoch", "epochs", "collapsed")  # of the run, not of its test set: after the metrics
# task=predict's per-row answer (predict/* in its metrics.json, majority/* beside them)
PREDICT_METRICS = ("program_acc", "row_line_acc", "axis_acc", "moving_axes_acc", "move_type_acc",
                   "sequence_similarity", "end_error_mean", "end_error_p95", "end_error_rows")
DIGITS = {"unique_tokens": 1, "sec_per_epoch": 1, "epochs": 0}  # every other metric: 3


def scored(runs: list[RunResult], prefix: str) -> set[str]:
    """The metrics the runs wrote under `prefix` (test/ for train and eval, predict/ for predict)."""
    return {k.split("/", 1)[1] for r in runs if r.metrics for k in r.metrics if k.startswith(prefix)}


def known_metrics(runs: list[RunResult]) -> list[str]:
    """What --metrics may name: the table's metrics, any other test metric of the runs, predict's metrics
    where task=predict runs are among them, the run columns."""
    predict = [*PREDICT_METRICS] if scored(runs, "predict/") else []
    return [*METRICS, *sorted(scored(runs, "test/") - set(METRICS)), *predict, *RUN_COLUMNS]


def default_metrics(runs: list[RunResult]) -> list[str]:
    """Every one of METRICS and the run columns, and PREDICT_METRICS where task=predict runs are among the
    runs (only those where they are all there is)."""
    predict = [*PREDICT_METRICS] if scored(runs, "predict/") else []
    return predict if predict and not scored(runs, "test/") else [*METRICS, *predict, *RUN_COLUMNS]


def pick_metrics(spec: str | None, runs: list[RunResult]) -> list[str]:
    """The metric columns, `--metrics a,b,c` in that order (the default: `default_metrics`); an unknown name
    is refused, naming it and listing the known ones."""
    if spec is None:
        return default_metrics(runs)
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
    """The metrics.json entry behind a column: a test or predict metric, or sec_per_epoch / epochs of the run."""
    if metric in RUN_COLUMNS:
        return metric
    return f"predict/{metric}" if metric in PREDICT_METRICS else f"test/{metric}"


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
