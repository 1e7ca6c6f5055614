"""Tiny llama models whose tokenizers differ, for the tokenizer-merging tests."""

from __future__ import annotations

from pathlib import Path

import torch

from helpers import make_model, tiny_config

HIDDEN = 32


def _add_tokens(path: Path, special: list[str], plain: list[str], rows_seed: int) -> None:
    """Add tokens to a saved model's tokenizer, resize its embeddings and give the new rows
    distinctive values (so the tests can see where every output row came from)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    for t in special:
        tok.add_special_tokens({"additional_special_tokens": [t]})
    if plain:
        tok.add_tokens(plain)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    old = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(len(tok))
    gen = torch.Generator().manual_seed(rows_seed)
    with torch.no_grad():
        for w in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            w[old:] = 3.0 + torch.randn(w.shape[0] - old, w.shape[1], generator=gen)
    model.save_pretrained(path)
    tok.save_pretrained(path)


def build_tokenizer_models(root: Path) -> dict[str, Path]:
    """base: the shared BPE vocab (259) plus two tokenizer tokens beyond its 259-row embedding;
    ft_a: + <|im_start|>, <|im_end|> (special, ids 259, 260);
    ft_b: + <|im_end|> (special, id 259), <tool> (plain, id 260)."""
    from transformers import AutoTokenizer

    cfg = tiny_config("llama", layers=2, hidden=HIDDEN)
    base = make_model(root / "base", cfg, seed=0)
    a = make_model(root / "ft_a", cfg, seed=1, base=base)
    b = make_model(root / "ft_b", cfg, seed=2, base=base)
    tok = AutoTokenizer.from_pretrained(base)
    tok.add_tokens(["<beyond1>"])
    tok.add_special_tokens({"additional_special_tokens": ["<beyond2>"]})
    tok.save_pretrained(base)
    _add_tokens(a, ["<|im_start|>", "<|im_end|>"], [], rows_seed=11)
    _add_tokens(b, ["<|im_end|>"], ["<tool>"], rows_seed=12)
    return {"base": base, "ft_a": a, "ft_b": b}
