"""The search worker without Ray: a real resident model, merged in place per candidate, scored by
the `python` evaluator through the Evaluator registry."""

from __future__ import annotations

import pytest
import torch

from evaluators import EVALUATORS, Evaluator, build_evaluator
from evaluators.worker import CandidateWorker, WorkerSettings
from merge_engine.options import MergeOptions
from helpers import read_model


def linear(models, wa: float, wb: float) -> dict:
    return {
        "merge_method": "linear", "dtype": "float32",
        "models": [{"model": str(models["a"]), "parameters": {"weight": wa}},
                   {"model": str(models["b"]), "parameters": {"weight": wb}}],
    }


def worker(models, function: str = "scorers:embedding_row_mean") -> CandidateWorker:
    return CandidateWorker(WorkerSettings(
        template_recipe=linear(models, 0.5, 0.5),
        evaluator={"kind": "python", "function": function, "directions": {"embed_mean": "minimize"}, "options": {"row": 3}},
        merge_options=MergeOptions(device="cpu", quiet=True),
    ))


def test_worker_merges_in_place_and_scores_with_a_python_evaluator(llama_models):
    w = worker(llama_models)
    assert w.ready()["directions"] == {"embed_mean": "minimize"}
    a = read_model(llama_models["a"])["model.embed_tokens.weight"].double()
    b = read_model(llama_models["b"])["model.embed_tokens.weight"].double()
    for wa, wb in ((0.25, 0.75), (0.9, 0.1)):
        result = w.evaluate(linear(llama_models, wa, wb))
        assert result["status"] == "complete" and result["merge_s"] > 0
        expected = float(((wa * a[3] + wb * b[3]) / (wa + wb)).mean())
        assert result["metrics"]["embed_mean"] == pytest.approx(expected, rel=1e-6)
    assert isinstance(w.evaluator, Evaluator)


def test_a_failing_evaluator_is_a_failed_candidate_not_a_crash(llama_models):
    result = worker(llama_models, "scorers:broken").evaluate(linear(llama_models, 0.5, 0.5))
    assert result["status"] == "failed" and result["error"] == "RuntimeError: this scorer always fails"


def test_evaluator_registry():
    assert set(EVALUATORS) == {"lm_eval", "python"}
    with pytest.raises(ValueError, match="unknown evaluator kind 'nope'"):
        build_evaluator({"kind": "nope"})
    with pytest.raises(ValueError, match="expected 'module:function'"):
        build_evaluator({"kind": "python", "function": "no_colon"})
    with pytest.raises(ValueError, match="No module named"):
        build_evaluator({"kind": "python", "function": "missing_module_xyz:f"})
    ev = build_evaluator({"kind": "python", "function": "scorers:embedding_row_mean"})
    with pytest.raises(RuntimeError, match="attach a model first"):
        ev.evaluate()
    model = torch.nn.Module()
    model.get_input_embeddings = lambda: torch.nn.Embedding(5, 2)
    ev.attach(model, None)
    assert set(ev.evaluate()) == {"embed_mean"}
