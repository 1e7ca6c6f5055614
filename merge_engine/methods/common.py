"""What every method function shares: the per-tensor context and input shape checks."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..errors import ModelError


def tensor_seed(run_seed: int, tensor_name: str) -> int:
    """A 63-bit seed from (run seed, output tensor name): results never depend on execution order."""
    digest = hashlib.sha256(f"{run_seed}\0{tensor_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# The random masks of DARE and DELLA (docs/methods.md, "Random masks"): entry j of a task vector is
# kept when the (j+1)-th output of SplitMix64 seeded with the mask key, cut to its top 24 bits and
# scaled by 2^-24, is below the keep probability (both float32). Counter-based: any slice of the
# stream is computed on its own, so results depend neither on chunking nor on the executor; the
# numba kernels (fused.py) compute the same stream in uint64 arithmetic.
SPLITMIX_GAMMA = 0x9E3779B97F4A7C15
SPLITMIX_M1 = 0xBF58476D1CE4E5B9
SPLITMIX_M2 = 0x94D049BB133111EB


def _signed(value: int) -> int:
    """A 64-bit constant as the int64 with the same bits (torch has no uint64 arithmetic)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def mask_key(run_seed: int, tensor_name: str, position: int) -> int:
    """The random-mask key of one task vector: (run seed, output tensor, its position among the
    merge's task vectors)."""
    return tensor_seed(run_seed, f"{tensor_name}#{position}")


def keep_probability(p: float) -> float:
    """p rounded to float32, the precision both paths compare the uniforms in."""
    return float(torch.tensor(p, dtype=torch.float32))


def mask_uniforms(key: int, start: int, end: int, device) -> torch.Tensor:
    """The stream's uniforms for flat indices [start, end) as float32 (multiples of 2^-24 in
    [0, 1)), with int64 torch ops: products wrap modulo 2^64 as uint64 ones do, and each right
    shift is masked to a logical one."""
    z = torch.arange(start + 1, end + 1, dtype=torch.int64, device=device)
    z.mul_(_signed(SPLITMIX_GAMMA)).add_(_signed(key))
    z.bitwise_xor_((z >> 30) & ((1 << 34) - 1)).mul_(_signed(SPLITMIX_M1))
    z.bitwise_xor_((z >> 27) & ((1 << 37) - 1)).mul_(_signed(SPLITMIX_M2))
    z.bitwise_xor_((z >> 31) & ((1 << 33) - 1))
    return ((z >> 40) & 0xFFFFFF).to(torch.float32).mul_(2.0**-24)


@dataclass
class TensorContext:
    name: str
    is_embed: bool = False
    seed: int = 0
    labels: Optional[Sequence[str]] = None  # input model names, for error messages
    # Where a method may write its result (the resident executor's live parameter), or None.
    out: Optional[torch.Tensor] = None

    def output_buffer(self, like: torch.Tensor) -> Optional[torch.Tensor]:
        """`out` if the result (shaped and typed like `like`) can be written there directly."""
        o = self.out
        if o is not None and o.shape == like.shape and o.dtype == like.dtype and o.device == like.device and o.is_contiguous():
            return o
        return None

    def generator(self, device: torch.device) -> torch.Generator:
        gen = torch.Generator(device=device)
        gen.manual_seed(tensor_seed(self.seed, self.name))
        return gen

    def label(self, index: int) -> str:
        return self.labels[index] if self.labels else f"input {index}"


def rectify_embed_sizes(tensors: list[torch.Tensor], ctx: TensorContext) -> list[torch.Tensor]:
    """Embedding/LM-head matrices of different vocab sizes: use the common top-left block."""
    if not ctx.is_embed or any(t.dim() != 2 for t in tensors):
        return tensors
    rows = min(t.shape[0] for t in tensors)
    cols = min(t.shape[1] for t in tensors)
    if all(t.shape[0] == rows and t.shape[1] == cols for t in tensors):
        return tensors
    return [t[:rows, :cols] for t in tensors]


def check_same_shape(tensors: Sequence[torch.Tensor], ctx: TensorContext) -> None:
    first = tensors[0].shape
    for i, t in enumerate(tensors[1:], start=1):
        if t.shape != first:
            raise ModelError(
                f"shape mismatch for tensor {ctx.name}: {ctx.label(0)} has {list(first)}, "
                f"{ctx.label(i)} has {list(t.shape)}"
            )


# Elementwise stages run over slices of this many elements: the temporaries of a stage stay small
# (bounded memory for the largest embedding) and cache-friendly. Slicing never changes results,
# since every op inside is elementwise along the flattened tensor.
CHUNK_ELEMENTS = 1 << 21


def chunk_bounds(numel: int, size: int = CHUNK_ELEMENTS):
    for start in range(0, numel, size):
        yield start, min(start + size, numel)


def flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1) if t.is_contiguous() else t.contiguous().reshape(-1)


def sliced_sums(numel: int, terms) -> torch.Tensor:
    """Whole-tensor sums over flat slices: `terms(start, end)` returns the slice's partial sums (a
    1-D tensor, float32 or float64), which add up in float64. No full-size temporary is made, and
    the result equals one reduction over the whole tensor up to float rounding."""
    total = None
    for start, end in chunk_bounds(numel):
        part = terms(start, end).double()
        total = part if total is None else total + part
    return total


def sum_squares(x: torch.Tensor) -> torch.Tensor:
    """Σx² along the last dim, accumulated in float32 (as torch's norm does for half types)."""
    return x.float().square().sum(dim=-1)


def new_output(ctx: TensorContext, like: torch.Tensor) -> torch.Tensor:
    """The contiguous result tensor (shaped and typed like `like`) that slices are written into."""
    out = ctx.output_buffer(like)
    return out if out is not None else torch.empty(like.shape, dtype=like.dtype, device=like.device)


def weighted_sum_into(out: torch.Tensor, flats: Sequence[torch.Tensor], coeffs: Sequence[float]) -> torch.Tensor:
    """out = sum_i coeffs[i] * flats[i] (flat inputs), accumulated in float32 slice by slice and
    rounded once into `out`'s dtype; returns `out`."""
    out_flat = out.view(-1)
    for start, end in chunk_bounds(out.numel()):
        acc = flats[0][start:end].float() * coeffs[0]
        for f, c in zip(flats[1:], coeffs[1:]):
            acc.add_(f[start:end], alpha=c)
        out_flat[start:end] = acc
    return out
