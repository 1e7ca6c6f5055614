"""evomerge's genome additions for parameter-space searches: `merge_method` as a list (one
categorical method gene, each method with its own genes) and `model_switch` (one on/off gene per
model: off = weight exactly 0).

Layout and decode checks need no model files; the merged numbers are checked on the tiny llama
models (fixture `llama_models`) against the streaming executor, the resident one and an
independent computation.
"""

from __future__ import annotations

import random

import pytest
import torch

from evolve.config import parse_search_config
from merge_engine.config import parse_config
from merge_engine.errors import ConfigError
from search_spaces.genome import (SWITCH_ON, Differentiability, GlobalParamGenome, MethodChoiceGenome, SlerpGenome,
                                  WeightedGenome, method_genome, parameter_genome)

A, B, C, BASE = "/m/ft_a", "/m/ft_b", "/m/ft_c", "/m/base"


def definition(**genome):
    genome.setdefault("models", [A, B])
    return parse_search_config({"genome": genome, "tasks": ["t"]}).genome


def make(num_layers: int = 4, **genome):
    return parameter_genome(definition(**genome), num_layers)


def random_x(g, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [rng.uniform(d.low, d.high) for d in g.dimensions]


def error(**genome) -> str:
    with pytest.raises(ConfigError) as info:
        definition(**genome)
    return str(info.value)


def test_one_class_per_layout_and_how_each_is_differentiable():
    """method_genome picks the layout's class; linear and task arithmetic merge linearly in the
    genes, the sparsifying methods with their masks fixed; slerp, model_stock, the SVD methods
    (global parameters only) and a method list give a gradient optimiser nothing to follow."""
    expected = {"linear": (WeightedGenome, Differentiability.FULL),
                "task_arithmetic": (WeightedGenome, Differentiability.FULL),
                "ties": (WeightedGenome, Differentiability.MASKS_FIXED),
                "dare_linear": (WeightedGenome, Differentiability.MASKS_FIXED),
                "breadcrumbs": (WeightedGenome, Differentiability.MASKS_FIXED),
                "slerp": (SlerpGenome, Differentiability.NONE),
                "model_stock": (GlobalParamGenome, Differentiability.NONE),
                "tsvm": (GlobalParamGenome, Differentiability.NONE),
                "iso_c": (GlobalParamGenome, Differentiability.NONE),
                "iso_cts": (GlobalParamGenome, Differentiability.NONE)}
    for method, (cls, how) in expected.items():
        g = make(4, models=[A, B, C], merge_method=method, base_model=None if method == "linear" else BASE)
        assert type(g) is cls and g.differentiable is how, method
    choice = make(4, merge_method=["linear", "task_arithmetic"], base_model=BASE)
    assert choice.differentiable is Differentiability.NONE
    assert choice.groups == choice.choices[0].groups == ((0, 3),)


# ----------------------------------------------------------------------------------------------
# method gene


def test_method_list_layout_is_method_gene_then_each_methods_own_genes():
    g = make(4, merge_method=["linear", "ties", "slerp"], base_model=BASE, layer_granularity=2, filters=["mlp"])
    assert isinstance(g, MethodChoiceGenome)
    singles = [method_genome(definition(merge_method=m, base_model=BASE if m != "linear" else None, layer_granularity=2,
                                 filters=["mlp"]), 4) for m in ("linear", "ties", "slerp")]
    assert [s.size for s in singles] == [2 * 2 * 2, 2 * 2 * 2 * 2, 2 * (3 + 2)]
    assert g.size == 1 + 8 + 16 + 10
    first = g.dimensions[0]
    assert (first.name, first.low, first.high, first.initial) == ("method", 0.0, 3.0, 0.5)
    at = 1
    for method, single in zip(("linear", "ties", "slerp"), singles):
        for d, s in zip(g.dimensions[at : at + single.size], single.dimensions):
            assert d.name == f"{method}.{s.name}" and (d.low, d.high, d.initial) == (s.low, s.high, s.initial)
        at += single.size
    names = [d.name for d in g.dimensions]
    assert len(set(names)) == len(names)


@pytest.mark.parametrize("value,method", [(0.0, "linear"), (0.99, "linear"), (1.0, "ties"), (2.5, "slerp"),
                                          (3.0, "slerp"), (-0.2, "linear"), (7.0, "slerp")])
def test_method_gene_is_floor_clamped(value, method):
    g = make(4, merge_method=["linear", "ties", "slerp"], base_model=BASE, layer_granularity=2)
    x = random_x(g, 1)
    x[0] = value
    assert g.decode(x).merge_method == method


def test_decode_uses_only_the_picked_methods_genes():
    g = make(4, merge_method=["linear", "ties"], base_model=BASE, layer_granularity=2)
    linear = method_genome(definition(merge_method="linear", layer_granularity=2), 4)
    ties = method_genome(definition(merge_method="ties", base_model=BASE, layer_granularity=2), 4)
    x = random_x(g, 3)
    x[0] = 1.2  # ties
    assert g.decode(x) == ties.decode(x[1 + linear.size :])
    # the linear genes do not matter while ties is picked
    y = list(x)
    y[1 : 1 + linear.size] = random_x(linear, 9)
    assert g.decode(y) == g.decode(x)
    x[0] = 0.3  # linear: the base model is not a linear input
    cfg = g.decode(x)
    assert cfg == linear.decode(x[1 : 1 + linear.size])
    assert cfg.base_model is None and all(len(s.sources) == 2 for s in cfg.slices)
    assert g.decode(g.initial()).merge_method == "linear"


def test_method_list_encode_round_trip():
    g = make(4, merge_method=["ties", "dare_linear", "model_stock"], models=[A, B, C], base_model=BASE,
             layer_granularity=2, filters=["mlp"])
    for seed in range(12):
        x = random_x(g, seed)
        cfg = g.decode(x)
        y = g.encode(cfg)
        assert g.decode(y) == cfg
        i = int(x[0]) if x[0] < 3 else 2
        sub = g.choices[i]
        assert y[0] == i + 0.5
        assert y[g.offsets[i] : g.offsets[i] + sub.size] == sub.encode(cfg)
    with pytest.raises(ConfigError, match="linear"):
        g.encode(parse_config({"merge_method": "linear", "models": [{"model": A, "parameters": {"weight": 1}}]}))


@pytest.mark.parametrize(
    "genome,words",
    [
        (dict(merge_method=["linear", "ties"]), ["merge_method[1]", "ties needs base_model"]),
        (dict(merge_method=["ties", "karcher"], base_model=BASE), ["merge_method[1]", "karcher", "cannot be searched"]),
        (dict(merge_method=["ties", "ties"], base_model=BASE), ["merge_method[1]", "twice"]),
        (dict(merge_method=[]), ["merge_method", "empty"]),
        (dict(merge_method=["linear", "slerp"], smooth=True, layer_granularity=2), ["merge_method[1]", "smooth"]),
        (dict(merge_method=["ties", "model_stock"], base_model=BASE, models=[BASE, A]), ["merge_method[1]", "model_stock"]),
        (dict(merge_method="slerp", model_switch=True), ["model_switch", "slerp"]),
        (dict(merge_method=["slerp", "model_stock"], base_model=BASE, model_switch=True), ["model_switch"]),
        (dict(merge_method="ties", base_model=BASE, max_repeats=2), ["max_repeats", "layer_path"]),
        (dict(models=[A, B]), ["merge_method", "required"]),
    ],
)
def test_method_list_errors_name_the_key(genome, words):
    msg = error(**genome)
    assert msg.startswith("search.yml: genome"), msg
    for w in words:
        assert w in msg, msg


def test_linear_alone_with_an_unlisted_base_is_still_refused():
    assert "linear does not use a base model" in error(merge_method="linear", base_model=BASE)
    make(4, merge_method=["linear", "ties"], base_model=BASE)  # in a list, linear just ignores it


# ----------------------------------------------------------------------------------------------
# model switches


def test_switch_genes_follow_the_layout():
    g = make(4, merge_method="ties", base_model=BASE, layer_granularity=2, model_switch=True, models=[A, B, C])
    plain = make(4, merge_method="ties", base_model=BASE, layer_granularity=2, models=[A, B, C])
    assert g.size == plain.size + 3
    assert g.dimensions[: plain.size] == plain.dimensions
    tail = g.dimensions[plain.size :]
    assert [(d.name, d.low, d.high, d.initial) for d in tail] == [
        (f"switch.{m}", 0.0, 1.0, SWITCH_ON) for m in ("ft_a", "ft_b", "ft_c")
    ]
    assert g.decode(g.initial()) == plain.decode(plain.initial())  # all on at the start


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "dare_ties", "della"])
@pytest.mark.parametrize("layout", [dict(), dict(layer_granularity=2, filters=["mlp"]),
                                    dict(layer_granularity=1, smooth=True)])
