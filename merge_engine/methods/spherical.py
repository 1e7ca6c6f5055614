"""Spherical averages of several models: `nuslerp` (docs/mergekit-reference.md §2), `multislerp`, `karcher`.

Memory stays bounded for the largest embedding: whole-tensor reductions (norms, dot products) are
accumulated slice by slice in float64 (`sliced_sums`), and the result is written slice by slice
into one output tensor, so the only full-size tensor besides the inputs is the output. Summing in
slices changes results by float rounding only. nuslerp and multislerp otherwise keep mergekit's op
sequence in the inputs' dtype; karcher iterates on coefficients (see there).
"""

from __future__ import annotations

import math

import torch

from ..errors import ModelError
from .common import (
    CHUNK_ELEMENTS,
    TensorContext,
    check_same_shape,
    chunk_bounds,
    flat,
    new_output,
    rectify_embed_sizes,
    sliced_sums,
    sum_squares,
    weighted_sum_into,
)

NUSLERP_NORM_EPS = 1e-7
NUSLERP_SIN_EPS = 1e-8
NUSLERP_WEIGHT_EPS = 1e-6


def _scalar(value, like: torch.Tensor) -> torch.Tensor:
    """A float64 sum rounded once to the math dtype, where mergekit's reduction returns that dtype."""
    return torch.as_tensor(value, dtype=like.dtype, device=like.device)


def _others(tensors, base_index) -> list[int]:
    return [i for i in range(len(tensors)) if i != base_index]


# -- nuslerp ------------------------------------------------------------------------------------


