"""The merge recipe: mergekit's YAML schema, validation with key paths, and parameter resolution.

Nothing here imports torch: a config error must reach the user in well under a second.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional, Union

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import ConfigError

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------
# dtypes

_DTYPE_NAMES = {
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "int64": "int64",
}


def normalize_dtype_name(value: Any) -> Optional[str]:
    """Canonical dtype name, or None for "no cast". Accepts `torch.` prefixes and bf16/fp16/fp32."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError(f"dtype must be a string such as bfloat16, got {value!r}")
    name = value.strip()
    if name.startswith("torch."):
        name = name[len("torch.") :]
    try:
        return _DTYPE_NAMES[name]
    except KeyError:
        raise ValueError(
            f"unknown dtype {value!r} (use bfloat16, float16, float32 or int64)"
        ) from None


DtypeName = Annotated[Optional[str], BeforeValidator(normalize_dtype_name)]

# ----------------------------------------------------------------------------------------------
# Model references: PATH[@REVISION][+LORA[@REVISION]] or the dict form


@dataclass(frozen=True)
class ModelPath:
    path: str
    revision: Optional[str] = None

    @classmethod
    def parse(cls, text: str) -> "ModelPath":
        parts = text.split("@")
        if len(parts) > 2:
            raise ValueError(f"invalid model path {text!r}: more than one '@'")
        if not parts[0]:
            raise ValueError(f"invalid model path {text!r}: empty path")
        return cls(parts[0], parts[1] if len(parts) == 2 and parts[1] else None)

    def __str__(self) -> str:
        return self.path if self.revision is None else f"{self.path}@{self.revision}"


@dataclass(frozen=True)
class ModelReference:
    model: ModelPath
    lora: Optional[ModelPath] = None
    override_architecture: Optional[str] = None

    @classmethod
    def parse(cls, value: Any) -> "ModelReference":
        if isinstance(value, ModelReference):
            return value
        if isinstance(value, str):
            chunks = value.split("+")
            if len(chunks) > 2:
                raise ValueError(f"can't parse model reference {value!r}: more than one '+'")
            lora = ModelPath.parse(chunks[1]) if len(chunks) == 2 else None
            return cls(ModelPath.parse(chunks[0]), lora)
        if isinstance(value, dict):
            unknown = set(value) - {"model", "lora", "override_architecture"}
            if unknown:
                raise ValueError(f"unknown keys in model reference: {sorted(unknown)}")
            if "model" not in value:
                raise ValueError("model reference needs a 'model' key")
            return cls(
                _parse_model_path(value["model"]),
                _parse_model_path(value["lora"]) if value.get("lora") else None,
                value.get("override_architecture"),
            )
        raise ValueError(f"a model reference must be a string or a mapping, got {value!r}")

    def __str__(self) -> str:
        return str(self.model) if self.lora is None else f"{self.model}+{self.lora}"

    def to_plain(self) -> Any:
        if self.override_architecture is None:
            return str(self)
        out: dict[str, Any] = {
            "model": {"path": self.model.path, "revision": self.model.revision},
            "override_architecture": self.override_architecture,
        }
        if self.lora is not None:
            out["lora"] = {"path": self.lora.path, "revision": self.lora.revision}
        return out


def _parse_model_path(value: Any) -> ModelPath:
    if isinstance(value, str):
        return ModelPath.parse(value)
    if isinstance(value, dict) and "path" in value:
        return ModelPath(str(value["path"]), value.get("revision"))
    raise ValueError(f"invalid model path {value!r}")


ModelRef = Annotated[
    ModelReference,
    BeforeValidator(ModelReference.parse),
    PlainSerializer(lambda ref: ref.to_plain()),
]

# ----------------------------------------------------------------------------------------------
# Parameter settings: scalar, gradient, or conditional list


@dataclass(frozen=True)
class Conditional:
    value: Union[float, tuple[float, ...]]
    filter: Optional[str] = None


Setting = Union[float, tuple[float, ...], tuple[Conditional, ...]]