def test_switch_off_sets_every_weight_of_the_model_to_zero(method, layout):
    base = {} if method == "linear" else {"base_model": BASE}
    g = make(4, merge_method=method, models=[A, B, C], model_switch=True, **base, **layout)
    plain = make(4, merge_method=method, models=[A, B, C], **base, **layout)
    for seed in range(5):
        x = random_x(g, seed)
        x[plain.size :] = [0.7, 0.49, 0.5]  # b off; 0.5 is on
        cfg, ref = g.decode(x), plain.decode(x[: plain.size])
        entries = list(cfg.models or []) + [s for slc in cfg.slices or [] for s in slc.sources]
        ref_entries = list(ref.models or []) + [s for slc in ref.slices or [] for s in slc.sources]
        assert len(entries) == len(ref_entries)
        for e, r in zip(entries, ref_entries):
            assert e.model == r.model
            if str(e.model) == B:
                assert e.parameters["weight"] == 0.0
                assert {k: v for k, v in e.parameters.items() if k != "weight"} == \
                       {k: v for k, v in r.parameters.items() if k != "weight"}
            else:
                assert e.parameters == r.parameters
        # encode gives the switch back; decoding that again is the same recipe
        y = g.encode(cfg)
        assert y[plain.size :] == [SWITCH_ON, 1 - SWITCH_ON, SWITCH_ON]
        assert g.decode(y) == cfg


