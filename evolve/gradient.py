"""`optimizer: gradient`: learn the genes by backpropagation (AdaMerging's idea, for LLM merges), and
`optimizer: [cma, gradient]`: a CMA-ES stage, then gradient refinement from its best candidate.

The optimiser is an `Optimizer` like the others (evolve.optimizers): the loop, the study, the
report, the export rule and resume treat its candidates as any. What differs is only what a
proposal carries: each candidate after the anchors comes with a `DescentRequest`
(evaluators.descent), so the worker that scores it then takes `gradient_steps` projected Adam steps
from it on a seeded mini-batch of the search items, and reports where they ended with Adam's
moments. That end point is the next candidate. The chain is sequential (one candidate at a time:
each starts where the previous one's steps ended), so with several workers only one is busy.

Exact resume: the optimiser's whole state is the last told `DescentResult` (in the journal, with
the candidate's outcome), so the usual replay rebuilds it bit for bit; each step's mini-batch is
seeded by the search seed and Adam's step count.

A failed candidate (or failed steps) leaves the point and the moments as they were; the next
candidate retries from there with the next mini-batches. Only weight genes are trained
(search_spaces: Genome.gradient_genes); switch genes and a sparsification's densities keep the
start's values.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

from evaluators.descent import AdamState, DescentRequest

from .ask_tell import Optimizer, Proposal, Result, best_told, finite

# Defaults (docs/mergekit-evolve.md): a step of 2 % of a gene's range (Adam's first steps move each
# gene by about its learning rate), 4 steps of 8 items between two scored candidates.
LEARNING_RATE = 0.02
GRADIENT_STEPS = 4
BATCH_SIZE = 8
GRADIENT_SHARE = 0.5  # [cma, gradient]: the share of max_fevals the gradient stage gets


class GradientOptimizer(Optimizer):
    def __init__(self, space, x0: Sequence[float], seed: int = 0, genes: Sequence[int] = (),
                 learning_rate: float = LEARNING_RATE, gradient_steps: int = GRADIENT_STEPS,
                 batch_size: int = BATCH_SIZE, loss: str = "nll", anchors: Sequence[Sequence[float]] = (),
                 start: Optional[Sequence[float]] = None):
        if not genes:
            raise ValueError("optimizer gradient: the genome has no gene the merge is differentiable in")
        self.space = space
        self.seed = seed
        self.genes = tuple(genes)
        self.lower = tuple(space.lower[g] for g in self.genes)
        self.upper = tuple(space.upper[g] for g in self.genes)
        self.learning_rates = tuple(learning_rate * (hi - lo) for lo, hi in zip(self.lower, self.upper))
        self.steps, self.batch_size, self.loss = gradient_steps, batch_size, loss
        # with `start` (the second stage of [cma, gradient]) no anchor is scored again
        self.anchors = [] if start is not None else [tuple(map(float, a)) for a in anchors] or [tuple(map(float, x0))]
        self.anchors_asked = 0
        self.anchor_results: dict[int, Result] = {}  # index -> result
        self.x: Optional[tuple[float, ...]] = tuple(map(float, start)) if start is not None else None
        self.adam = AdamState.fresh(len(self.genes))
        self.in_flight = False
        self.asked = 0  # descent candidates asked

    def ask(self) -> Optional[Proposal]:
        if self.anchors_asked < len(self.anchors):
            self.anchors_asked += 1
            return Proposal(self.anchors[self.anchors_asked - 1], -1, self.anchors_asked - 1)
        if self.x is None:
            if len(self.anchor_results) < len(self.anchors):
                return None  # the descent starts at the best anchor: wait for them all
            self.x = best_told([(self.anchors[i], r) for i, r in sorted(self.anchor_results.items())]) or self.anchors[0]
        if self.in_flight:
            return None  # each candidate starts where the previous one's steps end
        self.in_flight = True
        self.asked += 1
        request = DescentRequest(
            genes=self.genes, start=tuple(self.x[g] for g in self.genes), lower=self.lower, upper=self.upper,
            learning_rates=self.learning_rates, adam=self.adam, steps=self.steps, batch_size=self.batch_size,
            seed=self.seed, objective=self.loss)
        return Proposal(self.x, self.asked - 1, 0, descent=request)

    def tell(self, proposal: Proposal, result: Result) -> None:
        if proposal.descent is None:
            self.anchor_results[proposal.index] = result
            return
        self.in_flight = False
        if result.descent is None:
            return  # failed: retried from the same point with the next mini-batches
        x = list(proposal.genotype)
        for g, value in zip(self.genes, result.descent.end):
            x[g] = value
        self.x, self.adam = tuple(x), result.descent.adam


class ChainedOptimizer(Optimizer):
    """`[cma, gradient]`: the first optimiser for `first_budget` candidates, then a gradient
    optimiser started at the best of them (`second(start)` builds it)."""

    def __init__(self, first: Optimizer, first_budget: int, second):
        self.first, self.first_budget, self.make_second = first, first_budget, second
        self.second: Optional[Optimizer] = None
        self.asked_first = 0
        self.told_first: list[tuple[tuple[float, ...], Result]] = []

    @property
    def generational(self) -> bool:  # what reports say: the stage that runs now
        return self.second is None and self.first.generational

    def ask(self) -> Optional[Proposal]:
        if self.asked_first < self.first_budget:
            proposal = self.first.ask()
            if proposal is not None:
                self.asked_first += 1
            return proposal
        if self.second is None:
            if len(self.told_first) < self.asked_first:
                return None  # the refinement starts from the first stage's best: wait for all of it
            self.second = self.make_second(best_told(self.told_first) or self.told_first[0][0])
        return self.second.ask()

    def tell(self, proposal: Proposal, result: Result) -> None:
        if proposal.descent is not None:
            self.second.tell(proposal, result)
        else:
            self.told_first.append((proposal.genotype, result))
            self.first.tell(proposal, result)


def descent_probes(genome, genotype: Sequence[float], genes: Sequence[int]) -> tuple[tuple[dict, ...], tuple[float, ...]]:
    """(per gene: the recipe, as plain data, with that gene moved by its step; the steps): what the
    worker plans to get the decoding's Jacobian (evaluators.descent). A step is a tenth of the gene's
    range, inwards; the decoding is affine in these genes, so any step inside the bounds gives the
    exact slope."""
    probes, steps = [], []
    for g in genes:
        d = genome.dimensions[g]
        step = 0.1 * (d.high - d.low)
        if genotype[g] + step > d.high:
            step = -step
        x = list(genotype)
        x[g] += step
        probes.append(genome.decode(x).to_plain())
        steps.append(step)
    return tuple(probes), tuple(steps)


def first_stage_budget(max_fevals: Optional[int], share: float = GRADIENT_SHARE) -> int:
    """Candidates the first stage of `[cma, gradient]` gets: the rest of max_fevals after the
    gradient stage's share (at least one of each)."""
    total = max_fevals or 100
    return max(1, min(total - 1, total - math.floor(share * total)))
