"""Every architecture family mergekit 0.1.5 ships a definition for, where transformers 5 has the
class: a tiny random model is built here, two perturbations of it are merged with `linear`, `ties`
(with the base) and a `slices` passthrough, the output is loaded with `from_pretrained`, and every
tensor is compared with a computation of its own (in memory, through transformers' loaded
models, or per checkpoint tensor in float64).

Families mergekit describes but transformers lacks (remote-code models) are skipped with a reason.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from helpers import read_model, tiny_config, write_yaml
from merge_engine.architecture import (
    LAYER,
    derive_architectures,
    get_config_value,
    known_architecture,
    resolve_architecture,
)
from merge_engine.config import load_config
from merge_engine.options import MergeOptions
from merge_engine.plan import build_plan
from merge_engine.streaming import run_merge

REPO = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------------------------
# The families: mergekit 0.1.5's architecture definitions (one class per definition file)

_TEXT = dict(
    vocab_size=96, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1, head_dim=8, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)


def _text(**over) -> dict:
    return {**_TEXT, **over}


_BERT = dict(vocab_size=96, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64)
_ROBERTA = dict(_BERT, max_position_embeddings=66, pad_token_id=1)
_DISTILBERT = dict(vocab_size=96, dim=16, hidden_dim=32, n_layers=2, n_heads=2, max_position_embeddings=64)
_GPT2 = dict(vocab_size=96, n_embd=16, n_layer=2, n_head=2, n_positions=64)
_SIGLIP = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2, image_size=16, patch_size=8)
_QWEN_VISION = dict(depth=3, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=16, patch_size=2, spatial_merge_size=1, temporal_patch_size=1)
_QWEN_TOKENS = dict(image_token_id=90, video_token_id=91, vision_start_token_id=92)

# name (as mergekit's definition file) -> (class in config.json, tiny config kwargs)
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaForCausalLM", _text()),
    "llama-sequence-classification": ("LlamaForSequenceClassification", _text(num_labels=3)),
    "mistral": ("MistralForCausalLM", _text()),
    "mixtral": ("MixtralForCausalLM", _text(num_local_experts=3, num_experts_per_tok=2)),
    "qwen2": ("Qwen2ForCausalLM", _text()),
    "qwen3": ("Qwen3ForCausalLM", _text()),
    "qwen3_moe": ("Qwen3MoeForCausalLM", _text(num_experts=3, num_experts_per_tok=2, moe_intermediate_size=16)),
    "gemma": ("GemmaForCausalLM", _text()),
    "gemma2": ("Gemma2ForCausalLM", _text()),
    "gemma3": ("Gemma3ForCausalLM", _text()),
    "cohere": ("CohereForCausalLM", _text()),
    "cohere2": ("Cohere2ForCausalLM", _text()),
    "arcee": ("ArceeForCausalLM", _text()),
    "apertus": ("ApertusForCausalLM", _text()),
    "falcon": ("FalconForCausalLM", dict(vocab_size=96, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "glm4": ("Glm4ForCausalLM", _text()),
    "glm4moe": ("Glm4MoeForCausalLM", _text(n_routed_experts=3, num_experts_per_tok=2, moe_intermediate_size=16, first_k_dense_replace=1, n_group=1, topk_group=1)),
    "afmoe": ("AfmoeForCausalLM", _text(num_experts=3, num_experts_per_tok=2, moe_intermediate_size=16, num_dense_layers=1)),
    "gpt-neox": ("GPTNeoXForCausalLM", dict(vocab_size=96, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64)),
    "gpt2": ("GPT2LMHeadModel", _GPT2),
    "gpt2-sequence-classification": ("GPT2ForSequenceClassification", dict(_GPT2, num_labels=3, pad_token_id=0)),
    "gptbigcode": ("GPTBigCodeForCausalLM", _GPT2),
    "granite": ("GraniteForCausalLM", _text()),
    "granite4moehybrid": ("GraniteMoeHybridForCausalLM", _text(
        num_local_experts=3, num_experts_per_tok=2, shared_intermediate_size=16, mamba_n_heads=4, mamba_d_head=8,
        mamba_d_state=8, mamba_n_groups=1, mamba_d_conv=4, mamba_chunk_size=16, layer_types=["mamba", "attention"],
    )),
    "lfm2": ("Lfm2ForCausalLM", _text(layer_types=["conv", "full_attention"], block_ff_dim=32)),
    "mamba": ("MambaForCausalLM", dict(vocab_size=96, hidden_size=16, state_size=4, num_hidden_layers=2, expand=2, conv_kernel=4, time_step_rank=4, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "olmo2": ("Olmo2ForCausalLM", _text()),
    "phi2": ("PhiForCausalLM", _text()),
    "phi3": ("Phi3ForCausalLM", _text()),
    "stablelm2": ("StableLmForCausalLM", _text()),
    "starcoder2": ("Starcoder2ForCausalLM", _text()),
    "bert": ("BertModel", _BERT),
    "bert-masked-lm": ("BertForMaskedLM", _BERT),
    "bert-sequence-classification": ("BertForSequenceClassification", dict(_BERT, num_labels=3)),
    "distilbert": ("DistilBertModel", _DISTILBERT),
    "distilbert-masked-lm": ("DistilBertForMaskedLM", _DISTILBERT),
    "distilbert-sequence-classification": ("DistilBertForSequenceClassification", dict(_DISTILBERT, num_labels=3)),
    "distilbert-token-classification": ("DistilBertForTokenClassification", dict(_DISTILBERT, num_labels=3)),
    "roberta": ("RobertaModel", _ROBERTA),
    "roberta-masked-lm": ("RobertaForMaskedLM", _ROBERTA),
    "roberta-sequence-classification": ("RobertaForSequenceClassification", dict(_ROBERTA, num_labels=3)),
    "roberta-token-classification": ("RobertaForTokenClassification", dict(_ROBERTA, num_labels=3)),
    "t5": ("T5ForConditionalGeneration", dict(vocab_size=96, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=3, num_heads=2, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)),
    "whisper": ("WhisperForConditionalGeneration", dict(
        vocab_size=96, num_mel_bins=8, encoder_layers=2, decoder_layers=3, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, d_model=16, max_source_positions=16, max_target_positions=32,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, begin_suppress_tokens=None,
    )),
    "gemma3vl": ("Gemma3ForConditionalGeneration", dict(text_config=_text(), vision_config=_SIGLIP, mm_tokens_per_image=4, image_token_index=90, boi_token_index=91, eoi_token_index=92)),
    "llama4": ("Llama4ForConditionalGeneration", dict(
        text_config=_text(intermediate_size_mlp=32, num_local_experts=2, num_experts_per_tok=1, interleave_moe_layer_step=1, no_rope_layers=[1, 1], attention_chunk_size=16),
        vision_config=dict(_SIGLIP, vision_output_dim=16, projector_input_dim=16, projector_output_dim=16, rope_theta=10000),
        image_token_index=90, boi_token_index=91, eoi_token_index=92,
    )),
    "mistral3": ("Mistral3ForConditionalGeneration", dict(
        text_config=_text(model_type="mistral"), vision_config=dict(_SIGLIP, head_dim=8), image_token_index=90, spatial_merge_size=1,
    )),
    "qwen2_vl": ("Qwen2VLForConditionalGeneration", dict(
        text_config=_text(), vision_config=dict(depth=3, embed_dim=16, hidden_size=16, num_heads=2, mlp_ratio=2, patch_size=2, spatial_merge_size=1, temporal_patch_size=1), **_QWEN_TOKENS,
    )),
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", dict(text_config=_text(), vision_config=dict(_QWEN_VISION, fullatt_block_indexes=[2], window_size=8), **_QWEN_TOKENS)),
    "qwen3_vl": ("Qwen3VLForConditionalGeneration", dict(text_config=_text(), vision_config=dict(_QWEN_VISION, num_position_embeddings=16, deepstack_visual_indexes=[1]), **_QWEN_TOKENS)),
    "qwen3_vl_moe": ("Qwen3VLMoeForConditionalGeneration", dict(
        text_config=_text(num_experts=3, num_experts_per_tok=2, moe_intermediate_size=16),
        vision_config=dict(_QWEN_VISION, num_position_embeddings=16, deepstack_visual_indexes=[1]), **_QWEN_TOKENS,
    )),
}

# mergekit definitions whose class transformers 5 does not ship (remote code on the hub)
NOT_IN_TRANSFORMERS = {
    "qwen": "QWenLMHeadModel", "baichuan": "BaichuanForCausalLM", "chatglm": "ChatGLMModel",
    "exaone": "ExaoneForCausalLM", "internlm2": "InternLM2ForCausalLM", "jais": "JAISLMHeadModel",
    "phi-1": "MixFormerSequentialForCausalLM", "phi3-small": "Phi3SmallForCausalLM", "solar": "SolarForCausalLM",
    "stablelm": "StableLMEpochForCausalLM",
}

MAIN_LAYERS = 2  # text layers of every tiny model; a slices recipe makes 2 * MAIN_LAYERS of them


def _class(name: str):
    import transformers

    return getattr(transformers, name)


def _build(cls_name: str, kwargs: dict, path: Path, seed: int, base: Path | None = None) -> Path:
    cls = _class(cls_name)
    torch.manual_seed(seed)
    model = cls(cls.config_class(**kwargs))
    if base is not None:  # a stand-in fine-tune: the base's weights plus noise
        model.load_state_dict(cls.from_pretrained(base, dtype=torch.float32).state_dict())
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    name = request.param
    cls_name, kwargs = FAMILIES[name]
    root = tmp_path_factory.mktemp(name)
    base = _build(cls_name, kwargs, root / "base", seed=0)
    a = _build(cls_name, kwargs, root / "a", seed=1, base=base)
    b = _build(cls_name, kwargs, root / "b", seed=2, base=base)
    return {"name": name, "cls": cls_name, "base": base, "a": a, "b": b, "root": root}


def _merge(family: dict, recipe: str, out_name: str) -> Path:
    cfg = write_yaml(family["root"] / f"{out_name}.yml", recipe)
    config, text = load_config(cfg)
    out = family["root"] / out_name
    if not out.exists():
        run_merge(config, out, MergeOptions(quiet=True), config_text=text)
    return out


def _load(cls_name: str, path: Path):
    model, info = _class(cls_name).from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model


def _saved_names(path: Path) -> list[str]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return list(f.keys())


def _tied(model) -> dict[str, str]:
    return dict(getattr(model, "all_tied_weights_keys", {}) or {})


# ----------------------------------------------------------------------------------------------
# description


@pytest.mark.slow
def test_every_definition_is_covered_or_skipped():
    # mergekit 0.1.5 describes 61 classes (docs/architectures.md; LLaMaForCausalLM is a spelling)
    assert len(FAMILIES) + len(NOT_IN_TRANSFORMERS) == 61
    import transformers

    for name, cls in NOT_IN_TRANSFORMERS.items():
        assert not hasattr(transformers, cls), f"{name}: transformers has {cls} now: add it to FAMILIES"


@pytest.mark.parametrize("name", sorted(NOT_IN_TRANSFORMERS))
def test_families_transformers_lacks(name):
    pytest.skip(f"{NOT_IN_TRANSFORMERS[name]} ({name}) is not a transformers 5 class (remote code): tensor-name inference only")


def test_description_is_derived_and_names_what_save_pretrained_writes(family):
    """Derived, not inferred; every saved tensor is planned under its own name, none is missing,
    and the main stack is the text stack with its layer-count key."""
    config = json.loads((family["base"] / "config.json").read_text())
    names = _saved_names(family["base"])
    arch = resolve_architecture(config, names, [set(names)])
    assert arch.origin == "derived", arch.name
    assert arch.num_layers_key is not None
    (main,) = [s for s in arch.stacks if s.num_layers_key == arch.num_layers_key]
    assert main.num_layers == (3 if family["name"] in ("t5", "whisper") else MAIN_LAYERS)
    assert get_config_value(config, arch.num_layers_key) == main.num_layers
    plan = build_plan(load_config(write_yaml(family["root"] / "probe.yml", f"merge_method: passthrough\nmodels:\n  - model: {family['base']}\n"))[0])
    try:
        planned = [t.out.name for t in plan.tasks]
        assert [t.inputs[0].tensor_name for t in plan.tasks] == planned
        assert sorted(planned) == sorted(names)
    finally:
        plan.close()


# ----------------------------------------------------------------------------------------------
# merges, checked against computations of their own


def test_linear(family):
    out = _merge(family, f"""\
