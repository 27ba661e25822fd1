"""Process-group set-up for ``torchrun`` (DDP): gloo on CPU, nccl on CUDA; a no-op for one process.

``torchrun --nproc_per_node=2 -m coopnets.train ...`` sets ``WORLD_SIZE``/``RANK``/
``LOCAL_RANK``; :func:`init_distributed` reads them. Only rank 0 writes files
(:attr:`DistInfo.is_main`).

Example:
    >>> info = init_distributed("cpu")
    >>> info.world_size, info.is_main
    (1, True)
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size`` processes, on ``device``."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


#: the device types a run can train on
DEVICE_TYPES = ("cpu", "cuda", "mps")


def device_problem(device: Optional[str]) -> Optional[str]:
    """Why ``--device`` cannot be used on this machine (naming what can), or ``None`` when it can.

    Example:
        >>> device_problem("tpu9")
        "--device 'tpu9' is not a device: valid are cpu, cuda, cuda:N (N: the GPU index) and mps"
        >>> device_problem("cpu") is None, device_problem(None) is None
        (True, True)
    """
    if device is None:
        return None
    valid = "cpu, cuda, cuda:N (N: the GPU index) and mps"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        return f"--device {device!r} is not a device: valid are {valid}"
    if dev.type not in DEVICE_TYPES:
        return f"--device {device!r}: cannot train on {dev.type}; valid are {valid}"
    here = ["cpu"] + ([f"cuda (cuda:0..cuda:{torch.cuda.device_count() - 1})"] if torch.cuda.is_available() else []) \
        + (["mps"] if torch.backends.mps.is_available() else [])
    if dev.type == "cuda" and not torch.cuda.is_available():
        return (f"--device {device!r}: this machine has no usable CUDA GPU (torch.cuda.is_available() is False); "
                f"valid here: {', '.join(here)}")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        return f"--device {device!r}: no such GPU; valid here: {', '.join(here)}"
    if dev.type == "mps" and not torch.backends.mps.is_available():
        return f"--device {device!r}: MPS is not available on this machine; valid here: {', '.join(here)}"
    return None


def init_distributed(device: Optional[str] = None) -> DistInfo:
    """Join the process group started by ``torchrun`` (if any) and pick this process's device.

    ``device`` overrides the default (``cuda:LOCAL_RANK`` when CUDA is available, else CPU).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    dev = torch.device(f"cuda:{local}" if use_cuda and device in (None, "cuda") else (device or "cpu"))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, world, local, dev)


def sync_buffers(module: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm statistics) to every rank, so all hold the same model."""
    if dist.is_initialized():
        for buf in module.buffers():
            dist.broadcast(buf, src=0)


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks (in place) and return it; identity for one process."""
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
