"""Peak resident memory of one run, not of the process.

`getrusage`'s ru_maxrss is the process's high-water mark: it survives `exec` (a run launched from
a large parent starts at the parent's size) and spans every job of a sweep that runs in one
process. On Linux the kernel's own mark (VmHWM) can be reset, so each run reports its own peak.
"""

from __future__ import annotations

import resource
from pathlib import Path

_STATUS, _CLEAR = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def reset_peak() -> bool:
    """Start a new high-water mark at the current RSS; False where the OS cannot."""
    try:
        _CLEAR.write_text("5")
        return True
    except OSError:
        return False


def peak_mb() -> float:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
