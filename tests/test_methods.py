"""Merge methods checked against independent computations written here from docs/mergekit-reference.md (§2).

Two levels:
- the method functions (`get_method_spec(name).function(...)`) on hand-made tensors;
- whole merges (`mergekit-yaml` CLI or `run_merge`) of the tiny llama models, every output tensor
  compared with the same formulas applied to the input checkpoints.

The reference formulas below never call merge_engine code: they follow mergekit's op sequence
(docs/mergekit-reference.md §2) in plain torch / numpy.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import read_model, write_yaml

from merge_engine.errors import MergeError
from merge_engine.methods import REQUIRED, get_method_spec
from merge_engine.methods import reference
from merge_engine.methods.common import TensorContext

MERGEKIT_YAML = Path(sys.executable).parent / "mergekit-yaml"

LAYER_RE = re.compile(r"\.layers\.(\d+)\.")
NUM_LAYERS = 4  # the llama_models fixture

# ----------------------------------------------------------------------------------------------
# Independent reference implementations (docs/mergekit-reference.md §2), plain torch / numpy


def ref_linear(xs, weights, normalize=True):
    """Reference §2.1: stack, multiply by a weights tensor of the math dtype, sum dim 0, / summed weights."""
    stacked = torch.stack(xs, dim=0)
    w = torch.tensor(weights, dtype=stacked.dtype).view(-1, *([1] * (stacked.dim() - 1)))
    res = (stacked * w).sum(dim=0)
    if normalize:
        res = res / w.sum(dim=0)
    return res


def ref_slerp_f32(t, v0, v1):
    """Reference §2.2, mergekit's sequence in numpy float32 (raw copies kept for the final combination)."""
    a = v0.detach().to(torch.float32).numpy().copy()
    b = v1.detach().to(torch.float32).numpy().copy()
    u0, u1 = a.copy(), b.copy()
    n0, n1 = np.linalg.norm(u0), np.linalg.norm(u1)
    if n0 > 1e-8:
        u0 = u0 / n0
    if n1 > 1e-8:
        u1 = u1 / n1
    dot = np.sum(u0 * u1)
    if np.abs(dot) > 0.9995:
        res = (1 - t) * a + t * b
    else:
        theta0 = np.arccos(dot)
        sin0 = np.sin(theta0)
        theta_t = theta0 * t
        s0 = np.sin(theta0 - theta_t) / sin0
        s1 = np.sin(theta_t) / sin0
        res = s0 * a + s1 * b
    return torch.from_numpy(np.ascontiguousarray(res)).to(v0.dtype)


def ref_slerp_f64(t, v0, v1):
    """The textbook formula in float64 (no mergekit op order): for tolerance checks."""
    a = v0.double().flatten()
    b = v1.double().flatten()
    cos = torch.dot(a / a.norm(), b / b.norm()).item()
    if abs(cos) > 0.9995:
        res = (1 - t) * a + t * b
    else:
        theta = np.arccos(cos)
        res = (np.sin((1 - t) * theta) * a + np.sin(t * theta) * b) / np.sin(theta)
    return res.view(v0.shape)


# The engine's reference TIES (merge_engine/methods/reference.py) is the reference here too:
# trim_mask is the deterministic magnitude trim, combine the weighting, election and merge
# (tests/test_reference.py checks it against a per-entry float64 loop).
def ref_gta(base, xs, weights, *, densities=None, sparsify=None, consensus=False, normalize=False, lam=1.0, masks=None):
    """Reference §2.6 (task arithmetic family) with magnitude sparsification (2.7) or explicit masks."""
    deltas = [x.to(base.dtype) - base for x in xs]
    if sparsify == "magnitude":
        deltas = [d if dens >= 1 else d * reference.trim_mask(d, dens) for d, dens in zip(deltas, densities)]
    elif masks is not None:
        deltas = [d * m for d, m in zip(deltas, masks)]
    return reference.combine(base, deltas, weights, consensus, normalize, lam)


def grad_value(setting, t):
    """Reference §1.5: a scalar, or a gradient interpolated at t."""
    if not isinstance(setting, (list, tuple)):
        return float(setting)
    if len(setting) == 1:
        return float(setting[0])
    s = t * (len(setting) - 1)
    i0 = int(s)
    i1 = min(len(setting) - 1, i0 + 1)
    f = s - i0
    return (1 - f) * setting[i0] + f * setting[i1]


def layer_t(name, n=NUM_LAYERS):
    """Reference §1.8 for `models:` syntax: layer i -> i/(n-1); pre/post-layer weights -> 0."""
    m = LAYER_RE.search(name)
    return 0.0 if m is None else int(m.group(1)) / (n - 1)


# ----------------------------------------------------------------------------------------------
# Helpers to call a method / run a merge


def call(name, tensors, base_index=None, params=None, model_params=None, *, tensor_name="model.layers.0.mlp.up_proj.weight", is_embed=False, seed=0):
    spec = get_method_spec(name)
    full = {k: v for k, v in spec.global_params.items() if v is not REQUIRED}
    full.update(params or {})
    if model_params is None:
        model_params = [{} for _ in tensors]
    mps = []
    for mp in model_params:
        d = {k: (None if v is REQUIRED else v) for k, v in spec.model_params.items()}
        d.update(mp)
        mps.append(d)
    return spec.function(list(tensors), base_index, full, mps, TensorContext(tensor_name, is_embed, seed))


