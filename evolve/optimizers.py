"""Optimisers behind one small ask/tell interface, always maximising fitness, and a registry.

Lifecycle of an optimiser during a search:

1. `make_optimizer(name, space, x0, seed, anchors=..., **options)` builds it. The anchors (the
   hand-made recipes the genome can express, `x0` the genome's starting point first; just `x0`
   by default) are always the first proposals (`generation` -1, `index` their position): the
   baselines every later candidate must beat, and where the search starts. CMA-ES waits for all
   of them (when there are several) and centres its distribution on the best; Optuna samplers
   get them as enqueued trials, so their results inform the sampler like any other.
2. The search loop calls `ask()` whenever a worker is free and `tell(proposal, result)` as soon as
   a candidate's result is in, in whatever order results arrive. A `Result` carries the fitness
   (None for a failed candidate: worse than any finite value), the objectives of a multi-objective
   search, the constraint violation (> 0: infeasible, ranked below every feasible candidate) and
   whether racing stopped the candidate early (its fitness is then an estimate from a subset of
   the items: Optuna samplers record it as a pruned trial, CMA-ES ranks it by the estimate).
   `ask()` may return None: "nothing to propose until more results are told" (CMA-ES waiting for
   its anchors or behind its generation barrier; the gradient optimiser while its one candidate
   runs, since the next one starts where that one's gradient steps end: evolve.gradient).
3. Nothing of an optimiser is ever saved: a freshly built one (same name, space, x0, seed and
   options), asked and told again in the journal's recorded order, is in exactly the state of the
   one that was never stopped (`evolve.loop.resume`). So an optimiser must be a deterministic
   function of its arguments and the sequence of asks and tells: every random draw comes from a
   generator it seeds itself. This is why a resume never unpickles anything from an experiment
   directory (they travel between people), and why no library's private internals are stored
   (they change between versions: Optuna 5.1 stopped pickling studies).

`generational` says whether the optimiser works in populations (pycma) or one candidate at a time
(Optuna samplers); it only changes what reports say, never how the loop drives it.

Adding an optimiser = one `Optimizer` subclass + one line in `OPTIMIZERS`. Optimisers never touch
storage, Ray or the terminal.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Optional, Sequence

from search_spaces.genome import SearchSpace

from .ask_tell import Optimizer, Proposal, Result, best_told, finite  # noqa: F401  (the interface, re-exported for callers)
from .gradient import (BATCH_SIZE, GRADIENT_SHARE, GRADIENT_STEPS, LEARNING_RATE, ChainedOptimizer,
                       GradientOptimizer, first_stage_budget)


@contextlib.contextmanager
def _numpy_global_rng(holder: dict):
    """For any draw pycma still makes from numpy's global generator: swap in the optimiser's own
    state for the duration of a call and take it back out afterwards, so nothing else in the
    process can shift the optimiser's random stream (a replay must draw the same numbers)."""
    import numpy as np

    outside = np.random.get_state()
    if holder.get("state") is not None:
        np.random.set_state(holder["state"])
    try:
        yield
    finally:
        holder["state"] = np.random.get_state()
        np.random.set_state(outside)