def _slerp_combine(t: float, theta: torch.Tensor, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """(sin((1-t)θ)·v0 + sin(tθ)·v1) / sin θ, with θ broadcasting over the vectors' entries."""
    sin_theta = torch.sin(theta)
    res = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    # (nearly) colinear vectors: the angle carries no information, interpolate linearly
    colinear = sin_theta.abs() < NUSLERP_SIN_EPS
    if bool(colinear.any()):
        res = torch.where(colinear, (1 - t) * v0 + t * v1, res)
    return res


def _pair(views, start: int, end: int):
    """Slice [start:end] of v0 and v1: the two models, or their task vectors when views[2] is the base."""
    v0, v1 = views[0][start:end], views[1][start:end]
    if len(views) == 2:
        return v0, v1
    part = views[2][start:end]
    return v0 - part, v1 - part


def _row_angles(v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """The angle between each pair of vectors along the last dim, kept as a trailing dim."""
    u0 = v0 / v0.norm(dim=-1, keepdim=True).clamp_min(NUSLERP_NORM_EPS)
    u1 = v1 / v1.norm(dim=-1, keepdim=True).clamp_min(NUSLERP_NORM_EPS)
    return torch.acos((u0 * u1).sum(dim=-1).clamp(-1, 1)).unsqueeze(-1)


def _whole_angle(views, numel: int) -> torch.Tensor:
    """The angle between v0 and v1 as whole-tensor vectors, summed slice by slice."""

    def norm_terms(start, end):
        v0, v1 = _pair(views, start, end)
        return torch.stack([sum_squares(v0), sum_squares(v1)])

    like = views[0]
    n0, n1 = (_scalar(math.sqrt(ss), like).clamp_min(NUSLERP_NORM_EPS) for ss in sliced_sums(numel, norm_terms).tolist())

    def dot_terms(start, end):
        v0, v1 = _pair(views, start, end)
        return ((v0 / n0) * (v1 / n1)).sum(dtype=torch.float32).reshape(1)

    dot = sliced_sums(numel, dot_terms).item()
    return torch.acos(_scalar(dot, like).clamp(-1, 1))


def _vectors(x: torch.Tensor, row_wise: bool) -> torch.Tensor:
    """A view with one vector per index of dim 0, its entries along the last dim: vectors along
    dim 0 (`row_wise`: mergekit transposes dims 0 and -1) or along the last dim; a 1-D tensor is
    one vector."""
    if x.dim() < 2:
        return x.reshape(1, -1)
    return x.transpose(0, -1) if row_wise else x


def nuslerp_vectors(t: float, views, out: torch.Tensor, flatten: bool, row_wise: bool) -> torch.Tensor:
    """Slerp of v0 -> v1 at t, one angle per vector, written into `out` (plus the base when
    `views` holds one): views are the two models (and base) as tensors shaped like `out`. The
    vectors are the whole tensor (`flatten`), or those of `_vectors`, processed in blocks of rows."""
    if flatten:
        views = [flat(v) for v in views]
        out_view = out.view(-1)
        theta = _whole_angle(views, out.numel())
        bounds = chunk_bounds(out.numel())
    else:
        views = [_vectors(v, row_wise) for v in views]
        out_view = _vectors(out, row_wise)
        theta = None  # one angle per row, computed block by block
        rows = out_view.shape[0]
        bounds = chunk_bounds(rows, max(1, CHUNK_ELEMENTS * rows // max(1, out.numel())))
    for start, end in bounds:
        v0, v1 = _pair(views, start, end)
        res = _slerp_combine(t, theta if theta is not None else _row_angles(v0, v1), v0, v1)
        out_view[start:end] = res if len(views) == 2 else views[2][start:end] + res
    return out


def nuslerp(tensors, base_index, params, model_params, ctx: TensorContext) -> torch.Tensor:
    if len(tensors) == 1:
        return tensors[0]
    others = _others(tensors, base_index)
    if len(others) != 2:
        detail = f"base plus {len(others)}" if base_index is not None else "no base_model"
        raise ModelError(
            f"nuslerp merges exactly two models (plus an optional base_model): tensor {ctx.name} has "
            f"{len(tensors)} inputs ({detail})"
        )
    i1, i2 = others
    w1, w2 = float(model_params[i1]["weight"]), float(model_params[i2]["weight"])
    t = 0.5 if abs(w1 + w2) < NUSLERP_WEIGHT_EPS else w2 / (w1 + w2)
    order = others + ([base_index] if base_index is not None else [])
    rect = rectify_embed_sizes([tensors[i] for i in order], ctx)
    check_same_shape(rect, ctx)
    flatten, row_wise = bool(params["nuslerp_flatten"]), bool(params["nuslerp_row_wise"])
    return nuslerp_vectors(t, rect, new_output(ctx, rect[0]), flatten, row_wise)


# -- multislerp ---------------------------------------------------------------------------------


def multislerp(tensors, base_index, params, model_params, ctx: TensorContext) -> torch.Tensor:
    others = _others(tensors, base_index)
    if not others:
        return tensors[base_index]
    if len(others) == 1:
        return tensors[others[0]]
    # mergekit stacks the inputs, so embeddings of different vocabularies would fail there:
    # the common top-left block is the planned output shape
    rect = rectify_embed_sizes(list(tensors), ctx)
    check_same_shape(rect, ctx)
    xs = [flat(rect[i]) for i in others]
    base = flat(rect[base_index]) if base_index is not None else None
    eps = float(params["eps"])
    out = new_output(ctx, rect[others[0]])
    out_flat = out.view(-1)
    numel = out.numel()
    like = xs[0]
    w = torch.tensor([float(model_params[i]["weight"]) for i in others], dtype=like.dtype, device=like.device)
    if params["normalize_weights"]:
        w = w / w.sum()
    w_col = w.unsqueeze(-1)

    def task_vectors(start, end):
        x = torch.stack([x[start:end] for x in xs], dim=0)
        return x if base is None else x - base[start:end]

    def with_base(res, start, end):
        return res if base is None else res + base[start:end]

    norms = _scalar(sliced_sums(numel, lambda s, e: sum_squares(task_vectors(s, e))).sqrt(), like).unsqueeze(-1)

    def mean_terms(start, end):
        # the weighted mean of the unit vectors goes straight into the output, read back below
        units = task_vectors(start, end) / (norms + eps)
        out_flat[start:end] = (units * w_col).sum(dim=0)
        return sum_squares(out_flat[start:end]).reshape(1)

    mean_norm = _scalar(sliced_sums(numel, mean_terms).sqrt(), like).squeeze(0)
    if mean_norm < eps:
        if len(others) != 2:
            raise ModelError(
                f"multislerp: the {len(others)} models of tensor {ctx.name} are antipodal (their weighted "
                "mean direction is zero), no spherical average exists"
            )
        for start, end in chunk_bounds(numel):
            out_flat[start:end] = with_base((task_vectors(start, end) * w_col).sum(dim=0), start, end)
        return out
    # mergekit then steps from m̂ = m/‖m‖ along T = Σ w_i (u_i - (u_i·m̂) m̂) = m - (m·m̂) m̂, which
    # is zero in exact arithmetic (m̂ is the mean's own direction): the step only adds rounding
    # noise, so the result is m̂ scaled by the weighted norm.
    scale = (w * norms.squeeze(-1)).sum()
    for start, end in chunk_bounds(numel):
        out_flat[start:end] = with_base((out_flat[start:end] / mean_norm) * scale, start, end)
    return out


# -- karcher ------------------------------------------------------------------------------------


def karcher(tensors, base_index, params, model_params, ctx: TensorContext) -> torch.Tensor:
    """Riemannian (Karcher) mean of the directions, scaled by the mean norm. Every input counts,
    the base included, with equal weight.

    Every iterate u is a linear combination Σ β_i u_i of the unit inputs (the start is, and each
    step adds tangents u_i - d_i·u), so the iteration runs on the coefficients β in float64 with
    the inner products taken from the inputs' Gram matrix (one pass over the data), and the result
    is formed once, in float32, from the inputs. Equal to mergekit's full-tensor iteration (in the
    inputs' dtype) up to float rounding."""
    if len(tensors) == 1:
        return tensors[0]
    # mergekit rectifies temporary pairs (a no-op): here every input is cut to the common block
    rect = rectify_embed_sizes(list(tensors), ctx)
    check_same_shape(rect, ctx)
    max_iter = int(params["max_iter"])
    tol = float(params["tol"])
    n = len(rect)
    xs = [flat(x) for x in rect]
    out = new_output(ctx, rect[0])

    def gram_terms(start, end):
        s = torch.stack([x[start:end] for x in xs], dim=0).double()
        return (s @ s.T).reshape(-1)

    gram = sliced_sums(out.numel(), gram_terms).cpu().view(n, n)
    norms = gram.diagonal().sqrt()
    valid = [i for i in range(n) if norms[i] > tol]
    if not valid:
        return out.zero_()
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    units_gram = gram / (safe.unsqueeze(0) * safe.unsqueeze(1))  # zero rows for zero inputs

    def norm(coef: torch.Tensor) -> float:
        return math.sqrt(max(float(coef @ units_gram @ coef), 0.0))

    alphas = torch.zeros(n, dtype=torch.float64)
    alphas[valid] = 1.0 / len(valid)
    beta = alphas.clone()
    u_norm = norm(beta)
    if u_norm < tol:
        beta = torch.zeros_like(alphas)
        beta[valid[0]] = 1.0
    else:
        beta = beta / u_norm
    for _ in range(max_iter):
        dots = (units_gram @ beta).clamp(-1.0, 1.0)
        tangent = torch.zeros_like(beta)
        for i in valid:
            d = float(dots[i])
            theta = math.acos(d)
            if theta < tol:
                continue
            k = float(alphas[i]) * theta / math.sin(theta)
            tangent[i] += k  # k·(u_i - d·u)
            tangent -= (k * d) * beta
        t_norm = norm(tangent)
        if t_norm < tol:
            break
        beta = math.cos(t_norm) * beta + (math.sin(t_norm) / t_norm) * tangent
        u_norm = norm(beta)
        if u_norm > tol:
            beta = beta / u_norm
    # the scale averages over every input, zero-norm ones included (mergekit's alphas)
    coefs = (float(norms.sum()) / n * beta / safe).tolist()
    return weighted_sum_into(out, xs, coefs)
