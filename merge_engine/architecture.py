"""Which tensors a model has: pre-layer weights, per-layer templates, post-layer weights.

Known decoder families come from a table written against transformers 5.x state-dict names; any
other decoder-only model is described by inference from its tensor names (`.layers.N.` patterns).
Nothing here imports torch.
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass, field
from typing import Iterable, Optional

log = logging.getLogger(__name__)

LAYER = "{layer}"  # placeholder for the layer index in layer templates


@dataclass(frozen=True)
class WeightInfo:
    name: str
    is_embed: bool = False  # vocabulary-indexed matrix (embeddings, LM head)
    optional: bool = False
    aliases: tuple[str, ...] = ()  # other names the same tensor has in older checkpoints
    tied_names: tuple[str, ...] = ()  # read these when the tensor itself is absent (tied LM head)

    def for_layer(self, index: int) -> "WeightInfo":
        return WeightInfo(
            self.name.replace(LAYER, str(index)),
            self.is_embed,
            self.optional,
            tuple(a.replace(LAYER, str(index)) for a in self.aliases),
            tuple(t.replace(LAYER, str(index)) for t in self.tied_names),
        )

    @property
    def all_names(self) -> tuple[str, ...]:
        return (self.name,) + self.aliases


@dataclass(frozen=True)
class ArchitectureInfo:
    name: str
    pre_weights: tuple[WeightInfo, ...]
    layer_templates: tuple[WeightInfo, ...]
    post_weights: tuple[WeightInfo, ...]
    num_layers_key: Optional[str]  # dotted path in config.json, e.g. "num_hidden_layers"
    inferred: bool = False
    # Non-weight buffers some old checkpoints carry; never merged, never reported as unknown.
    ignored_patterns: tuple[str, ...] = field(default=())

    def layer_weights(self, index: int) -> list[WeightInfo]:
        return list(_layer_weights(self.layer_templates, index))

    def all_weights(self, num_layers: int) -> list[WeightInfo]:
        out = list(self.pre_weights)
        for i in range(num_layers):
            out.extend(self.layer_weights(i))
        out.extend(self.post_weights)
        return out

    def is_ignored(self, tensor_name: str) -> bool:
        return any(re.search(p, tensor_name) for p in self.ignored_patterns)


@functools.lru_cache(maxsize=8192)
def _layer_weights(templates: tuple[WeightInfo, ...], index: int) -> tuple[WeightInfo, ...]:
    # planned again for every search candidate: the names of a layer are built once
    return tuple(w.for_layer(index) for w in templates)


def get_config_value(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def set_config_value(config: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    node = config
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


# ----------------------------------------------------------------------------------------------
# Known families

_COMMON_IGNORED = (r"rotary_emb\.inv_freq$",)


def _lm_head(tied_to: str, aliases: tuple[str, ...] = ()) -> WeightInfo:
    # Optional everywhere: a checkpoint saved with tied embeddings has no lm_head, and then the
    # embedding matrix stands in for it (docs/mergekit-reference.md §3).
    return WeightInfo("lm_head.weight", is_embed=True, optional=True, aliases=aliases, tied_names=(tied_to,))


def _decoder(
    name: str,
    layer_suffixes: Iterable[str],
    *,
    optional_suffixes: Iterable[str] = (),
    final_norm: Iterable[str] = ("model.norm.weight",),
) -> ArchitectureInfo:
    layers = [WeightInfo(f"model.layers.{LAYER}.{s}") for s in layer_suffixes]
    layers += [WeightInfo(f"model.layers.{LAYER}.{s}", optional=True) for s in optional_suffixes]
    return ArchitectureInfo(
        name=name,
        pre_weights=(WeightInfo("model.embed_tokens.weight", is_embed=True),),
        layer_templates=tuple(layers),
        post_weights=tuple(WeightInfo(n) for n in final_norm) + (_lm_head("model.embed_tokens.weight"),),
        num_layers_key="num_hidden_layers",
        ignored_patterns=_COMMON_IGNORED,
    )


_ATTN = ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight"]
_QKV_BIAS = ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"]
_MLP = ["mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"]
_NORMS = ["input_layernorm.weight", "post_attention_layernorm.weight"]
_QK_NORM = ["self_attn.q_norm.weight", "self_attn.k_norm.weight"]
_FF_NORMS = ["pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight"]

_LLAMA_LIKE = _ATTN + _MLP + _NORMS

_GPT2_LAYER = [
    "ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
    "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
    "mlp.c_proj.weight", "mlp.c_proj.bias",
]
_NEOX_LAYER = [
    "input_layernorm.weight", "input_layernorm.bias", "post_attention_layernorm.weight",
    "post_attention_layernorm.bias", "attention.query_key_value.weight",
    "attention.query_key_value.bias", "attention.dense.weight", "attention.dense.bias",
    "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias", "mlp.dense_4h_to_h.weight",
    "mlp.dense_4h_to_h.bias",
]


def _gpt2() -> ArchitectureInfo:
    # Older GPT-2 checkpoints store names without the "transformer." prefix.
    def w(n: str, **kw) -> WeightInfo:
        return WeightInfo(f"transformer.{n}", aliases=(n,), **kw)

    return ArchitectureInfo(
        name="gpt2",
        pre_weights=(w("wte.weight", is_embed=True), w("wpe.weight")),
        layer_templates=tuple(w(f"h.{LAYER}.{s}") for s in _GPT2_LAYER),
        post_weights=(w("ln_f.weight"), w("ln_f.bias"), _lm_head("transformer.wte.weight", aliases=())),
        num_layers_key="n_layer",
        ignored_patterns=(r"\.attn\.bias$", r"\.attn\.masked_bias$"),
    )


def _gpt_neox() -> ArchitectureInfo:
    return ArchitectureInfo(
        name="gpt_neox",
        pre_weights=(WeightInfo("gpt_neox.embed_in.weight", is_embed=True),),
        layer_templates=tuple(WeightInfo(f"gpt_neox.layers.{LAYER}.{s}") for s in _NEOX_LAYER),
        post_weights=(
            WeightInfo("gpt_neox.final_layer_norm.weight"),
            WeightInfo("gpt_neox.final_layer_norm.bias"),
            # transformers 5 keeps the checkpoint name embed_out (lm_head in memory)
            WeightInfo("embed_out.weight", is_embed=True, optional=True, aliases=("lm_head.weight",), tied_names=("gpt_neox.embed_in.weight",)),
        ),
        num_layers_key="num_hidden_layers",
        ignored_patterns=_COMMON_IGNORED + (r"\.attention\.bias$", r"\.attention\.masked_bias$"),
    )


_STABLELM_NORMS = ["input_layernorm.weight", "input_layernorm.bias", "post_attention_layernorm.weight", "post_attention_layernorm.bias"]
_STARCODER2_LAYER = (
    _ATTN + _QKV_BIAS + ["self_attn.o_proj.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias"]
    + _STABLELM_NORMS
)

# Keyed by the class name in config.json "architectures".
KNOWN_ARCHITECTURES: dict[str, ArchitectureInfo] = {
    "LlamaForCausalLM": _decoder("llama", _LLAMA_LIKE),
    "MistralForCausalLM": _decoder("mistral", _LLAMA_LIKE),
    "Qwen2ForCausalLM": _decoder("qwen2", _ATTN + _QKV_BIAS + _MLP + _NORMS),
    "Qwen3ForCausalLM": _decoder("qwen3", _ATTN + _QK_NORM + _MLP + _NORMS),
    "GemmaForCausalLM": _decoder("gemma", _LLAMA_LIKE),
    "Gemma2ForCausalLM": _decoder("gemma2", _LLAMA_LIKE + _FF_NORMS),
    "Gemma3ForCausalLM": _decoder("gemma3_text", _ATTN + _QK_NORM + _MLP + _NORMS + _FF_NORMS),
    "Phi3ForCausalLM": _decoder(
        "phi3",
        ["self_attn.qkv_proj.weight", "self_attn.o_proj.weight", "mlp.gate_up_proj.weight", "mlp.down_proj.weight"] + _NORMS,
    ),
    "GPT2LMHeadModel": _gpt2(),
    "GPTNeoXForCausalLM": _gpt_neox(),
    "StableLmForCausalLM": _decoder(
        "stablelm",
        _ATTN + _MLP + _STABLELM_NORMS,
        optional_suffixes=_QKV_BIAS,
        final_norm=("model.norm.weight", "model.norm.bias"),
    ),
    "Starcoder2ForCausalLM": _decoder(
        "starcoder2", _STARCODER2_LAYER, final_norm=("model.norm.weight", "model.norm.bias")
    ),
    "Olmo2ForCausalLM": _decoder(
        "olmo2", _ATTN + _QK_NORM + _MLP + ["post_attention_layernorm.weight", "post_feedforward_layernorm.weight"]
    ),
    "GraniteForCausalLM": _decoder("granite", _LLAMA_LIKE),
    "CohereForCausalLM": _decoder(
        "cohere", _ATTN + _MLP + ["input_layernorm.weight"], optional_suffixes=_QK_NORM
    ),
}
KNOWN_ARCHITECTURES["LLaMaForCausalLM"] = KNOWN_ARCHITECTURES["LlamaForCausalLM"]


def architecture_class(config: dict) -> Optional[str]:
    archs = config.get("architectures") or []
    return archs[0] if len(archs) == 1 else None


def known_architecture(config: dict) -> Optional[ArchitectureInfo]:
    cls = architecture_class(config)
    return KNOWN_ARCHITECTURES.get(cls) if cls else None


# ----------------------------------------------------------------------------------------------
# Inference from tensor names

_LAYER_INDEX = re.compile(r"\.(\d+)\.")
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "text_config.num_hidden_layers")


def _is_embed_name(name: str) -> bool:
    return any(k in name for k in ("embed_tokens", "wte.", "embed_in", "word_embeddings", "lm_head", "embed_out"))


def infer_architecture(
    reference_names: Iterable[str], all_model_names: list[set[str]], reference_config: dict
) -> ArchitectureInfo:
    """Describe a decoder from its tensor names: the most common `<prefix>.N.` stack is the layer
    stack; other names are pre-layer (embeddings) or post-layer weights."""
    names = list(reference_names)
    by_prefix: dict[str, int] = {}
    for n in names:
        m = _LAYER_INDEX.search(n)
        if m:
            by_prefix[n[: m.start()]] = by_prefix.get(n[: m.start()], 0) + 1
    if not by_prefix:
        raise ValueError("no layer stack found in the tensor names (no '.N.' pattern)")
    layer_prefix = max(by_prefix, key=lambda p: by_prefix[p])

    def present_everywhere(n: str) -> bool:
        return all(n in s for s in all_model_names)

    embed_names = [n for n in names if _is_embed_name(n) and "lm_head" not in n and "embed_out" not in n]
    templates: dict[str, None] = {}
    pre, post = [], []
    for n in names:
        m = _LAYER_INDEX.search(n)
        if m and n[: m.start()] == layer_prefix:
            templates[n[: m.start()] + f".{LAYER}." + n[m.end() :]] = None
            continue
        tied = ()
        if ("lm_head" in n or "embed_out" in n) and embed_names:
            tied = (embed_names[0],)
        info = WeightInfo(n, is_embed=_is_embed_name(n), optional=not present_everywhere(n) or bool(tied), tied_names=tied)
        (pre if any(k in n for k in ("embed", "wte", "wpe")) and not tied else post).append(info)
    layer_templates = []
    for tpl in templates:
        optional = not all(
            all(tpl.replace(LAYER, str(i)) in s for i in range(count_layers(s, layer_prefix)))
            for s in all_model_names
        )
        layer_templates.append(WeightInfo(tpl, optional=optional))
    count = count_layers(set(names), layer_prefix)
    key = next((k for k in _LAYER_COUNT_KEYS if get_config_value(reference_config, k) == count), None)
    return ArchitectureInfo(
        name=f"inferred({layer_prefix})",
        pre_weights=tuple(pre),
        layer_templates=tuple(layer_templates),
        post_weights=tuple(post),
        num_layers_key=key,
        inferred=True,
        ignored_patterns=_COMMON_IGNORED,
    )


def count_layers(names: Iterable[str], layer_prefix: str) -> int:
    indices = set()
    for n in names:
        m = _LAYER_INDEX.search(n)
        if m and n[: m.start()] == layer_prefix:
            indices.add(int(m.group(1)))
    return max(indices) + 1 if indices else 0


def layer_prefix_of(arch: ArchitectureInfo) -> str:
    tpl = arch.layer_templates[0].name
    return tpl[: tpl.index(f".{LAYER}.")]