merge_method: linear
models:
  - model: {family['a']}
    parameters: {{weight: 0.3}}
  - model: {family['b']}
    parameters: {{weight: 0.7}}
dtype: float32
""", "linear")
    merged = _load(family["cls"], out).state_dict()
    sa = _load(family["cls"], family["a"]).state_dict()
    sb = _load(family["cls"], family["b"]).state_dict()
    assert set(merged) == set(sa)
    for k, t in merged.items():
        if not t.is_floating_point():
            assert torch.equal(t, sa[k]), k
            continue
        expected = (0.3 * sa[k].double() + 0.7 * sb[k].double()).float()
        torch.testing.assert_close(t, expected, rtol=2e-6, atol=1e-7, msg=k)
    assert set(_saved_names(out)) == set(_saved_names(family["a"]))


def _ref_ties(base, xs, weights, density):
    """TIES (docs/mergekit-reference.md §2): the int(density*n) largest |delta| of each model (ties to the
    lower flat index), sign election on the weighted sum, mean of the agreeing weighted deltas."""
    deltas = []
    for x in xs:
        d = x - base  # the engine's math dtype, float32
        k = int(density * d.numel())
        order = np.argsort(-d.abs().double().flatten().numpy(), kind="stable")
        mask = np.zeros(d.numel(), dtype=bool)
        mask[order[:k]] = True
        deltas.append(d.double().flatten() * torch.from_numpy(mask))
    w = torch.tensor(weights, dtype=torch.float64).view(-1, 1)
    weighted = torch.stack(deltas) * w
    majority = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).double()
    agree = (weighted.sign() == majority).double()
    divisor = (w * agree).sum(0)
    divisor[divisor == 0] = 1
    return (base.double().flatten() + (weighted * agree).sum(0) / divisor).view(base.shape).float()


def test_ties_with_base(family):
    out = _merge(family, f"""\