def _to_float(value: Any) -> float:
    # mergekit's pydantic coercion: bools become 1.0/0.0, ints and numeric strings become floats.
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise ValueError(f"expected a number, got {value!r}")


def _parse_scalar_or_gradient(value: Any) -> Union[float, tuple[float, ...]]:
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError("a gradient needs at least one value")
        return tuple(_to_float(v) for v in value)
    return _to_float(value)


def _parse_conditional(item: dict) -> Conditional:
    unknown = set(item) - {"value", "filter"}
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)} in a conditional (expected value, filter)")
    if "value" not in item:
        raise ValueError("a conditional needs a 'value'")
    flt = item.get("filter")
    if flt is not None and not isinstance(flt, str):
        raise ValueError(f"filter must be a string, got {flt!r}")
    return Conditional(_parse_scalar_or_gradient(item["value"]), flt)


def parse_setting(value: Any) -> Setting:
    if isinstance(value, tuple) and value and all(isinstance(v, Conditional) for v in value):
        return value  # already parsed (a parsed setting fed to a schema model again)
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(v, dict) for v in value):
            return tuple(_parse_conditional(v) for v in value)
        if any(isinstance(v, dict) for v in value):
            raise ValueError("a list must hold either only numbers or only {value, filter} entries")
        return _parse_scalar_or_gradient(value)
    if isinstance(value, dict):
        # mergekit parses a bare conditional and then fails at merge time; we accept it as a
        # one-entry list (documented in docs/compatibility.md).
        return (_parse_conditional(value),)
    return _to_float(value)


def setting_to_plain(setting: Setting) -> Any:
    if isinstance(setting, tuple):
        if setting and isinstance(setting[0], Conditional):
            return [
                {"filter": c.filter, "value": list(c.value) if isinstance(c.value, tuple) else c.value}
                for c in setting
            ]
        return list(setting)
    return setting


ParameterValue = Annotated[Any, BeforeValidator(parse_setting), PlainSerializer(setting_to_plain)]
Parameters = Optional[dict[str, ParameterValue]]


def _interpolate(gradient: tuple[float, ...], t: float) -> float:
    if len(gradient) == 1:
        return gradient[0]
    pos = t * (len(gradient) - 1)
    i0 = int(pos)
    i1 = min(len(gradient) - 1, i0 + 1)
    frac = pos - i0
    return (1 - frac) * gradient[i0] + frac * gradient[i1]


def evaluate_setting(setting: Setting, tensor_name: str, t: float) -> Optional[float]:
    """Value of a setting for one tensor at layer fraction t; None when no conditional matches."""
    if isinstance(setting, float):
        return setting
    if setting and isinstance(setting[0], Conditional):
        for cond in setting:
            if cond.filter is None or cond.filter == "*" or cond.filter in tensor_name:
                value = cond.value
                return value if isinstance(value, float) else _interpolate(value, t)
        return None
    return _interpolate(setting, t)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# The schema


class Schema(BaseModel):
    # Unknown keys are kept (then reported as warnings with their path), never fatal: community
    # configs carry stale keys such as `embed_slerp` and must still run.
    model_config = ConfigDict(extra="allow", frozen=True)


class InputModelDefinition(Schema):
    model: ModelRef
    parameters: Parameters = None


class InputSliceDefinition(Schema):
    model: ModelRef
    layer_range: tuple[int, int]
    parameters: Parameters = None

    @field_validator("layer_range")
    @classmethod
    def _check_range(cls, value: tuple[int, int]) -> tuple[int, int]:
        start, end = value
        if start < 0 or end <= start:
            raise ValueError(f"layer_range must be [start, end) with 0 <= start < end, got {list(value)}")
        return value


class OutputSliceDefinition(Schema):
    sources: list[InputSliceDefinition] = Field(min_length=1)
    base_model: Optional[ModelRef] = None
    residual_weight: Optional[float] = None
    parameters: Parameters = None