def merge(tmp_path, text, name="out", cli=False, seed=None):
    """Run a merge of the YAML `text`; returns the output tensors."""
    cfg = write_yaml(tmp_path / f"{name}.yml", text)
    out = tmp_path / name
    if cli:
        cmd = [str(MERGEKIT_YAML), str(cfg), str(out), "--quiet"]
        if seed is not None:
            cmd += ["--random-seed", str(seed)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
    else:
        from merge_engine.config import load_config
        from merge_engine.options import MergeOptions
        from merge_engine.streaming import run_merge

        config, source = load_config(cfg)
        options = MergeOptions(quiet=True, random_seed=0 if seed is None else seed)
        run_merge(config, out, options, config_text=source)
    return read_model(out)


def assert_bit_equal(actual, expected, name=""):
    assert actual.dtype == expected.dtype, (name, actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    if not torch.equal(actual, expected):
        diff = (actual.double() - expected.double()).abs()
        raise AssertionError(
            f"{name}: {int((diff > 0).sum())} of {diff.numel()} entries differ, max |diff| {diff.max().item():.3g}"
        )


def assert_rounding_equal(actual, expected, name=""):
    """Equal to float rounding: within two units in the last place of the output dtype, relative to
    the tensor's scale (evomerge's linear rounds once where mergekit rounds three times)."""
    assert actual.dtype == expected.dtype, (name, actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    eps = torch.finfo(expected.dtype).eps
    scale = float(expected.double().abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual.double(), expected.double(), rtol=2 * eps, atol=2 * eps * scale, msg=name)


@pytest.fixture(scope="module")
def inputs(llama_models):
    return {k: read_model(v) for k, v in llama_models.items()}


@pytest.fixture(scope="module")
def bf16_models(llama_models, tmp_path_factory):
    """The llama fixture's checkpoints stored in bfloat16 (so the math dtype is bf16 without `dtype:`)."""
    root = tmp_path_factory.mktemp("llama_bf16")
    out = {}
    for key, src in llama_models.items():
        dst = root / key
        shutil.copytree(src, dst)
        tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in load_file(src / "model.safetensors").items()}
        save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
        cfg = json.loads((dst / "config.json").read_text())
        cfg["dtype"] = "bfloat16"
        (dst / "config.json").write_text(json.dumps(cfg))
        out[key] = dst
    return out


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=_gen(seed)).to(dtype)


# ----------------------------------------------------------------------------------------------
# Registry: parameters and defaults of docs/mergekit-reference.md §2


def test_registry_parameters_and_defaults_match_spec():
    expected = {
        "linear": ({"normalize": True}, {"weight": REQUIRED}, False),
        "slerp": ({"t": REQUIRED}, {}, True),
        "passthrough": ({}, {"scale": None}, False),
        "task_arithmetic": ({"int8_mask": False, "normalize": False, "rescale": False, "lambda": 1.0}, {"weight": REQUIRED, "density": 1.0}, True),
        "ties": ({"int8_mask": False, "normalize": True, "rescale": False, "lambda": 1.0}, {"weight": REQUIRED, "density": 1.0}, True),
        "dare_ties": ({"int8_mask": False, "normalize": False, "rescale": True, "lambda": 1.0}, {"weight": REQUIRED, "density": 1.0}, True),
        "dare_linear": ({"int8_mask": False, "normalize": False, "rescale": True, "lambda": 1.0}, {"weight": REQUIRED, "density": 1.0}, True),
    }
    for name, (glob, per_model, needs_base) in expected.items():
        spec = get_method_spec(name)
        assert spec.global_params == glob, name
        assert spec.model_params == per_model, name
        assert spec.requires_base == needs_base, name
    assert get_method_spec("dare_ties").random and get_method_spec("dare_linear").random
    assert not get_method_spec("ties").random
    with pytest.raises(MergeError, match="nope"):
        get_method_spec("nope")


# ----------------------------------------------------------------------------------------------
# linear


@pytest.mark.parametrize("normalize", [True, False])
def test_linear_float32_matches_formula(normalize):
    xs = [randn(7, 5, seed=i) for i in range(3)]
    ws = [0.2, -0.5, 1.3]
    out = call("linear", xs, None, {"normalize": normalize}, [{"weight": w} for w in ws])
    assert_rounding_equal(out, ref_linear(xs, ws, normalize))
    # and the plain maths, to make sure the reference itself is right
    plain = sum(w * x.double() for w, x in zip(ws, xs))
    if normalize:
        plain = plain / sum(ws)
    torch.testing.assert_close(out.double(), plain, rtol=1e-5, atol=1e-6)


def test_linear_bf16_weights_are_quantised_to_the_math_dtype():
    assert torch.tensor(0.3, dtype=torch.bfloat16).item() == 0.30078125
    assert torch.tensor(0.7, dtype=torch.bfloat16).item() == 0.69921875
    xs = [randn(64, 48, seed=10 + i, dtype=torch.bfloat16) for i in range(2)]
    for normalize in (True, False):
        out = call("linear", xs, None, {"normalize": normalize}, [{"weight": 0.3}, {"weight": 0.7}])
        assert out.dtype == torch.bfloat16
        assert_rounding_equal(out, ref_linear(xs, [0.3, 0.7], normalize))
    # Unnormalised, the quantised weights are visible: out ~ 0.30078125 a + 0.69921875 b (to
    # rounding), not anything made with 0.3 and 0.7.
    out = call("linear", xs, None, {"normalize": False}, [{"weight": 0.3}, {"weight": 0.7}])
    a, b = xs[0].float(), xs[1].float()
    p1 = (a * 0.30078125).to(torch.bfloat16).float()
    p2 = (b * 0.69921875).to(torch.bfloat16).float()
    assert_rounding_equal(out, (p1 + p2).to(torch.bfloat16))
    exact = (0.3 * a.double() + 0.7 * b.double()).to(torch.bfloat16)
    assert not torch.equal(out, exact)


def test_linear_embedding_of_different_vocab_uses_common_block():
    xs = [randn(10, 4, seed=1), randn(12, 4, seed=2)]
    out = call("linear", xs, None, {"normalize": True}, [{"weight": 1.0}, {"weight": 3.0}], tensor_name="model.embed_tokens.weight", is_embed=True)
    assert out.shape == (10, 4)
    assert_rounding_equal(out, ref_linear([xs[0], xs[1][:10]], [1.0, 3.0], True))
    with pytest.raises(MergeError, match="shape"):
        call("linear", xs, None, {"normalize": True}, [{"weight": 1.0}, {"weight": 3.0}], is_embed=False)


def test_linear_large_tensor_over_several_chunks():
    # more than one internal work chunk (2**21 elements): still identical to the one-shot formula
    xs = [randn(1100, 2000, seed=20 + i) for i in range(2)]
    out = call("linear", xs, None, {"normalize": True}, [{"weight": 0.25}, {"weight": 0.5}])
    assert_rounding_equal(out, ref_linear(xs, [0.25, 0.5], True))


@pytest.mark.parametrize("normalize", [True, False])
def test_linear_end_to_end_float32(llama_models, inputs, tmp_path, normalize):
    m = llama_models
    out = merge(
        tmp_path,
        f"""
merge_method: linear
models:
  - model: {m['a']}
    parameters: {{weight: 0.3}}
  - model: {m['b']}
    parameters: {{weight: 0.9}}
  - model: {m['base']}
    parameters: {{weight: 0.2}}
parameters:
  normalize: {str(normalize).lower()}
""",
    )
    assert set(out) == set(inputs["base"])
    for name, tensor in out.items():
        xs = [inputs["a"][name], inputs["b"][name], inputs["base"][name]]
        assert_rounding_equal(tensor, ref_linear(xs, [0.3, 0.9, 0.2], normalize), name)


@pytest.mark.slow
def test_linear_end_to_end_bf16_cli_is_bit_identical(llama_models, inputs, tmp_path):
    m = llama_models
    out = merge(
        tmp_path,
        f"""
merge_method: linear
models:
  - model: {m['a']}
    parameters: {{weight: 0.3}}
  - model: {m['b']}
    parameters: {{weight: 0.5}}
dtype: bfloat16
""",
        cli=True,
    )
    assert set(out) == set(inputs["base"])
    for name, tensor in out.items():
        xs = [inputs["a"][name].to(torch.bfloat16), inputs["b"][name].to(torch.bfloat16)]
        assert_rounding_equal(tensor, ref_linear(xs, [0.3, 0.5], True), name)


def test_linear_base_model_not_listed_is_an_input(llama_models, inputs, tmp_path):
    # docs/mergekit-reference.md §1: base_model missing from `models` is appended as an input, and gets the
    # top-level weight through the normal precedence.
    m = llama_models
    out = merge(
        tmp_path,
        f"""
merge_method: linear
base_model: {m['base']}
models:
  - model: {m['a']}
    parameters: {{weight: 2.0}}
  - model: {m['b']}
parameters:
  weight: 0.5
""",
    )
    for name, tensor in out.items():
        xs = [inputs["a"][name], inputs["b"][name], inputs["base"][name]]
        assert_rounding_equal(tensor, ref_linear(xs, [2.0, 0.5, 0.5], True), name)


# ----------------------------------------------------------------------------------------------
# slerp


def test_slerp_orthogonal_vectors_known_values():
    v0 = torch.tensor([[3.0, 0.0], [0.0, 0.0]])
    v1 = torch.tensor([[0.0, 0.0], [0.0, 2.0]])
    out = call("slerp", [v0, v1], 0, {"t": 0.5})
    s = np.sin(np.pi / 4)  # sin(theta/2)/sin(theta) with theta = pi/2
    torch.testing.assert_close(out, torch.tensor([[3.0 * s, 0.0], [0.0, 2.0 * s]], dtype=torch.float32), rtol=1e-6, atol=1e-6)
    # t = 0.25: weights sin(3pi/8), sin(pi/8)
    out = call("slerp", [v0, v1], 0, {"t": 0.25})
    torch.testing.assert_close(
        out, torch.tensor([[3.0 * np.sin(3 * np.pi / 8), 0.0], [0.0, 2.0 * np.sin(np.pi / 8)]], dtype=torch.float32), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 0.85, 1.0])
