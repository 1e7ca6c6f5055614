"""The one-pass CPU kernels (merge_engine/methods/fused.py) against the eager torch path and the
independent reference of test_methods: bit for bit, signed zeros included, on tensors large
enough to take the kernels (several kernel blocks, ties at the top-k threshold, zero deltas)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from test_methods import call, ref_gta

from merge_engine.methods import METHODS, fused
from merge_engine.methods import task_arithmetic as ta
from merge_engine.methods.common import TensorContext

pytestmark = pytest.mark.skipif(not fused.available(), reason="numba not importable")

ROWS, COLS = 190, 173  # 32870 entries: above MIN_FUSED_NUMEL, not a multiple of the block size
BITS = {torch.bfloat16: torch.int16, torch.float32: torch.int32}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(BITS[t.dtype])


def make_inputs(dtype, count, seed=0):
    """A base with +0 and -0 entries and fine-tunes with exact zero deltas, sign flips and many
    equal magnitudes (values drawn from a coarse grid), so every select of the kernel is hit."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(ROWS, COLS, generator=g) * 0.02).to(dtype)
    flat = base.view(-1)
    flat[::89] = -0.0
    flat[1::89] = 0.0
    xs = []
    for m in range(count):
        steps = torch.randint(-40, 41, (ROWS, COLS), generator=g).to(torch.float32) / 4096
        x = (base.float() + steps).to(dtype)
        x.view(-1)[m::7] = base.view(-1)[m::7]  # zero task-vector entries
        xs.append(x)
    return base, xs


def run_both(monkeypatch, fn):
    """(eager result, fused result, whether the kernel ran) for the same call."""
    calls = []
    real = fused.merge

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(fused, "merge", counting)
    monkeypatch.setenv("EVOMERGE_EAGER", "1")
    eager = fn()
    assert not calls
    monkeypatch.setenv("EVOMERGE_EAGER", "")
    result = fn()
    return eager, result, bool(calls)


CASES = [
    # method, weights, densities, normalize
    ("ties", [0.5, 0.7], [0.3, 0.6], True),
    ("ties", [1.0, -0.6], [0.5, 0.5], True),
    ("ties", [0.5, -0.5], [0.5, 1.0], True),  # weights summing to zero: the general vote
    ("ties", [0.0, 0.6], [0.5, 0.9], False),
    ("ties", [0.6, 0.6], [1.0, 1.0], True),
    ("task_arithmetic", [0.4, 0.9], [1.0, 1.0], True),
    ("task_arithmetic", [0.5, -0.5], [1.0, 1.0], True),
    ("ties", [0.5, 0.7, 0.3], [0.3, 0.6, 1.0], True),
    ("ties", [1.0, -0.6, 0.2], [0.5, 0.5, 0.2], False),
    ("task_arithmetic", [0.4, 0.9, -0.3], [1.0, 1.0, 1.0], False),
]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("method,weights,densities,normalize", CASES)
def test_kernel_equals_eager_and_reference_bit_for_bit(monkeypatch, dtype, method, weights, densities, normalize):
    base, xs = make_inputs(dtype, len(weights), seed=len(weights))
    tensors = [xs[0], base] + xs[1:]
    model_params = [{"weight": weights[0], "density": densities[0]}, {}] + [
        {"weight": w, "density": d} for w, d in zip(weights[1:], densities[1:])
    ]
    params = {"normalize": normalize}

    eager, result, used = run_both(monkeypatch, lambda: call(method, tensors, 1, params, model_params))
    assert used, "the kernel was not used for a supported case"
    assert torch.equal(bits(result), bits(eager)), f"{int((bits(result) != bits(eager)).sum())} entries differ"
    sparsify = "magnitude" if method == "ties" else None
    reference = ref_gta(base, xs, weights, densities=densities, sparsify=sparsify, consensus=method == "ties", normalize=normalize)
    assert torch.equal(result, reference)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cached_task_vectors_take_the_kernel_with_the_same_result(monkeypatch, dtype):
    """The resident executor's entry (precomputed deltas, histogram cache) equals the streaming
    one (deltas formed on the fly), and a second call reuses the cached tie cut-off."""
    base, xs = make_inputs(dtype, 2, seed=5)
    deltas = [x - base for x in xs]
    params = {"normalize": True, "lambda": 1.0, "rescale": False}
    cache: dict = {}

    def resident():
        return ta.merge_task_vectors(base, deltas, [0.45, 0.8], [0.35, 0.7], params, METHODS["ties"].task_vector, TensorContext("t"), cache)

    eager, result, used = run_both(monkeypatch, resident)
    assert used
    assert torch.equal(bits(result), bits(eager))
    streaming = call("ties", [base] + xs, 0, {"normalize": True}, [{}, {"weight": 0.45, "density": 0.35}, {"weight": 0.8, "density": 0.7}])
    assert torch.equal(bits(streaming), bits(result))
    assert any(key[0] == "cutoff" for key in cache)
    assert torch.equal(bits(resident()), bits(result))


