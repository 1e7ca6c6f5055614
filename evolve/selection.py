"""Which candidate a search exports: one rule, asked by best_config.yaml, final_model, the status
line, re-scoring, the report and the model card.

A search scores dozens of candidates on the same few items; the one with the highest search
fitness is, more often than not, the one that drew the luckiest items (the winner's curse), and
its lead over a hand-made recipe means little on items the search never saw. So the export is
not the maximum of the fitness. It is the candidate with the highest *lower confidence bound* of
its paired advantage over the best anchor (the best of the hand-made recipes the search scored
first, search_spaces: `anchors`):

    d    = Σ_t w_t · mean_i (x_ti − a_ti)                 fitness(candidate) − fitness(anchor)
    se²  = Σ_t w_t² · var_i (x_ti − a_ti) / n_t           (sample variance, per-item differences)
    LCB  = d − EXPORT_Z · se

over the items both were scored on (x: the candidate's per-item values, a: the anchor's, w: the
tasks' signed weights). The anchor itself has LCB 0, so a candidate is exported only when it beats
the best anchor by more than the noise of the items; among those, the one whose lead is most
certain. A candidate far better than every hand-made recipe keeps its lead; one that is better
by an item or two is not trusted over the recipe a user would have written.
docs/search-quality.md ("Which candidate is exported") gives the numbers that chose EXPORT_Z.

Where per-item values are missing (metrics that are not means over items, experiments written
before they were kept), `se` is 0 and the rule is the plain best fitness.

Rows are the store's (`ExperimentStore.rows()`): CandidateRow, one per complete candidate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

from .loop import Outcome

# z of the lower bound, chosen by measurement (docs/search-quality.md, "Robust export"): 1 held up
# best over the three experiments. A candidate that gains a items and loses none has bound
# (a - z*sqrt(a))/n, so at z = 1 one item is never enough (bound exactly 0, the case that made a
# search export 0.938 held-out against the anchor's 0.969) and two are.
EXPORT_Z = 1.0
# a bound must exceed the anchor's 0 by more than rounding: one item gained out of n gives d and
# z*se equal in exact arithmetic, which float sums can put a hair either side of zero
BOUND_EPS = 1e-9


@dataclass(frozen=True)
class CandidateRow:
    """One complete candidate as selection, re-scoring and the reports read it."""

    number: int
    fitness: Optional[float]
    metrics: dict = field(default_factory=dict)
    violation: float = 0.0  # > 0: infeasible (constraints)
    recipe_hash: Optional[str] = None
    anchor: Optional[str] = None  # the hand-made recipe's label, None for an optimiser's proposal
    items: Optional[dict] = None  # result key -> per-item values (racing: the first stages'), or None
    order: Optional[int] = None  # its place in the order of tells (None: its number)

    @classmethod
    def of(cls, number: int, outcome: Outcome, order: Optional[int], anchor: Optional[str]) -> "CandidateRow":
        return cls(number, outcome.fitness, outcome.metrics, outcome.violation, outcome.recipe_hash, anchor,
                   outcome.item_values or outcome.first_items, order)

    @property
    def feasible(self) -> bool:
        return self.violation <= 0


def ranked(rows: Sequence[CandidateRow]) -> list[CandidateRow]:
    """Feasible rows by search fitness, best first; equal fitness: the earlier told first. The one
    ordering of 'best by fitness' (racing pairs with its first row; re-scoring takes its top)."""
    feasible = [r for r in rows if r.feasible and r.fitness is not None]
    return sorted(feasible, key=lambda r: (-r.fitness, r.number if r.order is None else r.order, r.number))


@dataclass(frozen=True)
class Selection:
    row: CandidateRow  # the exported row
    reason: str  # why, in words (model card, report, the end of a search)
    lead: float = 0.0  # its fitness minus the best anchor's (0 for the anchor itself)
    bound: float = 0.0  # the lower confidence bound of that lead

    @property
    def number(self) -> int:
        return self.row.number


def paired_bound(candidate: CandidateRow, anchor: CandidateRow, weights: dict[str, float], z: float = EXPORT_Z) -> tuple[float, float]:
    """(fitness lead of `candidate` over `anchor`, its lower confidence bound), from their per-item
    values on the items both hold; without per-item values the bound is the lead itself."""
    lead = candidate.fitness - anchor.fitness
    a_items, c_items = anchor.items or {}, candidate.items or {}
    if not all(k in a_items and k in c_items for k in weights):
        return lead, lead
    mean_diff, variance = 0.0, 0.0
    for key, w in weights.items():
        n = min(len(a_items[key]), len(c_items[key]))
        if n == 0:
            return lead, lead
        diffs = [c - a for c, a in zip(c_items[key][:n], a_items[key][:n])]
        m = math.fsum(diffs) / n
        mean_diff += w * m
        if n > 1:
            variance += w * w * math.fsum((d - m) ** 2 for d in diffs) / (n - 1) / n
    return mean_diff, mean_diff - z * math.sqrt(variance)


def choose(rows: Sequence[CandidateRow], weights: dict[str, float], z: float = EXPORT_Z) -> Optional[Selection]:
    """The candidate the search's rule exports from the complete rows (see the module docstring);
    None when no feasible candidate completed. `weights`: the tasks' signed weights (Scoring)."""
    order = ranked(rows)
    if not order:
        return None
    anchor = next((r for r in order if r.anchor), None)
    if anchor is None:
        return Selection(order[0], "the best search fitness (no anchor was scored)")
    best = Selection(anchor, f"the best hand-made recipe ({anchor.anchor}): no candidate beat it by more than "
                             f"the noise of the search items (z = {z:g})")
    for row in order:
        if row is anchor:
            continue
        lead, bound = paired_bound(row, anchor, weights, z)
        if bound > best.bound + BOUND_EPS:
            best = Selection(row, f"leads the best hand-made recipe ({anchor.anchor}, trial {anchor.number}) by "
                                  f"{lead:.4g} in fitness, by at least {bound:.4g} (z = {z:g})", lead, bound)
    return best


def exported(rows: Sequence[CandidateRow], scoring, rescore: Optional[dict] = None) -> Optional[Selection]:
    """The one answer to "which candidate is exported": the best on the held-out tasks once
    re-scoring has finished (`rescore`: evolve.rescore's table); in a Pareto search with
    `pareto_select: <task>`, the front member best on that task; else `choose`. `scoring`:
    the search's evolve.objectives.Scoring."""
    if rescore and rescore.get("chosen") is not None:
        row = next((r for r in rows if r.number == rescore["chosen"]), None)
        if row is not None:
            return Selection(row, "the best of the top candidates on the held-out tasks (rescore)")
    feasible = [r for r in rows if r.feasible]
    if scoring.select != "weighted_sum":
        if not feasible:
            return None
        sign = scoring.sign(scoring.select)
        row = max(scoring.front(feasible), key=lambda r: (sign * r.metrics[scoring.select], r.fitness, -r.number))
        return Selection(row, f"the Pareto front's best on {scoring.select}")
    return choose(rows, scoring.signed_weights)
