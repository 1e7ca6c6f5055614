"""Build the quickstart's tiny models on CPU in well under a minute: a base model that knows the
format of both skills but neither's answers, and two experts fine-tuned from it, one per skill.

Each model is a real `LlamaForCausalLM` saved with `save_pretrained` (safetensors) together with
a byte-level BPE tokenizer trained here. Cached: existing models are reused.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from pathlib import Path

import torch

from experiments.quickstart.skills import training_lines

log = logging.getLogger(__name__)

SIZES = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
BUILD_VERSION = 1  # bump when the recipe below changes, so cached models are rebuilt


def train_tokenizer(out: Path, lines: list[str], vocab_size: int = 400, extra_special: tuple[str, ...] = ()):
    """A byte-level BPE tokenizer trained on `lines`, saved as a transformers fast tokenizer.
    `extra_special` tokens come right after <s> </s> <pad> (they shift every other id)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>", *extra_special], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(lines, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(out)
    return fast


def train(model, tokenizer, lines: list[str], steps: int, lr: float, seed: int, batch: int = 32) -> float:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    loss_value = float("nan")
    for _ in range(steps):
        texts = [tokenizer.bos_token + rng.choice(lines) + tokenizer.eos_token for _ in range(batch)]
        enc = tokenizer(texts, return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        out = model(**enc, labels=labels)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        loss_value = out.loss.item()
    model.eval()
    return loss_value


def build(root: Path, seed: int = 0, steps_scale: float = 1.0) -> dict[str, Path]:
    """Create (or reuse) base, expert_arithmetic and expert_facts under `root`. `steps_scale`
    shortens training (the tests use a faster, weaker version)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    paths = {name: root / name for name in ("base", "expert_arithmetic", "expert_facts")}
    stamp = root / "build.json"
    recipe = {"version": BUILD_VERSION, "seed": seed, "steps_scale": steps_scale}
    if stamp.exists() and json.loads(stamp.read_text()) == recipe and all(
        (p / "model.safetensors").exists() for p in paths.values()
    ):
        return paths
    root.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rng = random.Random(seed)
    generic = [
        "the cat sat on the mat.", "models learn from data.", "we add numbers and name colors.",
        "merging joins two skills.", "a small model can still learn.",
    ]
    format_lines = (
        training_lines("arithmetic", False, rng, 400) + training_lines("facts", False, rng, 400) + generic * 40
    )
    skill_lines = {
        "arithmetic": training_lines("arithmetic", True, rng, 2000),
        "facts": training_lines("facts", True, rng, 2000),
    }
    tokenizer = train_tokenizer(paths["base"], format_lines + skill_lines["arithmetic"] + skill_lines["facts"])

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), max_position_embeddings=64, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        **SIZES,
    )
    base = AutoModelForCausalLM.from_config(config)
    loss = train(base, tokenizer, format_lines, steps=int(250 * steps_scale), lr=3e-3, seed=seed)
    log.info("base trained (loss %.3f)", loss)
    base.save_pretrained(paths["base"])
    for skill in ("arithmetic", "facts"):
        expert = AutoModelForCausalLM.from_pretrained(paths["base"], dtype=torch.float32)
        # Replay a little of the base's data so an expert keeps the other skill's format.
        loss = train(expert, tokenizer, skill_lines[skill] + format_lines[:200], steps=int(300 * steps_scale), lr=2e-3, seed=seed + 1)
        log.info("expert %s trained (loss %.3f)", skill, loss)
        out = paths[f"expert_{skill}"]
        expert.save_pretrained(out)
        tokenizer.save_pretrained(out)
    stamp.write_text(json.dumps(recipe))
    return paths


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    print(build(args.root))
