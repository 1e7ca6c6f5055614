"""Tokenizer merging (docs/mergekit-reference.md §5): the output tokenizer, each input's map onto its vocabulary, and the
permutation of embedding / LM-head rows that both executors apply before a merge method runs.

Everything here that depends on the recipe is resolved at planning time (`build_vocab`), so bad
input fails before anything is read or written; `permute_embeddings` only does tensor work.
Tokenizers are read from the models' local folders only, never with remote code.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch

from .architecture import get_config_value, set_config_value
from .chat_templates import template_for
from .config import MergeConfig, ModelReference, TokenEmbeddingSource
from .errors import ConfigError, ModelError

if TYPE_CHECKING:
    from .plan import InputModel

log = logging.getLogger(__name__)

VOCAB_KEYS = ("vocab_size", "text_config.vocab_size")


def vocab_size_key(config: dict) -> str:
    """Where config.json keeps the vocabulary size (multimodal configs nest it)."""
    return next((k for k in VOCAB_KEYS if isinstance(get_config_value(config, k), int)), VOCAB_KEYS[0])


def set_vocab_size(config: dict, size: int) -> None:
    set_config_value(config, vocab_size_key(config), size)


def load_tokenizer(directory: Path, label: str, required: bool = False):
    """A model folder's tokenizer (fast when possible), or None with a warning."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)
    except Exception as err:  # transformers raises many types for a missing/broken tokenizer
        if required:
            raise ModelError(f"model {label}: cannot load its tokenizer from {directory}: {err}") from None
        log.warning("model %s: cannot load its tokenizer (%s)", label, err)
        return None


class TokenizerCache:
    """Each model's tokenizer, loaded at most once per planning."""

    def __init__(self, models: dict[ModelReference, "InputModel"]):
        self.models = models
        self._loaded: dict[ModelReference, Any] = {}

    def get(self, ref: ModelReference, required: bool = False):
        if ref not in self._loaded:
            self._loaded[ref] = load_tokenizer(self.models[ref].directory, str(ref), required)
        elif required and self._loaded[ref] is None:
            raise ModelError(f"model {ref}: cannot load its tokenizer from {self.models[ref].directory}")
        return self._loaded[ref]


# ----------------------------------------------------------------------------------------------
# Chat template (docs/mergekit-reference.md §4)


def resolve_chat_template(config: MergeConfig, tokenizers: TokenizerCache, refs: Sequence[ModelReference]) -> Optional[str]:
    """The Jinja text to store with the output tokenizer, or None to leave it as it is."""
    value = config.chat_template
    if value is None:
        return None
    if value != "auto":
        return template_for(value)
    found = []
    for ref in refs:
        tok = tokenizers.get(ref)
        template = getattr(tok, "chat_template", None) if tok is not None else None
        if isinstance(template, dict):
            template = template.get("default")
        if isinstance(template, str) and template.strip():
            found.append(template.strip())
    if not found:
        log.warning("chat_template: auto: none of the input models has a chat template; left unchanged")
        return None
    # most_common keeps first-seen order among equal counts: ties go to the earlier model
    return Counter(found).most_common(1)[0][0]


# ----------------------------------------------------------------------------------------------
# The output vocabulary


@dataclass(frozen=True)
class RowSource:
    """A configured token's embedding: a row of one model's matrix, zeros, or the default rule."""

    kind: str  # "row" | "zero" | "rule"
    model: Optional[ModelReference] = None
    row: int = -1
    force: bool = False


@dataclass(eq=False)
class VocabPlan:
    """The output tokenizer and how every input's embedding rows map onto it."""

    tokenizer: Any
    size: int  # V: output vocabulary
    padded_size: int  # V' = V rounded up to pad_to_multiple_of
    base: ModelReference
    # per model: int64 [V], the model's row for each output token, -1 where the model lacks it
    permutations: dict[ModelReference, torch.Tensor]
    # output token id -> its source, for tokens of tokenizer.tokens with a source or `force`
    configured: dict[int, RowSource] = field(default_factory=dict)
    key: tuple = ()

    @property
    def forced(self) -> list[int]:
        return [j for j, src in self.configured.items() if src.force]

    def row_models(self) -> set[ModelReference]:
        """Models whose rows a permutation may read besides the inputs of a tensor."""
        return {self.base} | {s.model for s in self.configured.values() if s.model is not None}


