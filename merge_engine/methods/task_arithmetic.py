"""The generalised task-arithmetic family (spec 2.6, 2.7): task_arithmetic, ties, dare_ties,
dare_linear.

Split in two steps so that the resident executor can keep task vectors between candidates:
`task_vectors` (inputs -> deltas against the base) and `merge_task_vectors` (deltas + per-model
weights/densities -> merged tensor). Both executors go through these same two functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..errors import ModelError
from .common import TensorContext, chunk_bounds, flat, weights_like

RESCALE_EPS = 1e-7


@dataclass(frozen=True)
class Variant:
    sparsify: Optional[str]  # None, "magnitude" or "random"
    consensus: bool


VARIANTS = {
    "task_arithmetic": Variant(None, False),
    "ties": Variant("magnitude", True),
    "dare_ties": Variant("random", True),
    "dare_linear": Variant("random", False),
}


def task_vectors(
    tensors: Sequence[torch.Tensor], base_index: Optional[int], ctx: TensorContext
) -> tuple[torch.Tensor, list[torch.Tensor], list[int]]:
    """(base, deltas of the other inputs, their positions in `tensors`)."""
    if base_index is None:
        raise ModelError(f"this method needs base_model, and tensor {ctx.name} has no base input")
    base = tensors[base_index]
    deltas, positions = [], []
    for i, x in enumerate(tensors):
        if i == base_index:
            continue
        x = x.to(base.dtype)
        if x.shape != base.shape:
            fits = (
                ctx.is_embed
                and x.dim() == 2
                and x.shape[0] >= base.shape[0]
                and x.shape[1] >= base.shape[1]
            )
            if not fits:
                raise ModelError(
                    f"shape mismatch for tensor {ctx.name}: base {ctx.label(base_index)} has "
                    f"{list(base.shape)}, {ctx.label(i)} has {list(x.shape)}"
                )
            # Larger vocabulary than the base: keep the base's rows (mergekit's truncation).
            x = x[: base.shape[0], : base.shape[1]]
        deltas.append(x - base)
        positions.append(i)
    return base, deltas, positions


# -- sparsification ---------------------------------------------------------------------------


def _l1(t: torch.Tensor) -> torch.Tensor:
    return t.abs().sum()


def _rescale_l1_(kept: torch.Tensor, norm_before: torch.Tensor) -> torch.Tensor:
    """Scale the sparsified delta back to the original delta's L1 norm (whole tensor, spec 2.7)."""
    norm_after = _l1(kept)
    if norm_before < RESCALE_EPS or norm_after < RESCALE_EPS:
        return kept
    return kept.mul_(norm_before / norm_after)


def _histogram_16bit(bits: torch.Tensor) -> torch.Tensor:
    hist = torch.zeros(1 << 15, dtype=torch.int64, device=bits.device)
    flat_bits = bits.reshape(-1)
    for start, end in chunk_bounds(flat_bits.numel()):
        hist += torch.bincount(flat_bits[start:end].to(torch.int32), minlength=1 << 15)
    return hist


def magnitude_mask(delta: torch.Tensor, density: float, ctx: TensorContext) -> torch.Tensor:
    """Mask of exactly int(density * numel) entries of largest |delta|, found without sorting.

    Ties at the threshold go to the lowest flat indices, as a stable descending sort would pick.
    16-bit floats: |x| read as int16 is monotonic in |x|, so a 32768-bin histogram gives the exact
    threshold in one pass; 32-bit floats use torch.kthvalue (a selection, not a sort)."""
    n = delta.numel()
    k = int(density * n)
    if k <= 0:
        raise ModelError(
            f"density {density} keeps no entry of tensor {ctx.name} ({n} entries): raise the density"
        )
    magnitude = delta.abs()
    if delta.element_size() == 2 and delta.is_floating_point():
        magnitude = magnitude.view(torch.int16)
        at_or_above = _histogram_16bit(magnitude).flip(0).cumsum(0).flip(0)  # count(bits >= v)
        threshold = int((at_or_above >= k).nonzero().max())
    else:
        magnitude = magnitude.float()
        threshold = torch.kthvalue(magnitude.reshape(-1).cpu(), n - k + 1).values.item()
    keep = magnitude > threshold
    missing = k - int(keep.sum())
    if missing > 0:
        keep_flat = keep.view(-1)
        ties_at = (magnitude.reshape(-1) == threshold).nonzero().flatten()[:missing]
        keep_flat[ties_at] = True
    return keep


