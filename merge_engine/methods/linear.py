"""`linear`: weighted average, optionally normalised by the sum of weights (docs/mergekit-reference.md §2)."""

from __future__ import annotations

import torch

from ..errors import ModelError
from .common import TensorContext, check_same_shape, flat, rectify_embed_sizes, weighted_sum_into


def _quantised(value: float, dtype: torch.dtype) -> float:
    return float(torch.tensor(value, dtype=torch.float32).to(dtype))


def linear(tensors, base_index, params, model_params, ctx: TensorContext) -> torch.Tensor:
    tensors = rectify_embed_sizes(list(tensors), ctx)
    check_same_shape(tensors, ctx)
    like = tensors[0]
    # mergekit builds its weight tensor in the math dtype (0.3 in bf16 is 0.30078125) and divides
    # by the weights' sum in that dtype: the same values here. The sum itself is computed with one
    # rounding (fused lerp / float32 accumulation) instead of mergekit's three, which agrees with
    # it to float rounding and costs a single pass over memory.
    weights = [_quantised(mp["weight"], like.dtype) for mp in model_params]
    coeffs = weights
    if params["normalize"]:
        total = _quantised(sum(weights), like.dtype)
        if total == 0:
            raise ModelError(f"linear: the weights of tensor {ctx.name} sum to zero, cannot normalize")
        coeffs = [w / total for w in weights]
    out = ctx.output_buffer(like)
    if len(tensors) == 1:
        return torch.mul(like, coeffs[0], out=out)
    if len(tensors) == 2 and coeffs[0] + coeffs[1] != 0:
        scale = coeffs[0] + coeffs[1]
        result = torch.lerp(tensors[0], tensors[1], coeffs[1] / scale, out=out)
        return result if scale == 1 else result.mul_(scale)
    result = out if out is not None else torch.empty_like(like)
    return weighted_sum_into(result, [flat(t) for t in tensors], coeffs)
