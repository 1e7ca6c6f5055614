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

This registry is the single source of truth for what the rest of the project needs to know about a
method: its parameters and defaults, whether it is of the task-vector family (and then its
sparsification and sign consensus: `TaskVectorSpec`), and whether a search may tune it (which
parameters, their bounds and starting values: `SearchSpec`). The executors, the genome, the search
config and the docs tables read it (tests/test_registry.py checks the docs against it).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from ..errors import ConfigError

REQUIRED = object()  # marker: the parameter has no default


RANDOM_SPARSIFIERS = ("random", "della_magprune")  # sparsifications that draw random masks


@dataclass(frozen=True)
class TaskVectorSpec:
    """A method of the task-arithmetic family: merge `base + lambda * combine(sparsify(x_i - base))`."""

    # None, "magnitude" (TIES trim), "random" (DARE), "magnitude_outliers" (breadcrumbs) or
    # "della_magprune" (DELLA)
    sparsify: Optional[str]
    consensus: bool  # TIES sign election and disjoint mean, else a weighted sum
    extra: Optional[str] = None  # the sparsification's own per-model parameter (gamma, epsilon)

    @property
    def random(self) -> bool:
        return self.sparsify in RANDOM_SPARSIFIERS


@dataclass(frozen=True)
class SearchParam:
    """A parameter a search tunes, with bounds that keep every decoded value valid."""

    name: str
    low: float
    high: float
    initial: Optional[float]  # None: 1 / number of models (weights)


# `weight`'s bounds here are for a normalising method; the genome doubles `high` when the method
# does not normalise and mirrors `low` with allow_negative_weights (docs/mergekit-evolve.md).
WEIGHT = SearchParam("weight", 0.0, 1.0, None)
DENSITY = SearchParam("density", 0.05, 1.0, 1.0)  # below 0.05 TIES keeps almost nothing of small tensors
# DELLA needs 0 < density - epsilon and density + epsilon < 1 for every value an optimiser may
# propose: fixed bounds that guarantee it, so a decoded value is always exactly the value merged.
DELLA_DENSITY = SearchParam("density", 0.1, 0.9, 0.9)
DELLA_EPSILON = SearchParam("epsilon", 0.0, 0.09, 0.05)
GAMMA = SearchParam("gamma", 0.0, 0.1, 0.01)  # breadcrumbs: the share of largest outliers dropped; mergekit's default
SLERP_T = SearchParam("t", 0.0, 1.0, 0.5)
FILTER_WISE = SearchParam("filter_wise", 0.0, 1.0, 0.25)  # a switch, on at >= 0.5; starts off as mergekit
# The SVD methods (evomerge extensions): global parameters searched per layer group and filter.
# alpha starts at 1 (TSV-M's paper value; the Iso papers pick alpha on validation data, and the
# flat spectrum shrinks the update's norm below the sum's, so their range reaches 3).
TSVM_ALPHA = SearchParam("alpha", 0.0, 2.0, 1.0)
ISO_ALPHA = SearchParam("alpha", 0.0, 3.0, 1.0)
RANK_SHARE = SearchParam("rank_share", 0.02, 1.0, None)  # None: 1 / number of task models (TSV-M's)
COMMON_SHARE = SearchParam("common_share", 0.5, 1.0, 0.8)  # Iso-CTS's common-subspace share


