"""`optimizer: gradient` (evolve.gradient, evaluators.descent, merge_engine.methods.differentiable):
the weight derivatives against finite differences of the engine's own merges, Adam against an
independent float64 implementation, the genome's trained genes, the config, the optimiser's
protocol, and exact resume through the real SQLite store."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from evaluators.descent import AdamState, DescentResult, adam_step
from evolve.gradient import ChainedOptimizer, GradientOptimizer, first_stage_budget
from evolve.optimizers import Result, make_optimizer
from merge_engine.methods import METHODS
from merge_engine.methods.common import TensorContext
from merge_engine.methods.differentiable import inner_products, weight_gradients
from search_spaces.genome import SearchSpace

# -- the weight derivatives ----------------------------------------------------------------------


def engine_merge(method: str, tensors, weights, params) -> torch.Tensor:
    """The engine's own merge of float64 tensors (base first for task arithmetic)."""
    base_index = 0 if method == "task_arithmetic" else None
    spec = METHODS[method]
    defaults = {k: v for k, v in spec.model_params.items() if k != "weight"}
    weighted = [{**defaults, "weight": w} for w in weights]
    if base_index is not None:
        weighted = [{**defaults, "weight": 0.0}] + weighted
    full = {k: v for k, v in METHODS[method].global_params.items()}
    full.update(params)
    return METHODS[method].function(tensors, base_index, full, weighted, TensorContext("model.layers.0.mlp.up_proj.weight"))


@pytest.mark.parametrize("method,params", [
    ("task_arithmetic", {"normalize": False}),
    ("task_arithmetic", {"normalize": False, "lambda": 0.7}),
    ("task_arithmetic", {"normalize": True}),
    ("linear", {"normalize": True}),
    ("linear", {"normalize": False}),
])
def test_weight_gradients_match_finite_differences_of_the_engine_merge(method, params):
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    models = [base + 0.3 * torch.randn(6, 5, generator=gen, dtype=torch.float64) for _ in range(3)]
    grad = torch.randn(6, 5, generator=gen, dtype=torch.float64)  # dL/d merged: L = <grad, merged>
    weights = [0.4, 0.9, 0.25]
    tensors = [base] + models if method == "task_arithmetic" else models
    vectors = [m - base for m in models] if method == "task_arithmetic" else models
    got = weight_gradients(method, params, weights, inner_products(grad, vectors))
    def slope(i: int, h: float) -> float:
        up, down = list(weights), list(weights)
        up[i] += h
        down[i] -= h
        loss_up = float((grad * engine_merge(method, tensors, up, params)).sum())
        loss_down = float((grad * engine_merge(method, tensors, down, params)).sum())
        return (loss_up - loss_down) / (2 * h)

    # the engine sums in float32: wide steps keep its rounding small, and Richardson's
    # extrapolation of two central differences cancels their error up to h^4
    h = 0.05
    for i in range(3):
        assert got[i] == pytest.approx((4 * slope(i, h / 2) - slope(i, h)) / 3, rel=1e-4, abs=5e-5)


def test_inner_products_take_the_top_left_block_of_a_larger_embedding():
    grad = torch.ones(2, 3)
    bigger = torch.arange(20, dtype=torch.float32).view(4, 5)
    assert inner_products(grad, [bigger]) == [float(bigger[:2, :3].sum())]


def test_only_the_smooth_methods_have_weight_gradients():
    with pytest.raises(ValueError, match="ties is not differentiable"):
        weight_gradients("ties", {}, [1.0], [1.0])


# -- Adam ----------------------------------------------------------------------------------------


def test_adam_step_is_adam_projected_onto_the_box():
    """Against numpy float64 (Kingma & Ba's update with bias correction), three steps."""
    lr, lo, hi = np.array([0.1, 0.05, 0.2]), np.array([0.0, 0.0, -1.0]), np.array([1.0, 1.0, 0.1])
    x = np.array([0.5, 0.02, 0.0])
    m = v = np.zeros(3)
    state, got = AdamState.fresh(3), list(x)
    for t, g in enumerate([np.array([1.0, 2.0, -3.0]), np.array([-0.5, 1.0, -1.0]), np.array([0.2, 0.1, -2.0])], 1):
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        x = np.clip(x - lr * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8), lo, hi)
        got, state = adam_step(got, list(g), state, tuple(lr), tuple(lo), tuple(hi))
    assert got == pytest.approx(list(x), abs=1e-15)
    assert got[1] == 0.0 and got[2] == 0.1  # pushed against the bounds, kept inside
    assert state.steps == 3 and state.m == pytest.approx(list(m)) and state.v == pytest.approx(list(v))


