"""Merge methods on the singular value decomposition of task matrices (evomerge extensions, not in
mergekit; the names are those of mergekit's unmerged pull requests). docs/methods.md states the
equations, defaults and what follows the papers where they leave a choice open.

- `tsvm`: Task Singular Vectors: Merge (Gargiulo et al., CVPR 2025);
- `iso_c`, `iso_cts`: isotropic merging in the common (and task-specific) subspaces (Marczak et
  al., ICML 2025).

Per 2-D weight, with task matrices D_t = W_t - W_0 computed in float32 (float64 for float64 inputs)
on the inputs' device. 1-D tensors, embeddings / LM heads and tensors of other ranks take the
papers' rule for them, task arithmetic: W_0 + alpha * sum_t D_t (the `task_arithmetic` function,
weight 1 per model, lambda = alpha).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from ..errors import ConfigError, ModelError
from .common import TensorContext, tensor_seed
from .svd import polar_factor, thin_svd, top_singular_triplets
from .task_arithmetic import aligned_inputs, task_arithmetic


def _number(method: str, params: dict, key: str, ctx: TensorContext, low: Optional[float] = None,
            high: Optional[float] = None, open_low: bool = False) -> float:
    """A global parameter's value, checked: a finite number inside its range, else a one-line
    ConfigError naming the method, the key and the tensor it was resolved for."""
    value = params[key]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if open_low else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        lo = "" if low is None else (f"({low:g}" if open_low else f"[{low:g}")
        span = f" in {lo}, {high:g}]" if low is not None and high is not None else " a finite number"
        raise ConfigError(f"{method}: parameters.{key} must be{span}, got {value!r} (tensor {ctx.name})")
    return float(value)


def _fallback(tensors, base_index, alpha: float, ctx: TensorContext) -> torch.Tensor:
    """Task arithmetic with weight 1 per model and lambda = alpha (1-D tensors, embeddings)."""
    params = {"normalize": False, "rescale": False, "lambda": alpha, "int8_mask": False}
    return task_arithmetic(tensors, base_index, params, [{"weight": 1.0, "density": 1.0}] * len(tensors), ctx)


def _merge(method: str, share_key: Optional[str], update, tensors, base_index, params, ctx: TensorContext,
           share_optional: bool = False) -> torch.Tensor:
    """What the three methods share: checked parameters, task arithmetic where the papers use it,
    task matrices in the work dtype (float32; float64 for float64 inputs), and
    W_0 + alpha * update(task matrices, share, ctx), rounded once to the inputs' dtype. `update`
    returns None when every task matrix is zero; `share_optional`: the share may be unset (None)."""
    alpha = _number(method, params, "alpha", ctx)
    share = params[share_key] if share_key else None
    if share_key and not (share is None and share_optional):
        share = _number(method, params, share_key, ctx, 0.0, 1.0, open_low=True)
    base, others, _ = aligned_inputs(tensors, base_index, ctx)
    if base.dim() != 2 or ctx.is_embed:
        return _fallback(tensors, base_index, alpha, ctx)
    if not others:
        return base
    work = torch.float64 if base.dtype == torch.float64 else torch.float32
    b = base.to(work)
    try:
        delta = update([x.to(work) - b for x in others], share, ctx)
    except torch.linalg.LinAlgError as err:  # float32 was retried in float64 already (svd.thin_svd)
        raise ModelError(f"{method}: the SVD of tensor {ctx.name} did not converge ({err})") from err
    if delta is None:
        return base.clone()
    return (b + alpha * delta).to(base.dtype)


def _nonzero(s: torch.Tensor, shape) -> torch.Tensor:
    """Which singular values are above numerical zero (numpy's matrix_rank rule: largest value x
    larger side x machine epsilon). Directions of zero singular values are arbitrary, so they are
    never merged: a task matrix that is zero (an unchanged tensor) contributes nothing."""
    if s.numel() == 0:
        return torch.zeros(0, dtype=torch.bool, device=s.device)
    tol = float(s.max()) * max(shape) * torch.finfo(s.dtype).eps
    return s > tol


def _triplets(d: torch.Tensor, rank: int, ctx: TensorContext, which: str, exact: bool = False):
    """Top-`rank` singular triplets, numerical zeros dropped: randomized where `rank` is small
    (seeded by run seed and tensor name), or always exact."""
    if exact:
        u, s, vh = thin_svd(d)
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    else:
        u, s, vh = top_singular_triplets(d, rank, seed=tensor_seed(ctx.seed, f"{ctx.name}#{which}"))
    keep = _nonzero(s, d.shape)
    return u[:, keep], s[keep], vh[keep]


def _tsvm_update(deltas, share: Optional[float], ctx: TensorContext) -> Optional[torch.Tensor]:
    share = 1.0 / len(deltas) if share is None else share
    k = max(1, int(share * min(deltas[0].shape)))
    parts = [_triplets(d, k, ctx, f"tsvm{i}") for i, d in enumerate(deltas)]
    s = torch.cat([p[1] for p in parts])
    if s.numel() == 0:  # every task matrix is zero
        return None
    u = polar_factor(torch.cat([p[0] for p in parts], dim=1))
    v = polar_factor(torch.cat([p[2] for p in parts], dim=0).T)
    return (u * s) @ v.T


def tsvm(tensors, base_index, params, model_params, ctx: TensorContext) -> torch.Tensor:
    """TSV-M: per task the top k = max(1, floor(rank_share * min(m, n))) singular triplets of D_t
    (rank_share defaults to 1/T), stacked U = [U_1 .. U_T], S = diag(S_1 .. S_T), V = [V_1 .. V_T];
    U and V replaced by their orthonormal polar factors; W_0 + alpha * U_perp S V_perp^T."""
    return _merge("tsvm", "rank_share", _tsvm_update, tensors, base_index, params, ctx, share_optional=True)


def _iso_c_update(deltas, share, ctx: TensorContext) -> Optional[torch.Tensor]:
    total = torch.stack(deltas).sum(dim=0) if len(deltas) > 1 else deltas[0]
    u, s, vh = thin_svd(total)
    keep = _nonzero(s, total.shape)
    if not bool(keep.any()):
        return None
    return (s.sum() / s.numel()) * (u[:, keep] @ vh[keep])


def iso_c(tensors, base_index, params, model_params, ctx: TensorContext) -> torch.Tensor:
    """Iso-C: D = sum_t D_t = U S V^T; W_0 + alpha * mean(S) * U V^T, the mean over the full
    spectrum of r = min(m, n) values (directions of numerically zero values left out)."""
    return _merge("iso_c", None, _iso_c_update, tensors, base_index, params, ctx)


def _common_and_specific(deltas: Sequence[torch.Tensor], share: float, ctx: TensorContext):
    """Iso-CTS's bases and spectrum: the top k = max(1, floor(common_share * r)) triplets of the
    sum, then per task the top s = floor((r - k) / T) triplets of its matrix with the common
    left subspace projected out, (I - U_k U_k^T) D_t. Exact SVDs: the flat spectrum weighs every
    kept direction alike, so an approximate subspace changes the result by its whole error (a
    randomized top-30 of 300 moved the update by 12 % in tests/test_svd_methods.py's decaying
    case, where tsvm's singular-value-weighted sum moves by 0.4 %)."""
    total = torch.stack(deltas).sum(dim=0) if len(deltas) > 1 else deltas[0]
    r = min(total.shape)
    k = min(r, max(1, int(share * r)))
    per_task = (r - k) // len(deltas)
    uc, sc, vhc = _triplets(total, k, ctx, "iso_common", exact=True)
    us, ss, vhs = [uc], [sc], [vhc]
    if per_task > 0:
        for i, d in enumerate(deltas):
            residual = d - uc @ (uc.T @ d)
            u, s, vh = _triplets(residual, per_task, ctx, f"iso_task{i}", exact=True)
            us.append(u)
            ss.append(s)
            vhs.append(vh)
    return torch.cat(us, dim=1), torch.cat(ss), torch.cat(vhs, dim=0), k + per_task * len(deltas)


def _iso_cts_update(deltas, share: float, ctx: TensorContext) -> Optional[torch.Tensor]:
    u, s, vh, slots = _common_and_specific(deltas, share, ctx)
    if s.numel() == 0:
        return None
    return (s.sum() / slots) * (polar_factor(u) @ polar_factor(vh.T).T)


def iso_cts(tensors, base_index, params, model_params, ctx: TensorContext) -> torch.Tensor:
    """Iso-CTS: common and task-specific bases stacked and orthonormalised (polar factors), the
    spectrum flattened to the mean of the stacked singular values: W_0 + alpha * mean * U V^T."""
    return _merge("iso_cts", "common_share", _iso_cts_update, tensors, base_index, params, ctx)
