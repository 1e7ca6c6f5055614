"""Scoring functions for the `python` evaluator in the tests (imported by name, as a user's would be)."""

from __future__ import annotations


def embedding_row_mean(model, tokenizer, row: int = 3) -> dict:
    return {"embed_mean": float(model.get_input_embeddings().weight[row].detach().double().mean())}


def broken(model, tokenizer, **options) -> dict:
    raise RuntimeError("this scorer always fails")