def builds_tokenizer(config: MergeConfig) -> bool:
    """`base` without tokens or padding keeps the donor's tokenizer files as they are."""
    if config.tokenizer is not None:
        t = config.tokenizer
        return t.source != "base" or bool(t.tokens) or t.pad_to_multiple_of is not None
    return config.tokenizer_source not in (None, "base")


def vocab_key(config: MergeConfig) -> tuple:
    """Everything a VocabPlan depends on in a recipe (the resident executor reuses plans by it)."""
    t = config.tokenizer.model_dump(mode="json") if config.tokenizer is not None else None
    return (config.tokenizer_source, json.dumps(t, sort_keys=True), tuple(config.referenced_models()))


def _model_vocab_size(model: "InputModel", tok) -> int:
    value = get_config_value(model.config, vocab_size_key(model.config))
    if isinstance(value, int):
        return value
    return len(tok.get_vocab())


def _fresh_copy(tok, tmp: Path, name: str, edit=None):
    """Save and reload a tokenizer (optionally editing its files between the two): an independent
    object whose added tokens we may change."""
    from transformers import AutoTokenizer

    where = tmp / name
    tok.save_pretrained(str(where))
    if edit is not None:
        edit(where)
    return AutoTokenizer.from_pretrained(str(where), local_files_only=True, trust_remote_code=False)


def _strip(tok, vocab_size: int, label: str, tmp: Path):
    """The tokenizer without tokens whose id is >= the model's vocab size (docs/mergekit-reference.md §5): they have no
    embedding row. Needs a fast BPE tokenizer: the vocab, added tokens and merges are edited."""
    extra = {t for t, i in tok.get_vocab().items() if i >= vocab_size}
    if not extra:
        return _fresh_copy(tok, tmp, "base")
    data = json.loads(tok.backend_tokenizer.to_str()) if getattr(tok, "is_fast", False) else None
    kind = (data or {}).get("model", {}).get("type")
    if kind != "BPE":
        raise ModelError(
            f"model {label}: its tokenizer has {len(extra)} tokens beyond the model's vocab_size {vocab_size}; "
            f"removing them needs a fast BPE tokenizer, this one is {kind or type(tok).__name__}"
        )
    log.info("model %s: dropping %d tokenizer tokens beyond vocab_size %d", label, len(extra), vocab_size)
    model = data["model"]
    model["vocab"] = {t: i for t, i in model["vocab"].items() if i < vocab_size}

    def keep(merge) -> bool:
        a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
        return a not in extra and b not in extra and a + b not in extra

    model["merges"] = [m for m in model.get("merges") or [] if keep(m)]
    data["added_tokens"] = [a for a in data.get("added_tokens") or [] if a["id"] < vocab_size]

    def edit(where: Path) -> None:
        (where / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
        cfg_file = where / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text())
        # loading re-adds every special token the config names: drop the removed ones there too
        decoder = cfg.get("added_tokens_decoder")
        if isinstance(decoder, dict):
            cfg["added_tokens_decoder"] = {k: v for k, v in decoder.items() if int(k) < vocab_size}
        for key in ("extra_special_tokens", "additional_special_tokens"):
            if isinstance(cfg.get(key), list):
                cfg[key] = [t for t in cfg[key] if (t if isinstance(t, str) else t.get("content")) not in extra]
        for key, value in list(cfg.items()):
            content = value.get("content") if isinstance(value, dict) else value
            if key.endswith("_token") and isinstance(content, str) and content in extra:
                log.warning("model %s: special token %s=%r is beyond vocab_size and is dropped", label, key, content)
                cfg[key] = None
        cfg_file.write_text(json.dumps(cfg, ensure_ascii=False))

    return _fresh_copy(tok, tmp, "base", edit)