def _known_method(value: Optional[str]) -> Optional[str]:
    from .methods import METHODS  # torch-free registry

    if value is not None and value not in METHODS:
        raise ValueError(f"unknown merge method {value!r} (available: {', '.join(sorted(METHODS))})")
    return value


class OutputModuleDefinition(Schema):
    slices: Optional[list[OutputSliceDefinition]] = None
    models: Optional[list[InputModelDefinition]] = None
    parameters: Parameters = None
    # evomerge extension: a module's own method (a VLM's vision tower with ties, its projector
    # copied with passthrough); None = the recipe's merge_method
    merge_method: Optional[str] = None

    _method_name = field_validator("merge_method")(classmethod(lambda cls, v: _known_method(v)))

    @model_validator(mode="after")
    def _one_of(self) -> "OutputModuleDefinition":
        if bool(self.slices) == bool(self.models):
            raise ValueError("a module needs exactly one of 'slices' or 'models'")
        return self


class TokenEmbeddingSource(Schema):
    kind: str
    model: Optional[ModelRef] = None
    token_id: Optional[int] = None
    token: Optional[str] = None


class TokenEmbeddingConfig(Schema):
    source: Union[ModelRef, TokenEmbeddingSource, None] = None
    force: bool = False


class TokenizerConfig(Schema):
    source: Union[str, ModelRef] = "union"
    tokens: Optional[dict[str, TokenEmbeddingConfig]] = None
    pad_to_multiple_of: Optional[int] = Field(default=None, gt=0)


