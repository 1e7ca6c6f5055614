"""The `mergekit-moe` recipe (docs/mergekit-reference.md §6), its validation and the output architecture choice
(6.3). Torch-free, so config errors answer fast."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import field_validator

from ..config import DtypeName, ModelRef, ModelReference, Schema, load_yaml_text, parse_with_schema, read_config_text
from ..errors import ConfigError

log = logging.getLogger(__name__)

GateMode = Literal["hidden", "cheap_embed", "random", "uniform_random", "hidden_avg", "hidden_last"]
RANDOM_GATES = ("random", "uniform_random")

# Output architectures in mergekit's order of preference; `deepseek` is recognised only to refuse it.
ARCHITECTURES = ("mixtral", "deepseek", "qwen2_moe", "qwen3_moe")
ARCH_CLASSES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
# the prefix a user writes in `architecture:` for each candidate (case-insensitive prefix match)
_ARCH_NAMES = {"mixtral": "mixtral", "deepseek": "deepseek", "qwen2_moe": "qwen", "qwen3_moe": "qwen3"}
_ALIASES = {"qwen2_moe": ("qwen2", "qwen_moe", "qwen2moe"), "qwen3_moe": ("qwen3moe",), "deepseek": ("deepseek_moe",)}


class Expert(Schema):
    source_model: ModelRef
    positive_prompts: Optional[list[str]] = None
    negative_prompts: Optional[list[str]] = None
    noise_scale: Optional[float] = None
    residual_scale: Optional[float] = None

    def prompts_key(self) -> tuple:
        return (tuple(self.positive_prompts or ()), tuple(self.negative_prompts or ()))


class MoEConfig(Schema):
    base_model: ModelRef
    experts: list[Expert]
    gate_mode: GateMode = "hidden"
    dtype: DtypeName = None
    experts_per_token: int = 2
    shared_experts: Optional[list[Expert]] = None
    architecture: Optional[str] = None

    @field_validator("experts_per_token", mode="before")
    @classmethod
    def _null_means_default(cls, value):
        return 2 if value is None else value  # mergekit reads `experts_per_token: null` as its default, 2

    @field_validator("experts")
    @classmethod
    def _some_experts(cls, value: list[Expert]) -> list[Expert]:
        if not value:
            raise ValueError("at least one expert is needed")
        return value

    def referenced_models(self) -> list[ModelReference]:
        refs = [self.base_model] + [e.source_model for e in self.experts + (self.shared_experts or [])]
        return list(dict.fromkeys(refs))


def parse_moe_config(data, source: str) -> MoEConfig:
    return parse_with_schema(MoEConfig, data, source, "the MoE recipe")


def load_moe_config(path: Union[str, Path]) -> tuple[MoEConfig, str]:
    path = Path(path)
    text = read_config_text(path)
    return parse_moe_config(load_yaml_text(text, str(path)), str(path)), text


def validate(config: MoEConfig, source: str, understood: bool) -> None:
    """Reference §6.2, as ConfigErrors naming the key. Random routers need the acknowledgement flag too:
    such a model only routes sensibly after training."""
    k, n = config.experts_per_token, len(config.experts)
    if k < 1:
        raise ConfigError(f"{source}: experts_per_token: must be at least 1, got {k}")
    if n < k:
        raise ConfigError(f"{source}: experts: {n} expert(s) is fewer than experts_per_token ({k})")
    if config.gate_mode in RANDOM_GATES:
        if not understood:
            raise ConfigError(
                f"{source}: gate_mode: {config.gate_mode} routers are not useful without training; pass "
                "--i-understand-this-is-not-useful-without-training to build one anyway"
            )
        return
    for i, e in enumerate(config.experts):
        if not e.positive_prompts:
            raise ConfigError(f"{source}: experts[{i}].positive_prompts: gate_mode {config.gate_mode} needs at least one positive prompt per expert")
    if n > 1 and len({e.prompts_key() for e in config.experts}) == 1:
        raise ConfigError(f"{source}: experts: all experts have the same prompts, so their routers would be identical")
    if n > 1 and len({e.source_model for e in config.experts}) == 1 and not understood:
        raise ConfigError(
            f"{source}: experts: every expert is the same model {config.experts[0].source_model}; pass "
            "--i-understand-this-is-not-useful-without-training to build it anyway"
        )
    shared = config.shared_experts or []
    with_prompts = [bool(s.positive_prompts) for s in shared]
    if any(with_prompts) and not all(with_prompts):
        raise ConfigError(f"{source}: shared_experts: give positive prompts to all shared experts or to none")


def supported_architectures(config: MoEConfig, model_types: list[str]) -> dict[str, Optional[str]]:
    """Candidate -> None if it can hold this MoE, else why not (docs/mergekit-reference.md §6)."""
    types = set(model_types)
    shared = config.shared_experts or []
    random = config.gate_mode in RANDOM_GATES

    def same_type(allowed: tuple[str, ...]) -> Optional[str]:
        if len(types) > 1:
            return f"the models have different model_types ({', '.join(sorted(types))})"
        if not types <= set(allowed):
            return f"it is built from {' or '.join(allowed)} models, not {next(iter(types))}"
        return None

    out: dict[str, Optional[str]] = {}
    out["mixtral"] = "it takes no shared experts" if shared else same_type(("llama", "mistral"))
    if len(shared) > 1:
        out["deepseek"] = "it takes at most one shared expert"
    elif shared and shared[0].positive_prompts:
        out["deepseek"] = "its shared expert takes no prompts"
    else:
        out["deepseek"] = same_type(("llama", "mistral"))
    if len(shared) != 1:
        out["qwen2_moe"] = f"it needs exactly one shared expert (the recipe has {len(shared)})"
    elif not shared[0].positive_prompts and not random:
        out["qwen2_moe"] = f"its shared expert needs positive prompts for its gate (gate_mode {config.gate_mode})"
    else:
        out["qwen2_moe"] = same_type(("llama", "mistral", "qwen2"))
    out["qwen3_moe"] = "it takes no shared experts" if shared else same_type(("qwen3",))
    return out


def choose_architecture(config: MoEConfig, model_types: list[str], source: str) -> str:
    candidates = list(ARCHITECTURES)
    if config.architecture:
        wanted = config.architecture.lower()
        candidates = [c for c in candidates if _ARCH_NAMES[c].startswith(wanted) or wanted in (c, *_ALIASES.get(c, ()))]
        if not candidates:
            raise ConfigError(f"{source}: architecture: unknown output architecture {config.architecture!r} (use mixtral, qwen, qwen2_moe or qwen3)")
    reasons = supported_architectures(config, model_types)
    ok = [c for c in candidates if reasons[c] is None]
    if "mixtral" in ok:
        return "mixtral"
    usable = [c for c in ok if c != "deepseek"]
    if usable:
        if len(usable) > 1:
            log.warning("several output architectures fit (%s); using %s", ", ".join(usable), usable[0])
        return usable[0]
    if "deepseek" in ok:
        raise ConfigError(
            f"{source}: architecture: this recipe only fits a DeepSeek MoE, whose model code is not part of "
            "transformers (it needs trust_remote_code); DeepSeek output is not supported"
        )
    detail = "; ".join(f"{c}: {reasons[c]}" for c in candidates if c != "deepseek")
    raise ConfigError(f"{source}: no supported output architecture fits this recipe ({detail})")
