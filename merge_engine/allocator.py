"""The C allocator's settings for streaming merges (docs/threads.md, "Memory"). Torch-free.

A streaming merge allocates one output tensor per step (tens of MB each) and frees it once the
writer has written it. glibc serves every block above its mmap threshold with a fresh `mmap` and
returns it with `munmap` on free, so each step's output lands on never-touched pages: hundreds of
thousands of page faults, each clearing a page, for a 1.1B model. Serving those blocks from the
heap and keeping freed memory there lets the next step reuse warm pages: a 1.1B `linear` merge
took 3.9-4.3 s instead of 4.9-5.3 s (alternating runs, same machine), for 70 MB more peak RSS.

glibc caps the mmap threshold at 32 MiB on 64-bit systems, so an embedding matrix larger than
that is still mapped per step; the layers' tensors (up to 23 MB at the 1.1B shape, more at 7B but
then a few per layer) are what repeats. Other C libraries, or a value the user set through
glibc's `MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_`, are left alone.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # mallopt parameters (glibc's malloc.h)
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest accepted value on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 1 << 30  # keep up to 1 GiB freed at the heap's top instead of returning it

_configured = False


def keep_freed_buffers() -> bool:
    """Have glibc serve blocks up to MMAP_THRESHOLD from the heap and keep freed memory; once per
    process. True when the settings were applied."""
    global _configured
    if _configured:
        return True
    if not sys.platform.startswith("linux") or any(
        name in os.environ for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
    ):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only: musl has no mallopt
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    _configured = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not _configured:
        log.debug("mallopt refused the streaming allocator settings")
    return _configured
