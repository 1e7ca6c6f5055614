"""Methods that choose, per entry, which changes of the fine-tunes to keep: `sce` (spec 2.8),
`ram` and `ramplus_tl` (2.9), `nearswap` (2.11), `arcee_fusion` (2.12).

All run in the inputs' dtype with mergekit's op sequence. sce and ram work on task vectors
against the base (embeddings of larger vocabularies cut to the base's shape, as in task
arithmetic); nearswap and arcee_fusion use the common top-left block of embeddings.
"""

from __future__ import annotations

import torch

from ..errors import ModelError
from .common import TensorContext, check_same_shape, rectify_embed_sizes
from .task_arithmetic import aligned_inputs

SCE_WEIGHT_EPS = 1e-6
NEARSWAP_DIFF_EPS = 1e-6
FUSION_SOFTMAX_EPS = 1e-8
FUSION_SAMPLE = 1_000_000
# Above this many entries the quantile sample is drawn with replacement (randint) instead of
# from a full permutation: randperm of a 500M-entry embedding would take 4 GB of indices.
FUSION_RANDPERM_MAX = 1 << 24


def _stacked_task_vectors(tensors, base_index, ctx: TensorContext):
    """(base, task vectors stacked on dim 0, or None when only the base has this tensor)."""
    base, others, _ = aligned_inputs(tensors, base_index, ctx)
    if not others:
        return base, None
    return base, torch.stack([x - base for x in others], dim=0)


def _per_model(values, like: torch.Tensor) -> torch.Tensor:
    """A per-model scalar vector in the math dtype, shaped to broadcast over stacked tensors."""
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(-1, *([1] * (like.dim() - 1)))


# -- sce ----------------------------------------------------------------------------------------


def _variance_mask(deltas: torch.Tensor, fraction: float) -> torch.Tensor:
    """Keep the int(fraction * #nonzero) positions where the models disagree most (largest
    variance across models); the same positions in every task vector."""
    variance = torch.var(deltas, dim=0, correction=0)
    k = int(int(torch.count_nonzero(variance)) * fraction)
    mask = torch.zeros(variance.numel(), dtype=torch.bool, device=deltas.device)
    if k > 0:
        mask[torch.topk(variance.abs().reshape(-1), k).indices] = True
    return mask.view(variance.shape)


def sce(tensors, base_index, params, model_params, ctx: TensorContext) -> torch.Tensor:
    base, deltas = _stacked_task_vectors(tensors, base_index, ctx)
    if deltas is None:
        return base
    fraction = float(params["select_topk"])
    if fraction < 1:
        deltas = deltas * _variance_mask(deltas, fraction)
    # TIES sign election on the unweighted task vectors (zeros never agree)
    majority = torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0).to(deltas.dtype)
    agree = deltas.sign() == majority
    energies = [float((d**2).mean()) for d in deltas]
    total = sum(energies)
    count = len(energies)
    q = [1.0 / count] * count if abs(total) < SCE_WEIGHT_EPS else [e / total for e in energies]
    w = _per_model(q, deltas)
    mixed = (deltas * w * agree).sum(dim=0)
    divisor = (w * agree).sum(dim=0).clamp_min(SCE_WEIGHT_EPS)
    return base + mixed / divisor


# -- ram / ramplus_tl ---------------------------------------------------------------------------


def _ram(tensors, base_index, params, ctx: TensorContext, plus: bool) -> torch.Tensor:
    base, deltas = _stacked_task_vectors(tensors, base_index, ctx)
    if deltas is None:
        return base
    eps = float(params["epsilon"])
    deltas = deltas.reshape(deltas.shape[0], -1)
    active = deltas.abs() > eps
    count = active.sum(dim=0)
    unique = count == 1
    overlap = count > 1
    masked = deltas * active
    unique_part = masked * unique
    if plus:
        # models whose changes mostly overlap others' get their unique changes boosted
        r, alpha = float(params["r"]), float(params["alpha"])
        boosts = []
        for a in active:
            shared = int((a & overlap).sum())
            own = int((a & unique).sum())
            ratio = shared / max(own, eps)
            boosts.append(1 + r * min(max(ratio, 0.0), alpha))
        unique_part = unique_part * _per_model(boosts, deltas)
    merged = unique_part.sum(dim=0) + (masked * overlap).sum(dim=0) / count.clamp_min(1)
    return base + merged.view(base.shape)


