"""Fused CPU kernels for the task-arithmetic family (numba), one pass over memory per tensor.

The eager path in task_arithmetic.py runs ~40 torch elementwise ops per slice; on CPU that is
memory- and dispatch-bound (a resident `ties` candidate took ~40x a plain copy). These kernels do
the same per-element arithmetic in one parallel loop. They reproduce the eager op sequence
exactly: every eager op on a 16-bit tensor is "widen to float32, compute, round to nearest even",
so each such op is written here as a float32 operation followed by `_round` (a no-op for float32
tensors). Signed zeros follow torch's `sign` (+0 for +-0) and `clamp(min=0)` (keeps -0).

Only what is exact and common is fused: CPU, contiguous bfloat16 or float32, lambda 1, and
magnitude (TIES, no rescale), random (DARE, with or without rescale) or no sparsification.
DARE's masks come from the counter-based stream of common.py (`mask_uniforms`), recomputed per
element here, so no mask is stored. Everything else (DELLA, breadcrumbs, float16, CUDA, ...) keeps
the eager path. `EVOMERGE_EAGER=1` disables the kernels (tests compare both paths). The one
difference: DARE's L1 norms are float64 sums in another order than torch's, so a rescale factor
(rounded to the tensor's dtype) can differ from the eager one in its last bit, rarely.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
import torch

from .common import SPLITMIX_GAMMA, SPLITMIX_M1, SPLITMIX_M2

try:  # numba is a dependency, but a platform without it still merges (eagerly)
    import numba
    from numba import njit, prange
    from numba.core import types
    from numba.extending import intrinsic
except ImportError:  # pragma: no cover - exercised only where numba is missing
    numba = None

# Tensors below this size are cheaper through the eager path than a parallel kernel launch.
MIN_FUSED_NUMEL = 1 << 14
BLOCK = 4096  # elements per kernel block: the models' W buffers stay in L1/L2
SAMPLE_RUN = 256  # a one-shot top-k samples one run of this many entries per window of
SAMPLE_WINDOW = 16 * SAMPLE_RUN  # this many (see `top_k_bands`). Mapped inputs make every
# touched page cost about as much as reading it: runs of 64 per 1 KiB took as long as a full
# pass, these touch half the pages. Longer runs sample fewer independent rows: on SmolLM2-135M
# runs of 256 missed the band 0.4 % of the time, of 512 4.4 %, of 2048 10 %

_NUMPY_BITS = {torch.bfloat16: torch.int16, torch.float32: torch.int32}


def available() -> bool:
    return numba is not None and os.environ.get("EVOMERGE_EAGER", "") in ("", "0")


def usable(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether the kernels can take these tensors (same dtype, CPU, contiguous, large enough)."""
    if not available() or not tensors:
        return False
    first = tensors[0]
    if first.dtype not in _NUMPY_BITS or first.numel() < MIN_FUSED_NUMEL:
        return False
    return all(t.device.type == "cpu" and t.dtype == first.dtype and t.is_contiguous() for t in tensors)


