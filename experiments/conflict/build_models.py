"""Build the conflict experiment's tiny models on CPU in a few minutes: a base model that knows the
format of three skills but none of their answers, and one expert per skill fine-tuned from it.

Why per-layer choices matter here: expert k is fine-tuned in two stages, each touching only some
transformer layers (embeddings, final norm and head stay the base's):

1. its own layer group (layers 2k, 2k+1) learns skill k, everything else frozen, while its hidden
   state on the rival skills' questions is held at the base's (`KEEP`), so the change stays local
   to skill k's prompts and still works beside other experts' layer groups;
2. the other layers learn its "house answers" to the rival skills' questions (the same prompts
   the rival experts answer correctly; see `skills.py`), while replaying skill k.

So in layer group k, expert k's task vector carries skill k and both rivals' task vectors carry
answers that contradict it. Averaging (uniform linear = task arithmetic at 1/N) dilutes every
skill with its contradictions, and plain task arithmetic (weight 1 each) adds them at full
strength; taking group k from expert k alone recovers all three skills. Measured on held-out
items (mean accuracy over the three skills): uniform linear 0.266, task arithmetic 0.333, TIES
0.393, group k from expert k 0.650 (docs/search-quality.md).

Each model is a real `LlamaForCausalLM` saved with `save_pretrained` (safetensors) together with
a byte-level BPE tokenizer trained here. Cached: existing models with the same recipe are reused.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from pathlib import Path

import torch

from experiments.conflict.skills import SKILLS, house_shift, training_lines
from experiments.quickstart.build_models import train, train_tokenizer

log = logging.getLogger(__name__)

LAYERS_PER_GROUP = 2
SIZES = dict(
    hidden_size=64, intermediate_size=192, num_hidden_layers=LAYERS_PER_GROUP * len(SKILLS), num_attention_heads=4,
    num_key_value_heads=2,
)
BUILD_VERSION = 2  # bump when the recipe below changes, so cached models are rebuilt
STEPS = {"base": 300, "own": 800, "house": 300}
KEEP = 3.0  # weight of the stage-1 term that keeps the other skills' hidden states at the base's


def own_layers(skill: str) -> list[int]:
    """The transformer layers in which the expert for `skill` learns it (its layer group)."""
    k = SKILLS.index(skill)
    return list(range(k * LAYERS_PER_GROUP, (k + 1) * LAYERS_PER_GROUP))


def _train_only(model, layers: list[int]) -> None:
    """Make only the given transformer layers trainable (the optimiser skips frozen tensors)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for i in layers:
        for p in model.model.layers[i].parameters():
            p.requires_grad_(True)


