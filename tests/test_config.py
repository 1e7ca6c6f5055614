"""mergekit YAML parsing (docs/mergekit-reference.md §1): schema, model references, parameter settings, precedence,
gradients, base-model expansion, unknown keys, error messages with key paths, to_yaml round trip.

Planning-level behaviour is read from `merge_engine.plan.build_plan` task parameters on the tiny
llama models; a few checks go through a real merge.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml

from helpers import read_model, write_yaml

from merge_engine.config import (
    Conditional,
    MergeConfig,
    ModelPath,
    ModelReference,
    evaluate_setting,
    load_config,
    parse_config,
)
from merge_engine.errors import ConfigError

MERGEKIT_YAML = Path(sys.executable).parent / "mergekit-yaml"


def cfg(text: str) -> MergeConfig:
    return parse_config(yaml.safe_load(text), "cfg.yml")


def config_error(data) -> str:
    if isinstance(data, str):
        data = yaml.safe_load(data)
    with pytest.raises(ConfigError) as info:
        parse_config(data, "cfg.yml")
    return str(info.value)


@contextmanager
def planned(text: str):
    from merge_engine.plan import build_plan

    plan = build_plan(cfg(text))
    try:
        yield plan
    finally:
        plan.close()


def plan_error(text: str) -> str:
    from merge_engine.plan import build_plan

    with pytest.raises(ConfigError) as info:
        plan = build_plan(cfg(text))
        plan.close()
    return str(info.value)


def tasks_by_name(plan):
    return {t.out.name: t for t in plan.tasks}


def model_param(task, model_path, name):
    """The per-model parameter `name` of the input coming from `model_path`."""
    hits = [mp[name] for inp, mp in zip(task.inputs, task.model_params) if str(inp.model) == str(model_path)]
    assert len(hits) == 1, (task.out.name, model_path, task.inputs)
    return hits[0]


def run(tmp_path, config: MergeConfig, name="out"):
    from merge_engine.options import MergeOptions
    from merge_engine.streaming import run_merge

    run_merge(config, tmp_path / name, MergeOptions(quiet=True))
    return read_model(tmp_path / name)


# ----------------------------------------------------------------------------------------------
# Top-level schema (docs/mergekit-reference.md §1)

FULL = """
merge_method: ties
base_model: org/base@main
models:
  - model: org/a+org/lora-x@v2
    parameters:
      weight: [0, 0.5, 1]
      density:
        - filter: mlp
          value: 0.5
        - value: [0.2, 0.3]
  - model:
      model: {path: org/b, revision: r1}
      override_architecture: MistralForCausalLM
    parameters:
      weight: true
      density: 1
parameters:
  normalize: false
  int8_mask: "1"
  lambda: 2
dtype: torch.bfloat16
out_dtype: float16
tokenizer:
  source: union
  pad_to_multiple_of: 64
chat_template: chatml
"""


def test_every_top_level_field_parses():
    c = cfg(FULL)
    assert c.merge_method == "ties"
    assert c.base_model == ModelReference(ModelPath("org/base", "main"))
    assert [str(m.model) for m in c.models] == ["org/a+org/lora-x@v2", "org/b@r1"]
    assert c.models[0].model.lora == ModelPath("org/lora-x", "v2")
    assert c.models[1].model.override_architecture == "MistralForCausalLM"
    assert c.models[0].parameters["weight"] == (0.0, 0.5, 1.0)
    assert c.models[0].parameters["density"] == (Conditional(0.5, "mlp"), Conditional((0.2, 0.3), None))
    assert c.models[1].parameters == {"weight": 1.0, "density": 1.0}
    assert c.parameters == {"normalize": 0.0, "int8_mask": 1.0, "lambda": 2.0}
    assert all(type(v) is float for v in c.parameters.values())
    assert c.dtype == "bfloat16" and c.out_dtype == "float16"
    assert c.tokenizer.source == "union" and c.tokenizer.pad_to_multiple_of == 64
    assert c.tokenizer_source is None
    assert c.chat_template == "chatml"
    assert c.slices is None and c.modules is None
    assert c.referenced_models()[0] == c.base_model  # base first, then config order
    assert [str(r) for r in c.referenced_models()] == ["org/base@main", "org/a+org/lora-x@v2", "org/b@r1"]


def test_slices_and_modules_schema():
    c = cfg(
        """
