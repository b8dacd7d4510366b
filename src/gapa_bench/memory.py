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


def peak_rss_mib() -> float:
    """Peak resident memory since the last reset (``VmHWM``), else the process's ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mib() -> float:
    """Resident memory now (``VmRSS``), else the peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return peak_rss_mib()