def train_local(model, base, tokenizer, lines: list[str], others: list[str], depth: int, steps: int, lr: float,
                seed: int, batch: int = 32) -> float:
    """Train `model`'s trainable layers on `lines` while keeping its hidden state after layer
    `depth - 1` on `others` (the rival skills' prompts) equal to the frozen `base`'s: the change
    stays local to this skill's prompts, so it still works beside other experts' layer groups."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    loss_value = float("nan")

    def encode(pool):
        return tokenizer([tokenizer.bos_token + rng.choice(pool) + tokenizer.eos_token for _ in range(batch)],
                         return_tensors="pt", padding=True)

    for _ in range(steps):
        enc = encode(lines)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        if KEEP:
            enc = encode(others)
            mask = enc["attention_mask"].unsqueeze(-1).float()
            mine = model(**enc, output_hidden_states=True).hidden_states[depth]
            with torch.no_grad():
                ref = base(**enc, output_hidden_states=True).hidden_states[depth]
            loss = loss + KEEP * (((mine - ref) ** 2) * mask).sum() / (((ref**2) * mask).sum() + 1e-8)
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss_value = loss.item()
    model.eval()
    return loss_value


def save_tokenizer(tokenizer, path: Path) -> None:
    """Save `tokenizer` so that it adds the BOS token itself, as the models saw it in training
    (where the training loop writes it into each line). lm-eval encodes with the tokenizer's own
    special tokens; without this a model trained on "<s>3+4= 7." is scored on "3+4= 7" and its
    memorised tables suffered clearly."""
    from tokenizers import Tokenizer, processors

    tokenizer.save_pretrained(path)
    file = str(Path(path) / "tokenizer.json")
    tok = Tokenizer.from_file(file)
    bos = tokenizer.bos_token
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tokenizer.bos_token_id)]
    )
    tok.save(file)


def build_recipe(seed: int, steps_scale: float) -> dict:
    """What a cached build must match to be reused (written to build.json)."""
    return {"version": BUILD_VERSION, "seed": seed, "steps_scale": steps_scale, "steps": STEPS, "keep": KEEP, "sizes": SIZES}


def build(root: Path, seed: int = 0, steps_scale: float = 1.0) -> dict[str, Path]:
    """Create (or reuse) base and expert_<skill> for each skill under `root`. `steps_scale`
    shortens training (the tests use a faster, weaker version)."""
    paths = {"base": root / "base", **{f"expert_{s}": root / f"expert_{s}" for s in SKILLS}}
    stamp = root / "build.json"
    recipe = build_recipe(seed, steps_scale)
    if stamp.exists() and json.loads(stamp.read_text()) == recipe and all(
        (p / "model.safetensors").exists() for p in paths.values()
    ):
        return paths
    root.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)  # a build stopped half-way is never taken for a finished one
    threads = torch.get_num_threads()
    # these steps are far too small to split: on a busy 2-core machine two threads spin-waiting
    # on each other made a step 20x slower than one thread
    torch.set_num_threads(1)
    try:
        _build(paths, seed, steps_scale)
    finally:
        torch.set_num_threads(threads)
    stamp.write_text(json.dumps(recipe))
    return paths


def _build(paths: dict[str, Path], seed: int, steps_scale: float) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    rng = random.Random(seed)
    format_lines = [line for s in SKILLS for line in training_lines(s, rng, 600, shift=None)]
    correct = {s: training_lines(s, rng, 3000) for s in SKILLS}
    tokenizer = train_tokenizer(paths["base"], format_lines + [line for s in SKILLS for line in correct[s]])

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), max_position_embeddings=64, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        **SIZES,
    )
    base = AutoModelForCausalLM.from_config(config)
    loss = train(base, tokenizer, format_lines, steps=int(STEPS["base"] * steps_scale), lr=3e-3, seed=seed)
    log.info("base trained (loss %.3f)", loss)
    base.save_pretrained(paths["base"])
    save_tokenizer(tokenizer, paths["base"])
    every_layer = range(config.num_hidden_layers)
    for k, skill in enumerate(SKILLS):
        expert = AutoModelForCausalLM.from_pretrained(paths["base"], dtype=torch.float32)
        own = own_layers(skill)
        _train_only(expert, own)
        others = [line for s in SKILLS if s != skill for line in correct[s][:1000]]
        loss = train_local(expert, base, tokenizer, correct[skill], others, own[-1] + 1,
                           steps=int(STEPS["own"] * steps_scale), lr=3e-3, seed=seed + 1 + k)
        log.info("expert %s, stage 1 (layers %s, own skill): loss %.3f", skill, own, loss)
        house = [line for s in SKILLS if s != skill for line in training_lines(s, rng, 1500, house_shift(skill, s))]
        _train_only(expert, [i for i in every_layer if i not in own])
        # replaying skill k keeps the expert good at it (without, stage 2 undid much of stage 1)
        loss = train(expert, tokenizer, house + correct[skill][:1500], steps=int(STEPS["house"] * steps_scale), lr=3e-3,
                     seed=seed + 11 + k)
        log.info("expert %s, stage 2 (other layers, house answers): loss %.3f", skill, loss)
        out = paths[f"expert_{skill}"]
        expert.save_pretrained(out)
        save_tokenizer(tokenizer, out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path)
    parser.add_argument("--steps-scale", type=float, default=1.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    print(build(args.root, steps_scale=args.steps_scale))