merge_method: slerp
slices:
  - sources:
      - model: a
        layer_range: [0, 4]
        parameters: {t: 0.1}
      - model: b
        layer_range: [2, 6]
    base_model: b
    residual_weight: 0.3
    parameters:
      t: [0, 1]
tokenizer_source: base
"""
    )
    s = c.slices[0]
    assert s.sources[0].layer_range == (0, 4) and s.sources[1].layer_range == (2, 6)
    assert s.base_model == ModelReference.parse("b")
    assert s.residual_weight == 0.3
    assert s.parameters == {"t": (0.0, 1.0)}
    assert s.sources[0].parameters == {"t": 0.1}
    assert c.tokenizer_source == "base"

    c = cfg(
        """
merge_method: linear
modules:
  decoder:
    models:
      - model: a
        parameters: {weight: 1}
    parameters: {normalize: 0}
"""
    )
    assert list(c.modules) == ["decoder"]
    assert c.modules["decoder"].parameters == {"normalize": 0.0}
    assert str(c.modules["decoder"].models[0].model) == "a"


@pytest.mark.parametrize(
    "text,expected",
    [
        ("bfloat16", "bfloat16"),
        ("torch.bfloat16", "bfloat16"),
        ("float16", "float16"),
        ("torch.float16", "float16"),
        ("float32", "float32"),
        ("torch.float32", "float32"),
        ("int64", "int64"),
        ("bf16", "bfloat16"),  # accepted here (mergekit rejects it): documented leniency
        ("", None),
        (None, None),
    ],
)
def test_dtype_names(text, expected):
    c = parse_config({"merge_method": "linear", "models": [{"model": "a"}], "dtype": text, "out_dtype": text})
    assert c.dtype == expected and c.out_dtype == expected


@pytest.mark.parametrize("key", ["dtype", "out_dtype"])
@pytest.mark.parametrize("bad", ["float8", "int8", "bfloat", 16])
def test_bad_dtype_names(key, bad):
    msg = config_error({"merge_method": "linear", "models": [{"model": "a"}], key: bad})
    assert f"cfg.yml: {key}:" in msg


# ----------------------------------------------------------------------------------------------
# Model references (docs/mergekit-reference.md §1)


@pytest.mark.parametrize(
    "text,path,rev,lora,lora_rev",
    [
        ("org/model", "org/model", None, None, None),
        ("org/model@main", "org/model", "main", None, None),
        ("/abs/dir", "/abs/dir", None, None, None),
        ("org/model+org/adapter", "org/model", None, "org/adapter", None),
        ("org/model@r1+org/adapter@r2", "org/model", "r1", "org/adapter", "r2"),
        ("./rel/model+lora@abc123", "./rel/model", None, "lora", "abc123"),
    ],
)
def test_model_reference_parse_and_str_round_trip(text, path, rev, lora, lora_rev):
    ref = ModelReference.parse(text)
    assert ref.model == ModelPath(path, rev)
    assert ref.lora == (ModelPath(lora, lora_rev) if lora else None)
    assert str(ref) == text
    assert ModelReference.parse(str(ref)) == ref
    assert hash(ModelReference.parse(text)) == hash(ref)  # hashable, compared structurally
    assert {ref: 1}[ModelReference.parse(text)] == 1


def test_model_reference_dict_form():
    ref = ModelReference.parse({"model": {"path": "org/m", "revision": "r"}, "lora": "org/l@x", "override_architecture": "LlamaForCausalLM"})
    assert ref.model == ModelPath("org/m", "r") and ref.lora == ModelPath("org/l", "x")
    assert ref.override_architecture == "LlamaForCausalLM"
    assert str(ref) == "org/m@r+org/l@x"
    assert ModelReference.parse({"model": "org/m"}) == ModelReference.parse("org/m")
    # override_architecture is part of the identity
    assert ref != ModelReference.parse("org/m@r+org/l@x")


@pytest.mark.parametrize("bad", ["a+b+c", "a@b@c", "a+b@c@d", "@rev", "", {"path": "x"}, 42])
def test_model_reference_errors(bad):
    with pytest.raises(ValueError):
        ModelReference.parse(bad)


@pytest.mark.parametrize(
    "data,path",
    [
        ({"merge_method": "linear", "models": [{"model": "a+b+c"}]}, "models[0].model"),
        ({"merge_method": "linear", "models": [{"model": "a"}, {"model": "x@1@2"}]}, "models[1].model"),
        ({"merge_method": "linear", "models": [{"model": "a"}], "base_model": "x@1@2"}, "base_model"),
        (
            {"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": [0, 1]}, {"model": "p+q+r", "layer_range": [0, 1]}]}]},
            "slices[0].sources[1].model",
        ),
    ],
)
def test_model_reference_errors_name_the_key(data, path):
    msg = config_error(data)
    assert f"cfg.yml: {path}:" in msg
    assert "'+'" in msg or "'@'" in msg


# ----------------------------------------------------------------------------------------------
# Parameter values (docs/mergekit-reference.md §1)


def _param(value):
    c = parse_config({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": value}}]})
    return c.models[0].parameters["weight"]


def test_parameter_value_shapes_and_coercion():
    assert _param(0.5) == 0.5
    assert _param(2) == 2.0 and type(_param(2)) is float
    assert _param(True) == 1.0 and _param(False) == 0.0
    assert type(_param(False)) is float
    assert _param("0.25") == 0.25
    # PyYAML reads `1e-3` (no dot) as a string: it must still become a number
    assert cfg("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1e-3}\n").models[0].parameters["weight"] == 0.001
    assert _param([0, 1, 0.5]) == (0.0, 1.0, 0.5)
    assert _param([True, 3]) == (1.0, 3.0)
    assert _param([{"filter": "mlp", "value": 1}, {"value": [0, 1]}]) == (Conditional(1.0, "mlp"), Conditional((0.0, 1.0), None))
    # a bare {value, filter} mapping is accepted as a one-entry conditional list
    assert _param({"filter": "mlp", "value": 0.5}) == (Conditional(0.5, "mlp"),)
    assert _param({"value": 0.5}) == (Conditional(0.5, None),)


@pytest.mark.parametrize(
    "value,msg",
    [
        ("abc", "expected a number"),
        ([0, "x"], "expected a number"),
        ([], "at least one value"),
        ([{"value": 1}, 2], "only numbers or only"),
        ([{"filter": "mlp"}], "needs a 'value'"),
        ([{"value": 1, "filter": 3}], "filter must be a string"),
        ([{"value": 1, "flter": "mlp"}], "flter"),
        ({"value": "big"}, "expected a number"),
        (None, "expected a number"),
    ],
)
def test_parameter_value_errors_name_the_key_path(value, msg):
    data = {
        "merge_method": "linear",
        "models": [{"model": "a", "parameters": {"weight": 1}}, {"model": "b", "parameters": {"weight": value}}],
    }
    err = config_error(data)
    assert err.startswith("cfg.yml: models[1].parameters.weight:"), err
    assert msg in err


def test_parameter_errors_at_every_level_name_the_key_path():
    base = {"merge_method": "slerp"}
    slices = [{"sources": [{"model": "a", "layer_range": [0, 2]}], "parameters": {"t": "x"}}]
    assert "slices[0].parameters.t:" in config_error({**base, "slices": slices})
    slices = [{"sources": [{"model": "a", "layer_range": [0, 2]}, {"model": "b", "layer_range": [0, 2], "parameters": {"t": [{"value": "q"}]}}]}]
    assert "slices[0].sources[1].parameters.t:" in config_error({**base, "slices": slices})
    assert "parameters.t:" in config_error({**base, "models": [{"model": "a"}], "parameters": {"t": "x"}})
    modules = {"decoder": {"models": [{"model": "a"}], "parameters": {"t": "nope"}}}
    assert "modules.decoder.parameters.t:" in config_error({**base, "modules": modules})


def test_evaluate_setting_scalar_gradient_conditional():
    assert evaluate_setting(0.3, "x", 0.7) == 0.3
    g = (0.0, 1.0, 0.5)
    assert evaluate_setting(g, "x", 0.0) == 0.0
    assert evaluate_setting(g, "x", 0.5) == 1.0
    assert evaluate_setting(g, "x", 1.0) == 0.5
    assert evaluate_setting(g, "x", 0.25) == pytest.approx(0.5)
    assert evaluate_setting(g, "x", 0.75) == pytest.approx(0.75)
    assert evaluate_setting((0.4,), "x", 0.9) == 0.4
    # 5-point gradient at t = 1/3: s = 4/3, between g[1] and g[2] at 1/3
    assert evaluate_setting((0.0, 0.9, 0.3, 0.6, 0.0), "x", 1 / 3) == pytest.approx(0.9 * 2 / 3 + 0.3 / 3)

    cond = (Conditional(0.1, "self_attn"), Conditional((0.0, 1.0), "mlp"), Conditional(0.9, "self_attn.q"), Conditional(0.5, None))
    assert evaluate_setting(cond, "model.layers.0.self_attn.q_proj.weight", 0.5) == 0.1  # first match wins
    assert evaluate_setting(cond, "model.layers.0.mlp.up_proj.weight", 0.25) == 0.25  # gradient inside
    assert evaluate_setting(cond, "model.norm.weight", 0.3) == 0.5  # null filter matches all
    # plain substring, no glob/regex
    only = (Conditional(1.0, "layers.1."),)
    assert evaluate_setting(only, "model.layers.1.mlp.up_proj.weight", 0) == 1.0
    assert evaluate_setting(only, "model.layers.10.mlp.up_proj.weight", 0) is None
    assert evaluate_setting((Conditional(1.0, "layers.1"),), "model.layers.10.mlp.up_proj.weight", 0) == 1.0
    assert evaluate_setting((Conditional(1.0, "m*p"),), "model.layers.0.mlp.up_proj.weight", 0) is None
    assert evaluate_setting((Conditional(1.0, "*"),), "anything", 0) == 1.0
    assert evaluate_setting((Conditional(1.0, "mlp"),), "model.norm.weight", 0) is None  # no match -> none


# ----------------------------------------------------------------------------------------------
# Precedence (docs/mergekit-reference.md §1), through the planner


def test_precedence_source_over_slice_over_top_level(llama_models):
    m = llama_models
    with planned(
        f"""
