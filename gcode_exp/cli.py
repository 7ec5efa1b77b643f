"""The command line: `python run.py ...`, `python -m gcode_exp ...` and `gcode-exp ...` all run `main`.

`main` composes conf/ (the repository's, by absolute path, so any working folder works; the package is
installed editable, beside it), validates, dispatches on `task` and returns the sweep objective. Hydra's
output folders (outputs/, multirun/) are relative to the working folder, as with run.py."""

from __future__ import annotations

import difflib
import io
import logging
import math
import os
import re
import signal
import sys
import threading
import warnings
from pathlib import Path

os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")  # the guide's setting for Apple GPUs
# Hydra 1.4 warns about every config-named _target_ without an execution whitelist, ours too (the
# callbacks of conf/); a whitelist in hydra.main would instead refuse every callback a user adds.
warnings.filterwarnings("ignore", r"hydra\.utils\.instantiate\(\) resolved _target_='gcode_exp\.", UserWarning)

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from gcode_exp import GcodeExpError, trust  # noqa: E402
from gcode_exp.config import seed_of  # noqa: E402, F401  (registers the resolvers conf/ uses: seed_of, folder_label)

log = logging.getLogger("gcode_exp")
trust.redact_logs()  # no storage password in any log line, the console's, run.log's or Hydra's own
CONF = str(Path(__file__).resolve().parent.parent / "conf")  # the repository's conf/, whatever the working folder


GROUPS = frozenset(p.name for p in Path(CONF).iterdir() if p.is_dir() and p.name != "hydra")


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's time limit, `kill`): stopped as Ctrl-C stops a run, so training keeps the
    last.pt of its last whole epoch and live mode ends with its summary."""

    def __str__(self) -> str:
        return "stopped by SIGTERM (a scheduler's time limit, or kill)"


def stop_on_sigterm() -> None:
    """SIGTERM raises Terminated in the main thread (where signals arrive; a joblib worker thread has none)."""
    def stop(signum, frame):
        raise Terminated

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)


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


class HeldStderr(io.TextIOBase):
    """stderr while Hydra composes the config, held back: Hydra reports a bad override in several lines
    (exit 1), which `main` turns into one `error:` line (exit 2). Passed on from the job's start on."""

    def __init__(self, real) -> None:
        self.real, self.held, self.passing = real, [], False

    def write(self, text: str) -> int:
        if self.passing:
            return self.real.write(text)
        self.held.append(text)
        return len(text)

    def flush(self) -> None:
        if self.passing:
            self.real.flush()

    def isatty(self) -> bool:
        return self.real.isatty()

    def pass_on(self) -> None:
        self.passing = True
        self.real.write(trust.redact_text("".join(self.held)))
        self.held = []


def one_line(hydra_error: str, argv: list[str]) -> str:
    """Hydra's message about a bad override, as one line that names the override."""
    from gcode_exp.config import SCHEMA

    lines = [line.strip() for line in hydra_error.splitlines() if line.strip()]
    given = {a.lstrip("+~").split("=", 1)[0]: a.lstrip("+~") for a in argv if "=" in a}
    text = " ".join(lines)
    if (m := re.search(r"Could not override '([^']+)'", text)) and "not in struct" in text:
        key = m.group(1)
        rule = SCHEMA.get(key)
        if rule is not None and rule.only_if:
            return f"{given.get(key, key)}: not a key of this config (only with {rule.only_if})"
        near = difflib.get_close_matches(key, list(SCHEMA), n=1)
        hint = f"; did you mean {near[0]}?" if near else ""
        return f"{given.get(key, key)}: unknown key{hint} (gcode_exp/config.py SCHEMA lists every key)"
    if m := re.search(r"Could not find '([^']+)/([^'/]+)'", text):
        group, option = m.groups()
        start = next((i for i, line in enumerate(lines) if line.startswith("Available options")), len(lines))
        end = next((i for i, line in enumerate(lines) if line.startswith("Config search path")), len(lines))
        options = ", ".join(lines[start + 1 : end])
        return f"{group}={option}: no such option of {group}" + (f"; options: {options}" if options else "")
    kept = [line for line in lines if not line.startswith(("full_key:", "object_type=", "Set the environment"))]
    return "; ".join(kept[: next((i for i, line in enumerate(kept) if line.startswith("Config search")), None)])


def main() -> None:
    """The entry point of run.py, `python -m gcode_exp` and the `gcode-exp` command."""
    from gcode_exp import distributed

    if not distributed.launched():
        return run_command()
    try:  # under torchrun: the process ends with its exit code and without C++ teardown (distributed.leave)
        run_command()
        code = 0
    except SystemExit as e:
        if isinstance(e.code, str):  # what the interpreter would print for it
            print(trust.redact_text(e.code), file=sys.stderr)
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    distributed.leave(code)


def run_command() -> None:
    """Hydra's app on the command line; a command line Hydra refuses is one line and exit code 2."""
    sys.argv = sweep_ready(sys.argv)
    held = sys.stderr = HeldStderr(sys.stderr)
    try:
        app()
    except SystemExit as e:
        if not held.passing and e.code == 1 and held.held:  # Hydra refused the command line
            print(f"error: {trust.redact_text(one_line(''.join(held.held), sys.argv[1:]))}", file=held.real)
            held.held = []
            sys.exit(2)
        raise
    finally:
        sys.stderr = held.real
        if not held.passing:
            held.pass_on()


@hydra.main(config_path=CONF, config_name="config")
def app(cfg: DictConfig) -> float | None:
    from gcode_exp import run_folder, tasks
    from gcode_exp.sweeps import record_optuna_trial

    if isinstance(sys.stderr, HeldStderr):  # the command line composed: the job speaks for itself now
        sys.stderr.pass_on()
        sys.stderr = sys.stderr.real
    sys.argv[1:] = [trust.redact_text(a) for a in sys.argv[1:]]  # Hydra has read it; wandb records it later
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode.name == "MULTIRUN"
    stop_on_sigterm()
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
    print(f"error: {trust.redact_text(message)}", file=sys.stderr)
    if multirun:  # the sweep goes on; Optuna records a NaN objective as a failed trial
        return math.nan
    sys.exit(2)
