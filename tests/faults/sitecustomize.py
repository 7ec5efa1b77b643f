"""Fault injection for the resume tests, kept out of the package: with this folder on PYTHONPATH and
GCODE_EXP_KILL_AFTER_EPOCH=k, a training process SIGKILLs itself right after epoch k's checkpoint and history
are written, so that a test of `kill -9` does not depend on the machine's load. Python imports
`sitecustomize` at start-up, so run.py and every torchrun worker get it (tests/cli/test_run_folder.py,
tests/training/test_ddp.py)."""

import os

if os.environ.get("GCODE_EXP_KILL_AFTER_EPOCH"):
    import signal

    from gcode_exp import distributed
    from gcode_exp.training import callbacks

    class KillAfterEpoch(callbacks.Callback):
        def __init__(self, epoch: int) -> None:
            self.epoch = epoch

        def on_epoch_end(self, trainer, row: dict) -> None:
            if row["epoch"] == self.epoch:
                distributed.barrier()  # hardware=ddp: rank 0 has written last.pt
                os.kill(os.getpid(), signal.SIGKILL)

    plain = callbacks.default_callbacks

    def with_the_fault(*args, **kwargs) -> list:
        return [*plain(*args, **kwargs), KillAfterEpoch(int(os.environ["GCODE_EXP_KILL_AFTER_EPOCH"]))]

    callbacks.default_callbacks = with_the_fault