def test_a_descent_result_survives_json_exactly():
    import json

    result = DescentResult((0.1 + 0.2, 1 / 3), AdamState((1e-17, -0.3), (2.5e-9, 0.7), 12), (0.69, 0.5), 1.25)
    assert DescentResult.from_plain(json.loads(json.dumps(result.to_plain()))) == result


# -- the genome and the config -------------------------------------------------------------------


def genome_of(tmp_path, **genome):
    from evolve.build import build_genome
    from evolve.config import parse_search_config
    from test_selection import fake_model

    models = [fake_model(tmp_path, n) for n in ("a", "b", "base")]
    definition = {"models": models[:2], "base_model": models[2], "merge_method": "task_arithmetic", **genome}
    return build_genome(parse_search_config({"genome": definition, "tasks": ["t"]}))


def test_the_trained_genes_are_the_weights(tmp_path):
    g = genome_of(tmp_path, layer_granularity=2, model_switch=True)
    assert [g.dimensions[i].name for i in g.gradient_genes()] == [
        "g0.a.weight.all", "g0.b.weight.all", "g1.a.weight.all", "g1.b.weight.all"]
    assert g.size == 6  # and two switch genes, never trained


def test_a_ties_genome_trains_its_weights_not_its_densities(tmp_path):
    g = genome_of(tmp_path, merge_method="ties")
    assert [g.dimensions[i].name for i in g.gradient_genes()] == ["g0.a.weight.all", "g0.b.weight.all"]
    assert g.size == 4  # and a density gene per model, held


@pytest.mark.parametrize("genome,why", [
    ({"merge_method": "model_stock"}, "not differentiable in the genes of model_stock"),
    ({"merge_method": "slerp", "base_model": None}, "not differentiable in the genes of slerp"),
    ({"merge_method": ["ties", "task_arithmetic"]}, "not differentiable in the genes of this genome"),
])
def test_a_genome_without_gradient_is_refused_in_one_line(tmp_path, genome, why):
    from evolve.build import check_gradient_genome
    from merge_engine.errors import ConfigError

    if genome.get("merge_method") == "slerp":
        from test_selection import fake_model

        genome = {**genome, "models": [fake_model(tmp_path, "a"), fake_model(tmp_path, "b")]}
    with pytest.raises(ConfigError) as err:
        check_gradient_genome(genome_of(tmp_path, **genome), "gradient")
    message = str(err.value)
    assert why in message and "\n" not in message and message.startswith("optimizer: gradient:")


def test_the_optimizer_list_is_cma_then_gradient():
    from evolve.config import parse_search_config
    from merge_engine.errors import ConfigError

    genome = {"models": ["a", "b"], "base_model": "c", "merge_method": "task_arithmetic"}
    cfg = parse_search_config({"genome": genome, "tasks": ["t"],
                               "optimizer": {"name": ["cma", "gradient"], "learning_rate": 0.05, "loss": "entropy"}})
    assert (cfg.optimizer.name, cfg.optimizer.learning_rate, cfg.optimizer.loss) == ("cma+gradient", 0.05, "entropy")
    with pytest.raises(ConfigError, match=r"must be \[cma, gradient\]"):
        parse_search_config({"genome": genome, "tasks": ["t"], "optimizer": ["tpe", "gradient"]})
    with pytest.raises(ConfigError, match="optimizer.loss"):
        parse_search_config({"genome": genome, "tasks": ["t"], "optimizer": {"name": "gradient", "loss": "mse"}})


# -- the optimiser's protocol --------------------------------------------------------------------

SPACE = SearchSpace(("w0", "w1", "s"), (0.0, 0.0, 0.0), (2.0, 2.0, 1.0))
ANCHORS = [(0.5, 0.5, 0.75), (1.0, 1.0, 0.75)]


