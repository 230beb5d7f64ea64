"""An exclusive lock on a run folder, so two processes never write one run's files at once.

The lock is an advisory `flock` on `<run>/.shrink.run.lock`, held for the whole run and dropped by
the kernel when the process ends (also when it is killed), so a stale lock cannot outlive its
run. The lock file stays in the folder: deleting it would let a third process lock a new file
while a second still holds the old one.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import ShrinkError

LOCK_FILE = ".shrink.run.lock"
log = logging.getLogger("shrink")
_held: dict[Path, int] = {}  # folders this process has locked → open descriptors (re-entrant)


class FolderBusy(ShrinkError):
    """Another process is running in the same run folder; nothing was written."""


@contextmanager
def locked(folder: str | Path) -> Iterator[None]:
    """Hold the folder's lock for the block; fails at once, writing nothing, if another process
    holds it. Re-entrant within one process."""
    folder = Path(folder).resolve()
    if folder in _held:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise FolderBusy(
            f"run folder {folder} is in use by another shrink process; wait for it to finish or choose "
            "another folder (hydra.run.dir=…)"
        ) from None
    except OSError as err:  # a filesystem without locks (some network mounts): run, unprotected
        log.warning("cannot lock run folder %s (%s): concurrent runs there are not detected", folder, err)
    _held[folder] = fd
    try:
        yield
    finally:
        del _held[folder]
        os.close(fd)  # closing the descriptor releases the lock


def is_locked(folder: str | Path) -> bool:
    """True while a process holds the folder's lock (its run is going on)."""
    path = Path(folder) / LOCK_FILE
    if Path(folder).resolve() in _held:
        return True
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # no locks on this filesystem: nobody can hold one
        return False
    finally:
        os.close(fd)
    return False
