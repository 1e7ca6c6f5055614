"""The streaming allocator settings (merge_engine/allocator.py), checked through glibc's own
accounting of mmapped blocks in fresh processes."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

try:
    _glibc = ctypes.CDLL(None)
    _glibc.mallinfo2
except (OSError, AttributeError):
    _glibc = None

pytestmark = pytest.mark.skipif(_glibc is None or not sys.platform.startswith("linux"), reason="needs glibc >= 2.33")

# prints the bytes glibc holds in mmapped blocks while a 20 MB tensor is alive, minus before
PROBE = """
import ctypes, sys, torch
from merge_engine.allocator import keep_freed_buffers
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None); libc.mallinfo2.restype = Info
applied = keep_freed_buffers() if sys.argv[1] == "tuned" else None
before = libc.mallinfo2().hblkhd
t = torch.empty(20 << 20, dtype=torch.uint8).fill_(1)
print(applied, libc.mallinfo2().hblkhd - before)
"""


def _probe(mode: str, **env) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": REPO, **env}).stdout.split()
    return out[0], int(out[1])


@pytest.mark.slow
def test_streaming_outputs_come_from_the_heap_not_fresh_mappings():
    applied, mapped = _probe("default")
    assert mapped >= 20 << 20  # glibc's default: a fresh mmap for a 20 MB block
    applied, mapped = _probe("tuned")
    assert applied == "True" and mapped == 0


@pytest.mark.slow
def test_a_users_malloc_setting_is_left_alone():
    applied, mapped = _probe("tuned", MALLOC_MMAP_THRESHOLD_="131072")
    assert applied == "False" and mapped >= 20 << 20