def ram(tensors, base_index, params, model_params, ctx: TensorContext) -> torch.Tensor:
    return _ram(tensors, base_index, params, ctx, plus=False)


def ramplus_tl(tensors, base_index, params, model_params, ctx: TensorContext) -> torch.Tensor:
    return _ram(tensors, base_index, params, ctx, plus=True)


# -- nearswap -----------------------------------------------------------------------------------


def _base_and_one(name: str, tensors, base_index, ctx: TensorContext):
    """(base, other) cut to their common embedding block, or (base, None) if only the base has it."""
    if base_index is None:
        raise ModelError(f"{name} needs base_model, and tensor {ctx.name} has no base input")
    others = [i for i in range(len(tensors)) if i != base_index]
    if not others:
        return tensors[base_index], None
    if len(others) > 1:
        raise ModelError(
            f"{name} merges the base with exactly one model, tensor {ctx.name} has {len(tensors)} "
            f"inputs (base plus {len(others)})"
        )
    pair = rectify_embed_sizes([tensors[base_index], tensors[others[0]]], ctx)
    check_same_shape(pair, ctx)
    return pair[0], pair[1]


def nearswap(tensors, base_index, params, model_params, ctx: TensorContext) -> torch.Tensor:
    """Take the other model's value where it is within t of the base, interpolate beyond."""
    base, other = _base_and_one("nearswap", tensors, base_index, ctx)
    if other is None:
        return base
    weight = (float(params["t"]) / (base - other).abs().clamp_min(NEARSWAP_DIFF_EPS)).clamp(0, 1)
    return weight * other + (1 - weight) * base


# -- arcee_fusion -------------------------------------------------------------------------------


def _lower_quantiles(values: torch.Tensor, qs, ctx: TensorContext) -> list[torch.Tensor]:
    """Sorted value at floor(q * (n - 1)) for each q; over a seeded sample of FUSION_SAMPLE
    entries when there are more (mergekit samples from the global RNG)."""
    n = values.numel()
    if n > FUSION_SAMPLE:
        gen = ctx.generator(values.device)
        if n <= FUSION_RANDPERM_MAX:
            idx = torch.randperm(n, generator=gen, device=values.device)[:FUSION_SAMPLE]
        else:
            idx = torch.randint(n, (FUSION_SAMPLE,), generator=gen, device=values.device)
        values = values[idx]
        n = FUSION_SAMPLE
    ordered = torch.sort(values).values
    return [ordered[int(q * (n - 1))] for q in qs]


def arcee_fusion(tensors, base_index, params, model_params, ctx: TensorContext) -> torch.Tensor:
    """Keep the fine-tune's changes whose importance (|change| times the row's KL divergence
    between the two models' softmaxes) is an upper outlier: >= median + 1.5 IQR."""
    if len(tensors) == 1:
        return tensors[0]
    if base_index is None or len(tensors) != 2:
        raise ModelError(
            f"arcee_fusion merges the base with exactly one model, tensor {ctx.name} has "
            f"{len(tensors)} inputs ({'no base' if base_index is None else f'base plus {len(tensors) - 1}'})"
        )
    base, other = _base_and_one("arcee_fusion", tensors, base_index, ctx)
    delta = other - base
    p = torch.softmax(other, dim=-1) + FUSION_SOFTMAX_EPS
    q = torch.softmax(base, dim=-1) + FUSION_SOFTMAX_EPS
    kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    importance = delta.abs() * kl
    q1, median, q3 = _lower_quantiles(importance.reshape(-1), (0.25, 0.5, 0.75), ctx)
    threshold = median + 1.5 * (q3 - q1)
    return base + (importance >= threshold) * delta