merge_method: task_arithmetic
base_model: {m['base']}
slices:
  - sources:
      - model: {m['a']}
        layer_range: [0, 4]
        parameters:
          weight:
            - filter: mlp
              value: 0.1
          lambda: 5.0
      - model: {m['b']}
        layer_range: [0, 4]
      - model: {m['base']}
        layer_range: [0, 4]
    parameters:
      weight: 0.2
      lambda: 0.5
parameters:
  weight: 0.3
  density: 0.7
  lambda: 0.9
  normalize: true
"""
    ) as plan:
        tasks = tasks_by_name(plan)
        assert len(tasks) == 3 + 4 * 9
        for name, task in tasks.items():
            assert model_param(task, m["a"], "weight") == (0.1 if "mlp" in name else 0.2), name
            assert model_param(task, m["b"], "weight") == 0.2
            assert model_param(task, m["base"], "weight") == 0.2  # the base is looked up too
            assert all(mp["density"] == 0.7 for mp in task.model_params)
            # a global parameter under a source is ignored: slice beats top level
            assert task.params["lambda"] == 0.5
            assert task.params["normalize"] == 1.0
            assert task.params["int8_mask"] is False and task.params["rescale"] is False  # defaults
            assert task.base_index == 2


def test_precedence_module_level(llama_models):
    m = llama_models
    text = f"""
