"""`mergekit-tokensurgeon MODEL DONOR OUT`: give MODEL the donor's tokenizer.

Every donor token the model already knows keeps the model's own embedding (and LM-head) row,
bit for bit, moved to the donor's id. Every other donor token gets an approximated row. The
default, orthogonal matching pursuit (OMP), finds in the *donor's* embedding space a sparse
combination of shared tokens that reproduces the new token's donor embedding, then applies the
same coefficients to the *model's* rows of those shared tokens: only the coefficients cross
between the two spaces, so the hidden sizes may differ. docs/tokensurgeon.md states every rule.

Memory holds the two embedding matrices being rebuilt (and the donor's); every other tensor is
copied through one at a time.
"""

from __future__ import annotations

import enum
import json
import logging
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import click

from .cli import apply_environment, console, merge_options, options_from_flags, run_cli, setup_logging
from .errors import ConfigError, ModelError

log = logging.getLogger(__name__)


class Method(str, enum.Enum):
    OMP = "omp"
    COMMON_INTERPOLATION = "common_interpolation"
    SUBWORD = "subword"
    MEAN = "mean"
    ZERO = "zero"
    RANDN = "randn"
    JOHN_HEWITT = "john_hewitt"
    LANDMARK_PCA = "landmark_pca"
    STB = "stb"
    MP_ROPE = "mp_rope"


# mergekit's methods we do not have: refused with this reason rather than silently replaced.
UNSUPPORTED_METHODS = {
    Method.STB: "sparse token bases are not implemented here",
    Method.MP_ROPE: "rotary-aware matching pursuit is not implemented here",
}
# Methods that read the donor's embeddings (the others need only its tokenizer).
DONOR_SPACE_METHODS = {Method.OMP, Method.COMMON_INTERPOLATION, Method.LANDMARK_PCA}
WEIGHT_SCHEMES = ("distance_proportional", "barycentric", "least_squares")
SUBWORD_METHODS = ("mean", "sum", "weighted_mean", "first_last")


@dataclass
class SurgeryOptions:
    method: Method = Method.OMP
    k: int = 64
    weight_scheme: str = "distance_proportional"
    subword_method: str = "mean"
    cosine_similarity: bool = False
    byte_match: bool = False
    batch_size: Optional[int] = None  # new tokens approximated at once (None: by memory)
    seed: int = 0


# ----------------------------------------------------------------------------------------------
# Solving: every approximation is "coefficients over some model rows", computed in float32 or
# float64 on the math device.


def _solve_spd(gram, rhs, rel_ridge: float):
    """Solve (G + λI) c = r for a batch of small symmetric positive semi-definite G. The small
    ridge makes a dependent atom (picked once the residual is already ~0) get ~0 weight instead
    of breaking the factorisation."""
    import torch

    n = gram.shape[-1]
    scale = gram.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(torch.finfo(gram.dtype).tiny)
    eye = torch.eye(n, dtype=gram.dtype, device=gram.device)
    chol, info = torch.linalg.cholesky_ex(gram + (rel_ridge * scale)[:, None, None] * eye)
    if bool((info != 0).any()):  # not reachable with a positive ridge short of NaN input
        raise ModelError("tokensurgeon: the least-squares system is not positive definite (NaN embeddings?)")
    return torch.cholesky_solve(rhs.unsqueeze(-1), chol).squeeze(-1)


def _ridge(dtype) -> float:
    import torch

    return 1e-10 if dtype == torch.float64 else 1e-6


