"""Singular value decompositions shared by the engine: the seeded randomized top-k SVD (first
written for mergekit-extract-lora, now also used by the merge method `tsvm`) and
the orthonormal polar factor that decorrelates stacked singular bases. Torch only; no I/O."""

from __future__ import annotations

import torch


# Above this share of the smaller side, rank + oversampling is close to the full matrix: the exact
# SVD costs about the same and is exact.
EXACT_SVD_SHARE = 0.25
POWER_ITERATIONS = 3


def thin_svd(a: torch.Tensor):
    """`torch.linalg.svd(a, full_matrices=False)`, retried in float64 when LAPACK does not converge.

    On CPU torch runs LAPACK's divide-and-conquer SVD (gesdd), which in float32 can fail on a
    matrix whose singular values cluster: it did on a stack of orthonormal bases that Iso-CTS
    orthonormalises (SmolLM2-135M, layer 7 o_proj; docs/methods.md). Such a matrix is retried in
    float64 and its factors are rounded back to `a`'s dtype; a float64 failure is raised as it is.
    Both executors call this on the same matrices, so they agree where LAPACK behaves the same for
    them (same device and thread count)."""
    try:
        return torch.linalg.svd(a, full_matrices=False)
    except torch.linalg.LinAlgError:
        if a.dtype == torch.float64:
            raise
        u, s, vh = torch.linalg.svd(a.double(), full_matrices=False)
        return u.to(a.dtype), s.to(a.dtype), vh.to(a.dtype)


def top_singular_triplets(a, rank: int, seed: int = 0):
    """(U [m, r], S [r], Vh [r, n]): the top-`rank` singular triplets of the float32 matrix `a`.

    A seeded randomized SVD (a range finder with oversampling and power iterations, then the exact
    SVD of the small projected matrix; docs/extract-lora.md states its error bound), or the exact
    SVD when `rank` is a large share of the matrix. Deterministic for a given seed."""
    m, n = a.shape
    rank = min(rank, m, n)
    sketch = rank + max(10, rank)  # oversampling: as many directions again as are kept
    if sketch >= EXACT_SVD_SHARE * min(m, n):
        u, s, vh = thin_svd(a)
        return u[:, :rank], s[:rank], vh[:rank]
    generator = torch.Generator(device=a.device).manual_seed(seed)
    omega = torch.randn(n, sketch, generator=generator, device=a.device, dtype=a.dtype)
    q = torch.linalg.qr(a @ omega).Q
    for _ in range(POWER_ITERATIONS):  # sharpen the spectrum: (A A^T)^q A, orthonormalised each half step
        q = torch.linalg.qr(a.T @ q).Q
        q = torch.linalg.qr(a @ q).Q
    ub, s, vh = thin_svd(q.T @ a)
    return (q @ ub)[:, :rank], s[:rank], vh[:rank]


def polar_factor(a: torch.Tensor) -> torch.Tensor:
    """The orthonormal polar factor P Q^T of `a` = P D Q^T (thin SVD): the matrix with orthonormal
    columns (rows, when `a` is wide) nearest to `a` in Frobenius norm. A matrix whose columns are
    already orthonormal is returned as it is, up to rounding."""
    p, _, qh = thin_svd(a)
    return p @ qh
