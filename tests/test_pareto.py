import itertools
import random

from evolve.pareto import dominates, pareto_front


def brute_front(points, signs):
    """Independent check: a point is on the front iff no other point is >= everywhere and > somewhere."""
    out = []
    for i, p in enumerate(points):
        beaten = False
        for j, q in enumerate(points):
            if i == j:
                continue
            ge = [s * qv >= s * pv for qv, pv, s in zip(q, p, signs)]
            gt = [s * qv > s * pv for qv, pv, s in zip(q, p, signs)]
            if all(ge) and any(gt):
                beaten = True
        if not beaten:
            out.append(i)
    return out


def test_two_tasks_known_front():
    points = [(0.9, 0.1), (0.5, 0.5), (0.4, 0.4), (0.1, 0.9), (0.5, 0.5), (0.2, 0.95)]
    assert pareto_front(points, ["maximize", "maximize"]) == [0, 1, 4, 5]  # (0.1, 0.9) is beaten by (0.2, 0.95)
    # minimising the second task: (0.9, 0.1) dominates everything with x <= 0.9 and y >= 0.1
    assert pareto_front(points, ["maximize", "minimize"]) == [0]
    assert dominates((0.5, 0.5), (0.4, 0.4), ["maximize", "maximize"])
    assert not dominates((0.5, 0.5), (0.5, 0.5), ["maximize", "maximize"])


def test_random_points_match_brute_force():
    rng = random.Random(3)
    for directions in itertools.product(["maximize", "minimize"], repeat=3):
        signs = [1 if d == "maximize" else -1 for d in directions]
        points = [tuple(rng.choice([0.0, 0.25, 0.5, 0.75, 1.0]) for _ in range(3)) for _ in range(40)]
        assert pareto_front(points, directions) == brute_front(points, signs)
