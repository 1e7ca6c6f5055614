"""The driver of one search: builds the parts and wires them together.

    genome (search_spaces) ─ optimizer (evolve.optimizers) ─ loop (evolve.loop)
                                         │                        │
                            store (evolve.store)         pool of Ray workers (evolve.pool,
                            journal (SQLite)              evolve.cluster, evaluators.worker)

The driver never loads model weights: it reads config.json files, decodes genotypes into recipes
and sends them to workers, each of which holds a resident model. A stopped run (Ctrl-C, SIGTERM,
a killed process, a timeout) continues with `--resume` exactly where it stopped: the optimiser is
rebuilt by replaying the journal, and no finished candidate is evaluated again.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

from evaluators import Status
from evaluators.racing import paired_estimate
from merge_engine.errors import ConfigError, RunFailure
from merge_engine.options import MergeOptions
from merge_engine.threads import thread_environment
from search_spaces.genome import Genome, distinct_anchors, parameter_genome, read_num_layers
from search_spaces.layer_path import LayerPathGenome

from .config import SearchConfig
from .model_refs import check_experiment_references, check_genome_models, check_template_recipe
from .loop import Candidate, JournalMismatch, LoopState, Outcome, resume, run_loop
from .objectives import Scoring, extra_metrics
from .optimizers import Optimizer, make_optimizer
from .report import RunRecord, StatusLine, append_run, export_best, export_pareto, faults_text, overhead_text, search_summary
from .rescore import Rescoring, read_rescore
from .selection import CandidateRow, Selection, exported, ranked
from .store import ExperimentStore, recipe_hash

log = logging.getLogger(__name__)

BENCHMARK_PREFIXES = (
    "mmlu", "hendrycks", "agieval", "gsm8k", "hellaswag", "winogrande", "arc_", "ai2_arc",
    "truthfulqa", "bigbench", "piqa", "openbookqa", "leaderboard",
)


@dataclass
class EvolveOptions:
    storage_path: Path
    # the merge flags (merge_engine.options): the workers' resident merges and the export use them
    merge: MergeOptions = field(default_factory=lambda: MergeOptions(device="auto"))
    resume: bool = False
    num_workers: Optional[int] = None
    ray_address: Optional[str] = None
    task_search_path: list[str] = field(default_factory=list)
    save_final_model: bool = True
    batch_size: int = 16
    allow_benchmark_tasks: bool = False
    candidate_timeout: Optional[float] = None  # seconds; a candidate running longer is cancelled
    gpus_per_worker: Optional[float] = None  # None: 1 when the cluster has GPUs (and --device allows)
    cpus_per_worker: float = 1.0

    @property
    def quiet(self) -> bool:
        return self.merge.quiet

    @property
    def device(self) -> str:
        return self.merge.device

    @property
    def lora_cache(self) -> str:
        return str(self.merge.lora_merge_cache or Path(self.storage_path) / "lora_merge_cache")

    def merge_options(self, **extra):
        """What a worker or the export merges with: progress bars off, the LoRA cache resolved."""
        return replace(self.merge, quiet=True, lora_merge_cache=self.lora_cache, **extra)


# -- building the parts ---------------------------------------------------------------------------


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
# candidates that must fail with one and the same error, before any succeeded, to stop a search
SAME_FAILURES_TO_STOP = 3
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
    return make_optimizer(
        opt.name, genome.space, x0, opt.seed, popsize=opt.popsize, sigma0=opt.sigma0,
        max_fevals=config.budget.max_fevals, generation_barrier=opt.generation_barrier,
        objectives=max(len(config.objective_tasks), 1), constraints=bool(config.constraints),
        anchors=[x for _, x in anchors],
    )


def check_tasks(config: SearchConfig, options: EvolveOptions) -> None:
    """Every task the config names (`tasks`, `rescore.tasks`, `constraints`) is loaded here, in the
    driver, and must report every metric asked of it: a mistake is one line naming the key before
    any worker starts (a worker would fail every candidate with it, burning the whole budget)."""
    keyed = [(f"tasks[{i}]", t) for i, t in enumerate(config.tasks)]
    if config.rescore is not None:
        keyed += [(f"rescore.tasks[{i}]", t) for i, t in enumerate(config.rescore.tasks)]
    if not options.allow_benchmark_tasks:
        flagged = [t.name for _, t in keyed[:len(config.tasks)]
                   if t.name.startswith(BENCHMARK_PREFIXES) and not t.name.endswith("_train")]
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
        known = manager.all_tasks
    except Exception as err:  # lm-eval could not index the tasks
        raise ConfigError(f"tasks: cannot index lm-eval tasks: {err}") from None
    where = f" (searched {', '.join(options.task_search_path)})" if options.task_search_path else ""
    for key, task in keyed:
        if task.name not in known:
            raise ConfigError(f"{key}: unknown lm-eval task {task.name!r}{where}")
    names = list(dict.fromkeys(t.name for _, t in keyed))
    try:
        import datasets

        datasets.disable_progress_bars()  # the driver's console shows the search, not dataset builds
        loaded = manager.load(names)["tasks"]
    except Exception as err:  # a task whose definition or data lm-eval cannot load
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"tasks: lm-eval cannot load {', '.join(names)}: {detail}") from None
    from evaluators.lm_eval_tasks import reported_metrics

    asked = [(f"{key}.metric", t.name, t.metric) for key, t in keyed]
    asked += [(f"constraints[{i}].metric", c.task, c.metric) for i, c in enumerate(config.constraints) if c.metric]
    for key, name, metric in asked:
        reported = reported_metrics(loaded[name]) if name in loaded else []
        if name in loaded and metric not in reported:
            raise ConfigError(f"{key}: task {name} reports no metric {metric!r} (it reports: {', '.join(reported)})")


def evaluator_spec(config: SearchConfig, options: EvolveOptions, tasks=None) -> dict:
    """The workers' lm-eval evaluator: the search tasks (or `tasks`, e.g. the held-out ones), each
    also reporting the other metrics constraints read (as `task:metric`)."""
    extra = extra_metrics(config.tasks, config.constraints) if tasks is None else {}
    return {
        "kind": "lm_eval",
        "tasks": [{"name": t.name, "metric": t.metric, "weight": t.weight, "direction": t.direction,
                   "also": extra.get(t.name, [])} for t in (tasks or config.tasks)],
        "include_paths": [str(Path(p).resolve()) for p in options.task_search_path],
        "limit": config.limit,
        "num_fewshot": config.num_fewshot,
        "shuffle": config.shuffle,
        "seed": config.seed,
        "apply_chat_template": config.apply_chat_template,
        "fewshot_as_multiturn": config.fewshot_as_multiturn,
        "batch_size": options.batch_size,
        "racing": config.racing is not None and tasks is None,
    }


def worker_settings(config: SearchConfig, genome: Genome, options: EvolveOptions, x0: list[float], evaluator=None):
    from evaluators.worker import WorkerSettings

    return WorkerSettings(
        template_recipe=genome.decode(x0).to_plain(),
        evaluator=evaluator or evaluator_spec(config, options),
        merge_options=options.merge_options(),
    )


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
    into Outcomes scored by `scoring`.

    A recipe identical to one already evaluated (same `recipe_hash`: weights compared as the
    engine rounds them) is never evaluated again: it gets that candidate's outcome
    (`reused_from`), or waits for it while it is still running. With `race`, each candidate is
    sent with the best complete candidate's per-item values and the racing rule (see
    evaluators.racing); `best()` gives that candidate as (number, fitness, per-item values),
    or None."""

    def __init__(self, pool, genome: Genome, scoring: Scoring, known: Optional[dict] = None, race=None,
                 best: Callable[[], Optional[tuple[int, float, dict]]] = lambda: None):
        self.pool = pool
        self.genome = genome
        self.scoring = scoring
        self.capacity = pool.capacity
        self.race = race
        self.best = best
        self.known: dict[str, tuple[int, Outcome]] = dict(known or {})  # recipe hash -> (number, outcome)
        self.submitted: dict[int, tuple[float, str]] = {}  # number -> (submit time, recipe hash)
        self.evaluating: dict[str, int] = {}  # recipe hash -> the candidate evaluating it
        self.waiting: dict[int, list[Candidate]] = {}  # that candidate -> identical ones waiting for it
        self.ready: list[tuple[Candidate, Outcome]] = []
        self.paired: dict[int, tuple[int, float, dict]] = {}  # number -> the best it was raced against

    def submit(self, candidate: Candidate) -> None:
        recipe = self.genome.decode(candidate.genotype)
        key = recipe_hash(recipe)
        self.submitted[candidate.number] = (time.perf_counter(), key)
        if key in self.known:
            self.ready.append((candidate, self._reuse(candidate, *self.known[key])))
        elif key in self.evaluating:
            self.waiting[self.evaluating[key]].append(candidate)
        else:
            self.evaluating[key] = candidate.number
            self.waiting[candidate.number] = []
            payload = recipe.to_plain()
            if self.race is not None:
                # an anchor is raced against nothing: scored on every item (the export rule compares
                # with it), its per-item values kept in stage order like any raced candidate's
                best = self.best() if candidate.proposal.generation >= 0 else None
                if best is not None:  # the best may change before this result is in: keep the one sent
                    self.paired[candidate.number] = best
                payload = {"recipe": payload, "race": {
                    "best_items": None if best is None else best[2], "weights": self.scoring.signed_weights,
                    "fractions": self.race.fractions, "z": self.race.confidence_z,
                }}
            self.pool.submit(candidate, payload)

    def _reuse(self, candidate: Candidate, number: int, outcome: Outcome) -> Outcome:
        t0, _ = self.submitted.pop(candidate.number)
        # the scores are that candidate's; what this one cost and met is nothing
        return replace(outcome, metrics=dict(outcome.metrics), timings={"merge_s": 0.0, "eval_s": 0.0,
                       "total_s": time.perf_counter() - t0}, attempts=0, worker=None, items=0, reused_from=number,
                       first_items=None, paired_with=None, stage=None, faults=())

    def wait(self) -> list[tuple[Candidate, Outcome]]:
        if self.ready:
            out, self.ready = self.ready, []
            return out
        out = []
        for candidate, result, attempts in self.pool.wait():
            t0, key = self.submitted.pop(candidate.number)
            outcome = self._outcome(result, attempts, key, time.perf_counter() - t0, self.paired.pop(candidate.number, None))
            out.append((candidate, outcome))
            del self.evaluating[key]
            followers = self.waiting.pop(candidate.number)
            if outcome.status.scored:  # a failure may be transient: not reused
                self.known[key] = (candidate.number, outcome)
                out += [(c, self._reuse(c, candidate.number, outcome)) for c in followers]
            else:
                for c in followers:  # evaluate the identical ones after all
                    self.submitted.pop(c.number)
                    self.submit(c)
        return out

    def _outcome(self, result: dict, attempts: int, key: str, total_s: float, paired=None) -> Outcome:
        timings = {"merge_s": result.get("merge_s", 0.0), "eval_s": result.get("eval_s", 0.0), "total_s": total_s}
        status, error, metrics = Status(result["status"]), result.get("error"), result.get("metrics", {})
        fitness, objectives, violation = None, (), 0.0
        if status.scored:
            try:
                if status == Status.STOPPED:  # scored on some stages only: the paired estimate ranks it
                    fitness = paired_estimate(result["first_items"], paired[1], paired[2], self.scoring.signed_weights)
                else:
                    scored = self.scoring.score(metrics)
                    fitness, objectives, violation = scored.fitness, scored.objectives, scored.violation
            except KeyError as err:
                status, error = Status.FAILED, f"no metric {err}"
        return Outcome(status, fitness, metrics, error, timings, attempts, key, result.get("worker"),
                       objectives, violation, result.get("items", 0),
                       first_items=result.get("first_items") if status.scored else None,
                       item_values=result.get("item_values") if status == Status.COMPLETE else None,
                       faults=tuple(result.get("faults", ())),
                       paired_with=paired[0] if paired is not None and status.scored else None,
                       stage=result.get("stage") if status == Status.STOPPED else None)


