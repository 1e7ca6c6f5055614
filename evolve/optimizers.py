"""One ask/tell interface over pycma's CMA-ES and Optuna's samplers, always maximising fitness.

pycma works a generation at a time (ask a population, tell all of it); Optuna samplers ask one
candidate at a time, so workers never wait for a generation to finish. Both are seeded and both
checkpoint: pycma by pickling the strategy (with the population in flight), Optuna through its
SQLite study.
"""

from __future__ import annotations

import math
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np


@dataclass
class Candidate:
    genotype: list[float]
    generation: int
    index: int  # position inside its generation (CMA) or the study's trial number (Optuna)
    optuna_trial: Optional[object] = field(default=None, repr=False)


class CMAOptimizer:
    """pycma CMA-ES with box bounds. `ask()` returns a whole generation; the pending generation
    is part of the checkpoint, so a resumed run re-evaluates only its unfinished members."""

    generational = True

    def __init__(self, x0: Sequence[float], lower, upper, sigma0: float, popsize: Optional[int], seed: int, max_fevals: int):
        import cma

        opts = {
            "bounds": [list(lower), list(upper)],
            "seed": seed + 1,  # pycma treats 0 as "seed from time"
            "verbose": -9,
            "maxfevals": max_fevals,
            "tolfun": 0,
            "tolflatfitness": 10**9,
            "tolfunhist": 0,
            "tolstagnation": 10**9,
        }
        if popsize:
            opts["popsize"] = popsize
        # Dimensions of very different ranges: sigma is relative to each dimension's width.
        widths = np.array(upper, dtype=float) - np.array(lower, dtype=float)
        opts["CMA_stds"] = list(widths)
        self.es = cma.CMAEvolutionStrategy(list(x0), sigma0, opts)
        self.generation = 0
        self.pending: Optional[list[list[float]]] = None

    @property
    def popsize(self) -> int:
        return int(self.es.popsize)

    def ask(self) -> list[Candidate]:
        if self.pending is None:
            self.pending = [list(map(float, x)) for x in self.es.ask()]
        return [Candidate(x, self.generation, i) for i, x in enumerate(self.pending)]

    def tell(self, candidates: Sequence[Candidate], fitnesses: Sequence[float]) -> None:
        xs = [np.array(c.genotype) for c in candidates]
        # pycma minimises; failed candidates (None) count as worse than every finite one
        finite = [f for f in fitnesses if f is not None and math.isfinite(f)]
        worst = (min(finite) - 1.0 - abs(min(finite))) if finite else -1.0
        losses = [-(f if f is not None and math.isfinite(f) else worst) for f in fitnesses]
        self.es.tell(xs, losses)
        self.generation += 1
        self.pending = None

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            pickle.dump({"es": self.es, "generation": self.generation, "pending": self.pending}, f)
        tmp.replace(path)

    def load(self, path: Path) -> None:
        # The checkpoint is our own file in the experiment directory, written by save().
        with open(path, "rb") as f:
            state = pickle.load(f)
        self.es, self.generation, self.pending = state["es"], state["generation"], state["pending"]


class OptunaOptimizer:
    """Optuna samplers (CMA-ES, TPE, random) on the experiment's study: one candidate per ask."""

    generational = False

    def __init__(self, study, names: Sequence[str], lower, upper):
        import optuna

        self.study = study
        self.names = list(names)
        self.distributions = {
            n: optuna.distributions.FloatDistribution(lo, hi) for n, lo, hi in zip(self.names, lower, upper)
        }
        self.generation = 0

    @staticmethod
    def make_sampler(kind: str, seed: int, x0: dict, popsize: Optional[int]):
        import optuna

        if kind == "optuna-cmaes":
            return optuna.samplers.CmaEsSampler(x0=x0, seed=seed, popsize=popsize, warn_independent_sampling=False)
        if kind == "tpe":
            return optuna.samplers.TPESampler(seed=seed, multivariate=True)
        return optuna.samplers.RandomSampler(seed=seed)

    def ask(self) -> list[Candidate]:
        trial = self.study.ask(self.distributions)
        x = [float(trial.params[n]) for n in self.names]
        return [Candidate(x, self.generation, trial.number, optuna_trial=trial)]

    def tell(self, candidates, fitnesses) -> None:  # recorded through the study by the store
        pass

    def save(self, path: Path) -> None:  # the study is the checkpoint
        pass

    def load(self, path: Path) -> None:
        pass