def sparsify_(
    delta: torch.Tensor, density: float, kind: str, rescale: bool, ctx: TensorContext, gen: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Sparsify a task vector in place (it is a fresh tensor) and return it. `gen`: the random
    stream to draw from (shared by all task vectors of one tensor, so each gets its own mask)."""
    if density >= 1:
        return delta
    if kind == "magnitude":
        norm_before = _l1(delta) if rescale else None
        delta.mul_(magnitude_mask(delta, density, ctx))
        return _rescale_l1_(delta, norm_before) if rescale else delta
    if kind == "random":
        # DARE: every entry kept with probability `density`, drawn from the generator seeded by
        # (run seed, tensor name). mergekit's work dtype: the tensor's own on accelerators and
        # for bf16, float32 otherwise.
        keep_native = delta.device.type != "cpu" or delta.dtype == torch.bfloat16
        work = delta if keep_native else delta.float()
        norm_before = _l1(work) if rescale else None
        if gen is None:
            gen = ctx.generator(work.device)
        work_flat = work.view(-1)
        for start, end in chunk_bounds(work_flat.numel()):
            draws = torch.rand(end - start, generator=gen, device=work.device)
            work_flat[start:end].mul_(draws < density)
        if rescale:
            _rescale_l1_(work, norm_before)
        return work if keep_native else delta.copy_(work)
    raise ValueError(f"unknown sparsification {kind!r}")


# -- combination ------------------------------------------------------------------------------


def _combine_chunk(parts, weights, base_part, params, consensus: bool) -> torch.Tensor:
    weighted = torch.stack(parts, dim=0).mul_(weights)
    if consensus:
        # TIES sign election on the weighted deltas: majority sign of their sum (ties -> +1);
        # an entry agrees when its sign equals the majority (zeros never agree).
        positive = weighted.sum(dim=0) >= 0
        agree = torch.where(positive, weighted > 0, weighted < 0)
        mixed = weighted.mul_(agree).sum(dim=0)
        divisor = (weights * agree).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = weighted.sum(dim=0)
        divisor = weights.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if params["normalize"]:
        mixed = mixed / divisor
    if params["lambda"] != 1:
        mixed = mixed * params["lambda"]
    return base_part + mixed


def merge_task_vectors(
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    params: dict,
    variant: Variant,
    ctx: TensorContext,
    deltas_are_scratch: bool = False,
) -> torch.Tensor:
    """Merge task vectors onto the base. Sparsification works in place only on scratch deltas;
    callers that keep deltas between merges (the resident executor) get theirs untouched."""
    if not deltas:
        return base
    for d in densities:
        if not 0 <= d <= 1:
            raise ModelError(f"density must be in [0, 1], got {d} for tensor {ctx.name}")
    if variant.sparsify is not None:
        # One stream per output tensor, consumed model after model: a fresh generator per task
        # vector would give every model the *same* DARE mask.
        gen = ctx.generator(base.device) if variant.sparsify == "random" else None
        deltas = [
            d if density >= 1 else sparsify_(d if deltas_are_scratch else d.clone(), density, variant.sparsify, bool(params["rescale"]), ctx, gen)
            for d, density in zip(deltas, densities)
        ]
    flats = [flat(d) for d in deltas]
    w = weights_like(weights, flats[0].unsqueeze(0))
    base_flat = flat(base)
    out = torch.empty_like(base)
    out_flat = out.view(-1)
    for start, end in chunk_bounds(out.numel()):
        out_flat[start:end] = _combine_chunk(
            [f[start:end] for f in flats], w, base_flat[start:end], params, variant.consensus
        )
    return out


def _make(name: str):
    variant = VARIANTS[name]

    def method(tensors, base_index, params, model_params, ctx: TensorContext) -> torch.Tensor:
        base, deltas, positions = task_vectors(tensors, base_index, ctx)
        return merge_task_vectors(
            base,
            deltas,
            [model_params[i]["weight"] for i in positions],
            [model_params[i]["density"] for i in positions],
            params,
            variant,
            ctx,
            deltas_are_scratch=True,
        )

    method.__name__ = name
    method.__doc__ = f"`{name}` (spec 2.6): sparsify={variant.sparsify}, consensus={variant.consensus}"
    return method


task_arithmetic = _make("task_arithmetic")
ties = _make("ties")
dare_ties = _make("dare_ties")
dare_linear = _make("dare_linear")