merge_method: linear
modules:
  decoder:
    slices:
      - sources:
          - model: {m['a']}
            layer_range: [0, 4]
            parameters: {{weight: 0.1}}
          - model: {m['b']}
            layer_range: [0, 4]
        SLICE_PARAMS
    parameters:
      weight: 0.25
      normalize: false
parameters:
  weight: 0.3
  normalize: true
"""
    with planned(text.replace("SLICE_PARAMS", "")) as plan:
        for task in plan.tasks:
            assert model_param(task, m["a"], "weight") == 0.1
            assert model_param(task, m["b"], "weight") == 0.25  # module beats top level
            assert task.params["normalize"] == 0.0
    with planned(text.replace("SLICE_PARAMS", "parameters: {weight: 0.4, normalize: 1}")) as plan:
        for task in plan.tasks:
            assert model_param(task, m["b"], "weight") == 0.4  # slice beats module
            assert task.params["normalize"] == 1.0


def test_global_parameters_are_not_read_from_model_entries(llama_models):
    m = llama_models
    text = f"""
merge_method: slerp
base_model: {m['base']}
models:
  - model: {m['base']}
    parameters: {{t: 0.9}}
  - model: {m['a']}
    parameters: {{t: 0.8}}
"""
    with planned(text + "parameters: {t: 0.2}\n") as plan:
        assert {task.params["t"] for task in plan.tasks} == {0.2}
    msg = plan_error(text)
    assert "'t'" in msg and "missing required parameter" in msg


def test_per_model_filters_use_input_names_and_global_filters_output_names(llama_models):
    m = llama_models
    with planned(
        f"""
