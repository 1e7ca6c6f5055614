"""The one-pass CPU kernels (merge_engine/methods/fused.py) against the eager torch path and the
independent reference of test_methods: bit for bit, signed zeros included, on tensors large
enough to take the kernels (several kernel blocks, ties at the top-k threshold, zero deltas)."""

from __future__ import annotations

import pytest
import torch

from test_methods import call, ref_gta

from merge_engine.methods import fused
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
        return ta.merge_task_vectors(base, deltas, [0.45, 0.8], [0.35, 0.7], params, ta.VARIANTS["ties"], TensorContext("t"), cache)

    eager, result, used = run_both(monkeypatch, resident)
    assert used
    assert torch.equal(bits(result), bits(eager))
    streaming = call("ties", [base] + xs, 0, {"normalize": True}, [{}, {"weight": 0.45, "density": 0.35}, {"weight": 0.8, "density": 0.7}])
    assert torch.equal(bits(streaming), bits(result))
    assert any(key[0] == "cutoff" for key in cache)
    assert torch.equal(bits(resident()), bits(result))


def test_tie_cutoff_is_the_quota_th_equal_entry():
    base = torch.zeros(40000, dtype=torch.bfloat16)
    delta = torch.full((40000,), 0.25, dtype=torch.bfloat16)
    delta[::3] = -0.25  # same magnitude, other sign
    threshold = int(delta[:1].abs().view(torch.int16))
    assert fused.tie_cutoff(base, [delta], True, 0, threshold, 1) == 0
    assert fused.tie_cutoff(base, [delta], True, 0, threshold, 12345) == 12344
    assert fused.tie_cutoff(base, [delta], True, 0, threshold, 40000) == 39999
    assert fused.tie_cutoff(base, [delta], True, 0, threshold, 0) == -1


def test_writes_into_the_given_output_buffer():
    base, xs = make_inputs(torch.bfloat16, 2, seed=9)
    out = torch.empty_like(base)
    ctx = TensorContext("t", out=out)
    result = ta.merge_task_vectors(base, [x - base for x in xs], [0.5, 0.5], [1.0, 1.0], {"normalize": True, "lambda": 1.0, "rescale": False}, ta.VARIANTS["task_arithmetic"], ctx, {})
    assert result.data_ptr() == out.data_ptr()
    assert torch.equal(out, ref_gta(base, xs, [0.5, 0.5], normalize=True))


@pytest.mark.parametrize(
    "method,params,dtype",
    [
        ("dare_ties", {"normalize": True}, torch.bfloat16),  # torch random streams
        ("ties", {"normalize": True, "lambda": 0.7}, torch.bfloat16),
        ("ties", {"normalize": True, "rescale": True}, torch.float32),
        ("ties", {"normalize": True}, torch.float16),
    ],
)
def test_unsupported_cases_keep_the_eager_path(monkeypatch, method, params, dtype):
    base, xs = make_inputs(torch.float32, 2, seed=3)
    base, xs = base.to(dtype), [x.to(dtype) for x in xs]
    model_params = [{}, {"weight": 0.5, "density": 0.5}, {"weight": 0.5, "density": 0.5}]
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
