"""The measured comparison table, from run folders alone (no dashboard, no code of the runs needed).

    python -m gcode_exp.summarize PATH [PATH ...] [--storage URL --study NAME]

Finds every run folder (a folder with `.hydra/config.yaml`) under the paths, groups runs that differ
only in `seed` into mean ± sd, adds the majority reference, lists unfinished and failed runs, and
writes summary.csv, summary.md and summary.png into the first path. With --storage/--study it also
lists the trials of an Optuna study and the folder each trial wrote.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import yaml

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
    runs = []
    for root in paths:
        for cfg_file in sorted(root.rglob(".hydra/config.yaml"), key=natural_key):
            folder = cfg_file.parent.parent
            overrides_file = folder / ".hydra" / "overrides.yaml"
            metrics_file, error_file = folder / "metrics.json", folder / "error.txt"
            runs.append(Run(
                folder=folder,
                config=load_config(cfg_file),
                overrides=yaml.safe_load(overrides_file.read_text()) or [] if overrides_file.exists() else [],
                metrics=json.loads(metrics_file.read_text()) if metrics_file.exists() else None,
                error=error_file.read_text().strip().splitlines()[0] if error_file.exists() else None,
            ))
    return runs


def natural_key(path: Path) -> list:
    """Sort `2_x` before `10_x`: job folders in the order Hydra ran them."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def load_config(path: Path) -> dict:
    """The job's config with interpolations such as `name: ${model.name}-...` resolved where possible."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(path)
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # an interpolation that needs Hydra at run time: keep it as written
        return OmegaConf.to_container(cfg, resolve=False)


def describe(cfg: dict) -> dict:
    """The columns that say what a run was."""
    model, aug, feats = cfg.get("model", {}), cfg.get("aug", {}), cfg.get("features", {})
    return {
        "approach": cfg.get("name", "?"),
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
        key = json.dumps({k: v for k, v in r.config.items() if k not in ("seed", "hydra")}, sort_keys=True, default=str)
        groups.setdefault(key, Group(describe(r.config))).runs.append(r)
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
            row[m] = fmt(ref.values(f"majority/{m}"), 1 if m == "unique_tokens" else 3)
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
    """Trials of an Optuna study, each matched to the run folder whose overrides carry its parameters."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    loaded = optuna.load_study(study_name=study, storage=storage)
    out = []
    for t in loaded.trials:
        folder = next((str(r.folder) for r in runs if _same_params(r.overrides, t.params)), "-")
        out.append({"trial": t.number, "state": t.state.name, "value": t.value, **t.params, "folder": folder})
    return out


def _same_params(overrides: list[str], params: dict) -> bool:
    given = dict(o.split("=", 1) for o in overrides if "=" in o)
    try:
        return bool(params) and all(math.isclose(float(given[k]), float(v)) for k, v in params.items())
    except (KeyError, ValueError):
        return False


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description="Comparison table from gcode-exp run folders.")
    ap.add_argument("paths", nargs="+", type=Path, help="sweep folders or single run folders")
    ap.add_argument("--storage", help="Optuna storage URL (sqlite:///..., postgresql://...)")
    ap.add_argument("--study", help="Optuna study name (with --storage)")
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
    trials = []
    if args.storage and args.study:
        trials = study_trials(args.storage, args.study, runs)
        text += f"\nOptuna study `{args.study}`:\n\n" + markdown(trials)
    out = args.paths[0]
    (out / "summary.md").write_text(text)
    with open(out / "summary.csv", "w", newline="") as f:
        if rows:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    if groups:
        chart(groups, out / "summary.png")
    print(text, end="")
    print(f"\n{len(runs)} run folders ({len(runs) - len(others)} finished); wrote summary.csv, summary.md"
          f"{', summary.png' if groups else ''} in {out}")
    return rows


if __name__ == "__main__":
    main()