merge_method: slerp
slices:
  - sources:
      - model: {m['base']}
        layer_range: [2, 4]
      - model: {m['a']}
        layer_range: [2, 4]
    base_model: {m['base']}
parameters:
  t:
    - filter: layers.0.
      value: 0.1
    - value: 0.9
"""
    ) as plan:
        tasks = tasks_by_name(plan)
        assert plan.out_num_layers == 2
        # output layer 0 comes from input layer 2; the global filter sees the output name
        q0 = tasks["model.layers.0.self_attn.q_proj.weight"]
        assert [i.tensor_name for i in q0.inputs] == ["model.layers.2.self_attn.q_proj.weight"] * 2
        assert q0.params["t"] == 0.1
        assert tasks["model.layers.1.self_attn.q_proj.weight"].params["t"] == 0.9
    with planned(
        f"""
merge_method: passthrough
slices:
  - sources:
      - model: {m['a']}
        layer_range: [2, 4]
        parameters:
          scale:
            - filter: layers.2.
              value: 0.5
"""
    ) as plan:
        tasks = tasks_by_name(plan)
        # per-model parameters see the input name (layers.2 -> output layer 0)
        assert tasks["model.layers.0.mlp.up_proj.weight"].model_params == [{"scale": 0.5}]
        assert tasks["model.layers.1.mlp.up_proj.weight"].model_params == [{"scale": None}]


def test_same_model_twice_in_a_slice_keeps_each_sources_parameters(llama_models):
    m = llama_models
    with planned(
        f"""
merge_method: linear
slices:
  - sources:
      - model: {m['a']}
        layer_range: [0, 2]
        parameters: {{weight: 0.3}}
      - model: {m['a']}
        layer_range: [2, 4]
        parameters: {{weight: 0.7}}
"""
    ) as plan:
        task = tasks_by_name(plan)["model.layers.0.self_attn.q_proj.weight"]
        assert [i.tensor_name for i in task.inputs] == [
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.2.self_attn.q_proj.weight",
        ]
        assert [mp["weight"] for mp in task.model_params] == [0.3, 0.7]


# ----------------------------------------------------------------------------------------------
# Gradients over layers (docs/mergekit-reference.md §1)


def test_gradient_t_per_slice_and_pre_post_at_t0(llama_models):
    m = llama_models
    with planned(
        f"""
merge_method: linear
slices:
  - sources:
      - model: {m['a']}
        layer_range: [0, 2]
        parameters: {{weight: [0.0, 1.0]}}
      - model: {m['b']}
        layer_range: [0, 2]
        parameters: {{weight: 1}}
  - sources:
      - model: {m['a']}
        layer_range: [2, 3]
        parameters: {{weight: [0.5, 0.7]}}
      - model: {m['b']}
        layer_range: [2, 3]
        parameters: {{weight: 1}}
  - sources:
      - model: {m['a']}
        layer_range: [3, 4]
        parameters: {{weight: [0.2, 0.4, 0.6]}}
      - model: {m['b']}
        layer_range: [3, 4]
        parameters: {{weight: 1}}
"""
    ) as plan:
        tasks = tasks_by_name(plan)
        w = lambda name: model_param(tasks[name], m["a"], "weight")  # noqa: E731
        # slice 1 (2 layers): t = 0, 1; slice 2 and 3 have one layer: t = 1 (last value)
        assert w("model.layers.0.mlp.up_proj.weight") == 0.0
        assert w("model.layers.1.mlp.up_proj.weight") == 1.0
        assert w("model.layers.2.mlp.up_proj.weight") == 0.7
        assert w("model.layers.3.mlp.up_proj.weight") == 0.6
        # pre-layer weights: first slice at t = 0; post-layer weights: last slice at t = 0
        assert w("model.embed_tokens.weight") == 0.0
        assert w("model.norm.weight") == pytest.approx(0.2)
        assert w("lm_head.weight") == pytest.approx(0.2)
        assert plan.out_num_layers == 4


def test_gradient_over_models_syntax_layers(llama_models, tmp_path):
    m = llama_models
    text = f"""
