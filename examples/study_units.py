"""The units of a study (one fold, method and labeled fraction each) and the lock files that
let several study processes share one ``--out``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["METHODS", "NAMES", "Unit", "claim"]

METHODS = ("suponly", "cscpa")
NAMES = {"suponly": "SupOnly", "cscpa": "CSC-PA"}


@dataclass(frozen=True)
class Unit:
    fold: int
    method: str
    labeled: str
    # the fraction's folder in a multi-fraction study; "" (one fraction) keeps --out/<method>/fold<k>/
    subdir: str = ""

    def root(self, out: Path) -> Path:
        """The --out that train_busi.py gets for this unit."""
        return out / self.subdir if self.subdir else out

    def directory(self, out: Path) -> Path:
        return self.root(out) / self.method / f"fold{self.fold}"

    def label(self, number: int, total: int) -> str:
        fraction = f", {self.labeled} labeled" if self.subdir else ""
        return f"[study] unit {number}/{total}: fold {self.fold} {NAMES[self.method]}{fraction}"


def claim(unit_dir: Path) -> Path | None:
    """Take the unit's lock file (``.study-lock`` holding our pid), or None when a live process
    holds it. Several study processes can then share one --out: each trains the units no other
    one is on. A lock left by a process that died is taken over."""
    unit_dir.mkdir(parents=True, exist_ok=True)
    lock = unit_dir / ".study-lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = int(lock.read_text().strip() or "0")
            except (OSError, ValueError):
                holder = 0
            if holder and holder != os.getpid() and _alive(holder):
                return None
            lock.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(str(os.getpid()))
        return lock
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
