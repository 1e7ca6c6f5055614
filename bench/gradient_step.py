#!/usr/bin/env python3
"""The gradient optimiser's cost per step against a plain evaluation, on a real search worker.

    python bench/gradient_step.py [--experiment smollm|conflict|quickstart] [--layer-granularity N]
        [--steps 4] [--batch-size 8] [--threads 2]

Builds the experiment's search worker (resident model, lm-eval tasks; `make smollm` first for the
SmolLM2 models), scores the genome's starting point once to warm up, then times, on the same
worker and in the same run: a plain evaluation (merge + scoring of every search item), and a
candidate with `--steps` gradient steps of `--batch-size` items after it (evolve.gradient). Prints
seconds per evaluation, per step, the split of a step (merge, forward + backward, chain rule), and
the ratio step / evaluation. The decoding's Jacobian (one plan per gene) is paid once per
candidate and shown on its own line.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experiment", default="smollm", choices=["smollm", "conflict", "quickstart"])
    p.add_argument("--layer-granularity", type=int, default=None, help="the genome's (default: the search.yml's)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.chdir(ROOT)
    import yaml

    from search_quality import experiment

    from evaluators.descent import Descent
    from evaluators.worker import CandidateRequest, CandidateWorker
    from evolve.build import build_genome
    from evolve.config import parse_search_config
    from evolve.gradient import GradientOptimizer, descent_probes
    from evolve.options import EvolveOptions
    from evolve.workers import evaluator_spec, worker_settings

    exp = experiment(args.experiment)
    exp.build()
    task_dir = ROOT / "bench_output" / "gradient_step" / args.experiment / "tasks"
    exp.write_tasks(task_dir)
    doc = yaml.safe_load(exp.search_yml.read_text())
    if args.layer_granularity is not None:
        doc["genome"]["layer_granularity"] = args.layer_granularity
    doc["optimizer"] = {"name": "gradient"}
    config = parse_search_config(doc, str(exp.search_yml))
    from merge_engine.options import MergeOptions

    options = EvolveOptions(storage_path=ROOT / "bench_output" / "gradient_step", task_search_path=[str(task_dir)],
                            merge=MergeOptions(device="cpu", num_threads=args.threads))
    genome = build_genome(config)
    x0 = genome.initial()
    t0 = time.perf_counter()
    worker = CandidateWorker(worker_settings(config, genome, options, x0, evaluator_spec(config, options)))
    print(f"worker ready in {time.perf_counter() - t0:.1f}s; genome: {genome.size} genes "
          f"({len(genome.gradient_genes())} trained), {args.threads} threads", flush=True)
    recipe = genome.decode(x0)
    worker.evaluate(recipe.to_plain())  # warm-up: first-use costs are not what a search pays per candidate

    t0 = time.perf_counter()
    plain = worker.evaluate(recipe.to_plain())
    evaluation = time.perf_counter() - t0
    items = plain["items"]

    request = GradientOptimizer(genome.space, x0, genes=genome.gradient_genes(), gradient_steps=args.steps,
                                batch_size=args.batch_size, starts=[x0]).ask().descent
    t0 = time.perf_counter()
    probes, steps = descent_probes(genome, x0, request.genes)
    probe_s = time.perf_counter() - t0
    request = replace(request, probes=probes, probe_steps=steps)
    descent = worker.descent = Descent(worker.merger, worker.evaluator)
    t0 = time.perf_counter()
    jac = descent._jacobian(worker.merger.plan(recipe), request)
    jacobian_s = time.perf_counter() - t0

    # one step, in its parts (what Descent.run does per step)
    plan = descent._plan_at(worker.merger.plan(recipe), jac, [0.1] * len(request.genes))
    t0 = time.perf_counter()
    worker.merger.apply_plan(plan)
    merge_s = time.perf_counter() - t0
    batch = descent.loss.items[: args.batch_size]
    t0 = time.perf_counter()
    descent._loss_and_gradients(plan, jac, len(request.genes), batch, "nll")
    backward_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    result = worker.evaluate(CandidateRequest(recipe.to_plain(), descent=replace(request, score=False)))
    steps_s = time.perf_counter() - t0
    if result["status"] != "complete":
        raise SystemExit(f"the gradient steps failed: {result['error']}")
    per_step = result["descent"]["seconds"] / args.steps

    print(f"\nexperiment {args.experiment}, {genome.size} genes, batch {args.batch_size} items, {args.threads} threads")
    print("| what | seconds | x evaluation |")
    print("|---|---|---|")
    print(f"| evaluation ({items} search items, merge included) | {evaluation:.2f} | 1.00 |")
    print(f"| gradient step, whole (mean of {args.steps}) | {per_step:.2f} | {per_step / evaluation:.2f} |")
    print(f"| - merge of every changed tensor | {merge_s:.2f} | {merge_s / evaluation:.2f} |")
    print(f"| - loss forward + backward + chain rule | {backward_s:.2f} | {backward_s / evaluation:.2f} |")
    print(f"| per candidate: probe recipes (driver) | {probe_s:.2f} | {probe_s / evaluation:.2f} |")
    print(f"| per candidate: Jacobian, one plan per gene (worker) | {jacobian_s:.2f} | {jacobian_s / evaluation:.2f} |")
    print(f"| a candidate's {args.steps} steps, known scores (worker call) | {steps_s:.2f} | {steps_s / evaluation:.2f} |")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "bench"))
    raise SystemExit(main())