def _added_flags(t) -> tuple:
    return tuple(getattr(t, a, None) for a in ("special", "normalized", "lstrip", "rstrip", "single_word"))


def _union(base_tok, others: list[tuple[ModelReference, Any, int]], tmp: Path):
    """Base tokenizer + every token the others know (within their vocab size), appended in
    first-seen order; added tokens keep their flags (first definition wins)."""
    regular: dict[str, None] = {}
    added: dict[str, Any] = {}
    for ref, tok, n in others:
        added_ids = tok.added_tokens_decoder
        for token, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if i >= n:
                continue
            if i in added_ids:
                at = added_ids[i]
                first = added.get(at.content)
                if first is None:
                    added[at.content] = at
                elif _added_flags(first) != _added_flags(at):
                    log.warning("token %r: model %s defines it with other flags; the first definition is kept", at.content, ref)
            else:
                regular.setdefault(token, None)
    out = _fresh_copy(base_tok, tmp, "union")
    have = out.get_vocab()
    new_regular = [t for t in regular if t not in have]
    if new_regular:
        out.add_tokens(new_regular)
    for at in added.values():
        if at.content not in out.get_vocab():
            out.add_tokens([at], special_tokens=bool(at.special))
    return out


def _find_model(value: str, models: dict[ModelReference, "InputModel"], key: str) -> ModelReference:
    try:
        ref = ModelReference.parse(value)
    except ValueError as err:
        raise ConfigError(f"{key}: {err}") from None
    return _member(ref, models, key)


def _member(ref: ModelReference, models: dict[ModelReference, "InputModel"], key: str) -> ModelReference:
    if ref in models:
        return ref
    path = Path(ref.model.path)
    if ref.lora is None and path.exists():  # the same folder written another way (./a vs a)
        for other, m in models.items():
            if other.lora is None and Path(m.directory).resolve() == path.resolve():
                return other
    raise ConfigError(
        f"{key}: model {ref} is not one of the models of this merge ({', '.join(str(r) for r in models)})"
    )


def _permutation(out_vocab: dict[str, int], size: int, tok, n: int, label: str) -> torch.Tensor:
    p = torch.full((size,), -1, dtype=torch.long)
    beyond = []
    for token, k in tok.get_vocab().items():
        j = out_vocab.get(token)
        if j is None:
            continue
        if k < n:
            p[j] = k
        else:
            beyond.append(token)
    if beyond:
        log.warning(
            "model %s: %d tokens of its tokenizer have ids beyond its vocab_size %d (e.g. %r); treated as absent",
            label, len(beyond), n, beyond[0],
        )
    return p


