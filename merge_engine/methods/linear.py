"""`linear`: weighted average, optionally normalised by the sum of weights (spec 2.1)."""

from __future__ import annotations

import torch

from .common import TensorContext, check_same_shape, chunk_bounds, flat, rectify_embed_sizes, weights_like


def linear(tensors, base_index, params, model_params, ctx: TensorContext) -> torch.Tensor:
    tensors = rectify_embed_sizes(list(tensors), ctx)
    check_same_shape(tensors, ctx)
    # mergekit's op sequence in the math dtype (stack, multiply by the weights quantised to that
    # dtype, sum over models, divide by the summed weights): results are bit-identical to it.
    flats = [flat(t) for t in tensors]
    weights = weights_like([mp["weight"] for mp in model_params], flats[0].unsqueeze(0))
    total_weight = weights.sum(dim=0)
    out = torch.empty(tensors[0].shape, dtype=tensors[0].dtype, device=tensors[0].device)
    out_flat = out.view(-1)
    for start, end in chunk_bounds(out.numel()):
        stacked = torch.stack([f[start:end] for f in flats], dim=0)
        merged = stacked.mul_(weights).sum(dim=0)
        if params["normalize"]:
            merged = merged / total_weight
        out_flat[start:end] = merged
    return out
