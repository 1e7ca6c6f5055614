"""A search worker: one resident model, merged in place per candidate, then scored.

`CandidateWorker` is plain Python; the search runs it as a Ray actor (see evolve.pool). Which
evaluator scores the model is data (`WorkerSettings.evaluator`, see evaluators.EVALUATORS): the
worker does not know. A candidate that fails (non-finite weights, an evaluator error) comes back
as a failed result with its reason: it never raises into the driver.

A candidate that fails because memory ran out (`is_out_of_memory`: MemoryError, torch's
OutOfMemoryError, an allocator's "can't allocate memory") is reported with `fault: "memory"`: the
failure says nothing about the recipe, and the worker's resident model may be half-written, so the
pool replaces the worker and retries the candidate (see evolve.pool) instead of recording it failed.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Optional

from merge_engine.options import MergeOptions

from . import Status
from .descent import DescentRequest

log = logging.getLogger(__name__)


@dataclass
class WorkerSettings:
    template_recipe: dict  # a decoded recipe: fixes the models, method and layer layout
    evaluator: dict  # {"kind": ..., **options}: see evaluators.build_evaluator
    merge_options: MergeOptions  # the resident merges' options; num_threads: this worker's threads
    eval_dtype: Optional[str] = None  # None: float32 on CPU (bf16 maths is slow there), bfloat16 on GPU


@dataclass(frozen=True)
class RaceRequest:
    """Score the candidate stage by stage against the best complete candidate (evaluators.racing)."""

    best_items: Optional[dict]  # that candidate's per-item values, task -> values (None: nothing to beat yet)
    weights: dict  # task -> signed weight of the fitness
    fractions: tuple  # the stage boundaries
    z: float  # the stopping rule's confidence


@dataclass(frozen=True)
class CandidateRequest:
    """What the driver sends a worker for one candidate (evolve.pool_runner)."""

    recipe: dict  # the decoded recipe, as plain data
    race: Optional[RaceRequest] = None
    descent: Optional[DescentRequest] = None  # gradient steps to take after scoring (evaluators.descent)


@dataclass
class CandidateResult:
    status: Status  # racing: STOPPED when scored on the first stages' items only
    metrics: dict
    merge_s: float
    eval_s: float
    recomputed: int = 0
    error: Optional[str] = None
    worker: str = ""
    items: int = 0  # items scored
    # racing: per-item values (task -> values in stage order) on the items scored when stopped,
    # else on every stage but the last: what later candidates are paired with if this one is the
    # best (see evaluators.racing); `stage`: the stage after which a stopped candidate stopped
    first_items: Optional[dict] = None
    stage: Optional[int] = None
    # "memory": the candidate failed because memory ran out, not because of its recipe; this
    # worker's state is not to be trusted any more (read by evolve.pool: replace, retry)
    fault: Optional[str] = None
    # a complete candidate's per-item values (result key -> values in the evaluator's item order),
    # when every metric is a mean over items (what the export rule pairs, evolve.selection)
    item_values: Optional[dict] = None
    # a gradient search's candidate: where the gradient steps after its scoring ended
    # (evaluators.descent.DescentResult.to_plain)
    descent: Optional[dict] = None


# What allocators say when they fail: torch's CPU allocator ("DefaultCPUAllocator: can't allocate
# memory" / "not enough memory"), CUDA ("CUDA out of memory", "CUDA error: out of memory",
# CUBLAS_STATUS_ALLOC_FAILED), errno 12 ("Cannot allocate memory"), C++ std::bad_alloc.
_MEMORY_MESSAGES = ("can't allocate memory", "cannot allocate memory", "not enough memory", "out of memory",
                    "alloc_failed", "bad_alloc")


def is_out_of_memory(err: Optional[BaseException]) -> bool:
    """Whether `err`, or an exception it was raised from, says memory ran out: MemoryError, any
    `OutOfMemoryError` (torch's, on CUDA; Ray's), or a RuntimeError with an allocator's message.
    Follows `__cause__`, `__context__` and Ray's `cause` (a task error wrapping the worker's)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
            return True
        if isinstance(err, RuntimeError) and any(m in str(err).lower() for m in _MEMORY_MESSAGES):
            return True
        cause = getattr(err, "cause", None)  # ray.exceptions.RayTaskError
        if not isinstance(cause, BaseException):
            cause = err.__cause__ if err.__cause__ is not None else (None if err.__suppress_context__ else err.__context__)
        err = cause
    return False


