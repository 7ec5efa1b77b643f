"""Which device a run uses (`hardware.*`), and mixed precision where it helps."""

from __future__ import annotations

import contextlib

import torch

from gcode_exp import GcodeExpError, distributed


def pick_device(hw_cfg) -> torch.device:
    """`auto` takes cuda, then mps, then cpu; naming a device that is absent is an error."""
    if hw_cfg.threads:
        torch.set_num_threads(hw_cfg.threads)
    want = hw_cfg.device
    has = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if want == "auto":
        want = next(d for d in ("cuda", "mps", "cpu") if has[d])
    if not has.get(want, False):
        raise GcodeExpError(f"hardware.device={want}: no such device on this machine (try hardware=auto)")
    if want == "cuda" and distributed.active():  # hardware=ddp: each process its own GPU
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(want)


def autocast(device: torch.device, amp: bool):
    """bf16 autocast on CUDA with hardware.amp; elsewhere a no-op."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
