"""How many threads torch computes with: the CPUs this process may use, not the machine's count."""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch

from maml_cli.allocator import keep_freed_memory

log = logging.getLogger("maml_cli")

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_quota(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs the cgroup's CPU quota allows this process (``cpu.max`` of cgroup v2, ``cpu.cfs_quota_us`` /
    ``cpu.cfs_period_us`` of v1), or None when there is no quota or it cannot be read."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def usable_cpus(root: Path = CGROUP_ROOT) -> tuple[int, str]:
    """The CPUs this process may use: its affinity mask, capped by the cgroup CPU quota; with how that was decided."""
    try:
        affinity = len(os.sched_getaffinity(0))
        source = f"{affinity} CPUs in this process's affinity mask"
    except AttributeError:  # not Linux
        affinity = os.cpu_count() or 1
        source = f"{affinity} CPUs"
    quota = cgroup_cpu_quota(root)
    if quota is not None and math.ceil(quota) < affinity:
        return max(1, math.ceil(quota)), f"{source}, cgroup CPU quota {quota:g}"
    return affinity, source


def busy_cpus(usable: int) -> int:
    """CPUs other processes keep busy, from the 1-minute load average, when this process may use every CPU of
    the machine (the load average counts the whole machine, so it says nothing about a share of it); else 0."""
    if usable < (os.cpu_count() or usable):
        return 0
    try:
        return min(usable, int(os.getloadavg()[0] + 0.5))
    except OSError:
        return 0


def threads_problem(setting: str) -> str | None:
    """What is wrong with ``threads=<setting>``, or None when it is ``auto`` or a whole number of at least 1."""
    if setting == "auto" or (str(setting).isdigit() and int(setting) >= 1):
        return None
    return f"threads must be auto or a whole number of at least 1 (got {setting!r})"


def choose_threads(setting: str, root: Path = CGROUP_ROOT) -> tuple[int, str]:
    """The thread count for ``threads=<setting>`` (``auto`` or a positive integer), and why.

    ``auto``: ``OMP_NUM_THREADS`` when it is set (the user or the job scheduler chose); else the
    CPUs this process may use (:func:`usable_cpus`: a job limited to 4 CPUs of a 64-core node
    computes on 4 threads, where torch's own default would start one per core of the node), less
    those other processes keep busy (:func:`busy_cpus`): on a shared machine, threads that wait for
    a busy core slow every step (docs/performance.md).
    """
    if setting != "auto":
        return int(setting), "threads=" + setting
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        return int(omp), f"auto: OMP_NUM_THREADS={omp}"
    count, source = usable_cpus(root)
    busy = busy_cpus(count)
    if busy:
        return max(1, count - busy), f"auto: {source}, about {busy} kept busy by other processes (load average)"
    return count, f"auto: {source}"


def set_up_cpu(threads: str, keep_memory: bool) -> None:
    """Compute on :func:`choose_threads`'s count of threads and, with ``keep_memory``, keep freed memory for reuse
    (:func:`maml_cli.allocator.keep_freed_memory`, glibc only); say both in one log line."""
    count, why = choose_threads(str(threads))
    torch.set_num_threads(count)
    kept = keep_memory and keep_freed_memory()
    log.info("computing on %d CPU thread%s (%s)%s", count, "s" * (count != 1), why,
             "; glibc asked to keep freed memory for reuse (keep_freed_memory=true)" if kept else "")