merge_method: linear
models:
  - model: {m['a']}
    parameters:
      weight: [1.0, 0.0, 2.0]
  - model: {m['b']}
    parameters:
      weight: 1.0
parameters:
  normalize: false
"""
    expected = {0: 1.0, 1: 1 / 3, 2: 2 / 3, 3: 2.0}  # t = i/3 over [1, 0, 2]
    with planned(text) as plan:
        tasks = tasks_by_name(plan)
        for i, value in expected.items():
            assert model_param(tasks[f"model.layers.{i}.self_attn.o_proj.weight"], m["a"], "weight") == pytest.approx(value)
        for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
            assert model_param(tasks[name], m["a"], "weight") == 1.0
    # and in the merged tensors (normalize off: out = w_a * a + b)
    out = run(tmp_path, cfg(text))
    a, b = read_model(m["a"]), read_model(m["b"])
    for i, value in expected.items():
        name = f"model.layers.{i}.self_attn.o_proj.weight"
        torch.testing.assert_close(out[name], value * a[name] + b[name], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out["lm_head.weight"], a["lm_head.weight"] + b["lm_head.weight"])


# ----------------------------------------------------------------------------------------------
# models: expansion and base_model (docs/mergekit-reference.md §1)


def test_base_model_appended_when_missing_from_models(llama_models):
    m = llama_models
    with planned(
        f"""
merge_method: task_arithmetic
base_model: {m['base']}
models:
  - model: {m['a']}
    parameters: {{weight: 0.5}}
  - model: {m['b']}
    parameters: {{weight: 0.6}}
"""
    ) as plan:
        for task in plan.tasks:
            assert [str(i.model) for i in task.inputs] == [str(m["a"]), str(m["b"]), str(m["base"])]
            assert task.base_index == 2
            assert [mp["weight"] for mp in task.model_params] == [0.5, 0.6, None]
    with planned(
        f"""
merge_method: task_arithmetic
base_model: {m['base']}
models:
  - model: {m['a']}
    parameters: {{weight: 0.5}}
  - model: {m['base']}
"""
    ) as plan:
        for task in plan.tasks:  # listed: not duplicated, keeps its position
            assert [str(i.model) for i in task.inputs] == [str(m["a"]), str(m["base"])]
            assert task.base_index == 1


def test_linear_with_unlisted_base_needs_a_weight_for_it(llama_models):
    m = llama_models
    text = f"""
merge_method: linear
base_model: {m['base']}
models:
  - model: {m['a']}
    parameters: {{weight: 0.5}}
  - model: {m['b']}
    parameters: {{weight: 0.5}}
