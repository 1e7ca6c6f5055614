"""breadcrumbs, breadcrumbs_ties, della, della_linear (docs/mergekit-reference.md §2) against independent
computations written here from the formulas of docs/mergekit-reference.md.

- breadcrumbs: the kept index set equals a plain-Python sort by (|delta|, -flat index), positions
  [n_bot, N - n_top) (mergekit keeps nothing when n_top == 0; we keep what the formula says);
  merged values bit-equal to the reference's combination, through the method functions and the CLI.
- della: the mask is exactly `uniform < p` with the uniforms of the documented counter-based
  stream (re-implemented in test_fused.py with numpy) and p from the rank formula; statistics: kept fractions per magnitude-rank decile match the keep
  probability (density - eps) + 2 eps rank / (C - 1) within a few standard deviations, and the
  L1 rescale restores the task vector's norm. Given the masks, della / della_linear values equal
  the reference's consensus / plain combination.
- both executors (streaming CLI, resident) give bit-identical tensors for the same seed.
(DARE's kept fraction and L1 rescale are covered in tests/test_methods.py.)
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from helpers import read_model, write_yaml
from test_fused import ref_mask_key, ref_uniforms
from test_errors import assert_user_error, leftovers, run_cli
from test_methods import (  # noqa: F401  (inputs: a fixture)
    assert_bit_equal,
    call,
    grad_value,
    inputs,
    layer_t,
    merge,
    randn,
    ref_gta,
)

from merge_engine.config import load_config
from merge_engine.errors import ModelError
from merge_engine.options import MergeOptions
from merge_engine.resident import ResidentMerger

TIED_VALUES = torch.tensor([0.5, -0.25, 0.25, -0.5, 1.0, 0.25, -0.25, 0.5, 0.25, -1.0, 0.125, 0.25])

# ----------------------------------------------------------------------------------------------
# Independent references (docs/mergekit-reference.md §2)


def breadcrumbs_counts(n, density, gamma):
    """mergekit's counts: target = int(density N), n_top = int(gamma N), n_bot = N - target - n_top,
    a negative n_bot moved into n_top."""
    target, top = int(density * n), int(gamma * n)
    bottom = n - target - top
    if bottom < 0:
        top += bottom
        bottom = 0
    return bottom, top


def ref_breadcrumbs_mask(delta, density, gamma):
    """Entries at positions [n_bot, N - n_top) of the ascending order of |delta|; equal magnitudes
    ordered by descending flat index (the lower index counts as larger, as in our TIES)."""
    n = delta.numel()
    if density >= 1:
        return torch.ones(delta.shape, dtype=torch.bool)
    bottom, top = breadcrumbs_counts(n, density, gamma)
    mag = delta.detach().abs().double().flatten().tolist()
    ascending = sorted(range(n), key=lambda j: (mag[j], -j))
    mask = torch.zeros(n, dtype=torch.bool)
    mask[ascending[bottom : n - top]] = True
    return mask.view(delta.shape)


def ref_row_ranks(delta):
    """0-based rank of |delta| within each row (dim 0 indexes rows; 1-D = one row), ties by position."""
    mag = delta.detach().abs().double().numpy()
    mag = mag.reshape(1, -1) if mag.ndim == 1 else mag.reshape(mag.shape[0], -1)
    order = np.argsort(mag, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(mag.shape[1])[None, :].repeat(mag.shape[0], 0), axis=1)
    return ranks.reshape(-1)


def della_probability(delta, density, eps):
    ranks = ref_row_ranks(delta)
    c = delta.numel() if delta.dim() <= 1 else delta.numel() // delta.shape[0]
    if c == 1:
        return np.full(ranks.shape, density)
    return (density - eps) + 2 * eps * ranks / (c - 1)


def assert_fraction(kept, prob, what, sigmas=5.0):
    """Bernoulli(prob) draws: the kept count is within `sigmas` standard deviations of its mean."""
    kept = np.asarray(kept, dtype=np.float64)
    mean, sd = prob.sum(), math.sqrt((prob * (1 - prob)).sum())
    assert abs(kept.sum() - mean) <= sigmas * sd, f"{what}: kept {kept.sum():.0f}, expected {mean:.1f} +- {sd:.1f}"


def nonzero(t):
    t = t.clone()
    t[t == 0] = 1e-3
    return t


# ----------------------------------------------------------------------------------------------
# breadcrumbs: the kept index set


def breadcrumbs_alone(delta, density, gamma, **params):
    """One task vector on a zero base, weight 1: the output is the sparsified task vector."""
    return call("breadcrumbs", [torch.zeros_like(delta), delta], 0, params, [{}, {"weight": 1.0, "density": density, "gamma": gamma}])


@pytest.mark.parametrize(
    "shape, density, gamma",
    [
        ((1000,), 0.5, 0.01),  # n_top 10, n_bot 490
        ((64, 64), 0.3, 0.05),
        ((37,), 0.5, 0.01),  # gamma * N < 1: n_top 0 (mergekit keeps nothing here)
        ((300,), 0.2, 0.0),  # gamma 0: plain top-k
        ((50,), 0.9, 0.2),  # target + n_top > N: n_bot < 0 moves into n_top
        ((100,), 0.0, 0.05),  # target 0: nothing kept
        ((40, 25), 0.999, 0.01),
    ],
)
def test_breadcrumbs_keeps_the_formulas_index_set(shape, density, gamma):
    delta = nonzero(randn(*shape, seed=sum(shape)))
    out = breadcrumbs_alone(delta, density, gamma)
    mask = ref_breadcrumbs_mask(delta, density, gamma)
    bottom, top = breadcrumbs_counts(delta.numel(), density, gamma)
    assert int(mask.sum()) == delta.numel() - bottom - top
    assert_bit_equal(out, delta * mask, f"{shape} density {density} gamma {gamma}")


def test_breadcrumbs_small_tensor_keeps_the_largest_not_nothing():
    delta = torch.arange(1.0, 41.0)  # 40 entries: int(0.01 * 40) == 0 top outliers
    out = breadcrumbs_alone(delta, 0.25, 0.01)
    assert torch.equal(out, torch.where(delta > 30, delta, 0.0))  # the 10 largest
    # gamma 0.05: 2 top outliers dropped, the next 10 kept
    out = breadcrumbs_alone(delta, 0.25, 0.05)
    assert torch.equal(out, torch.where((delta > 28) & (delta <= 38), delta, 0.0))


def test_breadcrumbs_density_one_is_unchanged_and_bad_gamma_is_an_error():
    delta = nonzero(randn(500, seed=3))
    assert torch.equal(breadcrumbs_alone(delta, 1.0, 0.2), delta)  # spec: density >= 1 -> input unchanged
    with pytest.raises(ModelError, match=r"gamma must be in \[0, 1\], got -0.1 for input 1 in tensor model.layers.0"):
        breadcrumbs_alone(delta, 0.5, -0.1)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("large", [False, True])
def test_breadcrumbs_tied_magnitudes_are_deterministic(dtype, large, monkeypatch):
    # many equal magnitudes: both cuts fall inside runs of ties. `large` forces the histogram
    # threshold path with slices small enough that the ties straddle several of them.
    if large:
        import merge_engine.methods.task_arithmetic as ta

        monkeypatch.setattr(ta, "SMALL_TENSOR", 0)
        monkeypatch.setattr(ta, "FUSED_CHUNK", 97)
    delta = TIED_VALUES.repeat(50).view(20, 30).to(dtype)
    for density, gamma in [(0.1, 0.05), (0.25, 0.1), (0.4, 0.2), (0.55, 0.3), (0.73, 0.01), (0.6, 0.6)]:
        out = breadcrumbs_alone(delta, density, gamma)
        assert_bit_equal(out, delta * ref_breadcrumbs_mask(delta, density, gamma), f"{dtype} {density} {gamma}")
    # random magnitudes (two-level float32 histogram)
    delta = nonzero(randn(50, 40, seed=4) * 0.01).to(dtype)
    for density, gamma in [(0.05, 0.01), (0.5, 0.1), (0.9, 0.05)]:
        out = breadcrumbs_alone(delta, density, gamma)
        assert_bit_equal(out, delta * ref_breadcrumbs_mask(delta, density, gamma), f"{dtype} random {density} {gamma}")


def test_breadcrumbs_rescale_matches_l1_of_the_dense_delta():
    delta = nonzero(randn(40, 25, seed=45))
    out = breadcrumbs_alone(delta, 0.3, 0.05, rescale=True)
    mask = ref_breadcrumbs_mask(delta, 0.3, 0.05)
    expected = delta * mask * (delta.abs().sum() / (delta * mask).abs().sum())
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.abs().sum(), delta.abs().sum(), rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------------------------
# breadcrumbs / breadcrumbs_ties: merged values


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("normalize, lam", [(False, 1.0), (True, 0.8)])
def test_breadcrumbs_three_models_match_reference(method, dtype, normalize, lam):
    base = randn(48, 40, seed=30, dtype=dtype)
    xs = [(base.float() + 0.05 * randn(48, 40, seed=31 + i)).to(dtype) for i in range(3)]
    ws, ds, gs = [0.7, -0.4, 1.1], [0.3, 0.6, 0.45], [0.02, 0.1, 0.0]
    mps = [{"weight": w, "density": d, "gamma": g} for w, d, g in zip(ws, ds, gs)]
    out = call(method, [xs[0], base, xs[1], xs[2]], 1, {"normalize": normalize, "lambda": lam}, [mps[0], {}, mps[1], mps[2]])
    masks = [ref_breadcrumbs_mask(x - base, d, g) for x, d, g in zip(xs, ds, gs)]
    ref = ref_gta(base, xs, ws, masks=masks, consensus=method == "breadcrumbs_ties", normalize=normalize, lam=lam)
    assert_bit_equal(out, ref, f"{method} {dtype}")


def _breadcrumbs_yaml(m, method):
    return f"""