@pytest.mark.parametrize("genes,kept", [([0.1, 0.3, 0.2], "ft_b"), ([0.2, 0.2, 0.1], "ft_a"), ([0.0, 0.0, 0.0], "ft_a")])
def test_all_switches_off_keeps_the_highest(genes, kept):
    g = make(4, merge_method="linear", models=[A, B, C], model_switch=True)
    x = [0.3, 0.5, 0.7] + genes
    cfg = g.decode(x)
    weights = {str(m.model).rsplit("/", 1)[1]: m.parameters["weight"] for m in cfg.models}
    assert [k for k, w in weights.items() if w != 0.0] == [kept]
    assert weights[kept] == x[["ft_a", "ft_b", "ft_c"].index(kept)]


def test_switches_in_a_method_list_apply_to_weighted_methods_only():
    g = make(4, merge_method=["slerp", "ties"], models=[A, B], base_model=BASE, model_switch=True)
    assert [d.name for d in g.dimensions[-2:]] == ["switch.ft_a", "switch.ft_b"]
    x = random_x(g, 2)
    x[-2:] = [0.9, 0.1]
    x[0] = 1.5  # ties: b's weight is 0
    cfg = g.decode(x)
    assert [m.parameters["weight"] == 0.0 for m in cfg.models] == [False, True]
    x[0] = 0.5  # slerp has no weights: the switches change nothing
    y = list(x)
    y[-2:] = [0.9, 0.9]
    assert g.decode(x) == g.decode(y) and g.decode(x).merge_method == "slerp"


# ----------------------------------------------------------------------------------------------
# merged numbers (tiny llama models)


def _paths(llama_models) -> dict[str, str]:
    return {k: str(v) for k, v in llama_models.items()}


def test_switched_off_model_merges_as_weight_zero(llama_models, tmp_path):
    """task_arithmetic with b switched off: every tensor equals base + w_a (a - base), and the
    streaming executor (mergekit-yaml's engine) and the resident one agree bit for bit."""
    from helpers import read_model
    from merge_engine.options import MergeOptions
    from merge_engine.resident import ResidentMerger
    from merge_engine.streaming import run_merge

    p = _paths(llama_models)
    g = parameter_genome(definition(models=[p["a"], p["b"]], base_model=p["base"], merge_method=["linear", "task_arithmetic"],
                                    model_switch=True, dtype="float32"), 4)
    x = g.initial()
    x[0] = 1.5  # task_arithmetic
    at = g.offsets[1]
    x[at : at + 2] = [0.8, 0.6]  # weights of a, b
    x[-2:] = [0.9, 0.2]  # b off
    cfg = g.decode(x)
    assert cfg.merge_method == "task_arithmetic"
    run_merge(cfg, tmp_path / "out", MergeOptions(quiet=True), config_text=cfg.to_yaml())
    streamed = read_model(tmp_path / "out")
    merger = ResidentMerger(cfg, MergeOptions(quiet=True))
    try:
        resident = merger.merged_tensors(cfg)
    finally:
        merger.close()
    base, a = read_model(llama_models["base"]), read_model(llama_models["a"])
    assert set(streamed) == set(resident) == set(base)
    for name, value in streamed.items():
        assert torch.equal(value, resident[name]), name
        torch.testing.assert_close(value, base[name] + 0.8 * (a[name] - base[name]), rtol=1e-6, atol=1e-7)