merge_method: ties
base_model: {family['base']}
models:
  - model: {family['a']}
    parameters: {{weight: 0.6}}
  - model: {family['b']}
    parameters: {{weight: 0.4}}
parameters:
  density: [{{filter: act_fn, value: 1.0}}, {{value: 0.7}}]  # Apertus' one-entry activation parameters
dtype: float32
""", "ties")
    _load(family["cls"], out)
    to, tb, ta, tbb = read_model(out), read_model(family["base"]), read_model(family["a"]), read_model(family["b"])
    assert set(to) == set(tb)
    for k, t in to.items():
        expected = _ref_ties(tb[k], [ta[k], tbb[k]], [0.6, 0.4], 1.0 if "act_fn" in k else 0.7)
        torch.testing.assert_close(t, expected, rtol=2e-6, atol=1e-7, msg=k)


# The slice of b after a's layers [0, 2): t5/whisper have 3 decoder layers; models whose config
# puts dense layers first (first_k_dense_replace, num_dense_layers) can only hold MoE layers after
# them, so b contributes its MoE layer only.
SLICE_OF_B = {"t5": (1, 3), "whisper": (1, 3), "afmoe": (1, 2), "glm4moe": (1, 2)}


def test_slices_passthrough(family):
    """Layers [0, 2) of a then a slice of b: the text stack grows; what comes before it is a's,
    what comes after it is b's, tied weights follow what they are tied to; exact copies."""
    start, end = SLICE_OF_B.get(family["name"], (0, MAIN_LAYERS))
    out = _merge(family, f"""\
merge_method: passthrough
slices:
  - sources: [{{model: {family['a']}, layer_range: [0, 2]}}]
  - sources: [{{model: {family['b']}, layer_range: [{start}, {end}]}}]
dtype: float32
""", "slices")
    model = _load(family["cls"], out)
    merged = model.state_dict()
    sa = _load(family["cls"], family["a"]).state_dict()
    sb = _load(family["cls"], family["b"]).state_dict()
    # the text stack: the only module list of that length in the output (other stacks: 2 or 3)
    (stack,) = [p for p, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == 2 + end - start]
    offset = start
    keys = list(merged)
    first = next(i for i, k in enumerate(keys) if k.startswith(stack + "."))
    expected = {}
    for i, k in enumerate(keys):
        if k.startswith(stack + "."):
            j, rest = k[len(stack) + 1 :].split(".", 1)
            j = int(j)
            src, idx = (sa, j) if j < 2 else (sb, j - 2 + offset)
            expected[k] = src[f"{stack}.{idx}.{rest}"]
        else:
            expected[k] = (sa if i < first else sb)[k]
    for target, source in _tied(model).items():
        expected[target] = expected[source]
    assert set(merged) == set(expected)
    for k, t in merged.items():
        assert torch.equal(t, expected[k]), k