class CMAESOptimizer(Optimizer):
    """pycma CMA-ES with box bounds, driven one candidate at a time without a generation barrier.

    Scheme: the distribution is updated as soon as `popsize` results have been told since the last
    update, whichever candidates they belong to. While the current generation's members are still
    running, a free worker gets an extra sample drawn from the same (current) distribution.
    Why this is sound: every sample is an independent draw from the distribution it was drawn
    from, so `popsize` results of the current distribution are a valid population regardless of
    which ones finished first (merge and evaluation time do not depend on the merge weights).
    Results of an older distribution that arrive after its update are not thrown away: they join
    the next update the way pycma treats injected solutions (their step lengths are clipped by
    `check_points`), so every evaluation informs the search. With one worker no extra sample is
    ever drawn and the run is exactly classic CMA-ES. `generation_barrier=True` restores the
    classic behaviour with several workers too (`ask()` returns None until the generation is told).
    """

    generational = True

    def __init__(self, space: SearchSpace, x0: Sequence[float], seed: int = 0, popsize: Optional[int] = None,
                 sigma0: float = 1 / 6, max_fevals: Optional[int] = None, generation_barrier: bool = False,
                 anchors: Sequence[Sequence[float]] = ()):
        import numpy as np

        # pycma draws from numpy's global generator unless given its own: a private seeded
        # generator makes the random stream a function of the seed alone
        self._random = np.random.RandomState(seed + 1)  # seed + 1: pycma's seed 0 means "from the clock"
        opts = {
            "bounds": [list(space.lower), list(space.upper)],
            "randn": self._random.randn,
            "verbose": -9,
            "tolfun": 0,
            "tolflatfitness": 10**9,
            "tolfunhist": 0,
            "tolstagnation": 10**9,
            # sigma0 is relative to each dimension's width (dimensions of very different ranges)
            "CMA_stds": list(np.array(space.upper, dtype=float) - np.array(space.lower, dtype=float)),
        }
        if max_fevals:
            opts["maxfevals"] = max_fevals
        if popsize:
            opts["popsize"] = popsize
        self._rng: dict = {}
        self._opts, self._sigma0 = opts, sigma0
        self.es = None  # built once the anchors are in: centred on the best of them
        self.x0 = tuple(map(float, x0))
        self.anchors = [tuple(map(float, a)) for a in anchors] or [self.x0]
        self.anchor_results: dict[int, Result] = {}  # index -> result
        self.barrier = generation_barrier
        self.anchors_asked = 0
        self.updates = 0  # distribution updates so far (= the generation of new samples)
        self.batch: list[tuple[float, ...]] = []  # samples of the current distribution not yet handed out
        self.handed = 0  # samples of the current distribution handed out
        self.results: list[tuple[tuple[float, ...], float, bool]] = []  # (x, loss, stale) awaiting an update
        self.sampled_since_update = False  # pycma allows one tell per ask

    @property
    def popsize(self) -> int:
        return int(self.es.popsize)

    def preload(self) -> None:
        import cma  # noqa: F401

    def _start(self) -> None:
        """pycma's strategy, centred on the best anchor told (`best_told`); with one anchor, on it
        whatever its result (the classic start at x0)."""
        import cma

        best = best_told([(self.anchors[i], r) for i, r in sorted(self.anchor_results.items())])
        mean = best if len(self.anchors) > 1 and best is not None else self.anchors[0]
        with _numpy_global_rng(self._rng):
            self.es = cma.CMAEvolutionStrategy(list(mean), self._sigma0, self._opts)

    def ask(self) -> Optional[Proposal]:
        if self.anchors_asked < len(self.anchors):
            self.anchors_asked += 1
            return Proposal(self.anchors[self.anchors_asked - 1], -1, self.anchors_asked - 1)
        if self.es is None:
            if len(self.anchors) > 1 and len(self.anchor_results) < len(self.anchors):
                return None  # the distribution starts at the best anchor: wait for them all
            self._start()
        if len(self.results) >= self.popsize and self.sampled_since_update:
            self._update()  # deferred: more workers than popsize told a population between two asks
        if not self.batch:
            if self.handed >= self.popsize and self.barrier:
                return None
            with _numpy_global_rng(self._rng):
                # a fresh generation, or one extra sample of the current distribution
                number = self.popsize if self.handed == 0 else 1
                self.batch = [tuple(map(float, x)) for x in self.es.ask(number)]
            self.sampled_since_update = True
        x = self.batch.pop(0)
        self.handed += 1
        return Proposal(x, self.updates, self.handed - 1)

    def tell(self, proposal: Proposal, result: Result) -> None:
        if proposal.generation < 0:  # an anchor is not a sample of any distribution
            self.anchor_results[proposal.index] = result
            return
        # pycma minimises. Failures rank last; infeasible candidates after every feasible one, by
        # violation (the penalty is relative to the population, so it is applied in _update)
        loss = -result.fitness if finite(result.fitness) else math.inf
        self.results.append((proposal.genotype, loss, proposal.generation < self.updates, result.violation))
        if len(self.results) >= self.popsize and self.sampled_since_update:
            self._update()

    def _update(self) -> None:
        import numpy as np

        xs = [np.array(x) for x, _, _, _ in self.results]
        feasible = [loss for _, loss, _, violation in self.results if math.isfinite(loss) and violation <= 0]
        worst = (max(feasible) + 1.0 + abs(max(feasible))) if feasible else 1.0
        worst_violation = max([v for _, _, _, v in self.results] + [0.0])
        losses = [
            worst + worst_violation + 1.0 if not math.isfinite(loss) else worst + violation if violation > 0 else loss
            for _, loss, _, violation in self.results
        ]
        stale = [i for i, (_, _, old, _) in enumerate(self.results) if old]
        with _numpy_global_rng(self._rng):
            self.es.tell(xs, losses, check_points=stale or None)
        self.updates += 1
        self.sampled_since_update = False
        self.results = []
        self.batch = []  # unhanded samples of the old distribution are dropped, never evaluated
        self.handed = 0


