"""The SVD merge methods (evomerge extensions): `tsvm`, `iso_c`, `iso_cts` (docs/methods.md).

Each method has a float64 reference below, written from the papers' equations with numpy (full
SVDs, no engine code). The engine computes in float32 and may take randomized SVDs, so results are
compared within stated tolerances:
- exact SVD path, float32 inputs: relative Frobenius error of the update (merged - base) below
  1e-4 (float32 SVDs of matrices whose kept singular values are separated from the dropped ones);
- randomized SVD path (decaying spectra, as fine-tunes have): below 1e-2 (measured 4.4e-3 for
  tsvm with 8 tasks; the randomized top-k triplets are the approximation, docs/extract-lora.md);
- bfloat16 inputs: the reference from the same bf16 values, the engine's result within one bf16
  rounding of it (relative 2^-8 per entry, plus 1e-6 absolute).
1-D tensors and embeddings equal task arithmetic (weight 1 per model, lambda = alpha) bit for bit.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from helpers import read_model, write_yaml
from merge_engine.config import parse_config
from merge_engine.errors import ConfigError
from merge_engine.methods import METHODS, get_method_spec
from merge_engine.methods.common import TensorContext
from merge_engine.options import MergeOptions
from merge_engine.streaming import run_merge

MERGEKIT_YAML = Path(sys.executable).parent / "mergekit-yaml"
SVD_METHODS = ("tsvm", "iso_c", "iso_cts")
EXACT_TOL = 1e-4
RANDOMIZED_TOL = 1e-2

# ----------------------------------------------------------------------------------------------
# float64 references, from the papers' equations


def _svd(a):
    return np.linalg.svd(a, full_matrices=False)


def _polar(a):
    p, _, qh = _svd(a)
    return p @ qh


def ref_task_arithmetic(base, xs, alpha):
    return base + alpha * sum(x - base for x in xs)


def ref_tsvm(base, xs, alpha=1.0, rank_share=None):
    """TSV-M: top-k (k = rank_share * r, default r / T) singular triplets of each task matrix,
    stacked; U and V orthogonalised (U_perp = P Q^T from svd(U) = P D Q^T); base + alpha U_perp S V_perp^T."""
    deltas = [x - base for x in xs]
    share = 1.0 / len(deltas) if rank_share is None else rank_share
    k = max(1, int(share * min(base.shape)))
    us, ss, vs = [], [], []
    for d in deltas:
        u, s, vh = _svd(d)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vh[:k].T)
    u_perp, v_perp = _polar(np.hstack(us)), _polar(np.hstack(vs))
    return base + alpha * u_perp @ np.diag(np.concatenate(ss)) @ v_perp.T


def ref_iso_c(base, xs, alpha=1.0):
    """Iso-C: D = sum of task matrices = U S V^T; base + alpha * mean(S) * U V^T."""
    u, s, vh = _svd(sum(x - base for x in xs))
    return base + alpha * s.mean() * u @ vh


def ref_iso_cts(base, xs, alpha=1.0, common_share=0.8):
    """Iso-CTS: top-k of the sum (k = common_share * r), each task's top (r - k) / T directions
    of (I - U_k U_k^T) D_t, bases stacked and orthogonalised, spectrum flattened to its mean."""
    deltas = [x - base for x in xs]
    r = min(base.shape)
    k = max(1, int(common_share * r))
    s_task = (r - k) // len(deltas)
    u, s, vh = _svd(sum(deltas))
    us, ss, vs = [u[:, :k]], [s[:k]], [vh[:k].T]
    for d in deltas:
        if s_task == 0:
            break
        ut, st, vht = _svd(d - us[0] @ (us[0].T @ d))
        us.append(ut[:, :s_task])
        ss.append(st[:s_task])
        vs.append(vht[:s_task].T)
    sigma = np.concatenate(ss).mean()
    return base + alpha * sigma * _polar(np.hstack(us)) @ _polar(np.hstack(vs)).T


REFERENCES = {"tsvm": ref_tsvm, "iso_c": ref_iso_c, "iso_cts": ref_iso_cts}


def reference(method, base, xs, **params):
    b = base.double().numpy()
    out = REFERENCES[method](b, [x.double().numpy() for x in xs], **params)
    return torch.from_numpy(out)


def engine(method, base, xs, name="model.layers.0.mlp.up_proj.weight", is_embed=False, seed=0, **params):
    spec = get_method_spec(method)
    resolved = {**spec.global_params, **params}
    return spec.function([base, *xs], 0, resolved, [{}] * (len(xs) + 1), TensorContext(name, is_embed, seed))


def update_error(got, want, base) -> float:
    """Relative Frobenius error of the update against the reference's."""
    b = base.double()
    return float(torch.linalg.matrix_norm(got.double() - want) / torch.linalg.matrix_norm(want - b))