class MergeConfig(Schema):
    merge_method: str
    models: Optional[list[InputModelDefinition]] = None
    slices: Optional[list[OutputSliceDefinition]] = None
    modules: Optional[dict[str, OutputModuleDefinition]] = None
    base_model: Optional[ModelRef] = None
    parameters: Parameters = None
    dtype: DtypeName = None
    out_dtype: DtypeName = None
    tokenizer_source: Optional[str] = None
    tokenizer: Optional[TokenizerConfig] = None
    chat_template: Optional[str] = None

    @field_validator("merge_method")
    @classmethod
    def _method_name(cls, value: str) -> str:
        return _known_method(value)

    @model_validator(mode="after")
    def _check_shape(self) -> "MergeConfig":
        given = [k for k in ("models", "slices", "modules") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(
                "exactly one of 'models', 'slices' or 'modules' must be given"
                + (f" (got {', '.join(given)})" if given else "")
            )
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise ValueError("give either 'tokenizer_source' or 'tokenizer', not both")
        return self

    # -- convenience ------------------------------------------------------------------------

    def referenced_models(self) -> list[ModelReference]:
        """Every model the recipe reads, in first-mention order (the base first if given)."""
        seen: dict[ModelReference, None] = {}
        if self.base_model is not None:
            seen[self.base_model] = None
        for module in self._module_defs():
            for slc in module.slices or []:
                if slc.base_model is not None:
                    seen[slc.base_model] = None
                for src in slc.sources:
                    seen[src.model] = None
            for m in module.models or []:
                seen[m.model] = None
        return list(seen)

    def _module_defs(self) -> list[OutputModuleDefinition]:
        if self.modules:
            return list(self.modules.values())
        return [OutputModuleDefinition(slices=self.slices, models=self.models)]

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json", exclude_none=True)
        return yaml.dump(data, Dumper=_FlowListDumper, sort_keys=False)

    def to_plain(self) -> dict:
        return self.model_dump(mode="json", exclude_none=True)


class _FlowListDumper(yaml.SafeDumper):
    """Lists of plain numbers in flow style ([0, 0.5, 1]), as mergekit writes them."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = bool(data) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_FlowListDumper.add_representer(list, _represent_list)

# ----------------------------------------------------------------------------------------------
# Loading, error formatting, unknown-key warnings


def format_loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "<top level>"


def _clean_loc(loc: tuple) -> tuple:
    # pydantic adds union-member and validator tags to locations; keep only the user's keys.
    return tuple(
        p
        for p in loc
        if isinstance(p, int)
        or not (
            p.startswith("function-")
            or p in ("ModelReference", "TokenEmbeddingSource", "str", "tuple[int, int]")
            or "[" in p
        )
    )


def validation_message(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    msg = first["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    loc = format_loc(_clean_loc(tuple(first["loc"])))
    if first["type"] == "missing":
        return f"{source}: missing required key '{loc}'"
    extra = f" (and {len(err.errors()) - 1} more problem(s))" if len(err.errors()) > 1 else ""
    return f"{source}: {loc}: {msg}{extra}"


def iter_unknown_keys(obj: Any, path: tuple = ()) -> Iterator[str]:
    """Paths of keys the schema does not know, e.g. `parameters.embed_slerp` is *not* reported
    (parameters are open by design) but `models[0].weight` is."""
    if isinstance(obj, BaseModel):
        for key in obj.model_extra or {}:
            yield format_loc(path + (key,))
        for name in type(obj).model_fields:
            yield from iter_unknown_keys(getattr(obj, name), path + (name,))
    elif isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            yield from iter_unknown_keys(item, path + (i,))
    elif isinstance(obj, dict):
        for key, item in obj.items():
            yield from iter_unknown_keys(item, path + (key,))


def parse_with_schema(schema: type, data: Any, source: str, what: str):
    """Validate a YAML document against a pydantic schema: a ConfigError naming `source` and the
    key for bad input, a warning for each unknown key (stale keys of old configs still run)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {what} must be a YAML mapping, got {type(data).__name__}")
    try:
        config = schema.model_validate(data)
    except ValidationError as err:
        raise ConfigError(validation_message(err, source)) from None
    for key_path in iter_unknown_keys(config):
        log.warning("%s: unknown key '%s' is ignored", source, key_path)
    return config


def parse_config(data: Any, source: str = "config") -> MergeConfig:
    return parse_with_schema(MergeConfig, data, source, "the recipe")


def load_yaml_text(text: str, source: str, stream: bool = False) -> Any:
    """The YAML document in `text`, or with `stream` the list of all its `---`-separated documents."""
    try:
        return list(yaml.safe_load_all(text)) if stream else yaml.safe_load(text)
    except yaml.YAMLError as err:
        where = ""
        mark = getattr(err, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{source}: malformed YAML{where}: {problem}") from None


def read_config_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read config file: {err}") from None


def load_config(path: Union[str, Path]) -> tuple[MergeConfig, str]:
    """Read and validate a recipe file; returns the config and the original text."""
    path = Path(path)
    text = read_config_text(path)
    return parse_config(load_yaml_text(text, str(path)), str(path)), text


# ----------------------------------------------------------------------------------------------
# Parameter lookup with mergekit's precedence (docs/mergekit-reference.md §1)


@dataclass(frozen=True)
class ParameterScope:
    """Where a tensor is planned: its output slice (if any), module and top-level parameters."""

    slice_def: Optional[OutputSliceDefinition]
    module_parameters: Optional[dict[str, Setting]]
    top_parameters: Optional[dict[str, Setting]]
    slice_index: Optional[int] = None  # for error messages


def lookup_parameter(
    scope: ParameterScope,
    name: str,
    tensor_name: str,
    t: float,
    source: Optional["InputSliceDefinition"] = None,
) -> Optional[float]:
    """First non-none value of `name` along: the input's own source entry (per-model parameters
    only), the slice, the module, the top level. Keyed by source, not by model, so the same model
    listed twice in a slice keeps each entry's parameters."""
    levels: list[Optional[dict[str, Setting]]] = []
    if source is not None:
        levels.append(source.parameters)
    if scope.slice_def is not None:
        levels.append(scope.slice_def.parameters)
    levels.append(scope.module_parameters)
    levels.append(scope.top_parameters)
    for params in levels:
        if params and name in params:
            value = evaluate_setting(params[name], tensor_name, t)
            if value is not None:
                if math.isnan(value):
                    raise ConfigError(f"parameter '{name}' evaluates to NaN for tensor {tensor_name}")
                return value
    return None
