"""The measured comparison table, from run folders alone (no dashboard, no code of the runs needed).

    python -m gcode_exp.summarize PATH [PATH ...] [--storage URL --study NAME]

Finds every run folder (a folder with `.hydra/config.yaml`) under the paths, groups runs that differ
only in `seed` into mean ± sd, adds the majority reference, lists unfinished and failed runs, and
writes summary.csv, summary.md and summary.png into the first path. Jobs of an Optuna sweep are listed
as trials (parameters, value, folder) from their own `optuna_trial.json`, with the best result of each
sweep; with --storage it lists every trial of the study straight from the storage (any machine's),
with its state and the folder it wrote.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from gcode_exp.sweeps import TRIAL_FILE, same_params

METRICS = ("unique_tokens", "command_acc", "overall_acc", "type_acc", "param_type_acc", "command_macro_recall",
           "token_macro_recall", "token_coverage", "line_exact")
RUN_STATS = ("sec_per_epoch", "epochs")


@dataclass
class Run:
    folder: Path
    config: dict
    overrides: list[str]
    metrics: dict | None
    error: str | None
    trial: dict | None = None   # optuna_trial.json: study, trial number, params (jobs of an Optuna sweep)

    @property
    def status(self) -> str:
        return "finished" if self.metrics else ("failed" if self.error else "unfinished")


@dataclass
class Group:
    label: dict
    runs: list[Run] = field(default_factory=list)

    def values(self, key: str) -> list[float]:
        out = []
        for r in self.runs:
            v = r.metrics.get(key)
            if isinstance(v, (int, float)) and not math.isnan(float(v)):
                out.append(float(v))
        return out


def find_runs(paths: list[Path]) -> list[Run]:
    """Every run folder under the paths. A damaged file of a run is skipped with a warning naming it:
    without its config the run is left out; with a damaged metrics.json it is listed as failed."""
    runs = []
    for root in paths:
        for cfg_file in sorted(root.rglob(".hydra/config.yaml"), key=natural_key):
            folder = cfg_file.parent.parent
            config = read_part(cfg_file, load_config, dict)
            if config is None:
                continue
            overrides = read_part(folder / ".hydra" / "overrides.yaml", lambda text: yaml.safe_load(text) or [], list)
            metrics_file = folder / "metrics.json"
            metrics = read_part(metrics_file, json.loads, dict)
            error = first_line(folder / "error.txt")
            if metrics is None and metrics_file.exists() and error is None:
                error = "metrics.json is damaged"
            runs.append(Run(
                folder=folder,
                config=config,
                overrides=overrides or [],
                metrics=metrics,
                error=error,
                trial=read_part(folder / TRIAL_FILE, json.loads, dict),
            ))
    return runs


def read_part(path: Path, parse: Callable[[str], object], kind: type) -> object | None:
    """A run folder's file parsed, or None if there is none. A damaged one (cut short by a full disk,
    edited by hand, not UTF-8) is skipped with a warning naming it: one bad folder never stops a table."""
    if not path.is_file():
        return None
    try:
        value = parse(path.read_text())
        if isinstance(value, kind):
            return value
        why = f"not a {'mapping' if kind is dict else 'list'}"
    except Exception as e:
        why = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
    print(f"warning: {path}: damaged, skipped ({why})", file=sys.stderr)
    return None


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
    model, aug, feats = cfg.get("model", {}), cfg.get("aug", {}), cfg.get("features", {})
    approach = str(cfg.get("name", "?"))
    if trial is not None:
        approach += f" #{trial['trial']}"
    return {
        "approach": approach,
        "features": feats.get("name", "?") + ("" if feats.get("board_flags", True) else "-noflags"),
        "vocab": cfg.get("vocab", {}).get("name", "?"),
        "aug": f"{aug.get('oversample_factor', 1)}x" if aug.get("name") != "none" else "none",
        "multihead": model.get("name") == "multihead",
    }


def group_runs(runs: list[Run]) -> list[Group]:
    """Finished runs whose configs are equal but for the seed form one group."""
    groups: dict[str, Group] = {}
    for r in runs:
        if r.status != "finished":
            continue
        same = {k: v for k, v in r.config.items() if k not in ("seed", "hydra")}
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


def table(groups: list[Group]) -> list[dict]:
    rows = []
    for g in groups:
        row = {**g.label, "seeds": len(g.runs)}
        for m in METRICS:
            row[m] = fmt(g.values(f"test/{m}"), 1 if m == "unique_tokens" else 3)
        row["sec_per_epoch"] = fmt(g.values("sec_per_epoch"), 1)
        row["epochs"] = fmt(g.values("epochs"), 0)
        row["collapsed"] = f"{sum(bool(r.metrics.get('collapsed')) for r in g.runs)}/{len(g.runs)}"
        rows.append(row)
    finished = [r for g in groups for r in g.runs]
    if finished:  # the always-the-most-frequent-line reference, on the same test windows
        ref = Group({"approach": "majority reference", "features": "-", "vocab": "-", "aug": "-", "multihead": "-"},
                    finished)
        row = {**ref.label, "seeds": "-"}
        for m in METRICS:
            values = ref.values(f"majority/{m}")
            values = values[:1] if len(set(values)) == 1 else values  # the same test windows: one number
            row[m] = fmt(values, 1 if m == "unique_tokens" else 3)
        rows.append({**row, "sec_per_epoch": "-", "epochs": "-", "collapsed": "-"})
    return rows


def markdown(rows: list[dict]) -> str:
    if not rows:
        return "(no finished runs)\n"
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def chart(groups: list[Group], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("command_acc", "command_macro_recall", "token_macro_recall", "overall_acc")
    labels = [f"{g.label['approach']}\n{g.label['features']}" for g in groups]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4))
    width = 0.8 / len(keys)
    for k, key in enumerate(keys):
        means = [statistics.fmean(g.values(f"test/{key}") or [0]) for g in groups]
        sds = [statistics.stdev(v) if len(v := g.values(f"test/{key}")) > 1 else 0 for g in groups]
        ax.bar([i + k * width for i in range(len(groups))], means, width, yerr=sds, label=key, capsize=2)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))], labels, fontsize=7)
    ax.set(ylim=(0, 1), ylabel="test", title="approaches on unseen runs (mean ± sd over seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def study_trials(storage: str, study: str, runs: list[Run]) -> list[dict]:
    """Every trial of an Optuna study in the storage: state, value, parameters and the folder it wrote.

    The folder is the one the job stored on its trial (gcode_exp/sweeps.py); for trials run before
    that existed, a run folder among `runs` whose overrides carry the trial's parameters."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    loaded = optuna.load_study(study_name=study, storage=storage)
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


