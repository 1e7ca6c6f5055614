"""A short, readable TIES: the definition that the fast paths (the torch path of
`task_arithmetic.ties` and the fused CPU kernel, methods/fused.py) are tested against, bit for bit.
Never used to merge: it stacks every task vector and sorts whole tensors.

It is mergekit's op sequence in the tensor's dtype, which the engine reproduces rounding for
rounding (docs/methods.md), with the engine's deterministic trim (docs/compatibility.md):
1. task vector of each model: `x_i - base`, in the tensor's dtype;
2. trim: keep exactly `int(density_i * numel)` entries of largest magnitude; among equal
   magnitudes at the threshold the lower flat index is kept;
3. weight: `W_i = w_i * trimmed_i`, w_i a tensor of the same dtype (so quantised as in mergekit);
4. elect: per entry the sign of `sum_i W_i` (a sum that is zero counts as +); W_i agrees where
   its sign equals it (zeros never agree);
5. disjoint merge: `sum_i W_i * agree_i`, with `normalize` divided by `sum_i w_i * agree_i`
   (1 where no model agrees); times `lambda` when it is not 1;
6. `base + merged`.
"""

from __future__ import annotations

from typing import Sequence

import torch


def trim_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Exactly int(density * numel) largest |delta| (a stable descending sort: equal magnitudes
    keep the lower flat index first). float64 holds every 16- and 32-bit magnitude exactly."""
    k = int(density * delta.numel())
    order = torch.sort(delta.abs().double().flatten(), descending=True, stable=True).indices
    keep = torch.zeros(delta.numel(), dtype=torch.bool)
    keep[order[:k]] = True
    return keep.view(delta.shape)


def combine(base, deltas, weights, consensus: bool, normalize: bool, lam: float = 1.0) -> torch.Tensor:
    """Steps 3-6 for given (trimmed or masked) task vectors; without `consensus` every entry
    agrees and `normalize` divides by the weights' sum (1 where it is below 1e-8 in magnitude)."""
    stacked = torch.stack(deltas)
    w = torch.tensor(weights, dtype=stacked.dtype).view(-1, *([1] * base.dim()))
    weighted = stacked * w
    if consensus:
        majority = (weighted.sum(dim=0) >= 0).to(weighted.dtype) * 2 - 1
        agree = weighted.sign() == majority
        mixed = (weighted * agree).sum(dim=0)
        divisor = (w * agree).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = weighted.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    if lam != 1:
        mixed = mixed * lam
    return (base + mixed).to(base.dtype)


def ties(base, models: Sequence[torch.Tensor], weights, densities, normalize: bool = True, lam: float = 1.0):
    deltas = [x.to(base.dtype) - base for x in models]
    trimmed = [d if p >= 1 else d * trim_mask(d, p) for d, p in zip(deltas, densities)]
    return combine(base, trimmed, weights, consensus=True, normalize=normalize, lam=lam)
