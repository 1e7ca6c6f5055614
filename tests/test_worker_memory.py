"""Workers that run out of memory mid-candidate, on a real local Ray cluster: the worker is
replaced, the candidate retried on the fresh one, and the reason ("memory") kept with the result.

- scripted: small actors (tests/pool_actors.py) whose payload raises MemoryError or meets a real
  torch allocation failure, reported the way CandidateWorker reports it or raised out of the call;
- a real CandidateWorker over tiny models whose process is given an address-space limit
  (RLIMIT_AS, set from this process) just above its current size: the evaluator's tensor cannot
  be allocated there, and can on the replacement, which has no limit;
- Ray's own memory monitor killing the worker (a cluster started with a low kill threshold):
  Ray 2.60 raises `ray.exceptions.OutOfMemoryError` for the call, which is not a RayActorError.
"""

from __future__ import annotations

import logging
import os
import resource
import time
from pathlib import Path

import pytest

from evolve.pool import WorkerPool, WorkerSpec

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TESTS = str(Path(__file__).parent)
GiB = 2**30


def wait_for(predicate, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _meminfo(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


@pytest.fixture(scope="module")
def ray_cluster(request):
    """A local cluster per kind (param): "plain", or "memory monitor": Ray's memory monitor set to
    kill a busy worker once the node uses 2 GiB more than it did at start-up."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    settings = {}
    if request.param == "memory monitor":
        total, available = _meminfo("MemTotal"), _meminfo("MemAvailable")
        if available < 10 * GiB:
            pytest.skip("needs 10 GiB of available memory for the memory monitor's margin")
        threshold = (total - available + 2 * GiB) / total
        settings = {"RAY_memory_usage_threshold": f"{threshold:.4f}", "RAY_memory_monitor_refresh_ms": "100"}
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)  # read by the raylet when ray.init starts it
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    yield ray
    ray.shutdown()


plain = pytest.mark.parametrize("ray_cluster", ["plain"], indirect=True)


def scripted(control: Path, size: int = 1, **kwargs) -> WorkerPool:
    from pool_actors import MemoryFaultWorker

    pool = WorkerPool(WorkerSpec(MemoryFaultWorker, (str(control),), num_cpus=1, env={"PYTHONPATH": TESTS}), size,
                      **kwargs)
    pool.start()
    return pool


def run_all(pool: WorkerPool, payloads: list[dict]) -> dict:
    for p in payloads:
        pool.submit(p["name"], p)
    results = {}
    while len(results) < len(payloads):
        for key, result, attempts in pool.wait():
            results[key] = (result, attempts)
    return results


def attempt_pids(control: Path, name: str) -> set[int]:
    return {int(p.name.rsplit("-", 1)[1]) for p in control.glob(f"attempt-{name}-*")}


def test_what_counts_as_out_of_memory():
    import torch

    from evaluators.worker import is_out_of_memory

    def raised(make):
        try:
            make()
        except Exception as err:
            return err

    def wrapped():
        try:
            raise MemoryError()
        except MemoryError as err:
            raise ValueError("the scorer failed") from err

    assert is_out_of_memory(raised(lambda: torch.empty(2**62, dtype=torch.uint8)))  # the CPU allocator's RuntimeError
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert is_out_of_memory(raised(wrapped))
    assert not is_out_of_memory(RuntimeError("this scorer always fails"))
    assert not is_out_of_memory(ValueError("out of memory"))  # only a runtime error's message counts
    assert not is_out_of_memory(None)


@plain
@pytest.mark.parametrize("how", ["MemoryError", "torch"])
@pytest.mark.parametrize("raised", [False, True], ids=["reported", "raised"])
def test_a_candidate_out_of_memory_is_retried_on_a_fresh_worker(ray_cluster, tmp_path, how, raised):
    pool = scripted(tmp_path)
    first = pool.info["pid"]
    results = run_all(pool, [{"name": "c", "script": [how], "raise": raised}])
    (result, attempts), = results.values()
    assert result["status"] == "complete" and result["faults"] == ["memory"] and attempts == 2
    assert attempt_pids(tmp_path, "c") == {first, result["pid"]} and result["pid"] != first
    wait_for(lambda: not _alive(first), "the worker that ran out of memory to be killed")
    assert (pool.stats.out_of_memory, pool.stats.retried, pool.stats.replaced) == (1, 1, 1)
    pool.shutdown()


@plain
def test_faults_are_kept_in_order_and_an_ordinary_failure_keeps_its_worker(ray_cluster, tmp_path):
    pool = scripted(tmp_path, max_attempts=3)
    first = pool.info["pid"]
    results = run_all(pool, [{"name": "ordinary", "script": ["RuntimeError"]}])
    ordinary, attempts = results["ordinary"]
    # not a worker fault: failed once, no retry, no "faults", the same worker takes the next payload
    assert ordinary["status"] == "failed" and "faults" not in ordinary and attempts == 1 and ordinary["pid"] == first
    results = run_all(pool, [{"name": "mixed", "script": ["die", "torch"]},
                             {"name": "always", "script": ["MemoryError"] * 3, "raise": True}])
    mixed, attempts = results["mixed"]
    assert mixed["status"] == "complete" and mixed["faults"] == ["died", "memory"] and attempts == 3
    assert len(attempt_pids(tmp_path, "mixed")) == 3  # a process per attempt
    always, attempts = results["always"]
    assert always["status"] == "failed" and always["faults"] == ["memory"] * 3 and attempts == 3
    assert always["error"].startswith("out of memory 3 times: ") and "MemoryError" in always["error"]
    assert (pool.stats.out_of_memory, pool.stats.retried, pool.stats.replaced) == (4, 4, 5)
    pool.shutdown()


def _vm_size(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise KeyError("VmSize")


def _address_space_limit(pid: int) -> str:
    line = next(l for l in Path(f"/proc/{pid}/limits").read_text().splitlines() if l.startswith("Max address space"))
    return line.split()[3]  # the soft limit


@plain
def test_a_real_worker_under_a_memory_limit_is_replaced_and_its_candidate_completes(ray_cluster, llama_models,
                                                                                     tmp_path, caplog):
    from evaluators.worker import CandidateWorker, WorkerSettings
    from merge_engine.options import MergeOptions

    def linear(wa: float) -> dict:
        return {"merge_method": "linear", "dtype": "float32",
                "models": [{"model": str(llama_models["a"]), "parameters": {"weight": wa}},
                           {"model": str(llama_models["b"]), "parameters": {"weight": 1 - wa}}]}

    settings = WorkerSettings(
        template_recipe=linear(0.5),
        evaluator={"kind": "python", "function": "pool_actors:allocating_scorer",
                   "options": {"control": str(tmp_path), "mib": 1024}},
        merge_options=MergeOptions(device="cpu", quiet=True, num_threads=1),
    )
    pool = WorkerPool(WorkerSpec(CandidateWorker, (settings,), num_cpus=1, env={"PYTHONPATH": TESTS}), 1)
    pool.start()
    limited = pool.info["pid"]
    # the worker may map 256 MiB more than it has now (the merge and the call need a little), not
    # the evaluator's 1 GiB tensor
    limit = _vm_size(limited) + 256 * 2**20
    resource.prlimit(limited, resource.RLIMIT_AS, (limit, limit))
    assert _address_space_limit(limited) == str(limit)
    with caplog.at_level(logging.WARNING, logger="evolve.pool"):
        results = run_all(pool, [{"name": "c", **linear(0.25)}])
    (result, attempts), = results.values()
    fresh = int(result["worker"].split(":")[1].split("@")[0])
    assert result["status"] == "complete" and result["faults"] == ["memory"] and attempts == 2, result
    assert fresh != limited and _address_space_limit(fresh) == "unlimited"
    # the first attempt got as far as the evaluator's allocation in the limited process, and failed there
    assert (tmp_path / f"scoring-{limited}").exists() and (tmp_path / f"scoring-{fresh}").exists()
    warning, = [r.getMessage() for r in caplog.records if "worker fault (memory)" in r.getMessage()]
    assert "DefaultCPUAllocator" in warning, warning
    wait_for(lambda: not _alive(limited), "the limited worker to be killed")
    assert (pool.stats.out_of_memory, pool.stats.retried, pool.stats.replaced) == (1, 1, 1)
    pool.shutdown()


@pytest.mark.parametrize("ray_cluster", ["memory monitor"], indirect=True)
def test_a_worker_killed_by_rays_memory_monitor_is_replaced_and_its_candidate_retried(ray_cluster, tmp_path, caplog):
    pool = scripted(tmp_path, size=1)
    first = pool.info["pid"]
    # the first attempt allocates until Ray kills it (at most 6 GiB: 4 past the kill threshold)
    with caplog.at_level(logging.WARNING, logger="evolve.pool"):
        results = run_all(pool, [{"name": "c", "script": ["hog"], "hog_cap_mib": 6144}])
    (result, attempts), = results.values()
    assert "survived" not in result, "the memory monitor did not kill the worker"
    assert result["status"] == "complete" and result["faults"] == ["memory"] and attempts == 2, result
    assert result["pid"] != first and attempt_pids(tmp_path, "c") == {first, result["pid"]}
    wait_for(lambda: not _alive(first), "the killed worker to be gone")
    warning, = [r.getMessage() for r in caplog.records if "worker fault (memory)" in r.getMessage()]
    assert "OutOfMemoryError: 1 worker(s) were killed due to the node running low on memory" in warning, warning
    assert (pool.stats.out_of_memory, pool.stats.retried, pool.stats.replaced) == (1, 1, 1)
    pool.shutdown()
