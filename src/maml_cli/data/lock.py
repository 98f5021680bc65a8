"""An exclusive lock on a data folder while a process prepares it (extracts, decodes, caches).

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
except ImportError:  # Windows: no advisory locks; runs there prepare the data unlocked
    fcntl = None

log = logging.getLogger(__name__)


@contextlib.contextmanager
def exclusive(lock_path: Path | None, what: str) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``lock_path`` (created if missing) for the ``with`` block; ``None``: no lock.

    Waits for the process that holds it, saying so once. Where the lock file cannot be created
    (a read-only data folder) the block runs unlocked: nothing can be extracted or cached there.
    """
    if fcntl is None or lock_path is None:
        yield
        return
    try:
        handle = open(lock_path, "a")
    except OSError:
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
