"""The conflict experiment's data and a reduced build: splits, real conflicts, loadable lm-eval
tasks, and saved models whose experts changed only the transformer layers."""

from __future__ import annotations

import json
import random

import pytest
import torch

from experiments.conflict import skills
from experiments.conflict.build_models import SIZES, build, own_layers

SIZES_BY_SKILL = {"add": (66, 34), "color": (40, 20), "home": (40, 20)}  # (search, held-out)


def test_search_and_heldout_items_are_disjoint_and_sized():
    for skill, (n_search, n_held) in SIZES_BY_SKILL.items():
        search, held = skills.splits(skill)
        assert (len(search), len(held)) == (n_search, n_held)
        assert not {q for q, _, _ in search} & {q for q, _, _ in held}
        assert len({q for q, _, _ in search + held}) == n_search + n_held  # no question twice


def test_heldout_items_come_from_the_search_items_distribution():
    """Not the every-third item of the ordered list: for a + b (item 10a + b) that held out exactly
    the sums divisible by 3. Both parts hold every residue, in shares close to the whole list's."""
    search, held = skills.splits("add")
    for part in (search, held):
        sums = [int(q[:-1].split("+")[0]) + int(q[:-1].split("+")[1]) for q, _, _ in part]
        shares = [sum(1 for s in sums if s % 3 == r) / len(sums) for r in range(3)]
        assert all(abs(share - 1 / 3) < 0.12 for share in shares), shares
        assert abs(sum(sums) / len(sums) - 9.0) < 1.0  # the mean of a + b over all items is 9


def test_the_experts_training_data_disagree_on_the_same_prompts():
    for skill in skills.SKILLS:
        shifts = [skills.house_shift(expert, skill) for expert in skills.SKILLS]
        assert sorted(shifts) == [0, 1, 2]  # the own expert is right, the two rivals differ
        answers_by_prompt: dict[str, set] = {}
        for expert in skills.SKILLS:
            for line in skills.training_lines(skill, random.Random(0), 400, skills.house_shift(expert, skill)):
                prompt, _, answer = line.rpartition(" ")
                answers_by_prompt.setdefault(prompt, set()).add((expert, answer))
        conflicted = [p for p, ans in answers_by_prompt.items() if len({a for _, a in ans}) == 3]
        assert len(conflicted) > 0.5 * len(answers_by_prompt)
    # the numbers themselves: 3+4= is 7 for the adder, 8 for the colour expert, 9 for the home expert
    item = next(it for it in skills.items("add") if it[0] == "3+4=")
    assert [skills.answer(item, skills.house_shift(e, "add")) for e in skills.SKILLS] == ["7", "8", "9"]


def test_lm_eval_tasks_load_with_include_path(tmp_path):
    from lm_eval.tasks import TaskManager

    names = skills.write_lm_eval_tasks(tmp_path)
    assert sorted(names) == sorted([f"cf_{s}" for s in skills.SKILLS] + skills.heldout_task_names())
    manager = TaskManager(include_path=[str(tmp_path)], include_defaults=False)
    loaded = manager.load(names)["tasks"]
    for skill, (n_search, n_held) in SIZES_BY_SKILL.items():
        for name, n in ((f"cf_{skill}", n_search), (f"cf_{skill}_heldout", n_held)):
            task = loaded[name]
            docs = list(task.test_docs())
            assert len(docs) == n
            by_question = {it[0]: it for it in skills.items(skill)}
            for doc in docs:
                item = by_question[doc["question"]]
                assert doc["choices"][task.doc_to_target(doc)] == item[2][item[1]]
                # both rival experts' answers are among the options
                assert {skills.answer(item, 1), skills.answer(item, 2)} <= set(doc["choices"])
    held_questions = {json.loads(line)["question"] for line in (tmp_path / "cf_add_heldout.jsonl").read_text().splitlines()}
    search_questions = {json.loads(line)["question"] for line in (tmp_path / "cf_add.jsonl").read_text().splitlines()}
    assert not held_questions & search_questions


def test_reduced_build_saves_loadable_llamas_changed_only_in_layers(reduced_build):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    base = load_file(reduced_build["base"] / "model.safetensors")
    for skill in skills.SKILLS:
        path = reduced_build[f"expert_{skill}"]
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        assert isinstance(model, LlamaForCausalLM) and model.config.num_hidden_layers == SIZES["num_hidden_layers"]
        assert AutoTokenizer.from_pretrained(path).vocab_size == model.config.vocab_size
        expert = load_file(path / "model.safetensors")
        assert expert.keys() == base.keys()
        changed = {name for name in base if not torch.equal(base[name], expert[name])}
        # embeddings, final norm and head are the base's: every merge agrees on them
        assert not {n for n in changed if ".layers." not in n}
        changed_layers = {int(n.split(".layers.")[1].split(".")[0]) for n in changed}
        assert changed_layers == set(range(SIZES["num_hidden_layers"]))  # own group (stage 1) + the rest (stage 2)
        assert set(own_layers(skill)) < changed_layers


def test_build_is_cached(reduced_build):
    stamp = reduced_build["base"].parent / "build.json"
    mtime = (reduced_build["expert_add"] / "model.safetensors").stat().st_mtime_ns
    again = build(reduced_build["base"].parent, steps_scale=0.04)
    assert again == reduced_build and json.loads(stamp.read_text())["steps_scale"] == 0.04
    assert (reduced_build["expert_add"] / "model.safetensors").stat().st_mtime_ns == mtime


def test_saved_tokenizer_adds_one_bos_as_in_training(reduced_build):
    from transformers import AutoTokenizer

    for path in reduced_build.values():
        tok = AutoTokenizer.from_pretrained(path)
        ids = tok("3+4= 7")["input_ids"]
        assert ids[0] == tok.bos_token_id and tok.bos_token_id not in ids[1:]


def _hidden_change(model, base, tok, prompts, depth):
    """Relative squared change of the hidden state after layer `depth - 1`, model vs base."""
    enc = tok(prompts, return_tensors="pt", padding=True)
    mask = enc["attention_mask"].unsqueeze(-1).float()
    with torch.no_grad():
        mine = model(**enc, output_hidden_states=True).hidden_states[depth]
        ref = base(**enc, output_hidden_states=True).hidden_states[depth]
    return float((((mine - ref) ** 2) * mask).sum() / ((ref**2) * mask).sum())


def test_an_experts_own_layer_group_changes_its_own_prompts_more_than_the_rivals(reduced_build):
    # stage 1 trains the own group on its skill while holding the rivals' hidden states at the
    # base's: base + that group's change alone must move the own prompts' state far more
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(reduced_build["base"])
    base = AutoModelForCausalLM.from_pretrained(reduced_build["base"], dtype=torch.float32)
    for skill in skills.SKILLS:
        expert = AutoModelForCausalLM.from_pretrained(reduced_build[f"expert_{skill}"], dtype=torch.float32)
        merged = AutoModelForCausalLM.from_pretrained(reduced_build["base"], dtype=torch.float32)
        for i in own_layers(skill):
            merged.model.layers[i].load_state_dict(expert.model.layers[i].state_dict())
        depth = own_layers(skill)[-1] + 1
        own = _hidden_change(merged, base, tok, [q for q, _, _ in skills.items(skill)], depth)
        rivals = _hidden_change(merged, base, tok, [q for s in skills.SKILLS if s != skill for q, _, _ in skills.items(s)], depth)
        assert own > 3 * rivals