def test_the_descent_starts_at_the_best_anchor_and_moves_one_candidate_at_a_time():
    opt = GradientOptimizer(SPACE, ANCHORS[0], seed=4, genes=(0, 1), learning_rate=0.05, gradient_steps=3,
                            batch_size=5, anchors=ANCHORS)
    a, b = opt.ask(), opt.ask()
    assert (a.genotype, b.genotype, a.descent, b.descent) == (ANCHORS[0], ANCHORS[1], None, None)
    assert opt.ask() is None  # it starts at the best anchor: wait for both
    opt.tell(b, Result(0.8))
    opt.tell(a, Result(0.6))
    first = opt.ask()
    assert first.genotype == ANCHORS[1] and opt.ask() is None  # sequential: each starts where the last ended
    request = first.descent
    assert (request.genes, request.start, request.steps, request.batch_size, request.seed) == ((0, 1), (1.0, 1.0), 3, 5, 4)
    assert request.learning_rates == pytest.approx((0.1, 0.1)) and request.adam == AdamState.fresh(2)
    moved = AdamState((0.1, -0.2), (0.01, 0.04), 3)
    opt.tell(first, Result(0.85, descent=DescentResult((1.2, 0.7), moved)))
    second = opt.ask()
    assert second.genotype == (1.2, 0.7, 0.75) and second.descent.adam == moved  # the switch gene is kept
    opt.tell(second, Result(None))  # failed: the next candidate retries from the same point and moments
    third = opt.ask()
    assert third.genotype == second.genotype and third.descent.adam == moved and third.generation == 2


def test_chains_descend_side_by_side_from_the_best_starts_each_with_its_own_batches():
    """chains: 3 with two anchors: chain 0 at the better anchor, chain 1 at the other, chain 2 at a
    seeded point of the trained genes' box (the untrained switch gene from the best); each chain
    continues from its own end point and moments, and draws its own mini-batches."""
    opt = GradientOptimizer(SPACE, ANCHORS[0], seed=4, genes=(0, 1), anchors=ANCHORS, chains=3)
    a, b = opt.ask(), opt.ask()
    opt.tell(a, Result(0.6))
    opt.tell(b, Result(0.8))
    starts = [opt.ask() for _ in range(3)]
    assert opt.ask() is None  # every chain has a candidate running
    assert [p.index for p in starts] == [0, 1, 2] and [p.generation for p in starts] == [0, 1, 2]
    assert starts[0].genotype == ANCHORS[1] and starts[1].genotype == ANCHORS[0]
    rng = random.Random(4)
    assert starts[2].genotype == (rng.uniform(SPACE.lower[0], SPACE.upper[0]), rng.uniform(SPACE.lower[1], SPACE.upper[1]),
                                  ANCHORS[1][2])
    assert [p.descent.seed for p in starts] == [4, 5, 6] and all(p.descent.adam == AdamState.fresh(2) for p in starts)
    moved = AdamState((0.1, -0.2), (0.01, 0.04), 4)
    opt.tell(starts[1], Result(0.7, descent=DescentResult((1.5, 0.25), moved)))
    again = opt.ask()
    assert again.index == 1 and again.genotype == (1.5, 0.25, ANCHORS[0][2]) and again.descent.adam == moved
    assert again.descent.seed == 5 and again.generation == 3 and opt.ask() is None
    # [cma, gradient]: the chains start at the first stage's distinct candidates, best first
    chained = make_optimizer("gradient", SPACE, ANCHORS[0], seed=4, genes=(0, 1), chains=2,
                             starts=[ANCHORS[1], ANCHORS[0]])
    assert [chained.ask().genotype for _ in range(2)] == [ANCHORS[1], ANCHORS[0]]


def test_cma_then_gradient_refines_the_best_of_the_first_stage_without_scoring_an_anchor_again():
    assert first_stage_budget(60, 0.5) == 30 and first_stage_budget(10, 0.25) == 8 and first_stage_budget(2, 0.9) == 1
    opt = make_optimizer("cma+gradient", SPACE, ANCHORS[0], seed=1, popsize=4, anchors=ANCHORS, genes=(0, 1),
                         max_fevals=10, gradient_share=0.4)
    assert isinstance(opt, ChainedOptimizer) and opt.first_budget == 6
    told = []

    def fitness(p):
        return Result(-abs(p.genotype[0] - 1.5) - len(told) * 0.001)

    for _ in range(2):  # the anchors: CMA-ES samples once they are told
        p = opt.ask()
        told.append((p, fitness(p)))
        opt.tell(*told[-1])
    running = []
    for _ in range(4):
        p = opt.ask()
        assert p is not None and p.descent is None
        running.append(p)
    assert opt.ask() is None  # the first stage's budget is spent; its results are not all in
    for p in running:
        told.append((p, fitness(p)))
        opt.tell(*told[-1])
    best = max(told, key=lambda pr: pr[1].fitness)[0].genotype
    refined = opt.ask()
    assert refined.genotype == best and refined.descent is not None and refined.generation == 0


