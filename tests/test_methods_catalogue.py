"""The other merge methods of mergekit's catalogue: nuslerp, multislerp, karcher, model_stock, sce,
ram, ramplus_tl, nearswap, arcee_fusion (docs/mergekit-reference.md §2).

Each method is checked against a reference written here in float64 numpy straight from the reference's
formulas (loops over rows / positions where that is the plainest way to say it), first on small
random tensors, then end to end through the real `mergekit-yaml` CLI on the tiny llama models.
No reference calls merge_engine code.
"""

from __future__ import annotations

import itertools
import math
import subprocess

import numpy as np
import pytest
import torch

from helpers import read_model, write_yaml
from test_errors import fails
from test_methods import MERGEKIT_YAML, call, randn

from merge_engine.config import parse_config
from merge_engine.errors import ModelError
from merge_engine.methods import REQUIRED, get_method_spec
from merge_engine.methods.common import TensorContext
from merge_engine.options import MergeOptions
from merge_engine.resident import ResidentMerger


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).numpy().copy()


def close(actual: torch.Tensor, expected: np.ndarray, rtol=1e-5, atol=1e-6, name=""):
    assert tuple(actual.shape) == expected.shape, (name, actual.shape, expected.shape)
    assert torch.isfinite(actual).all(), name
    np.testing.assert_allclose(np64(actual), expected, rtol=rtol, atol=atol, err_msg=name)


# ----------------------------------------------------------------------------------------------
# float64 references (docs/mergekit-reference.md §2)


def ref_slerp_vector(t, x, y):
    """Reference §2.3 on one pair of vectors: unit vectors with a 1e-7 norm floor, lerp when sin θ ~ 0."""
    ux = x / max(np.linalg.norm(x), 1e-7)
    uy = y / max(np.linalg.norm(y), 1e-7)
    theta = np.arccos(np.clip(np.dot(ux, uy), -1, 1))
    if abs(np.sin(theta)) < 1e-8:
        return (1 - t) * x + t * y
    return (np.sin((1 - t) * theta) * x + np.sin(t * theta) * y) / np.sin(theta)


def ref_nuslerp(w1, w2, x1, x2, base=None, flatten=True, row_wise=False):
    t = 0.5 if abs(w1 + w2) < 1e-6 else w2 / (w1 + w2)
    a, b = np64(x1), np64(x2)
    if base is not None:
        a, b = a - np64(base), b - np64(base)
    out = np.empty_like(a)
    if flatten:
        out = ref_slerp_vector(t, a.ravel(), b.ravel()).reshape(a.shape)
    elif row_wise:  # vectors along dim 0: the columns of a matrix
        for j in range(a.shape[1]):
            out[:, j] = ref_slerp_vector(t, a[:, j], b[:, j])
    else:
        for i in range(a.shape[0]):
            out[i] = ref_slerp_vector(t, a[i], b[i])
    return out + np64(base) if base is not None else out


def ref_multislerp(xs, weights, base=None, normalize=True, eps=1e-8):
    shape = tuple(xs[0].shape)
    X = np.stack([np64(x).ravel() for x in xs])
    if base is not None:
        X = X - np64(base).ravel()
    w = np.array(weights, dtype=np.float64)
    if normalize:
        w = w / w.sum()
    n = np.linalg.norm(X, axis=1)
    U = X / (n + eps)[:, None]
    m = w @ U
    mhat = m / np.linalg.norm(m)
    V = U - (U @ mhat)[:, None] * mhat
    T = w @ V
    tau = np.linalg.norm(T) + eps
    r = (mhat * np.cos(tau) + T * np.sin(tau) / tau) * (w @ n)
    r = r.reshape(shape)
    return r + np64(base) if base is not None else r


def ref_karcher(xs, max_iter=10, tol=1e-5):
    """Reference §2.5 as a plain float64 loop."""
    vs = [np64(x).ravel() for x in xs]
    n = len(vs)
    norms = [np.linalg.norm(v) for v in vs]
    units = [v / nv if nv != 0 else np.zeros_like(v) for v, nv in zip(vs, norms)]
    valid = [i for i in range(n) if norms[i] > tol]
    alpha = {i: 1 / len(valid) for i in valid}
    u = sum(alpha[i] * units[i] for i in valid)
    u = units[valid[0]] if np.linalg.norm(u) < tol else u / np.linalg.norm(u)
    for _ in range(max_iter):
        T = np.zeros_like(u)
        for i in valid:
            d = np.clip(np.dot(u, units[i]), -1, 1)
            th = np.arccos(d)
            if th >= tol:
                T += alpha[i] * th / np.sin(th) * (units[i] - d * u)
        nt = np.linalg.norm(T)
        if nt < tol:
            break
        u = np.cos(nt) * u + np.sin(nt) * T / nt
        if np.linalg.norm(u) > tol:
            u = u / np.linalg.norm(u)
    return (sum(norms) / n * u).reshape(tuple(xs[0].shape))


