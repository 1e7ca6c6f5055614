"""The driver of one search: builds the parts and wires them together.

    genome (search_spaces) ─ optimizer (evolve.optimizers) ─ loop (evolve.loop)
                                         │                        │
                            store (evolve.store)         pool of Ray workers (evolve.pool,
                            journal + checkpoint          evolve.cluster, evaluators.worker)

The driver never loads model weights: it reads config.json files, decodes genotypes into recipes
and sends them to workers, each of which holds a resident model. A stopped run (Ctrl-C, SIGTERM,
a killed process, a timeout) continues with `--resume` exactly where it stopped: the optimiser is
rebuilt from its checkpoint and the journal, and no finished candidate is evaluated again.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from merge_engine.errors import ConfigError
from merge_engine.threads import thread_environment
from search_spaces.genome import SearchGenome as Genome, parameter_genome, read_num_layers
from search_spaces.layer_path import LayerPathGenome

from .config import SearchConfig
from .model_refs import check_genome_models
from .loop import Candidate, JournalMismatch, LoopState, Outcome, resume, run_loop
from .optimizers import Optimizer, SearchSpace, make_optimizer
from .report import RunRecord, StatusLine, append_run, export_best, faults_text, overhead_text, search_summary
from .store import ExperimentStore, recipe_hash

log = logging.getLogger(__name__)

BENCHMARK_PREFIXES = (
    "mmlu", "hendrycks", "agieval", "gsm8k", "hellaswag", "winogrande", "arc_", "ai2_arc",
    "truthfulqa", "bigbench", "piqa", "openbookqa", "leaderboard",
)


@dataclass
class EvolveOptions:
    storage_path: Path
    resume: bool = False
    num_workers: Optional[int] = None
    ray_address: Optional[str] = None
    task_search_path: list[str] = field(default_factory=list)
    save_final_model: bool = True
    merge_seed: int = 0
    device: str = "auto"
    batch_size: int = 16
    allow_crimes: bool = False
    allow_benchmark_tasks: bool = False
    quiet: bool = False
    threads_per_worker: Optional[int] = None
    lora_merge_cache: Optional[str] = None  # None: <storage_path>/lora_merge_cache
    lora_merge_dtype: Optional[str] = None
    candidate_timeout: Optional[float] = None  # seconds; a candidate running longer is cancelled
    gpus_per_worker: Optional[float] = None  # None: 1 when the cluster has GPUs (and --device allows)
    cpus_per_worker: float = 1.0

    @property
    def lora_cache(self) -> str:
        return str(self.lora_merge_cache or Path(self.storage_path) / "lora_merge_cache")

    def merge_options(self, **extra):
        from merge_engine.options import MergeOptions

        return MergeOptions(
            device=self.device, random_seed=self.merge_seed, allow_crimes=self.allow_crimes, quiet=True,
            lora_merge_cache=self.lora_cache, lora_merge_dtype=self.lora_merge_dtype, **extra,
        )


# -- building the parts ---------------------------------------------------------------------------


def build_genome(config: SearchConfig) -> Genome:
    counts = {str(ref): read_num_layers(ref) for ref in config.genome.models}
    if config.genome.kind == "layer_path":  # models of different depths may share a layer path
        return LayerPathGenome(config.genome, [counts[str(ref)] for ref in config.genome.models])
    if config.genome.base_model is not None:
        counts[str(config.genome.base_model)] = read_num_layers(config.genome.base_model, key="genome.base_model")
    if len(set(counts.values())) > 1:
        raise ConfigError(f"genome.models: models have different layer counts: {counts}")
    return parameter_genome(config.genome, next(iter(counts.values())))


def search_space(genome: Genome) -> SearchSpace:
    return SearchSpace(tuple(d.name for d in genome.dimensions), tuple(genome.lower), tuple(genome.upper))


def starting_point(config: SearchConfig, genome: Genome) -> list[float]:
    if config.random_init:
        import random

        rng = random.Random(config.optimizer.seed)
        return [rng.uniform(d.low, d.high) for d in genome.dimensions]
    return genome.initial()


def build_optimizer(config: SearchConfig, genome: Genome, x0: list[float]) -> Optimizer:
    opt = config.optimizer
    return make_optimizer(
        opt.name, search_space(genome), x0, opt.seed, popsize=opt.popsize, sigma0=opt.sigma0,
        max_fevals=config.budget.max_fevals, generation_barrier=opt.generation_barrier,
    )


def check_tasks(config: SearchConfig, options: EvolveOptions) -> None:
    """Unknown tasks and benchmark tasks are refused before any model is loaded."""
    names = [t.name for t in config.tasks]
    if not options.allow_benchmark_tasks:
        flagged = [n for n in names if n.startswith(BENCHMARK_PREFIXES) and not n.endswith("_train")]
        if flagged:
            raise ConfigError(
                f"tasks: {', '.join(flagged)} look like public benchmarks; optimising on a test set "
                "overfits it (pass --i-understand-the-depths-of-the-evils-i-am-unleashing to allow)"
            )
    for path in options.task_search_path:
        if not Path(path).is_dir():
            raise ConfigError(f"--task-search-path {path}: not a directory")
    try:
        from lm_eval.tasks import TaskManager

        manager = TaskManager(
            include_path=list(options.task_search_path) or None, include_defaults=not options.task_search_path
        )
        unknown = [n for n in names if n not in manager.all_tasks]
    except Exception as err:  # lm-eval could not index the tasks
        raise ConfigError(f"tasks: cannot index lm-eval tasks: {err}") from None
    if unknown:
        where = f" (searched {', '.join(options.task_search_path)})" if options.task_search_path else ""
        raise ConfigError(f"tasks: unknown lm-eval task(s) {', '.join(unknown)}{where}")


def evaluator_spec(config: SearchConfig, options: EvolveOptions) -> dict:
    return {
        "kind": "lm_eval",
        "tasks": [{"name": t.name, "metric": t.metric, "weight": t.weight, "direction": t.direction} for t in config.tasks],
        "include_paths": [str(Path(p).resolve()) for p in options.task_search_path],
        "limit": config.limit,
        "num_fewshot": config.num_fewshot,
        "shuffle": config.shuffle,
        "seed": config.seed,
        "apply_chat_template": config.apply_chat_template,
        "fewshot_as_multiturn": config.fewshot_as_multiturn,
        "batch_size": options.batch_size,
    }


def worker_settings(config: SearchConfig, genome: Genome, options: EvolveOptions, x0: list[float]):
    from dataclasses import asdict

    from evaluators.worker import WorkerSettings

    return WorkerSettings(
        template_recipe=genome.decode(x0).to_plain(),
        evaluator=evaluator_spec(config, options),
        merge_options=asdict(options.merge_options()),
        threads=options.threads_per_worker,
    )


def fitness(config: SearchConfig, metrics: dict, directions: dict) -> float:
    """mergekit-evolve's fitness, Σ weight·metric, with lower-is-better metrics counted negatively
    so that one maximised number ranks candidates."""
    total = 0.0
    for t in config.tasks:
        sign = 1.0 if directions.get(t.name, "maximize") == "maximize" else -1.0
        total += sign * t.weight * metrics[t.name]
    return total


def hub_environment() -> dict:
    """The driver's Hugging Face cache settings, for workers on other nodes of a joined cluster
    (a private local cluster inherits them anyway): they resolve hub ids in the same cache."""
    from huggingface_hub import constants

    env = {"HF_HUB_CACHE": str(constants.HF_HUB_CACHE)}
    for name in ("HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(name):
            env[name] = os.environ[name]
    return env


class PoolRunner:
    """The loop's Runner over a WorkerPool: decodes genotypes into recipes, turns worker results
    into Outcomes with their fitness."""

    def __init__(self, pool, genome: Genome, config: SearchConfig, directions: dict):
        self.pool = pool
        self.genome = genome
        self.config = config
        self.directions = directions
        self.capacity = pool.capacity
        self.submitted: dict[int, tuple[float, str]] = {}  # number -> (submit time, recipe hash)

    def submit(self, candidate: Candidate) -> None:
        recipe = self.genome.decode(candidate.genotype)
        self.submitted[candidate.number] = (time.perf_counter(), recipe_hash(recipe))
        self.pool.submit(candidate, recipe.to_plain())

    def wait(self) -> list[tuple[Candidate, Outcome]]:
        out = []
        for candidate, result, attempts in self.pool.wait():
            t0, hash_ = self.submitted.pop(candidate.number)
            timings = {
                "merge_s": result.get("merge_s", 0.0), "eval_s": result.get("eval_s", 0.0),
                "total_s": time.perf_counter() - t0,
            }
            fit = None
            if result["status"] == "complete":
                try:
                    fit = fitness(self.config, result["metrics"], self.directions)
                except KeyError as err:
                    result = {**result, "status": "failed", "error": f"no metric for task {err}"}
            out.append((candidate, Outcome(result["status"], fit, result.get("metrics", {}), result.get("error"),
                                           timings, attempts, hash_, result.get("worker"))))
        return out


# -- one run of the driver ------------------------------------------------------------------------


class SearchRun:
    """One run of the driver over an experiment directory (a fresh search or a resumed one)."""

    def __init__(self, config: SearchConfig, config_text: str, options: EvolveOptions):
        self.config = config
        self.options = options
        # every model resolves (hub ids cached or downloaded once, model+lora merged) before any worker starts
        check_genome_models(config.genome, options.lora_cache, options.lora_merge_dtype)
        self.genome = build_genome(config)
        check_tasks(config, options)
        self.store = ExperimentStore(options.storage_path, search_space(self.genome))
        self.store.open(
            config_text, {"optimizer": config.optimizer.seed, "evaluation": config.seed, "merge": options.merge_seed},
            options.resume,
        )
        self.x0 = starting_point(config, self.genome)
        self.optimizer = build_optimizer(config, self.genome, self.x0)
        self.state = LoopState()
        if options.resume:
            try:
                self.state = resume(self.optimizer, self.store.journal(), self.store.load_checkpoint())
            except JournalMismatch as err:
                raise ConfigError(
                    f"--resume: {options.storage_path}: {err}; the optimizer no longer reproduces this experiment "
                    "(package versions changed?): continue it with the versions in its manifest.json"
                ) from None
        best = self.store.best()
        self.best_value = best.value if best is not None else None
        self.finished = len(self.store.finished())
        self.record = RunRecord(started=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        self.pool = None
        self.seconds: dict[str, float] = {}  # this run's candidate timings, summed

    def run(self) -> None:
        from .cluster import RayCluster

        started = time.monotonic()
        status = StatusLine(self.config.budget.max_fevals, self.options.quiet)
        try:
            with RayCluster(self.options.ray_address, num_cpus=max(os.cpu_count() or 1, self.options.num_workers or 1),
                            quiet=self.options.quiet):
                try:
                    self._run_pool(status, started)
                finally:
                    if self.pool is not None:  # inside the cluster: a Ray call after it would start a new one
                        stats = self.pool.stats
                        self.record.retried, self.record.replaced, self.record.timed_out = stats.retried, stats.replaced, stats.timed_out
                        self.pool.shutdown()
        except KeyboardInterrupt:
            self.record.stop_reason = "interrupted: continue with --resume"
        finally:
            status.close()
            self.record.stop_reason = self.record.stop_reason or "error"
            self.record.ended = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            try:
                self.store.close()
            finally:
                append_run(self.store.root, self.record)

    def _run_pool(self, status: StatusLine, started: float) -> None:
        import ray

        from evaluators.worker import CandidateWorker

        from .pool import WorkerPool, WorkerSpec

        gpus = ray.cluster_resources().get("GPU", 0)
        use_gpu = gpus > 0 and self.options.device in ("auto", "cuda")
        per_worker = (self.options.gpus_per_worker or 1.0) if use_gpu else 0.0
        count = self.options.num_workers or (max(int(gpus // per_worker), 1) if use_gpu else 1)
        # progress bars inside workers (lm-eval, datasets) would be shipped to the driver's
        # console for every candidate: noise, and CPU taken from the evaluation
        env = {"TQDM_DISABLE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", **hub_environment(), **thread_environment()}
        spec = WorkerSpec(CandidateWorker, (worker_settings(self.config, self.genome, self.options, self.x0),),
                          num_cpus=self.options.cpus_per_worker, num_gpus=per_worker, env=env)
        self.pool = WorkerPool(spec, count, timeout=self.options.candidate_timeout)
        self.record.workers = count
        self.pool.start()
        runner = PoolRunner(self.pool, self.genome, self.config, self.pool.info["directions"])
        timeout = self.config.budget.timeout

        def on_outcome(candidate: Candidate, outcome: Outcome) -> None:
            self.finished += 1
            self.record.evaluated += 1
            for key, value in outcome.timings.items():
                self.seconds[key] = self.seconds.get(key, 0.0) + value
            fit = outcome.fitness
            if fit is not None and math.isfinite(fit) and (self.best_value is None or fit > self.best_value):
                self.best_value = fit
                self.store.write_best_config(self.genome.decode(candidate.genotype), fit, outcome.metrics, candidate.number)
            stats = self.pool.stats
            status.update(candidate.number, self.finished, fit, outcome.error, self.best_value, outcome.timings,
                          faults_text(stats.retried, stats.replaced, stats.timed_out))

        self.state = run_loop(
            self.optimizer, runner, self.store, self.config.budget.max_fevals, self.state,
            should_stop=lambda: timeout is not None and time.monotonic() - started >= timeout,
            on_outcome=on_outcome,
        )
        self.store.checkpoint(self.optimizer, self.state, force=True)
        self.record.stop_reason = "budget spent" if self.state.asked >= self.config.budget.max_fevals else "timeout"

    def overhead_report(self) -> str:
        return overhead_text(self.seconds, self.record.evaluated)

    def summary(self) -> str:
        return search_summary(self.store, self.config.optimizer.name, self.genome.size)

    def export(self) -> Optional[Path]:
        return export_best(
            self.store, self.genome, self.options.merge_options(overwrite=True), self.options.save_final_model,
            self.summary(), self.options.quiet,
        )


def dry_run_report(config: SearchConfig) -> str:
    genome = build_genome(config)
    popsize = config.optimizer.popsize or (genome.default_popsize() if config.optimizer.name == "cma" else 8)
    budget = config.budget.max_fevals
    generations = math.ceil(max(budget - 1, 0) / popsize)
    scheme = (
        "a generation barrier (classic CMA-ES)" if config.optimizer.generation_barrier else
        "no generation barrier: free workers get extra samples of the current distribution"
    ) if config.optimizer.name == "cma" else "one candidate per free worker"
    lines = [
        f"genome: {genome.size} dimensions {genome.summary()}",
        *(f"  {line}" for line in genome.describe()),
        f"optimizer: {config.optimizer.name}, population {popsize}; {scheme}",
        f"budget: {budget} evaluations (1 for the starting point) -> about {generations} generation(s)"
        + (f", timeout {config.budget.timeout:.0f}s" if config.budget.timeout else ""),
    ]
    if config.optimizer.name == "cma" and budget < 10 * genome.size:
        lines.append(
            f"note: CMA-ES usually needs far more evaluations than dimensions ({budget} for {genome.size}); "
            + ("consider fewer output layers or models, no scale genes, or a larger budget" if config.genome.kind == "layer_path"
               else "consider a coarser layer_granularity, fewer filters, or a larger budget")
        )
    return "\n".join(lines)