def test_dry_run_lists_method_and_switch_genes(llama_models):
    from evolve.build import build_genome
    from evolve.dry_run import dry_run_report

    p = _paths(llama_models)
    config = parse_search_config({"genome": {"models": [p["a"], p["b"]], "base_model": p["base"],
                                             "merge_method": ["ties", "slerp"], "layer_granularity": 2,
                                             "model_switch": True}, "tasks": ["t"], "budget": {"max_fevals": 30},
                                  "optimizer": "cma"})
    g = build_genome(config)
    # 1 method gene + ties 2 groups x 2 models x 2 params + slerp 2 groups x (3 scores + 1 t) + 2 switches
    assert g.size == 1 + 8 + 8 + 2
    lines = dry_run_report(config).splitlines()
    assert lines[0] == ("genome: 19 dimensions (a method gene + each method's own genes + a switch per model); "
                        "methods ties, slerp")
    assert lines[1:5] == [
        "  method gene: 1 (categorical over ties, slerp: floor of a value in [0, 2])",
        "  ties parameter genes: 8 (2 layer group(s) x 2 model(s) x 1 parameter set(s) x 2 parameter(s): weight, density)",
        "  slerp parameter genes: 8 (2 layer group(s) x (3 model choice score(s) + 1 t): t)",
        "  switch genes: 2 (one per model; below 0.5 = weight exactly 0; one model always stays on); used by ties",
    ]
    assert lines[5] == ("anchors: 3 hand-made recipe(s) scored first, counted in the budget: ties, start: weight 1/n "
                        "each; ties, weight 0.5 each, density 0.5; slerp, start")
    assert "population 12" in lines[6]  # pycma: 4 + floor(3 ln 19)


# ----------------------------------------------------------------------------------------------
# the SVD methods (evomerge extensions) in a method list


def test_svd_methods_in_a_method_list_decode_and_merge(llama_models, tmp_path):
    """`merge_method: [ties, tsvm, iso_c]`: tsvm and iso_c have global genes only (alpha, and
    tsvm's rank_share, per layer group and parameter set, bounds from the registry); each decoded
    recipe merges, and a merged weight is the method at the decoded values."""
    from helpers import read_model
    from merge_engine.methods import METHODS
    from merge_engine.methods.common import TensorContext
    from merge_engine.options import MergeOptions
    from merge_engine.streaming import run_merge

    paths = {k: str(v) for k, v in llama_models.items()}
    g = parameter_genome(definition(merge_method=["ties", "tsvm", "iso_c"], models=[paths["a"], paths["b"]],
                                    base_model=paths["base"], layer_granularity=2, filters=["mlp"]), 4)
    tsvm_dims = {d.name: d for d in g.dimensions if d.name.startswith("tsvm.")}
    assert list(tsvm_dims) == [f"tsvm.g{gr}.{p}.{f}" for gr in (0, 1) for f in ("mlp", "all") for p in ("alpha", "rank_share")]
    assert (tsvm_dims["tsvm.g0.alpha.mlp"].low, tsvm_dims["tsvm.g0.alpha.mlp"].high, tsvm_dims["tsvm.g0.alpha.mlp"].initial) == (0.0, 2.0, 1.0)
    assert tsvm_dims["tsvm.g1.rank_share.all"].initial == 0.5  # 1 / two task models
    assert [d.name for d in g.dimensions if d.name.startswith("iso_c.")] == [
        f"iso_c.g{gr}.alpha.{f}" for gr in (0, 1) for f in ("mlp", "all")]
    inputs = {k: read_model(v) for k, v in llama_models.items()}
    for i, method in enumerate(("ties", "tsvm", "iso_c")):
        x = random_x(g, 20 + i)
        x[0] = i + 0.5
        cfg = g.decode(x)
        assert cfg.merge_method == method and g.decode(g.encode(cfg)) == cfg
        out = tmp_path / method
        run_merge(cfg, out, MergeOptions(quiet=True), config_text=cfg.to_yaml())
        merged = read_model(out)
        assert len(merged) == 39
        if method == "ties":
            continue
        sub = g.choices[i]
        genes = dict(zip((d.name for d in sub.dimensions), x[g.offsets[i] : g.offsets[i] + sub.size]))
        for name, group, flt in (("model.layers.1.mlp.up_proj.weight", 0, "mlp"),
                                 ("model.layers.3.self_attn.q_proj.weight", 1, "all")):
            params = {p: genes[f"g{group}.{p}.{flt}"] for p in sub.global_params}
            spec = METHODS[method]
            tensors = [inputs[k][name].to(torch.bfloat16) for k in ("a", "b", "base")]
            want = spec.function(tensors, 2, {**spec.global_params, **params}, [{}] * 3, TensorContext(name))
            assert torch.equal(merged[name], want.to(torch.bfloat16)), (method, name)
