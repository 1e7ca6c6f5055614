"""What a search ranks candidates by, from their metrics: one place for every rule.

- fitness: mergekit-evolve's Σ weight·metric, lower-is-better metrics counted negatively, so that
  one maximised number ranks candidates (what single-objective optimisers, racing and re-scoring
  use);
- objectives: in a Pareto search, one maximised value per objective task (minimised ones negated);
- violation: how far a candidate lies outside the constraints (0: feasible). An infeasible
  candidate keeps its scores but is never exported, and optimisers rank it below feasible ones;
- the Pareto front of the finished candidates (which one is exported: evolve.selection).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from .pareto import pareto_front


def constraint_key(task_name: str, metric: Optional[str], task_metric: str) -> str:
    """The metrics key a constraint reads: the task's own score, or `task:metric` for another
    metric of the same task (the evaluator reports those under that key)."""
    return task_name if metric in (None, task_metric) else f"{task_name}:{metric}"


def extra_metrics(tasks: Sequence, constraints: Sequence) -> dict[str, list[str]]:
    """{task: [metric, ...]}: the metrics constraints read besides each task's own, which the
    evaluator must report (under `constraint_key`'s `task:metric`)."""
    own = {t.name: t.metric for t in tasks}
    out: dict[str, list[str]] = {}
    for c in constraints:
        if constraint_key(c.task, c.metric, own[c.task]) != c.task:
            out.setdefault(c.task, []).append(c.metric)
    return out


@dataclass(frozen=True)
class Scored:
    fitness: float
    objectives: tuple[float, ...]
    violation: float


class Scoring:
    def __init__(self, tasks: Sequence, directions: dict[str, str], objective_names: Sequence[str] = (),
                 constraints: Sequence = (), select: str = "weighted_sum"):
        """`tasks`: evolve.config.TaskDefinition's; `directions`: the evaluator's, per task;
        `constraints`: ConstraintDefinition's."""
        self.tasks = list(tasks)
        self.directions = {t.name: directions.get(t.name) or t.direction or "maximize" for t in self.tasks}
        self.signed_weights = {t.name: self.sign(t.name) * t.weight for t in self.tasks}
        self.objective_names = list(objective_names)
        by_name = {t.name: t for t in self.tasks}
        self.constraints = [
            (constraint_key(c.task, c.metric, by_name[c.task].metric), c.min, c.max) for c in constraints
        ]
        self.select = select

    @classmethod
    def for_search(cls, config, directions: dict[str, str]) -> "Scoring":
        """The search's scoring (`config`: an evolve.config.SearchConfig)."""
        return cls(config.tasks, directions, [t.name for t in config.objective_tasks], config.constraints,
                   config.pareto_select)

    def sign(self, task: str) -> float:
        return 1.0 if self.directions.get(task, "maximize") == "maximize" else -1.0

    def fitness(self, metrics: dict) -> float:
        return sum(w * metrics[name] for name, w in self.signed_weights.items())

    def score(self, metrics: dict) -> Scored:
        """Raises KeyError naming a metric the evaluator did not report."""
        objectives = tuple(self.sign(n) * metrics[n] for n in self.objective_names)
        violation = 0.0
        for key, low, high in self.constraints:
            value = metrics[key]
            if low is not None and value < low:
                violation += low - value
            if high is not None and value > high:
                violation += value - high
        return Scored(self.fitness(metrics), objectives, violation)

    # -- which candidate is exported ------------------------------------------------------------

    def front(self, rows: Sequence) -> list:
        """The Pareto front of feasible rows (evolve.selection.CandidateRow) over the objective
        tasks (or every task in a weighted search)."""
        names = self.objective_names or [t.name for t in self.tasks]
        feasible = [r for r in rows if r.feasible]
        points = [tuple(r.metrics[n] for n in names) for r in feasible]
        return [feasible[i] for i in pareto_front(points, [self.directions[n] for n in names])]
