"""Freed memory kept for reuse by glibc's malloc instead of being handed back to the OS after every step.

glibc serves each block above a threshold (at most 32 MiB) with its own ``mmap`` and unmaps it when freed, and
trims its heap when the free top grows past another. A step that allocates large activations (a 60-way ProtoNet
episode, 84x84 images, the LSTM's whole meta-batch) then maps, faults in page by page, and unmaps the same memory
at every step, and the kernel's page-fault time shows up as system time. With mmap off for blocks and no
trimming, the heap keeps its pages after the first step and every later step reuses them; resident memory stays at
the peak instead of falling between steps (docs/performance.md, "Keeping freed memory").
"""
from __future__ import annotations

import ctypes
import platform

# mallopt(3) parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
# mallopt(3): a trim threshold of -1 turns trimming off altogether.
NEVER_TRIM = -1


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to serve large blocks from its heap and never trim it, for the rest of this process.

    It holds for the blocks the main thread allocates (torch's operators allocate their outputs in the calling
    thread); blocks that ``tasks_at_once`` task threads allocate come from glibc's per-thread arenas, where blocks
    of 32 MiB and more are still mapped and unmapped each time.

    Returns:
        Whether glibc took the request: False off glibc (macOS, musl), where the allocator is left as it is. A
        malloc preloaded in glibc's place (jemalloc, tcmalloc) ignores it.
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)  # the C library this process already runs on
    return libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM) == 1