def test_a_gradient_journal_resumes_exactly_from_the_sqlite_store(tmp_path):
    """The real ExperimentStore as the journal: stopped after 6 candidates and resumed, a
    gradient search proposes exactly what the uninterrupted one did (the descent results are
    read back from the study's JSON)."""
    from evolve.loop import resume, run_loop
    from evolve.store import ExperimentStore
    from test_loop import SPACE as LOOP_SPACE, X0, MemoryJournal, VirtualRunner, history

    def build():
        return make_optimizer("gradient", LOOP_SPACE, X0, seed=2, genes=(0, 1, 3), learning_rate=0.07)

    reference = MemoryJournal()
    run_loop(build(), VirtualRunner(1), reference, 14)

    class Stop(Exception):
        pass

    seen = []

    def stop_after_six(candidate, outcome):
        seen.append(candidate.number)
        if len(seen) == 6:
            raise Stop()

    store = ExperimentStore(tmp_path, LOOP_SPACE)
    store.open("config", {}, resume=False)
    with pytest.raises(Stop):
        run_loop(build(), VirtualRunner(1), store, 14, on_outcome=stop_after_six)
    store.close()
    store = ExperimentStore(tmp_path, LOOP_SPACE)
    store.open("config", {}, resume=True)
    optimizer = build()
    state = resume(optimizer, store.journal())
    runner = VirtualRunner(1)
    run_loop(optimizer, runner, store, 14, state)
    store.close()
    got = [(e.candidate.number, e.candidate.genotype, e.outcome.fitness) for e in store.journal()]
    assert runner.evaluations == list(range(6, 14)) and got == history(reference)
    # and the search went downhill: the last candidate is closer to the optimum than the start
    fitness = [f for _, _, f in got if f is not None]
    assert fitness[-1] > fitness[0] + 0.1 and not math.isnan(fitness[-1])


# -- the worker's steps on the real quickstart models --------------------------------------------


def quickstart_worker(quickstart, tmp_path, eval_dtype="float64"):
    """A real worker (resident model, lm-eval tasks) and the quickstart's genome (2 experts x 2
    layer groups of task arithmetic)."""
    from evaluators.worker import CandidateWorker, WorkerSettings
    from evolve.build import build_genome
    from evolve.config import parse_search_config
    from merge_engine.options import MergeOptions

    m = quickstart["models"]
    cfg = parse_search_config({
        "genome": {"models": [str(m["expert_arithmetic"]), str(m["expert_facts"])], "base_model": str(m["base"]),
                   "merge_method": "task_arithmetic", "layer_granularity": 2, "dtype": "float32"},
        "tasks": ["qs_arithmetic", "qs_facts"], "apply_chat_template": False, "fewshot_as_multiturn": False,
        "optimizer": "gradient"})
    genome = build_genome(cfg)
    evaluator = {"kind": "lm_eval", "tasks": [{"name": "qs_arithmetic"}, {"name": "qs_facts"}],
                 "include_paths": [str(quickstart["tasks"])], "apply_chat_template": False,
                 "fewshot_as_multiturn": False, "batch_size": 16}
    worker = CandidateWorker(WorkerSettings(genome.decode(genome.initial()).to_plain(), evaluator,
                                            MergeOptions(device="cpu", quiet=True), eval_dtype=eval_dtype))
    return worker, genome


def request_at(genome, x, **fields):
    from dataclasses import replace

    from evolve.gradient import descent_probes

    opt = GradientOptimizer(genome.space, x, seed=5, genes=genome.gradient_genes(), starts=[x], **fields)
    request = opt.ask().descent
    probes, steps = descent_probes(genome, x, request.genes)
    return replace(request, probes=probes, probe_steps=steps)