def _ray_node_suffix() -> str:
    """`@<Ray node id>` inside a Ray worker (several nodes may share a host name), else ''."""
    try:
        import ray

        return f"@{ray.get_runtime_context().get_node_id()[:12]}" if ray.is_initialized() else ""
    except Exception:  # not in Ray
        return ""


class CandidateWorker:
    def __init__(self, settings: WorkerSettings):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        import torch
        from transformers import AutoTokenizer

        from evaluators import build_evaluator
        from merge_engine.config import parse_config
        from merge_engine.resident import ResidentMerger
        from merge_engine.threads import set_num_threads

        set_num_threads(settings.merge_options.num_threads)
        self.settings = settings
        template = parse_config(settings.template_recipe, "search template")
        self.merger = ResidentMerger(template, settings.merge_options)
        device = self.merger.device
        if settings.eval_dtype:
            dtype = getattr(torch, settings.eval_dtype)
        else:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.model = self.merger.build_model(template, dtype=dtype)
        # Read every input and form the task vectors now, at start-up, not inside the first
        # candidate's time: the starting recipe uses every model the search will.
        # Checked: a starting recipe with non-finite weights (a broken input) stops the worker here,
        # in one line naming the tensor, instead of scoring a broken model as a candidate.
        self.merger.apply(template, check_finite=True)
        # with tokenizer merging the candidates are run with the merged tokenizer, else the donor's
        vocab = self.merger.vocab(template)
        if vocab is not None and vocab.tokenizer is not None:
            self.tokenizer = vocab.tokenizer
        else:
            self.tokenizer = AutoTokenizer.from_pretrained(self.merger.models[self.merger.donor].directory)
        self.evaluator = build_evaluator(settings.evaluator)
        self.evaluator.attach(self.model, self.tokenizer)
        self.name = f"{os.uname().nodename}:{os.getpid()}{_ray_node_suffix()}"
        self.descent = None  # evaluators.descent.Descent, built by the first gradient request

    @staticmethod
    def _no_grad():
        import torch

        return torch.no_grad()

    def ready(self) -> dict:
        """Called once by the pool when the worker is up."""
        return {"directions": dict(self.evaluator.directions), "worker": self.name, "pid": os.getpid()}

    def evaluate(self, request: CandidateRequest | dict) -> dict:
        """Merge and score one candidate: a CandidateRequest, or a bare recipe (plain data) to
        score it plainly."""
        from merge_engine.config import parse_config

        if isinstance(request, dict):
            request = CandidateRequest(request)
        payload, race, descent = request.recipe, request.race, request.descent
        start = time.perf_counter()
        merge_s = 0.0
        try:
            config = parse_config(payload, "candidate")
            stats = self.merger.apply(config, check_finite=True)
            merge_s = time.perf_counter() - start
            t_eval = time.perf_counter()
            stage, first = None, None
            with self._no_grad():
                if descent is not None and not descent.score:
                    metrics = {}  # known already: the driver reuses the identical recipe's scores
                elif race is None:
                    metrics = self.evaluator.evaluate()
                else:
                    metrics, stage, first = self.evaluator.evaluate_raced(
                        race.weights, race.best_items, race.fractions, race.z)
            eval_s = time.perf_counter() - t_eval
            status = Status.COMPLETE if stage is None else Status.STOPPED
            scored = descent is None or descent.score
            result = CandidateResult(status, metrics, merge_s, eval_s, stats.recomputed, worker=self.name,
                                     items=getattr(self.evaluator, "evaluated_items", 0) if scored else 0,
                                     first_items=first, stage=stage,
                                     item_values=getattr(self.evaluator, "item_values", None) if stage is None and scored else None)
            if descent is not None:
                from .descent import Descent

                self.descent = self.descent or Descent(self.merger, self.evaluator)
                result.descent = self.descent.run(config, descent).to_plain()
            return asdict(result)
        except Exception as err:  # a failed candidate is data, not a crash
            memory = is_out_of_memory(err)
            if not memory:  # formatting a traceback allocates: not while memory is short
                log.debug("candidate failed: %s", traceback.format_exc())
            return asdict(
                CandidateResult(
                    Status.FAILED, {}, merge_s, time.perf_counter() - start - merge_s,
                    error=f"{type(err).__name__}: {err}", worker=self.name, fault="memory" if memory else None,
                )
            )