def test_tie_cutoffs_are_the_quota_th_equal_entries():
    base = torch.zeros(140000, dtype=torch.bfloat16)  # several counting blocks
    first = torch.full((140000,), 0.25, dtype=torch.bfloat16)
    first[::3] = -0.25  # same magnitude, other sign
    second = torch.full((140000,), 0.5, dtype=torch.bfloat16)
    second[::2] = 0.125  # equal to its threshold only at odd indices
    t1 = int(first[:1].abs().view(torch.int16))
    t2 = int(second[1:2].abs().view(torch.int16))
    for q1, q2 in [(1, 1), (12345, 5), (140000, 70000), (0, 70001), (99999, 0)]:
        want1 = -1 if q1 == 0 else q1 - 1
        want2 = -1 if q2 == 0 else min(2 * q2 - 1, 139999)  # the q-th odd index; past the last: the end
        assert fused.tie_cutoffs(base, [first, second], True, [t1, t2], [q1, q2]) == [want1, want2], (q1, q2)
    # fine-tuned tensors instead of task vectors: the same deltas formed on the fly
    assert fused.tie_cutoffs(base, [first, second], False, [t1, t2], [7, 7]) == [6, 13]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("are_deltas", [True, False])
def test_magnitude_histograms_equal_bincount(dtype, are_deltas):
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(300_000, generator=gen).to(dtype)
    xs = [(base.float() + 0.01 * torch.randn(300_000, generator=gen)).to(dtype) for _ in range(3)]
    deltas = [(x - base) for x in xs]  # in the dtype, rounded as the kernel rounds
    sources = deltas if are_deltas else xs
    wide = dtype == torch.float32
    bits = [d.abs().view(torch.int32 if wide else torch.int16).to(torch.int64) for d in deltas]
    got = fused.magnitude_histograms(base, sources, are_deltas, [-1, -1, -1])
    for k in range(3):
        want = torch.bincount(bits[k] >> 16 if wide else bits[k], minlength=got.shape[1])
        assert torch.equal(got[k], want), k
    if wide:  # the low level: low 16 bits of the entries in one high-bits bucket
        bucket = int(torch.mode(bits[1] >> 16).values)
        got = fused.magnitude_histograms(base, sources[1:2], are_deltas, [bucket])
        want = torch.bincount(bits[1][(bits[1] >> 16) == bucket] & 0xFFFF, minlength=1 << 16)
        assert torch.equal(got[0], want) and int(want.sum()) > 1000


