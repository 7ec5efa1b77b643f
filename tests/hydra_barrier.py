"""A Hydra callback for tests: every job waits at a file barrier until `parties` jobs have reached it.

Injected from the command line, with the repository root on PYTHONPATH (launcher workers import it):

    +hydra.callbacks.barrier._target_=tests.hydra_barrier.Barrier
    +hydra.callbacks.barrier.dir=DIR +hydra.callbacks.barrier.parties=2

Each job writes `DIR/<its pid>` (`waiting`) when it starts, waits until DIR holds `parties` files,
then rewrites its file to `passed`. So jobs whose files all say `passed` were alive at the same
moment, in `parties` different processes, however slow or busy the machine is. If they were not
(the launcher ran them one after another, or in one process), the first job gives up after `timeout`
seconds and its file keeps saying `waiting`: Hydra turns an error raised by a callback into a
warning and runs the job anyway, so a test reads the outcome from the files.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback


class Barrier(Callback):
    def __init__(self, dir: str, parties: int, timeout: float = 180.0) -> None:
        self.dir, self.parties, self.timeout = Path(dir), int(parties), float(timeout)

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        mine = self.dir / str(os.getpid())
        mine.write_text("waiting\n")
        deadline = time.monotonic() + self.timeout
        while (arrived := len(list(self.dir.iterdir()))) < self.parties:
            if time.monotonic() > deadline:
                raise RuntimeError(f"barrier {self.dir}: {arrived} of {self.parties} processes arrived "
                                   f"within {self.timeout:.0f} s")
            time.sleep(0.05)
        mine.write_text("passed\n")
