"""One command in a process of its own, with what the kernel measured of it: shared by the bench scripts."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time


def run_measured(command: list[str], threads: int) -> tuple[float, os.struct_rusage]:
    """Run ``command`` with ``OMP_NUM_THREADS=threads``; its wall seconds and resource usage (``wait4``: CPU times, peak
    resident memory, page faults). Exits with the command's last error lines if it fails."""
    # stderr to a file, not a pipe: a pipe nobody reads stalls a child that writes more than it holds (a progress bar).
    with tempfile.TemporaryFile() as errors:
        start = time.perf_counter()
        process = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": str(threads)}, stdout=subprocess.DEVNULL, stderr=errors)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            errors.seek(0)
            sys.exit(f"{' '.join(command)} failed:\n{errors.read().decode(errors='replace')[-3000:]}")
    return wall, usage
