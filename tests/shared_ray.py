"""One real local Ray cluster per test process, joined by the searches that do not test a cluster's
own life (start, kill, cleanup). Starting a private cluster costs a search about 4 s and 2-3
CPU-seconds on the 2-core machine (gcs, raylet and five Python helpers start and stop); the suite
runs dozens of searches. Joining an existing cluster is a path users take too (`RAY_ADDRESS`,
`ray job submit`). `test_search.run_evolve` joins it unless called with `shared=False`; the
private-cluster path keeps its own tests: test_cluster.py, test_worker_memory.py, the drivers the
fault tests kill or signal, and every search a test starts without `run_evolve`.

In a test: `address()` starts the cluster on first use and returns its address. The cluster is a
`RayCluster` held by this file run as a script, so it inherits that class's guarantee: when the
holder exits (its stdin, a pipe from the test process, reaches EOF: the test process ended, however)
or is killed, no process of the cluster is left.
"""

from __future__ import annotations

import atexit
import subprocess
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
_holder: subprocess.Popen | None = None
_address: str | None = None


def address() -> str:
    """The GCS address of this test process's shared cluster (2 CPUs), started on first use."""
    global _holder, _address
    if _address is None:
        _holder = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = _holder.stdout.readline().strip()
        if not line.startswith("address "):
            _holder.kill()
            raise RuntimeError(f"the shared Ray cluster did not start: {line!r}")
        _address = line.split(" ", 1)[1]
        atexit.register(_stop)
    return _address


def _stop() -> None:
    if _holder is not None and _holder.poll() is None:
        _holder.stdin.close()
        try:
            _holder.wait(timeout=60)
        except subprocess.TimeoutExpired:
            _holder.kill()


if __name__ == "__main__":
    sys.path.insert(0, str(_ROOT))
    import os

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from evolve.cluster import RayCluster

    with RayCluster(num_cpus=2, quiet=True):
        print("address", ray.get_runtime_context().gcs_address, flush=True)
        sys.stdin.read()  # until the test process closes the pipe or dies
