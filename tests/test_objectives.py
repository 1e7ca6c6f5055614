"""Objectives, constraints, selection, re-scoring bookkeeping, racing's rule and the optimisers'
handling of them, without Ray (the end-to-end runs are in test_search.py)."""

from __future__ import annotations

import json
import math
import random

import optuna
import pytest

from evaluators.racing import paired_difference, paired_estimate, should_stop, split_stages
from evolve.config import parse_search_config
from evolve.objectives import Scoring
from evolve.optimizers import Result, make_optimizer
from search_spaces.genome import SearchSpace
from evolve.rescore import Rescoring, read_rescore, top_candidates
from evolve.selection import CandidateRow, exported
from evolve.store import recipe_hash, round_to_dtype
from merge_engine.config import parse_config

BASE = {"genome": {"models": ["a", "b"], "merge_method": "linear"}, "tasks": ["x", "y"]}


def config(**extra):
    return parse_search_config({**BASE, **extra})


def test_scoring_fitness_objectives_and_violation():
    cfg = config(tasks=[{"name": "x", "weight": 2.0}, {"name": "ppl", "metric": "word_perplexity,none", "weight": 0.5}],
                 objectives="pareto", optimizer="nsga2",
                 constraints=[{"task": "ppl", "max": 20.0}, {"task": "x", "metric": "acc_norm,none", "min": 0.4}])
    scoring = Scoring.for_search(cfg, {"x": "maximize", "ppl": "minimize"})
    metrics = {"x": 0.75, "ppl": 23.0, "x:acc_norm,none": 0.3}
    scored = scoring.score(metrics)
    assert scored.fitness == pytest.approx(2.0 * 0.75 - 0.5 * 23.0)
    assert scored.objectives == (0.75, -23.0)
    assert scored.violation == pytest.approx((23.0 - 20.0) + (0.4 - 0.3))
    assert scoring.score({"x": 0.75, "ppl": 19.0, "x:acc_norm,none": 0.5}).violation == 0.0
    with pytest.raises(KeyError):
        scoring.score({"x": 0.75, "ppl": 19.0})  # the constraint's metric was not reported


def test_selection_ignores_infeasible_and_follows_the_declared_rule():
    cfg = config(objectives="pareto", optimizer="random", pareto_select="y")
    scoring = Scoring.for_search(cfg, {})
    rows = [
        CandidateRow(0, 1.9, {"x": 1.0, "y": 0.9}, violation=0.5),  # infeasible
        CandidateRow(1, 1.2, {"x": 0.9, "y": 0.3}),
        CandidateRow(2, 1.0, {"x": 0.2, "y": 0.8}),
        CandidateRow(3, 0.9, {"x": 0.1, "y": 0.8}),  # dominated by 2
    ]
    assert [r.number for r in scoring.front(rows)] == [1, 2]
    assert exported(rows, scoring).number == 2  # best on y among the front
    weighted = Scoring.for_search(config(objectives="pareto", optimizer="random"), {})
    assert exported(rows, weighted).number == 1  # best feasible weighted sum (no anchor among the rows)
    assert exported([rows[0]], weighted) is None


def test_config_errors_name_the_problem():
    cases = [
        ({"objectives": "pareto", "optimizer": "cma"}, "cma optimises one number"),
        ({"tasks": [{"name": "x", "objective": True}, "y"]}, "two or more objective tasks"),
        ({"constraints": [{"task": "z", "max": 1}]}, "constraints.0.task: 'z' is not one of the search tasks"),
        ({"constraints": [{"task": "x", "min": 2, "max": 1}]}, "min 2.0 is above max 1.0"),
        ({"racing": True, "objectives": "pareto", "optimizer": "tpe"}, "cannot be combined with a Pareto search"),
        ({"pareto_select": "nope"}, "neither weighted_sum nor a task name"),
        ({"rescore": {"tasks": []}}, "rescore.tasks"),
    ]
    for extra, message in cases:
        with pytest.raises(Exception, match=message):
            config(**extra)
    assert config(racing=True).racing.fractions == [0.2, 0.5]


