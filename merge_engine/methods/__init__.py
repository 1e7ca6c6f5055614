"""Merge methods: one pure function per method, registered by name.

The registry below is torch-free metadata (parameters, defaults, whether a base model is needed),
so configs validate without importing torch. The functions live in the sibling modules and are
imported on first use. Every function has the signature

    fn(tensors, base_index, params, model_params, ctx) -> Tensor

- tensors: the input tensors of one output tensor, in source order (the base among them);
- base_index: position of the base model's tensor in `tensors`, or None;
- params: the method's global parameters, resolved for this tensor;
- model_params: one dict of per-model parameters per entry of `tensors`;
- ctx: a TensorContext (output name, is_embed, a seeded generator for random methods).
Functions do no I/O and never look at configs.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from ..errors import ConfigError

REQUIRED = object()  # marker: the parameter has no default


@dataclass(frozen=True)
class MethodSpec:
    name: str
    implementation: str  # "module:function" inside merge_engine.methods
    global_params: dict[str, Any] = field(default_factory=dict)
    model_params: dict[str, Any] = field(default_factory=dict)
    requires_base: bool = False
    random: bool = False
    pretty_name: Optional[str] = None
    reference_url: Optional[str] = None
    # Output shape of an embedding whose inputs differ in vocabulary size: "common" = the common
    # top-left block of all inputs, "base" = the base model's shape (task-vector methods).
    embed_shape: str = "common"

    @property
    def function(self) -> Callable:
        module_name, func_name = self.implementation.split(":")
        module = importlib.import_module(f"{__name__}.{module_name}")
        return getattr(module, func_name)


_GTA_URLS = {
    "task_arithmetic": ("Task Arithmetic", "https://arxiv.org/abs/2212.04089"),
    "ties": ("TIES", "https://arxiv.org/abs/2306.01708"),
    "dare_ties": ("DARE TIES", "https://arxiv.org/abs/2311.03099"),
    "dare_linear": ("Linear DARE", "https://arxiv.org/abs/2311.03099"),
}


def _gta(name: str, normalize: bool, rescale: bool, random: bool) -> MethodSpec:
    pretty, url = _GTA_URLS[name]
    return MethodSpec(
        name=name,
        implementation=f"task_arithmetic:{name}",
        global_params={"int8_mask": False, "normalize": normalize, "rescale": rescale, "lambda": 1.0},
        model_params={"weight": REQUIRED, "density": 1.0},
        requires_base=True,
        random=random,
        pretty_name=pretty,
        reference_url=url,
        embed_shape="base",
    )


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in [
        MethodSpec(
            "linear",
            "linear:linear",
            global_params={"normalize": True},
            model_params={"weight": REQUIRED},
            pretty_name="Linear",
            reference_url="https://arxiv.org/abs/2203.05482",
        ),
        MethodSpec(
            "slerp",
            "slerp:slerp",
            global_params={"t": REQUIRED},
            requires_base=True,
            pretty_name="SLERP",
            reference_url="https://en.wikipedia.org/wiki/Slerp",
        ),
        MethodSpec(
            "passthrough",
            "passthrough:passthrough",
            model_params={"scale": None},
            pretty_name="Passthrough",
        ),
        _gta("task_arithmetic", normalize=False, rescale=False, random=False),
        _gta("ties", normalize=True, rescale=False, random=False),
        _gta("dare_ties", normalize=False, rescale=True, random=True),
        _gta("dare_linear", normalize=False, rescale=True, random=True),
    ]
}


def get_method_spec(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(
            f"unknown merge_method {name!r} (available: {', '.join(sorted(METHODS))})"
        ) from None
