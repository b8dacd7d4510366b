"""Peak resident memory of this process, for the benchmarks' memory columns (Linux ``VmHWM``)."""

from __future__ import annotations

import resource


def reset_peak_rss() -> None:
    """Restart the kernel's peak-RSS counter (Linux), so the next reading covers what follows."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux, or not permitted: the peak then covers the whole process
        pass


def _status_mib(field: str) -> float | None:
    """``field`` of ``/proc/self/status`` (``VmHWM``, ``VmRSS``) in MiB, or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mib() -> float:
    """Peak resident memory since the last reset (``VmHWM``), else the process's ``ru_maxrss``."""
    peak = _status_mib("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if peak is None else peak


def rss_mib() -> float:
    """Resident memory now (``VmRSS``), else the peak."""
    now = _status_mib("VmRSS")
    return peak_rss_mib() if now is None else now
