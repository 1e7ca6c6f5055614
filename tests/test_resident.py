"""The resident executor (merge_engine.resident.ResidentMerger): candidates decoded from a search
genome are merged into a live transformers model; every tensor must equal what the streaming
executor (`mergekit-yaml` / run_merge) writes for the same recipe, bit for bit, and only the
tensors whose inputs or parameters changed are recomputed.

The genomes are over the tiny llama models (fixture `llama_models`: base + fine-tunes a, b;
float32, 4 layers): layer_granularity 2 and a `mlp` filter, so each candidate is two slices
with conditional per-model parameters.
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evolve.config import parse_search_config
from helpers import read_model
from merge_engine.config import parse_config
from merge_engine.options import MergeOptions
from merge_engine.resident import ResidentMerger
from merge_engine.streaming import run_merge
from merge_engine.methods import METHODS as REGISTRY
from search_spaces.genome import MethodGenome, method_genome

REPO = Path(__file__).resolve().parents[1]
_VENV_CLI = Path(sys.executable).parent / "mergekit-yaml"
MERGEKIT_YAML = str(_VENV_CLI if _VENV_CLI.exists() else REPO / ".venv" / "bin" / "mergekit-yaml")

METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "slerp")
MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
OTHER = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "input_layernorm", "post_attention_layernorm")
PRE = {"model.embed_tokens.weight"}
POST = {"model.norm.weight", "lm_head.weight"}


def layer_names(layers, parts) -> set[str]:
    return {f"model.layers.{i}.{p}.weight" for i in layers for p in parts}


ALL = layer_names(range(4), MLP + OTHER) | PRE | POST
assert len(ALL) == 39


def make_genome(llama_models, method: str, dtype: str = "bfloat16", **extra) -> MethodGenome:
    paths = {k: str(v) for k, v in llama_models.items()}
    genome = {"models": [paths["a"], paths["b"]], "merge_method": method, "layer_granularity": 2,
              "filters": ["mlp"], "dtype": dtype, **extra}
    if method != "linear":
        # slerp: base not among the models joins the pool -> three models, chosen per group
        genome["base_model"] = paths["base"]
    return method_genome(parse_search_config({"genome": genome, "tasks": ["t"]}).genome, 4)


def random_x(g: MethodGenome, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [rng.uniform(d.low, d.high) for d in g.dimensions]


def index(g: MethodGenome, group: int, model: int, flt: int, param: str) -> int:
    params = REGISTRY[g.method].search.names
    return ((group * len(g.models) + model) * len(g.filters) + flt) * len(params) + params.index(param)


def streaming(tmp_path: Path, config, name: str = "out") -> dict[str, torch.Tensor]:
    out = tmp_path / name
    run_merge(config, out, MergeOptions(quiet=True, random_seed=0), config_text=config.to_yaml())
    return read_model(out)


def live_tensors(model) -> dict[str, torch.Tensor]:
    return dict(model.state_dict())


def assert_same(live: dict, ref: dict) -> None:
    assert set(live) == set(ref)
    for name, tensor in ref.items():
        got = live[name]
        assert got.shape == tensor.shape, name
        if got.dtype != tensor.dtype:
            got = got.to(tensor.dtype)
        assert torch.equal(got, tensor), f"{name}: max diff {(got.float() - tensor.float()).abs().max()}"


@pytest.fixture
def merger_factory():
    made = []

    def factory(template, **opts):
        m = ResidentMerger(template, MergeOptions(quiet=True, **opts))
        made.append(m)
        return m

    yield factory
    for m in made:
        m.close()


# ----------------------------------------------------------------------------------------------
# bit-for-bit equality with the streaming executor


@pytest.mark.parametrize("method", METHODS)
def test_live_model_equals_streaming_merge_bfloat16(llama_models, tmp_path, merger_factory, method):
    g = make_genome(llama_models, method)
    cfg = g.decode(random_x(g, 1))
    merger = merger_factory(cfg)
    model = merger.build_model(cfg)  # in the recipe's dtype: nothing is cast
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    stats = merger.apply(cfg)
    assert stats.recomputed == 39 and stats.unchanged == 0 and set(stats.changed) == ALL
    ref = streaming(tmp_path, cfg)
    assert {t.dtype for t in ref.values()} == {torch.bfloat16}
    assert_same(live_tensors(model), ref)
    # merged_tensors (no model) gives the same tensors
    assert_same(merger.merged_tensors(cfg), ref)


@pytest.mark.parametrize("method", ["ties", "dare_linear", "slerp"])
def test_live_model_equals_streaming_merge_float32(llama_models, tmp_path, merger_factory, method):
    g = make_genome(llama_models, method, dtype="float32")
    cfg = g.decode(random_x(g, 2))
    assert cfg.dtype == "float32"
    merger = merger_factory(cfg)
    model = merger.build_model(cfg)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    merger.apply(cfg)
    ref = streaming(tmp_path, cfg)
    assert {t.dtype for t in ref.values()} == {torch.float32}
    assert_same(live_tensors(model), ref)


def test_float32_live_model_holds_the_bfloat16_merge_exactly(llama_models, tmp_path, merger_factory):
    """A CPU worker evaluates in float32 while the recipe merges in bfloat16: the live tensors are
    the bfloat16 results widened exactly."""
    g = make_genome(llama_models, "dare_ties")
    cfg = g.decode(random_x(g, 3))
    merger = merger_factory(cfg)
    model = merger.build_model(cfg, dtype=torch.float32)
    merger.apply(cfg)
    ref = streaming(tmp_path, cfg)
    live = live_tensors(model)
    assert {t.dtype for t in live.values()} == {torch.float32}
    assert_same(live, ref)
    for name, tensor in ref.items():
        assert torch.equal(live[name], tensor.float())


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dare_ties", "slerp"])
def test_live_model_equals_mergekit_yaml_cli(llama_models, tmp_path, merger_factory, method):
    g = make_genome(llama_models, method)
    cfg = g.decode(random_x(g, 4))
    recipe = tmp_path / "cfg.yml"
    recipe.write_text(cfg.to_yaml())
    out = tmp_path / "out"
    proc = subprocess.run([MERGEKIT_YAML, str(recipe), str(out), "--quiet", "--random-seed", "0"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    merger = merger_factory(cfg)
    model = merger.build_model(cfg)
    merger.apply(cfg)
    assert_same(live_tensors(model), read_model(out))


def test_random_seed_reaches_dare(llama_models, tmp_path, merger_factory):
    g = make_genome(llama_models, "dare_ties")
    x = random_x(g, 5)
    for i in range(len(x)):  # low densities: DARE drops a lot, so seeds matter
        if g.dimensions[i].name.split(".")[2] == "density":
            x[i] = 0.3
    cfg = g.decode(x)
    merger = merger_factory(cfg, random_seed=7)
    model = merger.build_model(cfg)
    merger.apply(cfg)
    out = tmp_path / "seed7"
    run_merge(cfg, out, MergeOptions(quiet=True, random_seed=7))
    ref7 = read_model(out)
    assert_same(live_tensors(model), ref7)
    ref0 = streaming(tmp_path, cfg, "seed0")
    assert not torch.equal(ref0["model.layers.0.mlp.up_proj.weight"], ref7["model.layers.0.mlp.up_proj.weight"])


# ----------------------------------------------------------------------------------------------
# incremental updates


def test_same_recipe_twice_recomputes_nothing(llama_models, merger_factory):
    g = make_genome(llama_models, "ties")
    cfg = g.decode(random_x(g, 6))
    merger = merger_factory(cfg)
    model = merger.build_model(cfg)
    assert merger.apply(cfg).recomputed == 39
    before = {k: v.clone() for k, v in live_tensors(model).items()}
    again = merger.apply(cfg)
    assert (again.recomputed, again.unchanged, again.changed) == (0, 39, [])
    # an equal recipe parsed afresh (as a worker receives it) is also recognised
    again = merger.apply(parse_config(cfg.to_plain()))
    assert again.recomputed == 0
    assert_same(live_tensors(model), before)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "task_arithmetic", "linear"])
def test_changing_one_group_recomputes_only_its_tensors(llama_models, tmp_path, merger_factory, method):
    g = make_genome(llama_models, method)
    x = random_x(g, 8)
    cfg = g.decode(x)
    merger = merger_factory(cfg)
    model = merger.build_model(cfg)
    merger.apply(cfg)
    params = REGISTRY[method].search.names

    def step(changes: dict[int, float]) -> set[str]:
        for i, v in changes.items():
            x[i] = v
        stats = merger.apply(g.decode(x))
        assert len(stats.changed) == len(set(stats.changed)) == stats.recomputed
        assert stats.recomputed + stats.unchanged == 39
        return set(stats.changed)

    # one gene: group 1, model a, mlp filter, weight -> the mlp tensors of layers 2 and 3
    assert step({index(g, 1, 0, 0, "weight"): 0.123}) == layer_names((2, 3), MLP)
    # every gene of group 0 -> layers 0 and 1, and the embeddings (planned with the first slice)
    group0 = {index(g, 0, m, f, p): 0.5 + 0.01 * (m + 2 * f) for m in range(2) for f in range(2) for p in params}
    assert step(group0) == layer_names((0, 1), MLP + OTHER) | PRE
    # the catch-all of group 1 -> its non-mlp tensors, the final norm and the LM head (last slice)
    assert step({index(g, 1, 1, 1, params[-1]): 0.77}) == layer_names((2, 3), OTHER) | POST
    # the mlp set of group 0, for model b only
    assert step({index(g, 0, 1, 0, params[-1]): 0.66}) == layer_names((0, 1), MLP)
    # an unchanged candidate
    assert step({}) == set()
    assert_same(live_tensors(model), streaming(tmp_path, g.decode(x)))


def test_changing_non_layer_parameters(llama_models, tmp_path, merger_factory):
    g = make_genome(llama_models, "ties")
    cfg = g.decode(random_x(g, 9))
    merger = merger_factory(cfg)
    model = merger.build_model(cfg)
    merger.apply(cfg)

    # a global parameter every tensor reads: everything is recomputed
    plain = cfg.to_plain()
    plain["parameters"]["int8_mask"] = False
    flipped = parse_config(plain)
    stats = merger.apply(flipped)
    assert set(stats.changed) == ALL and stats.recomputed == 39
    assert_same(live_tensors(model), streaming(tmp_path, flipped, "flipped"))

    # a conditional that only the embedding matches: only the embedding is recomputed
    plain = flipped.to_plain()
    a_params = plain["slices"][0]["sources"][0]["parameters"]
    a_params["weight"] = [{"filter": "embed_tokens", "value": 0.01}] + a_params["weight"]
    embed_only = parse_config(plain)
    stats = merger.apply(embed_only)
    assert stats.changed == ["model.embed_tokens.weight"]
    # ... and one that only the LM head matches (it is planned with the last slice)
    plain = embed_only.to_plain()
    b_params = plain["slices"][-1]["sources"][1]["parameters"]
    b_params["density"] = [{"filter": "lm_head", "value": 0.2}] + b_params["density"]
    head_only = parse_config(plain)
    stats = merger.apply(head_only)
    assert stats.changed == ["lm_head.weight"]
    assert_same(live_tensors(model), streaming(tmp_path, head_only, "head"))

    # normalize off: every tensor again
    plain = head_only.to_plain()
    plain["parameters"]["normalize"] = False
    stats = merger.apply(parse_config(plain))
    assert stats.recomputed == 39


def test_slerp_changing_the_chosen_pair_recomputes_that_group(llama_models, tmp_path, merger_factory):
    g = make_genome(llama_models, "slerp")
    # per group: select base, a, b | t mlp, t other
    x = [0.9, 0.8, 0.1, 0.3, 0.6,   0.1, 0.5, 0.9, 0.4, 0.7]
    cfg = g.decode(x)
    assert len(cfg.referenced_models()) == 3
    merger = merger_factory(cfg)
    model = merger.build_model(cfg)
    merger.apply(cfg)
    # group 0: (base, a) -> (a, base): same inputs, other base -> everything in group 0 changes
    x[0:3] = [0.8, 0.9, 0.1]
    stats = merger.apply(g.decode(x))
    assert set(stats.changed) == layer_names((0, 1), MLP + OTHER) | PRE
    # group 1: t of the mlp set only
    x[8] = 0.45
    assert set(merger.apply(g.decode(x)).changed) == layer_names((2, 3), MLP)
    # group 1: pair (b, a) -> (b, base)
    x[5:8] = [0.6, 0.5, 0.9]
    assert set(merger.apply(g.decode(x)).changed) == layer_names((2, 3), MLP + OTHER) | POST
    assert_same(live_tensors(model), streaming(tmp_path, g.decode(x)))


@pytest.mark.parametrize("method", METHODS)
def test_a_then_b_equals_fresh_b(llama_models, merger_factory, method):
    g = make_genome(llama_models, method)
    xs = [random_x(g, s) for s in (10, 11, 12)]
    if method == "slerp":  # make the first recipe reference all three models
        xs[0][:3], xs[0][5:8] = [0.9, 0.8, 0.1], [0.1, 0.5, 0.9]
    cfgs = [g.decode(x) for x in xs]
    merger = merger_factory(cfgs[0])
    model = merger.build_model(cfgs[0])
    for cfg in cfgs:
        merger.apply(cfg)
    # back to the first one, then the last again: the cached inputs must be untouched
    merger.apply(cfgs[0])
    merger.apply(cfgs[2])
    fresh = merger_factory(cfgs[0])
    fresh_model = fresh.build_model(cfgs[2])
    assert fresh.apply(cfgs[2]).recomputed == 39
    assert_same(live_tensors(model), live_tensors(fresh_model))


@pytest.mark.parametrize(
    "method",
    METHODS,
)
def test_merger_built_from_the_starting_point_applies_any_candidate(llama_models, merger_factory, method):
    """What evaluators/worker.py does: build the merger and the model from genome.decode(x0), then
    apply every candidate the optimiser proposes."""
    g = make_genome(llama_models, method)
    template = g.decode(g.initial())
    merger = merger_factory(template)
    model = merger.build_model(template)
    for seed in range(20, 24):
        cfg = g.decode(random_x(g, seed))
        merger.apply(cfg)
        fresh = merger_factory(cfg)
        assert_same(live_tensors(model), fresh.merged_tensors(cfg))


def test_non_finite_candidate_fails_and_the_next_one_repairs_the_model(llama_models, merger_factory):
    """A candidate whose merge overflows raises (the worker records it as failed), and the next
    candidate recomputes the poisoned tensors even where its parameters equal an earlier one's."""
    from merge_engine.errors import ModelError

    def recipe(weight_a: float):
        return parse_config({
            "merge_method": "linear", "parameters": {"normalize": False},
            "models": [{"model": str(llama_models["a"]), "parameters": {"weight": weight_a}},
                       {"model": str(llama_models["b"]), "parameters": {"weight": 0.5}}],
        })

    good, bad = recipe(0.5), recipe(1e39)  # 1e39 is inf in float32
    merger = merger_factory(good)
    model = merger.build_model(good)
    merger.apply(good, check_finite=True)
    with pytest.raises(ModelError, match="non-finite"):
        merger.apply(bad, check_finite=True)
    assert any(not torch.isfinite(t).all() for t in live_tensors(model).values())
    stats = merger.apply(good, check_finite=True)
    assert stats.recomputed >= 1
    assert_same(live_tensors(model), merger_factory(good).merged_tensors(good))


