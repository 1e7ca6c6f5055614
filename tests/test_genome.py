"""The one-method genomes (search_spaces.genome.method_genome): layout, bounds, starting point, decode to a
mergekit recipe, encode back, clipping, and the numbers the decoded recipes really merge with.

Layout and decode checks build Genomes straight from a parsed search.yml genome with a given layer
count (no model files needed); the numbers are checked by planning decoded recipes with
merge_engine.plan.build_plan on the tiny llama models (fixture `llama_models`).
"""

from __future__ import annotations

import math
import random
from contextlib import contextmanager
from itertools import product

import pytest

from evolve.config import parse_search_config
from merge_engine.config import Conditional, ModelReference, parse_config
from merge_engine.errors import ConfigError
from merge_engine.methods import DELLA_DENSITY, DELLA_EPSILON, GAMMA
from merge_engine.methods import METHODS as REGISTRY
from search_spaces.genome import MethodGenome, method_genome

METHOD_PARAMS = {name: spec.search.names for name, spec in REGISTRY.items() if spec.search}
MIN_DENSITY = REGISTRY["ties"].search.param("density").low

METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "slerp")
TA_METHODS = ("task_arithmetic", "ties", "dare_ties", "dare_linear")
SPARSIFY_METHODS = ("breadcrumbs", "breadcrumbs_ties", "della", "della_linear")
NEEDS_BASE = TA_METHODS + SPARSIFY_METHODS + ("model_stock",)

A, B, C, BASE = "/m/ft_a", "/m/ft_b", "/m/ft_c", "/m/base"


def definition(**genome):
    genome.setdefault("models", [A, B])
    if genome.get("merge_method") in NEEDS_BASE:
        genome.setdefault("base_model", BASE)
    return parse_search_config({"genome": genome, "tasks": ["t"]}).genome


def make(num_layers: int = 4, **genome) -> MethodGenome:
    return method_genome(definition(**genome), num_layers)


