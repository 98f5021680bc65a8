"""An exclusive lock on a data folder while a process prepares it (downloads, extracts, decodes, caches).

Runs started together (a sweep's members in parallel, several jobs on one machine) read the same
data root. Without a lock, one process's extraction replaces the folders that another is listing,
and both may write the same cache file; with it, the first prepares and the others wait, then find
the data ready.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator

try:
    import fcntl
except ImportError:  # Windows has no flock; there runs prepare the data unlocked, and say so
    fcntl = None

log = logging.getLogger(__name__)


@contextlib.contextmanager
def exclusive(lock_path: Path | None, what: str) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``lock_path`` (created if missing) for the ``with`` block; ``None``: no lock.

    Waits for the process that holds it, saying so once. Where no lock can be had (no ``fcntl``, or a
    lock file that cannot be created, as in a read-only data folder, where nothing can be extracted or
    cached either) the block runs unlocked, with a log line that says so.
    """
    handle = None
    if fcntl is not None and lock_path is not None:
        try:
            handle = open(lock_path, "a")
        except OSError as err:
            log.debug("preparing %s without a lock: %s", what, err)
    elif lock_path is not None:
        log.debug("preparing %s without a lock: this platform has no fcntl", what)
    if handle is None:
        yield
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process that is preparing %s (lock %s)", what, lock_path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