@dataclass(frozen=True)
class SearchSpec:
    """How `mergekit-evolve` may search a method."""

    params: tuple[SearchParam, ...]  # per model (slerp: its `t`, per layer group and filter)
    # mergekit-evolve's `normalize` when the genome leaves it unset
    normalize: bool = False
    needs_base: bool = False  # the genome must name base_model
    # a global on/off parameter searched per layer group and filter (model_stock's filter_wise)
    switch: Optional[SearchParam] = None
    # global numeric parameters searched per layer group and filter (the SVD methods' alpha);
    # a method has these or per-model `params`, not both
    global_params: tuple[SearchParam, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    @property
    def weighted(self) -> bool:
        return "weight" in self.names

    def param(self, name: str) -> SearchParam:
        for p in self.params + self.global_params + ((self.switch,) if self.switch else ()):
            if p.name == name:
                return p
        raise KeyError(name)


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
    task_vector: Optional[TaskVectorSpec] = None  # set for the task-arithmetic family
    search: Optional[SearchSpec] = None  # set for methods mergekit-evolve can search

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


_EXTRA_DEFAULTS = {"gamma": 0.01, "epsilon": 0.15}  # mergekit's defaults


def _gta(
    name: str,
    normalize: bool,
    rescale: bool,
    vectors: TaskVectorSpec,
    search_normalize: bool = False,
) -> MethodSpec:
    pretty, url = _GTA_URLS[name]
    if vectors.sparsify is None:
        searched = (WEIGHT,)
    elif vectors.sparsify == "della_magprune":
        searched = (WEIGHT, DELLA_DENSITY, DELLA_EPSILON)
    elif vectors.extra == "gamma":
        searched = (WEIGHT, DENSITY, GAMMA)
    else:
        searched = (WEIGHT, DENSITY)
    return MethodSpec(
        name=name,
        implementation=f"task_arithmetic:{name}",
        global_params={"int8_mask": False, "normalize": normalize, "rescale": rescale, "lambda": 1.0},
        model_params={"weight": REQUIRED, "density": 1.0, **({vectors.extra: _EXTRA_DEFAULTS[vectors.extra]} if vectors.extra else {})},
        requires_base=True,
        random=vectors.random,
        pretty_name=pretty,
        reference_url=url,
        embed_shape="base",
        task_vector=vectors,
        search=SearchSpec(searched, normalize=search_normalize, needs_base=True),
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
            search=SearchSpec((WEIGHT,), normalize=True),
        ),
        MethodSpec(
            "slerp",
            "slerp:slerp",
            global_params={"t": REQUIRED},
            requires_base=True,
            pretty_name="SLERP",
            reference_url="https://en.wikipedia.org/wiki/Slerp",
            # the genome picks the two models (and the base) per layer group itself
            search=SearchSpec((SLERP_T,)),
        ),
        MethodSpec(
            "passthrough",
            "passthrough:passthrough",
            model_params={"scale": None},
            pretty_name="Passthrough",
        ),
        # search_normalize: mergekit-evolve turns normalize on for linear, ties and dare_ties; della
        # too here, as della's own default is on
        _gta("task_arithmetic", False, False, TaskVectorSpec(None, False)),
        _gta("ties", True, False, TaskVectorSpec("magnitude", True), search_normalize=True),
        _gta("dare_ties", False, True, TaskVectorSpec("random", True), search_normalize=True),
        _gta("dare_linear", False, True, TaskVectorSpec("random", False)),
        _gta("breadcrumbs", False, False, TaskVectorSpec("magnitude_outliers", False, "gamma")),
        _gta("breadcrumbs_ties", False, False, TaskVectorSpec("magnitude_outliers", True, "gamma")),
        _gta("della", True, True, TaskVectorSpec("della_magprune", True, "epsilon"), search_normalize=True),
        _gta("della_linear", False, True, TaskVectorSpec("della_magprune", False, "epsilon")),
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
            search=SearchSpec((), needs_base=True, switch=FILTER_WISE),
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
        # evomerge extensions (not in mergekit; the names of mergekit's unmerged pull requests):
        # SVD of the task matrices per 2-D weight, task arithmetic elsewhere (methods/singular.py)
        MethodSpec(
            "tsvm",
            "singular:tsvm",
            global_params={"alpha": 1.0, "rank_share": None},
            requires_base=True,
            random=True,  # randomized SVDs where the kept rank is small, seeded by (seed, tensor name)
            pretty_name="Task Singular Vectors: Merge",
            reference_url="https://arxiv.org/abs/2412.00081",
            embed_shape="base",
            search=SearchSpec((), needs_base=True, global_params=(TSVM_ALPHA, RANK_SHARE)),
        ),
        MethodSpec(
            "iso_c",
            "singular:iso_c",
            global_params={"alpha": 1.0},
            requires_base=True,
            pretty_name="Iso-C",
            reference_url="https://arxiv.org/abs/2502.04959",
            embed_shape="base",
            search=SearchSpec((), needs_base=True, global_params=(ISO_ALPHA,)),
        ),
        MethodSpec(
            "iso_cts",
            "singular:iso_cts",
            global_params={"alpha": 1.0, "common_share": 0.8},
            requires_base=True,
            pretty_name="Iso-CTS",
            reference_url="https://arxiv.org/abs/2502.04959",
            embed_shape="base",
            search=SearchSpec((), needs_base=True, global_params=(ISO_ALPHA, COMMON_SHARE)),
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


def searchable_methods() -> tuple[str, ...]:
    return tuple(name for name, spec in METHODS.items() if spec.search is not None)


def task_vector_methods() -> tuple[str, ...]:
    return tuple(name for name, spec in METHODS.items() if spec.task_vector is not None)