def test_top_candidates_are_distinct_feasible_and_ranked():
    rows = [
        CandidateRow(0, 0.5, recipe_hash="a"),
        CandidateRow(1, 0.9, recipe_hash="b"),
        CandidateRow(2, 0.9, recipe_hash="b"),  # the same recipe again
        CandidateRow(3, 0.95, recipe_hash="c", violation=1.0),  # infeasible
        CandidateRow(4, 0.7, recipe_hash="d"),
    ]
    assert [r.number for r in top_candidates(rows, 3)] == [1, 4, 0]


def test_rescoring_table_picks_the_best_held_out_and_resumes(tmp_path):
    cfg = config(rescore={"tasks": ["h1", {"name": "h2", "weight": 2.0}], "top_k": 2})
    rows = [CandidateRow(n, f, recipe_hash=h)
            for n, f, h in ((0, 0.4, "a"), (1, 0.9, "b"), (2, 0.8, "c"))]
    scoring = Scoring(cfg.rescore.tasks, {})
    table = Rescoring(tmp_path, cfg.rescore.tasks, 2)
    table.select(rows)
    assert table.pending() == [1, 2] and table.chosen is None
    table.record(1, "complete", {"h1": 0.5, "h2": 0.25}, scoring)  # held-out 1.0
    assert table.chosen is None  # trial 2 not scored yet
    # a stop here; the resumed search reads the table back and scores only what is missing
    again = Rescoring(tmp_path, cfg.rescore.tasks, 2)
    again.select(rows)
    assert again.pending() == [2]
    again.record(2, "complete", {"h1": 0.6, "h2": 0.3}, scoring)  # held-out 1.2: beats trial 1
    saved = read_rescore(tmp_path)
    assert saved["chosen"] == 2
    assert [(r["number"], r["heldout_fitness"]) for r in saved["rows"]] == [(1, pytest.approx(1.0)), (2, pytest.approx(1.2))]
    assert json.loads((tmp_path / "rescore.json").read_text())["tasks"] == ["h1", "h2"]


def test_paired_racing_rule_numbers():
    """The bound against numbers worked out by hand (see evaluators.racing's docstring)."""
    weights = {"a": 1.0, "b": -0.5}  # b is minimised
    sizes = {"a": 20, "b": 8}
    cand = {"a": [1, 1, 0, 1, 0], "b": [0.2, 0.4]}
    best = {"a": [1, 0, 0, 1, 1], "b": [0.1, 0.1]}
    # a: d = 0 1 0 0 -1, mean 0, s^2 = 2/4, term 1 * 0.5 * (1 - 5/20) / 5 = 0.075
    # b: d = 0.1 0.3, mean 0.2, s^2 = 0.02, term 0.25 * 0.02 * (1 - 2/8) / 2 = 0.001875
    mean, variance = paired_difference(cand, best, sizes, weights)
    assert mean == pytest.approx(-0.1, abs=1e-15) and variance == pytest.approx(0.076875, abs=1e-15)
    threshold = 0.1 / math.sqrt(0.076875)  # the z at which the bound is exactly 0
    assert should_stop(cand, best, sizes, weights, threshold * 0.999)
    assert not should_stop(cand, best, sizes, weights, threshold * 1.001)
    assert not should_stop(cand, None, sizes, weights, 0.01)  # nothing to beat yet
    # the stopped candidate's estimate: best fitness + sum of w * (its mean - the best's on the same items)
    assert paired_estimate(cand, 0.9, best, weights) == pytest.approx(0.9 + (0.6 - 0.6) - 0.5 * (0.3 - 0.1), abs=1e-15)


