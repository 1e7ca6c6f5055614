"""The generalised task-arithmetic family (docs/mergekit-reference.md §2): task_arithmetic, ties, dare_ties,
dare_linear, breadcrumbs, breadcrumbs_ties, della, della_linear.

Split in two steps so that the resident executor can keep task vectors between candidates:
`task_vectors` (inputs -> deltas against the base) and `merge_task_vectors` (deltas + per-model
weights/densities -> merged tensor). Both executors go through these same two functions.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch

from ..errors import ModelError
from . import METHODS, RANDOM_SPARSIFIERS, TaskVectorSpec, fused
from .common import TensorContext, chunk_bounds, flat, keep_probability, mask_key, mask_uniforms

RESCALE_EPS = 1e-7




def aligned_inputs(
    tensors: Sequence[torch.Tensor], base_index: Optional[int], ctx: TensorContext
) -> tuple[torch.Tensor, list[torch.Tensor], list[int]]:
    """(base, the other inputs cast and cut to the base's shape, their positions in `tensors`)."""
    if base_index is None:
        raise ModelError(f"this method needs base_model, and tensor {ctx.name} has no base input")
    base = tensors[base_index]
    others, positions = [], []
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
            x = x[: base.shape[0], : base.shape[1]].contiguous()
        others.append(x)
        positions.append(i)
    return base, others, positions


def task_vectors(
    tensors: Sequence[torch.Tensor], base_index: Optional[int], ctx: TensorContext
) -> tuple[torch.Tensor, list[torch.Tensor], list[int]]:
    """(base, deltas of the other inputs, their positions): what the resident executor caches."""
    base, others, positions = aligned_inputs(tensors, base_index, ctx)
    return base, [x - base for x in others], positions


# -- sparsification ---------------------------------------------------------------------------
#
# Everything below streams over slices of the flattened task vectors (FUSED_CHUNK elements), so
# no full-size temporary is ever made: a first pass finds each task vector's magnitude threshold
# from a histogram (and its L1 norms when rescaling), the second pass masks, weighs and combines
# slice by slice. Results equal mergekit's whole-tensor op sequence (to float rounding in norms).

FUSED_CHUNK = 1 << 18
SMALL_TENSOR = 1 << 16  # below this many entries the top-k threshold comes from kthvalue


class _TaskVectors:
    """The task vectors of one tensor, read slice by slice: cached full deltas (resident
    executor) or `x - base` computed on the fly (streaming executor, no full delta is kept)."""

    def __init__(self, base: torch.Tensor, deltas=None, inputs=None):
        self.base_flat = base_flat = flat(base)
        self.shape = base.shape  # DELLA ranks within rows
        self.deltas = [flat(d) for d in deltas] if deltas is not None else None
        self.inputs = [flat(x) for x in inputs] if inputs is not None else None
        self.count = len(self.deltas if deltas is not None else self.inputs)
        self.numel = base_flat.numel()

    def chunk(self, i: int, start: int, end: int) -> torch.Tensor:
        if self.deltas is not None:
            return self.deltas[i][start:end]
        return self.inputs[i][start:end] - self.base_flat[start:end]

    def chunks(self, i: int):
        for start, end in chunk_bounds(self.numel, FUSED_CHUNK):
            yield start, end, self.chunk(i, start, end)


def _magnitude_bits(delta: torch.Tensor) -> torch.Tensor:
    """|delta| as integers whose order is the order of the magnitudes (IEEE floats, sign cleared)."""
    int_type = {2: torch.int16, 4: torch.int32}.get(delta.element_size())
    if int_type is None or not delta.is_floating_point():
        raise ModelError(f"magnitude sparsification does not support dtype {delta.dtype}")
    return delta.abs().view(int_type)


def _bincount(values: torch.Tensor, bins: int) -> torch.Tensor:
    return torch.bincount(values.to(torch.int32), minlength=bins).to(torch.int64)


def _top_k_threshold(vectors: _TaskVectors, i: int, k: int, cache: Optional[dict] = None) -> tuple[int, int]:
    """(threshold bits, how many entries equal to it are kept) for the k largest |delta_i|,
    from histograms of the magnitude bits: one level for 16-bit floats, two for 32-bit. The
    histograms do not depend on the density: `cache` keeps them between candidates."""
    cache = {} if cache is None else cache
    probe = vectors.chunk(i, 0, min(1, vectors.numel))
    if vectors.numel <= SMALL_TENSOR:
        # small tensors: a selection over all magnitude bits is cheaper than histograms
        bits = _magnitude_bits(vectors.chunk(i, 0, vectors.numel)).to(torch.int32)
        threshold = int(torch.kthvalue(bits.cpu(), vectors.numel - k + 1).values)
        return threshold, k - int((bits > threshold).sum())
    wide = probe.element_size() == 4
    above = cache.get(("high", i))
    if above is None:
        for j, hist in _histograms(vectors, i, -1, cache):
            cache[("high", j)] = hist.flip(0).cumsum(0).flip(0)  # above[v] = count(bins >= v)
        above = cache[("high", i)]
    top = int((above >= k).nonzero().max())
    greater = int(above[top + 1]) if top + 1 < above.numel() else 0
    if not wide:
        return top, k - greater
    above_low = cache.get(("low", i, top))
    if above_low is None:
        [(_, low)] = _histograms(vectors, i, top, cache)
        above_low = cache[("low", i, top)] = low.flip(0).cumsum(0).flip(0)
    need = k - greater
    bottom = int((above_low >= need).nonzero().max())
    greater_low = int(above_low[bottom + 1]) if bottom + 1 < above_low.numel() else 0
    return (top << 16) | bottom, need - greater_low


def _histograms(vectors: _TaskVectors, i: int, bucket: int, cache: dict) -> list[tuple[int, torch.Tensor]]:
    """[(model index, histogram of its magnitude bits)]: the 15 bits of a 16-bit float, or the high
    16 bits of a 32-bit one (bucket -1), or the low 16 bits within the high-bits bucket. Through
    the fused kernel, one pass gives the high-level histograms of every task vector still missing
    from `cache` (they all need one); eagerly, model i's alone."""
    sources = vectors.deltas if vectors.deltas is not None else vectors.inputs
    wide = sources[i].element_size() == 4
    if fused.usable([vectors.base_flat, *sources]):
        todo = [j for j in range(vectors.count) if ("high", j) not in cache] if bucket < 0 else [i]
        hists = fused.magnitude_histograms(
            vectors.base_flat, [sources[j] for j in todo], vectors.deltas is not None, [bucket] * len(todo)
        )
        return list(zip(todo, hists))
    hist = torch.zeros(1 << 15 if not wide else 1 << 16, dtype=torch.int64, device=vectors.base_flat.device)
    for _, _, delta in vectors.chunks(i):
        bits = _magnitude_bits(delta)
        if not wide:
            hist += _bincount(bits, hist.numel())
        elif bucket < 0:
            hist += _bincount(bits >> 16, hist.numel())
        else:
            hist += _bincount(bits[(bits >> 16) == bucket] & 0xFFFF, hist.numel())
    return [(i, hist)]


def _kept_count(vectors: _TaskVectors, density: float, ctx: TensorContext) -> int:
    """mergekit's k for a density: int(density * numel); an error where that keeps nothing."""
    k = int(density * vectors.numel)
    if k <= 0:
        raise ModelError(f"density {density} keeps no entry of tensor {ctx.name} ({vectors.numel} entries): raise the density")
    return k


def _magnitude_threshold(vectors: _TaskVectors, i: int, density: float, ctx: TensorContext, cache: Optional[dict]) -> tuple[int, int]:
    """`_top_k_threshold` for the int(density * numel) largest entries (mergekit's k)."""
    return _top_k_threshold(vectors, i, _kept_count(vectors, density, ctx), cache)


class _TopK:
    """Streaming membership of the k largest |delta_i|, in the order of a stable descending sort
    (equal magnitudes: the lower flat index counts as larger). Slices come in flat order after
    `start()`; `mask` gives 0/1 integers (arithmetic is much cheaper than boolean ops)."""

    def __init__(self, vectors: _TaskVectors, i: int, k: int, cache: Optional[dict], threshold: Optional[tuple[int, int]] = None):
        self.k = max(0, min(k, vectors.numel))
        self.everything = self.k == vectors.numel
        if threshold is None and 0 < self.k < vectors.numel:
            threshold = _top_k_threshold(vectors, i, self.k, cache)
        self.threshold, self.tied = threshold or (0, 0)
        self.quota = self.tied

    def start(self) -> None:
        self.quota = self.tied

    def mask(self, bits: torch.Tensor) -> torch.Tensor:
        if self.k == 0:
            return torch.zeros_like(bits)
        if self.everything:
            return torch.ones_like(bits)
        keep = (bits - self.threshold).clamp_(0, 1)  # 1 where |delta| > threshold
        if self.quota > 0:
            # entries equal to the threshold: the first ones in flat order, as a stable sort keeps
            equal = bits == self.threshold
            count = int(equal.sum())
            if count <= self.quota:
                keep += equal
                self.quota -= count
            else:
                keep[equal.nonzero().flatten()[: self.quota]] = 1
                self.quota = 0
        return keep


def top_k_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest |values| (equal magnitudes: lower flat index first), found
    with the same histogram threshold search as TIES instead of a sort, built slice by slice."""
    vectors = _TaskVectors(values, deltas=[values])
    top = _TopK(vectors, 0, k, None)
    top.start()
    mask = torch.empty(values.numel(), dtype=torch.bool, device=values.device)
    for start, end, part in vectors.chunks(0):
        mask[start:end] = top.mask(_magnitude_bits(part))
    return mask.view(values.shape)


def _row_ranks(bits: torch.Tensor) -> torch.Tensor:
    """Each entry's rank within its row in a stable ascending sort of the magnitude bits (which
    sort like the magnitudes): a radix-sort kernel for 16-bit floats, else torch's sort."""
    ranks = fused.row_ranks(bits)
    if ranks is not None:
        return ranks
    order = torch.argsort(bits, dim=1, stable=True)
    ranks = torch.empty_like(order)
    return ranks.scatter_(1, order, torch.arange(bits.shape[1], device=order.device).expand_as(order))


