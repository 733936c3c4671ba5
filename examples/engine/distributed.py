"""Where a run trains: the torchrun process group, the device, mixed precision, the code's git SHA."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

__all__ = ["Distributed", "autocast_factory", "git_sha", "pick_device", "setup_distributed"]


class Distributed:
    """Rank, world size and the collectives the trainer needs; trivial without torchrun.

    ``device`` is where collective tensors live: the process's GPU under NCCL (which refuses
    CPU tensors), the CPU under gloo. Pass the device the process trains on.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.enabled = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.enabled else 0
        self.world = dist.get_world_size() if self.enabled else 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def any(self, flag: bool) -> bool:
        """True on every rank when any rank says True (used for stop requests)."""
        if not self.enabled:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(value)
        return bool(value.item() > 0)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def git_sha() -> str:
    try:
        root = Path(__file__).resolve().parents[2]  # the repository
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for, but torch.cuda.is_available() is False")
    return torch.device(name)


def autocast_factory(amp: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    if amp == "none":
        return contextlib.nullcontext
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return lambda: torch.autocast(device.type, dtype=dtype)


def setup_distributed(device_name: str) -> torch.device:
    """Join the torchrun process group when WORLD_SIZE > 1; NCCL on GPUs, gloo on CPU."""
    device = pick_device(device_name)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.type == "cuda":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            device = torch.device("cuda", local)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device
