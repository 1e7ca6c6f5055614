"""`model_stock` (spec 2.10): average the fine-tunes, then pull the average towards the base by
an amount set by the mean cosine between their task vectors (arXiv 2403.19522)."""

from __future__ import annotations

import itertools

import torch

from ..errors import ModelError
from .common import TensorContext, check_same_shape, rectify_embed_sizes

NORM_PRODUCT_EPS = 1e-6


def model_stock(tensors, base_index, params, model_params, ctx: TensorContext) -> torch.Tensor:
    if base_index is None:
        raise ModelError(f"model_stock needs base_model, and tensor {ctx.name} has no base input")
    if len(tensors) == 1:
        return tensors[0]
    if len(tensors) < 3:
        raise ModelError(
            f"model_stock needs the base plus at least two models, tensor {ctx.name} has "
            f"{len(tensors)} inputs (base plus {len(tensors) - 1})"
        )
    order = [base_index] + [i for i in range(len(tensors)) if i != base_index]
    ws = rectify_embed_sizes([tensors[i] for i in order], ctx)
    check_same_shape(ws, ctx)
    shape = ws[0].shape
    filter_wise = bool(params["filter_wise"])
    if filter_wise:
        # one ratio per row (last dim); a 1-D tensor is one row
        ws = [w.reshape(1, -1) if w.dim() == 1 else w.reshape(-1, shape[-1]) for w in ws]
    else:
        ws = [w.reshape(-1) for w in ws]
    w0, others = ws[0], ws[1:]
    count = len(others)
    offsets = [w - w0 for w in others]
    cosines = []
    for a, b in itertools.combinations(offsets, 2):
        norm_product = a.norm(dim=-1) * b.norm(dim=-1)
        cos = (a * b).sum(dim=-1) / norm_product.clamp_min(NORM_PRODUCT_EPS)
        cosines.append(cos.clamp(-1, 1))
    cos = torch.stack(cosines, dim=0).mean(dim=0)
    t = (count * cos) / (1 + (count - 1) * cos)
    if filter_wise:
        t = t.unsqueeze(-1)
    w_avg = sum(others) / count
    return (t * w_avg + (1 - t) * w0).reshape(shape)