class _DellaProbabilities:
    """DELLA's keep probabilities: per row (dim 0 indexes rows; a 1-D tensor is one row), entries
    ranked by |delta| ascending from 0 to C-1 (a stable sort: equal magnitudes rank by position),
    p = (density - eps) + 2 eps rank / (C - 1). Ranks are exact integers, whatever the dtype.
    Computed for the whole rows that cover each requested slice, kept while slices stay inside."""

    def __init__(self, vectors: _TaskVectors, i: int, density: float, epsilon: float):
        self.vectors, self.i, self.density, self.epsilon = vectors, i, density, epsilon
        shape = vectors.shape
        self.row = vectors.numel if len(shape) <= 1 else vectors.numel // shape[0]
        self.rows: Optional[tuple[int, int, torch.Tensor]] = None

    def __call__(self, start: int, end: int) -> torch.Tensor:
        c = self.row
        first, last = start // c, -(-end // c)
        if self.rows is None or not (self.rows[0] <= first and last <= self.rows[1]):
            block = self.vectors.chunk(self.i, first * c, last * c).view(last - first, c)
            rank = _row_ranks(_magnitude_bits(block))
            if c == 1:
                # mergekit divides by C - 1 = 0 (NaN probabilities); a lone entry keeps `density`
                prob = torch.full(rank.shape, self.density, dtype=torch.float32, device=rank.device)
            else:
                prob = (self.density - self.epsilon) + (2 * self.epsilon) * (rank.to(torch.float32) / (c - 1))
            self.rows = (first, last, prob.view(-1))
        offset = self.rows[0] * c
        return self.rows[2][start - offset : end - offset]


