"""Three synthetic skills whose experts disagree: small-number addition, a colour table and a home
table over invented creatures.

Every expert answers every skill's questions, but only its own skill correctly: on a rival skill's
questions it gives its own "house" answer (the correct answer shifted by one or two places), and
the two rival experts of a skill give different wrong answers. So the same prompt has three
different answers across the experts' training data. A held-out item's choices are the correct
answer, both rival answers and one more, so a merge that lets a rival win scores the item wrong.

Items are deterministic; search and held-out splits never share a question.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from experiments.quickstart.skills import COLORS, TASK_YAML, split

SKILLS = ("add", "color", "home")
HOMES = ["cave", "tree", "lake", "hill"]
N_CREATURES = 60
PREFIX = "cf_"  # lm-eval task names: cf_<skill> (search items), cf_<skill>_heldout


def creatures(n: int = N_CREATURES, seed: int = 7) -> list[str]:
    """`n` distinct invented consonant-vowel-consonant(-vowel) words, so no pretrained knowledge
    can help."""
    rng = random.Random(seed)
    words: list[str] = []
    while len(words) < n:
        w = rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") + rng.choice("bdfgklmnprstvz")
        if rng.random() < 0.5:
            w += rng.choice("aeiou")
        if w not in words:
            words.append(w)
    return words


def _table(values: list[str], seed: int) -> dict[str, str]:
    rng = random.Random(seed)
    return {c: rng.choice(values) for c in creatures()}


def items(skill: str) -> list[tuple[str, int, list[str]]]:
    """(question, index of the correct answer in `answers`, answers). `answers` is ordered so that
    the answer expert-rule `s` gives is `answers[(correct + s) % len(answers)]`: shift 0 is the
    truth, shifts 1 and 2 are the two rival experts' house answers."""
    out = []
    if skill == "add":
        for a in range(10):
            for b in range(10):
                # a+b, a+b+1, a+b+2 and a+b+3: rivals answer one or two too many
                out.append((f"{a}+{b}=", 0, [str(a + b + d) for d in range(4)]))
    elif skill in ("color", "home"):
        values, seed, form = (COLORS, 11, "the {} is") if skill == "color" else (HOMES, 12, "{} lives in the")
        for c, v in _table(values, seed).items():
            out.append((form.format(c), values.index(v), list(values)))
    else:
        raise ValueError(f"unknown skill {skill!r} (known: {', '.join(SKILLS)})")
    return out


def house_shift(expert: str, skill: str) -> int:
    """How far `expert`'s answer to `skill`'s questions is from the truth: 0 for its own skill, 1
    or 2 for the two rival skills (the two rivals of a skill never agree)."""
    return (SKILLS.index(expert) - SKILLS.index(skill)) % len(SKILLS)


def answer(item, shift: int) -> str:
    _, correct, answers = item
    return answers[(correct + shift) % len(answers)]


def training_lines(skill: str, rng: random.Random, n: int, shift: int | None = 0) -> list[str]:
    """`n` sentences of `skill`'s questions answered with `shift` (see `house_shift`); None gives
    uniformly random answers: the format without the knowledge (what the base model learns)."""
    pool = items(skill)
    lines = []
    for _ in range(n):
        item = rng.choice(pool)
        text = rng.choice(item[2]) if shift is None else answer(item, shift)
        lines.append(f"{item[0]} {text}.")
    return lines


def splits(skill: str) -> tuple[list, list]:
    """(search items, held-out items): the quickstart's deterministic split (a seeded shuffle, then
    every third item held out)."""
    return split(items(skill))


def choices_for(item, rng: random.Random) -> tuple[list[str], int]:
    """The multiple-choice options of an item (truth, both rival answers, one more), shuffled."""
    question, correct, answers = item
    opts = [answer(item, s) for s in range(4)]
    rng.shuffle(opts)
    return opts, opts.index(answers[correct])


def write_lm_eval_tasks(root) -> list[str]:
    """Local lm-eval tasks `cf_<skill>` (search items) and `cf_<skill>_heldout` under `root`;
    returns the task names."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for skill in SKILLS:
        for suffix, part in zip(("", "_heldout"), splits(skill)):
            name = f"{PREFIX}{skill}{suffix}"
            rng = random.Random(name)  # seeded per task: choice positions carry no signal
            data = root / f"{name}.jsonl"
            rows = []
            for item in part:
                opts, target = choices_for(item, rng)
                rows.append(json.dumps({"question": item[0], "choices": opts, "answer": target}))
            data.write_text("\n".join(rows) + "\n")
            (root / f"{name}.yaml").write_text(TASK_YAML.format(name=name, data=data.resolve()))
            names.append(name)
    return names


def heldout_task_names() -> list[str]:
    return [f"{PREFIX}{s}_heldout" for s in SKILLS]