def random_x(g: MethodGenome, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [rng.uniform(d.low, d.high) for d in g.dimensions]


def ref(path: str) -> ModelReference:
    return ModelReference.parse(path)


def index(g: MethodGenome, group: int, model: int, flt: int, param: str) -> int:
    """Position in the flat vector, from the documented layout [groups, models, sets, params]."""
    params = METHOD_PARAMS[g.method]
    return ((group * len(g.models) + model) * len(g.filters) + flt) * len(params) + params.index(param)


def slerp_index(g: MethodGenome, group: int, what) -> int:
    """slerp layout per group: [select score per pool model (pool > 2)] + [t per parameter set]."""
    pool = len(g.slerp_pool)
    select = pool if pool > 2 else 0
    per_group = select + len(g.filters)
    if isinstance(what, tuple):  # ("select", model_position)
        return group * per_group + what[1]
    return group * per_group + select + what  # t of parameter set `what`


@contextmanager
def planned(config):
    from merge_engine.plan import build_plan

    plan = build_plan(config)
    try:
        yield plan
    finally:
        plan.close()


def tensor_params(plan, name: str):
    task = next(t for t in plan.tasks if t.out.name == name)
    return task


def model_param(task, model_path, name: str):
    i = next(i for i, inp in enumerate(task.inputs) if str(inp.model) == str(model_path))
    return task.model_params[i][name]


# ----------------------------------------------------------------------------------------------
# layout


LAYOUTS = [
    # (num_layers, layer_granularity, filters)
    (4, 0, None),
    (4, 2, None),
    (4, 1, ["mlp"]),
    (4, 2, ["self_attn", "mlp"]),
    (8, 4, ["mlp"]),
]


@pytest.mark.parametrize("method", [m for m in METHODS if m != "slerp"])
@pytest.mark.parametrize("num_layers,granularity,filters", LAYOUTS)
@pytest.mark.parametrize("models", [[A, B], [A, B, C]])
def test_dimension_count_and_order(method, num_layers, granularity, filters, models):
    g = make(num_layers, merge_method=method, models=models, layer_granularity=granularity, filters=filters)
    groups = num_layers // granularity if granularity else 1
    sets = len(filters or []) + 1
    params = {"linear": 1, "task_arithmetic": 1}.get(method, 2)
    assert g.num_groups == groups
    assert g.size == groups * len(models) * sets * params == len(g.space.lower) == len(g.space.upper) == len(g.initial())
    assert METHOD_PARAMS[method] == (("weight",) if params == 1 else ("weight", "density"))
    # the flat vector is [groups, models, parameter sets, params], catch-all set last
    names = [d.name for d in g.dimensions]
    assert len(set(names)) == len(names)
    labels = [m.rsplit("/", 1)[1] for m in models]
    for gi, mi, fi, p in product(range(groups), range(len(models)), range(sets), METHOD_PARAMS[method]):
        flt = (filters or [])[fi] if fi < sets - 1 else "all"
        assert names[index(g, gi, mi, fi, p)] == f"g{gi}.{labels[mi]}.{p}.{flt}"


@pytest.mark.parametrize("num_layers,granularity,filters", LAYOUTS)
@pytest.mark.parametrize(
    "models,base,pool",
    [
        ([A, B], None, 2),  # two models, no base: no selection
        ([BASE, A], BASE, 2),  # base listed among two models
        ([A, B], BASE, 3),  # base not listed: it joins the pool
        ([A, B, C], None, 3),
    ],
)
def test_slerp_dimension_count(num_layers, granularity, filters, models, base, pool):
    g = make(num_layers, merge_method="slerp", models=models, base_model=base, layer_granularity=granularity,
             filters=filters)
    groups = num_layers // granularity if granularity else 1
    sets = len(filters or []) + 1
    select = pool if pool > 2 else 0
    assert len(g.slerp_pool) == pool
    assert g.size == groups * (select + sets)
    names = [d.name for d in g.dimensions]
    assert len(set(names)) == len(names)
    for gi in range(groups):
        for fi in range(sets):
            flt = (filters or [])[fi] if fi < sets - 1 else "all"
            assert names[slerp_index(g, gi, fi)] == f"g{gi}.t.{flt}"
        for mi in range(select):
            assert names[slerp_index(g, gi, ("select", mi))].endswith(".select")


def test_worked_cases_from_mergekit_evolve_notes():
    """Reference §1.3: 3 x 32-layer models, dare_ties."""
    models = [A, B, C]
    g = make(32, merge_method="dare_ties", models=models, layer_granularity=8)
    assert (g.size, g.default_popsize()) == (24, 13)
    g = make(32, merge_method="dare_ties", models=models, layer_granularity=8, filters=["self_attn", "mlp"])
    assert (g.size, g.default_popsize()) == (72, 16)
    g = make(32, merge_method="dare_ties", models=models, layer_granularity=1, filters=["self_attn", "mlp"])
    assert (g.size, g.default_popsize()) == (576, 23)


@pytest.mark.parametrize("n", [1, 2, 5, 13, 24, 100, 1000])
def test_default_popsize_is_pycma_rule(n):
    g = make(n, merge_method="linear", models=[A], layer_granularity=1)
    assert g.size == n
    assert g.default_popsize() == 4 + math.floor(3 * math.log(n))


@pytest.mark.parametrize("models", [["/x/org1/model", "/x/org2/model"], ["/m/base+/l/lora_a", "/m/base+/l/lora_b"]])
def test_dimension_names_unique_for_models_with_same_folder_name(models):
    g = make(4, merge_method="linear", models=models)
    names = [d.name for d in g.dimensions]
    assert len(set(names)) == len(names), names


# ----------------------------------------------------------------------------------------------
# bounds and the starting point


@pytest.mark.parametrize(
    "method,normalize,negative,low,high",
    [
        ("linear", None, False, 0.0, 1.0),  # auto normalize: True
        ("ties", None, False, 0.0, 1.0),
        ("dare_ties", None, False, 0.0, 1.0),
        ("task_arithmetic", None, False, 0.0, 2.0),  # auto normalize: False
        ("dare_linear", None, False, 0.0, 2.0),
        ("linear", False, False, 0.0, 2.0),
        ("task_arithmetic", True, False, 0.0, 1.0),
        ("ties", None, True, -1.0, 1.0),
        ("task_arithmetic", None, True, -2.0, 2.0),
        ("linear", False, True, -2.0, 2.0),
    ],
)
def test_weight_bounds(method, normalize, negative, low, high):
    g = make(4, merge_method=method, normalize=normalize, allow_negative_weights=negative, models=[A, B, C],
             layer_granularity=2, filters=["mlp"])
    for d in g.dimensions:
        if ".weight." in d.name:
            assert (d.low, d.high) == (low, high), d.name
            assert d.initial == pytest.approx(1 / 3)
        else:
            assert ".density." in d.name
            assert (d.low, d.high, d.initial) == (MIN_DENSITY, 1.0, 1.0) == (0.05, 1.0, 1.0)
        assert d.low <= d.initial <= d.high


@pytest.mark.parametrize("negative", [False, True])
def test_slerp_bounds_and_start(negative):
    g = make(4, merge_method="slerp", models=[A, B, C], layer_granularity=2, filters=["mlp"],
             allow_negative_weights=negative)
    for d in g.dimensions:
        assert (d.low, d.high, d.initial) == (0.0, 1.0, 0.5), d.name


@pytest.mark.parametrize("method", [m for m in METHODS if m != "slerp"])
@pytest.mark.parametrize("n_models", [1, 2, 4])
def test_initial_point(method, n_models):
    models = [f"/m/ft_{i}" for i in range(n_models)]
    g = make(4, merge_method=method, models=models, layer_granularity=1, filters=["self_attn"])
    x = g.initial()
    for d, v in zip(g.dimensions, x):
        assert v == (1.0 / n_models if ".weight." in d.name else 1.0)
    assert g.space.lower == tuple(d.low for d in g.dimensions) and g.space.upper == tuple(d.high for d in g.dimensions)


# ----------------------------------------------------------------------------------------------
# decode


def test_decode_granularity_0_is_a_models_recipe_with_scalars():
    g = make(4, merge_method="ties", layer_granularity=0)
    assert g.size == 4
    x = [0.3, 0.4, 0.7, 0.9]  # a.weight, a.density, b.weight, b.density
    cfg = g.decode(x)
    assert cfg.merge_method == "ties" and cfg.slices is None and cfg.modules is None
    assert cfg.base_model == ref(BASE)
    assert [m.model for m in cfg.models] == [ref(A), ref(B)]  # base not listed: the planner adds it
    assert cfg.models[0].parameters == {"weight": 0.3, "density": 0.4}
    assert cfg.models[1].parameters == {"weight": 0.7, "density": 0.9}
    assert cfg.dtype == "bfloat16"
    assert cfg.parameters == {"normalize": 1.0, "int8_mask": 1.0}
    # the decoded recipe is an ordinary mergekit recipe: it survives a YAML round trip
    import yaml

    assert parse_config(yaml.safe_load(cfg.to_yaml())) == cfg


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "dare_ties", "dare_linear"])
@pytest.mark.parametrize("num_layers,granularity", [(4, 1), (4, 2), (12, 3)])
def test_decode_slices_one_per_layer_group(method, num_layers, granularity):
    base = None if method == "linear" else BASE
    g = make(num_layers, merge_method=method, base_model=base, layer_granularity=granularity)
    x = random_x(g, 7)
    cfg = g.decode(x)
    groups = num_layers // granularity
    assert cfg.models is None and len(cfg.slices) == groups
    for gi, slc in enumerate(cfg.slices):
        expected_models = [ref(A), ref(B)] + ([ref(BASE)] if base else [])
        assert [s.model for s in slc.sources] == expected_models
        for s in slc.sources:
            assert s.layer_range == (gi * granularity, (gi + 1) * granularity)
        for mi in range(2):
            params = slc.sources[mi].parameters
            assert params["weight"] == x[index(g, gi, mi, 0, "weight")]
            if "density" in METHOD_PARAMS[method]:
                assert params["density"] == x[index(g, gi, mi, 0, "density")]
            else:
                assert "density" not in params
        if base:
            assert slc.sources[2].parameters is None  # the base is a parameter-less source
        assert slc.base_model is None and slc.parameters is None
    assert cfg.base_model == (ref(base) if base else None)


