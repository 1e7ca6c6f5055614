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
    "breadcrumbs": ("Model Breadcrumbs", "https://arxiv.org/abs/2312.06795"),
    "breadcrumbs_ties": ("Model Breadcrumbs with TIES", "https://arxiv.org/abs/2312.06795"),
    "della": ("DELLA", "https://arxiv.org/abs/2406.11617"),
    "della_linear": ("Linear DELLA", "https://arxiv.org/abs/2406.11617"),
}


def _gta(name: str, normalize: bool, rescale: bool, random: bool, extra: Optional[dict] = None) -> MethodSpec:
    pretty, url = _GTA_URLS[name]
    return MethodSpec(
        name=name,
        implementation=f"task_arithmetic:{name}",
        global_params={"int8_mask": False, "normalize": normalize, "rescale": rescale, "lambda": 1.0},
        model_params={"weight": REQUIRED, "density": 1.0, **(extra or {})},
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
        _gta("breadcrumbs", normalize=False, rescale=False, random=False, extra={"gamma": 0.01}),
        _gta("breadcrumbs_ties", normalize=False, rescale=False, random=False, extra={"gamma": 0.01}),
        _gta("della", normalize=True, rescale=True, random=True, extra={"epsilon": 0.15}),
        _gta("della_linear", normalize=False, rescale=True, random=True, extra={"epsilon": 0.15}),
        MethodSpec(
            "nuslerp",
            "spherical:nuslerp",
            global_params={"nuslerp_row_wise": False, "nuslerp_flatten": True},
            model_params={"weight": REQUIRED},
            pretty_name="NuSLERP",
        ),
        MethodSpec(
            "multislerp",
            "spherical:multislerp",
            global_params={"normalize_weights": True, "eps": 1e-8},
            model_params={"weight": REQUIRED},
            pretty_name="Multi-SLERP",
            reference_url="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
        ),
        MethodSpec(
            "karcher",
            "spherical:karcher",
            global_params={"max_iter": 10, "tol": 1e-5},
            pretty_name="Karcher Mean",
            reference_url="https://en.wikipedia.org/wiki/Karcher_mean",
        ),
        MethodSpec(
            "model_stock",
            "model_stock:model_stock",
            global_params={"filter_wise": False},
            requires_base=True,
            pretty_name="Model Stock",
            reference_url="https://arxiv.org/abs/2403.19522",
        ),
        MethodSpec(
            "sce",
            "selective:sce",
            global_params={"int8_mask": False, "select_topk": 1.0},
            requires_base=True,
            pretty_name="SCE",
            reference_url="https://arxiv.org/abs/2408.07990",
            embed_shape="base",
        ),
        MethodSpec(
            "ram",
            "selective:ram",
            global_params={"epsilon": 1e-5},
            requires_base=True,
            pretty_name="RAM",
            embed_shape="base",
        ),
        MethodSpec(
            "ramplus_tl",
            "selective:ramplus_tl",
            global_params={"r": 0.1, "alpha": 0.2, "epsilon": 1e-5},
            requires_base=True,
            pretty_name="RAM+",
            embed_shape="base",
        ),
        MethodSpec(
            "nearswap",
            "selective:nearswap",
            global_params={"t": REQUIRED},
            requires_base=True,
            pretty_name="NearSwap",
        ),
        MethodSpec(
            "arcee_fusion",
            "selective:arcee_fusion",
            requires_base=True,
            random=True,  # tensors over 1e6 entries estimate quantiles from a seeded sample
            pretty_name="Arcee Fusion",
            reference_url="https://www.arcee.ai/blog/meet-mergekit-v0-1-arcee-fusion-expanded-model-support-multi-gpu-acceleration",
        ),
    ]
}


def get_method_spec(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(
            f"unknown merge_method {name!r} (available: {', '.join(sorted(METHODS))})"
        ) from None
