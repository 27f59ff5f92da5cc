import subprocess
import sys

import pytest

REUSE_FAULTS = """
import ctypes, resource, sys
from mokd_jax import host_memory
if sys.argv[1] == "keep":
    assert host_memory.keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 200 * 2**20  # a step's scratch block: far above malloc's 32 MiB mmap threshold
block = libc.malloc(size)
ctypes.memset(block, 1, size)
libc.free(block)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = libc.malloc(size)
ctypes.memset(block, 1, size)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults_of_a_second_block(setting: str) -> int:
    result = subprocess.run(
        [sys.executable, "-c", REUSE_FAULTS, setting], capture_output=True, text=True, check=True
    )
    return int(result.stdout.split()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_freed_block_is_reused_instead_of_mapped_and_faulted_in_again():
    """malloc's defaults map a 200 MiB block afresh after it was freed, so writing it
    faults in every 4 KiB page again; with `keep_freed_memory` the freed block is reused."""
    assert faults_of_a_second_block("default") > 50_000
    assert faults_of_a_second_block("keep") < 100