def test_slerp_matches_formula(t):
    v0 = randn(16, 8, seed=1)
    v1 = randn(16, 8, seed=2)
    out = call("slerp", [v0, v1], 0, {"t": t})
    assert_bit_equal(out, ref_slerp_f32(t, v0, v1))
    torch.testing.assert_close(out.double(), ref_slerp_f64(t, v0, v1), rtol=1e-5, atol=1e-5)
    # the base may sit at either position: v0 is always the base
    swapped = call("slerp", [v1, v0], 1, {"t": t})
    assert_bit_equal(swapped, out)


def test_slerp_near_colinear_falls_back_to_lerp():
    v0 = randn(32, 4, seed=3)
    v1 = 2.5 * v0 + 1e-4 * randn(32, 4, seed=4)  # |cos| > 0.9995, norms differ
    for t in (0.4, 0.6, 0.9, 0.33):
        out = call("slerp", [v0, v1], 0, {"t": t})
        # mergekit: `(1 - t) * v0 + t * v1` with t a Python float, so 1 - t is rounded from
        # float64 (for t = 0.6, 0.9, 0.33 that differs from float32 1 - float32(t))
        lerp = np.float32(1 - t) * v0.numpy() + np.float32(t) * v1.numpy()
        assert torch.equal(out, torch.from_numpy(lerp)), t
        assert_bit_equal(out, ref_slerp_f32(t, v0, v1), f"t={t}")
    t = 0.4
    # anti-parallel too (|dot| is used)
    out = call("slerp", [v0, -3 * v0], 0, {"t": t})
    torch.testing.assert_close(out, (1 - t) * v0 + t * (-3 * v0), rtol=1e-6, atol=1e-6)
    # just below the threshold: real slerp, which differs from lerp for these unequal norms
    w = v0.flatten() / v0.norm()
    perp = randn(128, seed=5)
    perp = perp - (perp @ w) * w
    perp = perp / perp.norm()
    cos = 0.999
    v2 = (cos * w + float(np.sqrt(1 - cos**2)) * perp).view(32, 4) * 3.0
    out = call("slerp", [v0, v2], 0, {"t": t})
    assert_bit_equal(out, ref_slerp_f32(t, v0, v2))
    torch.testing.assert_close(out.double(), ref_slerp_f64(t, v0, v2), rtol=1e-4, atol=1e-5)


