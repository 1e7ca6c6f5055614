"""Tiny real models for tests: transformers models saved with save_pretrained, and a byte-level BPE
tokenizer trained on the fly. Nothing is downloaded."""

from __future__ import annotations

import json
import shutil
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import load_file

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Merging models combines what each fine-tune learned.",
    "One plus two is three. Two plus two is four.",
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Evolutionary search finds good merge recipes.",
] * 4


@lru_cache(maxsize=1)
def _tokenizer_dir() -> Path:
    import tempfile

    from experiments.quickstart.build_models import train_tokenizer

    out = Path(tempfile.mkdtemp(prefix="evomerge-tok-"))
    train_tokenizer(out, CORPUS, vocab_size=120)
    return out


def tokenizer_vocab_size() -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(_tokenizer_dir()))


def tiny_config(family: str = "llama", layers: int = 4, hidden: int = 32, vocab: int | None = None, **extra):
    import transformers as T

    vocab = vocab or tokenizer_vocab_size()
    common = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, bos_token_id=0, eos_token_id=1, pad_token_id=2,
        max_position_embeddings=128,
    )
    common.update(extra)
    if family == "gpt2":
        return T.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=128,
                            bos_token_id=0, eos_token_id=1, **extra)
    cls = {
        "llama": T.LlamaConfig, "mistral": T.MistralConfig, "qwen2": T.Qwen2Config, "qwen3": T.Qwen3Config,
        "gemma": T.GemmaConfig, "gemma2": T.Gemma2Config, "phi3": T.Phi3Config, "gpt_neox": T.GPTNeoXConfig,
        "stablelm": T.StableLmConfig, "starcoder2": T.Starcoder2Config, "olmo2": T.Olmo2Config,
        "granite": T.GraniteConfig, "cohere": T.CohereConfig, "gemma3_text": T.Gemma3TextConfig,
    }[family]
    return cls(**common)


def make_model(path: Path, config, seed: int = 0, dtype=torch.float32, base: Path | None = None, noise: float = 0.02):
    """Save a tiny model at `path`. With `base`, start from the base's weights plus noise (a
    stand-in fine-tune of the same base)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if base is not None:
        src = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        model.load_state_dict(src.state_dict())
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * noise)
    model = model.to(dtype)
    model.save_pretrained(path)
    for f in _tokenizer_dir().iterdir():
        shutil.copy(f, path / f.name)
    return path


def read_model(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a saved model folder (single file or sharded)."""
    path = Path(path)
    if (path / "model.safetensors").exists():
        return load_file(path / "model.safetensors")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        out.update(load_file(path / shard))
    return out


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
