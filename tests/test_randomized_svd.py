"""The randomized SVD of mergekit-extract-lora against exact singular values."""

from __future__ import annotations

import pytest
import torch

from merge_engine.extract_lora import EXACT_SVD_SHARE, low_rank_factors, top_singular_triplets


def decaying(m: int, n: int, seed: int, noise: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    p = min(m, n)
    u = torch.linalg.qr(torch.randn(m, p, generator=g)).Q
    v = torch.linalg.qr(torch.randn(n, p, generator=g)).Q
    s = 1.0 / (1.0 + torch.arange(p, dtype=torch.float32)) ** 0.7
    return (u * s) @ v.T + noise * torch.randn(m, n, generator=g)


def optimum(a: torch.Tensor, r: int) -> float:
    return float(torch.linalg.svdvals(a.double())[r:].square().sum().sqrt())


@pytest.mark.slow
def test_error_is_within_one_percent_of_the_exact_optimum():
    for seed, (m, n) in enumerate([(600, 400), (300, 900)]):
        a = decaying(m, n, seed, noise=0.01)
        for r in (8, 32):
            u, s, vh = top_singular_triplets(a, r)
            assert u.shape == (m, r) and s.shape == (r,) and vh.shape == (r, n)
            err = float(torch.linalg.matrix_norm((a - (u * s) @ vh).double()))
            assert err <= 1.01 * optimum(a, r), (m, n, r, err, optimum(a, r))
            exact = torch.linalg.svdvals(a)[:r]
            # a projection never overstates a singular value; the leading ones are found accurately
            assert bool((s <= exact * (1 + 1e-5)).all()) and bool((s >= 0.9 * exact).all())
            assert abs(float(s[0] / exact[0]) - 1) < 1e-3


@pytest.mark.slow
def test_an_exactly_low_rank_matrix_is_recovered():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(500, 6, generator=g) @ torch.randn(6, 700, generator=g)
    lora_a, lora_b = low_rank_factors(a, 16, 0.0, True)
    assert torch.allclose(lora_b @ lora_a, a, atol=1e-4 * float(a.abs().max()))
    # --sv-epsilon cuts the rank at the true rank
    lo, hi = low_rank_factors(a, 16, 1e-3 * float(torch.linalg.svdvals(a)[0]), False)
    assert lo.shape[0] == 6 and hi.shape[1] == 6


@pytest.mark.slow
def test_seeded_and_exact_for_large_ranks():
    a = decaying(400, 300, 7, noise=0.05)
    first, again = top_singular_triplets(a, 16), top_singular_triplets(a, 16)
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    r = int(EXACT_SVD_SHARE * 300)  # rank + oversampling past the threshold: the exact SVD
    u, s, vh = top_singular_triplets(a, r)
    full = torch.linalg.svd(a, full_matrices=False)
    assert torch.equal(s, full.S[:r]) and torch.equal(u, full.U[:, :r])