def test_the_gene_gradient_is_the_slope_of_the_real_loss(quickstart, tmp_path):
    """The worker's chain rule (model backward -> per-weight -> per-gene through the decoding's
    Jacobian) against central differences of the loss of real merges (float64 model)."""
    from evaluators.descent import Descent

    worker, genome = quickstart_worker(quickstart, tmp_path)
    x = [0.7, 0.4, 1.1, 0.9]
    recipe = genome.decode(x)
    request = request_at(genome, x)
    descent = Descent(worker.merger, worker.evaluator)
    batch = descent.loss.items[::7]
    plan = worker.merger.plan(recipe)
    jac = descent._jacobian(plan, request)
    worker.merger.apply_plan(plan)
    held = []  # gradients alive while the backward pass runs: each is consumed and freed at once
    for p in worker.model.parameters():
        p.register_hook(lambda g: held.append(sum(q.grad is not None for q in worker.model.parameters())) or g)
    _, grads = descent._loss_and_gradients(plan, jac, len(x), batch, "nll")
    assert held and max(held) <= 1
    assert all(p.grad is None for p in worker.model.parameters())
    assert all(p.requires_grad for p in worker.model.parameters())  # as transformers built it

    def loss_at(point) -> float:
        worker.merger.apply(genome.decode(point))
        with torch.no_grad():
            return float(descent.loss.loss(batch, "nll"))

    def slope(k: int, h: float) -> float:
        up, down = list(x), list(x)
        up[k] += h
        down[k] -= h
        return (loss_at(up) - loss_at(down)) / (2 * h)

    for k in range(len(x)):
        expected = (4 * slope(k, 0.01) - slope(k, 0.02)) / 3
        assert grads[k] == pytest.approx(expected, rel=2e-3, abs=1e-5), k
    assert max(abs(g) for g in grads) > 1e-3  # a real signal, not zeros


def test_a_candidate_with_steps_is_scored_then_descends(quickstart, tmp_path):
    """The worker's whole call: scores the candidate like any, then takes the steps; on the full
    batch (every search item) the loss goes down; a request for known scores only steps."""
    from evaluators.descent import DescentResult

    worker, genome = quickstart_worker(quickstart, tmp_path, eval_dtype=None)
    x = genome.initial()
    request = request_at(genome, x, gradient_steps=6, batch_size=1000, learning_rate=0.05)
    from evaluators.worker import CandidateRequest

    plain = worker.evaluate(genome.decode(x).to_plain())
    result = worker.evaluate(CandidateRequest(genome.decode(x).to_plain(), descent=request))
    assert result["status"] == "complete", result["error"]
    assert result["metrics"] == plain["metrics"] and result["item_values"] == plain["item_values"]
    done = DescentResult.from_plain(result["descent"])
    assert done.adam.steps == 6 and len(done.losses) == 6 and done.losses[-1] < done.losses[0] - 0.01
    assert all(lo <= v <= hi for v, lo, hi in zip(done.end, request.lower, request.upper)) and done.end != request.start
    # the same request again gives the same numbers (seeded batches, deterministic maths)
    from dataclasses import replace

    again = worker.evaluate(CandidateRequest(genome.decode(x).to_plain(), descent=replace(request, score=False)))
    assert again["metrics"] == {} and again["items"] == 0
    assert DescentResult.from_plain(again["descent"]).end == pytest.approx(done.end, abs=1e-6)


# -- a whole gradient search through the CLI -----------------------------------------------------


def trial_params(storage) -> dict[int, dict[str, float]]:
    import sqlite3

    con = sqlite3.connect(storage / "study.db")
    rows = con.execute("SELECT t.number, p.param_name, p.param_value FROM trial_params p "
                       "JOIN trials t ON t.trial_id = p.trial_id").fetchall()
    con.close()
    out: dict[int, dict[str, float]] = {}
    for number, name, value in rows:
        out.setdefault(number, {})[name] = value
    return out


