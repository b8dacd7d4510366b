"""What every benchmark script shares: best-of-N timing and the header naming when, where and
on which commit the numbers were measured."""

from __future__ import annotations

import datetime
import platform
import subprocess
import time

import torch


def best_of(fn, repeats: int) -> float:
    """The fastest of ``repeats`` calls of ``fn``, in seconds (the least disturbed by other load)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def header(extra: str = "") -> str:
    """``date, commit, processor, torch version, threads`` and ``extra``."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    return (f"{datetime.date.today()}, commit {commit}, "
            f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, CPU{', ' + extra if extra else ''}")