def folder_trials(runs: list[Run]) -> list[dict]:
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
            res = yaml.safe_load(f.read_text()) or {}
            if "best_value" in res:
                lines.append(f"- {f.parent}: best value {_num(res['best_value'])}, params {res.get('best_params')}")
    return lines


def _short(params: dict) -> dict:
    return {k: f"{v:.4g}" if isinstance(v, float) else v for k, v in params.items()}


def _num(value) -> str | float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.4f}"
    return "-" if value is None else value


def pick_study(storage: str, runs: list[Run]) -> str:
    """The study to read when --study is not given: the one the run folders name, or the storage's only one."""
    import optuna

    named = sorted({r.trial["study"] for r in runs if r.trial and r.trial.get("study")})
    if len(named) == 1:
        return named[0]
    names = sorted(s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False))
    if len(names) == 1:
        return names[0]
    raise SystemExit(f"error: name the study with --study (storage holds: {', '.join(names) or 'no studies'})")


def write_csv(rows: list[dict], path: Path) -> None:
    keys = list(dict.fromkeys(k for row in rows for k in row))  # trials of other studies may add columns
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, restval="")
        if keys:
            writer.writeheader()
        writer.writerows(rows)


def statistics_of(trials: list[dict]) -> str:
    counts: dict[str, int] = {}
    for t in trials:
        counts[t["state"]] = counts.get(t["state"], 0) + 1
    return f"{len(trials)} trials: " + ", ".join(f"{n} {state.lower()}" for state, n in sorted(counts.items()))


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description="Comparison table from gcode-exp run folders.")
    ap.add_argument("paths", nargs="+", type=Path, help="sweep folders or single run folders")
    ap.add_argument("--storage", help="Optuna storage URL (sqlite:///..., postgresql://...)")
    ap.add_argument("--study", help="Optuna study name (default: the one the run folders name)")
    args = ap.parse_args(argv)
    missing = [str(p) for p in args.paths if not p.is_dir()]
    if missing:
        ap.exit(2, f"error: not a folder: {', '.join(missing)}\n")
    runs = find_runs(args.paths)
    groups = group_runs(runs)
    rows = table(groups)
    text = markdown(rows)
    others = [r for r in runs if r.status != "finished"]
    if others:
        text += "\nNot finished:\n\n" + "".join(f"- {r.folder}: {r.status}{': ' + r.error if r.error else ''}\n"
                                                for r in others)
    best = best_results(args.paths)
    if best:
        text += "\nOptuna sweeps (optimization_results.yaml):\n\n" + "\n".join(best) + "\n"
    trials: list[dict] = []
    if args.storage:
        study = args.study or pick_study(args.storage, runs)
        trials = study_trials(args.storage, study, runs)
        states = statistics_of(trials)
        text += f"\nOptuna study `{study}` ({states}):\n\n" + markdown(trials)
    elif any(r.trial for r in runs):
        trials = folder_trials(runs)
        text += "\nOptuna trials recorded in the run folders (add --storage URL for the whole study):\n\n"
        text += markdown(trials)
    out = args.paths[0]
    (out / "summary.md").write_text(text)
    write_csv(rows, out / "summary.csv")
    written = ["summary.csv", "summary.md"]
    if trials:
        write_csv(trials, out / "trials.csv")
        written.append("trials.csv")
    if groups:
        chart(groups, out / "summary.png")
        written.append("summary.png")
    print(text, end="")
    print(f"\n{len(runs)} run folders ({len(runs) - len(others)} finished); wrote {', '.join(written)} in {out}")
    return rows


if __name__ == "__main__":
    main()