def test_paired_rule_edge_cases():
    w = {"t": 1.0}
    same = {"t": [1, 0, 1, 1]}
    assert not should_stop(same, same, {"t": 40}, w, 1.0)  # a twin of the best on the first items is not stopped
    worse = {"t": [0, 0, 0, 0]}
    assert should_stop(worse, {"t": [1, 1, 1, 1]}, {"t": 40}, w, 3.0)  # lost every item: no spread, stopped
    # every item scored in the first stage: the difference is exact, no variance
    assert paired_difference({"t": [0, 1]}, {"t": [1, 1]}, {"t": 2}, w) == (-0.5, 0.0)
    # a single first item out of several says nothing about the spread: never stopped
    assert paired_difference({"t": [0]}, {"t": [1]}, {"t": 5}, w) == (-1.0, math.inf)
    assert paired_difference({"t": [0], "u": [1, 1]}, {"t": [1], "u": [0, 0]}, {"t": 5, "u": 2}, {"t": 1.0, "u": 2.0}) == (1.0, math.inf)
    assert not should_stop({"t": [0]}, {"t": [1]}, {"t": 5}, w, 0.1)
    with pytest.raises(ValueError, match="task t: 5 scored values against the best's 4"):
        paired_difference({"t": [0, 1, 1, 1, 1]}, same, {"t": 40}, w)
    with pytest.raises(ValueError, match="task t: 5 scored values against the best's 4"):
        paired_estimate({"t": [0, 1, 1, 1, 1]}, 1.0, same, w)


def test_paired_bound_has_its_stated_coverage():
    """Over many seeded splits of one fixed population of per-item differences, the one-sided
    bound at z = 1 misses the true full-task difference about Φ(-1) = 15.9 % of the time. Without
    the finite-population factor it misses 13.1 % here (too loose), with a (N-n)/N scaling of s/sqrt(n)
    19 % (too tight); the tolerance separates those."""
    rng = random.Random(5)
    size = 400
    d = [rng.choice((-1, 0, 0, 0, 0, 0, 1, 1)) for _ in range(size)]
    candidate = [1 if x > 0 else 0 for x in d]
    best = [1 if x < 0 else 0 for x in d]  # candidate - best = d item by item
    truth = math.fsum(d) / size
    misses, draws = 0, 4000
    for k in range(draws):
        first, _ = split_stages(range(size), [0.25], f"coverage/{k}")
        mean, variance = paired_difference({"t": [candidate[i] for i in first]}, {"t": [best[i] for i in first]},
                                           {"t": size}, {"t": 1.0})
        misses += mean + math.sqrt(variance) < truth
    assert 0.14 < misses / draws < 0.18


def test_split_stages_one_stage_is_the_split_stored_studies_used():
    """One fraction: a seeded share (at least one item) and the rest, both sorted, exactly the
    split studies stored before there were several stages (so they resume pairing alike)."""
    items = list(range(3, 103))
    first, rest = split_stages(items, [0.25], "0/race/t")
    order = list(items)
    random.Random("0/race/t").shuffle(order)  # the stored rule: shuffle with the seed, cut at round(f * N)
    assert first == sorted(order[:25]) and rest == sorted(order[25:])
    assert split_stages(items, [0.25], "0/race/t") == [first, rest]
    assert split_stages(items, [0.25], "1/race/t")[0] != first
    assert split_stages([7], [0.25], "s") == [[7], []]
    assert split_stages(range(10), [0.01], "s")[0] != []  # at least one item first


def test_split_stages_are_nested_prefixes_of_one_order():
    items = list(range(200, 297))  # 97 items
    stages = split_stages(items, [0.2, 0.5], "0/race/t")
    order = list(items)
    random.Random("0/race/t").shuffle(order)
    # cumulative counts round(0.2 * 97) = 19 and round(0.5 * 97) = 48 (round half to even), then the rest
    assert [len(s) for s in stages] == [19, 29, 49]
    assert stages == [sorted(order[:19]), sorted(order[19:48]), sorted(order[48:])]
    assert sorted(stages[0] + stages[1] + stages[2]) == items
    # the first stage is the one-stage split's first stage, the first two that of fraction 0.5
    assert stages[0] == split_stages(items, [0.2], "0/race/t")[0]
    assert sorted(stages[0] + stages[1]) == split_stages(items, [0.5], "0/race/t")[0]
    assert [len(s) for s in split_stages(items, [0.15, 0.4, 0.7], "x")] == [15, 24, 29, 29]
    # few items: a stage that rounding leaves empty stays in its place (stage numbers agree across tasks)
    assert [len(s) for s in split_stages(range(3), [0.2, 0.5], "s")] == [1, 1, 1]
    assert [len(s) for s in split_stages(range(2), [0.2, 0.3], "s")] == [1, 0, 1]
    assert [len(s) for s in split_stages(range(1), [0.2, 0.5], "s")] == [1, 0, 0]


