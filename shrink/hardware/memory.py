"""Host memory: the peak resident memory of one run, and handing freed heap memory back to the OS.

Peak resident memory is measured per run, not per process.

`getrusage`'s ru_maxrss is the process's high-water mark: it survives `exec` (a run launched from
a large parent starts at the parent's size) and spans every job of a sweep that runs in one
process. On Linux the kernel's own mark (VmHWM) can be reset, so each run reports its own peak.
"""

from __future__ import annotations

import ctypes
import resource
import sys
from pathlib import Path

_STATUS, _CLEAR = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def reset_peak() -> bool:
    """Start a new high-water mark at the current RSS; False where the OS cannot."""
    try:
        _CLEAR.write_text("5")
        return True
    except OSError:
        return False


def current_mb() -> float:
    """The resident memory now (VmRSS); 0 where the OS does not say."""
    return _status_mb("VmRSS:")


def peak_mb() -> float:
    return _status_mb("VmHWM:") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _status_mb(key: str) -> float:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def release_freed_memory() -> None:
    """Hand memory freed by the C heap back to the OS. glibc raises its mmap threshold after
    large frees, so block-sized tensors then come from the heap, whose freed pages it keeps:
    without this, resident memory grows by about a block per block even though nothing is alive."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _libc()
