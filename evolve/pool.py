"""A pool of Ray actors that evaluate candidates, and survives the faults of long cluster runs.

- One call in flight per worker: a free worker gets the next queued payload at once, so no worker
  waits for another (there is no generation barrier anywhere in the pool).
- A worker fault ends the worker, not the payload: the worker is replaced by a fresh actor and the
  payload retried (on whichever worker is free first) until it has been tried `max_attempts` times
  (default 2), and only then reported failed. The faults, each recorded as its reason:
  - "died": the worker process is gone (killed, crashed, its node lost; a kernel OOM kill is a
    SIGKILL like any other and is recorded as this);
  - "memory": Ray's memory monitor killed the worker because the node ran short
    (`ray.exceptions.OutOfMemoryError`, which is not a `RayActorError`), the call raised an
    out-of-memory error (MemoryError, torch's OutOfMemoryError, an allocator's "can't allocate
    memory"), or the worker returned `fault: "memory"` (see the result keys below).
  The caller's budget counts payloads, not attempts.
- A call that runs past `timeout` seconds (a stuck evaluator) is cancelled by killing its actor,
  which is replaced; the payload is reported failed ("timed out"), not retried.
- Any other exception raised by a call is the payload's failure: reported failed, not retried; the
  worker is kept.
- A worker that cannot start (e.g. out of memory loading the inputs) is retried a bounded number
  of times (`max_start_failures` in a row), then `PoolError` says why: never a hang.

The actor class is plain Python with two methods: `ready()` (called once after start-up, its value
is kept as `pool.info`) and `evaluate(payload) -> dict`. The pool knows nothing of merges; of the
result dict it reads only:
- "status": passed through ("failed" for the results the pool makes itself);
- "fault" (optional, absent or None for an ordinary result): the worker says the payload failed
  for a reason of the worker's, not the payload's, and that its own state is not to be trusted
  (evaluators.worker uses "memory"): the worker is replaced and the payload retried as above.
and it adds:
- "faults": the reasons of the faults this payload met, one per attempt lost, in order (e.g.
  ["memory"], ["died", "memory"]); present only when there was one, also when a retry completed;
- "error", in the failed results it makes itself (a fault on the last attempt, a timeout).
`wait()` gives (key, result, attempts) with attempts counting every try, the faulted ones too.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Hashable, Optional

from evaluators import Status
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
    retried: int = 0  # payloads started again after a worker fault
    replaced: int = 0  # workers started to replace dead, faulted or cancelled ones
    timed_out: int = 0
    start_failures: int = 0
    out_of_memory: int = 0  # attempts lost to memory (fault "memory")


# how a failed result made by the pool names the reason when every attempt met the same fault
_FAULT_TEXT = {"died": "worker died", "memory": "out of memory"}


@dataclass
class _Job:
    key: Hashable
    payload: Any
    attempts: int = 0
    started: float = 0.0
    faults: list = field(default_factory=list)  # the reason of each attempt lost to a worker fault


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

        from evaluators.worker import is_out_of_memory

        actor, job = self._running.pop(ref)
        result, fault, error = None, None, ""
        try:
            result = ray.get(ref)
        except ray.exceptions.OutOfMemoryError as err:  # Ray's memory monitor killed the worker
            # its first line names the node and its usage (the last is advice on settings)
            fault, error = "memory", f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:400]}"
        except ray.exceptions.RayActorError as err:  # the worker process is gone
            fault, error = ("memory" if "running low on memory" in str(err) else "died"), _one_line(err)
        except Exception as err:  # the evaluation raised
            if is_out_of_memory(err):  # raised out of the actor: its state is not to be trusted
                fault, error = "memory", _one_line(err)
            else:  # the payload's failure: the worker itself is fine
                result = {"status": Status.FAILED, "error": _one_line(err)}
        else:
            if isinstance(result, dict) and result.get("fault") is not None:
                fault, error = str(result["fault"]), str(result.get("error") or "")
        if fault is None:
            self._idle.append(actor)
        else:
            job.faults.append(fault)
            if fault == "memory":
                self.stats.out_of_memory += 1
            log.warning("candidate %s: worker fault (%s) on attempt %d: %s; the worker is replaced", job.key, fault,
                        job.attempts, error.splitlines()[0] if error else "")
            self._replace(actor)
            if job.attempts < self.max_attempts:
                self.stats.retried += 1
                self._queue.appendleft(job)
                return
            if result is None:
                kinds = set(job.faults)
                reason = _FAULT_TEXT.get(fault, f"worker fault {fault}") if len(kinds) == 1 else \
                    f"worker failed ({', '.join(job.faults)})"
                result = {"status": Status.FAILED, "error": f"{reason} {job.attempts} times: {error}"}
        if job.faults:
            result["faults"] = list(job.faults)
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
                    done.append((job.key, {"status": Status.FAILED, "error": f"timed out after {self.timeout:g} s"}, job.attempts))

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
