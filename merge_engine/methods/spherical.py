"""Spherical averages of several models: `nuslerp` (spec 2.3), `multislerp` (2.4), `karcher` (2.5).

The maths runs in the inputs' dtype with mergekit's op sequence (karcher's norms in float32),
so results equal mergekit's to float rounding.
"""

from __future__ import annotations

import math

import torch

from ..errors import ModelError
from .common import TensorContext, check_same_shape, rectify_embed_sizes

NUSLERP_NORM_EPS = 1e-7
NUSLERP_SIN_EPS = 1e-8
NUSLERP_WEIGHT_EPS = 1e-6


def _others(tensors, base_index) -> list[int]:
    return [i for i in range(len(tensors)) if i != base_index]


# -- nuslerp ------------------------------------------------------------------------------------


def nuslerp_vectors(t: float, v0: torch.Tensor, v1: torch.Tensor, flatten: bool, row_wise: bool) -> torch.Tensor:
    """Slerp of v0 -> v1 at t, one angle per vector: the whole tensor (`flatten`), vectors along
    dim 0 (`row_wise`: mergekit transposes dims 0 and -1) or along the last dim."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / v0.norm(dim=-1, keepdim=True).clamp_min(NUSLERP_NORM_EPS)
    u1 = v1 / v1.norm(dim=-1, keepdim=True).clamp_min(NUSLERP_NORM_EPS)
    theta = torch.acos((u0 * u1).sum(dim=-1).clamp(-1, 1))
    sin_theta = torch.sin(theta)
    res = (torch.sin((1 - t) * theta).unsqueeze(-1) * v0 + torch.sin(t * theta).unsqueeze(-1) * v1) / sin_theta.unsqueeze(-1)
    # (nearly) colinear vectors: the angle carries no information, interpolate linearly
    colinear = (sin_theta.abs() < NUSLERP_SIN_EPS).unsqueeze(-1)
    if bool(colinear.any()):
        res = torch.where(colinear, (1 - t) * v0 + t * v1, res)
    if not flatten and row_wise:
        res = res.transpose(0, -1)
    return res.reshape(shape)


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
    if base_index is None:
        return nuslerp_vectors(t, rect[0], rect[1], flatten, row_wise)
    base = rect[2]
    return base + nuslerp_vectors(t, rect[0] - base, rect[1] - base, flatten, row_wise)


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
    base = rect[base_index] if base_index is not None else None
    eps = float(params["eps"])
    shape = rect[others[0]].shape
    x = torch.stack([rect[i] for i in others], dim=0)
    if base is not None:
        x = x - base.unsqueeze(0)
    x = x.reshape(len(others), -1)
    w = torch.tensor([float(model_params[i]["weight"]) for i in others], dtype=x.dtype, device=x.device)
    if params["normalize_weights"]:
        w = w / w.sum()
    norms = x.norm(dim=-1, keepdim=True)
    units = x / (norms + eps)
    mean = (units * w.unsqueeze(-1)).sum(dim=0)
    mean_norm = mean.norm()
    if mean_norm < eps:
        if len(others) == 2:
            res = (x * w.unsqueeze(-1)).sum(dim=0).reshape(shape)
            return res + base if base is not None else res
        raise ModelError(
            f"multislerp: the {len(others)} models of tensor {ctx.name} are antipodal (their weighted "
            "mean direction is zero), no spherical average exists"
        )
    mean_unit = mean / mean_norm
    tangents = units - (units @ mean_unit).unsqueeze(-1) * mean_unit
    tangent = (tangents * w.unsqueeze(-1)).sum(dim=0)
    tau = tangent.norm() + eps
    res = mean_unit * torch.cos(tau) + tangent * (torch.sin(tau) / tau)
    res = (res * (w * norms.squeeze(-1)).sum()).reshape(shape)
    return res + base if base is not None else res


# -- karcher ------------------------------------------------------------------------------------


def _norm32(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t, dtype=torch.float32))


def karcher(tensors, base_index, params, model_params, ctx: TensorContext) -> torch.Tensor:
    """Riemannian (Karcher) mean of the directions, scaled by the mean norm. Every input counts,
    the base included, with equal weight."""
    if len(tensors) == 1:
        return tensors[0]
    # mergekit rectifies temporary pairs (a no-op): here every input is cut to the common block
    xs = rectify_embed_sizes(list(tensors), ctx)
    check_same_shape(xs, ctx)
    max_iter = int(params["max_iter"])
    tol = float(params["tol"])
    n = len(xs)
    alphas = [1.0 / n] * n
    norms = [_norm32(x) for x in xs]
    units = [(x.float() / nrm).to(x.dtype) if nrm != 0 else torch.zeros_like(x) for x, nrm in zip(xs, norms)]
    valid = [i for i in range(n) if norms[i] > tol]
    if not valid:
        return torch.zeros_like(xs[0])
    total = sum(alphas[i] for i in valid)
    weights = [(i, alphas[i] / total) for i in valid]

    u = sum(a * units[i] for i, a in weights)
    u_norm = _norm32(u)
    u = units[valid[0]] if u_norm < tol else u / u_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(u)
        for i, a in weights:
            d = min(max(float((u * units[i]).sum()), -1.0), 1.0)
            theta = math.acos(d)
            if theta < tol:
                continue
            tangent += (a * theta / math.sin(theta)) * (units[i] - d * u)
        t_norm = _norm32(tangent)
        if t_norm < tol:
            break
        u = math.cos(t_norm) * u + math.sin(t_norm) * (tangent / t_norm)
        u_norm = _norm32(u)
        if u_norm > tol:
            u = u / u_norm
    # the scale averages over every input, zero-norm ones included (mergekit's alphas)
    return sum(a * nrm for a, nrm in zip(alphas, norms)) * u
