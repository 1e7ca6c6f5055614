"""How the engine uses threads (docs/threads.md says why). Torch-free.

Merges are memory-bound and run beside other work (a search's workers, a training job). The GNU
OpenMP runtime that torch and numba's parallel kernels use spin-waits up to 300,000 iterations
between parallel regions; on a loaded machine a spinning thread takes the core the working thread
needs, and a `dare_ties` merge that takes 9 s quiet took 23 s beside one busy process (80 s beside
two). Sleeping at once (`OMP_WAIT_POLICY=PASSIVE`) fixes that but costs 30 % quiet, because
DARE's many short parallel regions then pay a wake-up each. A short spin (`GOMP_SPINCOUNT=1000`,
a few microseconds) keeps the quiet speed and sleeps before a competitor notices. It must be in
the environment before the OpenMP runtime loads, i.e. before torch is imported: every command
calls `configure_process()` first. A value the user set is kept.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)

# What every process of ours (and every Ray worker it starts) gets unless the user set it.
THREAD_ENVIRONMENT = {"GOMP_SPINCOUNT": "1000"}


def configure_process() -> None:
    """Set THREAD_ENVIRONMENT defaults; call before torch or numba is imported."""
    if "torch" in sys.modules:
        log.debug("torch already imported: GOMP_SPINCOUNT may not take effect in this process")
    for name, value in THREAD_ENVIRONMENT.items():
        os.environ.setdefault(name, value)


def thread_environment() -> dict[str, str]:
    """The thread settings in effect, for processes started elsewhere (Ray workers on other nodes)."""
    return {name: os.environ.get(name, value) for name, value in THREAD_ENVIRONMENT.items()}


def set_num_threads(count) -> None:
    """torch's intra-op threads, which the numba kernels follow (methods/fused.py)."""
    if count:
        import torch

        torch.set_num_threads(int(count))
