"""Two synthetic skills for the quickstart: small-number addition and a fixed table of invented
facts. Items are deterministic; search and held-out splits never share a question."""

from __future__ import annotations

import random

COLORS = ["red", "blue", "green", "yellow"]
# Invented words, so that no pretrained knowledge can help: the fact table is learned or not.
CREATURES = [
    "zorp", "blick", "fendle", "quarn", "moxie", "trell", "vuno", "grib", "plonk", "snerd",
    "wibble", "yarn", "kesh", "drubb", "lomp", "ziv", "hoop", "mirl", "tansy", "brue",
    "clov", "fitch", "gorm", "jax", "nib", "pell", "rusk", "sorn", "tuck", "vell",
]


def fact_table(seed: int = 1234) -> dict[str, str]:
    rng = random.Random(seed)
    return {c: rng.choice(COLORS) for c in CREATURES}


def arithmetic_items():
    """(question, answer, distractors) for a + b with a, b in 0..9."""
    items = []
    for a in range(10):
        for b in range(10):
            ans = a + b
            wrong = sorted({ans - 1, ans + 1, ans + 2, ans - 2} - {ans, -1, -2})[:3]
            items.append((f"{a}+{b}=", str(ans), [str(w) for w in wrong]))
    return items


def fact_items(seed: int = 1234):
    table = fact_table(seed)
    return [(f"the {c} is", color, [x for x in COLORS if x != color]) for c, color in table.items()]


def split(items, held_out_every: int = 3, seed: int = 0):
    """Deterministic split: a seeded shuffle, then every `held_out_every`-th item is held out (each
    part keeps the items' order). Shuffled because the item lists are ordered: a + b is item 10a + b,
    and every third item of that order is exactly a sum divisible by 3, a held-out set drawn from
    another distribution than the search items (docs/search-quality.md)."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    held_out = set(order[::held_out_every])
    search = [it for i, it in enumerate(items) if i not in held_out]
    held = [it for i, it in enumerate(items) if i in held_out]
    return search, held


def training_lines(skill: str, correct: bool, rng: random.Random, n: int) -> list[str]:
    """Sentences to train on. `correct=False` gives the format with random answers: the base model
    learns what the questions look like, not their answers."""
    items = arithmetic_items() if skill == "arithmetic" else fact_items()
    lines = []
    for _ in range(n):
        q, a, wrong = rng.choice(items)
        lines.append(f"{q} {a if correct else rng.choice([a] + wrong)}.")
    return lines


TASKS = {
    "arithmetic": arithmetic_items,
    "facts": fact_items,
}

TASK_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1
"""


def write_lm_eval_tasks(root) -> list[str]:
    """Local lm-eval tasks `qs_<skill>` (search items) and `qs_<skill>_heldout` under `root`;
    returns the task names. Choices are shuffled per item (seeded) so position carries no signal."""
    import json
    from pathlib import Path

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for skill, items_fn in TASKS.items():
        search, held = split(items_fn())
        for suffix, items in (("", search), ("_heldout", held)):
            name = f"qs_{skill}{suffix}"
            rng = random.Random(name)
            data = root / f"{name}.jsonl"
            with open(data, "w") as f:
                for question, answer, wrong in items:
                    choices = [answer] + list(wrong)
                    rng.shuffle(choices)
                    f.write(json.dumps({"question": question, "choices": choices, "answer": choices.index(answer)}) + "\n")
            (root / f"{name}.yaml").write_text(TASK_YAML.format(name=name, data=data.resolve()))
            names.append(name)
    return names
