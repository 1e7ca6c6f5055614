"""The ask/tell interface every optimiser implements (evolve.optimizers documents the lifecycle and
holds the registry; evolve.gradient's optimisers implement it too)."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Optional, Sequence

from evaluators.descent import DescentRequest, DescentResult


@dataclass(frozen=True)
class Proposal:
    """One point to evaluate. `generation` and `index` are the optimiser's own bookkeeping (for
    pycma: the distribution update it was sampled after and its position among that update's
    samples; -1 marks the starting point)."""

    genotype: tuple[float, ...]
    generation: int
    index: int
    # a gradient search's candidate: the steps its worker takes after scoring it (evolve.gradient)
    descent: Optional[DescentRequest] = None


@dataclass(frozen=True)
class Result:
    """What an optimiser is told about one evaluated proposal."""

    fitness: Optional[float]  # one number to maximise; None: the candidate failed
    objectives: tuple[float, ...] = ()  # multi-objective searches: each maximised (minimised ones negated)
    violation: float = 0.0  # > 0: outside the constraints by that much (its scores are kept)
    stopped: bool = False  # racing stopped it early: `fitness` is the estimate from its first items
    descent: Optional[DescentResult] = None  # a gradient search's candidate: where its steps ended


class Optimizer(ABC):
    generational: bool = False
    objectives: int = 1  # how many objectives `tell` expects (> 1: Result.objectives is used)

    @abstractmethod
    def ask(self) -> Optional[Proposal]:
        """The next point to evaluate, or None if the optimiser must first be told more results."""

    @abstractmethod
    def tell(self, proposal: Proposal, result: Result) -> None:
        """The result of a proposal. Any order, each proposal once."""

    def preload(self) -> None:
        """Import what a later `ask` will need. The search calls it in a thread while its workers
        start, so a slow import (pycma pulls in scipy.stats: 1-2 s here) is not paid after the
        anchors, with every worker idle. Nothing else: the optimiser's state must not change."""


def finite(value: Optional[float]) -> bool:
    return value is not None and math.isfinite(value)


def ranked_told(results: Sequence[tuple[tuple[float, ...], Result]]) -> list[tuple[float, ...]]:
    """The distinct genotypes with a finite fitness, best first: the feasible ones by fitness, then
    the others by fitness (the first in `results` on ties); results racing stopped early do not
    count."""
    scored = [(i, x, r) for i, (x, r) in enumerate(results) if finite(r.fitness) and not r.stopped]
    order = sorted(scored, key=lambda item: (item[2].violation > 0, -item[2].fitness, item[0]))
    ranked: list[tuple[float, ...]] = []
    for _, x, _ in order:
        if x not in ranked:
            ranked.append(x)
    return ranked


def best_told(results: Sequence[tuple[tuple[float, ...], Result]]) -> Optional[tuple[float, ...]]:
    """The genotype an optimiser starts from or continues with (`ranked_told`'s first), None when no
    result has a finite fitness. CMA-ES centres its distribution on it, the gradient search starts
    its descent there, `[cma, gradient]` hands it to the second stage."""
    ranked = ranked_told(results)
    return ranked[0] if ranked else None
