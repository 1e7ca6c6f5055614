"""Methods that choose, per entry, which changes of the fine-tunes to keep: `sce` (docs/mergekit-reference.md §2),
`ram` and `ramplus_tl` (2.9), `nearswap` (2.11), `arcee_fusion` (2.12).

All run in the inputs' dtype with mergekit's op sequence. sce and ram work on task vectors
against the base (embeddings of larger vocabularies cut to the base's shape, as in task
arithmetic); nearswap and arcee_fusion use the common top-left block of embeddings.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..errors import ModelError
from .common import TensorContext, check_same_shape, chunk_bounds, flat, rectify_embed_sizes
from .task_arithmetic import aligned_inputs, top_k_mask

SCE_WEIGHT_EPS = 1e-6
NEARSWAP_DIFF_EPS = 1e-6
FUSION_SOFTMAX_EPS = 1e-8
# Tensors over this many entries estimate their quantiles from a sample of this many entries,
# drawn with replacement: a permutation (mergekit's randperm) cost 2/3 of arcee_fusion's time
# on an MLP matrix and 4 GB of indices on a 500M-entry embedding.
FUSION_SAMPLE = 1_000_000


class _Deltas:
    """The task vectors of one tensor against the base, computed slice by slice (flat index
    ranges) so that no stack of full-size task vectors is ever held: the methods below do their
    global reductions in a first pass and their elementwise combination in a second."""

    def __init__(self, tensors, base_index, ctx: TensorContext):
        self.base, others, _ = aligned_inputs(tensors, base_index, ctx)
        self.base_flat = flat(self.base)
        self.others = [flat(x) for x in others]
        self.numel = self.base_flat.numel()

    def stacked(self, start: int, end: int) -> torch.Tensor:
        """(models, end - start) task vectors of one slice."""
        part = self.base_flat[start:end]
        return torch.stack([x[start:end] - part for x in self.others], dim=0)

    def slices(self):
        for start, end in chunk_bounds(self.numel):
            yield start, end, self.stacked(start, end)

    def output(self, parts) -> torch.Tensor:
        """base + the merged change, from (start, end, change) slices."""
        out = torch.empty_like(self.base_flat)
        for start, end, change in parts:
            out[start:end] = self.base_flat[start:end] + change
        return out.view(self.base.shape)


def _per_model(values, like: torch.Tensor) -> torch.Tensor:
    """A per-model scalar vector in the math dtype, shaped to broadcast over stacked tensors."""
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(-1, *([1] * (like.dim() - 1)))


# -- sce ----------------------------------------------------------------------------------------


def _variance_mask(deltas: _Deltas, fraction: float) -> Optional[torch.Tensor]:
    """Keep the int(fraction * #nonzero) positions where the models disagree most (largest
    variance across models); the same positions in every task vector. Equal variances at the
    cut are kept in flat order (mergekit's topk leaves that order unspecified)."""
    variance = torch.empty_like(deltas.base_flat)
    for start, end, stacked in deltas.slices():
        # population variance across models in float32 (torch.var on bf16 CPU tensors is ~10x
        # slower); agrees with it to float rounding
        wide = stacked.float()
        variance[start:end] = (wide - wide.mean(dim=0)).square_().mean(dim=0)
    k = int(int(torch.count_nonzero(variance)) * fraction)
    return top_k_mask(variance, k)


def _sce_energies(deltas: _Deltas, mask: Optional[torch.Tensor]) -> list[float]:
    """Each task vector's mean square (after the variance mask), rounded to the math dtype as
    torch's mean in that dtype is."""
    sums = torch.zeros(len(deltas.others), dtype=torch.float64)
    for start, end, stacked in deltas.slices():
        if mask is not None:
            stacked = stacked * mask[start:end]
        sums += (stacked**2).sum(dim=1, dtype=torch.float64).cpu()
    means = (sums / deltas.numel).to(deltas.base.dtype)
    return [float(m) for m in means]


def sce(tensors, base_index, params, model_params, ctx: TensorContext) -> torch.Tensor:
    deltas = _Deltas(tensors, base_index, ctx)
    if not deltas.others:
        return deltas.base
    fraction = float(params["select_topk"])
    mask = _variance_mask(deltas, fraction) if fraction < 1 else None
    energies = _sce_energies(deltas, mask)
    total = sum(energies)
    count = len(energies)
    q = [1.0 / count] * count if abs(total) < SCE_WEIGHT_EPS else [e / total for e in energies]

    # the weights quantised to the math dtype as mergekit's weight tensor is; the combination
    # runs in float32 and rounds once (as `linear` does): equal to mergekit's to float rounding
    w = _per_model(q, deltas.base.reshape(1, -1)).float()

    def merged():
        for start, end, stacked in deltas.slices():
            if mask is not None:
                stacked = stacked * mask[start:end]
            wide = stacked.float()
            # TIES sign election on the unweighted task vectors (zeros never agree)
            majority = torch.sign(torch.sign(stacked.sum(dim=0).float()).add_(0.5))  # +1 where the sum >= 0
            agree = (wide.sign() * majority).clamp_(min=0)  # 1 where the sign agrees, else 0
            weights = w * agree
            mixed = (wide * weights).sum(dim=0)
            yield start, end, mixed.div_(weights.sum(dim=0).clamp_min_(SCE_WEIGHT_EPS))

    return deltas.output(merged())


# -- ram / ramplus_tl ---------------------------------------------------------------------------


def _ram(tensors, base_index, params, ctx: TensorContext, plus: bool) -> torch.Tensor:
    deltas = _Deltas(tensors, base_index, ctx)
    if not deltas.others:
        return deltas.base
    eps = float(params["epsilon"])

    # The task vectors are formed in the math dtype (as mergekit's), then everything runs in
    # float32 and the result rounds once: agrees with mergekit's to float rounding. Masks are
    # 0/1 floats: sums and products of floats are several times cheaper than of booleans.
    def activity(stacked):
        """(0/1 active per model and entry, active count per entry, 0/1 unique, 0/1 overlap)."""
        active = (stacked.abs() > eps).float()
        count = active.sum(dim=0)
        return active, count, (count == 1).float(), (count > 1).float()

    boosts = None
    if plus:
        # models whose changes mostly overlap others' get their unique changes boosted
        r, alpha = float(params["r"]), float(params["alpha"])
        shared = torch.zeros(len(deltas.others), dtype=torch.float64)
        own = torch.zeros(len(deltas.others), dtype=torch.float64)
        for _, _, stacked in deltas.slices():
            active, _, unique, overlap = activity(stacked.float())
            # exact: a slice's counts stay far below float32's 2^24 integer range
            shared += (active * overlap).sum(dim=1).cpu().double()
            own += (active * unique).sum(dim=1).cpu().double()
        boosts = [1 + r * min(max(float(s) / max(float(o), eps), 0.0), alpha) for s, o in zip(shared, own)]

    def merged():
        scale = None
        for start, end, stacked in deltas.slices():
            stacked = stacked.float()
            active, count, unique, overlap = activity(stacked)
            masked = stacked * active
            unique_part = masked * unique
            if boosts is not None:
                scale = _per_model(boosts, stacked) if scale is None else scale
                unique_part = unique_part * scale
            yield start, end, unique_part.sum(dim=0) + (masked * overlap).sum(dim=0) / count.clamp_min(1)

    return deltas.output(merged())


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
        idx = torch.randint(n, (FUSION_SAMPLE,), generator=ctx.generator(values.device), device=values.device)
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