def omp(targets, dictionary, k: int):
    """Orthogonal matching pursuit, batched over targets.

    targets [B, d], dictionary [n, d] -> (indices [B, k], coefficients [B, k]) with
    targets ≈ Σ_j coefficients[:, j] * dictionary[indices[:, j]]. Each step picks the atom most
    correlated (cosine) with the current residual, then re-fits all picked atoms by least squares,
    so the residual stays orthogonal to everything picked so far."""
    import torch

    B, _ = targets.shape
    n = dictionary.shape[0]
    k = min(k, n)
    atoms = dictionary / dictionary.norm(dim=1, keepdim=True).clamp_min(1e-12)
    rows = torch.arange(B, device=targets.device)
    idx = torch.zeros((B, k), dtype=torch.long, device=targets.device)
    picked = torch.zeros((B, k, dictionary.shape[1]), dtype=targets.dtype, device=targets.device)
    gram = torch.zeros((B, k, k), dtype=targets.dtype, device=targets.device)
    rhs = torch.zeros((B, k), dtype=targets.dtype, device=targets.device)
    taken = torch.zeros((B, n), dtype=torch.bool, device=targets.device)
    residual = targets
    coeffs = torch.zeros((B, 0), dtype=targets.dtype, device=targets.device)
    for s in range(k):
        scores = (residual @ atoms.T).abs_().masked_fill_(taken, -1.0)
        pick = scores.argmax(dim=1)
        del scores
        taken[rows, pick] = True
        idx[:, s] = pick
        atom = dictionary[pick]  # [B, d]
        picked[:, s] = atom
        # the Gram matrix and right-hand side grow by one row and column per step
        cross = (picked[:, : s + 1] @ atom.unsqueeze(-1)).squeeze(-1)  # [B, s+1]
        gram[:, s, : s + 1] = cross
        gram[:, : s + 1, s] = cross
        rhs[:, s] = (atom * targets).sum(-1)
        coeffs = _solve_spd(gram[:, : s + 1, : s + 1], rhs[:, : s + 1], _ridge(targets.dtype))
        residual = targets - (coeffs.unsqueeze(1) @ picked[:, : s + 1]).squeeze(1)
    return idx, coeffs


def interpolation(targets, dictionary, k: int, scheme: str, cosine: bool):
    """The k shared tokens nearest each target (Euclidean, or cosine with `cosine`) and their
    weights: inverse distances normalised to sum 1 (distance_proportional); the affine
    combination (weights sum to 1) closest to the target (barycentric); or the unconstrained
    least-squares combination (least_squares)."""
    import torch

    k = min(k, dictionary.shape[0])
    if cosine:
        t = targets / targets.norm(dim=1, keepdim=True).clamp_min(1e-12)
        a = dictionary / dictionary.norm(dim=1, keepdim=True).clamp_min(1e-12)
        dist = 1.0 - t @ a.T
    else:
        dist = torch.cdist(targets, dictionary)
    d, idx = dist.topk(k, dim=1, largest=False)
    del dist
    if scheme == "distance_proportional":
        w = 1.0 / d.clamp_min(1e-8)
        return idx, w / w.sum(dim=1, keepdim=True)
    nb = dictionary[idx]  # [B, k, d]
    gram = nb @ nb.transpose(1, 2)
    rhs = (nb @ targets.unsqueeze(-1)).squeeze(-1)
    if scheme == "least_squares":
        return idx, _solve_spd(gram, rhs, _ridge(targets.dtype))
    # barycentric: min ||Σ w_i a_i - x|| with Σ w_i = 1, via the bordered (KKT) system
    B = targets.shape[0]
    scale = gram.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)
    kkt = torch.zeros((B, k + 1, k + 1), dtype=targets.dtype, device=targets.device)
    kkt[:, :k, :k] = gram + (_ridge(targets.dtype) * scale)[:, None, None] * torch.eye(k, dtype=targets.dtype, device=targets.device)
    kkt[:, :k, k] = 1.0
    kkt[:, k, :k] = 1.0
    b = torch.cat([rhs, torch.ones((B, 1), dtype=targets.dtype, device=targets.device)], dim=1)
    return idx, torch.linalg.solve(kkt, b)[:, :k]