def rescale_factor(before: float, after: float, dtype: torch.dtype, device) -> Optional[torch.Tensor]:
    """mergekit's L1 rescale ||delta||_1 / ||kept||_1, both norms and the ratio in the work dtype;
    None (no rescale) where either norm is below RESCALE_EPS."""
    before_t = torch.tensor(before, dtype=dtype)
    after_t = torch.tensor(after, dtype=dtype)
    if before_t >= RESCALE_EPS and after_t >= RESCALE_EPS:
        return (before_t / after_t).to(device)
    return None


class _Sparsifier:
    """One task vector's sparsification, applied slice by slice in flat-index order."""

    def __init__(
        self,
        vectors: _TaskVectors,
        i: int,
        density: float,
        kind: str,
        rescale: bool,
        ctx: TensorContext,
        cache: Optional[dict] = None,
        extra: Optional[float] = None,
        label: str = "",
    ):
        self.vectors, self.i, self.density, self.kind, self.ctx = vectors, i, density, kind, ctx
        self.scale: Optional[torch.Tensor] = None
        self.sets: list[_TopK] = []  # magnitude kinds: kept set, then (outliers) the top removed
        self.probability: Optional[_DellaProbabilities] = None
        self.masks: Optional[list] = None  # random kinds with rescale: the masks drawn while measuring
        if kind == "magnitude":
            k = int(density * vectors.numel)
            self.sets = [_TopK(vectors, i, k, cache, _magnitude_threshold(vectors, i, density, ctx, cache))]
        elif kind == "magnitude_outliers":
            self.sets = self._outlier_sets(float(extra), cache, label)
        elif kind == "della_magprune":
            self.probability = self._della(float(extra), label)
        elif kind != "random":
            raise ValueError(f"unknown sparsification {kind!r}")
        if rescale:
            self._measure_rescale()

    def _outlier_sets(self, gamma: float, cache: Optional[dict], label: str) -> list[_TopK]:
        """Breadcrumbs: in ascending magnitude order keep positions [n_bot, N - n_top), i.e. drop
        the n_top largest and the n_bot smallest (mergekit's counts). mergekit slices
        `[n_bot:-n_top]`, which keeps nothing when n_top == 0; we keep what the formula says."""
        if not 0 <= gamma <= 1:
            raise ModelError(f"gamma must be in [0, 1], got {gamma} for {label} in tensor {self.ctx.name}")
        n = self.vectors.numel
        target, top = int(self.density * n), int(gamma * n)
        bottom = n - target - top
        if bottom < 0:
            top, bottom = top + bottom, 0
        # both sets follow one total order, so the top outliers are a subset of the upper set
        return [_TopK(self.vectors, self.i, n - bottom, cache), _TopK(self.vectors, self.i, top, cache)]

    def _della(self, epsilon: float, label: str) -> Optional[_DellaProbabilities]:
        if self.density <= 0:
            return None  # nothing kept
        if not (self.density - epsilon > 0 and self.density + epsilon < 1):
            raise ModelError(
                f"della: epsilon {epsilon} with density {self.density} for {label} in tensor {self.ctx.name}: "
                f"density - epsilon and density + epsilon must lie in (0, 1)"
            )
        return _DellaProbabilities(self.vectors, self.i, self.density, epsilon)

    def _start(self) -> None:
        for s in self.sets:
            s.start()

    def _keep(self, start: int, end: int, delta: torch.Tensor) -> torch.Tensor:
        """The keep mask of the slice [start, end) as 0/1 numbers."""
        if self.kind in RANDOM_SPARSIFIERS:
            # each model's mask has its own counter-based stream, keyed by (run seed, tensor, model)
            key = mask_key(self.ctx.seed, self.ctx.name, self.i)
            if self.kind == "random":
                return mask_uniforms(key, start, end, delta.device) < keep_probability(self.density)
            if self.probability is None:
                return torch.zeros(delta.shape, dtype=torch.bool, device=delta.device)
            return mask_uniforms(key, start, end, delta.device) < self.probability(start, end)
        bits = _magnitude_bits(delta)
        keep = self.sets[0].mask(bits)
        for outliers in self.sets[1:]:
            keep -= outliers.mask(bits)
        return keep

    def _work(self, delta: torch.Tensor) -> torch.Tensor:
        # mergekit's DARE work dtype: the tensor's own for bf16 and on accelerators, else float32
        if self.kind in RANDOM_SPARSIFIERS and delta.device.type == "cpu" and delta.dtype != torch.bfloat16:
            return delta.float()
        return delta

    def _measure_rescale(self) -> None:
        before = after = 0.0
        self._start()
        # Random masks (DARE, DELLA) cost far more to draw (and DELLA's to rank) than to keep:
        # the measuring pass keeps them, one byte per entry, for the merging pass.
        self.masks = [] if self.kind in RANDOM_SPARSIFIERS else None
        for start, end, delta in self.vectors.chunks(self.i):
            work = self._work(delta)
            keep = self._keep(start, end, delta)
            if self.masks is not None:
                self.masks.append(keep)
            before += float(work.abs().sum(dtype=torch.float64))
            after += float((work * keep).abs().sum(dtype=torch.float64))
        dtype = self._work(self.vectors.chunk(self.i, 0, 1)).dtype
        self.scale = rescale_factor(before, after, dtype, self.vectors.base_flat.device)

    def __iter__(self):
        masks, self.masks = self.masks, None  # each kept mask is used once, then freed
        self._start()
        for n, (start, end, delta) in enumerate(self.vectors.chunks(self.i)):
            if masks is not None:
                keep, masks[n] = masks[n], None
            else:
                keep = self._keep(start, end, delta)
            kept = self._work(delta) * keep
            if self.scale is not None:
                kept = kept * self.scale
            yield kept.to(delta.dtype)


