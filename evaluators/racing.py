"""Racing (multi-fidelity evaluation): score a candidate on a seeded share of each task's items
first, and on more of them only while it could still beat the best candidate so far.

Stages. `fractions` f_1 < ... < f_K (one number: K = 1) cut one seeded order of each task's items
(`split_stages`) into K + 1 stages: stage j holds the items between f_{j-1} and f_j of the way
along that order, the last stage the rest. Stages 1..j together are always a prefix of the same
order, the same for every candidate, so after any stage all candidates have been scored on the
same items. A candidate is scored stage by stage and checked after each stage but the last.

The rule is paired: the best complete candidate B's per-item values on every stage but the last
are known (the driver keeps them with B's trial). After stage j, for each task t with signed
weight w_t (negative for lower-is-better metrics), N_t items in all and n_t items scored so far
(stages 1..j), let d_ti = c_ti - b_ti be candidate c's value minus B's on item i, with mean m_t
and sample variance s_t^2 (n_t - 1 in the denominator). Fitness is Σ w_t·(task mean), so

    fitness(c) - fitness(B) = Σ_t w_t·D_t,   D_t = the mean of d_ti over all N_t items,

and m_t is the mean of a simple random sample (without replacement) of n_t of those N_t
differences. Its standard error is s_t·sqrt((1 - n_t/N_t) / n_t) (finite-population
correction: no error when every item has been scored). Tasks are sampled independently, so the
candidate's fitness is bounded at z standard errors by

    U = fitness(B) + Σ_t w_t·m_t + z·sqrt(Σ_t w_t^2·s_t^2·(1 - n_t/N_t) / n_t),

and the candidate stops at the first stage where U < fitness(B), i.e. where Σ w_t·m_t + z·sqrt(...)
< 0. A task with a single scored item (and more items left) has no variance estimate: nothing is
stopped at that stage.

Several looks: each stage is checked at the same z, with no correction for looking more than
once. With z = 1 a candidate exactly as good as B is stopped at one look about one time in six
(Φ(-1) = 0.16); with looks at 20 % and 50 % about one time in four (0.25: the two looks share
items, their standardised differences correlate sqrt((1/0.5 - 1)/(1/0.2 - 1)) = 0.5). The later
look has more items and a tighter bound, so it stops candidates only slightly worse than B,
which the first look had to let through.

Why paired: candidates close in parameter space (a converging CMA-ES) answer most items alike,
so the differences d_ti are mostly 0 and their variance is far smaller than that of the
candidate's own accuracy; an unpaired bound (candidate alone vs B's full score) cannot tell a
near-twin of B that is slightly worse from one slightly better, and stops few of them.

A stopped candidate's fitness estimate is fitness(B) + Σ w_t·m_t over the items it was scored on
(B's complete fitness plus the paired difference): on the same scale as complete candidates'
fitness, unlike the raw mean over those items, which inherits how easy they happen to be. It is
recorded as an estimate, the candidate marked stopped (and at which stage).

Per-item values are kept stage by stage (task -> stage 1's values by document id, then stage 2's
new ones by document id, ...), so the values on stages 1..j are a prefix of the list: a candidate
scored on fewer stages is paired with that prefix of B's list. With one stage this is the list
of first-stage values by document id that studies stored before there were several stages.
"""

from __future__ import annotations

import math
import random
from typing import Mapping, Optional, Sequence


def split_stages(items: Sequence[int], fractions: Sequence[float], seed: str) -> list[list[int]]:
    """The items in len(fractions) + 1 stages, each sorted: stage j holds the documents from
    fractions[j-1] to fractions[j] of the way along one seeded order (stage 1 at least one item,
    the last stage the rest), so stages 1..j are a prefix of that order, the same for every
    candidate. A stage is empty when rounding gives it no item (a task with few items)."""
    order = list(items)
    random.Random(seed).shuffle(order)
    cuts = [min(max(1, round(f * len(order))), len(order)) for f in fractions] + [len(order)]
    stages, start = [], 0
    for cut in cuts:
        cut = max(cut, start)
        stages.append(sorted(order[start:cut]))
        start = cut
    return stages


def _differences(task: str, candidate: Sequence[float], best: Sequence[float]) -> list[float]:
    """d_ti: the candidate's values minus the best's on the same items (the prefix of the best's
    list as long as the candidate's: see the module docstring)."""
    if len(best) < len(candidate) or not candidate:
        raise ValueError(f"racing: task {task}: {len(candidate)} scored values against the best's {len(best)}")
    return [x - y for x, y in zip(candidate, best)]


def paired_difference(candidate: Mapping[str, Sequence[float]], best: Mapping[str, Sequence[float]],
                      sizes: Mapping[str, int], weights: Mapping[str, float]) -> tuple[float, float]:
    """(Σ w_t·m_t, Σ w_t^2·s_t^2·(1 - n_t/N_t)/n_t): the estimated fitness difference candidate
    minus best, and its variance (see the module docstring). `candidate`: task -> its values on
    the items scored so far, in stage order; `best`: task -> the best's, on at least those items;
    `sizes`: task -> N_t. The variance is inf when a task with items left has a single scored item."""
    mean_total, variance = 0.0, 0.0
    for task, w in weights.items():
        d, size = _differences(task, candidate[task], best[task]), sizes[task]
        n = len(d)
        m = math.fsum(d) / n
        mean_total += w * m
        if n >= size:
            continue  # every item scored: D_t is known exactly
        if n == 1:
            variance = math.inf  # one item shows no spread
            continue
        s2 = math.fsum((x - m) ** 2 for x in d) / (n - 1)
        variance += w * w * s2 * (1 - n / size) / n
    return mean_total, variance


def should_stop(candidate: Mapping[str, Sequence[float]], best: Optional[Mapping[str, Sequence[float]]],
                sizes: Mapping[str, int], weights: Mapping[str, float], z: float) -> bool:
    """Whether the candidate's fitness bound U is below the best's fitness (see the module
    docstring); never without a best to compare with."""
    if best is None:
        return False
    mean, variance = paired_difference(candidate, best, sizes, weights)
    return mean + z * math.sqrt(variance) < 0


def paired_estimate(candidate: Mapping[str, Sequence[float]], best_fitness: float,
                    best: Mapping[str, Sequence[float]], weights: Mapping[str, float]) -> float:
    """A stopped candidate's fitness estimate fitness(B) + Σ w_t·m_t, from its per-item values on
    the items it was scored on and the best's on the same items."""
    return best_fitness + sum(w * math.fsum(d) / len(d)
                              for t, w in weights.items() for d in [_differences(t, candidate[t], best[t])])