def landmark_map(shared_donor, shared_model, rank: Optional[int] = None):
    """An affine map donor space -> model space fitted on the shared tokens: both sides centred,
    the donor side reduced to its top principal components (at most `rank`, and fewer than the
    shared tokens), then least squares. Returns a function of donor rows."""
    import torch

    mu_d, mu_m = shared_donor.mean(0), shared_model.mean(0)
    xd, xm = shared_donor - mu_d, shared_model - mu_m
    p = min(xd.shape[1], xd.shape[0] - 1, rank or xd.shape[1])
    _, _, vh = torch.linalg.svd(xd, full_matrices=False)
    basis = vh[:p].T  # [d_donor, p]
    z = xd @ basis
    w = torch.linalg.lstsq(z.cpu(), xm.cpu()).solution.to(z.device)  # CUDA lstsq needs full rank

    def apply(rows):
        return mu_m + ((rows - mu_d) @ basis) @ w

    return apply


# ----------------------------------------------------------------------------------------------
# Tokens as bytes, so that two tokenizers' spellings of one string can be compared


def _byte_level_table() -> dict[str, int]:
    """GPT-2 byte-level BPE writes each byte as one printable character: printable Latin-1
    bytes stand for themselves, the others are shifted to U+0100 and up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {chr(b): b for b in printable}
    shift = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + shift)] = b
            shift += 1
    return table


_BYTE_LEVEL = _byte_level_table()
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _tokenizer_kind(tok) -> str:
    """'byte_level' (GPT-2 style), 'metaspace' (SentencePiece style, ▁ for a space) or 'plain'."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        data = json.loads(backend.to_str())
        text = json.dumps([data.get("decoder"), data.get("pre_tokenizer")])
        if '"ByteLevel"' in text:
            return "byte_level"
        if '"Metaspace"' in text or "\u2581" in text or '"ByteFallback"' in text:
            return "metaspace"
        return "plain"
    return "metaspace" if type(tok).__name__.startswith(("Llama", "T5", "Gemma")) else "plain"


def token_bytes(token: str, kind: str, added: bool) -> bytes:
    """The bytes a vocabulary entry stands for. Added tokens are their literal text."""
    if added:
        return token.encode("utf-8")
    if kind == "byte_level" and all(ch in _BYTE_LEVEL for ch in token):
        return bytes(_BYTE_LEVEL[ch] for ch in token)
    if kind == "metaspace":
        m = _BYTE_TOKEN.fullmatch(token)
        if m:
            return bytes([int(m.group(1), 16)])
        return token.replace("\u2581", " ").encode("utf-8")
    return token.encode("utf-8")


def vocab_bytes(tok) -> dict[int, bytes]:
    kind = _tokenizer_kind(tok)
    added = set(tok.added_tokens_decoder)
    return {i: token_bytes(t, kind, i in added) for t, i in tok.get_vocab().items()}


# ----------------------------------------------------------------------------------------------
# Which rows: the donor's vocabulary against the model's


@dataclass
class TokenMap:
    size: int  # output rows: the donor's vocabulary size
    source: list[int]  # per output row: the model's row, or -1 (approximate), or -2 (padding)
    exact: int = 0
    byte: int = 0

    @property
    def new_ids(self) -> list[int]:
        return [j for j, s in enumerate(self.source) if s == -1]

    @property
    def shared(self) -> list[tuple[int, int]]:
        """(output id, model row) of every token both know."""
        return [(j, s) for j, s in enumerate(self.source) if s >= 0]


