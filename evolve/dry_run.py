"""`mergekit-evolve search.yml --dry-run`: what a search would do, read from its config and the
models' config.json files alone."""

from __future__ import annotations

import math

from .build import build_genome, resolve_optimizer, search_anchors, starting_point
from .config import SearchConfig


def dry_run_report(config: SearchConfig) -> str:
    genome = build_genome(config)
    config, why = resolve_optimizer(config, genome.size)
    popsize = config.optimizer.popsize or (genome.default_popsize() if config.optimizer.name == "cma" else 8)
    budget = config.budget.max_fevals
    anchors = search_anchors(config, genome, starting_point(config, genome))
    generations = math.ceil(max(budget - len(anchors), 0) / popsize)
    scheme = (
        "a generation barrier (classic CMA-ES)" if config.optimizer.generation_barrier else
        "no generation barrier: free workers get extra samples of the current distribution"
    ) if config.optimizer.name == "cma" else "one candidate per free worker"
    lines = [
        f"genome: {genome.size} dimensions {genome.summary()}",
        *(f"  {line}" for line in genome.describe()),
        f"anchors: {len(anchors)} hand-made recipe(s) scored first, counted in the budget: "
        + "; ".join(label for label, _ in anchors),
        f"optimizer: {config.optimizer.name} ({why}), population {popsize}; {scheme}",
        f"budget: {budget} evaluations ({len(anchors)} for the anchors) -> about {generations} generation(s)"
        + (f", timeout {config.budget.timeout:.0f}s" if config.budget.timeout else ""),
    ]
    if config.objective_tasks:
        lines.append(
            f"objectives: {len(config.objective_tasks)} ({', '.join(t.name for t in config.objective_tasks)}), Pareto front "
            f"exported to pareto/; best_config.yaml is "
            + ("the export rule's pick by weighted sum (see docs/mergekit-evolve.md)" if config.pareto_select == "weighted_sum"
               else f"the front member best on {config.pareto_select}")
        )
    for c in config.constraints:
        bounds = " and ".join(b for b in (c.min is not None and f">= {c.min}", c.max is not None and f"<= {c.max}") if b)
        lines.append(f"constraint: {c.task} {c.metric or '(its metric)'} {bounds}; candidates outside are never exported")
    if config.racing is not None:
        shares = config.racing.fractions
        bound = (f"the candidate's upper bound (z = {config.racing.confidence_z:g}, paired with the best on the items "
                 f"scored) can beat the best")
        lines.append(
            f"racing: {shares[0]:.0%} of each task's items first; the rest only while {bound}" if len(shares) == 1 else
            f"racing: checks after {', '.join(f'{f:.0%}' for f in shares)} of each task's items; scoring goes on only "
            f"while {bound}"
        )
    if config.rescore is not None:
        lines.append(
            f"re-scoring: the top {config.rescore.top_k} distinct recipes on held-out "
            f"{', '.join(t.name for t in config.rescore.tasks)}; the best there is exported"
        )
    if config.optimizer.name == "cma" and budget < 10 * genome.size:
        lines.append(
            f"note: CMA-ES usually needs far more evaluations than dimensions ({budget} for {genome.size}); "
            + ("consider fewer output layers or models, no scale genes, or a larger budget" if config.genome.kind == "layer_path"
               else "consider a coarser layer_granularity, fewer filters, or a larger budget")
        )
    return "\n".join(lines)