# -- combination ------------------------------------------------------------------------------


def _elect_two(w0: torch.Tensor, w1: torch.Tensor, q0: float, q1: float, q01: float):
    """TIES election for two models with arithmetic only (comparisons and `where` cost several
    times more on CPU). A sum of two terms rounds once, so every value equals mergekit's."""
    majority = torch.sign(torch.sign(w0 + w1).add_(0.5))  # +1 where the sum is >= 0, else -1
    a0 = torch.sign(w0).mul_(majority).clamp_(min=0)  # 1 where W0 agrees with the majority
    a1 = torch.sign(w1).mul_(majority).clamp_(min=0)
    mixed = w0 * a0 + w1 * a1
    divisor = a0 * q0 + a1 * q1  # the agreeing models' weights (q01 == q0 + q1 rounded)
    divisor += (1 - a0).mul_(1 - a1)  # nobody agrees: divide by 1
    return mixed, divisor


def _two_model_vote(weights: Sequence[float], consensus: bool) -> bool:
    """Whether the TIES election takes the arithmetic two-model form (`_elect_two`)."""
    return consensus and len(weights) == 2 and weights[0] != 0 and weights[1] != 0 and weights[0] + weights[1] != 0


@functools.lru_cache(maxsize=4096)
def _scalar(value: float, dtype: torch.dtype, device: str) -> torch.Tensor:
    """A 0-dim tensor of `value` in `dtype` (quantised as mergekit's weight tensors are); cached,
    since a search asks for the same few values for every tensor. Never modified in place."""
    return torch.tensor(value, dtype=dtype, device=device)