def map_tokens(model_tok, model_rows: int, donor_tok, donor_rows: Optional[int], byte_match: bool) -> TokenMap:
    donor_vocab = donor_tok.get_vocab()
    size = max([donor_rows or 0, *(i + 1 for i in donor_vocab.values())])
    model_vocab = {t: i for t, i in model_tok.get_vocab().items() if i < model_rows}
    source = [-2] * size
    tm = TokenMap(size, source)
    for token, j in donor_vocab.items():
        i = model_vocab.get(token)
        if i is not None:
            source[j] = i
            tm.exact += 1
        else:
            source[j] = -1
    if byte_match:
        by_bytes: dict[bytes, int] = {}
        for i, b in sorted(vocab_bytes(model_tok).items()):
            if i < model_rows:
                by_bytes.setdefault(b, i)
        for j, b in vocab_bytes(donor_tok).items():
            if source[j] == -1 and b in by_bytes:
                source[j] = by_bytes[b]
                tm.byte += 1
    # rows of neither tokenizer (padding) that the model also leaves unused keep the model's row
    model_used = set(model_vocab.values())
    for j in range(size):
        if source[j] == -2 and j < model_rows and j not in model_used:
            source[j] = j
    return tm


def subword_pieces(new_ids: list[int], donor_tok, model_tok, model_rows: int) -> list[list[int]]:
    """Each new token spelled out by the model's tokenizer (its text re-encoded)."""
    kind = _tokenizer_kind(donor_tok)
    added = set(donor_tok.added_tokens_decoder)
    tokens = donor_tok.convert_ids_to_tokens(new_ids)
    out = []
    for j, t in zip(new_ids, tokens):
        text = token_bytes(t, kind, j in added).decode("utf-8", errors="replace")
        ids = model_tok.encode(text, add_special_tokens=False) if text else []
        out.append([i for i in ids if i < model_rows])
    return out


def combine_pieces(matrix, pieces: list[list[int]], lengths: list[list[int]], how: str):
    """Rows built from the model's rows of each token's pieces (mean of all rows where a token
    has no piece)."""
    import torch

    fallback = matrix.mean(0)
    out = torch.empty((len(pieces), matrix.shape[1]), dtype=matrix.dtype, device=matrix.device)
    for r, (ids, lens) in enumerate(zip(pieces, lengths)):
        if not ids:
            out[r] = fallback
            continue
        rows = matrix[torch.tensor(ids, device=matrix.device)]
        if how == "sum":
            out[r] = rows.sum(0)
        elif how == "weighted_mean":
            w = torch.tensor(lens, dtype=matrix.dtype, device=matrix.device).clamp_min(1)
            out[r] = (w[:, None] * rows).sum(0) / w.sum()
        elif how == "first_last":
            out[r] = (rows[0] + rows[-1]) / 2
        else:
            out[r] = rows.mean(0)
    return out


# ----------------------------------------------------------------------------------------------
# One matrix


