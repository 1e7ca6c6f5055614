"""Gradients of a loss with respect to the per-model weights of one merged tensor, for the merges
that are smooth in them: `linear` and `task_arithmetic` (what a gradient search learns; see
docs/mergekit-evolve.md, "optimizer: gradient").

Both are weighted sums, `merged = offset + c * sum_i w_i v_i / D`, with v_i model i's tensor
(linear; offset 0, c 1) or its task vector against the base (task arithmetic; offset the base, c
its `lambda`), and D the weights' sum S when normalising, else 1. Given G = dL/d merged, every
weight's derivative follows from the inner products u_i = <G, v_i>:

    not normalising:          dL/dw_i = c * u_i
    normalising (D = S):      dL/dw_i = c * (u_i - sum_j w_j u_j / S) / S

So the chain rule costs one pass over the inputs per tensor, and no autograd graph over the merge
is ever built. As the engine merges (methods/task_arithmetic.py), a task-arithmetic sum below 1e-8
in magnitude is not divided by; `linear` refuses such a sum (it raises when merging).

The rest of the task-arithmetic family (TIES, DARE, breadcrumbs, DELLA and their linear forms)
is differentiable in the weights only with its masks held fixed at the current weights: the
sparsification masks do not depend on the weights, the TIES sign election does (a step function).
With both fixed, `merged = base + sum_i w_i a_i S_i / D`, where S_i is model i's sparsified task
vector times lambda (what the engine merges with weight 1 for model i and 0 for the others,
`masked_weight_gradients`' `parts`), a_i its agreement with the elected sign (1 everywhere without
consensus), and D per entry `sum_j w_j a_j` when normalising with consensus (1 where no model
agrees), the weights' sum without consensus, else 1. Then, with N = sum_j w_j a_j S_j,

    dL/dw_i = <G, a_i S_i / D> - [normalising] <G, N a_i / D^2>

(the second term with a_i = 1 and a scalar D without consensus). A model's agreement is taken
from the sign of its own vector, whatever its weight, so a weight at 0 still gets the gradient of
growing it (the engine's merge counts a zero-weight model as agreeing nowhere).

The engine rounds each weight to the tensor's dtype before merging (mergekit's quirk: 0.3 is
0.30078125 in bfloat16), a step function of the weight; its derivative is taken as 1 (straight
through), which is what makes a bfloat16 merge learnable at all.
"""

from __future__ import annotations

from typing import Sequence

import torch

SMOOTH_METHODS = ("linear", "task_arithmetic")  # differentiable in the weights with nothing held fixed
ZERO_SUM = 1e-8  # the engine's threshold below which a task-arithmetic sum is not divided by


DOT_CHUNK = 4096  # products summed in float32 per chunk; the chunks' sums are added in float64


def has_weight_gradients(method) -> bool:
    """Whether a gradient search can learn `method`'s (a MethodSpec's) per-model weights: exactly
    (SMOOTH_METHODS) or with the masks held fixed (the rest of the task-vector family)."""
    return method.name in SMOOTH_METHODS or method.task_vector is not None


def _dot(g: torch.Tensor, v: torch.Tensor) -> float:
    """<g, v> of two flat tensors: one batched matrix product over chunks (no full-size
    temporary, 6x faster than converting both to float64 on CPU; relative error ~1e-6)."""
    n = g.numel()
    m = n - n % DOT_CHUNK
    head = torch.bmm(g[:m].view(-1, 1, DOT_CHUNK), v[:m].view(-1, DOT_CHUNK, 1)).double().sum() if m else 0.0
    return float(head) + float(torch.dot(g[m:].double(), v[m:].double()))


def inner_products(grad: torch.Tensor, vectors: Sequence[torch.Tensor]) -> list[float]:
    """<grad, v_i> for each v_i (16-bit tensors are summed in float32)."""
    wide = torch.float64 if grad.dtype == torch.float64 else torch.float32
    g = grad.reshape(-1).to(wide)
    # an input larger than the merged tensor (an embedding with more rows) counts by its
    # top-left block, the part the merge uses
    block = tuple(slice(0, n) for n in grad.shape)
    return [_dot(g, v[block].reshape(-1).to(wide)) for v in vectors]


def weight_gradients(method: str, params: dict, weights: Sequence[float], products: Sequence[float]) -> list[float]:
    """dL/dw_i from the inner products `products` (u_i = <dL/d merged, v_i>) of the method's
    vectors v_i (linear: the inputs; task_arithmetic: the task vectors), for `weights` w_i."""
    if method not in SMOOTH_METHODS:
        raise ValueError(f"merge method {method} is not differentiable in its weights (known: {', '.join(SMOOTH_METHODS)})")
    scale = float(params.get("lambda", 1.0)) if method == "task_arithmetic" else 1.0
    total = float(sum(weights))
    if not params.get("normalize") or (method == "task_arithmetic" and abs(total) < ZERO_SUM):
        return [scale * u for u in products]
    mean = sum(w * u for w, u in zip(weights, products)) / total
    return [scale * (u - mean) / total for u in products]


def masked_weight_gradients(grad: torch.Tensor, parts: Sequence[torch.Tensor], weights: Sequence[float],
                            consensus: bool, normalize: bool) -> list[float]:
    """dL/dw_i of a sparsified (and with `consensus`, sign-elected) task-vector merge, masks held
    fixed (module docstring); `parts[i]` is S_i, model i's sparsified task vector times lambda."""
    wide = torch.float64 if grad.dtype == torch.float64 else torch.float32
    g = grad.reshape(-1).to(wide)
    S = [p.reshape(-1).to(wide) for p in parts]
    w = [float(x) for x in weights]
    if consensus:
        total = torch.zeros_like(S[0])
        for wi, si in zip(w, S):
            total.add_(si, alpha=wi)
        majority = torch.where(total >= 0, 1.0, -1.0).to(wide)
        agree = [((si * majority) * (1.0 if wi >= 0 else -1.0) > 0).to(wide) for wi, si in zip(w, S)]
    else:
        agree = [None] * len(S)
    kept = [si if a is None else si * a for si, a in zip(S, agree)]
    first = [_dot(g, k) for k in kept]
    if not normalize:
        return first
    if not consensus:
        total_w = sum(w)
        if abs(total_w) < ZERO_SUM:
            return first
        numerator = _dot(g, sum(wi * k for wi, k in zip(w, kept)))
        return [u / total_w - numerator / total_w**2 for u in first]
    divisor = torch.zeros_like(g)
    numerator = torch.zeros_like(g)
    for wi, a, k in zip(w, agree, kept):
        divisor.add_(a, alpha=wi)
        numerator.add_(k, alpha=wi)
    divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    scaled = g / divisor
    second = scaled * numerator / divisor
    return [_dot(scaled, k) - _dot(second, a) for a, k in zip(agree, kept)]