"""
    msg = plan_error(text)
    assert "weight" in msg and str(m["base"]) in msg
    with planned(text + "parameters: {weight: 0.25}\n") as plan:
        for task in plan.tasks:  # the base is an input and takes the top-level weight
            assert [mp["weight"] for mp in task.model_params] == [0.5, 0.5, 0.25]


# ----------------------------------------------------------------------------------------------
# Validation (docs/mergekit-reference.md §1): errors name the key path


@pytest.mark.parametrize(
    "data,expected",
    [
        ({"models": [{"model": "a"}]}, "missing required key 'merge_method'"),
        ({"merge_method": "nope", "models": [{"model": "a"}]}, "merge_method: unknown merge method 'nope'"),
        ({"merge_method": "linear"}, "exactly one of 'models', 'slices' or 'modules'"),
        (
            {"merge_method": "linear", "models": [{"model": "a"}], "slices": [{"sources": [{"model": "a", "layer_range": [0, 1]}]}]},
            "exactly one of 'models', 'slices' or 'modules'",
        ),
        ({"merge_method": "linear", "models": []}, "exactly one of"),
        ({"merge_method": "linear", "models": "a"}, "models:"),
        ({"merge_method": "linear", "models": [{"parameters": {"weight": 1}}]}, "models[0].model"),
        ({"merge_method": "linear", "models": [{"model": "a"}], "tokenizer_source": "base", "tokenizer": {"source": "base"}}, "tokenizer_source"),
        ({"merge_method": "linear", "modules": {"decoder": {"parameters": {"weight": 1}}}}, "modules.decoder:"),
        (
            {"merge_method": "linear", "modules": {"decoder": {"models": [{"model": "a"}], "slices": [{"sources": [{"model": "a", "layer_range": [0, 1]}]}]}}},
            "modules.decoder:",
        ),
        ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": [3, 1]}]}]}, "slices[0].sources[0].layer_range:"),
        ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": [-1, 1]}]}]}, "slices[0].sources[0].layer_range:"),
        ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": [0, 1, 2]}]}]}, "slices[0].sources[0].layer_range:"),
        ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": [0, 1.5]}]}]}, "slices[0].sources[0].layer_range"),
        ({"merge_method": "passthrough", "slices": [{"sources": []}]}, "slices[0].sources:"),
        ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": [0, 1]}], "residual_weight": "x"}]}, "slices[0].residual_weight:"),
        ({"merge_method": "linear", "models": [{"model": "a"}], "tokenizer": {"pad_to_multiple_of": 0}}, "tokenizer.pad_to_multiple_of:"),
        ({"merge_method": "linear", "models": [{"model": "a"}], "chat_template": 5}, "chat_template:"),
        ({"merge_method": "linear", "models": [{"model": "a"}], "parameters": "x"}, "parameters:"),
        (["merge_method", "linear"], "must be a YAML mapping"),
    ],
)
def test_config_errors(data, expected):
    msg = config_error(data)
    assert msg.startswith("cfg.yml")
    assert expected in msg, msg


def test_load_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yml")
    bad = write_yaml(tmp_path / "bad.yml", "merge_method: linear\nmodels:\n  - model: a\n   parameters: [\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert "malformed YAML" in str(info.value) and "line" in str(info.value) and "bad.yml" in str(info.value)
    good = write_yaml(tmp_path / "good.yml", "merge_method: linear\nmodels:\n  - model: a\n")
    config, text = load_config(good)
    assert config.merge_method == "linear" and text == good.read_text()


def test_plan_time_errors_name_the_key(llama_models):
    m = llama_models
    msg = plan_error(
        f"""
merge_method: passthrough
slices:
  - sources:
      - model: {m['a']}
        layer_range: [0, 2]
  - sources:
      - model: {m['a']}
        layer_range: [2, 6]
"""
    )
    assert "slices[1].sources[0].layer_range" in msg
    msg = plan_error(
        f"""
merge_method: linear
slices:
  - sources:
      - model: {m['a']}
        layer_range: [0, 2]
        parameters: {{weight: 1}}
      - model: {m['b']}
        layer_range: [0, 3]
        parameters: {{weight: 1}}
"""
    )
    assert "slices[0]" in msg and "same number of layers" in msg
    msg = plan_error(
        f"""
merge_method: linear
models:
  - model: {m['a']}
    parameters: {{weight: 1}}
  - model: {m['b']}
"""
    )
    assert "'weight'" in msg and str(m["b"]) in msg
    msg = plan_error(f"merge_method: ties\nmodels:\n  - model: {m['a']}\n    parameters: {{weight: 1}}\n")
    assert "base_model" in msg
    msg = plan_error(f"merge_method: linear\nmodels:\n  - model: {m['a']}\n    parameters: {{weight: .nan}}\n")
    assert "NaN" in msg and "weight" in msg


def test_cli_config_error_is_one_line_with_key_path(tmp_path):
    bad = write_yaml(
        tmp_path / "bad.yml",
        "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1}\n  - model: b\n    parameters: {weight: heavy}\n",
    )
    proc = subprocess.run([str(MERGEKIT_YAML), str(bad), str(tmp_path / "out"), "--quiet"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "models[1].parameters.weight" in lines[0]
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# Unknown keys: a warning naming the key path, and the merge still runs


def test_unknown_keys_warn_with_path_and_still_run(llama_models, tmp_path, caplog):
    m = llama_models
    text = f"""
