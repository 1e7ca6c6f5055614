"""Racing (multi-fidelity evaluation): score a candidate on a seeded share of each task's items
first, and on the rest only if it could still beat the best candidate so far.

The rule, per task t with signed weight w_t (negative for lower-is-better metrics), whose metric
is a mean of per-item values in [0, 1] (accuracy-like): after n_t of N_t items with mean p_t, the
mean over the N_t - n_t unscored items is bounded by the Wilson score interval at `z` standard
deviations, [lo_t, hi_t]. The full-task score can then be at most
u_t = (n_t p_t + (N_t - n_t) hi_t) / N_t (at least l_t likewise with lo_t), and the candidate's
fitness at most Σ w_t·u_t for w_t > 0 plus Σ w_t·l_t for w_t < 0. The candidate is stopped when
that bound is below the best complete fitness so far. z = 1 stops more candidates (and
occasionally one that would have won); z = 2 or 3 almost never stops a winner but saves less.
A stopped candidate is reported with its estimate Σ w_t·p_t, honestly marked as stopped.
"""

from __future__ import annotations

import math
import random
from typing import Optional, Sequence


def split_items(items: Sequence[int], fraction: float, seed: str) -> tuple[list[int], list[int]]:
    """(first stage, second stage): a seeded `fraction` of the items (at least one), and the rest.
    The same for every candidate, so all are compared on the same first items."""
    order = list(items)
    random.Random(seed).shuffle(order)
    k = min(max(1, round(fraction * len(order))), len(order))
    return sorted(order[:k]), sorted(order[k:])


def wilson_bounds(mean: float, n: int, z: float) -> tuple[float, float]:
    """The Wilson score interval of a proportion observed as `mean` over n trials."""
    if n <= 0:
        return 0.0, 1.0
    p = min(max(mean, 0.0), 1.0)
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def fitness_bound(stage: dict[str, tuple[float, int, int]], weights: dict[str, float], z: float) -> float:
    """The highest fitness the candidate can still reach. `stage`: task -> (mean over the first
    items, first items, all items)."""
    total = 0.0
    for task, w in weights.items():
        mean, n, size = stage[task]
        lo, hi = wilson_bounds(mean, n, z)
        rest = size - n
        total += w * (n * mean + rest * (hi if w > 0 else lo)) / size
    return total


def estimate(stage: dict[str, tuple[float, int, int]], weights: dict[str, float]) -> float:
    return sum(w * stage[task][0] for task, w in weights.items())


def should_stop(stage: dict[str, tuple[float, int, int]], weights: dict[str, float], z: float,
                best: Optional[float]) -> bool:
    return best is not None and fitness_bound(stage, weights, z) < best
