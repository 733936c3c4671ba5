"""Atomic checkpoints, reading them back, and a stop request raised by SIGINT / SIGTERM."""

from __future__ import annotations

import os
import pickle
import random
import signal
import tempfile
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` to ``path`` so that a crash never leaves a half-written file: the data
    goes to a temporary file in the same folder, is flushed to disk, then renamed over."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """The state dict that the trainer saved (``last.pt``, ``best.pt`` or ``average.pt``), or a clear SystemExit
    for a missing, unreadable or foreign file."""
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        raise SystemExit(f"{path} is not a checkpoint of examples/train_busi.py (cannot read it: {error})") from error
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise SystemExit(f"{path} is not a checkpoint of examples/train_busi.py (no 'model' and 'config' entries)")
    return state


def rng_state() -> dict[str, Any]:
    """Every random state the trainer touches, for exact resumption."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class StopRequest:
    """Turns SIGINT and SIGTERM into a flag the training loop checks between iterations, so
    the run can save a checkpoint before it exits. A second signal exits at once."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum

    def __bool__(self) -> bool:
        return self.signal is not None
