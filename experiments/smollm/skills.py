"""Three synthetic skills for the SmolLM2 experiment, each a rule that maps an input to one of four
arbitrary labels, so the pretrained model cannot know the answers but can learn the rule from a few
hundred examples and apply it to inputs it never saw:

- `bin`: a number from 100 to 899 goes to a bin by its hundreds digit (1-2, 3-4, 5-6, 7-8);
- `season`: a date goes to a tag by its month's season (Dec-Feb, Mar-May, Jun-Aug, Sep-Nov);
- `kind`: a common noun goes to a group by what it is (animal, food, job, tool).

Every item of a skill has the same four choices (the skill's labels). An expert answers its own
skill's questions correctly and a rival skill's questions with its own "house" answer: the correct
label shifted by 1 or 2 places (the two rivals of a skill never agree); the harmful expert answers
every skill with the shift of 3. So each wrong choice of an item is some expert's answer, and a
merge in which a rival or the harmful expert wins scores the item wrong.

Each skill's items are split once, deterministically and balanced over the four labels, into
expert training items, search items (at most 40, what a search scores) and held-out items (what
a finished search is judged on); the three never share an input.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from experiments.quickstart.skills import TASK_YAML

SKILLS = ("bin", "season", "kind")
HARMFUL = "noisy"  # the fourth expert: trained on every skill's questions with wrong answers
EXPERTS = (*SKILLS, HARMFUL)
PREFIX = "sm_"  # lm-eval task names: sm_<skill> (search items), sm_<skill>_heldout
N_SEARCH = 40  # per skill, 10 per label
N_HELDOUT = {"bin": 160, "season": 160, "kind": 100}  # per skill, a quarter per label

LABELS = {
    "bin": ("apple", "river", "stone", "cloud"),
    "season": ("north", "south", "east", "west"),
    "kind": ("alpha", "beta", "gamma", "delta"),
}
PROMPTS = {"bin": "Number {}. Bin:", "season": "Date: {}. Tag:", "kind": "Word: {}. Group:"}

MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
NOUNS = (
    # animals
    ("dog cat horse cow pig sheep goat chicken duck goose rabbit mouse rat lion tiger bear wolf fox deer "
     "elephant giraffe zebra monkey camel kangaroo koala panda otter beaver squirrel frog toad snake lizard "
     "turtle crocodile shark whale dolphin seal penguin eagle owl parrot pigeon crow swan bee ant spider "
     "butterfly moth beetle snail worm crab lobster octopus donkey hamster"),
    # foods
    ("bread cheese butter rice pasta soup salad pizza burger sandwich apple banana orange grape lemon "
     "cherry peach pear plum mango melon strawberry potato carrot onion garlic tomato cucumber pepper "
     "lettuce cabbage broccoli bean pea corn egg bacon sausage ham steak chicken biscuit cookie cake pie "
     "muffin pancake waffle yogurt honey jam chocolate candy noodle cereal porridge popcorn pretzel donut"),
    # jobs
    ("teacher doctor nurse farmer baker butcher chef waiter pilot driver sailor soldier lawyer judge "
     "dentist plumber carpenter electrician painter singer dancer actor writer poet journalist banker "
     "cashier clerk secretary engineer scientist professor student librarian firefighter policeman "
     "detective mechanic tailor barber surgeon pharmacist architect photographer gardener fisherman miner "
     "builder cleaner guard priest accountant translator musician"),
    # tools
    ("hammer saw drill screwdriver wrench pliers axe shovel rake hoe chisel file ladder bucket broom mop "
     "brush knife scissors needle thread rope chain hook nail screw bolt clamp level ruler tape glue "
     "crowbar pickaxe trowel sickle scythe spanner sander grinder lathe anvil vise stapler funnel sieve "
     "whisk ladle spatula tongs grater peeler corkscrew opener plunger"),
)


def _inputs(skill: str) -> list[tuple[str, int]]:
    """Every (input text, label index) of a skill, in a fixed order."""
    if skill == "bin":
        return [(str(n), (n // 100 - 1) // 2) for n in range(100, 900)]
    if skill == "season":
        return [(f"{m} {d}", (i + 1) % 12 // 3) for i, m in enumerate(MONTHS) for d in range(1, 29)]
    if skill == "kind":
        seen: set[str] = set()
        out = []
        for label, words in enumerate(NOUNS):
            for w in words.split():
                if w not in seen:  # "chicken" and "apple" name both an animal/food: the first wins
                    seen.add(w)
                    out.append((w, label))
        return out
    raise ValueError(f"unknown skill {skill!r} (known: {', '.join(SKILLS)})")


def _ambiguous() -> set[str]:
    words = [w for group in NOUNS for w in group.split()]
    return {w for w in words if words.count(w) > 1}


def items(skill: str) -> list[tuple[str, int]]:
    """(question, index of the correct label in LABELS[skill]) for every usable input."""
    bad = _ambiguous() if skill == "kind" else set()
    return [(PROMPTS[skill].format(x), y) for x, y in _inputs(skill) if x not in bad]


def splits(skill: str) -> dict[str, list[tuple[str, int]]]:
    """{"search": ..., "heldout": ..., "train": ...}: a seeded shuffle per label, then N_SEARCH / 4
    and N_HELDOUT / 4 items of each label for search and held-out, the rest for training."""
    by_label: dict[int, list] = {}
    for item in items(skill):
        by_label.setdefault(item[1], []).append(item)
    out: dict[str, list] = {"search": [], "heldout": [], "train": []}
    n_search, n_held = N_SEARCH // 4, N_HELDOUT[skill] // 4
    for label in sorted(by_label):
        pool = list(by_label[label])
        random.Random(f"{skill}/{label}").shuffle(pool)
        if len(pool) < n_search + n_held + 10:
            raise ValueError(f"skill {skill}: label {label} has only {len(pool)} items")
        out["search"] += pool[:n_search]
        out["heldout"] += pool[n_search:n_search + n_held]
        out["train"] += pool[n_search + n_held:]
    return out


def house_shift(expert: str, skill: str) -> int:
    """How far `expert`'s answer to `skill`'s questions is from the truth (in label order, modulo 4):
    0 for its own skill, 1 or 2 for the two rival skills (the two rivals never agree), 3 for the
    harmful expert on every skill."""
    if expert == HARMFUL:
        return 3
    return (SKILLS.index(expert) - SKILLS.index(skill)) % len(SKILLS)


def answer(skill: str, item: tuple[str, int], shift: int = 0) -> str:
    return LABELS[skill][(item[1] + shift) % len(LABELS[skill])]


def training_pairs(expert: str, skill: str) -> list[tuple[str, str]]:
    """(prompt, answer) pairs `expert` is fine-tuned on for `skill`: the skill's training items only
    (never a search or held-out input), answered with the expert's house shift."""
    shift = house_shift(expert, skill)
    return [(q, " " + answer(skill, it, shift)) for it in splits(skill)["train"] for q in [it[0]]]


def write_lm_eval_tasks(root) -> list[str]:
    """Local lm-eval tasks `sm_<skill>` (search items) and `sm_<skill>_heldout` under `root`;
    returns the task names."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for skill in SKILLS:
        parts = splits(skill)
        for suffix, part in (("", parts["search"]), ("_heldout", parts["heldout"])):
            name = f"{PREFIX}{skill}{suffix}"
            rng = random.Random(name)  # seeded per task: choice positions carry no signal
            rows = []
            for question, label in part:
                opts = list(LABELS[skill])
                rng.shuffle(opts)
                rows.append(json.dumps({"question": question, "choices": opts, "answer": opts.index(LABELS[skill][label])}))
            data = root / f"{name}.jsonl"
            data.write_text("\n".join(rows) + "\n")
            (root / f"{name}.yaml").write_text(TASK_YAML.format(name=name, data=data.resolve()))
            names.append(name)
    return names


def search_task_names() -> list[str]:
    return [f"{PREFIX}{s}" for s in SKILLS]


def heldout_task_names() -> list[str]:
    return [f"{PREFIX}{s}_heldout" for s in SKILLS]