merge_method: {method}
base_model: {m['base']}
models:
  - model: {m['a']}
    parameters:
      weight: 0.6
      density: 0.5
      gamma: 0.05
  - model: {m['b']}
    parameters:
      weight: [1.0, 0.2]
      density: 0.7
parameters:
  lambda: 0.9
  normalize: {str(method == 'breadcrumbs_ties').lower()}
"""


@pytest.mark.slow
@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs_end_to_end_cli(llama_models, inputs, tmp_path, method):
    out = merge(tmp_path, _breadcrumbs_yaml(llama_models, method), cli=True)
    assert set(out) == set(inputs["base"])
    small = 0
    for name, tensor in out.items():
        base, xs = inputs["base"][name], [inputs["a"][name], inputs["b"][name]]
        # gamma 0.01 (model b's default) on the 32-entry norms: no top outliers, top 70% kept
        small += int(0.01 * base.numel()) == 0
        masks = [ref_breadcrumbs_mask(xs[0] - base, 0.5, 0.05), ref_breadcrumbs_mask(xs[1] - base, 0.7, 0.01)]
        ref = ref_gta(base, xs, [0.6, grad_value([1.0, 0.2], layer_t(name))], masks=masks,
                      consensus=method == "breadcrumbs_ties", normalize=method == "breadcrumbs_ties", lam=0.9)
        assert_bit_equal(tensor, ref, name)
    assert small >= 9  # the norms exercise the n_top == 0 case


# ----------------------------------------------------------------------------------------------
# della: statistics of the keep probabilities


def della_alone(delta, density, eps, method="della_linear", seed=3, **params):
    return call(method, [torch.zeros_like(delta), delta], 0, params, [{}, {"weight": 1.0, "density": density, "epsilon": eps}], seed=seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_della_kept_fraction_follows_magnitude_rank(dtype):
    rows, c = 1000, 400
    delta = nonzero(randn(rows, c, seed=50) * 0.01).to(dtype)
    density, eps = 0.4, 0.15
    out = della_alone(delta, density, eps)
    kept = (out != 0).flatten().numpy()
    prob = della_probability(delta, density, eps)
    assert_fraction(kept, prob, "all")
    assert abs(kept.mean() - density) < 0.005
    ranks = ref_row_ranks(delta)
    fractions = []
    for decile in range(10):
        sel = ranks // (c // 10) == decile
        assert_fraction(kept[sel], prob[sel], f"decile {decile}")
        fractions.append(kept[sel].mean())
    # the smallest magnitudes ~ density - eps (+ a little), the largest ~ density + eps
    assert abs(fractions[0] - 0.2647) < 0.01 and abs(fractions[-1] - 0.5353) < 0.01, fractions
    # whole-tensor L1 rescale: the norm is the original's; kept entries all scaled alike (bf16:
    # both norms and their ratio are rounded to bf16, as in mergekit's work dtype: 3 x 2^-9)
    rtol = 3 * 2**-9 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.double().abs().sum(), delta.double().abs().sum(), rtol=rtol, atol=0)
    if dtype == torch.float32:
        mask = out != 0
        scale = delta.abs().sum() / (delta * mask).abs().sum()
        torch.testing.assert_close(out, delta * mask * scale, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_della_mask_is_the_documented_stream_below_the_rank_probability(dtype):
    delta = nonzero(randn(120, 300, seed=55) * 0.01).to(dtype)
    tensor = "model.layers.0.mlp.up_proj.weight"  # della_alone's tensor, seed 9, task vector 0
    out = della_alone(delta, 0.4, 0.15, seed=9, rescale=False)
    u = ref_uniforms(ref_mask_key(9, tensor, 0), delta.numel()).astype(np.float64)
    expected = u < della_probability(delta, 0.4, 0.15)
    assert np.array_equal((out != 0).flatten().numpy(), expected)
    assert torch.equal(out.flatten()[expected], delta.flatten()[expected])  # rescale off: untouched


def test_della_one_row_tensors_rank_over_the_whole_tensor():
    # a 1-D tensor is one row, longer than a slice of the streaming loop
    n = 600_000
    delta = nonzero(randn(n, seed=51))
    out = della_alone(delta, 0.5, 0.3, rescale=False)
    kept = (out != 0).numpy()
    prob = della_probability(delta, 0.5, 0.3)
    order = np.argsort(np.abs(delta.numpy()), kind="stable")
    assert_fraction(kept, prob, "1-D")
    lowest, highest = order[: n // 10], order[-n // 10 :]
    assert_fraction(kept[lowest], prob[lowest], "lowest decile")
    assert_fraction(kept[highest], prob[highest], "highest decile")
    assert kept[lowest].mean() < 0.25 and kept[highest].mean() > 0.75
    assert torch.equal(out[out != 0], delta[out != 0])  # rescale off: kept entries untouched


def test_della_single_entry_rows_keep_density_and_edge_densities():
    delta = nonzero(randn(50_000, 1, seed=52))
    out = della_alone(delta, 0.3, 0.1)
    assert torch.isfinite(out).all()
    assert_fraction((out != 0).flatten().numpy(), np.full(delta.numel(), 0.3), "C == 1")
    assert torch.equal(della_alone(delta, 0.0, 0.1), torch.zeros_like(delta))  # density 0: zeros
    assert torch.equal(della_alone(delta, 1.0, 0.1), delta)  # density 1: unchanged (no eps check)


def test_della_masks_do_not_depend_on_slicing(monkeypatch):
    # rows straddling the streaming loop's slices are ranked whole; the draws run in flat order
    import merge_engine.methods.task_arithmetic as ta

    delta = nonzero(randn(300, 70, seed=53))
    ref = della_alone(delta, 0.45, 0.2, method="della")
    monkeypatch.setattr(ta, "FUSED_CHUNK", 1000)  # not a multiple of the 70-entry rows
    assert_bit_equal(della_alone(delta, 0.45, 0.2, method="della"), ref)


@pytest.mark.parametrize("density, eps", [(0.1, 0.15), (0.9, 0.15), (0.5, 0.5)])
def test_della_epsilon_out_of_range_is_an_error(density, eps):
    delta = nonzero(randn(10, 10, seed=54))
    with pytest.raises(ModelError) as err:
        della_alone(delta, density, eps, method="della")
    message = str(err.value)
    assert "\n" not in message
    assert f"epsilon {eps}" in message and f"density {density}" in message
    assert "input 1" in message and "model.layers.0.mlp.up_proj.weight" in message


# ----------------------------------------------------------------------------------------------
# della vs della_linear given the masks


def test_della_and_della_linear_values_given_the_masks():
    base = torch.zeros(200, 150)
    xs = [nonzero(randn(200, 150, seed=60 + i) * 0.02) for i in range(2)]
    ds, eps = [0.5, 0.35], [0.2, 0.15]

    def run(method, weights, **params):
        mps = [{}] + [{"weight": w, "density": d, "epsilon": e} for w, d, e in zip(weights, ds, eps)]
        return call(method, [base] + xs, 0, params, mps, seed=9)

    # each model's mask (streams are per tensor and model position, not per method): seen alone
    # through a zero weight for the other model
    masks = []
    for i in range(2):
        alone = run("della_linear", [1.0 if j == i else 0.0 for j in range(2)])
        mask = alone != 0
        delta = xs[i] - base
        scale = delta.double().abs().sum() / (delta.double() * mask).abs().sum()
        torch.testing.assert_close(alone, (delta.double() * mask * scale).float(), rtol=1e-6, atol=1e-9)
        assert abs(mask.float().mean().item() - ds[i]) < 0.01
        masks.append(mask.float() * scale.float())
    ws = [0.6, 0.8]
    linear = run("della_linear", ws)
    torch.testing.assert_close(linear, ref_gta(base, xs, ws, masks=masks), rtol=1e-5, atol=1e-8)
    della = run("della", ws)  # consensus, normalize (della's default)
    torch.testing.assert_close(della, ref_gta(base, xs, ws, masks=masks, consensus=True, normalize=True), rtol=1e-5, atol=1e-8)
    unnormalized = run("della", ws, normalize=False, **{"lambda": 0.5})
    torch.testing.assert_close(unnormalized, ref_gta(base, xs, ws, masks=masks, consensus=True, lam=0.5), rtol=1e-5, atol=1e-8)
    # where both were kept with opposite signs, della takes one side, della_linear the sum
    both = (masks[0] != 0) & (masks[1] != 0) & (xs[0].sign() != xs[1].sign())
    assert int(both.sum()) > 1000 and not torch.allclose(della[both], linear[both])


# ----------------------------------------------------------------------------------------------
# CLI: seeds, errors; the resident executor


def _della_yaml(m, method="della", eps_a=0.1, dtype="float32"):
    return f"""