def band_inputs(count, seed, rows=640, cols=1700):
    """bf16 tensors above BAND_MIN_NUMEL (1.09M entries) shaped like fine-tunes: small changes
    scaled per row, so deltas are multiples of the base's bf16 spacing (many equal magnitudes),
    some exactly zero, and neighbouring entries alike."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(rows, cols, generator=g) * 0.02).to(torch.bfloat16)
    scale = torch.rand(rows, 1, generator=g) * 0.5 + 0.75
    xs = []
    for m in range(count):
        x = (base.float() + torch.randn(rows, cols, generator=g) * 0.002 * scale).to(torch.bfloat16)
        x.view(-1)[m::7] = base.view(-1)[m::7]
        xs.append(x)
    return base, xs


@pytest.mark.parametrize("are_deltas", [True, False])
def test_top_k_bands_equal_full_histograms(are_deltas):
    """The sampled band gives exactly the threshold, quota and tie cutoff of the full-histogram
    search, over densities from 0.01 to 0.99."""
    base, xs = band_inputs(3, seed=11)
    assert base.numel() >= fused.BAND_MIN_NUMEL
    sources = [x - base for x in xs] if are_deltas else xs
    vectors = ta._TaskVectors(base, deltas=[x - base for x in xs])
    n = base.numel()
    for densities in ([0.01, 0.5, 0.95], [0.3, 0.6, 0.05]):
        ks = [int(d * n) for d in densities]
        got = fused.top_k_bands(base.view(-1), [s.view(-1) for s in sources], are_deltas, ks)
        want = [ta._top_k_threshold(vectors, i, k, {}) for i, k in enumerate(ks)]
        cutoffs = fused.tie_cutoffs(base.view(-1), [s.view(-1) for s in sources], are_deltas, [w[0] for w in want], [w[1] for w in want])
        assert got == [(t, q, c) for (t, q), c in zip(want, cutoffs)], densities


def sample_positions(n):
    """The sampled entries, as `_sample_start` documents them: per window of SAMPLE_WINDOW
    entries, SAMPLE_RUN entries from offset (w * 2654435761 mod 2^32) mod (slots + 1)."""
    picked = torch.zeros(n, dtype=torch.bool)
    for w, start in enumerate(range(0, n, fused.SAMPLE_WINDOW)):
        slots = min(fused.SAMPLE_WINDOW, n - start) - fused.SAMPLE_RUN
        offset = (w * 2654435761 % 2**32) % (slots + 1) if slots > 0 else 0
        picked[start + offset : start + offset + fused.SAMPLE_RUN] = True
    return picked


def test_sample_histograms_count_the_documented_runs():
    base, xs = band_inputs(2, seed=3, rows=101, cols=2001)  # the last window is partial
    got = fused.sample_histograms(base.view(-1), [x.view(-1) for x in xs], False)
    picked = sample_positions(base.numel())
    assert int(picked.sum()) == int(got[0].sum()) > base.numel() // 17
    for k, x in enumerate(xs):
        magnitudes = (x - base).abs().view(torch.int16).view(-1)[picked].to(torch.int64)
        assert np.array_equal(got[k], torch.bincount(magnitudes, minlength=1 << 15).numpy()), k



def test_band_candidates_stay_within_15_bits():
    """A sample whose largest magnitudes sit on the top 15-bit value (0x7FFF, a NaN) proposes no
    candidate above it: an int16 comparison with 2^15 would wrap around and count everything."""
    hist = np.zeros(1 << 15, dtype=np.int64)
    hist[15000], hist[0x7FFF] = 60_000, 5_000
    candidates = fused._band_candidates(hist, 5_000 * 16, 65_000 * 16)
    assert candidates and max(candidates) == 0x7FFF and 15000 in candidates


@pytest.mark.parametrize("count", [2, 3])  # the two-model kernel and the general one
def test_streaming_ties_takes_the_band_and_equals_eager(monkeypatch, count):
    base, xs = band_inputs(count, seed=7)
    found = []
    real = fused.top_k_bands
    monkeypatch.setattr(fused, "top_k_bands", lambda *a: found.append(real(*a)) or found[-1])
    model_params = [{}] + [{"weight": w, "density": d} for w, d in zip([0.45, 0.8, -0.3], [0.35, 0.6, 0.2])][:count]
    eager, result, used = run_both(monkeypatch, lambda: call("ties", [base] + xs, 0, {"normalize": True}, model_params))
    assert used and len(found) == 1 and len(found[0]) == count and None not in found[0]
    assert torch.equal(bits(result), bits(eager)), f"{int((bits(result) != bits(eager)).sum())} entries differ"


def test_a_missed_band_falls_back_to_full_histograms(monkeypatch):
    """A sample unlike the rest (the sampled runs hold the smallest deltas) misses the band:
    that task vector's threshold then comes from full histograms, with the same result."""
    base, xs = band_inputs(2, seed=9)
    sampled = sample_positions(base.numel()).view(base.shape)
    xs[0] = torch.where(sampled, base + (xs[0] - base) / 64, xs[0]).to(torch.bfloat16)
    found = []
    real = fused.top_k_bands
    monkeypatch.setattr(fused, "top_k_bands", lambda *a: found.append(real(*a)) or found[-1])
    model_params = [{}, {"weight": 0.5, "density": 0.5}, {"weight": 0.5, "density": 0.5}]
    eager, result, used = run_both(monkeypatch, lambda: call("ties", [base] + xs, 0, {"normalize": True}, model_params))
    assert used and found[0][0] is None and found[0][1] is not None
    assert torch.equal(bits(result), bits(eager))
    reference = ref_gta(base, xs, [0.5, 0.5], densities=[0.5, 0.5], sparsify="magnitude", consensus=True, normalize=True)
    assert torch.equal(result, reference)