def test_slerp_single_input_and_errors():
    v = randn(4, 4, seed=7)
    assert torch.equal(call("slerp", [v], 0, {"t": 0.3}), v)
    with pytest.raises(MergeError):
        call("slerp", [v, v, v], 0, {"t": 0.3})
    with pytest.raises(MergeError):
        call("slerp", [v, v], None, {"t": 0.3})


def test_slerp_bf16_runs_in_float32_and_casts_back():
    v0 = randn(16, 16, seed=8, dtype=torch.bfloat16)
    v1 = randn(16, 16, seed=9, dtype=torch.bfloat16)
    out = call("slerp", [v0, v1], 0, {"t": 0.6})
    assert out.dtype == torch.bfloat16
    assert_bit_equal(out, ref_slerp_f32(0.6, v0, v1))


@pytest.mark.slow
def test_slerp_end_to_end_gradient_t(llama_models, inputs, tmp_path):
    m = llama_models
    gradient = [0.1, 0.9, 0.3, 0.6, 0.0]
    out = merge(
        tmp_path,
        f"""
merge_method: slerp
base_model: {m['base']}
models:
  - model: {m['base']}
  - model: {m['a']}
parameters:
  t:
    - filter: self_attn
      value: {gradient}
    - value: 0.7
""",
        cli=True,
    )
    assert set(out) == set(inputs["base"])
    seen_t = set()
    for name, tensor in out.items():
        t = grad_value(gradient, layer_t(name)) if "self_attn" in name else 0.7
        seen_t.add(round(t, 6))
        assert_bit_equal(tensor, ref_slerp_f32(t, inputs["base"][name], inputs["a"][name]), name)
    # layers 0..3 at t = 0, 1/3, 2/3, 1 over a 5-point gradient, plus the conditional's 0.7
    assert seen_t == {0.1, round(grad_value(gradient, 1 / 3), 6), round(grad_value(gradient, 2 / 3), 6), 0.0, 0.7}


def test_slerp_end_to_end_pre_post_weights_use_first_gradient_value(llama_models, inputs, tmp_path):
    m = llama_models
    out = merge(
        tmp_path,
        f"""
merge_method: slerp
base_model: {m['base']}
models:
  - model: {m['a']}
parameters:
  t: [0.25, 1.0]
""",
    )
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert_bit_equal(out[name], ref_slerp_f32(0.25, inputs["base"][name], inputs["a"][name]), name)
    for i in range(NUM_LAYERS):
        name = f"model.layers.{i}.mlp.down_proj.weight"
        t = 0.25 + 0.75 * i / 3
        assert_bit_equal(out[name], ref_slerp_f32(t, inputs["base"][name], inputs["a"][name]), name)


# ----------------------------------------------------------------------------------------------
# ties (magnitude sparsification + sign consensus)


def test_ties_sign_election_uses_weighted_deltas():
    base = torch.zeros(4)
    a = torch.tensor([1.0, 1.0, -1.0, 0.0])
    b = torch.tensor([-0.6, 0.5, 2.0, 0.0])
    # weighted: a*0.5 = [.5, .5, -.5, 0], b*1 = [-.6, .5, 2, 0]
    # sums:            [-.1, 1, 1.5, 0] -> majority [-, +, +, + (tie -> +1)]
    out = call("ties", [base, a, b], 0, {"normalize": False}, [{}, {"weight": 0.5}, {"weight": 1.0}])
    torch.testing.assert_close(out, torch.tensor([-0.6, 1.0, 2.0, 0.0]))
    # normalised: divided by the summed weights of the agreeing models (entry 1: both, 1.5)
    out = call("ties", [base, a, b], 0, {"normalize": True}, [{}, {"weight": 0.5}, {"weight": 1.0}])
    torch.testing.assert_close(out, torch.tensor([-0.6, 1.0 / 1.5, 2.0, 0.0]))
    # an unweighted election would have picked + for entry 0 (1 - 0.6 > 0): make sure it did not
    assert out[0] < 0


def test_ties_negative_weight_flips_the_vote_and_zero_divisor_becomes_one():
    base = torch.tensor([1.0, 1.0, 1.0])
    a = torch.tensor([2.0, 0.0, 1.0])  # deltas [1, -1, 0]
    b = torch.tensor([1.5, 1.5, 1.0])  # deltas [.5, .5, 0]
    out = call("ties", [base, a, b], 0, {"normalize": True}, [{}, {"weight": -1.0}, {"weight": 1.0}])
    # weighted: a [-1, 1, 0], b [.5, .5, 0]; sums [-.5, 1.5, 0] -> [-, +, +]
    # entry 0: a agrees (w=-1): mixed -1, divisor -1 -> +1; entry 1: both: 1.5 / 0 -> divisor 0 -> 1
    # entry 2: nobody agrees (zeros never match), divisor 0 -> 1, mixed 0
    torch.testing.assert_close(out, torch.tensor([2.0, 2.5, 1.0]))