merge_method: {method}
base_model: {m['base']}
dtype: {dtype}
models:
  - model: {m['a']}
    parameters:
      weight: 0.6
      density: 0.5
      epsilon: {eps_a}
  - model: {m['b']}
    parameters:
      weight: 0.8
      density: 0.6
"""


def _cli(cfg, out, seed):
    proc = run_cli(cfg, out, "--quiet", "--random-seed", str(seed))
    assert proc.returncode == 0, proc.stderr
    return read_model(out)


@pytest.mark.slow
def test_della_cli_seeds_reproduce_files(llama_models, inputs, tmp_path):
    cfg = write_yaml(tmp_path / "della.yml", _della_yaml(llama_models))
    r1 = _cli(cfg, tmp_path / "s5", 5)
    _cli(cfg, tmp_path / "s5b", 5)
    r2 = _cli(cfg, tmp_path / "s6", 6)
    assert (tmp_path / "s5" / "model.safetensors").read_bytes() == (tmp_path / "s5b" / "model.safetensors").read_bytes()
    big = [n for n in r1 if r1[n].numel() >= 512]
    assert big and all(not torch.equal(r1[n], r2[n]) for n in big)
    # entries where both fine-tunes were dropped are exactly the base (P = 0.5 * 0.4)
    untouched = sum(int((r1[n] == inputs["base"][n]).sum()) for n in big) / sum(r1[n].numel() for n in big)
    assert abs(untouched - 0.5 * 0.4) < 0.02


@pytest.mark.slow
def test_della_cli_bad_epsilon_is_a_one_line_error(llama_models, tmp_path):
    cfg = write_yaml(tmp_path / "bad.yml", _della_yaml(llama_models, eps_a=0.6))
    out = tmp_path / "out"
    proc = run_cli(cfg, out, "--quiet", "--random-seed", "1")  # no progress bar on stderr
    assert_user_error(proc, out, "epsilon 0.6", "density 0.5", str(llama_models["a"]))
    assert not out.exists() and leftovers(out) == []


@pytest.mark.parametrize(
    "method, dtype", [("della", "float32"), ("della_linear", "bfloat16"), ("breadcrumbs", "float32"), ("breadcrumbs_ties", "bfloat16")]
)
@pytest.mark.slow
def test_resident_equals_streaming_cli(llama_models, tmp_path, method, dtype):
    m = llama_models
    if method.startswith("della"):
        texts = [_della_yaml(m, method, eps_a=0.1, dtype=dtype), _della_yaml(m, method, eps_a=0.3, dtype=dtype)]
    else:
        first = _breadcrumbs_yaml(m, method) + f"dtype: {dtype}\n"
        texts = [first, first.replace("gamma: 0.05", "gamma: 0.2")]
    configs = []
    for i, text in enumerate(texts):
        cfg = write_yaml(tmp_path / f"c{i}.yml", text)
        configs.append((load_config(cfg)[0], _cli(cfg, tmp_path / f"out{i}", 7)))
    merger = ResidentMerger(configs[0][0], MergeOptions(quiet=True, random_seed=7))
    try:
        model = merger.build_model(configs[0][0])
        for config, ref in configs:  # the second candidate changes only model a's epsilon / gamma
            stats = merger.apply(config)
            assert stats.recomputed > 0
            live = model.state_dict()
            assert set(live) == set(ref)
            for name, tensor in ref.items():
                assert_bit_equal(live[name], tensor, name)
        assert not torch.equal(configs[0][1]["model.layers.0.mlp.up_proj.weight"], configs[1][1]["model.layers.0.mlp.up_proj.weight"])
    finally:
        merger.close()