@pytest.mark.parametrize("method,params", [("breadcrumbs_ties", {"normalize": True}), ("ties", {"normalize": True, "lambda": 0.5})])
def test_eager_path_histograms_every_task_vector_once(monkeypatch, method, params):
    """Outside the kernel (breadcrumbs: two thresholds per model; TIES with lambda), one
    histogram pass per tensor serves every task vector: each model's thresholds reuse it."""
    base, xs = band_inputs(2, seed=5, rows=200, cols=1000)
    passes = []
    real = fused.magnitude_histograms
    monkeypatch.setattr(fused, "magnitude_histograms", lambda *a: passes.append(len(a[1])) or real(*a))
    model_params = [{}] + [{"weight": 0.6, "density": 0.4, "gamma": 0.05}, {"weight": 0.5, "density": 0.7, "gamma": 0.02}]
    result = call(method, [base] + xs, 0, params, model_params)
    assert passes == [2]  # one pass, both task vectors
    monkeypatch.setenv("EVOMERGE_EAGER", "1")  # bincount histograms instead, same thresholds
    assert torch.equal(bits(call(method, [base] + xs, 0, params, model_params)), bits(result))

def test_writes_into_the_given_output_buffer():
    base, xs = make_inputs(torch.bfloat16, 2, seed=9)
    out = torch.empty_like(base)
    ctx = TensorContext("t", out=out)
    result = ta.merge_task_vectors(base, [x - base for x in xs], [0.5, 0.5], [1.0, 1.0], {"normalize": True, "lambda": 1.0, "rescale": False}, METHODS["task_arithmetic"].task_vector, ctx, {})
    assert result.data_ptr() == out.data_ptr()
    assert torch.equal(out, ref_gta(base, xs, [0.5, 0.5], normalize=True))


@pytest.mark.parametrize(
    "method,params,dtype",
    [
        ("dare_ties", {"normalize": True, "lambda": 0.7}, torch.bfloat16),
        ("della", {"normalize": True}, torch.bfloat16),
        ("ties", {"normalize": True, "lambda": 0.7}, torch.bfloat16),
        ("ties", {"normalize": True, "rescale": True}, torch.float32),
        ("ties", {"normalize": True}, torch.float16),
    ],
)
def test_unsupported_cases_keep_the_eager_path(monkeypatch, method, params, dtype):
    base, xs = make_inputs(torch.float32, 2, seed=3)
    base, xs = base.to(dtype), [x.to(dtype) for x in xs]
    model_params = [{}, {"weight": 0.5, "density": 0.5, "epsilon": 0.1}, {"weight": 0.5, "density": 0.5, "epsilon": 0.1}]
    eager, result, used = run_both(monkeypatch, lambda: call(method, [base] + xs, 0, params, model_params))
    assert not used
    assert torch.equal(result, eager)