# ----------------------------------------------------------------------------------------------
# layouts: MoE checkpoints in the fused transformers-5 layout, VLMs under transformers 4.5x names


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_moe_in_fused_layout_merges(tmp_path, name):
    """save_pretrained writes per-expert tensors (Mixtral's w1/w2/w3); mergekit-moe and mergekit
    write the fused in-memory layout ([E, 2I, H] gate_up_proj). Both are described and merged."""
    cls_name, kwargs = FAMILIES[name]
    paths = {}
    for seed in (1, 2):
        d = _build(cls_name, kwargs, tmp_path / f"saved{seed}", seed=seed)
        model = _class(cls_name).from_pretrained(d, dtype=torch.float32)
        fused = tmp_path / f"fused{seed}"
        fused.mkdir()
        (fused / "config.json").write_text((d / "config.json").read_text())
        state = {k: v.contiguous() for k, v in model.state_dict().items() if k not in _tied(model)}
        save_file(state, str(fused / "model.safetensors"), metadata={"format": "pt"})
        paths[seed] = (d, fused)
    assert any("experts.gate_up_proj" in n for n in _saved_names(paths[1][1]))
    assert not any("experts.gate_up_proj" in n for n in _saved_names(paths[1][0]))
    outs = {}
    for layout in (0, 1):
        text = f"merge_method: linear\nmodels:\n  - model: {paths[1][layout]}\n    parameters: {{weight: 0.25}}\n  - model: {paths[2][layout]}\n    parameters: {{weight: 0.75}}\n"
        config, source = load_config(write_yaml(tmp_path / f"l{layout}.yml", text))
        run_merge(config, tmp_path / f"out{layout}", MergeOptions(quiet=True), config_text=source)
        assert set(_saved_names(tmp_path / f"out{layout}")) == set(_saved_names(paths[1][layout]))
        outs[layout] = _load(cls_name, tmp_path / f"out{layout}").state_dict()
    s1 = _load(cls_name, paths[1][0]).state_dict()
    s2 = _load(cls_name, paths[2][0]).state_dict()
    for k in s1:
        expected = (0.25 * s1[k].double() + 0.75 * s2[k].double()).float()
        for layout in (0, 1):
            torch.testing.assert_close(outs[layout][k], expected, rtol=2e-6, atol=1e-7, msg=k)


