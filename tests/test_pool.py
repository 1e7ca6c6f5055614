"""The Ray worker pool on a real local Ray cluster, with faults injected into real actor
processes: killed mid-evaluation, dying on every attempt, hanging, failing to start."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from evolve.pool import PoolError, WorkerPool, WorkerSpec

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # a real local Ray cluster

TESTS = str(Path(__file__).parent)


@pytest.fixture(scope="module")
def ray_cluster():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def spec(control: Path, **kwargs) -> WorkerSpec:
    from pool_actors import ScriptedWorker

    return WorkerSpec(ScriptedWorker, (str(control), kwargs.pop("start_failures", 0)), num_cpus=1,
                      env={"PYTHONPATH": TESTS}, **kwargs)


def wait_for(predicate, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def drain(pool) -> dict:
    results = {}
    while len(results) < pool_expected(pool):
        for key, result, attempts in pool.wait():
            results[key] = (result, attempts)
    return results


def pool_expected(pool) -> int:
    return pool._expected


def submit_all(pool, payloads):
    pool._expected = len(payloads)
    for p in payloads:
        pool.submit(p["name"], p)


def test_a_worker_killed_mid_evaluation_is_replaced_and_its_candidate_retried(ray_cluster, tmp_path):
    pool = WorkerPool(spec(tmp_path), 2)
    pool.start()
    assert pool.info["directions"] == {"value": "maximize"}
    submit_all(pool, [{"name": f"c{i}", "value": float(i), "hold": True} for i in range(3)])
    running = wait_for(lambda: sorted(tmp_path.glob("running-*")) if len(list(tmp_path.glob("running-*"))) == 2 else None,
                       "two candidates running")
    victim = running[0].name.split("-")
    os.kill(int(victim[2]), signal.SIGKILL)
    wait_for(lambda: not _alive(int(victim[2])), "the killed worker to be gone")
    (tmp_path / "release").touch()
    results = drain(pool)
    # the replacement starts in the background (the retry may already have run on the other worker)
    wait_for(lambda: len((tmp_path / "starts").read_text().split()) == 3, "the replacement worker to start")
    pool.shutdown()
    assert {k: r["metrics"]["value"] for k, (r, _) in results.items()} == {"c0": 0.0, "c1": 1.0, "c2": 2.0}
    assert all(r["status"] == "complete" for r, _ in results.values())
    assert results[victim[1]][1] == 2  # retried once, on another worker process
    assert results[victim[1]][0]["pid"] != int(victim[2])
    assert [a for k, (_, a) in sorted(results.items()) if k != victim[1]] == [1, 1]
    assert (pool.stats.retried, pool.stats.replaced, pool.stats.timed_out) == (1, 1, 0)


def test_a_candidate_that_kills_every_worker_fails_after_two_attempts(ray_cluster, tmp_path):
    pool = WorkerPool(spec(tmp_path), 2)
    pool.start()
    submit_all(pool, [{"name": "bad", "value": 0.0, "die": True}, {"name": "ok", "value": 1.0}])
    results = drain(pool)
    bad, attempts = results["bad"]
    assert bad["status"] == "failed" and attempts == 2 and "worker died 2 times" in bad["error"]
    assert results["ok"][0]["status"] == "complete"
    assert (pool.stats.retried, pool.stats.replaced) == (1, 2)
    # the pool is whole again: both replacements take work
    submit_all(pool, [{"name": f"after{i}", "value": float(i)} for i in range(4)])
    assert all(r["status"] == "complete" for r, _ in drain(pool).values())
    pool.shutdown()


def test_a_hanging_candidate_is_cancelled_after_the_timeout(ray_cluster, tmp_path):
    pool = WorkerPool(spec(tmp_path), 1, timeout=3.0)
    pool.start()
    submit_all(pool, [{"name": "stuck", "value": 0.0, "hold": True}, {"name": "next", "value": 1.0}])
    results = drain(pool)
    # The held evaluation would only return on its own (as "complete") after 120 s: the pool cut
    # it off instead. Its worker process is killed while the pool is still up, and the next
    # candidate ran on the replacement, not on the stuck worker.
    stuck_pid = int(next(tmp_path.glob("running-stuck-*")).name.split("-")[2])
    wait_for(lambda: not _alive(stuck_pid), "the stuck worker to be killed")
    pool.shutdown()
    assert results["stuck"][0] == {"status": "failed", "error": "timed out after 3 s"}
    assert results["next"][0]["status"] == "complete" and results["next"][0]["pid"] != stuck_pid
    assert (pool.stats.timed_out, pool.stats.replaced, pool.stats.retried) == (1, 1, 0)


def test_a_worker_that_cannot_start_is_a_clear_error_not_a_hang(ray_cluster, tmp_path):
    pool = WorkerPool(spec(tmp_path, start_failures=100), 1, max_start_failures=3)
    with pytest.raises(PoolError, match="failed to start 3 times in a row.*cannot load the inputs"):
        pool.start()
    assert len((tmp_path / "starts").read_text().split()) == 3
    pool.shutdown()


def test_one_failed_start_is_retried(ray_cluster, tmp_path):
    pool = WorkerPool(spec(tmp_path, start_failures=1), 2)
    pool.start()
    assert pool.stats.start_failures == 1
    submit_all(pool, [{"name": "a", "value": 1.0}, {"name": "b", "value": 2.0}])
    assert {k: r["metrics"]["value"] for k, (r, _) in drain(pool).items()} == {"a": 1.0, "b": 2.0}
    pool.shutdown()