def test_ties_keeps_exactly_int_density_times_numel():
    base = torch.zeros(100)
    delta = randn(100, seed=11).abs() + 0.1  # no zeros
    assert int(0.29 * 100) == 28  # 28.999999999999996: truncation, not rounding
    out = call("ties", [base, delta], 0, {"normalize": False}, [{}, {"weight": 1.0, "density": 0.29}])
    assert int((out != 0).sum()) == 28
    kept = out != 0
    assert delta[kept].min() >= delta[~kept].max()  # the largest magnitudes
    for density in (0.01, 0.5, 0.999):
        out = call("ties", [base, delta], 0, {"normalize": False}, [{}, {"weight": 1.0, "density": density}])
        assert int((out != 0).sum()) == int(density * 100)
    with pytest.raises(MergeError):  # int(0.001 * 100) == 0 keeps nothing (mergekit asserts)
        call("ties", [base, delta], 0, {"normalize": False}, [{}, {"weight": 1.0, "density": 0.001}])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_ties_tied_magnitudes_go_to_lowest_flat_indices(dtype):
    # many equal magnitudes, of both signs: the cut at k falls inside a run of ties
    values = torch.tensor([0.5, -0.25, 0.25, -0.5, 1.0, 0.25, -0.25, 0.5, 0.25, -1.0, 0.125, 0.25])
    delta = values.repeat(50).view(20, 30).to(dtype)
    base = torch.zeros_like(delta)
    for density in (0.1, 0.25, 0.4, 0.55, 0.73):
        out = call("ties", [base, delta], 0, {"normalize": False}, [{}, {"weight": 1.0, "density": density}])
        mask = reference.trim_mask(delta, density)
        assert int(mask.sum()) == int(density * delta.numel())
        assert_bit_equal(out, delta * mask, f"{dtype} density {density}")
    # a concrete case: 600 entries, 100 of magnitude 1 (indices 4, 9, 16, 21, ...); k = 130 keeps
    # all of them plus the first 30 of magnitude 0.5 in flat order
    out = call("ties", [base, delta], 0, {"normalize": False}, [{}, {"weight": 1.0, "density": 130 / 600 + 1e-9}])
    flat_out = out.flatten()
    half = (delta.flatten().abs() == 0.5).nonzero().flatten()
    assert int((flat_out.abs() == 0.5).sum()) == 30
    assert torch.equal((flat_out[half].abs() == 0.5).nonzero().flatten(), torch.arange(30))


def test_ties_histogram_and_kthvalue_paths_agree():
    # bf16 values (exactly representable in float32): the 16-bit histogram path and the float32
    # selection path must pick the same entries
    delta16 = (randn(64, 96, seed=12) * 0.01).to(torch.bfloat16)
    delta32 = delta16.float()
    for density in (0.05, 0.3, 0.77):
        m16 = call("ties", [torch.zeros_like(delta16), delta16], 0, {"normalize": False}, [{}, {"weight": 1.0, "density": density}]) != 0
        m32 = call("ties", [torch.zeros_like(delta32), delta32], 0, {"normalize": False}, [{}, {"weight": 1.0, "density": density}]) != 0
        assert torch.equal(m16, m32)
        assert torch.equal(m16, reference.trim_mask(delta16, density) & (delta16 != 0))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_ties_histogram_path_on_large_tensors_matches_reference(dtype, monkeypatch):
    # Large tensors find the top-k threshold with magnitude histograms (two levels for float32)
    # and take tied entries slice by slice; force that path on a small tensor with many ties,
    # and with slices small enough that the ties straddle several of them.
    import merge_engine.methods.task_arithmetic as ta

    monkeypatch.setattr(ta, "SMALL_TENSOR", 0)
    monkeypatch.setattr(ta, "FUSED_CHUNK", 97)
    values = torch.tensor([0.5, -0.25, 0.25, -0.5, 1.0, 0.25, -0.25, 0.5, 0.25, -1.0, 0.125, 0.25])
    delta = (values.repeat(50).view(20, 30) + randn(20, 30, seed=3) * (values.repeat(50).view(20, 30) == 0.125)).to(dtype)
    base = torch.zeros_like(delta)
    for density in (0.1, 0.25, 0.4, 0.55, 0.73, 0.999):
        out = call("ties", [base, delta], 0, {"normalize": False}, [{}, {"weight": 1.0, "density": density}])
        mask = reference.trim_mask(delta, density)
        assert_bit_equal(out, delta * mask, f"{dtype} density {density}")
    # random magnitudes: the two-level float32 histogram finds the exact k-th value
    delta = (randn(50, 40, seed=4) * 0.01).to(dtype)
    for density in (0.05, 0.5, 0.9):
        out = call("ties", [torch.zeros_like(delta), delta], 0, {"normalize": False}, [{}, {"weight": 1.0, "density": density}])
        assert int((out != 0).sum()) == int(density * delta.numel())
        assert_bit_equal(out, delta * reference.trim_mask(delta, density), f"{dtype} random density {density}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("normalize", [True, False])
def test_ties_three_models_matches_reference(dtype, normalize):
    base = randn(48, 40, seed=30, dtype=dtype)
    xs = [(base.float() + 0.05 * randn(48, 40, seed=31 + i)).to(dtype) for i in range(3)]
    ws, ds = [0.7, 0.4, 1.1], [0.3, 0.6, 0.45]
    out = call("ties", [xs[0], base, xs[1], xs[2]], 1, {"normalize": normalize}, [{"weight": ws[0], "density": ds[0]}, {}, {"weight": ws[1], "density": ds[1]}, {"weight": ws[2], "density": ds[2]}])
    ref = ref_gta(base, xs, ws, densities=ds, sparsify="magnitude", consensus=True, normalize=normalize)
    assert_bit_equal(out, ref)


def test_ties_with_rescale_matches_l1_of_the_dense_delta():
    base = torch.zeros(40, 25)
    delta = randn(40, 25, seed=45)
    out = call("ties", [base, delta], 0, {"normalize": False, "rescale": True}, [{}, {"weight": 1.0, "density": 0.2}])
    mask = reference.trim_mask(delta, 0.2)
    expected = delta * mask * (delta.abs().sum() / (delta * mask).abs().sum())
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.abs().sum(), delta.abs().sum(), rtol=1e-5, atol=0)


