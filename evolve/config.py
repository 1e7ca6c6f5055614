"""search.yml: mergekit-evolve's keys, unchanged, plus evomerge's optional additions.

Torch-free, so `--dry-run` and config errors answer at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from merge_engine.config import DtypeName, ModelRef, load_yaml_text, parse_with_schema
from merge_engine.errors import ConfigError
from merge_engine.methods import METHODS, searchable_methods

# what can be searched, and how, is the method registry's (merge_engine.methods.SearchSpec)
SEARCHABLE_METHODS = searchable_methods()


class _Schema(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


# keys of each genome kind that the other kind does not use (set one and the config is refused)
_PARAMETER_SPACE_ONLY = (
    "merge_method", "base_model", "tokenizer_source", "layer_granularity", "normalize", "allow_negative_weights",
    "smooth", "filters", "model_switch",
)
_LAYER_PATH_ONLY = ("num_layers", "max_repeats", "scale", "scale_range", "scale_filters")


class GenomeDefinition(_Schema):
    models: list[ModelRef] = Field(min_length=1)
    # evomerge: `parameter_space` (mergekit-evolve's genome) or `layer_path` (a frankenmerge search)
    kind: Literal["parameter_space", "layer_path"] = "parameter_space"
    # one method, or (evomerge) a list of methods: a gene picks one per candidate
    merge_method: Optional[Union[str, list[str]]] = None
    base_model: Optional[ModelRef] = None
    tokenizer_source: Optional[str] = None
    layer_granularity: int = Field(default=0, ge=0)
    normalize: Optional[bool] = None
    allow_negative_weights: bool = False
    smooth: bool = False
    filters: Optional[list[str]] = None
    # evomerge: the merge's math dtype (mergekit-evolve hard-wires bfloat16)
    dtype: DtypeName = "bfloat16"
    # evomerge: one on/off gene per model; off = the model's weight is exactly 0
    model_switch: bool = False
    # evomerge, kind layer_path
    num_layers: Optional[int] = Field(default=None, ge=1)  # None: the first model's layer count
    max_repeats: int = Field(default=2, ge=1)  # how often one input layer may appear in the output
    scale: bool = False  # a scale gene per output position
    scale_range: tuple[float, float] = (0.5, 1.5)
    scale_filters: list[str] = Field(default=["o_proj", "down_proj"], min_length=1)

    @field_validator("merge_method")
    @classmethod
    def _method(cls, value):
        if value is None:
            return value
        methods = [value] if isinstance(value, str) else value
        if not methods:
            raise ValueError("the list of methods is empty")
        for i, m in enumerate(methods):
            where = "" if isinstance(value, str) else f"[{i}]"
            if m not in SEARCHABLE_METHODS:
                raise ValueError(
                    f"merge_method{where} {m!r} cannot be searched (use one of {', '.join(SEARCHABLE_METHODS)})"
                )
            if m in methods[:i]:
                raise ValueError(f"merge_method{where}: {m} is listed twice")
        return value

    @property
    def methods(self) -> tuple[str, ...]:
        """The searchable methods: one, or the list a method gene chooses from."""
        if self.merge_method is None:
            return ()
        return (self.merge_method,) if isinstance(self.merge_method, str) else tuple(self.merge_method)

    @model_validator(mode="after")
    def _consistent(self) -> "GenomeDefinition":
        if self.kind == "layer_path":
            return self._layer_path_consistent()
        stray = [k for k in _LAYER_PATH_ONLY if k in self.model_fields_set]
        if stray:
            raise ValueError(f"{stray[0]} is a key of kind layer_path, not of kind parameter_space")
        if self.merge_method is None:
            raise ValueError("merge_method is required (or set kind: layer_path)")
        single = isinstance(self.merge_method, str)
        for i, method in enumerate(self.methods):
            where = "merge_method" if single else f"merge_method[{i}]"
            problem = self._method_problem(method, single)
            if problem:
                raise ValueError(f"{where}: {problem}")
        if self.model_switch and not any(METHODS[m].search.weighted for m in self.methods):
            raise ValueError(f"model_switch: {', '.join(self.methods)} has no per-model weight to switch off")
        return self

    def _method_problem(self, method: str, single: bool) -> Optional[str]:
        if METHODS[method].search.needs_base and self.base_model is None:
            return f"{method} needs base_model"
        # in a list of methods, linear simply does not use a base model that is not in models
        if single and method == "linear" and self.base_model is not None and self.base_model not in self.models:
            return "linear does not use a base model: list base_model under models (so it gets a weight) or drop it"
        if self.smooth and method in ("slerp", "model_stock"):
            return f"smooth is not supported with {method}"
        if method == "model_stock" and len([m for m in self.models if m != self.base_model]) < 2:
            return "model_stock needs at least two models besides base_model"
        if method == "slerp" and len(self.models) + (self.base_model is not None and self.base_model not in self.models) < 2:
            return "slerp needs at least two models"
        return None

    def _layer_path_consistent(self) -> "GenomeDefinition":
        stray = [k for k in _PARAMETER_SPACE_ONLY if k in self.model_fields_set]
        if stray:
            raise ValueError(f"{stray[0]} is not used by kind layer_path (it decodes to a passthrough recipe)")
        low, high = self.scale_range
        if not 0 <= low < high or not low <= 1 <= high:
            raise ValueError(f"scale_range: [{low}, {high}] must satisfy 0 <= low < high and contain 1")
        if len(set(self.models)) != len(self.models):
            raise ValueError("models: a model is listed twice")
        return self

    @property
    def effective_normalize(self) -> bool:
        """For a single method (a list is decoded through one definition per method)."""
        if self.normalize is not None:
            return self.normalize
        return METHODS[self.merge_method].search.normalize

    def for_method(self, method: str) -> "GenomeDefinition":
        """This definition with one method of a list, as the per-method genome sees it (no switch
        genes of its own; linear drops a base model it would not use)."""
        update = {"merge_method": method, "model_switch": False}
        if method == "linear" and self.base_model is not None and self.base_model not in self.models:
            update["base_model"] = None
        return self.model_copy(update=update)


class TaskDefinition(_Schema):
    name: str
    weight: float = 1.0
    metric: str = "acc,none"
    # evomerge: minimise a lower-is-better metric without negating its weight
    direction: Optional[Literal["maximize", "minimize"]] = None
    # evomerge: search this task as an objective of its own (Pareto search)
    objective: bool = False


class ConstraintDefinition(_Schema):
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


class RescoreDefinition(_Schema):
    """After the search, the top_k candidates (by search fitness, distinct recipes) are scored on
    held-out tasks; the exported model is the best of them on those."""

    tasks: list[TaskDefinition] = Field(min_length=1)
    top_k: int = Field(default=5, ge=1)

    @field_validator("tasks", mode="before")
    @classmethod
    def _bare_task_names(cls, value):
        return _task_entries(value)


class RacingDefinition(_Schema):
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


class OptimizerDefinition(_Schema):
    # None: chosen from the budget and the genome (evolve.search.resolve_optimizer)
    name: Optional[Literal["cma", "optuna-cmaes", "tpe", "nsga2", "random"]] = None
    popsize: Optional[int] = Field(default=None, ge=2)
    sigma0: Optional[float] = Field(default=None, gt=0)  # None: 1/6 of each gene's range (wider when chosen)
    seed: int = 0
    # evomerge, cma only: true = classic CMA-ES, workers wait for each generation's last result
    generation_barrier: bool = False


class BudgetDefinition(_Schema):
    max_fevals: int = Field(default=100, ge=1)
    timeout: Optional[float] = Field(default=None, gt=0)  # seconds


class SearchConfig(_Schema):
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