class OptunaSamplerOptimizer(Optimizer):
    """An Optuna sampler (TPE, NSGA-II, CMA-ES, random) over a private in-memory study: one
    candidate per ask. The experiment's SQLite study is written by the store, not here: this study
    lives only in memory and is rebuilt by replay on resume. With `objectives > 1` the study has one maximised direction per objective; with
    `constraints` the sampler is given each trial's violation (TPE and NSGA-II use it)."""

    def __init__(self, space: SearchSpace, x0: Sequence[float], seed: int = 0, sampler: str = "tpe",
                 popsize: Optional[int] = None, objectives: int = 1, constraints: bool = False,
                 anchors: Sequence[Sequence[float]] = ()):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.space = space
        self.objectives = objectives
        self.distributions = optuna_distributions(space)
        start = dict(zip(space.names, map(float, x0)))
        self.constraints = constraints
        self.study = optuna.create_study(directions=["maximize"] * objectives, sampler=SAMPLERS[sampler](seed, start, popsize))
        self.n_anchors = len(anchors) or 1
        for anchor in anchors or [x0]:
            self.study.enqueue_trial(dict(zip(space.names, map(float, anchor))))

    def ask(self) -> Proposal:
        trial = self.study.ask(self.distributions)
        x = tuple(float(trial.params[n]) for n in self.space.names)
        return Proposal(x, -1 if trial.number < self.n_anchors else 0, trial.number)

    def tell(self, proposal: Proposal, result: Result) -> None:
        import optuna

        trial = optuna.trial.Trial(self.study, self.study._storage.get_trial_id_from_study_id_trial_number(
            self.study._study_id, proposal.index))
        if self.constraints:  # Optuna's samplers read it: <= 0 is feasible
            trial.set_constraint("violation", float(result.violation))
        values = result.objectives if self.objectives > 1 else (result.fitness,)
        if not finite(result.fitness) or not all(finite(v) for v in values):
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
        elif result.stopped and self.objectives == 1:
            # honest about racing: a pruned trial with its estimate as the last intermediate value
            trial.report(float(result.fitness), step=0)
            self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            self.study.tell(trial, list(map(float, values)))


def _tpe(seed: int, x0: dict, popsize: Optional[int]):
    import optuna

    # constant_liar: candidates still running count as bad, so parallel workers spread out
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)


def _nsga2(seed: int, x0: dict, popsize: Optional[int]):
    import optuna

    # Optuna's default population of 50 would be one generation of a typical merge budget
    return optuna.samplers.NSGAIISampler(population_size=popsize or NSGA2_POPSIZE, seed=seed)


def _optuna_cmaes(seed: int, x0: dict, popsize: Optional[int]):
    import warnings

    import optuna

    with warnings.catch_warnings():  # x0 is deprecated in Optuna 4.9+ but is still the way to centre the search
        warnings.simplefilter("ignore", FutureWarning)
        return optuna.samplers.CmaEsSampler(x0=x0, seed=seed, popsize=popsize, warn_independent_sampling=False)


def _random(seed: int, x0: dict, popsize: Optional[int]):
    import optuna

    return optuna.samplers.RandomSampler(seed=seed)


NSGA2_POPSIZE = 10
SAMPLERS: dict[str, Callable] = {"tpe": _tpe, "nsga2": _nsga2, "optuna-cmaes": _optuna_cmaes, "random": _random}
# the samplers that search several objectives at once (the others optimise one number)
MULTI_OBJECTIVE = ("tpe", "nsga2", "random")


def _cma(space, x0, seed, popsize=None, sigma0=1 / 6, max_fevals=None, generation_barrier=False, anchors=(), **_):
    return CMAESOptimizer(space, x0, seed, popsize, sigma0, max_fevals, generation_barrier, anchors)


def _sampler(kind: str) -> Callable:
    def factory(space, x0, seed, popsize=None, objectives=1, constraints=False, anchors=(), **_):
        return OptunaSamplerOptimizer(space, x0, seed, kind, popsize, objectives, constraints, anchors)

    return factory


def _gradient(space, x0, seed, genes=(), learning_rate=None, gradient_steps=None, batch_size=None, loss="nll",
              anchors=(), starts=None, chains=None, **_):
    return GradientOptimizer(space, x0, seed, genes, learning_rate or LEARNING_RATE, gradient_steps or GRADIENT_STEPS,
                             batch_size or BATCH_SIZE, loss, anchors, starts, chains or 1)


def _cma_then_gradient(space, x0, seed, max_fevals=None, gradient_share=None, **options):
    first = _cma(space, x0, seed, max_fevals=max_fevals, **options)
    second = {k: v for k, v in options.items() if k != "anchors"}
    budget = first_stage_budget(max_fevals, GRADIENT_SHARE if gradient_share is None else gradient_share)
    return ChainedOptimizer(first, budget, lambda ranked: _gradient(space, x0, seed, starts=ranked, **second))


# name -> factory(space, x0, seed, **options). Options an optimiser does not use are ignored.
OPTIMIZERS: dict[str, Callable[..., Optimizer]] = {
    "cma": _cma,
    "gradient": _gradient,
    "cma+gradient": _cma_then_gradient,
    "tpe": _sampler("tpe"),
    "nsga2": _sampler("nsga2"),
    "optuna-cmaes": _sampler("optuna-cmaes"),
    "random": _sampler("random"),
}


def optuna_distributions(space: SearchSpace) -> dict:
    """The space as Optuna's distributions (name -> FloatDistribution): the sampler's study and the
    experiment's study share them."""
    import optuna

    return {n: optuna.distributions.FloatDistribution(lo, hi) for n, lo, hi in zip(space.names, space.lower, space.upper)}


def make_optimizer(name: str, space: SearchSpace, x0: Sequence[float], seed: int, **options) -> Optimizer:
    try:
        factory = OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r} (known: {', '.join(OPTIMIZERS)})") from None
    if options.get("objectives", 1) > 1 and name not in MULTI_OBJECTIVE:
        raise ValueError(f"optimizer {name} optimises one number: several objectives need {', '.join(MULTI_OBJECTIVE)}")
    return factory(space, x0, seed, **options)
