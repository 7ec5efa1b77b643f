"""The run folder: who may write into it, and the record of what ran there.

Hydra is told not to write anything into a job's folder (`hydra.output_subdir: null`, console-only
job logging); `claim` decides first whether this command may use the folder, and only then are the
config, the overrides and the log file written. So a refused command leaves a user's finished or
interrupted run byte for byte as it was.

`Guard` (a Hydra callback, conf/config.yaml) covers what Hydra itself does before `main` runs: it
creates hydra.run.dir and writes a sweep's multirun.yaml, and it ends a sweep whose every job failed
with exit code 0 (run.py returns NaN per failed job so that a sweep goes on). Under torchrun
(hardware=ddp) it also makes the processes agree on one run folder, which rank 0 alone writes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
import traceback
from collections.abc import Iterator
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, read_write

from gcode_exp import GcodeExpError, distributed, trust
from gcode_exp.atomic import write_text
from gcode_exp.config import READS_CHECKPOINT

# files Hydra writes into a sweep folder (the basic sweeper, the Optuna sweeper)
SWEEP_FILES = ("multirun.yaml", "optimization_results.yaml")
# every file or folder a job of this project writes into its run folder
RUN_FILES = ("metrics.json", "history.csv", "per_class.csv", "per_recording.csv", "vocab.json", "data_summary.json",
             "error.txt", "run.log", "optuna_trial.json", "checkpoints", "plots", "predictions", "program.csv",
             "segments.csv", ".hydra", "resolved_config.yaml", "wandb", "profile")
REPLACED = ".replaced"  # overwrite=true: the earlier run's files, until the new run has finished
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


def state(run_dir: Path) -> str:
    """`empty`, `finished` (metrics.json), `interrupted` (a last.pt, no metrics.json) or `used`."""
    if (run_dir / "metrics.json").exists():
        return "finished"
    if (run_dir / "checkpoints" / "last.pt").exists():
        return "interrupted"
    return "used" if any((run_dir / name).exists() for name in RUN_FILES) else "empty"


def resumed_config(cfg: DictConfig, run_dir: Path, explicit: list[str] | None) -> DictConfig:
    """The settings a checkpoint decides, taken from it (`Checkpoint.reading_config`): of
    checkpoints/last.pt when `trainer.resume=true` continues an interrupted run, of `ckpt_path` for
    task=eval, predict and serve. `explicit`: Hydra's task overrides, the keys set on the command line;
    None: nothing is known to be explicit, nothing taken. A damaged checkpoint is left to `claim`, or the
    job, to report; an untrusted one is refused here, before anything is imported, built or written."""
    if explicit is None:
        return cfg
    if cfg.task == "train" and cfg.trainer.resume:
        path, source = run_dir / "checkpoints" / "last.pt", f"trainer.resume=true: {run_dir}: checkpoints/last.pt"
    elif cfg.task in READS_CHECKPOINT and cfg.get("ckpt_path"):
        path, source = Path(str(cfg.ckpt_path)), None
    else:
        return cfg
    if not path.is_file():
        return cfg  # claim, or the job, reports it
    from gcode_exp.training.checkpoint import Checkpoint  # torch: not for a command that reads no checkpoint

    try:
        ckpt = Checkpoint.load(path, source)
    except trust.UntrustedConfig:
        raise  # refused before anything is imported, built or written
    except GcodeExpError:
        return cfg  # claim, or the job, reports the damaged checkpoint
    return ckpt.reading_config(cfg, [o.lstrip("+~").split("=")[0] for o in explicit])


def claim(run_dir: Path, cfg: DictConfig) -> None:
    """Refuse, with one line, any command that would change what an earlier command left in `run_dir`.

    Allowed: an empty or new folder; `trainer.resume=true` (train only) on an interrupted run;
    anything with `overwrite=true`, which moves the earlier run's files (and only those) aside, to be
    removed when the new run finishes, or put back if it fails."""
    if run_dir.exists() and not run_dir.is_dir():
        raise GcodeExpError(f"{run_dir}: the run folder is a file; choose another hydra.run.dir")
    now = state(run_dir) if run_dir.is_dir() else "empty"
    resume = cfg.task == "train" and cfg.trainer.resume
    if cfg.overwrite:
        if resume:
            raise GcodeExpError("overwrite=true and trainer.resume=true contradict each other: choose one")
        ckpt = cfg.get("ckpt_path") if cfg.task in READS_CHECKPOINT else None
        if ckpt and run_dir.resolve() in Path(ckpt).resolve().parents:
            raise GcodeExpError(f"ckpt_path={ckpt}: inside the run folder overwrite=true would replace; "
                                "choose another hydra.run.dir (or copy the checkpoint out first)")
        _remove(run_dir / REPLACED)  # a crashed earlier overwrite's: the run it replaced is the one to keep now
        for name in RUN_FILES:  # kept aside until the new run finishes; put back if it fails (`record`)
            if (run_dir / name).exists() or (run_dir / name).is_symlink():
                (run_dir / REPLACED).mkdir(exist_ok=True)
                (run_dir / name).rename(run_dir / REPLACED / name)
        return
    if resume:
        if now == "interrupted":  # refuse another model/data/seed now, not after .hydra/ and run.log are written
            from gcode_exp.training.checkpoint import Checkpoint

            try:  # named as what the user asked for: ckpt_path is not theirs here
                ckpt = Checkpoint.load(run_dir / "checkpoints" / "last.pt",
                                       source=f"trainer.resume=true: cannot resume {run_dir}: checkpoints/last.pt")
            except GcodeExpError as e:
                raise GcodeExpError(f"{e}; pass overwrite=true to start the run afresh") from None
            ckpt.check_resume(cfg)
            return
        why = {"finished": "it already finished (metrics.json)", "empty": "it holds no checkpoints/last.pt",
               "used": "it holds no checkpoints/last.pt"}[now]
        raise GcodeExpError(f"trainer.resume=true: cannot resume {run_dir}: {why}")
    if now == "finished":
        raise GcodeExpError(f"{run_dir} already holds finished results (metrics.json); "
                            "pass overwrite=true to replace them, or choose another hydra.run.dir")
    if now == "interrupted":
        raise GcodeExpError(f"{run_dir} holds an interrupted run (checkpoints/last.pt); pass trainer.resume=true "
                            "to continue it or overwrite=true to start afresh")
    if now == "used":
        raise GcodeExpError(f"{run_dir} holds files of an earlier run; pass overwrite=true to replace them, "
                            "or choose another hydra.run.dir")


@contextlib.contextmanager
def record(run_dir: Path, cfg: DictConfig, hydra_cfg: DictConfig | None) -> Iterator[None]:
    """After `claim`: the composed config and overrides in `.hydra/` (as Hydra writes them), the config
    with every interpolation resolved (`${oc.env:...}`, `${model.name}`) in resolved_config.yaml, run.log
    while the job runs, and error.txt (why) if it fails."""
    (run_dir / "error.txt").unlink(missing_ok=True)  # left by a failed attempt to resume this run: stale now
    out = run_dir / ".hydra"
    out.mkdir(parents=True, exist_ok=True)
    # each redacted (gcode_exp/trust.py): a storage URL's password stays out of the run folder
    write_text(out / "config.yaml", trust.to_yaml(cfg))
    write_text(run_dir / "resolved_config.yaml", trust.to_yaml(OmegaConf.to_container(cfg, resolve=True)))
    if hydra_cfg is not None:
        write_text(out / "hydra.yaml", trust.to_yaml({"hydra": hydra_cfg}))
        write_text(out / "overrides.yaml", trust.to_yaml(hydra_cfg.overrides.task))
        if hydra_cfg.mode.name == "MULTIRUN":  # Hydra's own copy of the command line, in the sweep folder
            trust.redact_file(Path(hydra_cfg.sweep.dir) / "multirun.yaml")
    handler = logging.FileHandler(run_dir / "run.log")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    finished = False
    try:
        yield
        finished = True
    except BaseException as e:
        write_error(run_dir, e)
        raise
    finally:
        root.removeHandler(handler)
        handler.close()
        _settle_replaced(run_dir, finished)


def _settle_replaced(run_dir: Path, finished: bool) -> None:
    """overwrite=true: drop the earlier run's files once the new run finished; if it did not, remove
    what it wrote and put the earlier run back as it was (nothing lost to a failed overwrite)."""
    aside = run_dir / REPLACED
    if not aside.is_dir():
        return
    if not finished:
        for name in RUN_FILES:
            _remove(run_dir / name)
        for path in aside.iterdir():
            path.rename(run_dir / path.name)
    _remove(aside)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_error(run_dir: Path, error: BaseException) -> None:
    """error.txt: the one-line reason of a user-facing failure, the whole traceback of a bug (rank 0's)."""
    if not distributed.is_main():
        return
    if isinstance(error, (GcodeExpError, KeyboardInterrupt)):
        detail = str(error) or type(error).__name__
    else:
        detail = "".join(traceback.format_exception(error))
    write_text(run_dir / "error.txt", trust.redact_text(detail) + "\n")


class Guard(Callback):
    """Refuse, with one line and exit code 2, what would fail or overwrite before `claim` gets a say:
    a run folder that is a file (Hydra's mkdir would raise a traceback), a sweep folder that is a file
    or holds an earlier sweep (Hydra would overwrite its multirun.yaml). And exit 2 when every job of a
    sweep failed, so that a script or scheduler sees the failure.

    Callbacks' exceptions are only warned about by Hydra, hence `sys.exit` (SystemExit passes)."""

    def __init__(self) -> None:
        self.before: dict[str, int] | None = None  # `_job_files` when the sweep started

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        if distributed.launched_world() > 1 and not distributed.wanted(config):
            _refuse("hardware.distributed=false: torchrun started several processes, which would each train "
                    "alone; pass hardware=ddp", quiet=os.environ.get("RANK") != "0")
        if distributed.wanted(config):
            return _shared_run_dir(config)
        run_dir = Path(config.hydra.run.dir)
        if why := _not_a_folder(run_dir):
            _refuse(f"{run_dir}: the run {why}; choose another hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        if distributed.launched_world() > 1:
            _refuse("a sweep (-m) does not run under torchrun: start one torchrun per run",
                    quiet=os.environ.get("RANK") != "0")
        sweep_dir = Path(config.hydra.sweep.dir)
        if why := _not_a_folder(sweep_dir):
            _refuse(f"{sweep_dir}: the sweep {why}; choose another hydra.sweep.dir")
        earlier = _earlier_sweep(sweep_dir)
        if earlier and not (config.get("overwrite") or OmegaConf.select(config, "trainer.resume")):
            _refuse(f"{sweep_dir} already holds an earlier sweep ({earlier}); pass overwrite=true to replace "
                    "it, trainer.resume=true to continue its interrupted jobs, or choose another hydra.sweep.dir")
        if earlier and config.get("overwrite"):  # the earlier sweep waits aside until a job of this one works
            _remove(sweep_dir / REPLACED)
            for path in sorted(sweep_dir.iterdir()):
                if path.name in SWEEP_FILES or (path.is_dir() and path.name != REPLACED and state(path) != "empty"):
                    (sweep_dir / REPLACED).mkdir(exist_ok=True)
                    path.rename(sweep_dir / REPLACED / path.name)
        self.before = _job_files(sweep_dir)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if self.before is None:  # refused at the start
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        trust.redact_file(sweep_dir / "multirun.yaml")  # also where the jobs ran in other processes
        now = _job_files(sweep_dir)
        # a job that ran (re)wrote its run.log or error.txt; one that failed left a new error.txt
        ran = {Path(f).parent for f in self.before.keys() | now.keys() if self.before.get(f) != now.get(f)}
        failed = {Path(f).parent for f, t in now.items() if f.endswith("error.txt") and self.before.get(f) != t}
        all_failed = bool(ran) and ran == failed
        aside = sweep_dir / REPLACED
        if aside.is_dir():  # overwrite=true: the earlier sweep goes if a job worked, else it comes back
            for path in aside.iterdir() if all_failed else ():
                _remove(sweep_dir / path.name)
                path.rename(sweep_dir / path.name)
            _remove(aside)
        if all_failed:
            _refuse(f"all {len(failed)} jobs of the sweep failed: see error.txt in each job folder of {sweep_dir}")


def _shared_run_dir(config: DictConfig) -> None:
    """hardware=ddp: one run folder for all of torchrun's processes. hydra.run.dir holds `${now:...}` to the
    microsecond, which processes started apart resolve differently, and a run id from torchrun's env is
    not unique (TORCHELASTIC_RUN_ID is `none` unless --standalone or --rdzv-id sets it). So rank 0
    resolves the folder, checks and creates it, and sends its path to the others, which take it before
    Hydra creates anything (theirs is then rank 0's, already there); if rank 0 refuses it, all stop."""
    try:
        distributed.start(config.hardware)
    except (RuntimeError, ValueError) as e:
        _refuse(f"hardware=ddp: cannot join torchrun's process group ({str(e).strip().splitlines()[0]})")
    run_dir, why = Path(config.hydra.run.dir), None
    if distributed.is_main():
        why = _not_a_folder(run_dir)
        if why is None:
            run_dir.mkdir(parents=True, exist_ok=True)
    shared = distributed.from_main(None if why else str(run_dir))
    if shared is None:
        _refuse(f"{run_dir}: the run {why}; choose another hydra.run.dir", quiet=not distributed.is_main())
    with read_write(config.hydra.run):
        config.hydra.run.dir = shared


def _not_a_folder(folder: Path) -> str | None:
    """Why `folder` cannot be made (or written) a folder: it, or a parent, is a file, or the nearest
    existing one refuses a new file (permissions, a read-only disk); None if it can."""
    for p in (folder, *folder.parents):
        if p.is_dir():
            try:
                tempfile.TemporaryFile(dir=p).close()
            except OSError as e:
                where = "folder" if p == folder else f"folder's parent {p}"
                return f"{where} cannot be written ({e.strerror or type(e).__name__})"
            return None
        if p.exists() or p.is_symlink():
            return "folder is a file" if p == folder else f"folder's parent {p} is a file"
    return None


def _earlier_sweep(sweep_dir: Path) -> str | None:
    """What shows that `sweep_dir` holds an earlier sweep (a file of Hydra's, a job folder in use), or None."""
    if not sweep_dir.is_dir():
        return None
    return next((name for name in SWEEP_FILES if (sweep_dir / name).exists()), None) or next(
        (p.name for p in sorted(sweep_dir.iterdir()) if p.is_dir() and state(p) != "empty"), None)


def _job_files(sweep_dir: Path) -> dict[str, int]:
    """Every run.log and error.txt under the sweep folder (at any depth: hydra.sweep.subdir may nest),
    by modification time. A job that passed `claim` opened run.log; one that failed wrote error.txt."""
    if not sweep_dir.is_dir():
        return {}
    return {str(p): p.stat().st_mtime_ns for p in sweep_dir.rglob("*")
            if p.name in ("run.log", "error.txt") and p.is_file()}


def _refuse(message: str, quiet: bool = False) -> None:
    """Exit 2 with one error line (`quiet`: a torchrun process that leaves it to rank 0 stands down)."""
    if quiet:
        distributed.stand_down()
    print(f"error: {trust.redact_text(message)}", file=sys.stderr)
    sys.exit(2)