# -- one run of the driver ------------------------------------------------------------------------


class SearchRun:
    """One run of the driver over an experiment directory (a fresh search or a resumed one)."""

    def __init__(self, config: SearchConfig, config_text: str, options: EvolveOptions):
        self.config = config
        self.options = options
        # every model resolves (hub ids cached or downloaded once, model+lora merged) before any worker starts
        check_genome_models(config.genome, options.lora_cache, options.merge.lora_merge_dtype)
        self.genome = build_genome(config)
        self.x0 = starting_point(config, self.genome)
        check_template_recipe(self.genome.decode(self.x0), options.merge_options())
        check_tasks(config, options)
        self.anchors = search_anchors(config, self.genome, self.x0)
        self.store = ExperimentStore(options.storage_path, self.genome.space, [label for label, _ in self.anchors])
        started_with = self.store.manifest().get("optimizer") if options.resume else None
        self.config = config = resolve_optimizer(config, self.genome.size, started_with)[0]
        self.store.open(
            config_text, {"optimizer": config.optimizer.seed, "evaluation": config.seed, "merge": options.merge.random_seed},
            options.resume, {"optimizer": config.optimizer.name},
        )
        self.optimizer = build_optimizer(config, self.genome, self.x0, self.anchors)
        self.state = LoopState()
        journal = self.store.journal() if options.resume else []  # read once: resume and reuse both need it
        # identical recipes are not evaluated again, also across runs of the driver
        self.known = {e.outcome.recipe_hash: (e.candidate.number, e.outcome) for e in journal
                      if e.outcome is not None and e.outcome.status.scored and e.outcome.recipe_hash}
        if options.resume:
            try:
                self.state = resume(self.optimizer, journal)
            except JournalMismatch as err:
                raise ConfigError(
                    f"--resume: {options.storage_path}: {err}; the optimizer no longer reproduces this experiment "
                    "(package versions changed?): continue it with the versions in its manifest.json"
                ) from None
        self.rows = self.store.rows()  # the complete candidates, kept up to date as results come in
        self.genotypes = {e.candidate.number: e.candidate.genotype for e in journal}
        top = ranked(self.rows)
        # racing pairs every candidate with the best fitness so far (the live run's, so a resume agrees)
        self.best_value = top[0].fitness if top else None
        first_items = self.store.trial(top[0].number).user_attrs.get("first_items") if top else None
        self.best = (top[0].number, top[0].fitness, first_items) if first_items else None
        self.selected: Optional[int] = None  # the candidate best_config.yaml holds (evolve.selection)
        self.finished = len(self.store.finished())
        # a resumed search that completed a candidate before is past the early-failure check
        self.any_success = any(e.outcome is not None and e.outcome.status != Status.FAILED for e in journal)
        self.same_failures, self.last_failure = 0, None
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
                    self._shutdown_pool()  # inside the cluster: a Ray call after it would start a new one
                if self.config.rescore is not None:
                    try:
                        self._rescore()
                    finally:
                        self._shutdown_pool()
        except KeyboardInterrupt:
            self.record.stop_reason = "interrupted: continue with --resume"
        finally:
            status.close()
            self.record.stop_reason = self.record.stop_reason or "error"
            self.record.ended = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            try:
                self.store.close()
            finally:
                try:
                    append_run(self.store.root, self.record)
                except OSError as err:  # a full disk: the journal's own error (if any) says it
                    log.info("%s: run record not written (%s)", self.store.root / "runs.jsonl", err)

    def _shutdown_pool(self) -> None:
        if self.pool is not None:
            stats = self.pool.stats
            self.record.retried += stats.retried
            self.record.replaced += stats.replaced
            self.record.timed_out += stats.timed_out
            self.pool.shutdown()
            self.pool = None

    def _start_pool(self, evaluator: Optional[dict] = None):
        """Workers with the search's evaluator, or with `evaluator` (re-scoring)."""
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
        spec = WorkerSpec(CandidateWorker, (worker_settings(self.config, self.genome, self.options, self.x0, evaluator),),
                          num_cpus=self.options.cpus_per_worker, num_gpus=per_worker, env=env)
        self.pool = WorkerPool(spec, count, timeout=self.options.candidate_timeout)
        self.record.workers = count
        self.pool.start()

    def _run_pool(self, status: StatusLine, started: float) -> None:
        self._start_pool()
        self.scoring = Scoring.for_search(self.config, self.pool.info["directions"])
        self.store.set_directions(self.scoring.directions)
        runner = PoolRunner(self.pool, self.genome, self.scoring, self.known, self.config.racing, lambda: self.best)
        timeout = self.config.budget.timeout

        def on_outcome(candidate: Candidate, outcome: Outcome) -> None:
            self._stop_if_failing_alike(outcome)
            self.finished += 1
            self.record.evaluated += 1
            for key, value in outcome.timings.items():
                self.seconds[key] = self.seconds.get(key, 0.0) + value
            fit = outcome.fitness
            counts = outcome.status == Status.COMPLETE and outcome.violation <= 0  # feasible, on every item
            if counts and fit is not None and math.isfinite(fit):
                self.genotypes[candidate.number] = candidate.genotype
                self.rows.append(CandidateRow.of(candidate.number, outcome, self.state.told - 1, self.anchor_label(candidate)))
                if self.best_value is None or fit > self.best_value:
                    self.best_value = fit
                    self.best = (candidate.number, fit, outcome.first_items) if outcome.first_items else None
                self._select()
            stats = self.pool.stats
            note = outcome.error or (f"stopped early (after stage {outcome.stage})" if outcome.status == Status.STOPPED else
                                     f"infeasible by {outcome.violation:.4g}" if outcome.violation > 0 else
                                     f"same recipe as trial {outcome.reused_from}" if outcome.reused_from is not None else
                                     f"retried after: {', '.join(outcome.faults)}" if outcome.faults else None)
            chosen_fitness = next((r.fitness for r in self.rows if r.number == self.selected), None)
            status.update(candidate.number, self.finished, fit, note, chosen_fitness, outcome.timings,
                          faults_text(stats.retried, stats.replaced, stats.timed_out))

        self.state = run_loop(
            self.optimizer, runner, self.store, self.config.budget.max_fevals, self.state,
            should_stop=lambda: timeout is not None and time.monotonic() - started >= timeout,
            on_outcome=on_outcome,
        )
        self.record.stop_reason = "budget spent" if self.state.asked >= self.config.budget.max_fevals else "timeout"

    def anchor_label(self, candidate: Candidate) -> Optional[str]:
        p = candidate.proposal
        return self.anchors[p.index][0] if p.generation < 0 and p.index < len(self.anchors) else None

    def _select(self) -> None:
        """best_config.yaml follows the export rule (evolve.selection) as results come in."""
        selection = exported(self.rows, self.scoring)
        if selection is not None and selection.number != self.selected:
            self.selected = selection.number
            row = selection.row
            self.store.write_best_config(self.genome.decode(self.genotypes[row.number]), row.fitness, row.metrics, row.number)

    def _stop_if_failing_alike(self, outcome: Outcome) -> None:
        """The first SAME_FAILURES_TO_STOP candidates of a search all failed with one error: that
        error comes from the configuration (a metric, a model, a task), not from the candidates,
        and every later one would fail alike, burning the budget. Stop with that error."""
        if self.any_success:
            return
        if outcome.status != Status.FAILED:
            self.any_success = True
            return
        self.same_failures = self.same_failures + 1 if outcome.error == self.last_failure else 1
        self.last_failure = outcome.error
        if self.same_failures >= SAME_FAILURES_TO_STOP:
            self.record.stop_reason = "every candidate failed alike"
            raise RunFailure(f"the first {self.same_failures} candidates all failed with: {outcome.error}; "
                             "search stopped (fix the cause and start again)")

    def _rescore(self) -> None:
        """Score the top candidates on the held-out tasks (see evolve.rescore); resumable."""
        definition = self.config.rescore
        if self.record.stop_reason not in ("budget spent", "timeout"):
            return  # the search itself is not finished
        table = Rescoring(self.store.root, definition.tasks, definition.top_k)
        self.store.flush()  # every result of the search is in the study before the top ones are picked
        table.select(self.store.rows())
        todo = table.pending()
        if not todo:
            return
        if not self.options.quiet:
            print(f"re-scoring the top {len(table.state['rows'])} candidates on held-out tasks "
                  f"({', '.join(t.name for t in definition.tasks)})", flush=True)
        self._start_pool(evaluator_spec(self.config, self.options, tasks=definition.tasks))
        scoring = Scoring(definition.tasks, self.pool.info["directions"])
        for number in todo:
            self.pool.submit(number, self.genome.decode(self.store.genotype_of(self.store.trial(number))).to_plain())
        remaining = len(todo)
        while remaining:
            for number, result, _attempts in self.pool.wait():
                remaining -= 1
                table.record(number, result["status"], result.get("metrics", {}), scoring)
                if not self.options.quiet:
                    row = next(r for r in table.state["rows"] if r["number"] == number)
                    held = row["heldout_fitness"]
                    print(f"  trial {number}: search {row['search_fitness']:.4f}, held-out "
                          + (f"{held:.4f}" if held is not None else row["status"]), flush=True)

    def overhead_report(self) -> str:
        return overhead_text(self.seconds, self.record.evaluated)

    def scoring_now(self) -> Scoring:
        """The search's scoring, also when no worker ran in this run (directions from the study)."""
        return getattr(self, "scoring", None) or Scoring.for_search(self.config, self.store.directions())

    def selection(self) -> Optional[Selection]:
        """The candidate to export and why (evolve.selection.exported: the one rule)."""
        self.store.flush()  # every result is in the study
        rescored = read_rescore(self.store.root) if self.config.rescore is not None else None
        return exported(self.store.rows(), self.scoring_now(), rescored)

    def chosen(self) -> Optional[CandidateRow]:
        selection = self.selection()
        return None if selection is None else selection.row

    def summary(self) -> str:
        return search_summary(self.store, self.config.optimizer.name, self.genome.size, self.selection())

    def export(self) -> Optional[Path]:
        if self.config.objective_tasks:
            export_pareto(self.store, self.genome, self.scoring_now())
        chosen = self.chosen()
        return export_best(
            self.store, self.genome, self.options.merge_options(overwrite=True), self.options.save_final_model,
            self.summary(), self.options.quiet, None if chosen is None else chosen.number,
        )


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
