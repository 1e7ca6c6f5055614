"""The export rule (evolve.selection) against an independent float64 computation, the anchors every
genome offers, and how optimisers start from them."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from evolve.loop import resume, run_loop
from evolve.objectives import Scoring
from evolve.optimizers import OPTIMIZERS, Result, make_optimizer
from search_spaces.genome import SearchSpace
from evolve.selection import EXPORT_Z, CandidateRow, choose, exported, paired_bound, ranked

WEIGHTS = {"a": 1.0, "b": 0.5}


def row(number, items, anchor=None, order=None, weights=WEIGHTS):
    fitness = sum(w * float(np.mean(items[k])) for k, w in weights.items())
    return CandidateRow(number, fitness, {k: float(np.mean(v)) for k, v in items.items()}, 0.0, str(number), anchor,
                        items, number if order is None else order)


def test_paired_bound_equals_an_independent_float64_computation():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = {"a": int(rng.integers(5, 80)), "b": int(rng.integers(5, 80))}
        cand = {k: rng.integers(0, 2, n[k]).astype(float).tolist() for k in WEIGHTS}
        anch = {k: rng.integers(0, 2, n[k]).astype(float).tolist() for k in WEIGHTS}
        d = {k: np.array(cand[k], dtype=np.float64) - np.array(anch[k], dtype=np.float64) for k in WEIGHTS}
        lead = sum(w * d[k].mean() for k, w in WEIGHTS.items())
        se = np.sqrt(sum(w * w * d[k].var(ddof=1) / len(d[k]) for k, w in WEIGHTS.items()))
        got_lead, got_bound = paired_bound(row(1, cand), row(0, anch), WEIGHTS, z=1.7)
        assert got_lead == pytest.approx(lead, abs=1e-12)
        assert got_bound == pytest.approx(lead - 1.7 * se, abs=1e-12)


def items_with(n: int, right: int, flips: int = 0, seed: int = 0) -> list[float]:
    """`right` of `n` items right, then `flips` items that were wrong turned right."""
    values = [1.0] * right + [0.0] * (n - right)
    random.Random(seed).shuffle(values)
    wrong = [i for i, v in enumerate(values) if v == 0.0]
    for i in wrong[:flips]:
        values[i] = 1.0
    return values


def test_a_lead_of_one_item_keeps_the_anchor_and_a_clear_lead_exports_the_candidate():
    """The case behind the rule: 72 search items, the anchor at 70, a candidate one item better.
    The candidate's lead is noise: the anchor is exported. Ten items better, it is not."""
    weights = {"a": 1.0}
    anchor = row(0, {"a": items_with(72, 70)}, anchor="weight 1 each", weights=weights)
    lucky = row(5, {"a": items_with(72, 70, flips=1)}, weights=weights)
    assert ranked([anchor, lucky])[0] is lucky  # the maximum of the fitness would export it
    chosen = choose([anchor, lucky], weights)
    assert chosen.row is anchor and "no candidate beat it" in chosen.reason
    base = items_with(72, 50, seed=3)
    anchor = row(0, {"a": base}, anchor="start", weights=weights)
    better = row(7, {"a": [1.0 if i < 12 else v for i, v in enumerate(base)]}, weights=weights)
    chosen = choose([anchor, better], weights)
    assert chosen.row is better and chosen.lead > 0 and chosen.bound > 0
    # with none lost: one item better is not clear at z = 1 (its bound is 0 exactly), two are;
    # at z = 2 four are and three are not
    for z, flips, kept in ((1, 1, anchor), (1, 2, None), (2, 3, anchor), (2, 4, None)):
        cand = row(9, {"a": items_with(72, 50, flips=flips, seed=3)}, weights=weights)
        got = choose([anchor, cand], weights, z=z).row
        assert got is (kept or cand), (z, flips)
    assert EXPORT_Z == 1.0


def test_one_item_better_on_two_tasks_stays_with_the_anchor():
    """The outside experiment's case at the default z: two tasks of 36 items, weight 0.5 each, one
    item gained and none lost. Lead and z * se are equal in exact arithmetic (0.5/36); whatever the
    float sums round to, the anchor is kept."""
    weights = {"a": 0.5, "b": 0.5}
    for seed in range(20):
        a, b = items_with(36, 30, seed=seed), items_with(36, 33, seed=seed + 100)
        anchor = row(0, {"a": a, "b": b}, anchor="weight 1 each", weights=weights)
        gained = next(i for i, v in enumerate(a) if v == 0.0)
        lucky = row(4, {"a": [1.0 if i == gained else v for i, v in enumerate(a)], "b": b}, weights=weights)
        lead, bound = paired_bound(lucky, anchor, weights)
        assert abs(lead - 0.5 / 36) < 1e-12 and abs(bound) < 1e-12
        assert choose([anchor, lucky], weights).row is anchor


