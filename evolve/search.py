"""The driver of one search (SearchRun): builds the parts (evolve.build, evolve.workers) and wires
them together; what runs a candidate on the pool is evolve.pool_runner, the held-out re-scoring
evolve.rescore, the dry run evolve.dry_run, the task checks evolve.tasks_check.

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
import threading
import time
from pathlib import Path
from typing import Optional

from evaluators import Status
from merge_engine.errors import ConfigError, RunFailure

from .build import build_genome, build_optimizer, resolve_optimizer, search_anchors, starting_point
from .config import SearchConfig
from .loop import Candidate, JournalMismatch, LoopState, Outcome, resume, run_loop
from .model_refs import check_genome_models, check_template_recipe
from .objectives import Scoring
from .options import EvolveOptions
from .pool_runner import PoolRunner
from .report import RunRecord, StatusLine, append_run, export_best, export_pareto, faults_text, overhead_text, search_summary
from .rescore import Rescoring, read_rescore, score_held_out
from .selection import CandidateRow, Selection, exported, ranked
from .store import ExperimentStore, check_storage
from .tasks_check import check_tasks
from .workers import evaluator_spec, worker_pool

log = logging.getLogger(__name__)

# candidates that must fail with one and the same error, before any succeeded, to stop a search
SAME_FAILURES_TO_STOP = 3


class SearchRun:
    """One run of the driver over an experiment directory (a fresh search or a resumed one)."""

    def __init__(self, config: SearchConfig, config_text: str, options: EvolveOptions):
        self.config = config
        self.options = options
        # a wrong --storage-path (or a damaged experiment to resume) is refused before anything heavy
        check_storage(options.storage_path, config_text, options.resume)
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
            # a resume may find the search, or the search and its re-scoring, finished: what is
            # finished starts no worker, and with nothing left no cluster starts (about 10 s here)
            search_left = self.state.asked < self.config.budget.max_fevals or bool(self.state.pending)
            if not search_left:
                self.record.stop_reason = "budget spent"
            if search_left or (self.config.rescore is not None and self._rescore_table()[1]):
                with RayCluster(self.options.ray_address, num_cpus=max(os.cpu_count() or 1, self.options.num_workers or 1),
                                quiet=self.options.quiet):
                    if search_left:
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

    def _rescore_table(self) -> tuple[Rescoring, list[int]]:
        """The re-scoring table with its candidates fixed, and the numbers still to score."""
        definition = self.config.rescore
        table = Rescoring(self.store.root, definition.tasks, definition.top_k)
        self.store.flush()  # every result of the search is in the study before the top ones are picked
        table.select(self.store.rows())
        return table, table.pending()

    def _shutdown_pool(self) -> None:
        if self.pool is not None:
            stats = self.pool.stats
            self.record.retried += stats.retried
            self.record.replaced += stats.replaced
            self.record.timed_out += stats.timed_out
            self.pool.shutdown()
            self.pool = None

    def _start_pool(self, evaluator=None):
        """Workers with the search's evaluator, or with `evaluator` (re-scoring)."""
        # kept before it starts: a pool that fails to start still has its started workers shut down
        self.pool = worker_pool(self.config, self.genome, self.options, self.x0, evaluator)
        self.record.workers = self.pool.capacity
        self.pool.start()

    def _run_pool(self, status: StatusLine, started: float) -> None:
        preload = threading.Thread(target=self.optimizer.preload, name="optimizer-preload", daemon=True)
        preload.start()  # overlaps the workers' start (Optimizer.preload)
        self._start_pool()
        preload.join()
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
        table, todo = self._rescore_table()
        if not todo:
            return
        if not self.options.quiet:
            print(f"re-scoring the top {len(table.state['rows'])} candidates on held-out tasks "
                  f"({', '.join(t.name for t in definition.tasks)})", flush=True)
        self._start_pool(evaluator_spec(self.config, self.options, tasks=definition.tasks))
        score_held_out(table, self.pool, todo, lambda number: self.genome.decode(self.store.genotype_of(self.store.trial(number))),
                       Scoring(definition.tasks, self.pool.info["directions"]), self.options.quiet)

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
