"""Building a search's parts from its config: the genome, the starting point, the anchors and the
optimiser (the dry run and the driver build them alike)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from merge_engine.errors import ConfigError
from search_spaces.genome import Differentiability, Genome, distinct_anchors, parameter_genome, read_num_layers
from search_spaces.layer_path import LayerPathGenome

from .config import SearchConfig
from .model_refs import check_experiment_references
from .optimizers import Optimizer, make_optimizer


def build_genome(config: SearchConfig) -> Genome:
    check_experiment_references(config.genome)  # before a layer count is looked for (the dry run too)
    counts = {str(ref): read_num_layers(ref) for ref in config.genome.models}
    if config.genome.kind == "layer_path":  # models of different depths may share a layer path
        return LayerPathGenome(config.genome, [counts[str(ref)] for ref in config.genome.models])
    if config.genome.base_model is not None:
        counts[str(config.genome.base_model)] = read_num_layers(config.genome.base_model, key="genome.base_model")
    if len(set(counts.values())) > 1:
        raise ConfigError(f"genome.models: models have different layer counts: {counts}")
    return parameter_genome(config.genome, next(iter(counts.values())))


def starting_point(config: SearchConfig, genome: Genome) -> list[float]:
    if config.random_init:
        import random

        rng = random.Random(config.optimizer.seed)
        return [rng.uniform(d.low, d.high) for d in genome.dimensions]
    return genome.initial()


# The default optimiser, from bench/search_quality.py (docs/search-quality.md): CMA-ES with
# mergekit-evolve's step beat TPE, NSGA-II, random search and CMA-ES with a wider step (0.3) on
# both experiments, at 7 and 12 evaluations per gene. Below a few evaluations per gene CMA-ES has
# too few generations to adapt (not measured: a judgement), so TPE takes those budgets.
CMA_MIN_EVALS_PER_GENE = 5
DEFAULT_SIGMA0 = 1 / 6  # relative to each gene's range


def resolve_optimizer(config: SearchConfig, genome_size: int, chosen: Optional[str] = None) -> tuple[SearchConfig, str]:
    """(the config with its optimiser fixed, why that one). A config that names an optimiser gets
    it; otherwise `chosen` (what a resumed experiment started with), else the default rule."""
    opt = config.optimizer
    if opt.name is not None:
        name, why = opt.name, "named in the config"
    elif chosen is not None:
        name, why = chosen, "chosen when this experiment started"
    elif config.objective_tasks:
        name, why = "nsga2", "the default for several objectives"
    else:
        per_gene = config.budget.max_fevals / max(genome_size, 1)
        name = "cma" if per_gene >= CMA_MIN_EVALS_PER_GENE else "tpe"
        why = (f"the default for {config.budget.max_fevals} evaluations over {genome_size} genes ({per_gene:.1f} per gene; "
               f"CMA-ES from {CMA_MIN_EVALS_PER_GENE} per gene, TPE below)")
    sigma0 = opt.sigma0 or DEFAULT_SIGMA0
    return config.model_copy(update={"optimizer": opt.model_copy(update={"name": name, "sigma0": sigma0})}), why


def search_anchors(config: SearchConfig, genome: Genome, x0: list[float]) -> list[tuple[str, list[float]]]:
    """(label, genotype) of the recipes scored before the optimiser's own proposals: the starting
    point `x0` first, then (unless `anchors: false`) the genome's hand-made recipes, then the
    user's `anchors:` recipe files, each once."""
    builtin = genome.anchors() if config.anchors is not False else []
    start = builtin[0][0] if builtin and builtin[0][1] == list(x0) else "start"
    out = [(start, list(x0))] + builtin[1:]
    for i, path in enumerate(config.anchors if isinstance(config.anchors, list) else []):
        from merge_engine.config import load_config

        try:
            recipe, _ = load_config(Path(path))
            x = genome.encode(recipe)
        except (ConfigError, OSError) as err:
            raise ConfigError(f"anchors[{i}]: {path}: {str(err).splitlines()[0]}") from None
        out.append((f"recipe {path}", list(x)))
    return distinct_anchors(out)


def build_optimizer(config: SearchConfig, genome: Genome, x0: list[float],
                    anchors: Optional[list[tuple[str, list[float]]]] = None) -> Optimizer:
    """`anchors`: search_anchors' result when the caller has it (the user's recipe files are read once)."""
    opt = config.optimizer
    anchors = search_anchors(config, genome, x0) if anchors is None else anchors
    gradient = {}
    if opt.name in ("gradient", "cma+gradient"):
        check_gradient_genome(genome, opt.name)
        gradient = {"genes": genome.gradient_genes(), "learning_rate": opt.learning_rate, "batch_size": opt.batch_size,
                    "gradient_steps": opt.gradient_steps, "loss": opt.loss, "gradient_share": opt.gradient_share,
                    "chains": opt.chains}
    return make_optimizer(
        opt.name, genome.space, x0, opt.seed, popsize=opt.popsize, sigma0=opt.sigma0,
        max_fevals=config.budget.max_fevals, generation_barrier=opt.generation_barrier,
        objectives=max(len(config.objective_tasks), 1), constraints=bool(config.constraints),
        anchors=[x for _, x in anchors], **gradient,
    )


def check_gradient_genome(genome: Genome, name: str) -> None:
    """The gradient optimiser needs a merge differentiable in the genes, with the genes' decoding
    affine (search_spaces: Differentiability FULL, or MASKS_FIXED: the TIES family's weights with
    its masks held fixed): one line naming what stands in the way."""
    if genome.differentiable != Differentiability.NONE and genome.gradient_genes():
        return
    method = getattr(genome, "method", None) or "this genome"
    raise ConfigError(
        f"optimizer: {name}: the merge is not differentiable in the genes of {method} (a layer path, a method list, "
        "slerp, model_stock and the SVD methods are not); use linear or the task-arithmetic family "
        "(task_arithmetic, ties, dare_ties, ...), or another optimizer")