def test_vlm_checkpoint_with_module_names_merges(tmp_path):
    """transformers 4.52-4.57 saved LLaVA-style VLMs under their module names
    (model.language_model.layers...); those names are aliases of today's saved names."""
    cls_name, kwargs = FAMILIES["mistral3"]
    a = _build(cls_name, kwargs, tmp_path / "a", seed=1)
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text((a / "config.json").read_text())
    model = _class(cls_name).from_pretrained(a, dtype=torch.float32)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k not in _tied(model)}
    assert any(k.startswith("model.language_model.layers.") for k in state)
    save_file(state, str(old / "model.safetensors"), metadata={"format": "pt"})
    text = f"merge_method: linear\nmodels:\n  - model: {old}\n    parameters: {{weight: 0.5}}\n  - model: {a}\n    parameters: {{weight: 0.5}}\n"
    config, source = load_config(write_yaml(tmp_path / "m.yml", text))
    run_merge(config, tmp_path / "out", MergeOptions(quiet=True), config_text=source)
    assert set(_saved_names(tmp_path / "out")) == set(_saved_names(a))
    merged, sa = _load(cls_name, tmp_path / "out").state_dict(), _load(cls_name, a).state_dict()
    for k in sa:
        assert torch.equal(merged[k], sa[k]), k  # the same model twice