def test_two_stage_stop_rule_against_a_float64_hand_computation():
    """After stage 2 the bound uses every item scored so far (n_t = stages 1 + 2) and the best's
    values on the same items: the prefix of its stage-ordered list."""
    weights = {"a": 1.0, "b": -2.0}
    sizes = {"a": 10, "b": 6}
    best = {"a": [1, 0, 1, 1, 0, 1, 0], "b": [0.5, 0.25, 0.75, 0.5]}  # stages 1 + 2 (+ a 3rd's: never read)
    stage1 = {"a": [1, 1, 0], "b": [0.5, 0.5]}
    stage2 = {"a": [1, 1, 0, 0, 0], "b": [0.5, 0.5, 0.75, 0.25]}
    # stage 1: a: d = 0 1 -1, m = 0, s^2 = 1, term 1 * 1 * (1 - 3/10) / 3 = 0.7/3
    #          b: d = 0 0.25, m = 0.125, s^2 = 0.03125, term 4 * 0.03125 * (1 - 2/6) / 2 = 1/24
    # mean -0.25; bound at z = 1: -0.25 + sqrt(0.7/3 + 1/24) = 0.2744: not stopped
    mean1, var1 = paired_difference(stage1, best, sizes, weights)
    assert mean1 == -0.25 and var1 == pytest.approx(0.7 / 3 + 1 / 24, rel=1e-15)
    assert not should_stop(stage1, best, sizes, weights, 1.0)
    # stage 2: a: d = 0 1 -1 -1 0, m = -0.2, s^2 = (0.04 + 1.44 + 0.64 + 0.64 + 0.04) / 4 = 0.7,
    #          term 0.7 * (1 - 5/10) / 5 = 0.07
    #          b: d = 0 0.25 0 -0.25, m = 0, s^2 = 0.125 / 3, term 4 * (0.125/3) * (1 - 4/6) / 4 = 0.125/9
    # mean -0.2; bound -0.2 + sqrt(0.07 + 0.125/9) = 0.0897 at z = 1: not stopped; at z = 0.5 stopped
    mean2, var2 = paired_difference(stage2, best, sizes, weights)
    assert mean2 == pytest.approx(-0.2, abs=1e-15) and var2 == pytest.approx(0.07 + 0.125 / 9, rel=1e-14)
    threshold = 0.2 / math.sqrt(0.07 + 0.125 / 9)
    assert should_stop(stage2, best, sizes, weights, threshold * 0.999)
    assert not should_stop(stage2, best, sizes, weights, threshold * 1.001)
    # stopped after stage 2: the estimate is the best's fitness plus the difference on stages 1 + 2
    assert paired_estimate(stage2, 1.5, best, weights) == pytest.approx(1.5 - 0.2 - 2.0 * 0.0, abs=1e-15)
    # ... not the one on stage 1 (which the best's first values alone would give)
    assert paired_estimate(stage1, 1.5, best, weights) == pytest.approx(1.5 - 0.25, abs=1e-15)