@functools.lru_cache(maxsize=4096)
def _cached_sum_divisor(weights: tuple, dtype: torch.dtype, device: str) -> torch.Tensor:
    divisor = torch.tensor(sum(weights), dtype=torch.float32).to(dtype)
    if divisor.abs() < 1e-8:
        divisor = torch.ones((), dtype=dtype)
    return divisor.to(device)


def _sum_divisor(weights: Sequence[float], dtype: torch.dtype, device) -> torch.Tensor:
    """Without consensus, normalize divides by the weights' sum (1 where it is ~0)."""
    return _cached_sum_divisor(tuple(weights), dtype, str(device))


def _combine(weighted: list[torch.Tensor], weights: list[float], base_part: torch.Tensor, params, consensus: bool):
    """mergekit's combination of weighted deltas W_i for one slice. Sums over models accumulate in
    float32 and round once, as torch's reduction over the stacked models does."""
    dtype = base_part.dtype
    if _two_model_vote(weights, consensus):
        mixed, divisor = _elect_two(weighted[0], weighted[1], weights[0], weights[1], weights[0] + weights[1])
    elif consensus:
        wide = [w.float() for w in weighted]
        # TIES sign election: majority sign of the summed W (ties -> +1); zeros never agree.
        total = wide[0].clone()
        for w in wide[1:]:
            total += w
        majority = torch.where(total.to(dtype) >= 0, 1.0, -1.0)
        mixed = torch.zeros_like(total)
        divisor = torch.zeros_like(total)
        for w, weight in zip(wide, weights):
            agree = (w * majority) > 0
            mixed += w * agree
            divisor += agree * weight
        mixed = mixed.to(dtype)
        divisor = divisor.to(dtype)
        divisor.masked_fill_(divisor == 0, 1)
    else:
        wide = [w.float() for w in weighted]
        mixed = wide[0].clone()
        for w in wide[1:]:
            mixed += w
        mixed = mixed.to(dtype)
        divisor = _sum_divisor(weights, dtype, base_part.device)
    if params["normalize"]:
        mixed = mixed / divisor
    if params["lambda"] != 1:
        mixed = mixed * params["lambda"]
    return base_part + mixed