def build_vocab(config: MergeConfig, models: dict[ModelReference, "InputModel"], tokenizers: Optional[TokenizerCache] = None) -> Optional[VocabPlan]:
    """The output tokenizer and per-model permutations, or None when the recipe keeps the donor's
    tokenizer. Every configuration error is raised here, before any tensor is read."""
    if not builds_tokenizer(config):
        return None
    tokenizers = tokenizers or TokenizerCache(models)
    tcfg = config.tokenizer
    source = tcfg.source if tcfg is not None else config.tokenizer_source
    source_key = "tokenizer.source" if tcfg is not None else "tokenizer_source"
    refs = config.referenced_models()
    base = config.base_model or refs[0]
    source_ref = None
    if isinstance(source, ModelReference):
        source_ref = _member(source, models, source_key)
    elif source not in ("union", "base"):
        source_ref = _find_model(source, models, source_key)

    base_tok = tokenizers.get(base, required=True)
    sizes: dict[ModelReference, int] = {}
    toks: dict[ModelReference, Any] = {}
    for ref in refs:
        tok = tokenizers.get(ref, required=ref in (base, source_ref))
        if tok is None:  # treated as having the base vocabulary (docs/mergekit-reference.md §5)
            tok = base_tok
        toks[ref] = tok
        sizes[ref] = _model_vocab_size(models[ref], tok)

    with tempfile.TemporaryDirectory(prefix="evomerge-tokenizer-") as tmp_name:
        tmp = Path(tmp_name)
        stripped = _strip(base_tok, sizes[base], str(base), tmp)
        if source == "base":
            out = stripped
        elif source == "union":
            out = _union(stripped, [(r, toks[r], sizes[r]) for r in refs], tmp)
        else:
            out = _fresh_copy(toks[source_ref], tmp, "source")
        tokens = (tcfg.tokens if tcfg is not None else None) or {}
        new_keys = [t for t in tokens if t not in out.get_vocab()]
        if new_keys:
            out.add_tokens(new_keys)

    out_vocab = out.get_vocab()
    size = max(len(out), max(out_vocab.values(), default=-1) + 1)
    m = tcfg.pad_to_multiple_of if tcfg is not None else None
    padded = size if not m or size % m == 0 else (size // m + 1) * m
    permutations = {ref: _permutation(out_vocab, size, toks[ref], sizes[ref], str(ref)) for ref in refs}

    configured: dict[int, RowSource] = {}
    for token, tok_cfg in tokens.items():
        key = f"tokenizer.tokens.{token}.source"
        j = out_vocab[token]
        src = tok_cfg.source
        if src is None:
            if tok_cfg.force:  # every model takes the default rule's row
                configured[j] = RowSource("rule", force=True)
        elif isinstance(src, ModelReference):
            ref = _member(src, models, key)
            row = int(permutations[ref][j])
            if row < 0:
                raise ConfigError(f"{key}: model {ref} has no token {token!r} (use kind: model_token to take another token's row)")
            configured[j] = RowSource("row", ref, row, tok_cfg.force)
        else:
            configured[j] = _explicit_source(src, key, models, toks, sizes, tok_cfg.force)

    for j in _unowned(permutations, size, configured):
        log.warning("token %r (id %d) is in no input model and has no source: its embedding is zero", out.convert_ids_to_tokens(j), j)
    return VocabPlan(out, size, padded, base, permutations, configured, key=vocab_key(config))


def _explicit_source(src: TokenEmbeddingSource, key: str, models, toks, sizes, force: bool) -> RowSource:
    kind = src.kind
    if kind == "zero":
        return RowSource("zero", force=force)
    if kind != "model_token":
        raise ConfigError(f"{key}.kind: unknown kind {kind!r} (use model_token or zero, or a model reference)")
    if src.model is None:
        raise ConfigError(f"{key}.model: kind model_token needs a model")
    ref = _member(src.model, models, f"{key}.model")
    if (src.token_id is None) == (src.token is None):
        raise ConfigError(f"{key}: kind model_token needs exactly one of token_id or token")
    if src.token_id is not None:
        if not 0 <= src.token_id < sizes[ref]:
            raise ConfigError(f"{key}.token_id: {src.token_id} is out of range for model {ref} (vocab size {sizes[ref]})")
        return RowSource("row", ref, src.token_id, force)
    row = toks[ref].get_vocab().get(src.token)
    if row is None:
        raise ConfigError(f"{key}.token: model {ref} has no token {src.token!r}")
    if row >= sizes[ref]:
        raise ConfigError(f"{key}.token: token {src.token!r} of model {ref} has id {row}, beyond its vocab size {sizes[ref]}")
    return RowSource("row", ref, row, force)


def _unowned(permutations: dict, size: int, configured: dict) -> list[int]:
    has = torch.zeros(size, dtype=torch.bool)
    for p in permutations.values():
        has |= p >= 0
    return [j for j in (~has).nonzero().flatten().tolist() if configured.get(j, RowSource("rule")).kind == "rule"]


# ----------------------------------------------------------------------------------------------
# Permuting embeddings (docs/mergekit-reference.md §5): the one function both executors call


def permute_embeddings(
    vocab: VocabPlan,
    tensor_name: str,
    models: Sequence[ModelReference],
    tensors: Sequence[torch.Tensor],
    extra: Optional[dict[ModelReference, torch.Tensor]] = None,
) -> list[torch.Tensor]:
    """Each input matrix [rows, H] re-indexed to the output vocabulary: [V', H].

    `models[i]` owns `tensors[i]`; `extra` holds the same tensor of models that are not inputs but
    whose rows the vocabulary needs (the tokenizer's base model, configured token sources).
    Row j of model m: m's own row for token j unless the token is forced; else the token's
    default (configured source; the single owner; the base when several own it; else the
    average of the owners; else zeros). Padding rows are the mean of the model's real rows.
    """
    extra = extra or {}
    by_model: dict[ModelReference, torch.Tensor] = {}
    for ref, t in list(zip(models, tensors)) + list(extra.items()):
        by_model.setdefault(ref, t)
    cols = {t.shape[1] for t in by_model.values()}
    if len(cols) != 1:
        detail = ", ".join(f"model {r} has {list(t.shape)}" for r, t in by_model.items())
        raise ModelError(f"tensor {tensor_name}: embedding widths differ ({detail})")
    sample = tensors[0]
    V, Vp, H = vocab.size, vocab.padded_size, sample.shape[1]
    device, dtype = sample.device, sample.dtype

    # owners for the default rule: the tensor's inputs and the base (spec: inputs ∪ {base})
    owners = list(dict.fromkeys(list(models) + ([vocab.base] if vocab.base in by_model else [])))
    perms = {r: vocab.permutations[r].to(device) for r in by_model}
    forced = torch.zeros(V, dtype=torch.bool, device=device)
    if vocab.forced:
        forced[torch.tensor(vocab.forced, device=device)] = True
    own = {r: (perms[r] >= 0) & ~forced for r in dict.fromkeys(models)}
    needed = torch.zeros(V, dtype=torch.bool, device=device)
    for mask in own.values():
        needed |= ~mask
    # defaults only for the rows some input lacks: memory stays near one matrix per input
    needed_idx = needed.nonzero().flatten()
    defaults = _default_rows(vocab, needed_idx, owners, by_model, perms, dtype, H)

    results: dict[ModelReference, torch.Tensor] = {}
    for ref in own:
        w, p, mask = by_model[ref], perms[ref], own[ref]
        new = torch.zeros((Vp, H), device=device, dtype=dtype)
        new[needed_idx] = defaults
        idx = mask.nonzero().flatten()
        new[idx] = w[p[idx]]
        if Vp > V:
            new[V:] = new[:V].mean(dim=0)
        results[ref] = new
    return [results[ref] for ref in models]


def _default_rows(vocab: VocabPlan, idx: torch.Tensor, owners, by_model, perms, dtype, H) -> torch.Tensor:
    """[len(idx), H]: the default embedding of the output tokens `idx`."""
    device = idx.device
    out = torch.zeros((idx.numel(), H), device=device, dtype=dtype)
    if not idx.numel():
        return out
    position = {j: i for i, j in enumerate(idx.tolist())} if vocab.configured else {}
    configured = {position[j]: s for j, s in vocab.configured.items() if s.kind != "rule" and j in position}
    explicit = torch.zeros(idx.numel(), dtype=torch.bool, device=device)
    if configured:
        explicit[torch.tensor(list(configured), device=device)] = True
    rows = {r: perms[r][idx] for r in owners}  # each owner's row per needed token, -1 absent
    has = {r: (rows[r] >= 0) & ~explicit for r in owners}
    count = torch.zeros(idx.numel(), dtype=torch.long, device=device)
    for mask in has.values():
        count += mask.long()
    single = count == 1
    by_base = (count >= 2) & has[vocab.base] if vocab.base in has else torch.zeros_like(single)
    average = (count >= 2) & ~by_base
    for ref in owners:
        for sel in (has[ref] & single, has[ref] & average):
            pos = sel.nonzero().flatten()
            if pos.numel():
                out[pos] += by_model[ref][rows[ref][pos]]  # single: 0 + its row; average: the sum
    pos = average.nonzero().flatten()
    if pos.numel():
        out[pos] = out[pos] / count[pos].unsqueeze(1).to(dtype)
    pos = by_base.nonzero().flatten()
    if pos.numel():
        out[pos] = by_model[vocab.base][rows[vocab.base][pos]]
    for i, src in configured.items():
        out[i] = 0 if src.kind == "zero" else by_model[src.model][src.row]
    return out
