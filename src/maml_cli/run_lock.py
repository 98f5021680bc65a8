"""One process trains in a run directory at a time.

Two processes writing one run's checkpoints and events would each overwrite the other's ``last.pt``
and interleave their curves. ``maml-train`` therefore holds an exclusive lock on
``<run>/.maml-cli.lock`` while it trains (rank 0, under ``torchrun``), with its process id and host in
the file. A second ``maml-train ... resume=<run>`` is refused, naming the holder. The operating system
releases the lock when its process ends, however it ends, so a lock file whose lock nobody holds was
left by a process that was killed: it is taken over, with a warning.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
from pathlib import Path
from typing import Iterator

from maml_cli.errors import UserError

try:
    import fcntl
except ImportError:  # Windows: no flock; runs there are not locked, and the log says so
    fcntl = None

log = logging.getLogger(__name__)

LOCK_NAME = ".maml-cli.lock"


def holder_text() -> str:
    return f"process {os.getpid()} on {socket.gethostname()}"


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold the lock of ``run_dir`` for the ``with`` block.

    Raises:
        UserError: another process holds it (the message names its process id and host).
    """
    if fcntl is None:
        log.info("training in %s without a lock: this platform has no fcntl", run_dir)
        yield
        return
    path = run_dir / LOCK_NAME
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise UserError(f"{run_dir} is being trained by {holder} (it holds {path}). Wait for it to finish or stop it "
                            f"(Ctrl-C saves last.pt), then resume; or train another run.") from None
        handle.seek(0)
        left = handle.read().strip()
        if left:
            log.warning("%s was locked by %s, which no longer holds the lock (it was killed, or its machine stopped): "
                        "taking it over", run_dir, left)
        handle.seek(0)
        handle.truncate()
        handle.write(holder_text() + "\n")
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()  # an empty file: nobody to warn about
            handle.flush()
            fcntl.flock(handle, fcntl.LOCK_UN)