def test_one_group_covering_every_layer_is_a_models_recipe():
    g = make(4, merge_method="ties", layer_granularity=4)
    assert g.num_groups == 1 and g.size == 4
    assert g.decode([0.3, 0.4, 0.7, 0.9]) == make(4, merge_method="ties").decode([0.3, 0.4, 0.7, 0.9])


def test_base_model_listed_in_models_gets_weights_and_is_not_appended():
    g = make(4, merge_method="ties", models=[BASE, A, B], base_model=BASE, layer_granularity=2)
    assert g.size == 2 * 3 * 2
    x = random_x(g, 3)
    cfg = g.decode(x)
    for gi, slc in enumerate(cfg.slices):
        assert [s.model for s in slc.sources] == [ref(BASE), ref(A), ref(B)]
        assert slc.sources[0].parameters["weight"] == x[index(g, gi, 0, 0, "weight")]


def test_decode_filters_are_conditional_lists_with_the_catch_all_last():
    g = make(4, merge_method="dare_ties", layer_granularity=2, filters=["self_attn", "mlp"])
    x = random_x(g, 11)
    cfg = g.decode(x)
    for gi, slc in enumerate(cfg.slices):
        for mi in range(2):
            params = slc.sources[mi].parameters
            for p in ("weight", "density"):
                assert params[p] == (
                    Conditional(x[index(g, gi, mi, 0, p)], "self_attn"),
                    Conditional(x[index(g, gi, mi, 1, p)], "mlp"),
                    Conditional(x[index(g, gi, mi, 2, p)], None),
                )
    plain = cfg.to_plain()["slices"][0]["sources"][0]["parameters"]["weight"]
    assert [c["filter"] for c in plain] == ["self_attn", "mlp", None]


def test_decode_filters_at_granularity_0():
    g = make(4, merge_method="linear", layer_granularity=0, filters=["mlp"])
    x = [0.1, 0.2, 0.3, 0.4]  # a.mlp, a.all, b.mlp, b.all
    cfg = g.decode(x)
    assert cfg.models[0].parameters["weight"] == (Conditional(0.1, "mlp"), Conditional(0.2, None))
    assert cfg.models[1].parameters["weight"] == (Conditional(0.3, "mlp"), Conditional(0.4, None))


def test_decode_smooth_gives_gradients_over_the_layer_groups():
    g = make(8, merge_method="ties", layer_granularity=2, smooth=True)
    assert g.num_groups == 4
    x = random_x(g, 5)
    cfg = g.decode(x)
    assert cfg.slices is None and [m.model for m in cfg.models] == [ref(A), ref(B)]
    for mi in range(2):
        for p in ("weight", "density"):
            assert cfg.models[mi].parameters[p] == tuple(x[index(g, gi, mi, 0, p)] for gi in range(4))
    # with filters: one conditional per set, each holding a gradient
    g = make(8, merge_method="linear", layer_granularity=4, smooth=True, filters=["mlp"])
    x = random_x(g, 6)
    w = g.decode(x).models[1].parameters["weight"]
    assert w == (
        Conditional((x[index(g, 0, 1, 0, "weight")], x[index(g, 1, 1, 0, "weight")]), "mlp"),
        Conditional((x[index(g, 0, 1, 1, "weight")], x[index(g, 1, 1, 1, "weight")]), None),
    )


