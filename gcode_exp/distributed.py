"""Data-parallel training (`torchrun --standalone --nproc_per_node=N run.py hardware=ddp ...`).

torchrun starts N copies of run.py and tells each its place (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT). With hardware.distributed=true they join one process group (gloo on CPU; NCCL for CUDA
tensors), every rank trains its share of each batch under DistributedDataParallel, and only rank 0
writes: the run folder, its checkpoints, history, metrics, logs. Without these helpers being started
(one process, the usual case) every function here is a no-op that costs nothing.
"""

from __future__ import annotations

import atexit
import contextlib
import inspect
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from gcode_exp import GcodeExpError

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
T = TypeVar("T")


def launched() -> bool:
    """Whether torchrun started this process."""
    return all(k in os.environ for k in TORCHRUN_ENV)


def launched_world() -> int:
    """How many processes torchrun started (1 without torchrun)."""
    return int(os.environ["WORLD_SIZE"]) if launched() else 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0, the one process that writes (always true without hardware=ddp)."""
    return rank() == 0


def wanted(config) -> bool:
    """hardware=ddp under torchrun (a Hydra config, before the job runs)."""
    from omegaconf import OmegaConf

    return launched() and bool(OmegaConf.select(config, "hardware.distributed", default=False))


def start(hw) -> None:
    """Join torchrun's process group (once): gloo for CPU tensors, and NCCL for CUDA ones where the run
    uses a GPU (each rank its own, cuda:LOCAL_RANK)."""
    if active():
        return
    cuda = torch.cuda.is_available() and hw.device in ("auto", "cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
    atexit.register(lambda: dist.destroy_process_group() if active() else None)


def setup(cfg) -> None:
    """Refuse, by key, what data-parallel training cannot do; else join the process group (the run-folder
    guard usually has already) and quiet the other ranks' logs: rank 0 speaks for all."""
    distributed = bool(cfg.hardware.get("distributed", False))
    n = launched_world()
    if not distributed:
        if n > 1:
            refuse(f"hardware.distributed=false: torchrun started {n} processes, which would each train alone; "
                   "pass hardware=ddp")
        return
    if not launched():
        refuse("hardware.distributed=true: no torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); "
               "start it as: torchrun --standalone --nproc_per_node=N run.py hardware=ddp")
    if cfg.task != "train":
        refuse(f"hardware.distributed=true: only task=train runs data-parallel; run task={cfg.task} without "
               "torchrun and hardware=ddp")
    from gcode_exp.models import learns

    if not learns(cfg.model):
        refuse(f"hardware.distributed=true: model={cfg.model.name} trains nothing; run it without torchrun, or "
               "train a token model (model=multihead or model=baseline)")
    if cfg.trainer.batch_size % n:
        refuse(f"trainer.batch_size={cfg.trainer.batch_size}: must be divisible by the {n} processes of "
               "hardware=ddp (each trains an equal share of every batch)")
    start(cfg.hardware)
    if not is_main():
        logging.getLogger("gcode_exp").setLevel(logging.ERROR)


def refuse(message: str) -> None:
    """A one-line error from rank 0 (or the only process); torchrun's other processes stand down."""
    if os.environ.get("RANK", "0") != "0":
        stand_down()
    raise GcodeExpError(message)


def stand_down() -> NoReturn:
    """End a process other than rank 0 because rank 0 refuses the run or failed: quietly and with exit code 0,
    so that torchrun waits for rank 0, which says why and gives the run its exit code. A non-zero exit here
    had torchrun end rank 0 before it printed its one line (the user saw only torchrun's traceback)."""
    sys.exit(0)


class DataParallel(DistributedDataParallel):
    """DDP that also answers `loss`: the training step calls `model.loss(model(x, y), ...)`."""

    def loss(self, out: dict[str, torch.Tensor], *args, **kwargs):
        total, parts = self.module.loss(out, *args, **kwargs)
        # every output in the graph: a head the loss skips for want of labels in this rank's share (multihead's
        # letter and value heads on command-only lines) still gets its (zero) gradient, which DDP waits for
        return total + 0.0 * sum(o.float().sum() for o in out.values()), parts


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model under DDP when hardware=ddp (gradients averaged over the ranks in backward), else itself.
    Its buffers are constants (no batch norm): not synchronised per step (torch 2.13 names that switch
    forward_sync_buffers; the torch 2.11 of a GPU machine checked, broadcast_buffers)."""
    if not active():
        return model
    switch = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters \
        else "broadcast_buffers"
    return DataParallel(model, device_ids=[device.index] if device.type == "cuda" else None, **{switch: False})


def epoch_share(order: torch.Tensor, batch_size: int, gen: torch.Generator):
    """This rank's part of one epoch: of every batch of `batch_size` windows one process would train on,
    the windows at this rank's positions (every world-th), so the ranks' batches together are that batch.
    Up to world-1 windows of the epoch's end are left out, so that every rank takes as many steps (DDP
    waits for all). Augmentation and dropout draw from a stream seeded from the shared generator and the
    rank: distinct per rank, and the same after a resume (the generator is in last.pt)."""
    n = world()
    seed = int(torch.randint(2**62, (1,), generator=gen)) + rank()
    torch.manual_seed(seed)
    mine = order[: len(order) // n * n][rank() :: n]
    return mine, batch_size // n, torch.Generator().manual_seed(seed)


def shard(index: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous part of `index` (evaluation: each rank scores a part)."""
    return index.tensor_split(world())[rank()] if active() else index


def gather(*parts: Any) -> tuple:
    """Every rank's `parts` (lists are joined in rank order, numbers summed), the same on every rank."""
    if not active():
        return parts
    everyone: list = [None] * world()
    dist.all_gather_object(everyone, parts)
    return tuple([x for p in everyone for x in p[i]] if isinstance(parts[i], list) else sum(p[i] for p in everyone)
                 for i in range(len(parts)))


def total(*numbers: float) -> list[float]:
    """The sums of `numbers` over the ranks."""
    if not active():
        return list(numbers)
    t = torch.tensor(numbers, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    if active():
        dist.barrier()


def finish() -> None:
    """The end of a run that succeeded: the ranks meet (rank 0 has written everything), then leave the
    process group."""
    if active():
        dist.barrier()
        dist.destroy_process_group()


def leave(code: int) -> None:
    """End a process torchrun started: logs and output flushed, then out without the interpreter's teardown.
    In that teardown a worker aborted now and then, after its run had finished (C++ "terminate called
    without an active exception", SIGABRT, 2 gloo processes on 2 cores: 1 run in 32 without `finish`, 2 in
    75 with it), and torchrun then reported the finished run as failed."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing more to say
            stream.flush()
    os._exit(code)


def from_main(value: T) -> T:
    """Rank 0's `value`, on every rank."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn: Callable[..., T], *args) -> T | None:
    """`fn` on rank 0 only (what writes into the run folder); the others wait for it, and stand down if it
    failed: rank 0 says why."""
    if not active():
        return fn(*args)
    ok, out = False, None
    try:
        if is_main():
            out = fn(*args)
        ok = True
    finally:
        if not from_main(ok) and not is_main():
            stand_down()
    return out


def main_first(fn: Callable[..., T], *args) -> T:
    """`fn` on rank 0, then on the others (preparing the data: rank 0 fills the cache the others read, and
    is the one that reports bad data)."""
    out = on_main(fn, *args)
    return out if is_main() else fn(*args)
