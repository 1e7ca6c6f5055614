"""An evaluator that calls any importable Python function on the resident model."""

from __future__ import annotations

import importlib
from typing import Optional, Sequence


def import_callable(path: str):
    """`package.module:function` -> the function."""
    module_name, _, name = path.partition(":")
    if not module_name or not name:
        raise ValueError(f"evaluator function {path!r}: expected 'module:function'")
    try:
        obj = importlib.import_module(module_name)
        for part in name.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"evaluator function {path!r}: {err}") from None
    if not callable(obj):
        raise ValueError(f"evaluator function {path!r} is not callable")
    return obj


class PythonEvaluator:
    """`function(model, tokenizer, **options) -> {metric: value}`; metrics are maximised unless
    `directions` says otherwise."""

    def __init__(self, function: str, directions: Optional[dict[str, str]] = None, options: Optional[dict] = None):
        self.function = import_callable(function)
        self.options = dict(options or {})
        self.directions = dict(directions or {})
        self.model = self.tokenizer = None

    def attach(self, model, tokenizer) -> None:
        self.model, self.tokenizer = model, tokenizer

    def evaluate(self) -> dict[str, float]:
        if self.model is None:
            raise RuntimeError("attach a model first")
        metrics = self.function(self.model, self.tokenizer, **self.options)
        if not isinstance(metrics, dict):
            raise TypeError(f"evaluator function returned {type(metrics).__name__}, not a dict of metrics")
        return {str(k): float(v) for k, v in metrics.items()}

    def evaluate_raced(self, weights: dict[str, float], best: Optional[dict[str, list[float]]],
                       fractions: Sequence[float], z: float) -> tuple[dict[str, float], Optional[int], dict[str, list[float]]]:
        # a callable returns metrics, not per-item values: there are no stages to race on
        raise ValueError("racing: a python evaluator reports no per-item values; turn racing off")