def test_ties_density_one_is_plain_consensus():
    base = randn(10, 10, seed=40)
    xs = [base + randn(10, 10, seed=41 + i) for i in range(2)]
    out = call("ties", [base] + xs, 0, {}, [{}, {"weight": 1.0}, {"weight": 0.5}])
    assert_bit_equal(out, ref_gta(base, xs, [1.0, 0.5], densities=[1.0, 1.0], sparsify="magnitude", consensus=True, normalize=True))


def _ties_yaml(m, dtype_line=""):
    return f"""
merge_method: ties
base_model: {m['base']}
models:
  - model: {m['a']}
    parameters:
      weight: 0.6
      density: 0.35
  - model: {m['b']}
    parameters:
      weight: [1.0, 0.2]
      density: 0.7
parameters:
  lambda: 0.9
{dtype_line}
"""


def _check_ties_output(out, ins, math_dtype):
    assert set(out) == set(ins["base"])
    for name, tensor in out.items():
        t = layer_t(name)
        base = ins["base"][name].to(math_dtype)
        xs = [ins["a"][name].to(math_dtype), ins["b"][name].to(math_dtype)]
        ref = ref_gta(base, xs, [0.6, grad_value([1.0, 0.2], t)], densities=[0.35, 0.7], sparsify="magnitude", consensus=True, normalize=True, lam=0.9)
        assert_bit_equal(tensor, ref, name)


@pytest.mark.slow
def test_ties_end_to_end_float32_kthvalue_path(llama_models, inputs, tmp_path):
    out = merge(tmp_path, _ties_yaml(llama_models), cli=True)
    _check_ties_output(out, inputs, torch.float32)


def test_ties_end_to_end_bf16_math_dtype_histogram_path(llama_models, inputs, tmp_path):
    out = merge(tmp_path, _ties_yaml(llama_models, "dtype: bfloat16"))
    _check_ties_output(out, inputs, torch.bfloat16)
    # bf16 task vectors of this size are full of tied magnitudes: the tie rule really mattered
    d = inputs["a"]["model.embed_tokens.weight"].to(torch.bfloat16) - inputs["base"]["model.embed_tokens.weight"].to(torch.bfloat16)
    mags = d.abs().flatten()
    k = int(0.35 * mags.numel())
    threshold = mags.sort(descending=True).values[k - 1]
    assert int((mags == threshold).sum()) > 1