# ----------------------------------------------------------------------------------------------
# one planner: the resident executor plans with the streaming executor's planner and its checks


def linear_recipe(llama_models, weights=(0.5, 0.5), **extra):
    return parse_config({
        "merge_method": "linear",
        "models": [{"model": str(llama_models[k]), "parameters": {"weight": w}} for k, w in zip("ab", weights)],
        **extra,
    })


def test_resident_plan_is_the_streaming_plan(llama_models, merger_factory):
    """Same tasks (inputs, parameters, shapes, dtypes), output config and chat template as
    build_plan, the planner of mergekit-yaml."""
    from merge_engine.chat_templates import BUNDLED
    from merge_engine.plan import build_plan
    from merge_engine.resident import _task_key

    config = linear_recipe(llama_models, chat_template="chatml", dtype="bfloat16")
    resident = merger_factory(config).plan(config)
    streamed = build_plan(config)
    try:
        assert [_task_key(t) for t in resident.tasks] == [_task_key(t) for t in streamed.tasks]
        assert [t.out for t in resident.tasks] == [t.out for t in streamed.tasks]
        assert resident.out_config == streamed.out_config
        assert resident.chat_template == streamed.chat_template == BUNDLED["chatml"]
        assert resident.donor == streamed.donor and resident.architecture.name == streamed.architecture.name
    finally:
        streamed.close()


