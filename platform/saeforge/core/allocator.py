"""glibc's malloc, told to keep the memory that each forward pass frees for the next.

glibc gives the free memory at the top of its heap back to the system once more than a threshold
is free, and serves blocks above another threshold with their own mmap; both start small (128 KiB
and 256 KiB) and only rise as a process happens to free larger blocks. A process that loops over
the same big tensors (the slice's forward: blocks of 4-16 MB, a few hundred MB a batch) can then
return and page in again most of what every batch uses. A fresh Ray actor is such a process: its
forward page-faults far more, and runs slower, than the same forward in a process whose
thresholds have already risen (`benchmarks/producer_in_actor.py` compares the two; measured:
docs/benchmarks.md#producers-in-a-ray-actor).

Only the producers call it: it raised a whole run's producer rate, while SAE steps in a fresh
process ran no faster with it (measured: docs/benchmarks.md#the-allocator-in-a-whole-run).

Fixed thresholds also end glibc's adjusting of them, so a process keeps up to TRIM_THRESHOLD of
freed heap (blocks above MMAP_THRESHOLD still go back to the system when freed).
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's own ceiling for its adjusted value on 64-bit
TRIM_THRESHOLD = 512 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Fix this process's malloc thresholds (glibc on Linux; elsewhere nothing happens). Returns
    whether both were set."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
