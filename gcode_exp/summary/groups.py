"""Finished runs as groups: runs that differ only in seed and fold form one, labelled so that no two read alike.

Also which runs share a test set (the majority reference is one figure per test set) and which pair
(the same data, fold, features and seed: `--compare`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pandas as pd

from gcode_exp.data.dataset import HOW_READ
from gcode_exp.summary.runs import RunResult

LABEL = ["approach", "features", "vocab", "aug", "multihead", "split"]  # describe()'s columns
SHORT_LABEL = ["approach", "features", "split"]  # the interval table's and the chart's
STATS = ["mean", "std", "count"]  # what a table cell is made of


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
    settings = settings.copy()  # one block: the column added next would otherwise warn of a fragmented frame
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
