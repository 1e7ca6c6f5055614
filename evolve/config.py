"""search.yml: mergekit-evolve's keys, unchanged, plus evomerge's optional additions.

Torch-free, so `--dry-run` and config errors answer at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from merge_engine.config import Schema, load_yaml_text, parse_with_schema
from merge_engine.errors import ConfigError
from search_spaces.definition import GenomeDefinition


class TaskDefinition(Schema):
    name: str
    weight: float = 1.0
    metric: str = "acc,none"
    # evomerge: minimise a lower-is-better metric without negating its weight
    direction: Optional[Literal["maximize", "minimize"]] = None
    # evomerge: search this task as an objective of its own (Pareto search)
    objective: bool = False


class ConstraintDefinition(Schema):
    """A candidate whose `task`'s `metric` lies outside [min, max] is infeasible: it keeps its
    scores but never becomes the exported model, and optimisers rank it below feasible ones."""

    task: str
    metric: Optional[str] = None  # default: the task's own metric
    min: Optional[float] = None
    max: Optional[float] = None

    @model_validator(mode="after")
    def _bounded(self) -> "ConstraintDefinition":
        if self.min is None and self.max is None:
            raise ValueError("a constraint needs min or max")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")
        return self


class RescoreDefinition(Schema):
    """After the search, the top_k candidates (by search fitness, distinct recipes) are scored on
    held-out tasks; the exported model is the best of them on those."""

    tasks: list[TaskDefinition] = Field(min_length=1)
    top_k: int = Field(default=5, ge=1)

    @field_validator("tasks", mode="before")
    @classmethod
    def _bare_task_names(cls, value):
        return _task_entries(value)


class RacingDefinition(Schema):
    """Multi-fidelity evaluation: score a seeded `fraction` of each task's items first, and the
    rest only if the candidate could still beat the best so far by the paired confidence rule
    (evaluators.racing). `fraction` may be a strictly increasing list: one stage per entry
    (nested shares of the same seeded item order), checked after each, then the rest."""

    # [0.2, 0.5]: on both benchmark experiments (CMA-ES, 5 seeds, z = 1) 35-38 % of the items at
    # held-out medians no lower than without racing, against 46-54 % for 0.2 alone and a lower
    # held-out median for [0.15, 0.4] (docs/search-quality.md, "Racing")
    fraction: Union[float, list[float]] = Field(default_factory=lambda: [0.2, 0.5])
    # z of the upper confidence bound on the fitness difference candidate minus best, estimated
    # from their per-item differences on the items scored so far
    confidence_z: float = Field(default=1.0, gt=0)

    @field_validator("fraction", mode="before")
    @classmethod
    def _stages(cls, value):
        shares = value if isinstance(value, list) else [value]
        if not shares or not all(isinstance(f, (int, float)) and not isinstance(f, bool) and 0 < f < 1 for f in shares):
            raise ValueError(f"must be a number in (0, 1) or a list of them, got {value!r}")
        if any(a >= b for a, b in zip(shares, shares[1:])):
            raise ValueError(f"the stages' shares must be strictly increasing, got {value!r}")
        return value

    @property
    def fractions(self) -> list[float]:
        """The stage boundaries: each stage's cumulative share of a task's items."""
        return list(self.fraction) if isinstance(self.fraction, list) else [self.fraction]


def _task_entries(value):
    if isinstance(value, list):
        return [{"name": v} if isinstance(v, str) else v for v in value]
    return value


class OptimizerDefinition(Schema):
    # None: chosen from the budget and the genome (evolve.build.resolve_optimizer); `[cma, gradient]`
    # is read as "cma+gradient" (evolve.gradient)
    name: Optional[Literal["cma", "optuna-cmaes", "tpe", "nsga2", "random", "gradient", "cma+gradient"]] = None
    popsize: Optional[int] = Field(default=None, ge=2)
    sigma0: Optional[float] = Field(default=None, gt=0)  # None: 1/6 of each gene's range (wider when chosen)
    seed: int = 0
    # evomerge, cma only: true = classic CMA-ES, workers wait for each generation's last result
    generation_barrier: bool = False
    # evomerge, gradient and [cma, gradient] only (docs/mergekit-evolve.md): Adam's step as a share
    # of each gene's range, steps between two scored candidates, search items per step, the loss
    # (nll: of the correct choice; entropy: of the predictions, no labels used), and in
    # [cma, gradient] the share of max_fevals the gradient stage gets, and how many descents run side
    # by side (one per worker keeps them all busy)
    learning_rate: Optional[float] = Field(default=None, gt=0, le=1)
    gradient_steps: Optional[int] = Field(default=None, ge=1)
    batch_size: Optional[int] = Field(default=None, ge=1)
    loss: Literal["nll", "entropy"] = "nll"
    gradient_share: Optional[float] = Field(default=None, gt=0, lt=1)
    chains: Optional[int] = Field(default=None, ge=1)


class BudgetDefinition(Schema):
    max_fevals: int = Field(default=100, ge=1)
    timeout: Optional[float] = Field(default=None, gt=0)  # seconds


class SearchConfig(Schema):
    genome: GenomeDefinition
    tasks: list[TaskDefinition] = Field(min_length=1)
    limit: Optional[int] = Field(default=None, ge=1)
    num_fewshot: Optional[int] = Field(default=None, ge=0)
    shuffle: bool = False
    random_init: bool = False
    apply_chat_template: bool = True
    fewshot_as_multiturn: bool = True
    # evomerge additions
    optimizer: OptimizerDefinition = OptimizerDefinition()
    budget: BudgetDefinition = BudgetDefinition()
    seed: int = 0  # evaluation seed: the `limit` subset and shuffling
    # pareto: every task is an objective of its own (or only those with `objective: true`)
    objectives: Literal["weighted", "pareto"] = "weighted"
    # which member of the Pareto front is exported: the best weighted sum, or the best on one task
    pareto_select: str = "weighted_sum"
    constraints: list[ConstraintDefinition] = []
    rescore: Optional[RescoreDefinition] = None
    racing: Optional[RacingDefinition] = None
    # the hand-made recipes scored before any optimiser proposal (search_spaces: Genome.anchors):
    # true, false (only the starting point), or a list of recipe files added to them
    anchors: Union[bool, list[str]] = True

    @field_validator("tasks", mode="before")
    @classmethod
    def _bare_task_names(cls, value):
        return _task_entries(value)

    @field_validator("racing", mode="before")
    @classmethod
    def _racing_switch(cls, value):
        return {} if value is True else None if value is False else value

    @property
    def objective_tasks(self) -> list[TaskDefinition]:
        """The tasks searched as separate objectives (empty: one weighted-sum objective)."""
        marked = [t for t in self.tasks if t.objective]
        if marked:
            return marked
        return list(self.tasks) if self.objectives == "pareto" else []

    @model_validator(mode="after")
    def _objectives(self) -> "SearchConfig":
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError("tasks: a task is listed twice")
        if len(self.objective_tasks) == 1:
            raise ValueError("tasks: a Pareto search needs two or more objective tasks")
        multi = len(self.objective_tasks) > 1
        if multi and self.optimizer.name not in (None, "nsga2", "tpe", "random"):
            raise ValueError(
                f"optimizer: {self.optimizer.name} optimises one number; a Pareto search needs nsga2, tpe or random"
            )
        if self.pareto_select != "weighted_sum" and self.pareto_select not in names:
            raise ValueError(f"pareto_select: {self.pareto_select!r} is neither weighted_sum nor a task name")
        if multi and self.racing is not None:
            raise ValueError("racing: stopping early compares one fitness number; it cannot be combined with a Pareto search")
        for i, c in enumerate(self.constraints):
            if c.task not in names:
                raise ValueError(f"constraints.{i}.task: {c.task!r} is not one of the search tasks ({', '.join(names)})")
        return self

    @field_validator("optimizer", mode="before")
    @classmethod
    def _optimizer_name(cls, value):
        if isinstance(value, list) or (isinstance(value, dict) and isinstance(value.get("name"), list)):
            names = value if isinstance(value, list) else value["name"]
            if names != ["cma", "gradient"]:
                raise ValueError(f"a list of optimizers must be [cma, gradient] (a CMA-ES stage, then gradient refinement), not {names}")
            value = {**(value if isinstance(value, dict) else {}), "name": "cma+gradient"}
        return {"name": value} if isinstance(value, str) else value


def parse_search_config(data, source: str = "search.yml") -> SearchConfig:
    return parse_with_schema(SearchConfig, data, source, "the search config")


def load_search_config(path: Union[str, Path]) -> tuple[SearchConfig, str]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: search config not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read search config: {err}") from None
    return parse_search_config(load_yaml_text(text, str(path)), str(path)), text