def test_among_clear_leaders_the_most_certain_lead_is_exported():
    weights = {"a": 1.0}
    base = [0.0] * 40 + [1.0] * 40
    anchor = row(0, {"a": base}, anchor="start", weights=weights)
    # a: +10 items, never worse; b: +14 items but 6 worse (higher fitness, noisier lead)
    steady = row(1, {"a": [1.0 if i < 10 else v for i, v in enumerate(base)]}, weights=weights)
    noisy = list(base)
    for i in range(14):
        noisy[i] = 1.0
    for i in range(40, 46):
        noisy[i] = 0.0
    wild = row(2, {"a": noisy}, weights=weights)
    assert wild.fitness < steady.fitness  # +14 - 6 = +8 items against +10
    bounds = {r.number: paired_bound(r, anchor, weights)[1] for r in (steady, wild)}
    chosen = choose([anchor, steady, wild], weights)
    assert chosen.number == max(bounds, key=bounds.get)
    assert chosen.bound == pytest.approx(max(bounds.values()))


def test_without_per_item_values_or_anchors_the_rule_is_the_best_fitness():
    rows = [row(0, {"a": [0.5], "b": [0.5]}, anchor="start"), row(1, {"a": [0.6], "b": [0.5]}),
            row(2, {"a": [0.6], "b": [0.5]}, order=0)]
    rows = [replace(r, items=None) for r in rows]
    assert choose(rows, WEIGHTS).number == 2  # equal fitness: the earlier told
    rows = [replace(r, anchor=None) for r in rows]
    assert choose(rows, WEIGHTS).number == 2 and "no anchor" in choose(rows, WEIGHTS).reason
    assert choose([], WEIGHTS) is None
    infeasible = replace(rows[1], violation=0.2, fitness=9.0)
    assert choose([infeasible], WEIGHTS) is None


def test_exported_follows_rescoring_and_pareto_select():
    rows = [row(0, {"a": [1.0, 0.0], "b": [1.0, 1.0]}, anchor="start"), row(1, {"a": [1.0, 1.0], "b": [0.0, 0.0]})]
    scoring = Scoring([type("T", (), {"name": n, "weight": w, "direction": None, "metric": "acc,none"})()
                       for n, w in WEIGHTS.items()], {"a": "maximize", "b": "maximize"})
    assert exported(rows, scoring, {"chosen": 1, "rows": []}).number == 1
    assert exported(rows, scoring, {"chosen": None, "rows": []}).number == choose(rows, WEIGHTS).number
    scoring.select = "b"
    assert exported(rows, scoring).number == 0


# -- anchors -------------------------------------------------------------------------------------

SPACE = SearchSpace(("w0", "w1", "d0", "d1"), (0.0, 0.0, 0.05, 0.05), (2.0, 2.0, 1.0, 1.0))
ANCHORS = [[0.5, 0.5, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.5, 0.5]]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_optimizer_proposes_the_anchors_first(name):
    opt = make_optimizer(name, SPACE, ANCHORS[0], seed=0, popsize=4, anchors=ANCHORS, genes=(0, 1))
    first = [opt.ask() for _ in range(3)]
    assert [list(p.genotype) for p in first] == ANCHORS
    assert [(p.generation, p.index) for p in first] == [(-1, 0), (-1, 1), (-1, 2)]


def test_cma_waits_for_the_anchors_and_starts_at_the_best():
    opt = make_optimizer("cma", SPACE, ANCHORS[0], seed=0, popsize=4, anchors=ANCHORS)
    first = [opt.ask() for _ in range(3)]
    assert opt.ask() is None  # no sample before every anchor is told
    opt.tell(first[0], Result(0.2))
    opt.tell(first[2], Result(0.9))
    assert opt.ask() is None
    opt.tell(first[1], Result(0.5, violation=0.1))  # infeasible, whatever its fitness
    sample = opt.ask()
    assert sample.generation == 0
    assert list(opt.es.mean) == pytest.approx(ANCHORS[2])
    # one anchor (anchors: false): the classic start at x0, no waiting
    single = make_optimizer("cma", SPACE, ANCHORS[0], seed=0, popsize=4)
    assert single.ask().generation == -1 and single.ask().generation == 0
    # (pycma moves a mean that sits on a bound, here d0 and d1 = 1.0, slightly outward in its own coordinates)
    assert list(single.es.mean)[:2] == pytest.approx(ANCHORS[0][:2])


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_replay_with_anchors_reaches_the_same_state(name):
    from test_loop import MemoryJournal, VirtualRunner

    journal = MemoryJournal()
    opt = make_optimizer(name, SPACE, ANCHORS[0], seed=3, popsize=4, anchors=ANCHORS, genes=(0, 1))
    run_loop(opt, VirtualRunner(3), journal, 14)
    again = make_optimizer(name, SPACE, ANCHORS[0], seed=3, popsize=4, anchors=ANCHORS, genes=(0, 1))
    resume(again, journal.journal())
    assert [again.ask() for _ in range(5)] == [opt.ask() for _ in range(5)]


