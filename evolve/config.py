"""search.yml: mergekit-evolve's keys, unchanged, plus evomerge's optional additions.

Torch-free, so `--dry-run` and config errors answer at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from merge_engine.config import DtypeName, ModelRef, load_yaml_text, parse_with_schema
from merge_engine.errors import ConfigError


SEARCHABLE_METHODS = (
    "linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
    "della", "della_linear", "model_stock", "slerp",
)
NEEDS_BASE = (
    "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della",
    "della_linear", "model_stock",
)


class _Schema(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class GenomeDefinition(_Schema):
    models: list[ModelRef] = Field(min_length=1)
    merge_method: str
    base_model: Optional[ModelRef] = None
    tokenizer_source: Optional[str] = None
    layer_granularity: int = Field(default=0, ge=0)
    normalize: Optional[bool] = None
    allow_negative_weights: bool = False
    smooth: bool = False
    filters: Optional[list[str]] = None
    # evomerge: the merge's math dtype (mergekit-evolve hard-wires bfloat16)
    dtype: DtypeName = "bfloat16"

    @field_validator("merge_method")
    @classmethod
    def _method(cls, value: str) -> str:
        if value not in SEARCHABLE_METHODS:
            raise ValueError(f"merge_method {value!r} cannot be searched (use one of {', '.join(SEARCHABLE_METHODS)})")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "GenomeDefinition":
        if self.merge_method in NEEDS_BASE and self.base_model is None:
            raise ValueError(f"merge_method {self.merge_method} needs base_model")
        if self.merge_method == "linear" and self.base_model is not None and self.base_model not in self.models:
            raise ValueError(
                "linear does not use a base model: list base_model under models (so it gets a weight) or drop it"
            )
        if self.smooth and self.merge_method in ("slerp", "model_stock"):
            raise ValueError(f"smooth is not supported with {self.merge_method}")
        if self.merge_method == "model_stock" and len([m for m in self.models if m != self.base_model]) < 2:
            raise ValueError("model_stock needs at least two models besides base_model")
        if self.merge_method == "slerp" and len(self.models) + (self.base_model is not None and self.base_model not in self.models) < 2:
            raise ValueError("slerp needs at least two models")
        return self

    @property
    def effective_normalize(self) -> bool:
        if self.normalize is not None:
            return self.normalize
        # mergekit's defaults: normalize is on for these (della's own default is true as well)
        return self.merge_method in ("ties", "dare_ties", "linear", "della")


class TaskDefinition(_Schema):
    name: str
    weight: float = 1.0
    metric: str = "acc,none"
    # evomerge: minimise a lower-is-better metric without negating its weight
    direction: Optional[Literal["maximize", "minimize"]] = None


class OptimizerDefinition(_Schema):
    name: Literal["cma", "optuna-cmaes", "tpe", "random"] = "cma"
    popsize: Optional[int] = Field(default=None, ge=2)
    sigma0: float = Field(default=1 / 6, gt=0)
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

    @field_validator("tasks", mode="before")
    @classmethod
    def _bare_task_names(cls, value):
        if isinstance(value, list):
            return [{"name": v} if isinstance(v, str) else v for v in value]
        return value

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
