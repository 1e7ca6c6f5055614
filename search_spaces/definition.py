"""The genome section of search.yml (`genome:`): which genome a search builds and its options.

The schema lives beside the genomes it describes (search_spaces.genome, search_spaces.layer_path);
evolve.config embeds it in the search config, and parse_with_schema (merge_engine.config) stays
the one parser. Which methods can be searched, and their genes' bounds, are the method
registry's (merge_engine.methods.SearchSpec).
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from merge_engine.config import DtypeName, ModelRef, Schema
from merge_engine.methods import METHODS, searchable_methods

# what can be searched, and how, is the method registry's (merge_engine.methods.SearchSpec)
SEARCHABLE_METHODS = searchable_methods()


# keys of each genome kind that the other kind does not use (set one and the config is refused)
_PARAMETER_SPACE_ONLY = (
    "merge_method", "base_model", "tokenizer_source", "layer_granularity", "normalize", "allow_negative_weights",
    "smooth", "filters", "model_switch",
)
_LAYER_PATH_ONLY = ("num_layers", "max_repeats", "scale", "scale_range", "scale_filters")


class GenomeDefinition(Schema):
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
