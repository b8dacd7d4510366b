"""What every benchmark record carries so that a number can be traced: the commit, the date, the
machine and the command that produced it (:func:`run_info`)."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from functools import cache
from pathlib import Path

import torch


@cache
def _cpu_model() -> str:
    """The processor's marketing name from ``/proc/cpuinfo`` (Linux), else platform's guess."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def commit() -> str:
    """The checkout's commit, with ``+dirty`` when tracked files differ from it; ``unknown``
    outside a git checkout."""
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              check=True).stdout.strip()

    try:
        sha = git("rev-parse", "--short=12", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


def machine() -> dict:
    """CPU model, cores, torch threads and version, and the GPU when one is visible."""
    info = {"cpu": _cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run_info(command: list[str] | None = None) -> dict:
    """``{"commit", "date", "machine", "command"}`` of the running benchmark."""
    return {"commit": commit(), "date": datetime.datetime.now(datetime.UTC).isoformat(
        timespec="seconds"), "machine": machine(), "command": " ".join(command or sys.argv)}