def fine_tunes(shape, count, seed, scale=0.05, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(*shape, generator=g)
    xs = [base + scale * torch.randn(*shape, generator=g) for _ in range(count)]
    return base.to(dtype), [x.to(dtype) for x in xs]


def decaying_fine_tunes(shape, count, seed):
    """Task matrices with decaying spectra (sigma_i ~ i^-1 plus a little noise), as fine-tunes have."""
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    p = min(m, n)
    base = torch.randn(m, n, generator=g)
    xs = []
    for _ in range(count):
        u = torch.linalg.qr(torch.randn(m, p, generator=g)).Q
        v = torch.linalg.qr(torch.randn(n, p, generator=g)).Q
        s = 0.5 / (1.0 + torch.arange(p, dtype=torch.float32))
        xs.append(base + (u * s) @ v.T + 1e-4 * torch.randn(m, n, generator=g))
    return base, xs


# ----------------------------------------------------------------------------------------------
# random tensors


CASES = [
    ("tsvm", {}),
    ("tsvm", {"alpha": 0.7, "rank_share": 0.2}),
    ("iso_c", {}),
    ("iso_c", {"alpha": 1.4}),
    ("iso_cts", {}),
    ("iso_cts", {"alpha": 1.2, "common_share": 0.6}),
]


@pytest.mark.parametrize("method,params", CASES)
@pytest.mark.parametrize("shape,count", [((48, 32), 2), ((24, 64), 3)])
def test_random_float32_tensors_equal_the_float64_reference(method, params, shape, count):
    base, xs = fine_tunes(shape, count, seed=count)
    got = engine(method, base, xs, **params)
    assert got.dtype == torch.float32 and got.shape == base.shape
    want = reference(method, base, xs, **params)
    assert update_error(got, want, base) < EXACT_TOL


def gesdd_fails_in(monkeypatch, *dtypes):
    """torch.linalg.svd raising LAPACK's non-convergence for inputs of `dtypes`, as gesdd did in
    float32 on a real Iso-CTS basis (svd.thin_svd); returns the list of dtypes it was called with."""
    real = torch.linalg.svd
    calls = []

    def svd(a, *args, **kwargs):
        calls.append(a.dtype)
        if a.dtype in dtypes:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge (error code: 1).")
        return real(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", svd)
    return calls


@pytest.mark.parametrize("method,params", CASES)
def test_an_svd_that_does_not_converge_in_float32_is_retried_in_float64(monkeypatch, method, params):
    base, xs = fine_tunes((24, 64), 3, seed=5)
    want = reference(method, base, xs, **params)
    calls = gesdd_fails_in(monkeypatch, torch.float32)
    got = engine(method, base, xs, **params)
    assert got.dtype == torch.float32
    assert calls.count(torch.float64) == calls.count(torch.float32) > 0  # each failed SVD retried once, in float64
    assert update_error(got, want, base) < EXACT_TOL


def test_the_retry_returns_the_float64_factors_rounded_and_float64_failures_propagate(monkeypatch):
    from merge_engine.methods.svd import thin_svd

    a = torch.randn(20, 12, generator=torch.Generator().manual_seed(1))
    u64, s64, vh64 = torch.linalg.svd(a.double(), full_matrices=False)
    gesdd_fails_in(monkeypatch, torch.float32)
    u, s, vh = thin_svd(a)
    assert (u.dtype, s.dtype, vh.dtype) == (torch.float32,) * 3
    assert torch.equal(u, u64.float()) and torch.equal(s, s64.float()) and torch.equal(vh, vh64.float())
    gesdd_fails_in(monkeypatch, torch.float32, torch.float64)
    with pytest.raises(torch.linalg.LinAlgError):
        thin_svd(a)


def test_an_svd_that_never_converges_is_one_line_naming_the_tensor(monkeypatch):
    from merge_engine.errors import ModelError

    base, xs = fine_tunes((24, 64), 2, seed=6)
    gesdd_fails_in(monkeypatch, torch.float32, torch.float64)
    with pytest.raises(ModelError, match=r"^iso_cts: the SVD of tensor model\.layers\.3\.self_attn\.o_proj\.weight did not converge"):
        engine("iso_cts", base, xs, name="model.layers.3.self_attn.o_proj.weight")


@pytest.mark.parametrize("method", SVD_METHODS)
def test_bfloat16_inputs_are_computed_in_float32(method):
    base, xs = fine_tunes((40, 56), 2, seed=5, dtype=torch.bfloat16)
    got = engine(method, base, xs)
    assert got.dtype == torch.bfloat16
    want = reference(method, base, xs)
    # one bf16 rounding of the float32 result: within 2^-8 relative (plus float32 noise)
    assert bool(((got.double() - want).abs() <= want.abs() * 2.0**-8 + 1e-6).all())


@pytest.mark.slow
def test_randomized_svd_path_within_tolerance():
    """tsvm with 8 tasks keeps 37 of 300 directions each: below the randomized threshold
    (k + max(10, k) < 300 / 4)."""
    base, xs = decaying_fine_tunes((400, 300), 8, seed=11)
    got = engine("tsvm", base, xs)
    want = reference("tsvm", base, xs)
    assert update_error(got, want, base) < RANDOMIZED_TOL
    # seeded: the same seed gives the same tensor, another seed another (randomized) one
    assert torch.equal(got, engine("tsvm", base, xs))
    assert not torch.equal(got, engine("tsvm", base, xs, seed=1))


@pytest.mark.slow
def test_iso_cts_is_exact_where_its_task_rank_is_small():
    """iso_cts's task directions (30 of 300 here) come from exact SVDs: a flat spectrum weighs an
    approximate direction fully (docs/methods.md); the seed changes nothing."""
    base, xs = decaying_fine_tunes((400, 300), 2, seed=11)
    got = engine("iso_cts", base, xs)
    assert update_error(got, reference("iso_cts", base, xs), base) < EXACT_TOL
    assert torch.equal(got, engine("iso_cts", base, xs, seed=1))


@pytest.mark.parametrize("method", SVD_METHODS)
@pytest.mark.parametrize("shape,is_embed", [((32,), False), ((50, 16), True), ((3, 8, 4), False)])
def test_vectors_and_embeddings_are_task_arithmetic_bit_for_bit(method, shape, is_embed):
    base, xs = fine_tunes(shape, 2, seed=3)
    got = engine(method, base, xs, name="model.embed_tokens.weight" if is_embed else "x", is_embed=is_embed, alpha=0.8)
    ta = get_method_spec("task_arithmetic").function(
        [base, *xs], 0, {"normalize": False, "rescale": False, "lambda": 0.8, "int8_mask": False},
        [{"weight": 1.0, "density": 1.0}] * 3, TensorContext("x", is_embed),
    )
    assert torch.equal(got, ta)
    assert torch.allclose(got.double(), ref_task_arithmetic(base.double(), [x.double() for x in xs], 0.8), atol=1e-6)


def test_iso_c_flattens_the_spectrum_and_iso_cts_at_share_one_is_iso_c():
    base, xs = fine_tunes((40, 30), 3, seed=8)
    got = engine("iso_c", base, xs)
    s = torch.linalg.svdvals((got - base).double())
    total = torch.linalg.svdvals(sum(x - base for x in xs).double())
    assert float(s.max() - s.min()) < 1e-5 * float(s.max())  # flat
    assert abs(float(s.mean() - total.mean())) < 1e-5 * float(total.mean())  # at the sum's mean
    assert update_error(engine("iso_cts", base, xs, common_share=1.0), reference("iso_c", base, xs), base) < EXACT_TOL


def test_a_zero_task_matrix_contributes_nothing():
    """tsvm with one unchanged model: the other's top r/2 directions, exactly its truncated SVD."""
    base, (x, _) = fine_tunes((36, 24), 2, seed=4)
    got = engine("tsvm", base, [x, base.clone()])
    u, s, vh = np.linalg.svd((x - base).double().numpy(), full_matrices=False)
    want = base.double() + torch.from_numpy(u[:, :12] @ np.diag(s[:12]) @ vh[:12])
    assert update_error(got, want, base) < EXACT_TOL
    for method in SVD_METHODS:  # nothing changed: the base
        assert torch.equal(engine(method, base, [base.clone(), base.clone()]), base)


@pytest.mark.parametrize(
    "method,params,key",
    [
        ("tsvm", {"alpha": float("inf")}, "alpha"),
        ("tsvm", {"rank_share": 0.0}, "rank_share"),
        ("tsvm", {"rank_share": 1.5}, "rank_share"),
        ("iso_c", {"alpha": "big"}, "alpha"),
        ("iso_c", {"alpha": True}, "alpha"),
        ("iso_cts", {"common_share": -0.2}, "common_share"),
        ("iso_cts", {"common_share": 2}, "common_share"),
        ("iso_cts", {"common_share": None}, "common_share"),
    ],
)
def test_bad_values_are_one_line_config_errors_naming_the_key(method, params, key):
    base, xs = fine_tunes((8, 6), 2, seed=1)
    with pytest.raises(ConfigError) as info:
        engine(method, base, xs, **params)
    msg = str(info.value)
    assert "\n" not in msg and f"{method}: parameters.{key} must be" in msg and "model.layers.0.mlp.up_proj.weight" in msg


def test_base_model_is_required():
    for method in SVD_METHODS:
        assert METHODS[method].requires_base
        with pytest.raises(ConfigError, match="needs base_model"):
            from merge_engine.plan import check_recipe

            check_recipe(parse_config({"merge_method": method, "models": [{"model": "/a"}, {"model": "/b"}]}))


# ----------------------------------------------------------------------------------------------
# real checkpoints through the streaming engine


def recipe(llama_models, method: str, parameters: dict, dtype: str = "float32", weighted: bool = False) -> str:
    params = "\n".join(f"  {k}: {v}" for k, v in parameters.items())
    weight = "\n    parameters: {weight: 1.0}" if weighted else ""
    return (
        f"merge_method: {method}\nbase_model: {llama_models['base']}\ndtype: {dtype}\n"
        f"models:\n  - model: {llama_models['a']}{weight}\n  - model: {llama_models['b']}{weight}\n"
        + (f"parameters:\n{params}\n" if params else "")
    )


def merge(text: str, out: Path) -> dict[str, torch.Tensor]:
    config = parse_config(yaml.safe_load(text))
    run_merge(config, out, MergeOptions(quiet=True), config_text=text)
    return read_model(out)


LAYER = 4  # the llama_models fixture's layers


def alpha_for(name: str, alpha) -> float:
    """The alpha a tensor gets: a number, or (mlp value, other value) where mlp weights have a
    gradient [0.5, 1.5] over the 4 layers and everything else `other`."""
    if isinstance(alpha, (int, float)):
        return float(alpha)
    if ".mlp." in name:
        layer = int(name.split(".layers.")[1].split(".")[0])
        return 0.5 + layer / (LAYER - 1)
    return alpha[1]


@pytest.mark.parametrize(
    "method,params",
    [
        ("tsvm", {"alpha": 1.0}),
        ("iso_c", {"alpha": 1.3}),
        ("iso_cts", {"alpha": 1.0, "common_share": 0.7}),
        ("iso_c", {"alpha": "[{filter: mlp, value: [0.5, 1.5]}, {value: 0.9}]"}),
    ],
)
def test_real_checkpoint_merge_equals_the_reference(llama_models, tmp_path, method, params):
    out = merge(recipe(llama_models, method, params), tmp_path / "out")
    inputs = {k: read_model(v) for k, v in llama_models.items()}
    alpha = params["alpha"] if isinstance(params["alpha"], float) else (None, 0.9)
    extra = {k: v for k, v in params.items() if k != "alpha"}
    ta_alphas = {alpha_for(n, alpha) for n in out}
    ta = {a: merge(recipe(llama_models, "task_arithmetic", {"lambda": a}, weighted=True), tmp_path / f"ta{a}")
          for a in ta_alphas}
    checked = 0
    for name, got in out.items():
        base, xs = inputs["base"][name], [inputs["a"][name], inputs["b"][name]]
        a = alpha_for(name, alpha)
        if got.dim() == 2 and "embed_tokens" not in name and "lm_head" not in name:
            want = reference(method, base, xs, alpha=a, **extra)
            assert update_error(got, want, base) < EXACT_TOL, name
            checked += 1
        else:  # norms, embeddings, LM head: task arithmetic bit for bit
            assert torch.equal(got, ta[a][name]), name
    assert checked == 4 * 7


@pytest.mark.slow
def test_mergekit_yaml_cli_bfloat16(llama_models, tmp_path):
    cfg = write_yaml(tmp_path / "cfg.yml", recipe(llama_models, "tsvm", {"alpha": 1.1, "rank_share": 0.25}, "bfloat16"))
    proc = subprocess.run([str(MERGEKIT_YAML), str(cfg), str(tmp_path / "out"), "--quiet"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    out = read_model(tmp_path / "out")
    inputs = {k: read_model(v) for k, v in llama_models.items()}
    name = "model.layers.2.self_attn.o_proj.weight"
    got = out[name]
    assert got.dtype == torch.bfloat16
    base = inputs["base"][name].to(torch.bfloat16)
    xs = [inputs[k][name].to(torch.bfloat16) for k in ("a", "b")]
    want = reference("tsvm", base, xs, alpha=1.1, rank_share=0.25)
    assert bool(((got.double() - want).abs() <= want.abs() * 2.0**-8 + 1e-6).all())


@pytest.mark.slow
def test_bad_value_in_a_recipe_is_a_one_line_cli_error(llama_models, tmp_path):
    cfg = write_yaml(tmp_path / "cfg.yml", recipe(llama_models, "iso_cts", {"common_share": 1.5}))
    proc = subprocess.run([str(MERGEKIT_YAML), str(cfg), str(tmp_path / "out"), "--quiet"], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "iso_cts: parameters.common_share must be in (0, 1], got 1.5" in lines[0], proc.stderr


# ----------------------------------------------------------------------------------------------
# resident executor == streaming, bit for bit (the search's live model is the exported one)


@pytest.mark.parametrize("method", SVD_METHODS)
def test_resident_equals_streaming_bit_for_bit(llama_models, tmp_path, method):
    import random

    from evolve.config import parse_search_config
    from merge_engine.resident import ResidentMerger
    from search_spaces.genome import method_genome

    paths = {k: str(v) for k, v in llama_models.items()}
    genome = {"models": [paths["a"], paths["b"]], "merge_method": method, "base_model": paths["base"],
              "layer_granularity": 2, "filters": ["mlp"], "dtype": "bfloat16"}
    g = method_genome(parse_search_config({"genome": genome, "tasks": ["t"]}).genome, 4)
    rng = random.Random(7)
    cfg = g.decode([rng.uniform(d.low, d.high) for d in g.dimensions])
    merger = ResidentMerger(cfg, MergeOptions(quiet=True))
    try:
        model = merger.build_model(cfg)
        merger.apply(cfg)
        live = dict(model.state_dict())
    finally:
        merger.close()
    out = tmp_path / "out"
    run_merge(cfg, out, MergeOptions(quiet=True, random_seed=0), config_text=cfg.to_yaml())
    ref = read_model(out)
    assert set(live) == set(ref)
    for name, tensor in ref.items():
        assert torch.equal(live[name].to(tensor.dtype), tensor), name
