"""Pareto dominance over per-task scores, torch- and Optuna-free.

A point is a tuple of task scores; `directions[i]` says whether task i is maximised or minimised.
Point a dominates b when a is at least as good on every task and better on one. The front is the
set of points nothing dominates. Infeasible points (constraint violated) never enter the front
while a feasible one exists: the caller passes only the feasible ones.
"""

from __future__ import annotations

from typing import Sequence


def _oriented(point: Sequence[float], directions: Sequence[str]) -> tuple[float, ...]:
    """The point with every task turned into 'higher is better'."""
    return tuple(v if d == "maximize" else -v for v, d in zip(point, directions))


def dominates(a: Sequence[float], b: Sequence[float], directions: Sequence[str]) -> bool:
    oa, ob = _oriented(a, directions), _oriented(b, directions)
    return all(x >= y for x, y in zip(oa, ob)) and any(x > y for x, y in zip(oa, ob))


def pareto_front(points: Sequence[Sequence[float]], directions: Sequence[str]) -> list[int]:
    """Indices of the non-dominated points, in input order. Equal points are all kept (neither
    dominates the other); callers that want distinct recipes deduplicate before."""
    oriented = [_oriented(p, directions) for p in points]
    front = []
    for i, a in enumerate(oriented):
        if not any(
            all(x >= y for x, y in zip(b, a)) and any(x > y for x, y in zip(b, a))
            for j, b in enumerate(oriented) if j != i
        ):
            front.append(i)
    return front