if numba is not None:

    @intrinsic
    def _bits_to_f32(typingctx, bits):
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], context.get_value_type(types.float32))

        return types.float32(types.uint32), codegen

    @intrinsic
    def _f32_to_bits(typingctx, value):
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], context.get_value_type(types.uint32))

        return types.uint32(types.float32), codegen

    @njit(inline="always")
    def _load(arr, i, wide):
        if wide:
            return _bits_to_f32(np.uint32(arr[i]))
        return _bits_to_f32(np.uint32(np.uint16(arr[i])) << np.uint32(16))

    @njit(inline="always")
    def _round(x, wide):
        """x rounded to the storage dtype (bfloat16: to nearest even, as torch does). No NaN
        special case (that would stop vectorisation): every NaN here comes from bfloat16 data
        or arithmetic, with high mantissa bits set, so it stays NaN."""
        if wide:
            return x
        b = _f32_to_bits(x)
        return _bits_to_f32((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000))

    @njit(inline="always")
    def _magnitude(x, wide):
        """|x| as the integer the eager path compares (sign bit cleared, in storage width)."""
        b = _f32_to_bits(x) & np.uint32(0x7FFFFFFF)
        if wide:
            return np.int32(b)
        return np.int32(b >> np.uint32(16))

    @njit(inline="always")
    def _store(arr, i, x, wide):
        b = _f32_to_bits(x)
        if wide:
            arr[i] = b
        else:
            arr[i] = b >> np.uint32(16)  # already rounded

    @njit(inline="always")
    def _uniform(key, j):
        """The mask stream's uniform for flat index j (common.mask_uniforms): SplitMix64's
        (j+1)-th output for `key`, top 24 bits times 2^-24."""
        z = key + np.uint64(j + 1) * np.uint64(SPLITMIX_GAMMA)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(SPLITMIX_M1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(SPLITMIX_M2)
        z = z ^ (z >> np.uint64(31))
        return np.float32(np.uint32(z >> np.uint64(40))) * np.float32(1.0 / 16777216.0)

    @njit(inline="always")
    def _delta_at(base, src, i, are_deltas, wide):
        if are_deltas:
            return _load(src, i, wide)
        return _round(_load(src, i, wide) - _load(base, i, wide), wide)

    @njit(parallel=True, cache=True, error_model="numpy")
    def _tie_counts(base, sources, are_deltas, thresholds, blocks, wide):
        """How many entries of each task vector have magnitude == its threshold, per block (one
        pass over base and every source; threshold -1 counts nothing)."""
        n = base.shape[0]
        m = len(sources)
        size = (n + blocks - 1) // blocks
        counts = np.zeros((m, blocks), dtype=np.int64)
        for blk in prange(blocks):
            start = blk * size
            stop = min(n, start + size)
            for k in range(m):
                if thresholds[k] < 0:
                    continue
                b, x, threshold = base[start:stop], sources[k][start:stop], thresholds[k]
                c = 0
                for i in range(stop - start):
                    c += np.int64(_magnitude(_delta_at(b, x, i, are_deltas, wide), wide) == threshold)
                counts[k, blk] = c
        return counts

    @njit(inline="always")
    def _count_magnitudes(base, src, are_deltas, bucket, h, wide):
        """Adds the magnitude bits of one span to histogram h (see `_magnitude_histograms`)."""
        for i in range(base.shape[0]):
            mag = _magnitude(_delta_at(base, src, i, are_deltas, wide), wide)
            if not wide:
                h[mag] += 1
            elif bucket < 0:
                h[mag >> 16] += 1
            elif (mag >> 16) == bucket:
                h[mag & 0xFFFF] += 1

    @njit(parallel=True, cache=True, error_model="numpy")
    def _magnitude_histograms(base, sources, are_deltas, buckets, bins, blocks, wide):
        """Per task vector, a histogram of its magnitude bits: 16-bit dtypes all 15 bits; 32-bit
        the high 16 bits (bucket -1), or the low 16 bits of the entries whose high bits equal the
        bucket. One pass over base and every source; each thread counts into its own rows."""
        n = base.shape[0]
        m = len(sources)
        size = (n + blocks - 1) // blocks
        counts = np.zeros((blocks, m, bins), dtype=np.int64)
        for blk in prange(blocks):
            start = blk * size
            stop = min(n, start + size)
            for k in range(m):
                _count_magnitudes(base[start:stop], sources[k][start:stop], are_deltas, buckets[k], counts[blk, k], wide)
        total = np.zeros((m, bins), dtype=np.int64)
        for k in prange(m * bins):
            acc = 0
            for blk in range(blocks):
                acc += counts[blk, k // bins, k % bins]
            total[k // bins, k % bins] = acc
        return total

    @njit(inline="always")
    def _sample_start(window, n):
        """Where the sampled run of window `window` starts: a hashed offset inside the window,
        so that rows whose length divides the window are not always sampled at the same columns."""
        start = window * SAMPLE_WINDOW
        slots = min(SAMPLE_WINDOW, n - start) - SAMPLE_RUN
        if slots <= 0:
            return start
        return start + ((window * 2654435761) & 0xFFFFFFFF) % (slots + 1)  # int64: no overflow below 2^31 windows

    @njit(parallel=True, cache=True, error_model="numpy")
    def _sample_histograms(base, sources, are_deltas, blocks):
        """16-bit task vectors: per block, the histograms of one run of SAMPLE_RUN entries per
        SAMPLE_WINDOW entries (`_sample_start`), summed by the caller."""
        n = base.shape[0]
        m = len(sources)
        windows = (n + SAMPLE_WINDOW - 1) // SAMPLE_WINDOW
        per_block = (windows + blocks - 1) // blocks
        counts = np.zeros((blocks, m, 1 << 15), dtype=np.int64)
        for blk in prange(blocks):
            for w in range(blk * per_block, min(windows, (blk + 1) * per_block)):
                start = _sample_start(w, n)
                stop = min(n, start + SAMPLE_RUN)
                for k in range(m):
                    _count_magnitudes(base[start:stop], sources[k][start:stop], are_deltas, -1, counts[blk, k], False)
        return counts

    @njit(cache=True, fastmath={"reassoc"})
    def _count_at_least(mags, n, thresholds, used, counts):
        """counts[j] += #(mags[:n] >= thresholds[j]) for j < used. The sums are float32 sums of 0
        and 1 (exact below 2^24; n <= BLOCK): those vectorise, integer sums widen to int64."""
        for j in range(used):
            threshold = np.int16(thresholds[j])
            c = np.float32(0.0)
            for i in range(n):
                c += np.float32(1.0) if mags[i] >= threshold else np.float32(0.0)
            counts[j] += np.int64(c)

    @njit(inline="always")
    def _band_span(base, src, are_deltas, thresholds, used, mags, counts):
        for i in range(base.shape[0]):
            mags[i] = np.int16(_magnitude(_delta_at(base, src, i, are_deltas, False), False))
        _count_at_least(mags, base.shape[0], thresholds, used, counts)

    @njit(parallel=True, cache=True, error_model="numpy")
    def _band_counts(base, sources, are_deltas, thresholds, used, blocks):
        """16-bit task vectors only: counts[k, blk, j] = entries of task vector k in block blk
        (blocks as in `tie_cutoffs`) whose magnitude bits are >= thresholds[k, j], j < used[k].
        A vectorised pass: magnitudes into an L1-sized buffer, then one compare-count per j."""
        n = base.shape[0]
        m = len(sources)
        size = (n + blocks - 1) // blocks
        counts = np.zeros((m, blocks, thresholds.shape[1]), dtype=np.int64)
        for blk in prange(blocks):
            mags = np.empty(BLOCK, dtype=np.int16)
            start = blk * size
            stop = min(n, start + size)
            for k in range(m):
                if used[k] == 0:
                    continue
                for lo in range(start, stop, BLOCK):
                    hi = min(stop, lo + BLOCK)
                    if are_deltas:  # a constant flag per call: branch-free loops
                        _band_span(base[lo:hi], sources[k][lo:hi], True, thresholds[k], used[k], mags, counts[k, blk])
                    else:
                        _band_span(base[lo:hi], sources[k][lo:hi], False, thresholds[k], used[k], mags, counts[k, blk])
        return counts

    @njit(cache=True, error_model="numpy")
    def _tie_scan(base, src, are_deltas, threshold, start, stop, remaining, wide):
        """Index of the `remaining`-th entry equal to the threshold in [start, stop)."""
        for i in range(start, stop):
            if _magnitude(_delta_at(base, src, i, are_deltas, wide), wide) == threshold:
                remaining -= 1
                if remaining == 0:
                    return i
        return stop - 1

    @njit(parallel=True, cache=True, error_model="numpy")
    def _random_l1(base, src, are_deltas, key, p, wide):
        """DARE's rescale norms of one task vector: (sum |d|, sum |d * keep|) in float64, per
        block and then in block order (the same value whatever the thread count)."""
        n = base.shape[0]
        blocks = (n + BLOCK - 1) // BLOCK
        before = np.zeros(blocks, dtype=np.float64)
        after = np.zeros(blocks, dtype=np.float64)
        for blk in prange(blocks):
            start = blk * BLOCK
            stop = min(n, start + BLOCK)
            b, x = base[start:stop], src[start:stop]
            total = 0.0
            kept = 0.0
            for j in range(stop - start):
                d = abs(np.float64(_delta_at(b, x, j, are_deltas, wide)))
                total += d
                kept += d if _uniform(key, start + j) < p else 0.0
            before[blk] = total
            after[blk] = kept
        sum_before = 0.0
        sum_after = 0.0
        for blk in range(blocks):
            sum_before += before[blk]
            sum_after += after[blk]
        return sum_before, sum_after

    @njit(inline="always")
    def _weighted_into(buf, base, src, are_deltas, weight, threshold, cutoff, start, stop, wide, random, key, p, scale):
        """buf[j] = W for flat index start + j: the (sparsified) task vector times its weight.
        Random masks (DARE): kept entries times the rescale factor, as the eager path rounds."""
        base, src = base[start:stop], src[start:stop]  # 0-based: plain vector loads
        for j in range(stop - start):
            d = _delta_at(base, src, j, are_deltas, wide)
            if random:
                keep = np.float32(1.0) if _uniform(key, start + j) < p else np.float32(0.0)
                buf[j] = _round(_round((d * keep) * scale, wide) * weight, wide)
            else:
                mag = _magnitude(d, wide)
                keep = np.float32(1.0) if (mag > threshold) | ((mag == threshold) & (start + j <= cutoff)) else np.float32(0.0)
                buf[j] = _round((d * keep) * weight, wide)

    @njit(inline="always")
    def _weighted_variant(buf, base, src, are_deltas, weight, threshold, cutoff, start, stop, wide, random, key, p, scale):
        """`_weighted_into` with the dtype and delta flags as constants (`random` is one already)."""
        if wide and are_deltas:
            _weighted_into(buf, base, src, True, weight, threshold, cutoff, start, stop, True, random, key, p, scale)
        elif wide:
            _weighted_into(buf, base, src, False, weight, threshold, cutoff, start, stop, True, random, key, p, scale)
        elif are_deltas:
            _weighted_into(buf, base, src, True, weight, threshold, cutoff, start, stop, False, random, key, p, scale)
        else:
            _weighted_into(buf, base, src, False, weight, threshold, cutoff, start, stop, False, random, key, p, scale)

    @njit(inline="always")
    def _combine_into(bufs, base, out, start, stop, mode, weights, scalar_divisor, normalize, wide):
        """out = base + combination of the models' W (mode 0: sum, 1: TIES vote over any count)."""
        count = bufs.shape[0]
        base, out = base[start:stop], out[start:stop]  # 0-based: plain vector loads
        for j in range(stop - start):
            if mode == 1:
                total = bufs[0, j]
                for m in range(1, count):
                    total += bufs[m, j]
                majority = np.float32(1.0) if _round(total, wide) >= 0 else np.float32(-1.0)
                mixed = np.float32(0.0)
                divisor = np.float32(0.0)
                for m in range(count):
                    agree = np.float32(1.0) if bufs[m, j] * majority > 0 else np.float32(0.0)
                    mixed += bufs[m, j] * agree
                    divisor += agree * weights[m]
                mixed = _round(mixed, wide)
                divisor = _round(divisor, wide)
                if divisor == 0:
                    divisor = np.float32(1.0)
            else:
                mixed = bufs[0, j]
                for m in range(1, count):
                    mixed += bufs[m, j]
                mixed = _round(mixed, wide)
                divisor = scalar_divisor
            if normalize:
                mixed = _round(mixed / divisor, wide)
            _store(out, j, _round(_load(base, j, wide) + mixed, wide), wide)

    @njit(parallel=True, cache=True, error_model="numpy")
    def _merge_kernel(base, sources, are_deltas, weights, thresholds, cutoffs, mode, scalar_divisor, normalize, out, random, keys, probs, scales):
        """One output tensor of task_arithmetic / ties with magnitude sparsification, block by
        block: each model's W into a small buffer, then the combination (both loops vectorise);
        see the eager `_merge`/`_combine`/`_elect_two` for the op sequence mirrored here."""
        n = base.shape[0]
        count = len(sources)
        wide = base.itemsize == 4
        blocks = (n + BLOCK - 1) // BLOCK
        for blk in prange(blocks):
            start = blk * BLOCK
            stop = min(n, start + BLOCK)
            bufs = np.empty((count, stop - start), dtype=np.float32)
            for m in range(count):
                # the constant flags let each variant compile to its own branch-free loop
                t, c, k, p, sc = thresholds[m], cutoffs[m], keys[m], probs[m], scales[m]
                if random:
                    _weighted_variant(bufs[m], base, sources[m], are_deltas, weights[m], t, c, start, stop, wide, True, k, p, sc)
                else:
                    _weighted_variant(bufs[m], base, sources[m], are_deltas, weights[m], t, c, start, stop, wide, False, k, p, sc)
            if wide:
                if mode == 1:
                    _combine_into(bufs, base, out, start, stop, 1, weights, scalar_divisor, normalize, True)
                else:
                    _combine_into(bufs, base, out, start, stop, 0, weights, scalar_divisor, normalize, True)
            elif mode == 1:
                _combine_into(bufs, base, out, start, stop, 1, weights, scalar_divisor, normalize, False)
            else:
                _combine_into(bufs, base, out, start, stop, 0, weights, scalar_divisor, normalize, False)


if numba is not None:

    @njit(inline="always")
    def _ties2_span(base, s0, s1, are_deltas, q0, q1, q01, t0, t1, normalize, out, start, stop, wide, random, keys, probs, scales):
        """Two-model TIES over [start, stop) with fixed keep thresholds (|d| >= t keeps). Same
        values as `_elect_two` + `_combine`, with its selects spelled out: a model agrees when its
        W is nonzero and has the majority's sign; the divisor is the agreeing weights' sum."""
        # slices indexed from 0: LLVM sees non-negative indices and emits plain vector loads
        base, s0, s1, out = base[start:stop], s0[start:stop], s1[start:stop], out[start:stop]
        for i in range(stop - start):
            b = _load(base, i, wide)
            if are_deltas:
                d0 = _load(s0, i, wide)
                d1 = _load(s1, i, wide)
            else:
                d0 = _round(_load(s0, i, wide) - b, wide)
                d1 = _round(_load(s1, i, wide) - b, wide)
            if random:  # DARE: the mask stream, then the rescale factor (eager `_Sparsifier`)
                k0 = np.float32(1.0) if _uniform(keys[0], start + i) < probs[0] else np.float32(0.0)
                k1 = np.float32(1.0) if _uniform(keys[1], start + i) < probs[1] else np.float32(0.0)
                w0 = _round(_round((d0 * k0) * scales[0], wide) * q0, wide)
                w1 = _round(_round((d1 * k1) * scales[1], wide) * q1, wide)
            else:
                k0 = np.float32(1.0) if _magnitude(d0, wide) >= t0 else np.float32(0.0)
                k1 = np.float32(1.0) if _magnitude(d1, wide) >= t1 else np.float32(0.0)
                w0 = _round((d0 * k0) * q0, wide)
                w1 = _round((d1 * k1) * q1, wide)
            total = w0 + w1  # its sign is the rounded sum's sign
            negative = total < 0  # the vote: the sign of the sum, +1 for a zero sum
            agree0 = (w0 != 0) & ((w0 < 0) == negative)
            agree1 = (w1 != 0) & ((w1 < 0) == negative)
            # eager: mixed = w0*a0 + w1*a1 with a = clamp(sign(w) * vote, min=0): 1 where the model
            # agrees, else +0, or -0 for a zero w under a negative vote. A non-agreeing product w*a
            # is thus -0 for w < 0, or for a zero w whose sign bit differs from the vote's sign.
            zero0_negative = (w0 < 0) | ((w0 == 0) & ((_f32_to_bits(w0) >> np.uint32(31)) != np.uint32(negative)))
            zero1_negative = (w1 < 0) | ((w1 == 0) & ((_f32_to_bits(w1) >> np.uint32(31)) != np.uint32(negative)))
            zero = np.float32(-0.0) if zero0_negative & zero1_negative else np.float32(0.0)
            mixed = (_round(total, wide) if agree1 else w0) if agree0 else (w1 if agree1 else zero)
            if normalize:
                divisor = (q01 if agree1 else q0) if agree0 else (q1 if agree1 else np.float32(1.0))
                mixed = _round(mixed / divisor, wide)
            mixed = mixed * (total - total + np.float32(1.0))  # non-finite W: non-finite result, as eager
            _store(out, i, _round(b + mixed, wide), wide)

    @njit(inline="always")
    def _ties2_variant(base, s0, s1, are_deltas, q0, q1, q01, t0, t1, normalize, out, start, stop, wide, random, keys, probs, scales):
        """`_ties2_span` with the dtype and delta flags as constants (`random` is one already)."""
        if wide and are_deltas:
            _ties2_span(base, s0, s1, True, q0, q1, q01, t0, t1, normalize, out, start, stop, True, random, keys, probs, scales)
        elif wide:
            _ties2_span(base, s0, s1, False, q0, q1, q01, t0, t1, normalize, out, start, stop, True, random, keys, probs, scales)
        elif are_deltas:
            _ties2_span(base, s0, s1, True, q0, q1, q01, t0, t1, normalize, out, start, stop, False, random, keys, probs, scales)
        else:
            _ties2_span(base, s0, s1, False, q0, q1, q01, t0, t1, normalize, out, start, stop, False, random, keys, probs, scales)

    @njit(parallel=True, cache=True, error_model="numpy")
    def _ties2_kernel(base, s0, s1, are_deltas, q0, q1, q01, thresholds, cutoffs, normalize, out, random, keys, probs, scales):
        """Two-model TIES in one pass. Entries equal to model m's threshold are kept up to flat
        index cutoffs[m]: each block splits at the cutoffs into spans of fixed thresholds.
        `random`: DARE masks from the stream instead (one span per block)."""
        n = base.shape[0]
        wide = base.itemsize == 4
        blocks = (n + BLOCK - 1) // BLOCK
        for blk in prange(blocks):
            start = blk * BLOCK
            stop = min(n, start + BLOCK)
            if random:
                t0 = np.int32(0)
                _ties2_variant(base, s0, s1, are_deltas, q0, q1, q01, t0, t0, normalize, out, start, stop, wide, True, keys, probs, scales)
                continue
            first = min(max(cutoffs[0] + 1, start), stop)
            second = min(max(cutoffs[1] + 1, start), stop)
            for e in range(3):
                lo = start if e == 0 else (min(first, second) if e == 1 else max(first, second))
                hi = min(first, second) if e == 0 else (max(first, second) if e == 1 else stop)
                if lo >= hi:
                    continue
                t0 = np.int32(thresholds[0] + (0 if lo <= cutoffs[0] else 1))
                t1 = np.int32(thresholds[1] + (0 if lo <= cutoffs[1] else 1))
                _ties2_variant(base, s0, s1, are_deltas, q0, q1, q01, t0, t1, normalize, out, lo, hi, wide, False, keys, probs, scales)


if numba is not None:

    @njit(parallel=True, cache=True)
    def _row_ranks16(keys, ranks):
        """Per row, each entry's position in a stable ascending sort of the 15-bit keys: a
        two-pass radix sort (low 8 bits, then high 7), linear in the row length."""
        rows, c = keys.shape
        for r in prange(rows):
            row = keys[r]
            count = np.zeros(257, np.int64)
            for j in range(c):
                count[(row[j] & 0xFF) + 1] += 1
            for b in range(256):
                count[b + 1] += count[b]
            by_low = np.empty(c, np.int64)
            for j in range(c):
                b = row[j] & 0xFF
                by_low[count[b]] = j
                count[b] += 1
            high = np.zeros(129, np.int64)
            for j in range(c):
                high[((row[j] >> 8) & 0x7F) + 1] += 1
            for b in range(128):
                high[b + 1] += high[b]
            for p in range(c):
                j = by_low[p]
                b = (row[j] >> 8) & 0x7F
                ranks[r, j] = high[b]
                high[b] += 1


def row_ranks(magnitude_bits: torch.Tensor) -> Optional[torch.Tensor]:
    """Ranks (0..C-1) of every entry within its row of a 2-D tensor of 16-bit magnitude bits
    (sign cleared), equal magnitudes by position, as a stable argsort gives them; None where the
    kernels are off or the bits are not 16-bit (the caller sorts with torch then)."""
    if not available() or magnitude_bits.element_size() != 2 or magnitude_bits.device.type != "cpu":
        return None
    _set_threads()
    keys = magnitude_bits.contiguous().numpy().view(np.uint16)
    ranks = np.empty(keys.shape, np.int32)
    _row_ranks16(keys, ranks)
    return torch.from_numpy(ranks)


def _raw(t: torch.Tensor) -> np.ndarray:
    """The tensor's bits as an unsigned numpy array (numpy has no bfloat16), sharing memory."""
    return t.reshape(-1).view(_NUMPY_BITS[t.dtype]).numpy().view(np.uint16 if t.element_size() == 2 else np.uint32)


def _set_threads() -> None:
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


def _tie_blocks(n: int) -> int:
    """How many blocks the tie counts of an n-entry tensor are kept for (a cutoff is then found
    by scanning one block)."""
    return max(1, min(256, n // 65536))


def tie_cutoffs(base: torch.Tensor, sources: Sequence[torch.Tensor], are_deltas: bool, thresholds: Sequence[int], quotas: Sequence[int]) -> list[int]:
    """Per task vector, the flat index of the last entry equal to its threshold that the exact
    top-k keeps (the first `quota` such entries in flat order, as a stable sort keeps them); -1
    where the quota is 0. The entries equal to each threshold are counted in one pass."""
    _set_threads()
    wide = base.element_size() == 4
    raw_base = _raw(base)
    raw_sources = tuple(_raw(s) for s in sources)
    blocks = _tie_blocks(base.numel())
    wanted = [t if q > 0 else -1 for t, q in zip(thresholds, quotas)]
    counts = _tie_counts(raw_base, raw_sources, are_deltas, np.asarray(wanted, dtype=np.int64), blocks, wide)
    return [_locate_cutoff(raw_base, raw, are_deltas, t, q, c, wide) for raw, t, q, c in zip(raw_sources, wanted, quotas, counts)]


def _locate_cutoff(raw_base: np.ndarray, raw_source: np.ndarray, are_deltas: bool, threshold: int, quota: int, block_ties: np.ndarray, wide: bool) -> int:
    """`tie_cutoffs` for one task vector, from how many entries equal its threshold per block."""
    if threshold < 0:
        return -1
    n = raw_base.shape[0]
    size = (n + len(block_ties) - 1) // len(block_ties)
    remaining = quota
    for blk, c in enumerate(block_ties.tolist()):
        if remaining <= c:
            start, stop = blk * size, min(n, (blk + 1) * size)
            return int(_tie_scan(raw_base, raw_source, are_deltas, threshold, start, stop, remaining, wide))
        remaining -= c
    return n - 1


def magnitude_histograms(base: torch.Tensor, sources: Sequence[torch.Tensor], are_deltas: bool, buckets: Sequence[int]) -> torch.Tensor:
    """[len(sources), bins] int64 histograms of the task vectors' magnitude bits, as the eager
    `bincount` of `_magnitude_bits` gives them (see `_magnitude_histograms`)."""
    _set_threads()
    wide = base.element_size() == 4
    blocks = max(1, min(2 * numba.get_num_threads(), base.numel() // BLOCK))  # one histogram per block
    counts = _magnitude_histograms(
        _raw(base), tuple(_raw(s) for s in sources), are_deltas, np.asarray(buckets, dtype=np.int64),
        1 << 16 if wide else 1 << 15, blocks, wide,
    )
    return torch.from_numpy(counts)


def sample_histograms(base: torch.Tensor, sources: Sequence[torch.Tensor], are_deltas: bool) -> np.ndarray:
    """[len(sources), 2^15] histograms of the 16-bit task vectors' magnitude bits over the
    sample: one run of SAMPLE_RUN entries per SAMPLE_WINDOW (`_sample_start`)."""
    _set_threads()
    counts = _sample_histograms(_raw(base), tuple(_raw(s) for s in sources), are_deltas, numba.get_num_threads())
    return counts.sum(axis=0)


# A one-shot top-k (streaming merges: nothing is reused) needs no full histogram. A sample
# histogram (a 16th of the entries, `sample_histograms`) brackets the threshold in a band of
# magnitudes; one vectorised pass counts, per block, the entries at or above each candidate: every
# magnitude of the band seen in the sample, and the next one up. That gives the exact threshold,
# the quota of entries equal to it and the tie cutoff, unless the threshold is a magnitude the
# sample never saw or lies outside the band: the caller then falls back to full histograms.
BAND_MIN_NUMEL = 1 << 20  # below this, full histograms cost next to nothing
BAND_Z = 5.0  # band half-width in binomial standard deviations of the sample count; with runs
# of 64, SmolLM2-135M's weights behaved binomially (0.4 % of bands missed at 3 deviations, 3.7 %
# at 2), longer runs are correlated and worth fewer entries than they hold
BAND_SLACK = 0.001  # and a share of the sample on top
MAX_CANDIDATES = 32  # compare-counts per entry: more cost more than a full histogram


def _band_candidates(hist: np.ndarray, k: int, n: int) -> list[int]:
    """The magnitudes to count for the k largest of n entries, from the sample's histogram:
    [] where the band holds too many (the caller uses full histograms)."""
    above = np.cumsum(hist[::-1])[::-1]  # above[v] = sampled entries with magnitude >= v
    size = float(above[0])
    expected = k * size / n
    margin = BAND_Z * np.sqrt(expected * (1 - k / n)) + BAND_SLACK * size
    low = int(np.nonzero(above >= expected + margin)[0].max(initial=0))
    high = int(np.nonzero(above >= max(expected - margin, 1))[0].max(initial=0))
    seen = np.nonzero(hist[low : high + 1])[0] + low
    candidates = {low, low + 1, high + 1} | set(seen.tolist()) | set((seen + 1).tolist())
    candidates = sorted(v for v in candidates if v < len(hist))  # 15 bits: nothing lies above
    return candidates if len(candidates) <= MAX_CANDIDATES else []


def top_k_bands(base: torch.Tensor, sources: Sequence[torch.Tensor], are_deltas: bool, ks: Sequence[int]) -> list[Optional[tuple[int, int, int]]]:
    """Per task vector of a 16-bit tensor, (threshold bits, quota, tie cutoff) of its ks[i]
    largest magnitudes, exactly as `_top_k_threshold` + `tie_cutoffs` give them, or None where
    the band missed. Two passes: the sample, then the candidates' counts."""
    _set_threads()
    n = base.numel()
    raw_base = _raw(base)
    raw_sources = tuple(_raw(s) for s in sources)
    candidates = [_band_candidates(hist, k, n) for k, hist in zip(ks, sample_histograms(base, sources, are_deltas))]
    table = np.zeros((len(sources), max(1, max(map(len, candidates)))), dtype=np.int64)
    for row, values in zip(table, candidates):
        row[: len(values)] = values
    used = np.asarray([len(values) for values in candidates], dtype=np.int64)
    counts = _band_counts(raw_base, raw_sources, are_deltas, table, used, _tie_blocks(n))
    found = []
    for i, (k, values) in enumerate(zip(ks, candidates)):
        totals = counts[i].sum(axis=0)[: len(values)]  # totals[j] = entries >= values[j]
        reached = np.nonzero(totals >= k)[0]
        j = int(reached.max()) if len(reached) else -1
        if j < 0 or j + 1 >= len(values) or values[j + 1] != values[j] + 1:
            found.append(None)  # outside the band, or between two magnitudes the sample saw
            continue
        quota = k - int(totals[j + 1])
        ties = counts[i, :, j] - counts[i, :, j + 1]
        cutoff = _locate_cutoff(raw_base, raw_sources[i], are_deltas, values[j] if quota > 0 else -1, quota, ties, False)
        found.append((values[j], quota, cutoff))
    return found


def random_l1(base: torch.Tensor, sources: Sequence[torch.Tensor], are_deltas: bool, m: int, key: int, p: float) -> tuple[float, float]:
    """(||delta_m||_1, ||delta_m * keep||_1) in float64 for DARE's rescale, keep from the mask
    stream with `key` and keep probability `p` (already float32-exact)."""
    _set_threads()
    before, after = _random_l1(_raw(base), _raw(sources[m]), are_deltas, np.uint64(key), np.float32(p), base.element_size() == 4)
    return float(before), float(after)


def merge(
    base: torch.Tensor,
    sources: Sequence[torch.Tensor],
    are_deltas: bool,
    weights: Sequence[float],
    thresholds: Sequence[int],
    cutoffs: Sequence[int],
    consensus: bool,
    two_model_vote: bool,
    scalar_divisor: float,
    normalize: bool,
    out: Optional[torch.Tensor] = None,
    random: Optional[tuple[Sequence[int], Sequence[float], Sequence[float]]] = None,
) -> torch.Tensor:
    """base + combined (sparsified, weighted) task vectors in one pass. `sources` are task vectors
    (`are_deltas`) or fine-tuned tensors (their deltas are formed on the fly); `weights` are
    already quantised to the tensor's dtype; thresholds -1 keep everything. `random`: DARE's
    (mask keys, float32 keep probabilities, rescale factors) per model, instead of thresholds
    (probability 2 keeps everything, factor 1 leaves values alone)."""
    _set_threads()
    if out is None:
        out = torch.empty_like(base)
    n = len(sources)
    keys, probs, scales = random if random is not None else ([0] * n, [2.0] * n, [1.0] * n)
    keys = np.asarray(keys, dtype=np.uint64)
    probs = np.asarray(probs, dtype=np.float32)
    scales = np.asarray(scales, dtype=np.float32)
    if two_model_vote:
        q01 = float(torch.tensor(weights[0] + weights[1], dtype=torch.float32).to(base.dtype))
        _ties2_kernel(
            _raw(base),
            _raw(sources[0]),
            _raw(sources[1]),
            are_deltas,
            np.float32(weights[0]),
            np.float32(weights[1]),
            np.float32(q01),
            np.asarray(thresholds, dtype=np.int64),
            np.asarray(cutoffs, dtype=np.int64),
            normalize,
            _raw(out),
            random is not None,
            keys,
            probs,
            scales,
        )
        return out
    _merge_kernel(
        _raw(base),
        tuple(_raw(s) for s in sources),
        are_deltas,
        np.asarray(weights, dtype=np.float32),
        np.asarray(thresholds, dtype=np.int64),
        np.asarray(cutoffs, dtype=np.int64),
        1 if consensus else 0,
        np.float32(scalar_divisor),
        normalize,
        _raw(out),
        random is not None,
        keys,
        probs,
        scales,
    )
    return out


# --- compiling the kernels ahead of use ---------------------------------------------------------
# numba compiles a kernel once per signature (tensor width, number of models) and keeps the
# machine code in its on-disk cache (`cache=True`): one index file per kernel listing every saved
# signature. A save reads that index, adds its entry and writes it back, so two processes saving
# signatures of the same kernel at once could lose an entry or point it at the other's code (two
# fresh search workers, or a merge started while `make setup` compiles). `_guard_cache` makes each
# save hold a lock file beside the index; compiling itself stays parallel. A compile that takes
# more than a few seconds says so in one log line (most take 2-25 s; two-model TIES ~70 s).

_KERNELS = (
    "_tie_counts", "_magnitude_histograms", "_sample_histograms", "_count_at_least", "_band_counts",
    "_tie_scan", "_random_l1", "_merge_kernel", "_ties2_kernel", "_row_ranks16",
)
_COMPILE_NOTE_AFTER_S = 3.0
_note_compiles = True  # warm_up reports its own progress


def _guard_cache() -> None:
    import fcntl
    import logging
    import threading

    log = logging.getLogger(__name__)
    for name in _KERNELS:
        kernel = globals()[name]
        cache = getattr(kernel, "_cache", None)
        save = getattr(cache, "save_overload", None)
        compile_ = getattr(kernel, "compile", None)
        if save is None or compile_ is None or getattr(kernel, "_evomerge_guarded", False):
            continue
        lock_path = os.path.join(cache.cache_path, f"{name}.lock")

        def locked_save(sig, data, _save=save, _lock=lock_path):
            os.makedirs(os.path.dirname(_lock), exist_ok=True)
            with open(_lock, "a") as f:
                fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
                _save(sig, data)

        def noted_compile(sig, _compile=compile_, _name=name):
            if not _note_compiles:
                return _compile(sig)
            note = threading.Timer(_COMPILE_NOTE_AFTER_S, log.warning, (
                "compiling numba kernel %s%s (once: later runs load it from the cache; "
                "`python -m merge_engine.methods.fused` compiles them all ahead)", _name, _describe(sig)))
            note.daemon = True
            note.start()
            try:
                return _compile(sig)
            finally:
                note.cancel()

        cache.save_overload = locked_save
        kernel.compile = noted_compile
        kernel._evomerge_guarded = True


def _describe(sig) -> str:
    """' for bfloat16, 2 models' from a kernel signature (best effort: '' when unsure)."""
    try:
        first = str(sig[0])
        width = "bfloat16" if "uint16" in first else "float32" if "uint32" in first else ""
        tuples = [str(a) for a in sig if str(a).startswith("UniTuple(")]
        count = tuples[0].rsplit(" x ", 1)[-1].rstrip(")") if tuples else ""
        models = f", {count} model{'' if count == '1' else 's'}" if count else ""
        return f" for {width}{models}" if width else ""
    except Exception:  # noqa: BLE001 - only a log line
        return ""


if numba is not None:
    _guard_cache()


# One job per kernel signature a merge of up to 3 models uses: (name, dtype, models). `_common`
# is what `make setup` compiles before it returns: the bfloat16 kernels for one or two fine-tunes
# (checkpoints are merged in bfloat16, most merges combine one or two). `_demo` is the float32
# two-model sum of the quickstart, which `make demo` compiles before it starts. The rest (three
# models, float32; the tests use them all) `make test` compiles, or a first use (with a log
# line). Why this split: docs/setup.md.
def _jobs(max_sources: int = 3) -> list[tuple[str, str, int]]:
    jobs = []
    for dtype in ("bfloat16", "float32"):
        jobs += [("merge", dtype, n) for n in range(1, max_sources + 1)]
        jobs += [("ties2", dtype, 2), ("random_l1", dtype, 1)]
        jobs += [("histograms", dtype, n) for n in range(1, max_sources + 1)]
        jobs += [("cutoffs", dtype, n) for n in range(1, max_sources + 1)]
        if dtype == "bfloat16":
            jobs += [("bands", dtype, n) for n in range(1, max_sources + 1)]
    return jobs + [("row_ranks", "bfloat16", 1)]


def _common(job: tuple[str, str, int]) -> bool:
    return job[1] == "bfloat16" and job[2] <= 2


def _demo(job: tuple[str, str, int]) -> bool:
    return job == ("merge", "float32", 2)


# CPU seconds of one compile, measured on the 2-core dev machine (numba 0.68): the order in which
# parallel workers take jobs, longest first
_COST = {"ties2": 70.0, "merge": 21.0, "histograms": 3.3, "bands": 4.5, "cutoffs": 2.5, "random_l1": 2.4, "row_ranks": 1.5}


def _run_job(job: tuple[str, str, int]) -> tuple[tuple[str, str, int], float]:
    """Compile (or load from the cache) the kernel signature of one job by running it on a
    small input; returns the job and its seconds."""
    import time

    t0 = time.perf_counter()
    kind, dtype_name, n = job
    dtype = getattr(torch, dtype_name)
    base = torch.zeros(MIN_FUSED_NUMEL, dtype=dtype)
    sources = [torch.full_like(base, 0.01 * (i + 1)) for i in range(n)]
    if kind == "merge":
        for random in (None, ([1] * n, [0.5] * n, [1.0] * n)):
            merge(base, sources, True, [0.5] * n, [-1] * n, [-1] * n, True, False, 1.0, True, random=random)
    elif kind == "ties2":
        for random in (None, ([1, 2], [0.5, 0.5], [1.0, 1.0])):
            merge(base, sources, True, [0.5, 0.5], [-1, -1], [-1, -1], True, True, 1.0, True, random=random)
    elif kind == "random_l1":
        random_l1(base, sources, True, 0, 1, 0.5)
    elif kind == "histograms":
        magnitude_histograms(base, sources, True, [-1] * n)
    elif kind == "cutoffs":  # thresholds every entry equals: the tie scan runs too
        tie_cutoffs(base, sources, True, [int(s[0].view(_NUMPY_BITS[dtype])) for s in sources], [1] * n)
    elif kind == "bands":
        top_k_bands(base, sources, True, [1] * n)
    elif kind == "row_ranks":
        row_ranks(torch.zeros(2, MIN_FUSED_NUMEL, dtype=torch.int16))
    return job, time.perf_counter() - t0


def _worker_init() -> None:
    global _note_compiles
    _note_compiles = False
    torch.set_num_threads(1)  # each worker compiles on one core; the kernels' runs are tiny


def warm_up(max_sources: int = 3, only=None, jobs: int = 1, progress=None) -> int:
    """Compile the kernel variants a merge of up to `max_sources` models uses (bfloat16 and
    float32; `only`: those jobs it accepts, e.g. `_common`) into numba's on-disk cache, so that a
    first merge and every fresh search worker load them instead of paying 2-70 s of JIT each.
    `jobs` > 1 compiles in that many processes (longest first; saves are locked per kernel, see
    `_guard_cache`), then a pass here loads every one (and compiles any that went missing).
    `make setup` runs `python -m merge_engine.methods.fused --common --jobs 2`.
    `progress(job, seconds, done, total)` is called as jobs finish. Returns the number of jobs."""
    global _note_compiles
    if not available():
        return 0
    todo = [j for j in _jobs(max_sources) if only is None or only(j)]
    todo.sort(key=lambda j: -_COST[j[0]])
    _note_compiles, noted = False, _note_compiles
    try:
        _compile_jobs(todo, jobs, progress)
    finally:
        _note_compiles = noted
    return len(todo)


def _compile_jobs(todo, jobs, progress) -> None:
    if jobs > 1:
        import concurrent.futures
        import multiprocessing

        # spawn: a fork would inherit this process's threads and torch state
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init) as pool:
            for done, future in enumerate(concurrent.futures.as_completed([pool.submit(_run_job, j) for j in todo]), 1):
                job, seconds = future.result()
                if progress is not None:
                    progress(job, seconds, done, len(todo))
        for job in todo:  # all from the cache now: milliseconds each
            _run_job(job)
    else:
        for done, job in enumerate(todo, 1):
            job, seconds = _run_job(job)
            if progress is not None:
                progress(job, seconds, done, len(todo))


def _main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse
    import logging
    import time

    parser = argparse.ArgumentParser(prog="python -m merge_engine.methods.fused", description=(
        "Compile the numba merge kernels into numba's on-disk cache (a no-op for those already there)."))
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--common", action="store_true", help="only the bfloat16 kernels for one or two models (what `make setup` compiles)")
    which.add_argument("--demo", action="store_true", help="only the float32 kernel of the quickstart demo (what `make demo` compiles)")
    parser.add_argument("--jobs", "-j", type=int, default=1, help="compile in this many processes (default 1)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log = logging.getLogger("merge_engine.methods.fused")
    t0 = time.perf_counter()

    def progress(job, seconds, done, total):
        if seconds >= 1.0:  # a compile, not a cache load
            log.info("  [%d/%d] %s %s, %d model%s: %.0f s", done, total, job[0], job[1], job[2], "" if job[2] == 1 else "s", seconds)

    only = _common if args.common else _demo if args.demo else None
    count = warm_up(only=only, jobs=max(1, args.jobs), progress=progress)
    log.info("numba kernels: %d variants compiled or loaded from the cache in %.1f s", count, time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    # run the imported module's copy, so that worker processes find its functions by name
    from merge_engine.methods import fused as _module

    raise SystemExit(_module._main())
