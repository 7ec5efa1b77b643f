"""The command line: `python run.py ...`, `python -m gcode_exp ...` and `gcode-exp ...` all run `main`.

`main` composes conf/ (the repository's, by absolute path, so any working folder works; the package is
installed editable, beside it), validates, dispatches on `task` and returns the sweep objective. Hydra's
output folders (outputs/, multirun/) are relative to the working folder, as with run.py."""

from __future__ import annotations

import logging
import math
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")  # the guide's setting for Apple GPUs
# Hydra 1.4 warns about every config-named _target_ without an execution whitelist, ours too (the
# callbacks of conf/); a whitelist in hydra.main would instead refuse every callback a user adds.
warnings.filterwarnings("ignore", r"hydra\.utils\.instantiate\(\) resolved _target_='gcode_exp\.", UserWarning)

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from gcode_exp import GcodeExpError  # noqa: E402
from gcode_exp.config import seed_of  # noqa: E402, F401  (registers the resolver used by conf/hparams_search)

log = logging.getLogger("gcode_exp")
CONF = str(Path(__file__).resolve().parent.parent / "conf")  # the repository's conf/, whatever the working folder


GROUPS = frozenset(p.name for p in Path(CONF).iterdir() if p.is_dir() and p.name != "hydra")


def sweep_ready(argv: list[str]) -> list[str]:
    """`-m model=baseline,multihead model.row_weight=0`, as a user types it, for Hydra.

    Hydra checks a sweep's plain overrides against the config composed from the defaults, without
    the swept groups (hydra issue 2888), so a key the default model (nearest) lacks would be refused
    before any job ran. In a sweep over a group (or over `experiment`, which sets groups), that
    group's keys are set with `++` (set or add) instead; each job's `validate` still refuses a key its
    own config does not have."""
    if not {"-m", "--multirun"} & set(argv):
        return argv
    swept = {a.split("=", 1)[0] for a in argv
             if a.split("=", 1)[0] in GROUPS and ("," in a or a.split("=", 1)[1].startswith(("choice(", "glob(")))}
    if "experiment" in swept:
        swept = set(GROUPS)
    return [f"++{a}" if a[0] not in "+~" and "=" in a and a.split(".", 1)[0] in swept and "." in a.split("=", 1)[0]
            else a for a in argv]


def main() -> None:
    """The entry point of run.py, `python -m gcode_exp` and the `gcode-exp` command."""
    sys.argv = sweep_ready(sys.argv)
    app()


@hydra.main(config_path=CONF, config_name="config")
def app(cfg: DictConfig) -> float | None:
    from gcode_exp import run_folder, tasks
    from gcode_exp.sweeps import record_optuna_trial

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode.name == "MULTIRUN"
    try:
        metrics = tasks.run(cfg, run_dir, hc)
        log.info("run folder: %s", run_dir)
        return tasks.objective(cfg, metrics)
    except (Exception, KeyboardInterrupt) as e:
        if isinstance(e, (GcodeExpError, KeyboardInterrupt)):
            message = str(e) or type(e).__name__
        else:  # a bug, not bad input: the traceback goes to error.txt
            message = f"{type(e).__name__}: {e} (traceback in {run_dir / 'error.txt'})"
        if run_dir.is_dir() and run_folder.state(run_dir) == "empty":  # failed before the job took the folder
            run_folder.write_error(run_dir, e)
            if multirun:  # a refused Optuna trial still names its folder
                record_optuna_trial(run_dir)
    print(f"error: {message}", file=sys.stderr)
    if multirun:  # the sweep goes on; Optuna records a NaN objective as a failed trial
        return math.nan
    sys.exit(2)
