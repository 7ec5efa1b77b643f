"""summary.png: the test metrics of each group beside the majority reference."""

from __future__ import annotations

import io

import pandas as pd

from gcode_exp.summary.groups import SHORT_LABEL, Finished
from gcode_exp.summary.tables import source

CHART_METRICS = ("line_exact", "command_macro_recall", "token_macro_recall", "overall_acc")
PREDICT_CHART = ("row_line_acc", "program_acc", "axis_acc", "move_type_acc")  # task=predict's runs


def chart(runs: Finished, labels: pd.DataFrame) -> bytes:
    """summary.png's bytes: the test metrics of each group, mean ± sd, each with the majority reference
    of the same test files as a black tick (what answering the most frequent line everywhere scores)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [chart_label(label) for _, label in labels.iterrows()]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(names)) + 1.8, 4))
    keys = [m for m in CHART_METRICS if runs.column(source(m)).notna().any()]
    keys += [m for m in PREDICT_CHART if runs.column(source(m)).notna().any()]
    keys = keys or list(CHART_METRICS)
    width = 0.8 / len(keys)
    for k, key in enumerate(keys):
        at = [i + k * width for i in range(len(names))]
        test = runs.per_group(source(key))
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
