"""`optimizer: gradient`: learn the genes by backpropagation (AdaMerging's idea, for LLM merges), and
`optimizer: [cma, gradient]`: a CMA-ES stage, then gradient refinement from its best candidate.

The optimiser is an `Optimizer` like the others (evolve.optimizers): the loop, the study, the
report, the export rule and resume treat its candidates as any. What differs is only what a
proposal carries: each candidate after the anchors comes with a `DescentRequest`
(evaluators.descent), so the worker that scores it then takes `gradient_steps` projected Adam steps
from it on a seeded mini-batch of the search items, and reports where they ended with Adam's
moments. That end point is the next candidate of its chain. A chain is sequential (each candidate
starts where the previous one's steps ended); `chains: N` runs N chains side by side from the N best
starts, so that N workers are busy (one chain, the default, keeps one busy).

Exact resume: a chain's whole state is its last told `DescentResult` (in the journal, with the
candidate's outcome), so the usual replay rebuilds every chain bit for bit; each step's mini-batch
is seeded by the chain's seed and Adam's step count.

A failed candidate (or failed steps) leaves the point and the moments as they were; the next
candidate retries from there with the next mini-batches. Only weight genes are trained
(search_spaces: Genome.gradient_genes); switch genes and a sparsification's densities keep the
start's values.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Optional, Sequence

from evaluators.descent import AdamState, DescentRequest

from .ask_tell import Optimizer, Proposal, Result, ranked_told

# Defaults (docs/mergekit-evolve.md): a step of 2 % of a gene's range (Adam's first steps move each
# gene by about its learning rate), 4 steps of 8 items between two scored candidates.
LEARNING_RATE = 0.02
GRADIENT_STEPS = 4
BATCH_SIZE = 8
GRADIENT_SHARE = 0.5  # [cma, gradient]: the share of max_fevals the gradient stage gets


@dataclass
class _Chain:
    """One descent: where its next candidate starts, Adam's moments there, its mini-batch seed."""

    x: tuple[float, ...]
    adam: AdamState
    seed: int
    in_flight: bool = False


class GradientOptimizer(Optimizer):
    """`chains` descents side by side (one per worker is what keeps several workers busy): chain 0
    starts at the best start (the best anchor, or `[cma, gradient]`'s best first-stage candidate),
    chain i at the i-th best distinct one, and where there are fewer than `chains`, at a seeded
    uniform point of the trained genes' box. Chain i draws its mini-batches with seed `seed + i`.
    `starts`: given (the second stage of `[cma, gradient]`, best first), no anchor is scored."""

    def __init__(self, space, x0: Sequence[float], seed: int = 0, genes: Sequence[int] = (),
                 learning_rate: float = LEARNING_RATE, gradient_steps: int = GRADIENT_STEPS,
                 batch_size: int = BATCH_SIZE, loss: str = "nll", anchors: Sequence[Sequence[float]] = (),
                 starts: Optional[Sequence[Sequence[float]]] = None, chains: int = 1):
        if not genes:
            raise ValueError("optimizer gradient: the genome has no gene the merge is differentiable in")
        if chains < 1:
            raise ValueError("optimizer gradient: chains must be at least 1")
        self.space = space
        self.seed = seed
        self.genes = tuple(genes)
        self.lower = tuple(space.lower[g] for g in self.genes)
        self.upper = tuple(space.upper[g] for g in self.genes)
        self.learning_rates = tuple(learning_rate * (hi - lo) for lo, hi in zip(self.lower, self.upper))
        self.steps, self.batch_size, self.loss = gradient_steps, batch_size, loss
        self.chain_count = chains
        self.anchors = [] if starts is not None else [tuple(map(float, a)) for a in anchors] or [tuple(map(float, x0))]
        self.anchors_asked = 0
        self.anchor_results: dict[int, Result] = {}  # index -> result
        self.chains: list[_Chain] = self._chains(starts) if starts is not None else []
        self.asked = 0  # descent candidates asked, over all chains

    def _chains(self, ranked: Sequence[Sequence[float]]) -> list[_Chain]:
        starts = [tuple(map(float, x)) for x in ranked[:self.chain_count]]
        rng = random.Random(self.seed)
        while len(starts) < self.chain_count:
            x = list(starts[0])
            for g, lo, hi in zip(self.genes, self.lower, self.upper):
                x[g] = rng.uniform(lo, hi)
            starts.append(tuple(x))
        return [_Chain(x, AdamState.fresh(len(self.genes)), self.seed + i) for i, x in enumerate(starts)]

    def ask(self) -> Optional[Proposal]:
        if self.anchors_asked < len(self.anchors):
            self.anchors_asked += 1
            return Proposal(self.anchors[self.anchors_asked - 1], -1, self.anchors_asked - 1)
        if not self.chains:
            if len(self.anchor_results) < len(self.anchors):
                return None  # the descents start at the best anchors: wait for them all
            told = [(self.anchors[i], r) for i, r in sorted(self.anchor_results.items())]
            self.chains = self._chains(ranked_told(told) or [self.anchors[0]])
        # each candidate of a chain starts where the chain's previous one's steps ended
        index = next((i for i, c in enumerate(self.chains) if not c.in_flight), None)
        if index is None:
            return None
        chain = self.chains[index]
        chain.in_flight = True
        self.asked += 1
        request = DescentRequest(
            genes=self.genes, start=tuple(chain.x[g] for g in self.genes), lower=self.lower, upper=self.upper,
            learning_rates=self.learning_rates, adam=chain.adam, steps=self.steps, batch_size=self.batch_size,
            seed=chain.seed, objective=self.loss)
        return Proposal(chain.x, self.asked - 1, index, descent=request)

    def tell(self, proposal: Proposal, result: Result) -> None:
        if proposal.descent is None:
            self.anchor_results[proposal.index] = result
            return
        chain = self.chains[proposal.index]
        chain.in_flight = False
        if result.descent is None:
            return  # failed: retried from the same point with the next mini-batches
        x = list(proposal.genotype)
        for g, value in zip(self.genes, result.descent.end):
            x[g] = value
        chain.x, chain.adam = tuple(x), result.descent.adam


class ChainedOptimizer(Optimizer):
    """`[cma, gradient]`: the first optimiser for `first_budget` candidates, then a gradient
    optimiser started at the best of them (`second(ranked)` builds it from the first stage's
    distinct genotypes, best first)."""

    def __init__(self, first: Optimizer, first_budget: int, second):
        self.first, self.first_budget, self.make_second = first, first_budget, second
        self.second: Optional[Optimizer] = None
        self.asked_first = 0
        self.told_first: list[tuple[tuple[float, ...], Result]] = []

    @property
    def generational(self) -> bool:  # what reports say: the stage that runs now
        return self.second is None and self.first.generational

    def preload(self) -> None:
        self.first.preload()

    def ask(self) -> Optional[Proposal]:
        if self.asked_first < self.first_budget:
            proposal = self.first.ask()
            if proposal is not None:
                self.asked_first += 1
            return proposal
        if self.second is None:
            if len(self.told_first) < self.asked_first:
                return None  # the refinement starts from the first stage's best: wait for all of it
            self.second = self.make_second(ranked_told(self.told_first) or [self.told_first[0][0]])
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
