"""Racing (multi-fidelity evaluation): score a candidate on a seeded share of each task's items
first, and on the rest only if it could still beat the best candidate so far.

The rule is paired: every candidate's first stage is the same seeded items (`split_items`), and
the best complete candidate B's per-item values on those items are known (the driver keeps them
with B's trial). For each task t with signed weight w_t (negative for lower-is-better metrics),
N_t items in all and n_t first items, let d_ti = c_ti - b_ti be candidate c's value minus B's on
first item i, with mean m_t and sample variance s_t^2 (n_t - 1 in the denominator). Fitness is
Σ w_t·(task mean), so

    fitness(c) - fitness(B) = Σ_t w_t·D_t,   D_t = the mean of d_ti over all N_t items,

and m_t is the mean of a simple random sample (without replacement) of n_t of those N_t
differences. Its standard error is s_t·sqrt((1 - n_t/N_t) / n_t) (finite-population
correction: no error when every item is in the first stage). Tasks are sampled independently,
so the candidate's fitness is bounded at z standard errors by

    U = fitness(B) + Σ_t w_t·m_t + z·sqrt(Σ_t w_t^2·s_t^2·(1 - n_t/N_t) / n_t),

and the candidate stops when U < fitness(B), i.e. when Σ w_t·m_t + z·sqrt(...) < 0. A task
with a single first item (and more items left) has no variance estimate: nothing is stopped.

Why paired: candidates close in parameter space (a converging CMA-ES) answer most items alike,
so the differences d_ti are mostly 0 and their variance is far smaller than that of the
candidate's own accuracy; an unpaired bound (candidate alone vs B's full score) cannot tell a
near-twin of B that is slightly worse from one slightly better, and stops few of them.

A stopped candidate's fitness estimate is fitness(B) + Σ w_t·m_t (B's complete fitness plus
the paired difference): on the same scale as complete candidates' fitness, unlike the raw mean
over the first items, which inherits how easy those items happen to be. It is recorded as an
estimate, the candidate marked stopped.
"""

from __future__ import annotations

import math
import random
from typing import Mapping, Optional, Sequence


def split_items(items: Sequence[int], fraction: float, seed: str) -> tuple[list[int], list[int]]:
    """(first stage, second stage): a seeded `fraction` of the items (at least one), and the rest.
    The same for every candidate, so all are compared on the same first items."""
    order = list(items)
    random.Random(seed).shuffle(order)
    k = min(max(1, round(fraction * len(order))), len(order))
    return sorted(order[:k]), sorted(order[k:])


def paired_difference(candidate: Mapping[str, Sequence[float]], best: Mapping[str, Sequence[float]],
                      sizes: Mapping[str, int], weights: Mapping[str, float]) -> tuple[float, float]:
    """(Σ w_t·m_t, Σ w_t^2·s_t^2·(1 - n_t/N_t)/n_t): the estimated fitness difference candidate
    minus best, and its variance (see the module docstring). `candidate`, `best`: task -> values on
    the first items, in the same item order; `sizes`: task -> N_t. The variance is inf when a task
    with items left has a single first item."""
    mean_total, variance = 0.0, 0.0
    for task, w in weights.items():
        c, b, size = candidate[task], best[task], sizes[task]
        if len(c) != len(b) or not c:
            raise ValueError(f"racing: task {task}: {len(c)} first-stage values against the best's {len(b)}")
        n = len(c)
        d = [x - y for x, y in zip(c, b)]
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


def paired_estimate(first_means: Mapping[str, float], best_fitness: float,
                    best: Mapping[str, Sequence[float]], weights: Mapping[str, float]) -> float:
    """A stopped candidate's fitness estimate fitness(B) + Σ w_t·m_t, from its means over the
    first items (m_t = its first-stage mean minus the best's)."""
    return best_fitness + sum(w * (first_means[t] - math.fsum(best[t]) / len(best[t])) for t, w in weights.items())