def ref_model_stock(base, xs, filter_wise):
    w0 = np64(base)
    ws = [np64(x) for x in xs]
    shape = w0.shape
    if filter_wise:
        rows = lambda a: a.reshape(1, -1) if a.ndim == 1 else a.reshape(-1, shape[-1])  # noqa: E731
    else:
        rows = lambda a: a.reshape(1, -1)  # noqa: E731
    r0, rs = rows(w0), [rows(w) for w in ws]
    n = len(ws)
    out = np.empty_like(r0)
    for r in range(r0.shape[0]):
        d = [w[r] - r0[r] for w in rs]
        cos = np.mean([
            np.clip(np.dot(d[i], d[j]) / max(np.linalg.norm(d[i]) * np.linalg.norm(d[j]), 1e-6), -1, 1)
            for i, j in itertools.combinations(range(n), 2)
        ])
        t = n * cos / (1 + (n - 1) * cos)
        out[r] = t * np.mean([w[r] for w in rs], axis=0) + (1 - t) * r0[r]
    return out.reshape(shape)


def ref_sce(base, xs, select_topk=1.0):
    """Returns (result, ambiguous positions: float32 rounding could decide them either way)."""
    B = np64(base)
    T = np.stack([np64(x) - B for x in xs])
    ambiguous = np.zeros(B.shape, dtype=bool)
    if select_topk < 1:
        v = T.var(axis=0)
        k = int(np.count_nonzero(v) * select_topk)
        mask = np.zeros(v.size, dtype=bool)
        if k > 0:
            order = np.argsort(-np.abs(v).ravel(), kind="stable")
            mask[order[:k]] = True
            ranked = np.abs(v).ravel()[order]
            boundary = (ranked[k - 1] + (ranked[k] if k < ranked.size else 0.0)) / 2
            ambiguous |= np.abs(np.abs(v) - boundary) <= 1e-5 * boundary
        T = T * mask.reshape(v.shape)
    S = T.sum(axis=0)
    largest = np.abs(T).max(axis=0)
    ambiguous |= (np.abs(S) <= 1e-5 * largest) & (largest > 0)
    majority = np.where(S >= 0, 1.0, -1.0)
    E = np.sign(T) == majority
    q = np.array([np.mean(t**2) for t in T])
    q = np.full(len(T), 1 / len(T)) if abs(q.sum()) < 1e-6 else q / q.sum()
    num = sum(q[i] * T[i] * E[i] for i in range(len(T)))
    den = np.maximum(sum(q[i] * E[i] for i in range(len(T))), 1e-6)
    return B + num / den, ambiguous


def ref_ram(base, xs, eps=1e-5, plus=False, r=0.1, alpha=0.2):
    """Reference §2.9 position by position."""
    B = np64(base).ravel()
    T = [np64(x).ravel() - B for x in xs]
    n, size = len(T), B.size
    active = [[abs(T[i][p]) > eps for p in range(size)] for i in range(n)]
    count = [sum(active[i][p] for i in range(n)) for p in range(size)]
    lam = [1.0] * n
    if plus:
        for i in range(n):
            shared = sum(1 for p in range(size) if active[i][p] and count[p] > 1)
            unique = sum(1 for p in range(size) if active[i][p] and count[p] == 1)
            lam[i] = 1 + r * min(max(shared / max(unique, eps), 0), alpha)
    out = B.copy()
    for p in range(size):
        act = [i for i in range(n) if active[i][p]]
        if len(act) == 1:
            out[p] += lam[act[0]] * T[act[0]][p]
        elif len(act) > 1:
            out[p] += sum(T[i][p] for i in act) / len(act)
    return out.reshape(tuple(base.shape))


def ref_nearswap(base, x, t):
    a, b = np64(base), np64(x)
    w = np.clip(t / np.maximum(np.abs(a - b), 1e-6), 0, 1)
    return w * b + (1 - w) * a


def ref_importance(base, x):
    """|x - base| times the row's KL(softmax(x) || softmax(base)), softmaxes + 1e-8, row by row."""
    a, b = np64(base), np64(x)
    rows_a, rows_b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    kl = np.empty(rows_a.shape[0])
    for r in range(rows_a.shape[0]):
        p = np.exp(rows_b[r] - rows_b[r].max())
        p = p / p.sum() + 1e-8
        q = np.exp(rows_a[r] - rows_a[r].max())
        q = q / q.sum() + 1e-8
        kl[r] = np.sum(p * np.log(p / q))
    return (np.abs(b - a).reshape(rows_a.shape) * kl[:, None]).reshape(a.shape)


def ref_arcee_fusion(base, x, sample=None, band=1e-5):
    """(result, positions within `band` (relative) of the threshold); `sample`: flat indices the
    quantiles are taken over. The KL of nearly equal rows carries a relative error ~1e-3 in
    float32 (log(p/q) of p ~ q), so fine-tune-sized changes need a wider band."""
    a, b = np64(base), np64(x)
    imp = ref_importance(base, x)
    values = imp.ravel() if sample is None else imp.ravel()[sample]
    s = np.sort(values)
    q1, med, q3 = (s[int(q * (len(s) - 1))] for q in (0.25, 0.5, 0.75))
    thr = med + 1.5 * (q3 - q1)
    keep = imp >= thr
    return a + keep * (b - a), np.abs(imp - thr) <= band * abs(thr)


