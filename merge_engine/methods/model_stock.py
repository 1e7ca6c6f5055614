"""`model_stock` (docs/mergekit-reference.md §2): average the fine-tunes, then pull the average towards the base by
an amount set by the mean cosine between their task vectors (arXiv 2403.19522).

The whole-tensor norms and dot products are accumulated slice by slice (`sliced_sums`: float
rounding only) and the result is written slice by slice, or block of rows by block of rows with
`filter_wise`, so no full-size temporary is made."""

from __future__ import annotations

import itertools
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
)

NORM_PRODUCT_EPS = 1e-6


def _ratio(norms, dots, count: int) -> torch.Tensor:
    """t = N·cos / (1 + (N-1)·cos) from the task vectors' norms and pairwise dot products (in
    `itertools.combinations` order), per row or for the whole tensor."""
    cosines = []
    for (i, j), dot in zip(itertools.combinations(range(count), 2), dots):
        norm_product = norms[i] * norms[j]
        cosines.append((dot / norm_product.clamp_min(NORM_PRODUCT_EPS)).clamp(-1, 1))
    cos = torch.stack(cosines, dim=0).mean(dim=0)
    return (count * cos) / (1 + (count - 1) * cos)


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
    out = new_output(ctx, ws[0])
    count = len(ws) - 1
    pairs = list(itertools.combinations(range(count), 2))
    filter_wise = bool(params["filter_wise"])
    if filter_wise:
        # one ratio per row (last dim); a 1-D tensor is one row
        ws = [w.reshape(1, -1) if w.dim() == 1 else w.reshape(-1, w.shape[-1]) for w in ws]
    else:
        ws = [flat(w) for w in ws]
    out_view = out.view(ws[0].shape)

    def offsets(start, end):
        w0 = ws[0][start:end]
        return [w[start:end] - w0 for w in ws[1:]]

    if filter_wise:
        rows, row_len = ws[0].shape
        bounds = chunk_bounds(rows, max(1, CHUNK_ELEMENTS // max(1, row_len)))
        t = None
    else:
        def terms(start, end):
            d = offsets(start, end)
            sums = [sum_squares(x) for x in d] + [(d[i] * d[j]).sum(dtype=torch.float32) for i, j in pairs]
            return torch.stack(sums)

        sums = sliced_sums(out.numel(), terms).tolist()
        like = ws[0]
        norms = [torch.tensor(math.sqrt(s), dtype=like.dtype, device=like.device) for s in sums[:count]]
        dots = [torch.tensor(s, dtype=like.dtype, device=like.device) for s in sums[count:]]
        t = _ratio(norms, dots, count)
        bounds = chunk_bounds(out.numel())
    for start, end in bounds:
        w0 = ws[0][start:end]
        others = [w[start:end] for w in ws[1:]]
        if t is None:
            d = offsets(start, end)
            row_t = _ratio([x.norm(dim=-1) for x in d], [(d[i] * d[j]).sum(dim=-1) for i, j in pairs], count)
            ratio = row_t.unsqueeze(-1)
        else:
            ratio = t
        w_avg = sum(others) / count
        out_view[start:end] = ratio * w_avg + (1 - ratio) * w0
    return out
