"""glibc's malloc, told to keep the memory that each forward pass frees for the next.

glibc gives the free memory at the top of its heap back to the system once more than a threshold
is free, and serves blocks above another threshold with their own mmap; both start small (128 KiB
and 256 KiB) and only rise as a process happens to free larger blocks. A process that loops over
the same big tensors (the slice's forward: blocks of 4-16 MB, a few hundred MB a batch) can then
return and page in again most of what every batch uses. Measured with
`.venv/bin/python benchmarks/producer_in_actor.py --rounds 3` on Gemma 3 270M's slice to layer 6
(23 batches of 16 contexts, bf16, 2 threads): in a fresh Ray actor with glibc's thresholds the
forward took 1.4-3.1 million page faults and 1.10-1.33x as long as in the driver process (17-4,352
faults); with the thresholds fixed as below, 29-3,357 faults and 0.94-1.05x. (A driver that has
tokenised and loaded a model has usually raised its own thresholds already: 513-6,414 faults for
11 batches with glibc's, in a scratch run before this module.)

In a whole `saeforge train` (Ray Data's producer actor, 200k tokens) the producer's steady rate
went from 2,390-2,560 to 2,730 tokens/s. Only the producers call it: SAE steps in a fresh process
ran no faster with it (relu d_sae 4096, 60 steps, three fresh processes each: 3,661-4,159 tokens/s
against 3,994-4,257 with glibc's own thresholds).

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