def close_except(actual, expected, ambiguous, rtol=1e-5, atol=1e-6, name="", most=0.001):
    """`close`, except at the few positions where float32 rounding may flip a selection."""
    act = np64(actual)
    assert act.shape == expected.shape, name
    assert torch.isfinite(actual).all(), name
    ok = np.isclose(act, expected, rtol=rtol, atol=atol)
    assert np.all(ok | ambiguous), f"{name}: {int((~ok & ~ambiguous).sum())} entries differ"
    assert ambiguous.sum() <= max(2, most * ambiguous.size), name  # the reference is well-conditioned


# ----------------------------------------------------------------------------------------------
# registry (docs/mergekit-reference.md §2)


def test_registry_parameters_and_defaults_match_spec():
    expected = {
        "nuslerp": ({"nuslerp_row_wise": False, "nuslerp_flatten": True}, {"weight": REQUIRED}, False, False),
        "multislerp": ({"normalize_weights": True, "eps": 1e-8}, {"weight": REQUIRED}, False, False),
        "karcher": ({"max_iter": 10, "tol": 1e-5}, {}, False, False),
        "model_stock": ({"filter_wise": False}, {}, True, False),
        "sce": ({"int8_mask": False, "select_topk": 1.0}, {}, True, False),
        "ram": ({"epsilon": 1e-5}, {}, True, False),
        "ramplus_tl": ({"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}, {}, True, False),
        "nearswap": ({"t": REQUIRED}, {}, True, False),
        "arcee_fusion": ({}, {}, True, True),
    }
    for name, (glob, per_model, needs_base, random) in expected.items():
        spec = get_method_spec(name)
        assert (spec.global_params, spec.model_params, spec.requires_base, spec.random) == (glob, per_model, needs_base, random), name
        assert callable(spec.function), name


# ----------------------------------------------------------------------------------------------
# nuslerp


VARIANTS = {"flatten": (True, False), "row_wise": (False, True), "last_dim": (False, False)}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("weights", [(1.0, 3.0), (0.7, 0.2), (1.0, -1.0)])  # t = 0.75, 2/9, 0.5
def test_nuslerp_matches_formula(variant, with_base, weights):
    flatten, row_wise = VARIANTS[variant]
    params = {"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}
    base = randn(6, 5, seed=1)
    x1 = base + 0.3 * randn(6, 5, seed=2)
    x2 = base + 0.3 * randn(6, 5, seed=3)
    w1, w2 = weights
    if with_base:
        # base between the models in source order
        out = call("nuslerp", [x1, base, x2], 1, params, [{"weight": w1}, {"weight": None}, {"weight": w2}])
        expected = ref_nuslerp(w1, w2, x1, x2, base, flatten, row_wise)
    else:
        out = call("nuslerp", [x1, x2], None, params, [{"weight": w1}, {"weight": w2}])
        expected = ref_nuslerp(w1, w2, x1, x2, None, flatten, row_wise)
    close(out, expected, name=f"{variant} base={with_base} w={weights}")
    # the three layouts really differ on these inputs
    other = "last_dim" if variant != "last_dim" else "flatten"
    assert not np.allclose(expected, ref_nuslerp(w1, w2, x1, x2, base if with_base else None, *VARIANTS[other]))


def test_nuslerp_weights_summing_to_zero_mean_half_and_order_does_not_matter():
    x1, x2 = randn(4, 8, seed=4), randn(4, 8, seed=5)
    out = call("nuslerp", [x1, x2], None, {}, [{"weight": 2.0}, {"weight": -2.0}])
    close(out, ref_slerp_vector(0.5, np64(x1).ravel(), np64(x2).ravel()).reshape(4, 8))
    swapped = call("nuslerp", [x2, x1], None, {}, [{"weight": -2.0}, {"weight": 2.0}])
    torch.testing.assert_close(swapped, out, rtol=1e-6, atol=1e-6)


def test_nuslerp_identical_rows_fall_back_to_lerp_without_nan():
    x1 = randn(5, 6, seed=6)
    x2 = randn(5, 6, seed=7)
    x1[2] = torch.tensor([3.0, 0, 0, 0, 0, 0])
    x2[2] = x1[2]  # identical: cos exactly 1, sin θ = 0 (the slerp formula would give 0/0)
    x2[3] = 2 * x1[3]  # colinear, different norms
    x2[4] = x1[4]  # identical, cos rounds near 1
    out = call("nuslerp", [x1, x2], None, {"nuslerp_flatten": False}, [{"weight": 1.0}, {"weight": 1.0}])
    assert torch.isfinite(out).all()
    assert torch.equal(out[2], x1[2])
    close(out[4], np64(x1[4]))
    close(out, ref_nuslerp(1.0, 1.0, x1, x2, flatten=False))
    close(out[3], 1.5 * np64(x1[3]))


def test_nuslerp_model_count_errors_and_single_input():
    v = randn(3, 3, seed=8)
    w = [{"weight": 1.0}] * 3
    assert torch.equal(call("nuslerp", [v], None, {}, w[:1]), v)
    with pytest.raises(ModelError, match=r"tensor model\.layers\.0\.mlp\.up_proj\.weight has 3 inputs"):
        call("nuslerp", [v, v, v], None, {}, w)
    with pytest.raises(ModelError, match=r"has 2 inputs \(base plus 1\)"):
        call("nuslerp", [v, v], 0, {}, w[:2])
    with pytest.raises(ModelError, match="4 inputs"):
        call("nuslerp", [v, v, v, v], 0, {}, w + w[:1])


def test_nuslerp_embeddings_use_the_common_block():
    x1, x2, base = randn(10, 4, seed=9), randn(12, 4, seed=10), randn(11, 4, seed=11)
    out = call("nuslerp", [x1, x2, base], 2, {}, [{"weight": 1.0}, {"weight": 1.0}, {"weight": None}], is_embed=True)
    close(out, ref_nuslerp(1.0, 1.0, x1, x2[:10], base[:10]))


# ----------------------------------------------------------------------------------------------
# multislerp


def test_multislerp_with_base_matches_formula():
    base = randn(7, 6, seed=12)
    xs = [base + 0.2 * randn(7, 6, seed=13 + i) for i in range(3)]
    weights = [0.5, 0.3, 0.8]
    tensors = [xs[0], xs[1], base, xs[2]]
    mps = [{"weight": 0.5}, {"weight": 0.3}, {"weight": None}, {"weight": 0.8}]
    out = call("multislerp", tensors, 2, {}, mps)
    close(out, ref_multislerp(xs, weights, base))
    # without normalisation the result scales with the weights' sum: Σw n_i grows, direction not
    out_raw = call("multislerp", tensors, 2, {"normalize_weights": False}, mps)
    close(out_raw, ref_multislerp(xs, weights, base, normalize=False))
    assert not np.allclose(np64(out_raw), np64(out))


def test_multislerp_without_base_and_single_model():
    xs = [randn(16, seed=20 + i) for i in range(3)]
    out = call("multislerp", xs, None, {}, [{"weight": w} for w in (1.0, 2.0, 1.0)])
    close(out, ref_multislerp(xs, [1.0, 2.0, 1.0]))
    # two models at equal weights, equal norms: the normalised midpoint times the norm
    a = randn(16, seed=24)
    b = randn(16, seed=25)
    b = b * (a.norm() / b.norm())
    mid = np64(a) + np64(b)
    close(call("multislerp", [a, b], None, {}, [{"weight": 1.0}] * 2), mid / np.linalg.norm(mid) * float(a.norm()))
    # N = 1: returned unchanged, with or without a base
    assert torch.equal(call("multislerp", [xs[0]], None, {}, [{"weight": 0.3}]), xs[0])
    assert torch.equal(call("multislerp", [xs[1], xs[0]], 1, {}, [{"weight": 0.3}, {"weight": None}]), xs[1])


def test_multislerp_antipodal():
    x = randn(8, seed=26)
    # two antipodal models: the weighted linear combination
    out = call("multislerp", [x, -2 * x], None, {}, [{"weight": 1.0}] * 2)
    close(out, -0.5 * np64(x))
    # three directions 120 degrees apart in a plane, equal weights: no mean direction
    e1 = torch.zeros(8)
    e1[0] = 1.0
    e2 = torch.zeros(8)
    e2[1] = 1.0
    c, s = -0.5, math.sqrt(3) / 2
    xs = [e1, c * e1 + s * e2, c * e1 - s * e2]
    with pytest.raises(ModelError, match=r"the 3 models of tensor model\.layers\.0\.mlp\.up_proj\.weight are antipodal"):
        call("multislerp", xs, None, {}, [{"weight": 1.0}] * 3)


# ----------------------------------------------------------------------------------------------
# karcher


def test_karcher_two_equal_norm_vectors_is_the_scaled_midpoint():
    a = randn(6, 4, seed=30)
    b = randn(6, 4, seed=31)
    b = b * (a.norm() / b.norm())
    out = call("karcher", [a, b])
    mid = np64(a) + np64(b)
    close(out, mid / np.linalg.norm(mid) * float(a.norm()))


@pytest.mark.parametrize("max_iter", [1.0, 2.0, 40.0])  # integers arrive as floats
def test_karcher_general_case_matches_an_independent_iteration(max_iter):
    xs = [randn(5, 6, seed=32) * 1.0, randn(5, 6, seed=33) * 3.0, randn(5, 6, seed=34) * 0.5 + 0.5]
    out = call("karcher", xs, None, {"max_iter": max_iter, "tol": 1e-6})
    expected = ref_karcher(xs, int(max_iter), 1e-6)
    close(out, expected, rtol=1e-4, atol=1e-5)
    if max_iter == 40.0:
        # converged: the tangent vectors to the inputs (log maps) sum to zero at the mean
        u = expected.ravel() / np.linalg.norm(expected)
        grad = np.zeros_like(u)
        for x in xs:
            v = np64(x).ravel() / np.linalg.norm(np64(x))
            d = np.dot(u, v)
            grad += np.arccos(d) / np.sqrt(1 - d * d) * (v - d * u)
        assert np.linalg.norm(grad) < 1e-5
    else:
        assert not np.allclose(expected, ref_karcher(xs, 40, 1e-6), rtol=1e-4, atol=1e-5)


def test_karcher_zero_input_counts_in_the_scale_only_and_base_is_an_input():
    a, b = randn(10, seed=35), randn(10, seed=36) * 2
    z = torch.zeros(10)
    out = call("karcher", [a, z, b], 1)  # the base is just another input
    direction = ref_karcher([a, b], 10, 1e-5)
    direction = direction / np.linalg.norm(direction)
    close(out, direction * (float(a.norm()) + float(b.norm())) / 3)
    assert torch.equal(call("karcher", [z, z]), z)
    assert torch.equal(call("karcher", [a]), a)


def test_karcher_embeddings_use_the_common_block():
    xs = [randn(10, 4, seed=37), randn(12, 4, seed=38), randn(11, 5, seed=39)]
    out = call("karcher", xs, is_embed=True)
    close(out, ref_karcher([x[:10, :4] for x in xs]), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# model_stock


@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("shape", [(6, 5), (9,)])
@pytest.mark.parametrize("count", [2, 3])
def test_model_stock_matches_formula(filter_wise, shape, count):
    base = randn(*shape, seed=40)
    shared = 0.2 * randn(*shape, seed=41)  # correlated task vectors: cos well away from 0
    xs = [base + shared + 0.2 * randn(*shape, seed=42 + i) for i in range(count)]
    out = call("model_stock", [xs[0], base] + xs[1:], 1, {"filter_wise": filter_wise})
    close(out, ref_model_stock(base, xs, filter_wise), rtol=1e-5, atol=1e-5)


def test_model_stock_t_from_a_known_angle():
    base = randn(4, seed=45)
    e1 = torch.tensor([1.0, 0.0, 0.0, 0.0])
    e2 = torch.tensor([0.0, 1.0, 0.0, 0.0])
    d1 = 2 * e1
    d2 = 3 * (0.6 * e1 + 0.8 * e2)  # cos = 0.6 -> t = 2 * 0.6 / 1.6 = 0.75
    out = call("model_stock", [base, base + d1, base + d2], 0)
    close(out, np64(base) + 0.75 * (np64(d1) + np64(d2)) / 2, rtol=1e-6, atol=1e-6)
    # filter_wise: row 0 as above, row 1 with orthogonal offsets (cos 0 -> t 0: the base row)
    base2 = torch.stack([base, base])
    d1r = torch.stack([d1, e1])
    d2r = torch.stack([d2, e2])
    out = call("model_stock", [base2, base2 + d1r, base2 + d2r], 0, {"filter_wise": True})
    close(out[0], np64(base) + 0.75 * (np64(d1) + np64(d2)) / 2, rtol=1e-6, atol=1e-6)
    close(out[1], np64(base), rtol=1e-6, atol=1e-6)


def test_model_stock_input_count_errors():
    v = randn(3, 3, seed=46)
    assert torch.equal(call("model_stock", [v], 0), v)
    with pytest.raises(ModelError, match=r"tensor model\.layers\.0\.mlp\.up_proj\.weight has 2 inputs \(base plus 1\)"):
        call("model_stock", [v, v + 1], 0)
    with pytest.raises(ModelError, match="needs base_model"):
        call("model_stock", [v, v + 1, v + 2], None)


# ----------------------------------------------------------------------------------------------
# sce


def _sce_inputs(scale=0.3):
    base = randn(8, 6, seed=50)
    xs = [base + scale * randn(8, 6, seed=51 + i) for i in range(3)]
    for x in xs:
        x[0] = base[0]  # a row no model changes: zero variance, left out of the top-k count
    return base, xs


@pytest.mark.parametrize("select_topk", [1.0, 0.5, 0.1, 0.0])
def test_sce_matches_formula(select_topk):
    base, xs = _sce_inputs()
    out = call("sce", [base] + xs, 0, {"select_topk": select_topk})
    expected, ambiguous = ref_sce(base, xs, select_topk)
    assert not ambiguous.any()
    close(out, expected)
    if select_topk == 0.0:
        assert torch.equal(out, base)


def test_sce_uniform_matrix_weights_for_tiny_task_vectors():
    base, xs = _sce_inputs(scale=1e-4)  # mean(τ²) ~ 1e-8: Σq < 1e-6, weights 1/N
    out = call("sce", xs[:1] + [base] + xs[1:], 1, {"select_topk": 0.5})
    expected, ambiguous = ref_sce(base, xs, 0.5)
    assert not ambiguous.any()
    close(out, expected, rtol=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------------------------
# ram, ramplus_tl


def _sparse_task_vectors():
    """Task vectors that are zero (or below epsilon) in random places: positions changed by no
    model, by one, by several; model 0 changes mostly alone, model 2 mostly with others."""
    base = randn(10, 8, seed=60)
    g = torch.Generator().manual_seed(61)
    keep = [0.5, 0.4, 0.9]
    xs = []
    for i, p in enumerate(keep):
        delta = 0.1 * randn(10, 8, seed=62 + i)
        delta = delta * (torch.rand(10, 8, generator=g) < p)
        delta[torch.rand(10, 8, generator=g) < 0.1] = 1e-7  # inactive: below epsilon
        xs.append(base + delta)
    return base, xs


def test_ram_matches_formula():
    base, xs = _sparse_task_vectors()
    for eps in (1e-5, 0.05):
        out = call("ram", [base] + xs, 0, {"epsilon": eps})
        close(out, ref_ram(base, xs, eps), name=f"eps={eps}")


@pytest.mark.parametrize("r, alpha", [(0.1, 0.2), (0.5, 2.0), (1.0, 0.5)])
def test_ramplus_tl_matches_formula(r, alpha):
    base, xs = _sparse_task_vectors()
    params = {"r": r, "alpha": alpha, "epsilon": 1e-5}
    out = call("ramplus_tl", [xs[0], base, xs[1], xs[2]], 1, params)
    expected = ref_ram(base, xs, 1e-5, plus=True, r=r, alpha=alpha)
    close(out, expected)
    assert not np.allclose(expected, ref_ram(base, xs, 1e-5))  # the boost changes something


def test_ram_single_model_and_base_only():
    base, xs = _sparse_task_vectors()
    assert torch.equal(call("ram", [base], 0), base)
    close(call("ramplus_tl", [base, xs[0]], 0), ref_ram(base, xs[:1], plus=True))


# ----------------------------------------------------------------------------------------------
# nearswap


@pytest.mark.parametrize("t", [0.0, 0.05, 0.2, 10.0])
def test_nearswap_matches_formula(t):
    base = randn(6, 7, seed=70)
    x = base + 0.1 * randn(6, 7, seed=71)
    x[0, 0] = base[0, 0]  # equal entries: the 1e-6 floor, no division by zero
    out = call("nearswap", [x, base], 1, {"t": t})
    close(out, ref_nearswap(base, x, t))
    if t == 10.0:
        close(out, np64(x))


def test_nearswap_model_count():
    v = randn(4, seed=72)
    assert torch.equal(call("nearswap", [v], 0, {"t": 0.1}), v)
    with pytest.raises(ModelError, match=r"tensor model\.layers\.0\.mlp\.up_proj\.weight has 3 inputs \(base plus 2\)"):
        call("nearswap", [v, v + 1, v + 2], 0, {"t": 0.1})
    with pytest.raises(ModelError, match="needs base_model"):
        call("nearswap", [v, v + 1], None, {"t": 0.1})


# ----------------------------------------------------------------------------------------------
# arcee_fusion


@pytest.mark.parametrize("shape", [(12, 16), (40,)])
def test_arcee_fusion_matches_formula(shape):
    base = randn(*shape, seed=80)
    x = base + 0.5 * randn(*shape, seed=81)
    out = call("arcee_fusion", [base, x], 0)
    expected, ambiguous = ref_arcee_fusion(base, x)
    assert not ambiguous.any()
    close(out, expected)
    kept = np.isclose(np64(out), np64(x)) & ~np.isclose(np64(x), np64(base))
    assert 0 < kept.sum() < kept.size  # some changes kept, some dropped


def test_arcee_fusion_model_count():
    v = randn(4, 4, seed=82)
    assert torch.equal(call("arcee_fusion", [v], 0), v)
    with pytest.raises(ModelError, match=r"has 3 inputs \(base plus 2\)"):
        call("arcee_fusion", [v, v + 1, v + 2], 0)
    with pytest.raises(ModelError, match=r"has 2 inputs \(no base\)"):
        call("arcee_fusion", [v, v + 1], None)


@pytest.mark.slow
def test_arcee_fusion_samples_quantiles_from_the_seeded_generator():
    name = "model.embed_tokens.weight"
    base = randn(1001, 1000, seed=83)  # 1,001,000 entries: over the 1e6 sample
    x = base + 0.5 * randn(1001, 1000, seed=84)

    def fused(seed, tensor_name=name):
        return call("arcee_fusion", [base, x], 0, tensor_name=tensor_name, seed=seed)

    first = fused(0)
    assert torch.equal(fused(0), first)
    # the sample: 1e6 positions drawn with replacement from the tensor's seeded generator
    idx = torch.randint(base.numel(), (1_000_000,), generator=TensorContext(name, seed=0).generator(torch.device("cpu")))
    expected, ambiguous = ref_arcee_fusion(base, x, sample=idx.numpy())
    close_except(first, expected, ambiguous)
    # another seed or tensor name draws another sample (the threshold moves a little)
    assert not torch.equal(fused(1), first)
    assert not torch.equal(fused(0, "lm_head.weight"), first)


# ----------------------------------------------------------------------------------------------
# end to end: the real mergekit-yaml CLI on the tiny llama models


@pytest.fixture(scope="module")
def inputs(llama_models):
    return {k: read_model(v) for k, v in llama_models.items()}


def _cli(tmp_path, text, name="out"):
    cfg = write_yaml(tmp_path / f"{name}.yml", text)
    out = tmp_path / name
    proc = subprocess.run([str(MERGEKIT_YAML), str(cfg), str(out), "--quiet"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out


def _e2e_cases(m):
    """(recipe, reference(name, inputs) -> (expected, ambiguous or None))."""
    B, A, C = "base", "a", "b"
    return {
        "nuslerp": (
            f"merge_method: nuslerp\nbase_model: {m[B]}\nmodels:\n  - model: {m[A]}\n    parameters: {{weight: 1.0}}\n"
            f"  - model: {m[C]}\n    parameters: {{weight: 2.0}}\n",
            lambda n, x: (ref_nuslerp(1.0, 2.0, x[A][n], x[C][n], x[B][n]), None),
        ),
        "nuslerp_row_wise_no_base": (
            f"merge_method: nuslerp\nparameters: {{nuslerp_flatten: false, nuslerp_row_wise: true}}\nmodels:\n"
            f"  - model: {m[A]}\n    parameters: {{weight: 0.3}}\n  - model: {m[C]}\n    parameters: {{weight: 0.5}}\n",
            lambda n, x: (
                ref_nuslerp(0.3, 0.5, x[A][n], x[C][n], flatten=x[A][n].dim() == 1, row_wise=x[A][n].dim() == 2),
                None,
            ),
        ),
        "multislerp": (
            f"merge_method: multislerp\nbase_model: {m[B]}\nmodels:\n  - model: {m[A]}\n    parameters: {{weight: 0.7}}\n"
            f"  - model: {m[C]}\n    parameters: {{weight: 0.3}}\n",
            lambda n, x: (ref_multislerp([x[A][n], x[C][n]], [0.7, 0.3], x[B][n]), None),
        ),
        "karcher": (
            f"merge_method: karcher\nparameters: {{max_iter: 20}}\nmodels:\n  - model: {m[B]}\n  - model: {m[A]}\n  - model: {m[C]}\n",
            lambda n, x: (ref_karcher([x[B][n], x[A][n], x[C][n]], 20), None),
        ),
        "model_stock": (
            f"merge_method: model_stock\nbase_model: {m[B]}\nparameters: {{filter_wise: true}}\n"
            f"models:\n  - model: {m[A]}\n  - model: {m[C]}\n",
            lambda n, x: (ref_model_stock(x[B][n], [x[A][n], x[C][n]], True), None),
        ),
        "sce": (
            f"merge_method: sce\nbase_model: {m[B]}\nparameters: {{select_topk: 0.5}}\n"
            f"models:\n  - model: {m[A]}\n  - model: {m[C]}\n",
            lambda n, x: ref_sce(x[B][n], [x[A][n], x[C][n]], 0.5),
        ),
        "ram": (
            f"merge_method: ram\nbase_model: {m[B]}\nmodels:\n  - model: {m[A]}\n  - model: {m[C]}\n",
            lambda n, x: (_ref_ram_fast(x[B][n], [x[A][n], x[C][n]]), None),
        ),
        "ramplus_tl": (
            f"merge_method: ramplus_tl\nbase_model: {m[B]}\nparameters: {{r: 0.3, alpha: 0.5, epsilon: 0.01}}\n"
            f"models:\n  - model: {m[A]}\n  - model: {m[C]}\n",
            lambda n, x: (_ref_ram_fast(x[B][n], [x[A][n], x[C][n]], 0.01, True, 0.3, 0.5), None),
        ),
        "nearswap": (
            f"merge_method: nearswap\nbase_model: {m[B]}\nparameters: {{t: 0.01}}\nmodels:\n  - model: {m[A]}\n",
            lambda n, x: (ref_nearswap(x[B][n], x[A][n], 0.01), None),
        ),
        "arcee_fusion": (
            f"merge_method: arcee_fusion\nbase_model: {m[B]}\nmodels:\n  - model: {m[A]}\n",
            lambda n, x: ref_arcee_fusion(x[B][n], x[A][n], band=5e-3),
        ),
    }


def _ref_ram_fast(base, xs, eps=1e-5, plus=False, r=0.1, alpha=0.2):
    """ref_ram vectorised over positions (the position loop is too slow for the llama tensors);
    checked equal to ref_ram on small tensors in test_ram_reference_agrees."""
    B = np64(base).ravel()
    T = np.stack([np64(x).ravel() - B for x in xs])
    active = np.abs(T) > eps
    count = active.sum(axis=0)
    lam = np.ones(len(T))
    if plus:
        for i in range(len(T)):
            shared = np.sum(active[i] & (count > 1))
            unique = np.sum(active[i] & (count == 1))
            lam[i] = 1 + r * min(max(shared / max(unique, eps), 0), alpha)
    merged = np.where(count == 1, (lam[:, None] * T * active).sum(axis=0), 0.0)
    merged += np.where(count > 1, (T * active).sum(axis=0) / np.maximum(count, 1), 0.0)
    return (B + merged).reshape(tuple(base.shape))


def test_ram_reference_agrees():
    base, xs = _sparse_task_vectors()
    for plus, r, alpha in ((False, 0.1, 0.2), (True, 0.5, 2.0), (True, 1.0, 0.5)):
        np.testing.assert_allclose(
            _ref_ram_fast(base, xs, 1e-5, plus, r, alpha), ref_ram(base, xs, 1e-5, plus, r, alpha), rtol=1e-12
        )


E2E = list(_e2e_cases({"base": "", "a": "", "b": ""}))


@pytest.mark.slow
@pytest.mark.parametrize("case", E2E)
def test_end_to_end_cli(llama_models, inputs, tmp_path, case):
    from transformers import AutoModelForCausalLM

    recipe, reference = _e2e_cases({k: str(v) for k, v in llama_models.items()})[case]
    out_dir = _cli(tmp_path, recipe)
    out = read_model(out_dir)
    assert set(out) == set(inputs["base"])
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    state = model.state_dict()
    assert all(torch.isfinite(p).all() for p in state.values())
    for name, tensor in out.items():
        assert tensor.dtype == torch.float32, name
        assert torch.equal(state[name], tensor), name
        expected, ambiguous = reference(name, inputs)
        if ambiguous is None:
            close(tensor, expected, rtol=1e-4, atol=1e-6, name=name)
        else:
            close_except(tensor, expected, ambiguous, rtol=1e-4, atol=1e-6, name=name, most=0.02)
    # the merge did something: not the base, not a copy of one input
    changed = "model.layers.1.mlp.up_proj.weight"
    assert not torch.equal(out[changed], inputs["base"][changed])
    assert not torch.equal(out[changed], inputs["a"][changed])


@pytest.mark.slow
def test_cli_nuslerp_three_models_without_base(llama_models, tmp_path):
    m = llama_models
    line = fails(
        tmp_path,
        "merge_method: nuslerp\nmodels:\n"
        + "".join(f"  - model: {m[k]}\n    parameters: {{weight: 1.0}}\n" for k in ("base", "a", "b")),
        "nuslerp", "model.embed_tokens.weight", "3 inputs", flags=("--quiet",),
    )
    assert "exactly two models" in line


@pytest.mark.slow
def test_cli_model_stock_base_plus_one(llama_models, tmp_path):
    m = llama_models
    fails(
        tmp_path,
        f"merge_method: model_stock\nbase_model: {m['base']}\nmodels:\n  - model: {m['a']}\n",
        "model_stock", "model.embed_tokens.weight", "2 inputs (base plus 1)", flags=("--quiet",),
    )


@pytest.mark.slow
def test_resident_model_stock_equals_streaming(llama_models, tmp_path):
    m = {k: str(v) for k, v in llama_models.items()}
    recipe = (
        f"merge_method: model_stock\nbase_model: {m['base']}\ndtype: bfloat16\n"
        f"parameters: {{filter_wise: true}}\nmodels:\n  - model: {m['a']}\n  - model: {m['b']}\n"
    )
    streamed = read_model(_cli(tmp_path, recipe))
    import yaml

    config = parse_config(yaml.safe_load(recipe))
    merger = ResidentMerger(config, MergeOptions(quiet=True))
    try:
        resident = merger.merged_tensors(config)
    finally:
        merger.close()
    assert set(resident) == set(streamed)
    for name, tensor in streamed.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(resident[name], tensor), name


# ----------------------------------------------------------------------------------------------
# large tensors: whole-tensor reductions summed over several slices, rows processed in blocks


BIG = (1100, 2000)  # 2.2M entries: more than one slice of CHUNK_ELEMENTS (2^21), two row blocks


@pytest.mark.slow
def test_spherical_methods_and_model_stock_on_tensors_of_several_slices():
    base = randn(*BIG, seed=60)
    x1 = base + 0.5 * randn(*BIG, seed=61)
    x2 = base + 0.5 * randn(*BIG, seed=62) + 0.3 * (x1 - base)
    mps = [{"weight": 0.3}, {"weight": None}, {"weight": 0.9}]
    for variant, (flatten, row_wise) in VARIANTS.items():
        params = {"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}
        out = call("nuslerp", [x1, base, x2], 1, params, mps)
        close(out, ref_nuslerp(0.3, 0.9, x1, x2, base, flatten, row_wise), rtol=1e-4, atol=1e-5, name=variant)
    out = call("multislerp", [x1, base, x2], 1, {}, mps)
    close(out, ref_multislerp([x1, x2], [0.3, 0.9], base), rtol=1e-4, atol=1e-5)
    xs = [x1, 2 * base, x2]
    close(call("karcher", xs, None, {"max_iter": 3.0}), ref_karcher(xs, 3), rtol=1e-4, atol=1e-5)
    for filter_wise in (False, True):
        out = call("model_stock", [x1, base, x2], 1, {"filter_wise": filter_wise})
        close(out, ref_model_stock(base, [x1, x2], filter_wise), rtol=1e-4, atol=1e-5, name=str(filter_wise))


@pytest.mark.parametrize("method", ["slerp", "nuslerp", "multislerp", "karcher", "model_stock"])
def test_sliced_methods_write_into_the_output_buffer(method):
    base = randn(40, 30, seed=63, dtype=torch.bfloat16)
    xs = [base, base + randn(40, 30, seed=64, dtype=torch.bfloat16), base - randn(40, 30, seed=65, dtype=torch.bfloat16)]
    if method == "slerp":
        xs = xs[:2]
    spec = get_method_spec(method)
    params = {k: v for k, v in spec.global_params.items() if v is not REQUIRED}
    params.update({"t": 0.4} if method == "slerp" else {})
    mps = [{"weight": None if i == 0 else 0.5} for i in range(len(xs))]
    expected = spec.function(list(xs), 0, params, mps, TensorContext("model.layers.0.mlp.up_proj.weight"))
    buffer = torch.full_like(base, float("nan"))
    ctx = TensorContext("model.layers.0.mlp.up_proj.weight", out=buffer)
    out = spec.function(list(xs), 0, params, mps, ctx)
    assert out.data_ptr() == buffer.data_ptr()
    assert torch.equal(buffer, expected)
    assert not torch.equal(expected, base)  # a real merge, not the base passed through
