"""The search loop: optimiser -> genome -> recipe -> Ray workers -> fitness -> store.

The driver never loads model weights: it reads config.json files, decodes genotypes into recipes
and sends them to workers, each of which holds a resident model. Every finished candidate is
written to the study at once; the optimiser is checkpointed after every generation, so a stopped
run (Ctrl-C, a killed process, a timeout) resumes with `--resume` without evaluating a finished
candidate again.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from merge_engine.errors import ConfigError
from search_spaces.genome import Genome, read_num_layers

from .config import SearchConfig
from .optimizers import Candidate, CMAOptimizer, OptunaOptimizer
from .store import ExperimentStore, TrialRecord, recipe_hash

log = logging.getLogger(__name__)

# Calls queued on each worker: the next candidate waits inside the worker, not in the driver.
QUEUE_PER_WORKER = 2

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

    @property
    def lora_cache(self) -> str:
        return str(self.lora_merge_cache or Path(self.storage_path) / "lora_merge_cache")


def build_genome(config: SearchConfig) -> Genome:
    counts = {str(ref): read_num_layers(ref) for ref in config.genome.models}
    if config.genome.base_model is not None:
        counts[str(config.genome.base_model)] = read_num_layers(config.genome.base_model)
    if len(set(counts.values())) > 1:
        raise ConfigError(f"genome.models: models have different layer counts: {counts}")
    return Genome(config.genome, next(iter(counts.values())))


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


def make_optimizer(config: SearchConfig, genome: Genome, store: ExperimentStore, x0: list[float]):
    opt = config.optimizer
    if opt.name == "cma":
        return CMAOptimizer(
            x0, genome.lower, genome.upper, opt.sigma0, opt.popsize, opt.seed, config.budget.max_fevals
        )
    return OptunaOptimizer(
        store.study, [d.name for d in genome.dimensions], genome.lower, genome.upper
    )


def worker_settings(config: SearchConfig, genome: Genome, options: EvolveOptions, x0: list[float]):
    from evaluators.worker import WorkerSettings

    return WorkerSettings(
        template_recipe=genome.decode(x0).to_plain(),
        tasks=[{"name": t.name, "metric": t.metric, "weight": t.weight, "direction": t.direction} for t in config.tasks],
        include_paths=[str(Path(p).resolve()) for p in options.task_search_path],
        limit=config.limit,
        num_fewshot=config.num_fewshot,
        shuffle=config.shuffle,
        seed=config.seed,
        apply_chat_template=config.apply_chat_template,
        fewshot_as_multiturn=config.fewshot_as_multiturn,
        batch_size=options.batch_size,
        device=options.device,
        merge_seed=options.merge_seed,
        lora_merge_cache=options.lora_cache,
        lora_merge_dtype=options.lora_merge_dtype,
        allow_crimes=options.allow_crimes,
        threads=options.threads_per_worker,
    )


def _lower_thread_priority() -> None:
    """Lower this thread's scheduling priority (Linux: niceness is per thread)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):  # other platforms: normal priority
        pass


