"""Scoring a resident model: the `Evaluator` protocol, its registry, and the search worker.

An evaluator is built once per worker from a spec (`{"kind": <registry name>, **options}`), is
attached to the worker's resident model once, and then scores the model as it is at each call.

    attach(model, tokenizer) -> None     keep references; the model's weights change in place
    evaluate() -> {metric name: value}   score the model as it is now
    directions                           {metric name: "maximize" | "minimize"}

Registered kinds (`EVALUATORS`): `lm_eval` (lm-eval tasks, evaluators.lm_eval_tasks) and
`python` (any importable callable `fn(model, tokenizer) -> dict`, evaluators.python_callable).
Adding one = a class with those three members + one registry line. This module imports neither
torch nor lm-eval.
"""

from __future__ import annotations

import importlib
from typing import Protocol, runtime_checkable


@runtime_checkable
class Evaluator(Protocol):
    directions: dict[str, str]

    def attach(self, model, tokenizer) -> None: ...

    def evaluate(self) -> dict[str, float]: ...


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