# ----------------------------------------------------------------------------------------------
# the hand table the derivation replaced

_ATTN = ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight"]
_QKV_BIAS = ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"]
_MLP = ["mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"]
_NORMS = ["input_layernorm.weight", "post_attention_layernorm.weight"]
_QK_NORM = ["self_attn.q_norm.weight", "self_attn.k_norm.weight"]
_FF_NORMS = ["pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight"]
_LN = ["input_layernorm.weight", "input_layernorm.bias", "post_attention_layernorm.weight", "post_attention_layernorm.bias"]
_GPT2_LAYER = [
    "ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight", "attn.c_proj.bias",
    "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias",
]
_NEOX_LAYER = _LN + [
    "attention.query_key_value.weight", "attention.query_key_value.bias", "attention.dense.weight", "attention.dense.bias",
    "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias", "mlp.dense_4h_to_h.weight", "mlp.dense_4h_to_h.bias",
]


def _decoder(layer, final=("model.norm.weight",)):
    return ("model.embed_tokens.weight", "model.layers", layer, list(final) + ["lm_head.weight"], "num_hidden_layers")


# family (helpers.tiny_config) -> (embedding, stack, layer suffixes, post weights, layer-count key),
# as the hand-written table of earlier versions listed them for transformers 5 checkpoints
HAND_TABLE = {
    "llama": _decoder(_ATTN + _MLP + _NORMS),
    "mistral": _decoder(_ATTN + _MLP + _NORMS),
    "qwen2": _decoder(_ATTN + _QKV_BIAS + _MLP + _NORMS),
    "qwen3": _decoder(_ATTN + _QK_NORM + _MLP + _NORMS),
    "gemma": _decoder(_ATTN + _MLP + _NORMS),
    "gemma2": _decoder(_ATTN + _MLP + _NORMS + _FF_NORMS),
    "gemma3_text": _decoder(_ATTN + _QK_NORM + _MLP + _NORMS + _FF_NORMS),
    "phi3": _decoder(["self_attn.qkv_proj.weight", "self_attn.o_proj.weight", "mlp.gate_up_proj.weight", "mlp.down_proj.weight"] + _NORMS),
    "gpt2": ("transformer.wte.weight", "transformer.h", _GPT2_LAYER, ["transformer.ln_f.weight", "transformer.ln_f.bias", "lm_head.weight"], "n_layer"),
    "gpt_neox": ("gpt_neox.embed_in.weight", "gpt_neox.layers", _NEOX_LAYER, ["gpt_neox.final_layer_norm.weight", "gpt_neox.final_layer_norm.bias", "embed_out.weight"], "num_hidden_layers"),
    "stablelm": _decoder(_ATTN + _MLP + _LN, ("model.norm.weight", "model.norm.bias")),
    "starcoder2": _decoder(_ATTN + _QKV_BIAS + ["self_attn.o_proj.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias"] + _LN, ("model.norm.weight", "model.norm.bias")),
    "olmo2": _decoder(_ATTN + _QK_NORM + _MLP + ["post_attention_layernorm.weight", "post_feedforward_layernorm.weight"]),
    "granite": _decoder(_ATTN + _MLP + _NORMS),
    "cohere": _decoder(_ATTN + _MLP + ["input_layernorm.weight"]),
}


