"""`passthrough`: copy the single input, optionally scaled (docs/mergekit-reference.md §2)."""

from __future__ import annotations

import torch

from ..errors import ModelError
from .common import TensorContext


def passthrough(tensors, base_index, params, model_params, ctx: TensorContext) -> torch.Tensor:
    if len(tensors) != 1:
        raise ModelError(
            f"passthrough takes exactly one input per tensor, {ctx.name} has {len(tensors)} "
            "(a base_model missing from the sources is added as an input: remove base_model)"
        )
    scale = model_params[0].get("scale")
    return tensors[0] if scale is None else tensors[0] * scale
