"""`slerp`: spherical interpolation between the base and one other model (spec 2.2).

The whole tensor is one vector; the maths runs in numpy float32 like mergekit's, so results match
it bit for bit. Nearly colinear inputs (|cos| > 0.9995) fall back to linear interpolation.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ModelError
from .common import TensorContext, check_same_shape, rectify_embed_sizes

DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8


def _to_numpy_f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(device="cpu", dtype=torch.float32).numpy()


def slerp_arrays(t: float, v0: np.ndarray, v1: np.ndarray) -> np.ndarray:
    t32 = np.float32(t)
    n0 = np.linalg.norm(v0)
    n1 = np.linalg.norm(v1)
    u0 = v0 / n0 if n0 > NORM_EPS else v0
    u1 = v1 / n1 if n1 > NORM_EPS else v1
    dot = np.sum(u0 * u1)
    if np.abs(dot) > DOT_THRESHOLD:
        # mergekit computes 1 - t on the Python float (float64), then numpy rounds it to float32
        return np.float32(1 - t) * v0 + t32 * v1
    theta = np.arccos(dot)
    sin_theta = np.sin(theta)
    s0 = np.sin(theta - t32 * theta) / sin_theta
    s1 = np.sin(t32 * theta) / sin_theta
    return s0 * v0 + s1 * v1


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
    out = slerp_arrays(params["t"], _to_numpy_f32(v0), _to_numpy_f32(v1))
    return torch.from_numpy(np.ascontiguousarray(out)).to(dtype=v0.dtype, device=v0.device)
