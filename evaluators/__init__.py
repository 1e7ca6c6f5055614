"""Scoring a resident model: the `Evaluator` protocol, its registry, and the search worker.

An evaluator is built once per worker from a spec (`{"kind": <registry name>, **options}`), is
attached to the worker's resident model once, and then scores the model as it is at each call.

    attach(model, tokenizer) -> None     keep references; the model's weights change in place
    evaluate() -> {metric name: value}   score the model as it is now
    evaluate_raced(weights, best, fractions, z) -> (metrics, stopped after stage, per-item values)
                                         score stage by stage against the best so far (evaluators.racing)
    directions                           {metric name: "maximize" | "minimize"}

Registered kinds (`EVALUATORS`): `lm_eval` (lm-eval tasks, evaluators.lm_eval_tasks) and
`python` (any importable callable `fn(model, tokenizer) -> dict`, evaluators.python_callable).
Adding one = a class with those four members + one registry line. This module imports neither
torch nor lm-eval.

A gradient search (evolve.gradient) also has the worker take gradient steps after scoring:
evaluators.descent (the steps, Adam, the chain rule through the genome's decoding) over the loss
of evaluators.gradient_loss (lm-eval's items, differentiable); only `lm_eval` evaluators have it.
"""

from __future__ import annotations

import importlib
from enum import StrEnum
from typing import Optional, Protocol, Sequence, runtime_checkable


class Status(StrEnum):
    """What became of one candidate's evaluation (the worker's result, the driver's Outcome, the
    study's `status` attribute, the re-scoring table: the same strings everywhere)."""

    COMPLETE = "complete"
    FAILED = "failed"
    STOPPED = "stopped"  # racing: scored on some stages' items only (evaluators.racing)
    PENDING = "pending"  # re-scoring: not scored yet (evolve.rescore)

    @property
    def scored(self) -> bool:
        """It has a fitness: complete, or stopped early with the paired estimate."""
        return self in (Status.COMPLETE, Status.STOPPED)


@runtime_checkable
class Evaluator(Protocol):
    directions: dict[str, str]

    def attach(self, model, tokenizer) -> None: ...

    def evaluate(self) -> dict[str, float]: ...

    def evaluate_raced(self, weights: dict[str, float], best: Optional[dict[str, list[float]]],
                       fractions: Sequence[float], z: float) -> tuple[dict[str, float], Optional[int], dict[str, list[float]]]:
        """Racing (a search with `racing:`): see evaluators.lm_eval_tasks.LMEvalEvaluator.evaluate_raced."""


# kind -> "module:factory"; the factory takes the spec's options as keyword arguments
EVALUATORS = {
    "lm_eval": "evaluators.lm_eval_tasks:LMEvalEvaluator.from_spec",
    "python": "evaluators.python_callable:PythonEvaluator",
}


def build_evaluator(spec: dict) -> Evaluator:
    options = dict(spec)
    kind = options.pop("kind", None)
    if kind not in EVALUATORS:
        raise ValueError(f"unknown evaluator kind {kind!r} (known: {', '.join(EVALUATORS)})")
    module_name, attr = EVALUATORS[kind].split(":")
    factory = importlib.import_module(module_name)
    for part in attr.split("."):
        factory = getattr(factory, part)
    return factory(**options)