@pytest.mark.parametrize("family_name", sorted(HAND_TABLE))
def test_derived_equals_the_old_hand_table(family_name):
    """Same weights in the same places (pre, per layer, post), the LM head optional and tied to
    the embedding, the same layer-count key: the hand table is no longer needed."""
    embed, stack, layer, post, key = HAND_TABLE[family_name]
    config = tiny_config(family_name, vocab=96).to_dict()
    config["architectures"] = [_class_name(family_name)]
    arch = known_architecture(config)
    assert arch is not None and arch.origin == "derived"
    assert [w.name for w in arch.pre_weights] == [embed] + (["transformer.wpe.weight"] if family_name == "gpt2" else [])
    assert arch.pre_weights[0].is_embed and not arch.pre_weights[0].optional
    assert sorted(w.name for w in arch.layer_templates) == sorted(f"{stack}.{LAYER}.{s}" for s in layer)
    assert all(not w.optional and not w.is_embed for w in arch.layer_templates)
    assert [w.name for w in arch.post_weights] == post
    head = arch.post_weights[-1]
    assert head.is_embed and head.optional and head.tied_names == (embed,)
    assert all(not w.optional for w in arch.post_weights[:-1])
    assert arch.num_layers_key == key
    if family_name == "gpt2":  # GPT-2 checkpoints of the bare model lack the "transformer." prefix
        assert arch.pre_weights[0].aliases == ("wte.weight",)
        assert all(w.aliases == (w.name.removeprefix("transformer."),) for w in arch.layer_templates)
    if family_name == "gpt_neox":  # transformers 5 keeps the checkpoint name embed_out
        assert "lm_head.weight" in head.aliases


def _class_name(family_name: str) -> str:
    return {
        "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
        "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM",
        "gpt2": "GPT2LMHeadModel", "gpt_neox": "GPTNeoXForCausalLM", "stablelm": "StableLmForCausalLM",
        "starcoder2": "Starcoder2ForCausalLM", "olmo2": "Olmo2ForCausalLM", "granite": "GraniteForCausalLM", "cohere": "CohereForCausalLM",
    }[family_name]


def test_optional_parts_follow_the_config():
    """What the hand table marked optional (StableLM's qkv biases, Cohere's qk norms) is present
    exactly when the config asks for it."""
    for family_name, flag, names in (("stablelm", "use_qkv_bias", _QKV_BIAS), ("cohere", "use_qk_norm", _QK_NORM)):
        for value in (False, True):
            config = tiny_config(family_name, vocab=96, **{flag: value}).to_dict()
            config["architectures"] = [_class_name(family_name)]
            templates = {w.name for w in known_architecture(config).layer_templates}
            assert all((f"model.layers.{LAYER}.{n}" in templates) == value for n in names), (family_name, value)


def test_class_alias_and_unknown_classes():
    config = tiny_config("llama", vocab=96).to_dict()
    config["architectures"] = ["LLaMaForCausalLM"]
    assert known_architecture(config).origin == "derived"
    config["architectures"] = ["MyCustomForCausalLM"]
    assert known_architecture(config) is None
    # a config transformers rejects (mamba heads that do not divide the width): nothing derived
    bad = dict(FAMILIES["granite4moehybrid"][1], mamba_n_heads=7, architectures=["GraniteMoeHybridForCausalLM"])
    assert derive_architectures(bad) == ()


def test_importing_the_module_imports_neither_torch_nor_transformers():
    code = "import sys, merge_engine.architecture; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_remote_code_config_under_a_transformers_class_name_is_not_derived():
    config = tiny_config("llama", vocab=96).to_dict()
    config.update(architectures=["PhiForCausalLM"], model_type="phi-msft")
    assert known_architecture(config) is None
