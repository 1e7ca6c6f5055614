"""The reference TIES (merge_engine/methods/reference.py): checked against a per-entry float64 loop
written from the definition, then the engine's two TIES paths (the torch ops, the fused CPU
kernel) against it, bit for bit: both repeat the reference's op sequence in the tensor's dtype, so
every rounding is the same (docs/methods.md)."""

from __future__ import annotations

import pytest
import torch
from test_fused import run_both
from test_methods import call

from merge_engine.methods import fused, reference

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def loop_ties(base, xs, weights, densities, normalize=True, lam=1.0):
    """TIES entry by entry in Python floats (float64), the trim by an explicit ranking."""
    b = base.double().flatten().tolist()
    n = len(b)
    vectors = []
    for x, w, density in zip(xs, weights, densities):
        d = (x.double().flatten() - base.double().flatten()).tolist()
        k = n if density >= 1 else int(density * n)
        # rank by magnitude, larger first; of equal magnitudes the lower index first
        ranked = sorted(range(n), key=lambda j: (-abs(d[j]), j))
        kept = set(ranked[:k])
        vectors.append([w * d[j] if j in kept else 0.0 for j in range(n)])
    out = []
    for j in range(n):
        total = sum(v[j] for v in vectors)
        sign = 1.0 if total >= 0 else -1.0
        agree = [i for i, v in enumerate(vectors) if v[j] * sign > 0]
        merged = sum(vectors[i][j] for i in agree)
        divisor = sum(weights[i] for i in agree) or 1.0
        out.append(b[j] + lam * (merged / divisor if normalize else merged))
    return torch.tensor(out, dtype=torch.float64).view(base.shape)


def grid_inputs(shape, count, dtype, seed):
    """Task-vector entries on a coarse grid: many equal magnitudes, so the trim's tie rule matters;
    some zero entries and sign conflicts between the models."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(shape, generator=g) * 0.05).to(dtype)
    xs = []
    for m in range(count):
        steps = torch.randint(-12, 13, shape, generator=g).to(torch.float32) / 512
        xs.append((base.float() + steps).to(dtype))
    return base, xs


@pytest.mark.parametrize("normalize,lam", [(True, 1.0), (False, 1.0), (True, 0.5)])
@pytest.mark.parametrize("weights,densities", [([0.7, 0.4], [0.3, 0.6]), ([1.0, -0.5, 0.25], [0.5, 1.0, 0.1])])
def test_reference_follows_the_definition(weights, densities, normalize, lam):
    # float64 tensors: the reference's roundings are those of the loop, up to the summation order
    base, xs = grid_inputs((9, 7), len(weights), torch.float64, seed=len(weights))
    expected = loop_ties(base, xs, weights, densities, normalize, lam)
    torch.testing.assert_close(reference.ties(base, xs, weights, densities, normalize, lam), expected, rtol=1e-12, atol=1e-15)


def test_trim_keeps_exactly_k_and_breaks_ties_by_lowest_index():
    delta = torch.tensor([0.5, -1.0, 0.5, 1.0, -0.5, 0.25, 0.5])
    # k = int(0.5 * 7) = 3: the two magnitudes 1.0, then the first 0.5 (index 0)
    assert reference.trim_mask(delta, 0.5).tolist() == [True, True, False, True, False, False, False]
    assert int(reference.trim_mask(delta, 0.99).sum()) == 6
    assert not reference.trim_mask(delta, 0.1).any()


SHAPES = [(11, 13), (190, 173), (20011,), (4, 64, 70)]  # below and above the kernel's minimum size


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    "weights,densities,normalize,lam",
    [
        ([0.5, 0.7], [0.3, 0.6], True, 1.0),
        ([1.0, -0.6], [0.5, 0.5], False, 1.0),
        ([0.5, 0.7, 0.3], [0.3, 0.6, 1.0], True, 1.0),
        ([0.8, 0.3, -0.2], [0.2, 0.9, 0.5], True, 0.7),
    ],
)
@pytest.mark.slow
def test_engine_ties_equals_the_reference_bit_for_bit(monkeypatch, dtype, shape, weights, densities, normalize, lam):
    base, xs = grid_inputs(shape, len(weights), dtype, seed=sum(shape))
    tensors = [base] + xs
    params = {"normalize": normalize, "lambda": lam}
    model_params = [{}] + [{"weight": w, "density": d} for w, d in zip(weights, densities)]
    expected = reference.ties(base, xs, weights, densities, normalize, lam)

    eager, result, used = run_both(monkeypatch, lambda: call("ties", tensors, 0, params, model_params))
    assert eager.dtype == dtype and torch.equal(eager, expected), f"{int((eager != expected).sum())} entries differ"
    # the kernel takes bf16/float32, 16K entries or more, lambda 1
    takes = dtype != torch.float16 and base.numel() >= fused.MIN_FUSED_NUMEL and lam == 1.0
    assert used == (takes and fused.available())
    assert torch.equal(result, expected), f"{int((result != expected).sum())} entries differ"