def test_recipe_hash_counts_weights_as_the_engine_rounds_them():
    def recipe(w):
        return parse_config({"merge_method": "linear", "dtype": "bfloat16",
                             "models": [{"model": "a", "parameters": {"weight": w}}, {"model": "b", "parameters": {"weight": 0.5}}]})

    assert recipe_hash(recipe(0.3)) == recipe_hash(recipe(0.3 + 1e-5))  # the same bfloat16 weight
    assert round_to_dtype(0.3, "bfloat16") == round_to_dtype(0.3 + 1e-5, "bfloat16") == 0.30078125
    assert recipe_hash(recipe(0.3)) != recipe_hash(recipe(0.32))


SPACE = SearchSpace(("u", "v"), (0.0, 0.0), (1.0, 1.0))


def test_nsga2_searches_two_objectives_with_constraints():
    opt = make_optimizer("nsga2", SPACE, [0.5, 0.5], seed=1, objectives=2, constraints=True, popsize=6)
    for _ in range(30):
        p = opt.ask()
        u, v = p.genotype
        violation = max(0.0, 0.2 - v)  # v below 0.2 is infeasible
        opt.tell(p, Result(u + v, (u, 1.0 - u * v), violation))
    trials = opt.study.get_trials()
    assert len(trials) == 30 and all(len(t.values) == 2 for t in trials)
    infeasible = [t for t in trials if t.params["v"] < 0.2]
    assert infeasible and all(t.system_attrs["constraints:violation"] == pytest.approx(0.2 - t.params["v"]) for t in infeasible)
    assert all(t.system_attrs["constraints:violation"] == 0.0 for t in trials if t.params["v"] >= 0.2)
    with pytest.raises(ValueError, match="several objectives need"):
        make_optimizer("cma", SPACE, [0.5, 0.5], seed=1, objectives=2)


def test_a_stopped_candidate_is_a_pruned_trial_with_its_estimate():
    opt = make_optimizer("tpe", SPACE, [0.5, 0.5], seed=1)
    p = opt.ask()
    opt.tell(p, Result(0.25, stopped=True))
    trial = opt.study.get_trials()[0]
    assert trial.state == optuna.trial.TrialState.PRUNED and trial.intermediate_values == {0: 0.25}


def test_cma_ranks_infeasible_after_feasible_and_failed_last():
    opt = make_optimizer("cma", SPACE, [0.5, 0.5], seed=1, popsize=4)
    opt.ask()  # the starting point
    proposals = [opt.ask() for _ in range(4)]
    seen = {}
    original = opt.es.tell

    def spy(xs, losses, **kw):
        seen["losses"] = list(losses)
        return original(xs, losses, **kw)

    opt.es.tell = spy
    results = [Result(0.9), Result(2.0, violation=0.5), Result(None), Result(0.1)]
    for p, r in zip(proposals, results):
        opt.tell(p, r)
    feasible, infeasible, failed, worse = seen["losses"]
    assert feasible == -0.9 and worse == -0.1
    assert failed > infeasible > worse  # the infeasible one's high fitness does not help it


def test_default_optimizer_follows_the_budget_per_gene_and_a_named_one_is_kept():
    from evolve.build import CMA_MIN_EVALS_PER_GENE, resolve_optimizer

    small = config(budget={"max_fevals": CMA_MIN_EVALS_PER_GENE * 6 - 1})
    resolved, why = resolve_optimizer(small, 6)
    assert resolved.optimizer.name == "tpe" and "per gene" in why
    large, why = resolve_optimizer(config(budget={"max_fevals": CMA_MIN_EVALS_PER_GENE * 6}), 6)
    assert (large.optimizer.name, large.optimizer.sigma0) == ("cma", 1 / 6)
    named, why = resolve_optimizer(config(optimizer="cma", budget={"max_fevals": 10}), 6)
    assert (named.optimizer.name, named.optimizer.sigma0, why) == ("cma", 1 / 6, "named in the config")
    resumed, why = resolve_optimizer(small, 6, chosen="cma")  # what the experiment started with wins
    assert resumed.optimizer.name == "cma" and "started" in why
    assert resolve_optimizer(config(objectives="pareto"), 6)[0].optimizer.name == "nsga2"
