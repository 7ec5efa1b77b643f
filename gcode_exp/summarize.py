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
import sys
from pathlib import Path

from gcode_exp import GcodeExpError
from gcode_exp.summary.chart import chart
from gcode_exp.summary.groups import finished_runs, group_labels, run_counts, short_labels
from gcode_exp.summary.runs import find_runs
from gcode_exp.summary.tables import (
    METRICS,
    RUN_COLUMNS,
    as_table,
    compare,
    csv_text,
    interval_table,
    markdown,
    pick_metrics,
    summary_table,
)
from gcode_exp.summary.trials import (
    best_results,
    folder_trials,
    pick_study,
    pruned_line,
    statistics_of,
    study_names,
    study_trials,
)


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
