"""Keeps freed host memory in the process for reuse, so that each XLA:CPU step does not
fault its scratch memory in afresh.

XLA:CPU allocates a compiled step's temporaries as one block per execution (180 MiB for
the ResNet-34 -> ResNet-18 step at 112 px, batch 16). glibc's malloc serves a block that
large with a fresh `mmap` and returns it to the kernel on `free`, so every step touches
43,000 new pages; faulting in 180 MiB cost about 140 ms on the 2-core test machine (a
Python loop touching each page of a fresh mapping against a reused one), a large part of
a 0.5 s step. `keep_freed_memory` tells malloc, through `mallopt`, to serve every request
from its heap (no `mmap`), from one arena (the main one, which can grow past the 64 MiB
that a thread's arena may hold) and never to give the heap's free top back, so that freed
blocks are reused. Counted with `getrusage`'s minor faults on that step: 43,000 per step
before, none after; on the two-pullback `mokd` step 55,000 before, 24,000 after (some of
its blocks still come back fresh; not analysed). PyTorch's CPU tensors come from the same
malloc, so in the benchmark both frameworks run under the same allocator settings.

The cost is a resident size that stays at its peak, the usual trade of a training process
(PyTorch's GPU caching allocator makes the same one). It is applied by the commands that
run steps (`mokd-train`, `mokd-compare`, `mokd-benchmark`), not on import: an allocator
setting belongs to the program, not to a library inside someone else's. In a notebook,
call it first. Other C libraries than glibc are left alone.
"""

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
"""glibc's `mallopt` parameters (malloc.h)."""

NEVER_TRIM = 2**31 - 1
"""The largest trim threshold `mallopt` takes (an int): the heap's free top is kept."""


def keep_freed_memory() -> bool:
    """Sets glibc's malloc to reuse freed memory (module docstring); returns whether it
    applied (False where the C library is not glibc)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 (only glibc has it)
    except (OSError, AttributeError):
        return False
    settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, NEVER_TRIM))
    return all(libc.mallopt(parameter, value) == 1 for parameter, value in settings)
