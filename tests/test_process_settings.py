"""Process-wide settings of the command-line processes: glibc's malloc keeps freed memory for reuse."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tune_malloc sets glibc's malloc only")

# In a fresh interpreter: is a 4 MiB block, malloc'ed after `tune_malloc()` (or not), a separate mapping?
PROBE = """
import ctypes, sys
from visionops.process_settings import tune_malloc

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = MallInfo2
took = tune_malloc() if sys.argv[1] == "tuned" else None
before = libc.mallinfo2().hblks
block = libc.malloc(4 << 20)
mapped = libc.mallinfo2().hblks - before
libc.free(block)
print(took, mapped)
"""


def _probe(mode: str, **env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    proc = subprocess.run([sys.executable, "-c", PROBE, mode], env={**environ, **env}, capture_output=True, text=True,
                          check=True)
    return proc.stdout.strip()


def test_tune_malloc_serves_large_blocks_from_the_heap():
    assert _probe("default") == "None 1"  # glibc's default: a 4 MiB block is a fresh mapping
    assert _probe("tuned") == "True 0"


def test_tune_malloc_leaves_the_users_own_malloc_settings_alone():
    assert _probe("tuned", MALLOC_MMAP_THRESHOLD_="65536") == "False 1"
    assert _probe("tuned", GLIBC_TUNABLES="glibc.malloc.trim_threshold=65536") == "False 1"