@pytest.mark.parametrize(
    "method,normalize,expected_params",
    [
        ("linear", None, {"normalize": 1.0}),
        ("ties", None, {"normalize": 1.0, "int8_mask": 1.0}),
        ("dare_ties", None, {"normalize": 1.0, "int8_mask": 1.0}),
        ("task_arithmetic", None, {"normalize": 0.0, "int8_mask": 1.0}),
        ("dare_linear", None, {"normalize": 0.0, "int8_mask": 1.0}),
        ("linear", False, {"normalize": 0.0}),
        ("ties", False, {"normalize": 0.0, "int8_mask": 1.0}),
        ("task_arithmetic", True, {"normalize": 1.0, "int8_mask": 1.0}),
    ],
)
def test_fixed_parameters(method, normalize, expected_params):
    g = make(4, merge_method=method, normalize=normalize, layer_granularity=2)
    cfg = g.decode(g.initial())
    assert cfg.parameters == expected_params
    assert cfg.dtype == "bfloat16"
    g = make(4, merge_method=method, normalize=normalize, dtype="fp32")
    assert g.decode(g.initial()).dtype == "float32"


def test_tokenizer_source_is_passed_through():
    g = make(4, merge_method="ties", tokenizer_source="base")
    assert g.decode(g.initial()).tokenizer_source == "base"
    g = make(4, merge_method="slerp", models=[A, B], tokenizer_source="base")
    assert g.decode(g.initial()).tokenizer_source == "base"
    assert make(4, merge_method="ties").decode(make(4, merge_method="ties").initial()).tokenizer_source is None


# -- slerp


def test_slerp_two_models_granularity_0():
    g = make(4, merge_method="slerp", models=[A, B])
    assert g.size == 1
    cfg = g.decode([0.3])
    assert cfg.base_model == ref(A)  # no base_model: the first model is the base
    assert [m.model for m in cfg.models] == [ref(A), ref(B)]
    assert cfg.parameters == {"t": 0.3}
    assert cfg.dtype == "bfloat16"
    g = make(4, merge_method="slerp", models=[A, B], base_model=B)
    cfg = g.decode([0.8])
    assert cfg.base_model == ref(B) and [m.model for m in cfg.models] == [ref(B), ref(A)]


def test_slerp_two_models_per_group_with_filters():
    g = make(4, merge_method="slerp", models=[BASE, A], base_model=BASE, layer_granularity=2, filters=["mlp"])
    assert g.size == 4
    x = [0.1, 0.2, 0.3, 0.4]
    cfg = g.decode(x)
    assert cfg.base_model is None and cfg.models is None
    for gi, slc in enumerate(cfg.slices):
        assert slc.base_model == ref(BASE)
        assert [s.model for s in slc.sources] == [ref(BASE), ref(A)]
        assert all(s.layer_range == (2 * gi, 2 * gi + 2) and s.parameters is None for s in slc.sources)
        assert slc.parameters == {"t": (Conditional(x[2 * gi], "mlp"), Conditional(x[2 * gi + 1], None))}


def test_slerp_three_models_top2_per_group():
    # pool = [base, ft_a, ft_b] (base_model not in models joins the pool first)
    g = make(4, merge_method="slerp", models=[A, B], base_model=BASE, layer_granularity=2)
    assert [str(m) for m in g.slerp_pool] == [BASE, A, B]
    assert g.size == 2 * (3 + 1)
    #    group 0: select base, a, b | t      group 1: select base, a, b | t
    x = [0.2, 0.9, 0.5, 0.25, 0.7, 0.1, 0.8, 0.75]
    cfg = g.decode(x)
    s0, s1 = cfg.slices
    assert s0.base_model == ref(A) and [s.model for s in s0.sources] == [ref(A), ref(B)]
    assert s1.base_model == ref(B) and [s.model for s in s1.sources] == [ref(B), ref(BASE)]
    assert s0.parameters == {"t": 0.25} and s1.parameters == {"t": 0.75}
    assert s0.sources[0].layer_range == (0, 2) and s1.sources[1].layer_range == (2, 4)
    # ties in the scores go to the earlier pool model
    cfg = g.decode(g.initial())
    assert [s.model for s in cfg.slices[0].sources] == [ref(BASE), ref(A)]
    assert cfg.slices[0].parameters == {"t": 0.5}


def test_slerp_three_models_granularity_0():
    g = make(4, merge_method="slerp", models=[A, B, C])
    assert g.size == 4
    cfg = g.decode([0.1, 0.6, 0.9, 0.3])
    assert cfg.base_model == ref(C)
    assert [m.model for m in cfg.models] == [ref(C), ref(B)]
    assert cfg.parameters == {"t": 0.3}


# ----------------------------------------------------------------------------------------------
# encode, clipping