class Search:
    def __init__(self, config: SearchConfig, config_text: str, options: EvolveOptions):
        self.config = config
        self.options = options
        self.genome = build_genome(config)
        check_tasks(config, options)
        self.store = ExperimentStore(
            options.storage_path, [d.name for d in self.genome.dimensions], self.genome.lower, self.genome.upper
        )
        self.x0 = self._starting_point()
        sampler = None
        if config.optimizer.name != "cma":
            sampler = OptunaOptimizer.make_sampler(
                config.optimizer.name, config.optimizer.seed,
                dict(zip(self.store.names, self.x0)), config.optimizer.popsize,
            )
        self.store.open(
            config_text,
            {"optimizer": config.optimizer.seed, "evaluation": config.seed, "merge": options.merge_seed},
            options.resume,
            sampler=sampler,
        )
        self.optimizer = make_optimizer(config, self.genome, self.store, self.x0)
        if options.resume and self.store.optimizer_checkpoint.exists():
            self.optimizer.load(self.store.optimizer_checkpoint)
        self.requeued = self.store.abandon_running() if options.resume else []
        self._count_from_store()
        self.directions: dict[str, str] = {}
        self.started = time.time()
        self.done_this_run = 0
        self.seconds: dict[str, float] = {}  # this run's time per stage, summed over candidates
        self._executor = None  # the study writer thread, started on the first result
        self._pending: list = []
        self.stop_reason = ""

    def _starting_point(self) -> list[float]:
        if self.config.random_init:
            import random

            rng = random.Random(self.config.optimizer.seed)
            return [rng.uniform(d.low, d.high) for d in self.genome.dimensions]
        return self.genome.initial()

    # -- bookkeeping ------------------------------------------------------------------------------

    def finished_count(self) -> int:
        return self.finished

    def _count_from_store(self) -> None:
        # kept in memory from here on: re-reading the study per candidate costs O(trials)
        trials = self.store.finished()
        self.finished = sum(1 for t in trials if not t.user_attrs.get("interrupted"))
        # {generation: {index in the population: fitness or None}}, for the optimiser's tell
        self.generations: dict[int, dict[int, Optional[float]]] = {}
        for t in trials:
            if t.user_attrs.get("generation") is not None:
                self.generations.setdefault(t.user_attrs["generation"], {})[t.user_attrs.get("index")] = t.value
        best = self.store.best()
        self.best_value = best.value if best is not None else None

    def budget_left(self) -> int:
        return self.config.budget.max_fevals - self.finished_count()

    def timed_out(self) -> bool:
        timeout = self.config.budget.timeout
        return timeout is not None and time.time() - self.started >= timeout

    def fitness(self, metrics: dict) -> float:
        from evaluators.lm_eval_tasks import TaskSpec, fitness

        specs = [TaskSpec(t.name, t.metric, t.weight, t.direction) for t in self.config.tasks]
        return fitness(metrics, specs, self.directions)

    def record(self, cand: Candidate, result: dict, recipe=None) -> None:
        """Account for a finished candidate at once (counts, best, the optimiser's view) and hand
        its storage to the writer thread, which runs at low priority: on a small machine the
        workers' merge and evaluation get the CPU first. `flush()` waits for the writes."""
        fit = self.fitness(result["metrics"]) if result["status"] == "complete" else None
        recipe = recipe if recipe is not None else self.genome.decode(cand.genotype)
        rec = TrialRecord(
            number=-1, genotype=cand.genotype, fitness=fit, metrics=result["metrics"], status=result["status"],
            generation=cand.generation, index=cand.index, recipe_hash=recipe_hash(recipe), error=result.get("error"),
            merge_s=result["merge_s"], eval_s=result["eval_s"], total_s=result.get("total_s", 0.0),
        )
        number = cand.optuna_trial.number if cand.optuna_trial is not None else self.store.reserve_number()
        self.done_this_run += 1
        self.finished += 1
        self.generations.setdefault(cand.generation, {})[cand.index] = fit if fit is not None and math.isfinite(fit) else None
        new_best = fit is not None and (self.best_value is None or fit > self.best_value)
        if new_best:
            self.best_value = fit
        self._pending.append(self._writer().submit(self._write, rec, number, cand.optuna_trial, recipe if new_best else None))
        for key, value in (("eval", result["eval_s"]), ("merge", result["merge_s"])):
            self.seconds[key] = self.seconds.get(key, 0.0) + value
        self.progress(number, fit, result)

    def _write(self, rec: TrialRecord, number: int, optuna_trial, best_recipe) -> None:
        start = time.perf_counter()
        stored = self.store.record(rec, optuna_trial)
        assert stored == number, (stored, number)
        if best_recipe is not None:
            self.store.write_best_config(best_recipe, rec.fitness, rec.metrics, number)
        self.seconds["store"] = self.seconds.get("store", 0.0) + time.perf_counter() - start

    def _writer(self):
        if self._executor is None:
            from concurrent.futures import ThreadPoolExecutor

            self._executor = ThreadPoolExecutor(1, thread_name_prefix="study-writer", initializer=_lower_thread_priority)
        return self._executor

    def flush(self) -> None:
        """Wait until every finished candidate is in the study (and raise a write's error)."""
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def progress(self, number: int, fit: Optional[float], result: dict) -> None:
        """One status line per candidate; on a terminal the line is rewritten in place and only new
        bests and failures stay on screen."""
        if self.options.quiet:
            return
        elapsed = max(time.time() - self.started, 1e-9)
        rate = 60 * self.done_this_run / elapsed
        left = self.config.budget.max_fevals - self.finished
        eta = f"{left / rate:.1f} min left" if rate > 0 and left > 0 else "done"
        status = f"fitness {fit:.4f}" if fit is not None else f"FAILED ({result.get('error')})"
        best = f"{self.best_value:.4f}" if self.best_value is not None else "none yet"
        line = (
            f"[{self.finished}/{self.config.budget.max_fevals}] trial {number}: {status} | best {best} | "
            f"{rate:.1f} candidates/min, {eta} | merge {result['merge_s']:.2f}s eval {result['eval_s']:.2f}s"
        )
        if not sys.stdout.isatty():
            print(line, flush=True)
            return
        keep = fit is None or fit == self.best_value  # failures and new bests stay on screen
        print("\r\033[K" + line, end="\n" if keep else "", flush=True)
        self._line_open = not keep

    # -- running ----------------------------------------------------------------------------------

    def _merge_lora_inputs(self) -> None:
        """model+lora genome models are merged into the cache once, here, before the workers
        start (they then only read the cached folders instead of racing to build them)."""
        from merge_engine.io import resolve_model_dir

        g = self.config.genome
        for ref in [*g.models, *([g.base_model] if g.base_model is not None else [])]:
            if ref.lora is not None:
                resolve_model_dir(ref, self.options.lora_cache, self.options.lora_merge_dtype)

    def run(self) -> None:
        import ray

        from evaluators.worker import CandidateWorker

        self._merge_lora_inputs()
        settings = worker_settings(self.config, self.genome, self.options, self.x0)
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        started_ray = False
        if not ray.is_initialized():
            kwargs = {"include_dashboard": False, "log_to_driver": not self.options.quiet, "logging_level": logging.WARNING}
            if self.options.ray_address:
                ray.init(address=self.options.ray_address, **kwargs)
            else:
                ray.init(num_cpus=max(os.cpu_count() or 1, self.options.num_workers or 1), **kwargs)
            started_ray = True
        try:
            gpus = int(ray.cluster_resources().get("GPU", 0))
            use_gpu = gpus > 0 and self.options.device in ("auto", "cuda")
            count = self.options.num_workers or (gpus if use_gpu else 1)
            resources = {"num_gpus": 1} if use_gpu else {"num_cpus": 1}
            # progress bars inside workers (lm-eval, datasets) would be shipped to the driver's
            # console for every candidate: noise, and CPU taken from the evaluation
            quiet_env = {"TQDM_DISABLE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
            actor = ray.remote(**resources, runtime_env={"env_vars": quiet_env})(CandidateWorker)
            self.workers = [actor.remote(settings) for _ in range(count)]
            self.directions = ray.get(self.workers[0].directions.remote())
            t_loop = time.perf_counter()
            try:
                self._loop(ray)
            finally:
                self.seconds["wall"] = (time.perf_counter() - t_loop) * len(self.workers)
        except KeyboardInterrupt:
            self.stop_reason = "interrupted (Ctrl-C): resume with --resume"
        finally:
            self.flush()
            if self._executor is not None:
                self._executor.shutdown()
                self._executor = None
            if getattr(self, "_line_open", False):
                print(flush=True)  # end the in-place status line
            if started_ray:
                ray.shutdown()

    def _loop(self, ray) -> None:
        if self.finished_count() == 0 and not self.requeued:
            # the starting point is always scored first: the baseline the search must beat
            base = Candidate(self.x0, -1, 0)
            if isinstance(self.optimizer, OptunaOptimizer):
                self.store.study.enqueue_trial(dict(zip(self.store.names, self.x0)))
                base = self.optimizer.ask()[0]
            self._evaluate_batch(ray, [base])
        for params in self.requeued:
            self.store.study.enqueue_trial(params)
        while self.budget_left() > 0 and not self.timed_out():
            if self.optimizer.generational:
                cands = self.optimizer.ask()
                self.flush()  # the study first: a checkpoint never runs ahead of the trials it counts
                self.optimizer.save(self.store.optimizer_checkpoint)  # the population in flight too
                done = self.generations.get(cands[0].generation, {})
                todo = [c for c in cands if c.index not in done]
                if todo and len(todo) > self.budget_left():
                    todo = todo[: self.budget_left()]
                    self._evaluate_batch(ray, todo)
                    self.stop_reason = "budget spent"
                    return
                self._evaluate_batch(ray, todo)
                if self.timed_out():
                    break
                done = self.generations.get(cands[0].generation, {})
                fits = [done.get(c.index) for c in cands]
                self.optimizer.tell(cands, fits)
                # no save here: the next ask() saves the new state with its population in flight
            else:
                self._evaluate_stream(ray)
        self.flush()
        if self.optimizer.generational:
            self.optimizer.save(self.store.optimizer_checkpoint)
        self.stop_reason = self.stop_reason or ("timeout" if self.timed_out() else "budget spent")

    def _evaluate_batch(self, ray, cands: list[Candidate]) -> None:
        """Evaluate these candidates on the workers, recording each as it finishes."""
        queue = list(cands)
        self._dispatch(ray, lambda in_flight: queue.pop(0) if queue else None)

    def _evaluate_stream(self, ray) -> None:
        """Optuna samplers: keep every worker busy, asking for a new candidate whenever one frees."""
        self._dispatch(ray, lambda in_flight: self.optimizer.ask()[0] if self.budget_left() - in_flight > 0 else None)

    def _dispatch(self, ray, next_candidate) -> None:
        """Hand candidates to workers until `next_candidate(in_flight)` returns None (or time is
        up), then wait for the ones running. Each worker holds up to QUEUE_PER_WORKER calls, so it
        starts its next candidate the moment one ends (no Ray round trip or driver work in
        between); the driver stores a result while the workers evaluate."""
        running: dict = {}
        load = {w: 0 for w in self.workers}
        exhausted = False
        finished = None
        while True:
            while not exhausted and not self.timed_out():
                worker = min(self.workers, key=lambda w: load[w])
                if load[worker] >= QUEUE_PER_WORKER:
                    break
                cand = next_candidate(len(running) + (finished is not None))
                if cand is None:
                    exhausted = True
                    break
                recipe = self.genome.decode(cand.genotype)
                running[worker.evaluate.remote(recipe.to_plain())] = (worker, cand, recipe, time.perf_counter())
                load[worker] += 1
            if finished is not None:
                self.record(*finished)
                finished = None
            if not running:
                return
            ready, _ = ray.wait(list(running), num_returns=1)
            worker, cand, recipe, t0 = running.pop(ready[0])
            result = self._result(ray, ready[0])
            result["total_s"] = time.perf_counter() - t0
            load[worker] -= 1
            finished = (cand, result, recipe)

    @staticmethod
    def _result(ray, ref) -> dict:
        try:
            return ray.get(ref)
        except Exception as err:  # the worker died: the candidate fails, the search goes on
            return {"status": "failed", "metrics": {}, "merge_s": 0.0, "eval_s": 0.0, "error": f"worker error: {err}"}

    # -- the end ------------------------------------------------------------------------------------

    def overhead_report(self) -> str:
        """How much of a candidate's time is not evaluation: merge, scheduling, storage."""
        total = self.seconds.get("wall", 0.0)  # the evaluation loop's wall time (one worker at a time)
        if not total or not self.done_this_run:
            return ""
        outside = total - self.seconds.get("eval", 0.0)
        n = self.done_this_run
        merge = self.seconds.get("merge", 0.0)
        return (
            f"time per candidate outside evaluation: {100 * outside / total:.1f}% of the evaluation loop's "
            f"wall time per worker (per candidate: evaluation {self.seconds.get('eval', 0.0) / n:.3f}s, "
            f"merge {merge / n:.3f}s, Ray and scheduling {max(outside - merge, 0.0) / n:.3f}s; "
            f"storage {self.seconds.get('store', 0.0) / n:.3f}s, in a low-priority thread overlapped with evaluation)"
        )

    def summary(self) -> str:
        trials = self.store.finished()
        best = self.store.best()
        lines = ["## Evolutionary search", ""]
        lines.append(
            f"Found by `mergekit-evolve` (evomerge) with {self.config.optimizer.name} over a genome of "
            f"{self.genome.size} dimensions: {len(trials)} evaluations "
            f"({sum(1 for t in trials if t.value is None)} failed)."
        )
        if best is not None:
            lines.append(f"Best fitness {best.value:.6g} (trial {best.number}); task metrics:")
            lines.append("")
            for name, value in best.user_attrs.get("metrics", {}).items():
                lines.append(f"* {name}: {value:.6g}")
        return "\n".join(lines)

    def export(self) -> Optional[Path]:
        best = self.store.best()
        plot = self.store.plot()
        if plot and not self.options.quiet:
            print(f"fitness plot: {plot}")
        if best is None:
            print("no candidate completed: nothing to export", file=sys.stderr)
            return None
        recipe = self.genome.decode(self.store.genotype_of(best))
        self.store.write_best_config(recipe, best.value, best.user_attrs.get("metrics", {}), best.number)
        if not self.options.save_final_model:
            return None
        from merge_engine.options import MergeOptions
        from merge_engine.streaming import run_merge

        out = self.store.root / "final_model"
        device = self.options.device if self.options.device != "auto" else "auto"
        run_merge(
            recipe,
            out,
            MergeOptions(device=device, random_seed=self.options.merge_seed, overwrite=True, quiet=True,
                         allow_crimes=self.options.allow_crimes, lora_merge_cache=self.options.lora_cache,
                         lora_merge_dtype=self.options.lora_merge_dtype),
            config_text=recipe.to_yaml(),
            card_extra=self.summary(),
        )
        return out


def dry_run_report(config: SearchConfig) -> str:
    genome = build_genome(config)
    popsize = config.optimizer.popsize or (genome.default_popsize() if config.optimizer.name == "cma" else 8)
    budget = config.budget.max_fevals
    generations = math.ceil(max(budget - 1, 0) / popsize)
    if genome.method == "model_stock":
        layout = f"{genome.num_groups} layer group(s) x {len(genome.filters)} parameter set(s), a filter_wise switch each"
    else:
        layout = (
            f"{genome.num_groups} layer group(s) x {len(genome.models)} model(s) x {len(genome.filters)} "
            f"parameter set(s) x {len(genome.params)} parameter(s)"
        )
    lines = [
        f"genome: {genome.size} dimensions ({layout}); method {genome.method}",
        f"optimizer: {config.optimizer.name}, population {popsize}",
        f"budget: {budget} evaluations (1 for the starting point) -> about {generations} generation(s)"
        + (f", timeout {config.budget.timeout:.0f}s" if config.budget.timeout else ""),
    ]
    if config.optimizer.name == "cma" and budget < 10 * genome.size:
        lines.append(
            f"note: CMA-ES usually needs far more evaluations than dimensions ({budget} for {genome.size}); "
            "consider a coarser layer_granularity, fewer filters, or a larger budget"
        )
    return "\n".join(lines)

