"""The search loop's Runner over a pool of workers (evolve.loop.Runner, evolve.pool.WorkerPool)."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable, Optional

from evaluators import Status
from evaluators.racing import paired_estimate
from evaluators.worker import CandidateRequest, RaceRequest
from search_spaces.genome import Genome

from .gradient import descent_probes
from .loop import Candidate, Outcome
from .objectives import Scoring
from .store import recipe_hash


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
        self.steps_only: dict[int, tuple[int, Outcome]] = {}  # descent candidates of known recipes -> their scores

    def submit(self, candidate: Candidate) -> None:
        recipe = self.genome.decode(candidate.genotype)
        key = recipe_hash(recipe)
        self.submitted[candidate.number] = (time.perf_counter(), key)
        if candidate.proposal.descent is not None:
            self._submit_descent(candidate, recipe, key)
        elif key in self.known:
            self.ready.append((candidate, self._reuse(candidate, *self.known[key])))
        elif key in self.evaluating:
            self.waiting[self.evaluating[key]].append(candidate)
        else:
            self.evaluating[key] = candidate.number
            self.waiting[candidate.number] = []
            race = None
            if self.race is not None:
                # an anchor is raced against nothing: scored on every item (the export rule compares
                # with it), its per-item values kept in stage order like any raced candidate's
                best = self.best() if candidate.proposal.generation >= 0 else None
                if best is not None:  # the best may change before this result is in: keep the one sent
                    self.paired[candidate.number] = best
                race = RaceRequest(None if best is None else best[2], self.scoring.signed_weights,
                                   tuple(self.race.fractions), self.race.confidence_z)
            payload = CandidateRequest(recipe.to_plain(), race=race)
            self.pool.submit(candidate, payload)

    def _submit_descent(self, candidate: Candidate, recipe, key: str) -> None:
        request = candidate.proposal.descent
        probes, steps = descent_probes(self.genome, candidate.genotype, request.genes)
        known = self.known.get(key)
        if known is not None:
            self.steps_only[candidate.number] = known
        else:
            self.evaluating.setdefault(key, candidate.number)
            self.waiting.setdefault(candidate.number, [])
        request = replace(request, probes=tuple(probes), probe_steps=tuple(steps), score=known is None)
        self.pool.submit(candidate, CandidateRequest(recipe.to_plain(), descent=request))

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
            if candidate.number in self.steps_only:
                out.append((candidate, self._steps_outcome(candidate, result, attempts)))
                continue
            t0, key = self.submitted.pop(candidate.number)
            outcome = self._outcome(result, attempts, key, time.perf_counter() - t0, self.paired.pop(candidate.number, None))
            out.append((candidate, outcome))
            if self.evaluating.get(key) == candidate.number:
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

    def _steps_outcome(self, candidate: Candidate, result: dict, attempts: int) -> Outcome:
        """A descent candidate whose recipe was scored before: that candidate's scores, this
        run's gradient steps (or its failure)."""
        number, known = self.steps_only.pop(candidate.number)
        if Status(result["status"]) != Status.COMPLETE:
            t0, key = self.submitted.pop(candidate.number)
            return self._outcome(result, attempts, key, time.perf_counter() - t0)
        reused = self._reuse(candidate, number, known)
        return replace(reused, attempts=attempts, worker=result.get("worker"), descent=result.get("descent"),
                       timings={**reused.timings, "merge_s": result.get("merge_s", 0.0)})

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
                       stage=result.get("stage") if status == Status.STOPPED else None,
                       descent=result.get("descent") if status.scored else None)
