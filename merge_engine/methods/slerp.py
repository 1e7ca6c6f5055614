"""`slerp`: spherical interpolation between the base and one other model (docs/mergekit-reference.md §2).

The whole tensor is one vector; the maths runs in numpy float32 like mergekit's, so results match
it bit for bit. Nearly colinear inputs (|cos| > 0.9995) fall back to linear interpolation.
Memory: the norms and the dot product are whole-array numpy reductions exactly as in mergekit
(their summation order decides the last bits), but u0·u1 is built in place in one float32 buffer
and the final combination is written slice by slice into the output (elementwise ops give the
same bits in slices).
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ModelError
from .common import TensorContext, check_same_shape, chunk_bounds, flat, new_output, rectify_embed_sizes

DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8


def _to_numpy_f32(t: torch.Tensor, copy: bool = False) -> np.ndarray:
    """float32 values (exact for half types); a view of a contiguous float32 CPU tensor unless `copy`."""
    return t.detach().to(device="cpu", dtype=torch.float32, copy=copy).contiguous().numpy()


def slerp_coefficients(t: float, v0: torch.Tensor, v1: torch.Tensor) -> tuple[np.float32, np.float32]:
    """(s0, s1) with slerp(t, v0, v1) = s0·v0 + s1·v1, computed in float32 like mergekit. One
    full-size float32 array at a time: it holds u0, then u0·u1 (v1 is converted slice by slice)."""
    t32 = np.float32(t)
    n1 = np.linalg.norm(_to_numpy_f32(v1))
    prod = _to_numpy_f32(v0, copy=True)
    n0 = np.linalg.norm(prod)
    if n0 > NORM_EPS:
        np.divide(prod, n0, out=prod)
    prod_flat, f1 = prod.reshape(-1), flat(v1)
    for start, end in chunk_bounds(prod.size):
        b = _to_numpy_f32(f1[start:end])
        u1 = b / n1 if n1 > NORM_EPS else b
        np.multiply(prod_flat[start:end], u1, out=prod_flat[start:end])
    dot = np.sum(prod)
    if np.abs(dot) > DOT_THRESHOLD:
        # mergekit computes 1 - t on the Python float (float64), then numpy rounds it to float32
        return np.float32(1 - t), t32
    theta = np.arccos(dot)
    sin_theta = np.sin(theta)
    return np.sin(theta - t32 * theta) / sin_theta, np.sin(t32 * theta) / sin_theta


def slerp(tensors, base_index, params, model_params, ctx: TensorContext) -> torch.Tensor:
    if len(tensors) == 1:
        return tensors[0]
    if len(tensors) != 2:
        raise ModelError(f"slerp merges exactly two models, tensor {ctx.name} has {len(tensors)} inputs")
    if base_index is None:
        raise ModelError(f"slerp needs base_model among its two inputs (tensor {ctx.name})")
    v0, v1 = tensors[base_index], tensors[1 - base_index]
    v0, v1 = rectify_embed_sizes([v0, v1], ctx)
    check_same_shape([v0, v1], ctx)
    s0, s1 = slerp_coefficients(params["t"], v0, v1)
    out = new_output(ctx, v0)
    out_flat, f0, f1 = out.view(-1), flat(v0), flat(v1)
    for start, end in chunk_bounds(out.numel()):
        res = s0 * _to_numpy_f32(f0[start:end]) + s1 * _to_numpy_f32(f1[start:end])
        out_flat[start:end] = torch.from_numpy(res)
    return out