def test_ties_end_to_end_bf16_checkpoints(bf16_models, tmp_path):
    ins = {k: read_model(v) for k, v in bf16_models.items()}
    assert ins["base"]["model.norm.weight"].dtype == torch.bfloat16
    out = merge(tmp_path, _ties_yaml(bf16_models))
    _check_ties_output(out, ins, torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# task_arithmetic


@pytest.mark.parametrize("normalize,lam", [(False, 1.0), (True, 1.0), (False, 0.7), (True, 1.8)])
def test_task_arithmetic_matches_reference(normalize, lam):
    base = randn(20, 12, seed=50)
    xs = [base + 0.1 * randn(20, 12, seed=51 + i) for i in range(3)]
    ws = [0.5, -0.25, 1.5]
    out = call("task_arithmetic", [base] + xs, 0, {"normalize": normalize, "lambda": lam}, [{}] + [{"weight": w} for w in ws])
    assert_bit_equal(out, ref_gta(base, xs, ws, normalize=normalize, lam=lam))
    plain = base.double() + lam * sum(w * (x.double() - base.double()) for w, x in zip(ws, xs)) / (sum(ws) if normalize else 1)
    torch.testing.assert_close(out.double(), plain, rtol=1e-5, atol=1e-6)


def test_task_arithmetic_edge_cases():
    base = randn(6, 4, seed=60)
    x = base + 1.0
    # no task vector (only the base): the base itself
    assert torch.equal(call("task_arithmetic", [base], 0, {}, [{}]), base)
    # normalize with weights summing to ~0: divisor replaced by 1
    out = call("task_arithmetic", [base, x, x], 0, {"normalize": True}, [{}, {"weight": 1.0}, {"weight": -1.0}])
    torch.testing.assert_close(out, base)
    # density < 1 is ignored by task_arithmetic (no sparsification)
    out = call("task_arithmetic", [base, x], 0, {}, [{}, {"weight": 1.0, "density": 0.1}])
    torch.testing.assert_close(out, x)
    # no base -> error
    with pytest.raises(MergeError):
        call("task_arithmetic", [base, x], None, {}, [{"weight": 1.0}, {"weight": 1.0}])
    # an input with a larger vocabulary is cut to the base's rows (embeddings only)
    big = torch.cat([x, randn(3, 4, seed=61)])
    out = call("task_arithmetic", [base, big], 0, {}, [{}, {"weight": 1.0}], tensor_name="lm_head.weight", is_embed=True)
    torch.testing.assert_close(out, x)
    with pytest.raises(MergeError, match="shape"):
        call("task_arithmetic", [base, big], 0, {}, [{}, {"weight": 1.0}], is_embed=False)


def test_task_arithmetic_end_to_end_lambda_normalize(llama_models, inputs, tmp_path):
    m = llama_models
    out = merge(
        tmp_path,
        f"""
merge_method: task_arithmetic
base_model: {m['base']}
models:
  - model: {m['a']}
    parameters:
      weight: 0.8
  - model: {m['b']}
    parameters:
      weight:
        - filter: mlp
          value: [0.1, 0.9]
        - value: 0.4
parameters:
  lambda: 1.5
  normalize: true
""",
    )
    for name, tensor in out.items():
        t = layer_t(name)
        wb = grad_value([0.1, 0.9], t) if "mlp" in name else 0.4
        ref = ref_gta(inputs["base"][name], [inputs["a"][name], inputs["b"][name]], [0.8, wb], normalize=True, lam=1.5)
        assert_bit_equal(tensor, ref, name)


# ----------------------------------------------------------------------------------------------
# dare_ties / dare_linear (random sparsification with L1 rescale)


@pytest.mark.slow
def test_dare_linear_rescale_keeps_l1_norm_and_kept_fraction():
    n = 400_000
    delta = randn(n, seed=70) * 0.01
    delta[delta == 0] = 1e-3
    base = torch.zeros(n)
    for density in (0.1, 0.5, 0.9):
        out = call("dare_linear", [base, delta], 0, {}, [{}, {"weight": 1.0, "density": density}], seed=3)
        kept = out != 0
        frac = kept.float().mean().item()
        assert abs(frac - density) < 0.01, (density, frac)
        # rescale: the whole-tensor L1 norm of the sparsified delta equals the original's
        torch.testing.assert_close(out.abs().double().sum(), delta.abs().double().sum(), rtol=1e-5, atol=0)
        scale = delta.abs().sum() / (delta * kept).abs().sum()
        torch.testing.assert_close(out, delta * kept * scale, rtol=1e-5, atol=1e-9)
    # rescale off: kept entries are untouched
    out = call("dare_linear", [base, delta], 0, {"rescale": False}, [{}, {"weight": 1.0, "density": 0.5}], seed=3)
    kept = out != 0
    assert torch.equal(out[kept], delta[kept])
    assert abs(kept.float().mean().item() - 0.5) < 0.01


def test_dare_seed_determinism():
    base = randn(300, 200, seed=80)
    xs = [base + 0.02 * randn(300, 200, seed=81 + i) for i in range(2)]
    mps = [{}, {"weight": 0.5, "density": 0.4}, {"weight": 0.7, "density": 0.6}]
    for method in ("dare_ties", "dare_linear"):
        r1 = call(method, [base] + xs, 0, {}, mps, seed=1)
        r1b = call(method, [base] + xs, 0, {}, mps, seed=1)
        r2 = call(method, [base] + xs, 0, {}, mps, seed=2)
        assert torch.equal(r1, r1b), method
        assert not torch.equal(r1, r2), method
        # another tensor name draws another mask even with the same seed
        r3 = call(method, [base] + xs, 0, {}, mps, seed=1, tensor_name="model.layers.1.mlp.up_proj.weight")
        assert not torch.equal(r1, r3), method
        # density 1: no sparsification, plain (consensus) task arithmetic
        full = call(method, [base] + xs, 0, {}, [{}, {"weight": 0.5}, {"weight": 0.7}], seed=1)
        ref = ref_gta(base, xs, [0.5, 0.7], consensus=(method == "dare_ties"), normalize=False)
        assert_bit_equal(full, ref, method)


def test_dare_ties_consensus_on_rescaled_deltas():
    # constant task vectors: a = +1, b = -2 everywhere; after DARE (p = 0.5) each kept entry is
    # rescaled by n / kept; where both survive, b's larger weighted magnitude wins the election
    n = 100_000
    base = torch.zeros(n)
    a, b = torch.ones(n), torch.full((n,), -2.0)
    out = call("dare_ties", [base, a, b], 0, {}, [{}, {"weight": 1.0, "density": 0.5}, {"weight": 1.0, "density": 0.5}], seed=5)
    values = torch.unique(out)
    assert len(values) == 3  # 0, +s_a, -2 s_b
    neg, zero, pos = values.tolist()
    assert zero == 0 and abs(pos - 2) < 0.05 and abs(neg + 4) < 0.1
    frac = {v: (out == v).float().mean().item() for v in values.tolist()}
    assert abs(frac[neg] - 0.5) < 0.01  # b kept
    assert abs(frac[pos] - 0.25) < 0.01  # a kept, b dropped
    assert abs(frac[0.0] - 0.25) < 0.01  # both dropped
    # rescale = n / (entries of b kept): that count is exactly the negative entries
    assert neg == pytest.approx(-2.0 * n / int((out == neg).sum()), rel=1e-6)
    # normalize: each surviving entry is divided by the weight of its agreeing model (1)
    normed = call("dare_ties", [base, a, b], 0, {"normalize": True}, [{}, {"weight": 2.0, "density": 0.5}, {"weight": 2.0, "density": 0.5}], seed=5)
    torch.testing.assert_close(normed, out)


def test_dare_bf16_work_dtype():
    n = 50_000
    base = torch.zeros(n, dtype=torch.bfloat16)
    delta = (randn(n, seed=90) * 0.01).to(torch.bfloat16)
    delta[delta == 0] = 0.001
    out = call("dare_linear", [base, delta], 0, {}, [{}, {"weight": 1.0, "density": 0.3}], seed=4)
    assert out.dtype == torch.bfloat16
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.015
    # L1 rescale done in bf16: equal to the original norm within bf16 precision
    assert abs(out.float().abs().sum().item() / delta.float().abs().sum().item() - 1) < 0.02


def _dare_yaml(m, method, extra=""):
    return f"""
merge_method: {method}
base_model: {m['base']}
models:
  - model: {m['a']}
    parameters:
      weight: 0.6
      density: 0.5
  - model: {m['b']}
    parameters:
      weight: 0.8
      density: 0.3
{extra}
"""


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
def test_dare_end_to_end_seeds(llama_models, inputs, tmp_path, method):
    m = llama_models
    r1 = merge(tmp_path, _dare_yaml(m, method), name="s1", cli=True, seed=7)
    r1b = merge(tmp_path, _dare_yaml(m, method), name="s1b", seed=7)  # CLI and in-process agree
    r2 = merge(tmp_path, _dare_yaml(m, method), name="s2", seed=8)
    assert set(r1) == set(inputs["base"])
    for name in r1:
        assert_bit_equal(r1b[name], r1[name], name)
    big = [n for n in r1 if r1[n].numel() >= 512]
    assert all(not torch.equal(r1[n], r2[n]) for n in big)
    # entries where both models were dropped are exactly the base
    for name in big:
        untouched = (r1[name] == inputs["base"][name]).float().mean().item()
        assert abs(untouched - 0.5 * 0.7) < 0.1, (name, untouched)


def test_dare_linear_end_to_end_rescaled_task_vector(llama_models, inputs, tmp_path):
    # one fine-tune: the output is base + rescaled(mask * delta); dropped entries are exactly the base
    m = llama_models
    out = merge(
        tmp_path,
        f"""
merge_method: dare_linear
base_model: {m['base']}
models:
  - model: {m['a']}
    parameters:
      weight: 1.0
      density: 0.4
""",
        seed=11,
    )
    total = kept_total = 0
    for name, tensor in out.items():
        base, x = inputs["base"][name], inputs["a"][name]
        delta = x - base
        kept = tensor != base
        total += kept.numel()
        kept_total += int(kept.sum())
        expected = base + delta * kept * (delta.abs().sum() / (delta * kept).abs().sum())
        torch.testing.assert_close(tensor, expected, rtol=1e-5, atol=1e-6, msg=name)
    assert abs(kept_total / total - 0.4) < 0.02


# ----------------------------------------------------------------------------------------------
# passthrough


def test_passthrough_scale():
    x = randn(5, 3, seed=100)
    assert torch.equal(call("passthrough", [x], None, {}, [{"scale": None}]), x)
    assert torch.equal(call("passthrough", [x], None, {}, [{"scale": 0.5}]), x * 0.5)
    with pytest.raises(MergeError):
        call("passthrough", [x, x], None, {}, [{}, {}])


def test_passthrough_end_to_end_frankenmerge_with_scale(llama_models, inputs, tmp_path):
    m = llama_models
    out = merge(
        tmp_path,
        f"""
merge_method: passthrough
slices:
  - sources:
      - model: {m['a']}
        layer_range: [0, 2]
  - sources:
      - model: {m['b']}
        layer_range: [1, 4]
        parameters:
          scale:
            - filter: o_proj
              value: 0
            - filter: down_proj
              value: 0.5
            - value: 1
""",
    )
    # output layers 0,1 <- a.0, a.1; 2,3,4 <- b.1, b.2, b.3; embeddings from a, norm/lm_head from b
    origin = {0: ("a", 0), 1: ("a", 1), 2: ("b", 1), 3: ("b", 2), 4: ("b", 3)}
    assert {int(LAYER_RE.search(n).group(1)) for n in out if LAYER_RE.search(n)} == set(origin)
    for name, tensor in out.items():
        mm = LAYER_RE.search(name)
        if mm is None:
            src = "a" if "embed" in name else "b"
            in_name = name
        else:
            src, idx = origin[int(mm.group(1))]
            in_name = name.replace(f".layers.{mm.group(1)}.", f".layers.{idx}.")
        x = inputs[src][in_name]
        if src == "b" and "o_proj" in name:
            expected = x * 0.0
        elif src == "b" and "down_proj" in name:
            expected = x * 0.5
        elif src == "b":
            expected = x * 1.0
        else:
            expected = x
        assert_bit_equal(tensor, expected, name)


# ----------------------------------------------------------------------------------------------
# dtype / out_dtype


def test_dtype_is_math_dtype_and_out_dtype_casts(llama_models, inputs, tmp_path):
    m = llama_models
    out = merge(
        tmp_path,
        f"""
merge_method: linear
models:
  - model: {m['a']}
    parameters: {{weight: 0.3}}
  - model: {m['b']}
    parameters: {{weight: 0.6}}
dtype: bfloat16
out_dtype: float32
""",
    )
    for name, tensor in out.items():
        xs = [inputs["a"][name].to(torch.bfloat16), inputs["b"][name].to(torch.bfloat16)]
        assert tensor.dtype == torch.float32, name
        assert_rounding_equal(tensor.to(torch.bfloat16), ref_linear(xs, [0.3, 0.6], True), name)
        # maths really happened in bf16: every value is a bf16 number
        assert torch.equal(tensor.to(torch.bfloat16).float(), tensor)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "float32"


def test_out_dtype_alone_keeps_float32_math(llama_models, inputs, tmp_path):
    m = llama_models
    out = merge(
        tmp_path,
        f"""
merge_method: task_arithmetic
base_model: {m['base']}
models:
  - model: {m['a']}
    parameters: {{weight: 0.3}}
out_dtype: float16
""",
    )
    for name, tensor in out.items():
        ref = ref_gta(inputs["base"][name], [inputs["a"][name]], [0.3]).to(torch.float16)
        assert_bit_equal(tensor, ref, name)


def test_dtype_float32_upcasts_bf16_checkpoints(bf16_models, tmp_path):
    ins = {k: read_model(v) for k, v in bf16_models.items()}
    out = merge(
        tmp_path,
        f"""
merge_method: linear
models:
  - model: {bf16_models['a']}
    parameters: {{weight: 0.3}}
  - model: {bf16_models['b']}
    parameters: {{weight: 0.6}}
dtype: float32
""",
    )
    for name, tensor in out.items():
        xs = [ins["a"][name].float(), ins["b"][name].float()]
        assert_rounding_equal(tensor, ref_linear(xs, [0.3, 0.6], True), name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_slerp_bit_equal_on_a_tensor_of_several_slices(dtype):
    # more entries than one slice (2^21): u0·u1 and the result are built slice by slice
    v0 = randn(1100, 2000, seed=70, dtype=dtype)
    v1 = (0.6 * v0.float() + randn(1100, 2000, seed=71)).to(dtype)
    out = call("slerp", [v0, v1], 0, {"t": 0.3})
    assert_bit_equal(out, ref_slerp_f32(0.3, v0, v1))
    torch.testing.assert_close(out.double(), ref_slerp_f64(0.3, v0, v1), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)