ROUND_TRIP_LAYOUTS = [
    dict(layer_granularity=0),
    dict(layer_granularity=0, filters=["mlp"]),
    dict(layer_granularity=2),
    dict(layer_granularity=1, filters=["self_attn", "mlp"]),
    dict(layer_granularity=2, smooth=True),
    dict(layer_granularity=1, smooth=True, filters=["mlp"]),
    dict(layer_granularity=2, normalize=False, allow_negative_weights=True, filters=["mlp"]),
    dict(layer_granularity=2, models=[BASE, A, B]),
]


@pytest.mark.parametrize("method", [m for m in METHODS if m != "slerp"])
@pytest.mark.parametrize("layout", ROUND_TRIP_LAYOUTS, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_encode_decode_round_trip(method, layout):
    g = make(4, merge_method=method, **layout)
    for seed in range(4):
        x = random_x(g, seed)
        assert g.encode(g.decode(x)) == x
    assert g.encode(g.decode(g.initial())) == g.initial()


def test_encode_decode_round_trip_many_groups_smooth():
    g = make(12, merge_method="dare_ties", layer_granularity=1, smooth=True, filters=["self_attn", "mlp"])
    for seed in range(3):
        x = random_x(g, seed)
        assert g.encode(g.decode(x)) == x


@pytest.mark.parametrize(
    "layout",
    [
        dict(models=[A, B]),
        dict(models=[A, B], filters=["mlp"]),
        dict(models=[BASE, A], base_model=BASE, layer_granularity=2),
        dict(models=[A, B], layer_granularity=1, filters=["self_attn", "mlp"]),
    ],
    ids=str,
)
def test_encode_decode_round_trip_slerp_two_models(layout):
    g = make(4, merge_method="slerp", **layout)
    for seed in range(4):
        x = random_x(g, seed)
        assert g.encode(g.decode(x)) == x


@pytest.mark.parametrize(
    "layout",
    [dict(models=[A, B, C]), dict(models=[A, B], base_model=BASE, layer_granularity=2, filters=["mlp"])],
    ids=str,
)
def test_encode_slerp_three_models_keeps_t(layout):
    """The selection scores are many-to-one (only their order matters), so they cannot come back
    exactly; the t values do."""
    g = make(4, merge_method="slerp", **layout)
    pool = len(g.slerp_pool)
    for seed in range(4):
        x = random_x(g, seed)
        e = g.encode(g.decode(x))
        for gi in range(g.num_groups):
            for fi in range(len(g.filters)):
                i = slerp_index(g, gi, fi)
                assert e[i] == x[i]
        assert len(e) == g.size and pool == 3


@pytest.mark.parametrize(
    "layout",
    [dict(models=[A, B, C]), dict(models=[A, B], base_model=BASE, layer_granularity=2, filters=["mlp"])],
    ids=str,
)
def test_encode_slerp_three_models_keeps_the_selected_pair(layout):
    g = make(4, merge_method="slerp", **layout)
    for seed in range(4):
        cfg = g.decode(random_x(g, seed))
        assert g.decode(g.encode(cfg)) == cfg


def test_decode_clips_values_out_of_bounds():
    g = make(4, merge_method="ties", layer_granularity=0)  # a.weight a.density b.weight b.density
    cfg = g.decode([-0.5, 0.0, 7.0, 1.5])
    assert cfg.models[0].parameters == {"weight": 0.0, "density": MIN_DENSITY}
    assert cfg.models[1].parameters == {"weight": 1.0, "density": 1.0}
    g = make(4, merge_method="task_arithmetic", allow_negative_weights=True)
    cfg = g.decode([-5.0, 5.0])
    assert [m.parameters["weight"] for m in cfg.models] == [-2.0, 2.0]
    g = make(4, merge_method="slerp", models=[A, B])
    assert g.decode([1.7]).parameters == {"t": 1.0}
    assert g.decode([-1.0]).parameters == {"t": 0.0}


def test_encode_clips_and_keeps_initial_for_unset_values():
    g = make(4, merge_method="ties", layer_granularity=2, filters=["mlp"])
    recipe = parse_config(
        {
            "merge_method": "ties",
            "base_model": BASE,
            "models": [
                {"model": A, "parameters": {"weight": 3.0, "density": 0.01}},
                {"model": B, "parameters": {"weight": [{"filter": "mlp", "value": -1.0}, {"value": 0.4}]}},
            ],
        }
    )
    x = g.encode(recipe)
    for gi in range(2):
        assert x[index(g, gi, 0, 0, "weight")] == x[index(g, gi, 0, 1, "weight")] == 1.0
        assert x[index(g, gi, 0, 0, "density")] == x[index(g, gi, 0, 1, "density")] == MIN_DENSITY
        assert x[index(g, gi, 1, 0, "weight")] == 0.0
        assert x[index(g, gi, 1, 1, "weight")] == 0.4
        # density not set for b: the starting value
        assert x[index(g, gi, 1, 0, "density")] == x[index(g, gi, 1, 1, "density")] == 1.0


def test_encode_a_hand_written_gradient_recipe_into_layer_groups():
    g = make(4, merge_method="linear", layer_granularity=1)
    recipe = parse_config({"merge_method": "linear", "models": [
        {"model": A, "parameters": {"weight": [0.0, 0.6]}},
        {"model": B, "parameters": {"weight": 0.25}},
    ]})
    x = g.encode(recipe)
    assert [x[index(g, gi, 0, 0, "weight")] for gi in range(4)] == pytest.approx([0.0, 0.2, 0.4, 0.6])
    assert [x[index(g, gi, 1, 0, "weight")] for gi in range(4)] == [0.25] * 4


def test_wrong_length_and_wrong_method():
    g = make(4, merge_method="ties", layer_granularity=2)
    with pytest.raises(ValueError, match="genotype has 3 values"):
        g.decode([0.5] * 3)
    other = make(4, merge_method="linear").decode([0.5, 0.5])
    with pytest.raises(ConfigError, match="linear"):
        g.encode(other)


# ----------------------------------------------------------------------------------------------
# layer_granularity that does not divide the layer count


@pytest.mark.parametrize("num_layers,granularity", [(4, 3), (4, 8), (32, 5)])
def test_granularity_must_divide_layers(num_layers, granularity):
    with pytest.raises(ConfigError, match="layer_granularity"):
        make(num_layers, merge_method="linear", layer_granularity=granularity)


def test_build_genome_reads_layer_count_from_the_models(llama_models):
    from evolve.build import build_genome

    def config(granularity):
        return parse_search_config({"genome": {
            "models": [str(llama_models["a"]), str(llama_models["b"])], "base_model": str(llama_models["base"]),
            "merge_method": "ties", "layer_granularity": granularity}, "tasks": ["t"]})

    assert build_genome(config(2)).num_layers == 4
    assert build_genome(config(2)).size == 2 * 2 * 2
    with pytest.raises(ConfigError, match="layer_granularity") as info:
        build_genome(config(3))
    assert "3" in str(info.value) and "4" in str(info.value)


# ----------------------------------------------------------------------------------------------
# the numbers a decoded recipe really merges with (planned on the tiny llama models)


def _genome(llama_models, **genome) -> MethodGenome:
    paths = {k: str(v) for k, v in llama_models.items()}
    genome["models"] = [paths[m] for m in genome.get("models", ["a", "b"])]
    if "base_model" in genome:
        genome["base_model"] = paths[genome["base_model"]]
    elif genome["merge_method"] in NEEDS_BASE:
        genome["base_model"] = paths["base"]
    return method_genome(parse_search_config({"genome": genome, "tasks": ["t"]}).genome, 4)


LAYER = "model.layers.{}.{}.weight"


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties", "dare_linear"])
def test_planned_parameters_follow_the_genotype_per_group_and_filter(llama_models, method):
    g = _genome(llama_models, merge_method=method, layer_granularity=2, filters=["mlp"])
    x = random_x(g, 21)
    a, b, base = (str(llama_models[k]) for k in ("a", "b", "base"))
    with planned(g.decode(x)) as plan:
        for layer in range(4):
            gi = layer // 2
            for tensor, fi in (("mlp.down_proj", 0), ("mlp.gate_proj", 0), ("self_attn.q_proj", 1),
                               ("self_attn.o_proj", 1)):
                task = tensor_params(plan, LAYER.format(layer, tensor))
                assert str(task.inputs[task.base_index].model) == base
                for mi, m in enumerate((a, b)):
                    assert model_param(task, m, "weight") == x[index(g, gi, mi, fi, "weight")]
                    if "density" in METHOD_PARAMS[method]:
                        assert model_param(task, m, "density") == x[index(g, gi, mi, fi, "density")]
            norm = tensor_params(plan, f"model.layers.{layer}.post_attention_layernorm.weight")
            assert model_param(norm, a, "weight") == x[index(g, gi, 0, 1, "weight")]  # catch-all
        assert task.params["int8_mask"] == 1.0
        # embeddings come from the first slice, the head and final norm from the last
        assert model_param(tensor_params(plan, "model.embed_tokens.weight"), b, "weight") == x[index(g, 0, 1, 1, "weight")]
        assert model_param(tensor_params(plan, "lm_head.weight"), b, "weight") == x[index(g, 1, 1, 1, "weight")]
        assert model_param(tensor_params(plan, "model.norm.weight"), a, "weight") == x[index(g, 1, 0, 1, "weight")]
        assert plan.out_num_layers == 4


def test_planned_parameters_granularity_0_linear(llama_models):
    g = _genome(llama_models, merge_method="linear")
    x = [0.3, 0.9]
    with planned(g.decode(x)) as plan:
        assert len(plan.tasks) == 39
        for task in plan.tasks:
            assert [mp["weight"] for mp in task.model_params] == [0.3, 0.9]
            assert task.params["normalize"] == 1.0
            assert task.base_index is None
            assert str(task.math_dtype) == "torch.bfloat16"


def test_planned_parameters_smooth_interpolate_between_groups(llama_models):
    g = _genome(llama_models, merge_method="ties", layer_granularity=2, smooth=True)
    x = random_x(g, 4)
    a = str(llama_models["a"])
    w0, w1 = x[index(g, 0, 0, 0, "weight")], x[index(g, 1, 0, 0, "weight")]
    d0, d1 = x[index(g, 0, 0, 0, "density")], x[index(g, 1, 0, 0, "density")]
    with planned(g.decode(x)) as plan:
        for layer, frac in enumerate((0.0, 1 / 3, 2 / 3, 1.0)):
            task = tensor_params(plan, LAYER.format(layer, "mlp.up_proj"))
            assert model_param(task, a, "weight") == pytest.approx((1 - frac) * w0 + frac * w1, abs=1e-12)
            assert model_param(task, a, "density") == pytest.approx((1 - frac) * d0 + frac * d1, abs=1e-12)
        assert model_param(tensor_params(plan, LAYER.format(3, "self_attn.k_proj")), a, "weight") == w1
        assert model_param(tensor_params(plan, LAYER.format(0, "self_attn.k_proj")), a, "weight") == w0


def test_planned_slerp_three_models_pair_and_t_per_group(llama_models):
    g = _genome(llama_models, merge_method="slerp", models=["a", "b"], base_model="base", layer_granularity=2,
                filters=["mlp"])
    #    group 0: select base, a, b | t mlp, t other   group 1: ...
    x = [0.9, 0.1, 0.5, 0.2, 0.3, 0.0, 0.4, 0.6, 0.7, 0.8]
    paths = {k: str(v) for k, v in llama_models.items()}
    expected = {0: (paths["base"], paths["b"]), 1: (paths["b"], paths["a"])}
    with planned(g.decode(x)) as plan:
        for layer in range(4):
            gi = layer // 2
            top1, top2 = expected[gi]
            for tensor, fi in (("mlp.down_proj", 0), ("self_attn.v_proj", 1)):
                task = tensor_params(plan, LAYER.format(layer, tensor))
                assert [str(i.model) for i in task.inputs] == [top1, top2]
                assert str(task.inputs[task.base_index].model) == top1
                assert task.params["t"] == x[slerp_index(g, gi, fi)]


@pytest.mark.parametrize("granularity", [0, 2])
def test_linear_with_base_model_is_refused_or_merges(llama_models, granularity):
    paths = {k: str(v) for k, v in llama_models.items()}
    data = {"genome": {"models": [paths["a"], paths["b"]], "base_model": paths["base"], "merge_method": "linear",
                       "layer_granularity": granularity}, "tasks": ["t"]}
    try:
        defn = parse_search_config(data).genome
    except ConfigError as err:  # refusing it up front is fine
        assert "base_model" in str(err)
        return
    g = method_genome(defn, 4)
    with planned(g.decode(g.initial())) as plan:
        assert len(plan.tasks) == 39


@pytest.mark.parametrize("source", ["union", "ft_a"])
def test_tokenizer_source_is_refused_up_front_or_merges(llama_models, source):
    from evolve.build import build_genome

    paths = {k: str(v) for k, v in llama_models.items()}
    data = {"genome": {"models": [paths["a"], paths["b"]], "base_model": paths["base"], "merge_method": "ties",
                       "tokenizer_source": paths["a"] if source == "ft_a" else source}, "tasks": ["t"]}
    try:
        g = build_genome(parse_search_config(data))
    except ConfigError as err:  # refusing it when the search config is read is fine
        assert "tokenizer_source" in str(err)
        return
    with planned(g.decode(g.initial())) as plan:
        assert len(plan.tasks) == 39


# ----------------------------------------------------------------------------------------------
# breadcrumbs, della and model_stock genomes


@pytest.mark.parametrize("method,third", [("breadcrumbs", "gamma"), ("breadcrumbs_ties", "gamma"), ("della", "epsilon"), ("della_linear", "epsilon")])
@pytest.mark.parametrize("num_layers,granularity,filters", LAYOUTS)
def test_sparsifying_methods_layout_and_bounds(method, third, num_layers, granularity, filters):
    g = make(num_layers, merge_method=method, models=[A, B, C], layer_granularity=granularity, filters=filters)
    assert METHOD_PARAMS[method] == ("weight", "density", third)
    groups = num_layers // granularity if granularity else 1
    sets = len(filters or []) + 1
    assert g.size == groups * 3 * sets * 3
    names = [d.name for d in g.dimensions]
    for gi, mi, fi, p in product(range(groups), range(3), range(sets), METHOD_PARAMS[method]):
        flt = (filters or [])[fi] if fi < sets - 1 else "all"
        assert names[index(g, gi, mi, fi, p)] == f"g{gi}.{('ft_a', 'ft_b', 'ft_c')[mi]}.{p}.{flt}"
    for d in g.dimensions:
        kind = d.name.split(".")[2]
        bounds = (d.low, d.high, d.initial)
        if kind == "density":
            assert bounds == ((0.1, 0.9, 0.9) if method.startswith("della") else (0.05, 1.0, 1.0))
        elif kind == "epsilon":
            assert bounds == (0.0, 0.09, 0.05)
        elif kind == "gamma":
            assert bounds == (0.0, 0.1, 0.01)


def test_della_bounds_keep_every_proposal_valid():
    """density +/- epsilon inside (0, 1) at the corners of the box, as DELLA requires."""
    for density in (DELLA_DENSITY.low, DELLA_DENSITY.high):
        for eps in (DELLA_EPSILON.low, DELLA_EPSILON.high):
            assert 0 < density - eps and density + eps < 1
    assert GAMMA.high == 0.1


@pytest.mark.parametrize("method", SPARSIFY_METHODS)
def test_sparsifying_methods_round_trip_and_fixed_parameters(method):
    g = make(4, merge_method=method, layer_granularity=2, filters=["mlp"])
    for seed in range(3):
        x = random_x(g, seed)
        assert g.encode(g.decode(x)) == x
    cfg = g.decode(g.initial())
    assert cfg.parameters == {"normalize": 1.0 if method == "della" else 0.0, "int8_mask": 1.0}
    assert cfg.merge_method == method


@pytest.mark.parametrize("method,third", [("della", "epsilon"), ("breadcrumbs_ties", "gamma")])
def test_planned_sparsifying_parameters_follow_the_genotype(llama_models, method, third):
    g = _genome(llama_models, merge_method=method, layer_granularity=2, filters=["mlp"])
    x = random_x(g, 5)
    a, b = str(llama_models["a"]), str(llama_models["b"])
    with planned(g.decode(x)) as plan:
        for layer in range(4):
            for tensor, fi in (("mlp.up_proj", 0), ("self_attn.v_proj", 1)):
                task = tensor_params(plan, LAYER.format(layer, tensor))
                for mi, m in enumerate((a, b)):
                    for p in ("weight", "density", third):
                        assert model_param(task, m, p) == x[index(g, layer // 2, mi, fi, p)]
        assert task.method.name == method


def _stock_index(g: MethodGenome, group: int, flt: int) -> int:
    return group * len(g.filters) + flt


@pytest.mark.parametrize("num_layers,granularity,filters", LAYOUTS)
def test_model_stock_layout(num_layers, granularity, filters):
    g = make(num_layers, merge_method="model_stock", models=[A, B, C], layer_granularity=granularity, filters=filters)
    groups = num_layers // granularity if granularity else 1
    assert g.size == groups * (len(filters or []) + 1)
    for gi in range(groups):
        for fi, f in enumerate((filters or []) + ["all"]):
            d = g.dimensions[_stock_index(g, gi, fi)]
            assert d.name == f"g{gi}.filter_wise.{f}"
            assert (d.low, d.high, d.initial) == (0.0, 1.0, 0.25)


def test_model_stock_decode_switches_per_group_and_filter():
    g = make(4, merge_method="model_stock", layer_granularity=2, filters=["mlp"])
    cfg = g.decode([0.7, 0.2, 0.49, 0.5])
    assert cfg.base_model == ref(BASE) and cfg.parameters is None
    assert len(cfg.slices) == 2
    first, second = cfg.slices
    assert [str(s.model) for s in first.sources] == [A, B, BASE]
    assert list(first.parameters["filter_wise"]) == [Conditional(value=1.0, filter="mlp"), Conditional(value=0.0)]
    assert list(second.parameters["filter_wise"]) == [Conditional(value=0.0, filter="mlp"), Conditional(value=1.0)]
    flat = make(4, merge_method="model_stock").decode([0.9])
    assert flat.parameters == {"filter_wise": 1.0} and [str(m.model) for m in flat.models] == [A, B]
    # encode gives the switch's on/off value back
    assert g.encode(cfg) == [1.0, 0.0, 0.0, 1.0]
    assert g.encode(g.decode(g.initial())) == [0.0] * 4


def test_model_stock_refusals():
    with pytest.raises(ConfigError, match="two models besides base_model"):
        parse_search_config({"genome": {"models": [BASE, A], "merge_method": "model_stock", "base_model": BASE}, "tasks": ["t"]})
    with pytest.raises(ConfigError, match="smooth"):
        parse_search_config({"genome": {"models": [A, B], "merge_method": "model_stock", "base_model": BASE, "smooth": True, "layer_granularity": 2}, "tasks": ["t"]})
    with pytest.raises(ConfigError, match="needs base_model"):
        parse_search_config({"genome": {"models": [A, B], "merge_method": "model_stock"}, "tasks": ["t"]})


def test_planned_model_stock_switch_per_group(llama_models):
    g = _genome(llama_models, merge_method="model_stock", layer_granularity=2, filters=["mlp"])
    x = [0.8, 0.1, 0.3, 0.6]  # group 0: mlp on, rest off; group 1: mlp off, rest on
    with planned(g.decode(x)) as plan:
        for layer in range(4):
            mlp = tensor_params(plan, LAYER.format(layer, "mlp.up_proj"))
            attn = tensor_params(plan, LAYER.format(layer, "self_attn.q_proj"))
            assert mlp.params["filter_wise"] == (1.0 if layer < 2 else 0.0)
            assert attn.params["filter_wise"] == (0.0 if layer < 2 else 1.0)
            assert len(mlp.inputs) == 3 and str(mlp.inputs[mlp.base_index].model) == str(llama_models["base"])