def test_small_tensors_keep_the_eager_path():
    small = torch.zeros(100, dtype=torch.bfloat16)
    assert not fused.usable([small, small])
    big = torch.zeros(fused.MIN_FUSED_NUMEL, dtype=torch.bfloat16)
    assert fused.usable([big, big])
    assert not fused.usable([big, big.float()])
    assert not fused.usable([big, torch.zeros(2 * fused.MIN_FUSED_NUMEL, dtype=torch.bfloat16)[::2]])


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,scale", [((300, 2048), 0.02), ((7, 5), 1.0), ((40, 4096), 1e-4), ((2, 70000), 0.5), ((5, 1), 1.0)])
def test_row_ranks_kernel_equals_a_stable_argsort(dtype, shape, scale):
    """DELLA's per-row ranks from the radix kernel: exactly a stable argsort's, ties (many in 16-bit
    floats, zeros of both signs included) ranked by position."""
    from merge_engine.methods.task_arithmetic import _magnitude_bits

    x = (torch.randn(shape, generator=torch.Generator().manual_seed(shape[1])) * scale).to(dtype)
    x[0, : min(3, shape[1])] = 0
    x[-1, -1] = -0.0
    bits = _magnitude_bits(x)
    ranks = fused.row_ranks(bits)
    assert ranks is not None and ranks.dtype == torch.int32
    expected = torch.empty(shape, dtype=torch.int64)
    for r in range(shape[0]):  # independent: Python's sort is stable
        order = sorted(range(shape[1]), key=lambda j: (abs(float(x[r, j])), j))
        for rank, j in enumerate(order):
            expected[r, j] = rank
    assert torch.equal(ranks.long(), expected)
    assert fused.row_ranks(_magnitude_bits(x.float())) is None  # 32-bit: torch's sort


# ----------------------------------------------------------------------------------------------
# DARE's random masks: the documented counter-based stream, re-implemented here in numpy