def test_resident_checks_the_base_model_of_every_candidate(llama_models, merger_factory):
    from merge_engine.errors import ConfigError

    merger = merger_factory(linear_recipe(llama_models))
    candidate = parse_config({
        "merge_method": "ties",
        "models": [{"model": str(llama_models[k]), "parameters": {"weight": 0.5, "density": 0.5}} for k in "ab"],
    })
    with pytest.raises(ConfigError, match="merge_method ties needs base_model"):
        merger.plan(candidate)


def test_resident_checks_the_chat_template(llama_models, merger_factory):
    from merge_engine.errors import ConfigError

    with pytest.raises(ConfigError, match="chat_template: 'my template'"):
        merger_factory(linear_recipe(llama_models, chat_template="my template"))
    merger = merger_factory(linear_recipe(llama_models))
    with pytest.raises(ConfigError, match="chat_template"):
        merger.plan(linear_recipe(llama_models, chat_template="not a template"))


def test_candidates_reuse_tokenizers_vocabulary_and_chat_template(llama_models, merger_factory, monkeypatch):
    """Per-candidate planning stays cheap: each model's tokenizer is loaded once, the built
    vocabulary and the `auto` chat template once per tokenizer setting, whatever the number of
    candidates."""
    import merge_engine.tokenizer as tokenizer_module

    loaded = []
    real = tokenizer_module.load_tokenizer

    def counting(directory, label, required=False):
        loaded.append(label)
        return real(directory, label, required)

    monkeypatch.setattr(tokenizer_module, "load_tokenizer", counting)
    extra = {"tokenizer_source": "union", "chat_template": "auto"}
    template = linear_recipe(llama_models, **extra)
    merger = merger_factory(template)
    merger.build_model(template)
    plans = []
    for w in (0.2, 0.4, 0.6):
        candidate = linear_recipe(llama_models, (w, 1 - w), **extra)
        assert merger.apply(candidate).recomputed > 0
        plans.append(merger.plan(candidate))
    assert sorted(loaded) == sorted(str(llama_models[k]) for k in "ab")
    assert plans[0].vocab is plans[1].vocab is plans[2].vocab is merger.vocab(template)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_all_finite_agrees_with_the_entrywise_check(dtype):
    from merge_engine.resident import all_finite

    big = torch.finfo(dtype).max
    cases = {
        "plain": torch.randn(1000).to(dtype),
        "nan": torch.randn(1000).to(dtype).index_fill_(0, torch.tensor([17]), float("nan")),
        "inf": torch.randn(1000).to(dtype).index_fill_(0, torch.tensor([3]), float("inf")),
        "both infinities": torch.tensor([float("inf"), float("-inf"), 1.0]).to(dtype),
        "sum overflows, entries finite": torch.full((8,), big, dtype=dtype),
        "empty": torch.zeros(0, dtype=dtype),
    }
    for name, t in cases.items():
        assert all_finite(t) == bool(torch.isfinite(t).all()), name
    assert all_finite(cases["sum overflows, entries finite"]) and not all_finite(cases["both infinities"])
    assert all_finite(torch.arange(5))  # integer tensors are finite by construction
