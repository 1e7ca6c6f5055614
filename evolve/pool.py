"""A pool of Ray actors that evaluate candidates, and survives the faults of long cluster runs.

- One call in flight per worker: a free worker gets the next queued payload at once, so no worker
  waits for another (there is no generation barrier anywhere in the pool).
- A worker that dies (killed, out of memory, its node lost) is replaced by a fresh actor; the
  payload it was running is retried once on another worker (`max_attempts`), and only then
  reported failed, with the reason. The caller's budget counts payloads, not attempts.
- A call that runs past `timeout` seconds (a stuck evaluator) is cancelled by killing its actor,
  which is replaced; the payload is reported failed ("timed out"), not retried.
- A worker that cannot start (e.g. out of memory loading the inputs) is retried a bounded number
  of times (`max_start_failures` in a row), then `PoolError` says why: never a hang.

The actor class is plain Python with two methods: `ready()` (called once after start-up, its value
is kept as `pool.info`) and `evaluate(payload) -> dict`. The pool knows nothing of merges.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Hashable, Optional

from merge_engine.errors import RunFailure

log = logging.getLogger(__name__)


class PoolError(RunFailure):
    """Workers cannot be started."""


@dataclass(frozen=True)
class WorkerSpec:
    actor_class: type
    args: tuple = ()
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    env: dict = field(default_factory=dict)  # environment variables of the worker processes


@dataclass
class PoolStats:
    retried: int = 0  # payloads started again after their worker died
    replaced: int = 0  # workers started to replace dead or cancelled ones
    timed_out: int = 0
    start_failures: int = 0


@dataclass
class _Job:
    key: Hashable
    payload: Any
    attempts: int = 0
    started: float = 0.0


class WorkerPool:
    def __init__(self, spec: WorkerSpec, size: int, timeout: Optional[float] = None, max_attempts: int = 2,
                 max_start_failures: int = 3):
        self.spec = spec
        self.capacity = size
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.max_start_failures = max_start_failures
        self.stats = PoolStats()
        self.info: Any = None  # the first worker's ready() value
        self._actor = None
        self._starting: dict = {}  # ready() ref -> actor
        self._idle: list = []
        self._running: dict = {}  # evaluate() ref -> (actor, job)
        self._queue: deque[_Job] = deque()
        self._failures_in_a_row = 0
        self._last_start_error = ""

    # -- workers ----------------------------------------------------------------------------------

    def _start_worker(self) -> None:
        import ray

        if self._actor is None:
            options = {"num_cpus": self.spec.num_cpus, "num_gpus": self.spec.num_gpus, "max_restarts": 0}
            if self.spec.env:
                options["runtime_env"] = {"env_vars": dict(self.spec.env)}
            self._actor = ray.remote(**options)(self.spec.actor_class)
        actor = self._actor.remote(*self.spec.args)
        self._starting[actor.ready.remote()] = actor

    def start(self) -> None:
        """Start every worker and wait until all are ready."""
        for _ in range(self.capacity):
            self._start_worker()
        while self._starting:
            self._wait_once(None)

    def _kill(self, actor) -> None:
        import ray

        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # already gone
            pass

    def _replace(self, actor) -> None:
        self._kill(actor)
        self.stats.replaced += 1
        self._start_worker()

    # -- payloads ---------------------------------------------------------------------------------

    def submit(self, key: Hashable, payload: Any) -> None:
        self._queue.append(_Job(key, payload))
        self._dispatch()

    def _dispatch(self) -> None:
        while self._idle and self._queue:
            actor, job = self._idle.pop(0), self._queue.popleft()
            job.attempts += 1
            job.started = time.monotonic()
            self._running[actor.evaluate.remote(job.payload)] = (actor, job)

    def wait(self) -> list[tuple[Hashable, dict, int]]:
        """Block until at least one payload is done: [(key, result, attempts)]. A failed payload's
        result is {"status": "failed", "error": ...}."""
        if not self._running and not self._queue:
            return []
        done: list = []
        while not done:
            self._wait_once(done)
        return done

    def _wait_once(self, done: Optional[list]) -> None:
        import ray

        refs = list(self._starting) + list(self._running)
        wait_s = None
        if self.timeout is not None and self._running:
            first_deadline = min(job.started for _, job in self._running.values()) + self.timeout
            wait_s = max(first_deadline - time.monotonic(), 0.0)
        ready, _ = ray.wait(refs, num_returns=1, timeout=wait_s)
        if ready:  # take everything else that is already done too
            more, _ = ray.wait([r for r in refs if r != ready[0]], num_returns=len(refs) - 1, timeout=0) if len(refs) > 1 else ([], [])
            ready = ready + more
        for ref in ready:
            if ref in self._starting:
                self._started(ref)
            else:
                self._finished(ref, done)
        if self.timeout is not None:
            self._cancel_overdue(done)
        self._dispatch()

    def _started(self, ref) -> None:
        import ray

        actor = self._starting.pop(ref)
        try:
            info = ray.get(ref)
        except Exception as err:  # the actor could not be built
            self.stats.start_failures += 1
            self._failures_in_a_row += 1
            self._last_start_error = _one_line(err)
            self._kill(actor)
            if self._failures_in_a_row >= self.max_start_failures:
                raise PoolError(
                    f"a worker failed to start {self._failures_in_a_row} times in a row; last error: {self._last_start_error}"
                ) from None
            log.warning("a worker failed to start (%s); starting another", self._last_start_error)
            self._start_worker()
            return
        self._failures_in_a_row = 0
        if self.info is None:
            self.info = info
        self._idle.append(actor)

    def _finished(self, ref, done: Optional[list]) -> None:
        import ray

        actor, job = self._running.pop(ref)
        try:
            result = ray.get(ref)
        except ray.exceptions.RayActorError as err:  # the worker process is gone
            log.warning("worker died while evaluating candidate %s: %s", job.key, _one_line(err))
            self._replace(actor)
            if job.attempts < self.max_attempts:
                self.stats.retried += 1
                self._queue.appendleft(job)
                return
            result = {"status": "failed", "error": f"worker died {job.attempts} times: {_one_line(err)}"}
        except Exception as err:  # the evaluation raised: the worker itself is fine
            result = {"status": "failed", "error": _one_line(err)}
            self._idle.append(actor)
        else:
            self._idle.append(actor)
        if done is not None:
            done.append((job.key, result, job.attempts))

    def _cancel_overdue(self, done: Optional[list]) -> None:
        now = time.monotonic()
        for ref, (actor, job) in list(self._running.items()):
            if now - job.started >= self.timeout:
                del self._running[ref]
                self.stats.timed_out += 1
                log.warning("candidate %s timed out after %.0f s; its worker is replaced", job.key, self.timeout)
                self._replace(actor)
                if done is not None:
                    done.append((job.key, {"status": "failed", "error": f"timed out after {self.timeout:g} s"}, job.attempts))

    def shutdown(self) -> None:
        import ray

        if not ray.is_initialized():  # the cluster is gone already (and a Ray call would start a new one)
            self._idle, self._starting, self._running = [], {}, {}
            return
        for actor in [*self._idle, *self._starting.values(), *(a for a, _ in self._running.values())]:
            self._kill(actor)
        self._idle, self._starting, self._running = [], {}, {}


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    # Ray's errors carry the remote traceback; its last line names the cause
    return f"{type(err).__name__}: {text[-1] if text else ''}"[:500]