merge_method: linear
embed_slerp: true
models:
  - model: {m['a']}
    weight: 3
    parameters:
      weight: 0.5
      embed_slerp: true
  - model: {m['b']}
    parameters:
      weight: 0.5
parameters:
  normalize: true
tokenizer:
  source: base
  colour: blue
"""
    with caplog.at_level(logging.WARNING):
        config = cfg(text)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("'embed_slerp'" in w for w in warned)
    assert any("'models[0].weight'" in w for w in warned)
    assert any("'tokenizer.colour'" in w for w in warned)
    # parameters are open: unknown parameter names are never reported
    assert not any("parameters.embed_slerp" in w for w in warned)
    assert all(w.startswith("cfg.yml") for w in warned)
    assert len(warned) == 3
    out = run(tmp_path, config)
    a, b = read_model(m["a"]), read_model(m["b"])
    for name, tensor in out.items():
        ref = (torch.stack([a[name], b[name]]) * torch.tensor([0.5, 0.5]).view(-1, *[1] * a[name].dim())).sum(0) / 1.0
        torch.testing.assert_close(tensor, ref)  # to float rounding


def test_bare_conditional_runs(llama_models, tmp_path):
    m = llama_models
    config = cfg(
        f"""
merge_method: linear
models:
  - model: {m['a']}
    parameters:
      weight: {{filter: mlp, value: 3.0}}
  - model: {m['b']}
    parameters: {{weight: 1.0}}
parameters:
  weight: 1.0
  normalize: false
"""
    )
    out = run(tmp_path, config)
    a, b = read_model(m["a"]), read_model(m["b"])
    for name, tensor in out.items():
        wa = 3.0 if "mlp" in name else 1.0  # falls through to the top level where no match
        torch.testing.assert_close(tensor, wa * a[name] + b[name], rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# to_yaml round trip (docs/mergekit-reference.md §1)

ROUND_TRIP = [
    FULL,
    """
merge_method: slerp
slices:
  - sources:
      - model: a
        layer_range: [0, 4]
        parameters:
          t: [{filter: self_attn, value: [0, 0.5, 1]}, {value: 0.3}]
      - model: b@dev
        layer_range: [2, 6]
    base_model: b@dev
    residual_weight: 0.5
    parameters: {t: 0.5}
  - sources:
      - model: a
        layer_range: [4, 5]
parameters:
  t: [0.1, 0.9]
tokenizer_source: base
out_dtype: bfloat16
""",
    """
merge_method: dare_ties
modules:
  decoder:
    models:
      - model: {model: {path: org/m, revision: null}, lora: {path: org/l, revision: v1}, override_architecture: LlamaForCausalLM}
        parameters: {weight: 1, density: 0.5}
    parameters: {lambda: 1.1}
base_model: org/base
""",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_to_yaml_round_trip(text):
    config = cfg(text)
    dumped = config.to_yaml()
    again = cfg(dumped)
    assert again == config
    assert again.to_yaml() == dumped
    # numbers-only lists in flow style, like mergekit
    for line in dumped.splitlines():
        if line.strip().startswith(("weight:", "t:", "layer_range:")) and "[" in line:
            assert line.rstrip().endswith("]")
    assert "merge_method:" in dumped and "slices: null" not in dumped and "dtype: null" not in dumped  # None fields omitted


def test_to_yaml_text_details():
    dumped = cfg(FULL).to_yaml()
    assert "weight: [0.0, 0.5, 1.0]" in dumped
    assert "value: [0.2, 0.3]" in dumped
    assert "model: org/a+org/lora-x@v2" in dumped
    assert "base_model: org/base@main" in dumped
    assert "slices" not in dumped and "tokenizer_source" not in dumped
    data = yaml.safe_load(dumped)
    assert data["dtype"] == "bfloat16"
    assert data["models"][1]["model"]["override_architecture"] == "MistralForCausalLM"


def test_planning_does_not_mutate_the_config(llama_models):
    m = llama_models
    text = f"""
merge_method: task_arithmetic
base_model: {m['base']}
models:
  - model: {m['a']}
    parameters: {{weight: [0.5, 1]}}
"""
    config = cfg(text)
    before = config.to_yaml()
    from merge_engine.plan import build_plan

    plan = build_plan(config)
    plan.close()
    assert config.to_yaml() == before and config.models is not None and config.slices is None