def ref_mask_key(seed: int, tensor: str, position: int) -> int:
    """docs/methods.md: SHA-256 of "<seed>\\0<tensor>#<position>", first 8 bytes little-endian,
    top bit cleared."""
    digest = hashlib.sha256(f"{seed}\0{tensor}#{position}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def ref_uniforms(key: int, n: int) -> np.ndarray:
    """The (j+1)-th SplitMix64 output for j = 0..n-1, top 24 bits times 2^-24 (float32)."""
    with np.errstate(over="ignore"):
        z = np.uint64(key) + np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return ((z >> np.uint64(40)).astype(np.float32) * np.float32(2.0**-24)).astype(np.float32)


def test_reference_stream_is_splitmix64():
    # SplitMix64 seeded with 0: its first outputs are published test values of the generator
    M = (1 << 64) - 1
    state, outputs = 0, []
    for _ in range(3):
        state = (state + 0x9E3779B97F4A7C15) & M
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M
        outputs.append(z ^ (z >> 31))
    assert outputs == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    assert ref_uniforms(0, 3).tolist() == [(o >> 40) * 2.0**-24 for o in outputs]


def ref_dare_masks(base, xs, densities, seed, tensor, rescale=True):
    """Per task vector: keep-mask times the L1 rescale factor (norms and ratio in the dtype), the
    factor ref_gta multiplies each delta by."""
    dtype = base.dtype
    masks = []
    for i, (x, density) in enumerate(zip(xs, densities)):
        delta = (x - base).flatten()
        if density >= 1:
            masks.append(torch.ones(base.shape, dtype=dtype))
            continue
        u = ref_uniforms(ref_mask_key(seed, tensor, i), delta.numel())
        keep = torch.from_numpy(u < np.float32(density))
        factor = torch.ones((), dtype=dtype)
        if rescale:
            before = torch.tensor(delta.double().abs().sum().item(), dtype=dtype)
            after = torch.tensor((delta.double() * keep).abs().sum().item(), dtype=dtype)
            if before >= 1e-7 and after >= 1e-7:
                factor = before / after
        masks.append((keep.to(dtype) * factor).view(base.shape))
    return masks


DARE_CASES = [
    # method, weights, densities, normalize, rescale
    ("dare_ties", [0.5, 0.7], [0.3, 0.6], True, True),  # the two-model vote kernel
    ("dare_ties", [1.0, -0.6], [0.5, 1.0], False, True),
    ("dare_linear", [0.4, 0.9], [0.2, 0.8], False, True),
    ("dare_linear", [0.4, 0.9], [0.5, 0.5], True, False),
    ("dare_ties", [0.5, 0.7, 0.3], [0.3, 0.6, 0.9], True, True),  # the general kernel
    ("dare_linear", [0.6], [0.1], False, True),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("method,weights,densities,normalize,rescale", DARE_CASES)
def test_dare_kernel_and_eager_follow_the_documented_stream(monkeypatch, dtype, method, weights, densities, normalize, rescale):
    base, xs = make_inputs(dtype, len(weights), seed=10 + len(weights))
    tensor = "model.layers.3.mlp.down_proj.weight"
    model_params = [{}] + [{"weight": w, "density": d} for w, d in zip(weights, densities)]
    params = {"normalize": normalize, "rescale": rescale}
    eager, result, used = run_both(monkeypatch, lambda: call(method, [base] + xs, 0, params, model_params, tensor_name=tensor, seed=42))
    assert used, "the kernel was not used for DARE"
    masks = ref_dare_masks(base, xs, densities, 42, tensor, rescale)
    reference = ref_gta(base, xs, weights, consensus=method == "dare_ties", normalize=normalize, masks=masks)
    assert torch.equal(bits(result), bits(eager)), f"{int((bits(result) != bits(eager)).sum())} entries differ"
    # values (as the TIES cases above: the reference's sums do not keep the engine's -0)
    assert torch.equal(result, reference), f"{int((result != reference).sum())} entries differ"
    # the masks keep `density` of the entries (a Bernoulli count within 5 standard deviations)
    for mask, d in zip(masks, densities):
        kept, n = int((mask != 0).sum()), mask.numel()
        assert abs(kept - d * n) <= 5 * (d * (1 - d) * n) ** 0.5 + 1e-9


def test_dare_resident_cache_reuses_the_norms_with_the_same_result(monkeypatch):
    base, xs = make_inputs(torch.bfloat16, 2, seed=21)
    deltas = [x - base for x in xs]
    params = {"normalize": True, "lambda": 1.0, "rescale": True}
    cache: dict = {}
    calls = []
    real = fused.random_l1
    monkeypatch.setattr(fused, "random_l1", lambda *a: calls.append(1) or real(*a))

    def resident(weights):
        ctx = TensorContext("t", seed=3)
        return ta.merge_task_vectors(base, deltas, weights, [0.4, 0.7], params, METHODS["dare_ties"].task_vector, ctx, cache)

    first = resident([0.5, 0.6])
    assert len(calls) == 2
    second = resident([0.7, 0.2])  # other weights, same masks: the norms come from the cache
    assert len(calls) == 2
    streaming = call("dare_ties", [base] + xs, 0, {"normalize": True}, [{}, {"weight": 0.7, "density": 0.4}, {"weight": 0.2, "density": 0.7}], tensor_name="t", seed=3)
    assert torch.equal(bits(streaming), bits(second))
    assert not torch.equal(first, second)
