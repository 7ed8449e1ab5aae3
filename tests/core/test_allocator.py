"""`allocator.keep_freed_memory`: a loop over the same big blocks stops paging its memory in again."""

import json
import subprocess
import sys

import pytest

LOOP = """
import ctypes, json, resource, sys
from saeforge.core.allocator import keep_freed_memory
held = keep_freed_memory() if sys.argv[1] == "keep" else None
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def batch():  # what a forward does with its big blocks: 8 of 16 MB, written, then all freed
    blocks = [libc.malloc(16 << 20) for _ in range(8)]
    for block in blocks:
        ctypes.memset(block, 1, 16 << 20)
    for block in blocks:
        libc.free(block)

batch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    batch()
print(json.dumps({"held": held, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def loop_faults(mode: str) -> dict:
    """The page faults of 4 batches after the first, in a fresh process (glibc's thresholds at
    their start) that keeps freed memory (`mode` "keep") or not."""
    done = subprocess.run([sys.executable, "-c", LOOP, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_process_that_keeps_freed_memory_does_not_page_it_in_again_every_batch():
    """With glibc's own thresholds the 128 MB a batch frees goes back to the system and is paged
    in again by the next (32k faults of 4 KiB a batch); kept, every later batch reuses it."""
    kept = loop_faults("keep")
    if not kept["held"]:
        pytest.skip("not glibc: nothing to set")
    default = loop_faults("default")
    assert default["faults"] > 4 * 16_000, default  # at least half of every batch's 128 MB paged in again
    assert kept["faults"] < 1_000, kept