@pytest.mark.e2e
@pytest.mark.ray
def test_a_gradient_search_runs_resumes_exactly_and_exports_a_recipe_mergekit_yaml_replays(quickstart, tmp_path):
    """`optimizer: gradient` through mergekit-evolve on a real Ray cluster: the anchors first, then
    candidates that each start where the previous one's steps ended (the first one at the best
    anchor, its scores reused); stopped after 4 candidates and resumed it is the uninterrupted
    search; the exported recipe, merged by mergekit-yaml, is the final model bit for bit."""
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    from helpers import read_model
    from test_search import ENV, run_evolve, search_yaml, trials

    cfg = search_yaml(quickstart, tmp_path / "search.yml", optimizer="gradient", budget=7)
    doc = yaml.safe_load(cfg.read_text())
    doc["optimizer"] = {"name": "gradient", "seed": 1, "learning_rate": 0.05, "gradient_steps": 3, "batch_size": 12}
    cfg.write_text(yaml.safe_dump(doc))
    whole, part = tmp_path / "whole", tmp_path / "part"
    proc = run_evolve(cfg, whole, quickstart["tasks"], "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows, params = trials(whole), trial_params(whole)
    assert len(rows) == 7 and all(r["state"] == "COMPLETE" for r in rows)
    assert [r.get("anchor") is not None for r in rows] == [True, True] + [False] * 5
    assert [("descent" in r) for r in rows] == [False, False] + [True] * 5
    best_anchor = max(rows[:2], key=lambda r: r["value"])
    assert params[2] == params[best_anchor["number"]] and rows[2]["reused_from"] == best_anchor["number"]
    assert rows[2]["value"] == best_anchor["value"] and rows[2].get("items", 0) == 0  # scored once, only stepped
    names = sorted(params[0])  # the study's gene names: g<group>.<model>.weight.all
    for prev, row in zip(rows[2:], rows[3:]):
        assert [params[row["number"]][n] for n in names] == pytest.approx(prev["descent"]["end"], abs=0)
        assert prev["descent"]["steps"] == 3 * (prev["number"] - 1) and len(prev["descent"]["losses"]) == 3
    assert params[6] != params[2]  # it moved

    first = run_evolve(cfg, part, quickstart["tasks"], "--quiet", "--max-fevals", "4")
    assert first.returncode == 0, first.stderr[-3000:]
    again = run_evolve(cfg, part, quickstart["tasks"], "--quiet", "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = trials(part)
    assert [(r["number"], r["value"], r.get("descent", {}).get("end")) for r in resumed] == [
        (r["number"], r["value"], r.get("descent", {}).get("end")) for r in rows]
    assert trial_params(part) == params

    replay = tmp_path / "replay"
    merged = subprocess.run([str(Path(sys.executable).parent / "mergekit-yaml"), str(whole / "best_config.yaml"), str(replay), "--quiet"], env=ENV, capture_output=True, text=True)
    assert merged.returncode == 0, merged.stderr[-2000:]
    final, replayed = read_model(whole / "final_model"), read_model(replay)
    assert final.keys() == replayed.keys() and all(torch.equal(final[k], replayed[k]) for k in final)


# -- the task-vector family with its masks held fixed --------------------------------------------


@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs_ties", "della", "dare_linear", "breadcrumbs"])
@pytest.mark.parametrize("normalize", [True, False])
def test_masked_weight_gradients_are_the_derivative_with_the_masks_held_fixed(method, normalize):
    """The engine's one-hot merges (each model's sparsified vector) put back together with the sign
    election equal the engine's own merge at the weights; and the gradients equal float64 autograd
    through that reconstruction with the masks (and elected signs) detached."""
    from merge_engine.methods.differentiable import masked_weight_gradients
    from merge_engine.methods.task_arithmetic import merge_task_vectors

    spec = METHODS[method]
    variant = spec.task_vector
    gen = torch.Generator().manual_seed(11)
    base = torch.randn(40, 30, generator=gen)  # float32: the sparsifications rank float32 bits
    deltas = [0.1 * torch.randn(40, 30, generator=gen) for _ in range(3)]
    weights, densities = [0.8, 0.5, 1.3], [0.6, 0.5, 0.7]
    params = {**spec.global_params, "normalize": normalize, "lambda": 0.9}
    extras = [0.05] * 3 if variant.extra else None
    ctx = TensorContext("model.layers.0.mlp.up_proj.weight", labels=["a", "b", "c"])
    merged = merge_task_vectors(base, deltas, weights, densities, params, variant, ctx, {}, extras=extras)
    parts = [merge_task_vectors(torch.zeros_like(base), deltas, [float(i == j) for i in range(3)], densities, params,
                                variant, ctx, {}, extras=extras) for j in range(3)]
    assert all(int((p != 0).sum()) < p.numel() for p in parts) or variant.sparsify is None  # sparsified

    w = torch.tensor(weights, dtype=torch.float64, requires_grad=True)
    S = torch.stack(parts).double()
    if variant.consensus:
        majority = torch.where((w.detach().view(-1, 1, 1) * S).sum(0) >= 0, 1.0, -1.0)
        agree = (S * majority > 0).double()
    else:
        agree = torch.ones_like(S)
    numerator = (w.view(-1, 1, 1) * agree * S).sum(0)
    if normalize and variant.consensus:
        divisor = (w.view(-1, 1, 1) * agree).sum(0)
        divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    elif normalize:
        divisor = w.sum()
    else:
        divisor = torch.ones((), dtype=torch.float64)
    rebuilt = numerator / divisor
    assert torch.allclose(rebuilt.detach().float(), merged - base, atol=1e-6, rtol=1e-5)
    grad = torch.randn(40, 30, generator=gen)
    (rebuilt * grad.double()).sum().backward()
    got = masked_weight_gradients(grad, parts, weights, variant.consensus, normalize)
    assert got == pytest.approx(w.grad.tolist(), rel=1e-5, abs=1e-6)