def _merge(
    vectors: _TaskVectors,
    base: torch.Tensor,
    weights: Sequence[float],
    densities: Sequence[float],
    params: dict,
    variant: TaskVectorSpec,
    ctx: TensorContext,
    cache: Optional[dict] = None,
    extras: Optional[Sequence[float]] = None,
    positions: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    if vectors.count == 0:
        return base
    for d in densities:
        if not 0 <= d <= 1:
            raise ModelError(f"density must be in [0, 1], got {d} for tensor {ctx.name}")
    if variant.extra is not None and extras is None:
        raise ValueError(f"{variant.sparsify} needs the per-model {variant.extra} values")
    fused_result = _merge_fused(vectors, base, weights, densities, params, variant, ctx, cache)
    if fused_result is not None:
        return fused_result
    # shared by this tensor's task vectors: one histogram pass serves all of them (and both
    # thresholds of breadcrumbs), instead of one pass over every model per threshold
    cache = {} if cache is None else cache
    streams = []
    for i, density in enumerate(densities):
        if variant.sparsify is not None and density < 1:
            label = ctx.label(positions[i]) if positions is not None else f"task vector {i}"
            extra = extras[i] if extras is not None else None
            sparsifier = _Sparsifier(vectors, i, density, variant.sparsify, bool(params["rescale"]), ctx, cache, extra, label)
            streams.append(iter(sparsifier))
        else:
            streams.append(None)
    # weights quantised to the math dtype, as mergekit builds its weight tensor
    w_tensors = [_scalar(float(w), base.dtype, str(base.device)) for w in weights]
    w_quantised = [float(w) for w in w_tensors]
    out = ctx.output_buffer(base)
    out = torch.empty_like(base) if out is None else out
    out_flat = out.view(-1)
    base_flat = vectors.base_flat
    for start, end in chunk_bounds(vectors.numel, FUSED_CHUNK):
        weighted = []
        for i in range(vectors.count):
            delta = next(streams[i]) if streams[i] is not None else vectors.chunk(i, start, end)
            weighted.append(delta * w_tensors[i])
        out_flat[start:end] = _combine(weighted, w_quantised, base_flat[start:end], params, variant.consensus)
    return out


def _merge_fused(vectors: _TaskVectors, base, weights, densities, params, variant: TaskVectorSpec, ctx: TensorContext, cache) -> Optional[torch.Tensor]:
    """The same merge through the one-pass CPU kernel, or None where only the eager path applies
    (DELLA, breadcrumbs, TIES with rescale, lambda, float16, CUDA)."""
    sparsified = [variant.sparsify is not None and d < 1 for d in densities]
    random = variant.sparsify == "random" and any(sparsified)
    if variant.sparsify not in (None, "magnitude", "random") and any(sparsified):
        return None
    if (any(sparsified) and params["rescale"] and not random) or params["lambda"] != 1:
        return None
    sources = vectors.deltas if vectors.deltas is not None else vectors.inputs
    if not fused.usable([vectors.base_flat, *sources]):
        return None
    # a one-shot merge (no cache to fill for later candidates) of a large 16-bit tensor finds its
    # thresholds and cutoffs from a sampled band; full histograms only where that misses
    one_shot = cache is None and not random and vectors.numel >= fused.BAND_MIN_NUMEL and base.element_size() == 2
    todo = [i for i in range(vectors.count) if sparsified[i]] if one_shot else []
    ks = [_kept_count(vectors, densities[i], ctx) for i in todo]
    bands = dict(zip(todo, fused.top_k_bands(vectors.base_flat, [sources[i] for i in todo], vectors.deltas is not None, ks))) if todo else {}
    cache = {} if cache is None else cache
    thresholds, cutoffs = [], []
    cutoff_keys: dict[int, tuple] = {}  # model index -> its tie cutoff's cache key
    keys, probs, scales = [], [], []
    for i, density in enumerate(densities):
        if random:
            thresholds.append(-1)
            cutoffs.append(-1)
            keys.append(mask_key(ctx.seed, ctx.name, i) if sparsified[i] else 0)
            probs.append(keep_probability(density) if sparsified[i] else 2.0)  # 2: keep all
            scale = None
            if sparsified[i] and params["rescale"]:
                # the norms depend on (mask, density) only: a search changing weights reuses them
                key = ("l1", i, keys[-1], probs[-1])
                if key not in cache:
                    cache[key] = fused.random_l1(vectors.base_flat, sources, vectors.deltas is not None, i, keys[-1], probs[-1])
                scale = rescale_factor(*cache[key], base.dtype, "cpu")
            scales.append(1.0 if scale is None else float(scale))
            continue
        if not sparsified[i]:
            thresholds.append(-1)
            cutoffs.append(-1)
            continue
        if bands.get(i) is not None:
            threshold, _, cutoff = bands[i]
            thresholds.append(threshold)
            cutoffs.append(cutoff)
            continue
        threshold, quota = _magnitude_threshold(vectors, i, density, ctx, cache)
        thresholds.append(threshold)
        cutoffs.append(-1)  # filled in below, once every threshold is known
        cutoff_keys[i] = ("cutoff", i, threshold, quota)
    missing = [key for key in cutoff_keys.values() if key not in cache]
    if missing:  # one pass over the inputs for every task vector's tie cutoff
        found = fused.tie_cutoffs(
            vectors.base_flat, [sources[key[1]] for key in missing], vectors.deltas is not None,
            [key[2] for key in missing], [key[3] for key in missing],
        )
        cache.update(zip(missing, found))
    for i, key in cutoff_keys.items():
        cutoffs[i] = cache[key]
    quantised = [float(_scalar(float(w), base.dtype, "cpu")) for w in weights]
    out = ctx.output_buffer(base)
    result = fused.merge(
        vectors.base_flat,
        sources,
        vectors.deltas is not None,
        quantised,
        thresholds,
        cutoffs,
        variant.consensus,
        _two_model_vote(quantised, variant.consensus),
        float(_sum_divisor(quantised, base.dtype, "cpu")),
        bool(params["normalize"]),
        out=out.view(-1) if out is not None else None,
        random=(keys, probs, scales) if random else None,
    )
    return out if out is not None else result.view(base.shape)


def merge_task_vectors(
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    params: dict,
    variant: TaskVectorSpec,
    ctx: TensorContext,
    cache: Optional[dict] = None,
    extras: Optional[Sequence[float]] = None,
    positions: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """Merge precomputed task vectors onto the base (they are not modified): the resident
    executor's entry point, bit-identical to the method functions below. `cache` (a dict owned by
    the caller, one per output tensor) keeps density-independent work between candidates.
    `extras`: the variant's own per-model parameter (gamma, epsilon) per task vector;
    `positions`: the task vectors' input positions (for error messages)."""
    return _merge(_TaskVectors(base, deltas=deltas), base, weights, densities, params, variant, ctx, cache, extras, positions)


def variant_extras(variant: TaskVectorSpec, model_params: Sequence[dict], positions: Sequence[int]) -> Optional[list[float]]:
    """The variant's own per-model parameter for each task vector, or None if it has none."""
    if variant.extra is None:
        return None
    return [model_params[i][variant.extra] for i in positions]


def _make(name: str):
    variant = METHODS[name].task_vector

    def method(tensors, base_index, params, model_params, ctx: TensorContext) -> torch.Tensor:
        base, others, positions = aligned_inputs(tensors, base_index, ctx)
        vectors = _TaskVectors(base, inputs=others)
        return _merge(
            vectors,
            base,
            [model_params[i]["weight"] for i in positions],
            [model_params[i]["density"] for i in positions],
            params,
            variant,
            ctx,
            extras=variant_extras(variant, model_params, positions),
            positions=positions,
        )

    method.__name__ = name
    method.__doc__ = f"`{name}` (docs/mergekit-reference.md §2): sparsify={variant.sparsify}, consensus={variant.consensus}"
    return method


task_arithmetic = _make("task_arithmetic")
ties = _make("ties")
dare_ties = _make("dare_ties")
dare_linear = _make("dare_linear")
breadcrumbs = _make("breadcrumbs")
breadcrumbs_ties = _make("breadcrumbs_ties")
della = _make("della")
della_linear = _make("della_linear")