def fake_model(root: Path, name: str, layers: int = 4) -> str:
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": layers,
        "hidden_size": 64, "vocab_size": 100}))
    return str(path)


def anchors_of(tmp_path, genome: dict, **config):
    from evolve.config import parse_search_config
    from evolve.build import build_genome, search_anchors, starting_point

    cfg = parse_search_config({"genome": genome, "tasks": ["t"], **config})
    g = build_genome(cfg)
    return g, search_anchors(cfg, g, starting_point(cfg, g))


def test_genome_anchors_decode_to_the_hand_made_recipes(tmp_path):
    models = [fake_model(tmp_path, n) for n in ("a", "b", "c")]
    base = fake_model(tmp_path, "base")
    genome, anchors = anchors_of(tmp_path, {"models": models, "base_model": base, "merge_method": "task_arithmetic",
                                            "layer_granularity": 2})
    assert [label for label, _ in anchors] == ["start: weight 1/n each", "weight 1 each"]
    for (_, x), weight in zip(anchors, (1 / 3, 1.0)):
        recipe = genome.decode(x).to_plain()
        weights = [v for m in recipe["slices"][0]["sources"] if "parameters" in m for v in [m["parameters"]["weight"]]] \
            if "slices" in recipe else [m["parameters"]["weight"] for m in recipe["models"] if "parameters" in m]
        assert weights and all(w == pytest.approx(weight) for w in weights), recipe
    genome, anchors = anchors_of(tmp_path, {"models": models, "base_model": base, "merge_method": "ties"})
    assert [label for label, _ in anchors] == ["start: weight 1/n each", "weight 0.333 each, density 0.5"]
    assert sorted(set(anchors[1][1])) == pytest.approx([1 / 3, 0.5])
    genome, anchors = anchors_of(tmp_path, {"models": models, "base_model": base, "merge_method": "ties"}, anchors=False)
    assert len(anchors) == 1
    genome, anchors = anchors_of(tmp_path, {"models": models, "base_model": base,
                                            "merge_method": ["ties", "task_arithmetic"]})
    assert [genome.decode(x).merge_method for _, x in anchors] == ["ties", "ties", "task_arithmetic", "task_arithmetic"]
    deep = fake_model(tmp_path, "deep", 6)
    genome, anchors = anchors_of(tmp_path, {"kind": "layer_path", "models": [models[0], deep], "num_layers": 4})
    paths = [genome.path(x) for _, x in anchors]
    assert [m for m, _, _ in paths[0]] == [0, 0, 0, 0] and [layer for _, layer, _ in paths[0]] == [0, 1, 2, 3]
    assert [m for m, _, _ in paths[1]] == [1, 1, 1, 1] and [layer for _, layer, _ in paths[1]] == [0, 2, 3, 5]


def test_a_user_recipe_is_an_anchor_and_a_bad_one_names_its_key(tmp_path):
    import yaml

    from merge_engine.errors import ConfigError

    models = [fake_model(tmp_path, n) for n in ("a", "b")]
    base = fake_model(tmp_path, "base")
    recipe = tmp_path / "mine.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": base, "models": [
        {"model": models[0], "parameters": {"weight": 0.7}}, {"model": models[1], "parameters": {"weight": 0.2}}]}))
    genome, anchors = anchors_of(tmp_path, {"models": models, "base_model": base, "merge_method": "task_arithmetic"},
                                 anchors=[str(recipe)])
    assert anchors[-1][0] == f"recipe {recipe}" and anchors[-1][1] == pytest.approx([0.7, 0.2])
    with pytest.raises(ConfigError, match=r"anchors\[0\]: .*nowhere.yml"):
        anchors_of(tmp_path, {"models": models, "base_model": base, "merge_method": "task_arithmetic"},
                   anchors=[str(tmp_path / "nowhere.yml")])