def approximate_rows(
    model_matrix,  # [model rows, H] float, on the math device
    donor_matrix,  # [donor rows, D] or None
    tm: TokenMap,
    pieces: list[list[int]],
    piece_lengths: list[list[int]],
    opts: SurgeryOptions,
    seed_offset: int = 0,
):
    """[len(new ids), H]: the approximated rows of the new tokens, in `tm.new_ids` order."""
    import torch

    new_ids = tm.new_ids
    n_new = len(new_ids)
    H = model_matrix.shape[1]
    dev, dt = model_matrix.device, model_matrix.dtype
    out = torch.zeros((n_new, H), dtype=dt, device=dev)
    if not n_new:
        return out
    shared = tm.shared
    model_rows_idx = torch.tensor([i for _, i in shared], dtype=torch.long, device=dev)
    method = opts.method

    if method == Method.ZERO:
        return out
    if method == Method.MEAN:
        return out + model_matrix.mean(0)
    if method in (Method.RANDN, Method.JOHN_HEWITT):
        gen = torch.Generator(device="cpu").manual_seed(opts.seed + seed_offset)
        mu = model_matrix.mean(0)
        z = torch.randn((n_new, H), generator=gen, dtype=torch.float64).to(dev, dt)
        if method == Method.RANDN:
            return mu + z * model_matrix.std()
        centred = (model_matrix - mu).double()
        cov = centred.T @ centred / max(1, model_matrix.shape[0] - 1)
        cov += 1e-5 * cov.diagonal().mean() * torch.eye(H, dtype=cov.dtype, device=cov.device)
        chol = torch.linalg.cholesky(cov).to(dt)
        return mu + z @ chol.T
    if method == Method.SUBWORD or donor_matrix is None:
        return combine_pieces(model_matrix, pieces, piece_lengths, opts.subword_method)

    # donor-space methods: tokens without a donor row fall back to their subword pieces
    have = [r for r, j in enumerate(new_ids) if j < donor_matrix.shape[0]]
    lacking = [r for r, j in enumerate(new_ids) if j >= donor_matrix.shape[0]]
    if lacking:
        log.warning("%d new tokens have no row in the donor's embeddings: approximated from their subword pieces", len(lacking))
        out[lacking] = combine_pieces(
            model_matrix, [pieces[r] for r in lacking], [piece_lengths[r] for r in lacking], opts.subword_method
        )
    if not have:
        return out
    donor_shared = donor_matrix[torch.tensor([j for j, _ in shared], dtype=torch.long, device=dev)]
    model_shared = model_matrix[model_rows_idx]
    targets_all = donor_matrix[torch.tensor([new_ids[r] for r in have], dtype=torch.long, device=dev)]
    have_t = torch.tensor(have, dtype=torch.long, device=dev)
    if method == Method.LANDMARK_PCA:
        out[have_t] = landmark_map(donor_shared, model_shared, opts.k if opts.k > 0 else None)(targets_all)
        return out
    # per target: a score row over the shared tokens, the k picked donor rows, the k model rows
    # they combine, the Gram matrix; the default batch keeps that near 256 MiB
    k = min(opts.k, donor_shared.shape[0])
    per_target = 4 * (donor_shared.shape[0] + k * (donor_shared.shape[1] + model_shared.shape[1] + k))
    batch = opts.batch_size or max(1, (256 << 20) // per_target)
    for start in range(0, len(have), batch):
        targets = targets_all[start : start + batch]
        if method == Method.OMP:
            idx, coeffs = omp(targets, donor_shared, opts.k)
        else:
            idx, coeffs = interpolation(targets, donor_shared, opts.k, opts.weight_scheme, opts.cosine_similarity)
        out[have_t[start : start + batch]] = (coeffs.unsqueeze(-1) * model_shared[idx]).sum(1)
    return out


def rebuild_matrix(model_matrix, donor_matrix, tm: TokenMap, pieces, piece_lengths, opts: SurgeryOptions, math_device: str, seed_offset: int = 0):
    """The model's matrix re-indexed to the donor's vocabulary, in the model's dtype. Shared
    tokens' rows are copied, not recomputed: they stay bit-identical."""
    import torch

    out = torch.empty((tm.size, model_matrix.shape[1]), dtype=model_matrix.dtype)
    src = torch.tensor(tm.source, dtype=torch.long)
    keep = (src >= 0).nonzero().flatten()
    out[keep] = model_matrix[src[keep]]
    math_dtype = torch.float64 if model_matrix.dtype == torch.float64 else torch.float32
    work = model_matrix.to(math_device, math_dtype)
    if tm.new_ids:
        donor = donor_matrix.to(math_device, math_dtype) if donor_matrix is not None else None
        rows = approximate_rows(work, donor, tm, pieces, piece_lengths, opts, seed_offset)
        out[torch.tensor(tm.new_ids, dtype=torch.long)] = rows.to("cpu", model_matrix.dtype)
    pad = (src == -2).nonzero().flatten()
    if pad.numel():  # token-less rows the model had in use elsewhere: the mean row, harmless
        out[pad] = work.mean(0).to("cpu", model_matrix.dtype)
    return out


# ----------------------------------------------------------------------------------------------
# Models


def embedding_names(config: dict, checkpoint) -> tuple[str, Optional[str]]:
    """(input embedding tensor, output embedding tensor or None when tied/absent) in a checkpoint."""
    from .architecture import known_architecture

    arch = known_architecture(config)
    embed = head = None
    if arch is not None:
        for w in arch.pre_weights:
            if w.is_embed and embed is None:
                embed = checkpoint.find(w.all_names)
        for w in arch.post_weights:
            if w.is_embed and head is None:
                head = checkpoint.find(w.all_names)
    if embed is None:
        embed = next(
            (n for n in checkpoint.tensors if n.endswith(("embed_tokens.weight", "wte.weight", "embed_in.weight", "word_embeddings.weight"))),
            None,
        )
    if head is None:
        head = next((n for n in checkpoint.tensors if n in ("lm_head.weight", "embed_out.weight")), None)
    if embed is None:
        raise ModelError(f"model {checkpoint.label}: no input embedding tensor found in {checkpoint.directory}")
    return embed, head


@dataclass
class _Model:
    label: str
    directory: Path
    config: dict
    checkpoint: object  # io.Checkpoint
    embed: str
    head: Optional[str]

    @property
    def rows(self) -> int:
        return self.checkpoint.tensors[self.embed].shape[0]


def _open(reference: str, what: str, options, required_weights: bool = True) -> tuple[Path, Optional[_Model]]:
    from .config import ModelReference
    from .io import Checkpoint, read_json
    from .sources import resolve_model_dir

    try:
        ref = ModelReference.parse(reference)
    except ValueError as err:
        raise ModelError(f"{what} {reference}: {err}") from None
    try:
        directory = resolve_model_dir(ref, options.lora_merge_cache, options.lora_merge_dtype, options.lazy_unpickle)
    except ModelError as err:  # name the role: "donor ...", not "model ..."
        message = str(err)
        raise ModelError(f"{what}{message[len('model'):]}" if message.startswith("model ") else message) from None
    if not required_weights and not (directory / "config.json").is_file():
        return directory, None
    config = read_json(directory / "config.json", f"{what} {ref}")
    try:
        checkpoint = Checkpoint(directory, str(ref), options.lazy_unpickle)
    except ModelError:
        if required_weights:
            raise
        return directory, None
    try:
        embed, head = embedding_names(config, checkpoint)
    except BaseException:
        checkpoint.close()
        raise
    return directory, _Model(str(ref), directory, config, checkpoint, embed, head)


def _special_ids(donor_tok, donor_config: Optional[dict]) -> dict:
    """bos/eos/pad ids of the output: the donor's config where it has them, else its tokenizer's."""
    out = {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = (donor_config or {}).get(key)
        if value is None:
            value = getattr(donor_tok, key, None)
        out[key] = value
    return out


def transplant(model: str, donor: str, out_path: Path, options, surgery: SurgeryOptions, command_line: str = "") -> dict:
    """Write MODEL with DONOR's tokenizer to `out_path` (atomically); returns a summary."""
    from tqdm import tqdm

    from .io import OutputTensorSpec, atomic_model_output, copy_files
    from .sources import TOKENIZER_FILES
    from .tokenizer import load_tokenizer, set_vocab_size

    if surgery.method in UNSUPPORTED_METHODS:
        raise ConfigError(f"--approximation-method {surgery.method.value}: {UNSUPPORTED_METHODS[surgery.method]} (use omp)")
    if surgery.k < 1:
        raise ConfigError(f"--k {surgery.k}: must be at least 1")
    device = options.resolved_device()
    _, m = _open(model, "model", options)
    d = None
    try:
        needs_donor = surgery.method in DONOR_SPACE_METHODS
        try:
            donor_dir, d = _open(donor, "donor", options, required_weights=needs_donor)
        except ModelError as err:
            if not needs_donor or "not found:" in str(err):
                raise
            raise ModelError(
                f"{err} (--approximation-method {surgery.method.value} reads the donor's embeddings; "
                "subword, mean, zero, randn and john_hewitt need only its tokenizer)"
            ) from None
        if not any((donor_dir / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
            raise ModelError(f"donor {donor}: no tokenizer (tokenizer.json, tokenizer.model or vocab.json) in {donor_dir}")
        model_tok = load_tokenizer(m.directory, m.label, required=True)
        donor_tok = load_tokenizer(donor_dir, donor, required=True)
        tm = map_tokens(model_tok, m.rows, donor_tok, d.rows if d is not None else None, surgery.byte_match)
        new_ids = tm.new_ids
        log.info(
            "donor vocabulary: %d rows; %d tokens match exactly, %d by bytes, %d to approximate (%s)",
            tm.size, tm.exact, tm.byte, len(new_ids), surgery.method.value,
        )
        if surgery.method in DONOR_SPACE_METHODS and len(tm.shared) < 2 and new_ids:
            raise ModelError(f"model {m.label} and donor {donor}: fewer than 2 shared tokens; nothing to approximate from (use --approximation-method subword)")
        pieces = subword_pieces(new_ids, donor_tok, model_tok, m.rows) if new_ids else []
        piece_lengths = [[len(model_tok.decode([i])) for i in p] for p in pieces]

        tied = m.head is None
        head_of_donor = None
        if d is not None:
            head_of_donor = d.head or d.embed  # a tied donor's output matrix is its embedding
        replaced = {m.embed: (d.embed if d is not None else None, 0)}
        if not tied:
            replaced[m.head] = (head_of_donor, 1)
        specs = []
        for name, loc in m.checkpoint.tensors.items():
            shape = (tm.size, loc.shape[1]) if name in replaced else loc.shape
            specs.append(OutputTensorSpec(name, tuple(shape), loc.dtype))

        out_config = json.loads(json.dumps(m.config))
        set_vocab_size(out_config, tm.size)
        ids = _special_ids(donor_tok, d.config if d is not None else None)
        for key, value in ids.items():
            if value is not None or key in out_config:
                out_config[key] = value

        with atomic_model_output(out_path, options.overwrite, specs, options.out_shard_size, options.safe_serialization) as (folder, writer):
            for spec in tqdm(specs, desc="writing", unit="tensor", disable=options.quiet):
                tensor = m.checkpoint.read(spec.name)
                if spec.name in replaced:
                    donor_name, offset = replaced[spec.name]
                    donor_matrix = d.checkpoint.read(donor_name) if donor_name is not None else None
                    tensor = rebuild_matrix(tensor, donor_matrix, tm, pieces, piece_lengths, surgery, device, offset)
                writer.write(spec.name, tensor)
            writer.finish("evomerge")
            (folder / "config.json").write_text(json.dumps(out_config, indent=2, sort_keys=True) + "\n")
            copied = copy_files(donor_dir, folder, [n for n in TOKENIZER_FILES if n != "generation_config.json"])
            if not copied:
                raise ModelError(f"donor {donor}: no tokenizer files to copy in {donor_dir}")
            _write_generation_config(m.directory, folder, ids)
            if options.write_model_card:
                (folder / "README.md").write_text(_card(m.label, donor, tm, surgery, out_path, command_line))
        return {"rows": tm.size, "exact": tm.exact, "byte": tm.byte, "approximated": len(new_ids), "tied": tied}
    finally:
        m.checkpoint.close()
        if d is not None:
            d.checkpoint.close()


def _write_generation_config(model_dir: Path, folder: Path, ids: dict) -> None:
    """The model's generation settings, with the token ids of the new vocabulary."""
    src = model_dir / "generation_config.json"
    if not src.is_file():
        return
    data = json.loads(src.read_text())
    for key, value in ids.items():
        if key in data or value is not None:
            data[key] = value
    (folder / "generation_config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _card(model: str, donor: str, tm: TokenMap, surgery: SurgeryOptions, out_path: Path, command_line: str) -> str:
    from .card import card_header
    from .config import ModelReference

    refs = [ModelReference.parse(model), ModelReference.parse(donor)]
    lines = [
        *card_header(refs, "transformers", ["mergekit", "tokensurgeon", "evomerge"], Path(out_path)),
        f"{model} with the tokenizer of {donor}, made with evomerge's mergekit-tokensurgeon.",
        "",
        f"Of the donor's {tm.size} vocabulary rows, {tm.exact} tokens kept the model's own rows "
        f"({tm.byte} more matched by bytes) and {len(tm.new_ids)} were approximated with "
        f"`{surgery.method.value}` (k = {surgery.k}).",
        "",
    ]
    if command_line:
        lines += ["```sh", command_line, "```", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# CLI


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=str)
@click.argument("donor", type=str)
@click.argument("out_path", type=click.Path(file_okay=False))
@click.option("-k", "--k", "k", type=int, default=64, show_default=True, help="OMP sparsity, or neighbours for common_interpolation (PCA rank cap for landmark_pca).")
@click.option(
    "-a", "--approximation-method", "method", type=click.Choice([m.value for m in Method]), default="omp", show_default=True,
    help="How rows of new tokens are made (stb and mp_rope are refused: not implemented).",
)
@click.option("--weight-scheme", type=click.Choice(WEIGHT_SCHEMES), default="distance_proportional", show_default=True, help="Weights of common_interpolation.")
@click.option("--subword-method", type=click.Choice(SUBWORD_METHODS), default="mean", show_default=True, help="How subword pieces are combined (subword method).")
@click.option("-c/-nc", "--cosine-similarity/--no-cosine-similarity", default=False, help="Nearest neighbours by cosine instead of Euclidean distance (common_interpolation).")
@click.option("--barycentric/--no-barycentric", default=None, help="Old spelling of --weight-scheme barycentric.")
@click.option("--knn/--no-knn", default=None, help="Old spelling: --knn is common_interpolation, --no-knn is omp.")
@click.option("--byte-match/--no-byte-match", default=False, help="Also reuse a model row whose token spells the same bytes as the donor's.")
@click.option("--prefix-match/--no-prefix-match", default=False, help="Not supported (refused).")
@click.option("--magikarp/--no-magikarp", default=False, help="Not supported (refused).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="New tokens approximated at once (default: by memory).")
@merge_options
def main(model, donor, out_path, k, method, weight_scheme, subword_method, cosine_similarity, barycentric, knn,
         byte_match, prefix_match, magikarp, batch_size, **kw) -> None:
    """Give MODEL the tokenizer of DONOR; write the result to OUT_PATH."""
    setup_logging(kw["verbose"], kw["quiet"])
    apply_environment(kw)
    command_line = shlex.join(["mergekit-tokensurgeon", *sys.argv[1:]])

    def action() -> None:
        from .cli import check_device
        from .threads import set_num_threads

        if prefix_match:
            raise ConfigError("--prefix-match is not supported (exact and --byte-match matches are)")
        if magikarp:
            raise ConfigError("--magikarp is not supported (under-trained token detection is not implemented)")
        chosen = Method(method)
        if knn is not None and method == "omp":
            chosen = Method.COMMON_INTERPOLATION if knn else Method.OMP
        scheme = "barycentric" if barycentric else weight_scheme
        options = options_from_flags(kw)
        check_device(options)
        set_num_threads(options.num_threads)
        surgery = SurgeryOptions(chosen, k, scheme, subword_method, cosine_similarity, byte_match, batch_size, options.random_seed)
        summary = transplant(model, donor, Path(out_path), options, surgery, command_line)
        if not options.quiet:
            click.echo(
                f"model written to {out_path}: {summary['rows']} vocabulary rows, {summary['exact'] + summary['byte']} kept, "
                f"{summary['approximated']} approximated"
            )

    run_cli(kw["verbose"], action)


console_main = console(main)

if __name__ == "__main__":
    console_main()
