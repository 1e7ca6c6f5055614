"""`modules:` recipes on multi-module models (a VLM's text decoder, vision tower and projector; T5's
and Whisper's encoder and decoder): each module with its own slices, parameters and method. Tiny
real models are built here; every output is loaded with `from_pretrained` and every tensor is
compared with a per-tensor computation of its own (exact copies, float64 linear, float64 TIES).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from helpers import read_model, write_yaml
from merge_engine.config import load_config, parse_config
from merge_engine.errors import ConfigError
from merge_engine.options import MergeOptions
from merge_engine.plan import build_plan
from merge_engine.resident import ResidentMerger
from merge_engine.streaming import run_merge
from test_architectures import FAMILIES, _build, _load, _ref_ties
from test_errors import fails


def _family(root: Path, name: str, **override) -> dict:
    cls_name, kwargs = FAMILIES[name]
    kwargs = {**kwargs, **override}
    base = _build(cls_name, kwargs, root / "base", seed=0)
    return {
        "cls": cls_name, "root": root, "base": base,
        "a": _build(cls_name, kwargs, root / "a", seed=1, base=base),
        "b": _build(cls_name, kwargs, root / "b", seed=2, base=base),
    }


@pytest.fixture(scope="module")
def qwen2_vl(tmp_path_factory):
    # rotary sections that fit the tiny head (the default's are for 128-wide heads), so that the
    # model runs text
    text = dict(FAMILIES["qwen2_vl"][1]["text_config"], rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0})
    return _family(tmp_path_factory.mktemp("qwen2_vl"), "qwen2_vl", text_config=text)


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    return _family(tmp_path_factory.mktemp("t5"), "t5")


@pytest.fixture(scope="module")
def whisper(tmp_path_factory):
    return _family(tmp_path_factory.mktemp("whisper"), "whisper")


def _merge(fam: dict, text: str, name: str) -> Path:
    config, source = load_config(write_yaml(fam["root"] / f"{name}.yml", text))
    out = fam["root"] / name
    run_merge(config, out, MergeOptions(quiet=True), config_text=source)
    return out


def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def _vlm_recipe(f: dict) -> str:
    return f"""\
merge_method: linear
base_model: {f['base']}
dtype: float32
modules:
  text_decoder:
    slices:
      - sources:
          - {{model: {f['a']}, layer_range: [0, 2], parameters: {{weight: 0.3}}}}
          - {{model: {f['b']}, layer_range: [0, 2], parameters: {{weight: 0.7}}}}
      - sources:
          - {{model: {f['b']}, layer_range: [1, 2], parameters: {{weight: 1.0}}}}
  vision_tower:
    merge_method: ties
    models:
      - {{model: {f['a']}, parameters: {{weight: 0.6}}}}
      - {{model: {f['b']}, parameters: {{weight: 0.4}}}}
    parameters: {{density: 0.7}}
  multi_modal_projector:
    merge_method: passthrough
    models: [{{model: {f['b']}}}]
"""


def _vlm_expected(f: dict) -> dict[str, torch.Tensor]:
    """Per checkpoint tensor, from Qwen2-VL's saved names: `visual.merger.*` is the projector (a copy
    of b), the rest of `visual.*` the vision tower (TIES over the base), everything else the text
    model: layers 0-1 linear 0.3 a + 0.7 b with the embedding, layer 2 = b's layer 1, and the final
    norm (and head) from the last slice, b."""
    ta, tb, base = read_model(f["a"]), read_model(f["b"]), read_model(f["base"])
    out = {}
    for k in base:
        if k.startswith("visual.merger."):
            out[k] = tb[k]
        elif k.startswith("visual."):
            out[k] = _ref_ties(base[k], [ta[k], tb[k]], [0.6, 0.4], 0.7)
        elif k.startswith("model.layers."):
            i, rest = k[len("model.layers.") :].split(".", 1)
            out[k] = (0.3 * ta[k].double() + 0.7 * tb[k].double()).float()
            if i == "1":
                out[f"model.layers.2.{rest}"] = tb[k]
        elif k.startswith("model.embed_tokens."):
            out[k] = (0.3 * ta[k].double() + 0.7 * tb[k].double()).float()
        else:
            assert k in ("model.norm.weight", "lm_head.weight"), k
            out[k] = tb[k]
    return out


def _cut_two_plus_one(expected: dict, ta: dict, tb: dict, stack: str, k: str, b_block: int) -> bool:
    """Expected tensors of a 2-block stack cut as a's blocks 0-1 then b's block `b_block`: for a
    checkpoint name `k` inside the stack, set what it contributes and return True."""
    if not k.startswith(stack + "."):
        return False
    i, rest = k[len(stack) + 1 :].split(".", 1)
    expected[k] = ta[k]
    if int(i) == b_block:
        expected[f"{stack}.2.{rest}"] = tb[k]
    return True


def test_vlm_modules_recipe(qwen2_vl):
    """A different method per module: linear text decoder cut into slices (3 layers out of 2),
    TIES vision tower, projector copied from one model (no base appended to a passthrough)."""
    f = qwen2_vl
    out = _merge(f, _vlm_recipe(f), "modules")
    model = _load(f["cls"], out)  # no missing, unexpected or mis-shaped weight
    assert len(model.model.language_model.layers) == 3 and len(model.model.visual.blocks) == 3
    cfg = _config(out)
    assert cfg["text_config"]["num_hidden_layers"] == 3
    assert cfg["vision_config"]["depth"] == 3  # the vision tower was not cut
    assert len(cfg["text_config"]["layer_types"]) == 3
    card = (out / "README.md").read_text()
    assert "Modules with a method of their own: `vision_tower`: TIES, `multi_modal_projector`: Passthrough." in card
    merged, expected = read_model(out), _vlm_expected(f)
    assert set(merged) == set(expected)
    for k, t in merged.items():
        if k.startswith("visual.merger.") or k.startswith("model.layers.2.") or k == "model.norm.weight":
            assert torch.equal(t, expected[k]), k
        else:
            torch.testing.assert_close(t, expected[k], rtol=2e-6, atol=1e-7, msg=k)


def test_vlm_modules_in_the_resident_executor(qwen2_vl):
    """The search path builds the class the architecture names (Qwen2-VL's
    ForConditionalGeneration, not a CausalLM) and merges into it what mergekit-yaml writes."""
    f = qwen2_vl
    config = parse_config(yaml.safe_load(_vlm_recipe(f)))
    merger = ResidentMerger(config, MergeOptions(quiet=True, device="cpu"))
    try:
        model = merger.build_model(config, dtype=torch.float32)
        assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
        merger.apply(config)
        out = f["root"] / "modules"
        streamed = _load(f["cls"], out if out.exists() else _merge(f, _vlm_recipe(f), "modules"))
        live, written = model.state_dict(), streamed.state_dict()
        assert set(live) == set(written)
        for k in written:
            assert torch.equal(live[k], written[k]), k
        logits = model(input_ids=torch.tensor([[3, 4, 5]])).logits
        assert logits.shape == (1, 3, 96)  # the language part runs text as a CausalLM would
    finally:
        merger.close()


def _t5_encoder_cut(f: dict, shared: Path) -> str:
    """T5 encoder blocks [0, 2) of a then [1, 2) of b, the decoder from b, `shared` stated."""
    return f"""\
merge_method: passthrough
modules:
  encoder:
    slices:
      - sources: [{{model: {f['a']}, layer_range: [0, 2]}}]
      - sources: [{{model: {f['b']}, layer_range: [1, 2]}}]
  decoder: {{models: [{{model: {f['b']}}}]}}
  shared: {{models: [{{model: {shared}}}]}}
"""


def test_t5_encoder_cut_per_stack(t5):
    """T5: encoder layers [0, 2) of a then [1, 2) of b; decoder and shared embedding stated. The
    decoder keeps its 3 layers although only num_layers (the encoder's key) changes."""
    f = t5
    out = _merge(f, _t5_encoder_cut(f, shared=f["a"]), "t5_modules")
    model = _load(f["cls"], out)
    assert len(model.encoder.block) == 3 and len(model.decoder.block) == 3
    cfg = _config(out)
    assert cfg["num_layers"] == 3 and cfg["num_decoder_layers"] == 3
    ta, tb, merged = read_model(f["a"]), read_model(f["b"]), read_model(out)
    expected = {}
    for k in ta:
        if _cut_two_plus_one(expected, ta, tb, "encoder.block", k, b_block=1):
            pass
        elif k.startswith("encoder."):  # final norm: after the stack, from the last slice
            expected[k] = tb[k]
        elif k.startswith("decoder.") or k == "lm_head.weight":
            expected[k] = tb[k]
        else:
            assert k == "shared.weight", k
            expected[k] = ta[k]
    assert set(merged) == set(expected)
    for k, t in merged.items():
        assert torch.equal(t, expected[k]), k
    # the loaded model ties both stacks' embeddings to the shared one it was given
    assert torch.equal(model.encoder.embed_tokens.weight, ta["shared.weight"])


def test_t5_config_without_decoder_count(tmp_path):
    """A T5 config.json without num_decoder_layers (the decoder then has num_layers blocks): cutting
    the encoder writes the decoder's count too, so the decoder is not cut with it."""
    cls_name, kwargs = FAMILIES["t5"]
    kwargs = dict(kwargs, num_decoder_layers=2)
    paths = {}
    for seed, name in ((1, "a"), (2, "b")):
        d = _build(cls_name, kwargs, tmp_path / name, seed=seed)
        cfg = _config(d)
        del cfg["num_decoder_layers"]
        (d / "config.json").write_text(json.dumps(cfg))
        paths[name] = d
    f = {"root": tmp_path, **paths}
    out = _merge(f, _t5_encoder_cut(f, shared=f["b"]), "t5_nokey")
    cfg = _config(out)
    assert cfg["num_layers"] == 3 and cfg["num_decoder_layers"] == 2
    model = _load(cls_name, out)
    assert len(model.encoder.block) == 3 and len(model.decoder.block) == 2
    tb, merged = read_model(f["b"]), read_model(out)
    for k in tb:
        if k.startswith("decoder."):
            assert torch.equal(merged[k], tb[k]), k


def test_whisper_modules(whisper):
    """Whisper: the encoder cut from two models, the decoder merged linearly (a module's own method
    under a passthrough recipe)."""
    f = whisper
    out = _merge(f, f"""\
merge_method: passthrough
dtype: float32
modules:
  encoder:
    slices:
      - sources: [{{model: {f['a']}, layer_range: [0, 2]}}]
      - sources: [{{model: {f['b']}, layer_range: [0, 1]}}]
  decoder:
    merge_method: linear
    models:
      - {{model: {f['a']}, parameters: {{weight: 0.25}}}}
      - {{model: {f['b']}, parameters: {{weight: 0.75}}}}
""", "whisper_modules")
    model = _load(f["cls"], out)
    assert len(model.model.encoder.layers) == 3 and len(model.model.decoder.layers) == 3
    cfg = _config(out)
    assert cfg["encoder_layers"] == 3 and cfg["decoder_layers"] == 3
    ta, tb, merged = read_model(f["a"]), read_model(f["b"]), read_model(out)
    expected = {}
    for k in ta:
        if _cut_two_plus_one(expected, ta, tb, "model.encoder.layers", k, b_block=0):
            pass
        elif k.startswith("model.encoder.layer_norm."):
            expected[k] = tb[k]  # after the stack: the last slice's model
        elif k.startswith("model.encoder."):
            expected[k] = ta[k]  # conv, positions: the first slice's model
        else:
            expected[k] = (0.25 * ta[k].double() + 0.75 * tb[k].double()).float()
    assert set(merged) == set(expected)
    for k, t in merged.items():
        if k.startswith("model.encoder."):
            assert torch.equal(t, expected[k]), k
        else:
            torch.testing.assert_close(t, expected[k], rtol=2e-6, atol=1e-7, msg=k)


def test_t5_in_the_resident_executor(t5):
    f = t5
    text = f"""\
merge_method: linear
modules:
  encoder:
    models: [{{model: {f['a']}, parameters: {{weight: 0.5}}}}, {{model: {f['b']}, parameters: {{weight: 0.5}}}}]
  decoder:
    merge_method: passthrough
    models: [{{model: {f['b']}}}]
  shared:
    merge_method: passthrough
    models: [{{model: {f['a']}}}]
"""
    config = parse_config(yaml.safe_load(text))
    merger = ResidentMerger(config, MergeOptions(quiet=True, device="cpu"))
    try:
        model = merger.build_model(config, dtype=torch.float32)
        assert type(model).__name__ == "T5ForConditionalGeneration"
        merger.apply(config)
        live = model.state_dict()
        ta, tb = read_model(f["a"]), read_model(f["b"])
        for k in ta:
            if k.startswith("encoder.block.") or k.startswith("encoder.final"):
                torch.testing.assert_close(live[k], (0.5 * ta[k].double() + 0.5 * tb[k].double()).float(), rtol=2e-6, atol=1e-7)
            elif k.startswith("decoder."):
                assert torch.equal(live[k], tb[k]), k
        assert torch.equal(live["shared.weight"], ta["shared.weight"])
    finally:
        merger.close()


# ----------------------------------------------------------------------------------------------
# stated sources and bad input


def _plan_error(text: str) -> str:
    with pytest.raises(ConfigError) as err:
        build_plan(parse_config(yaml.safe_load(text)))
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_unknown_and_missing_modules(qwen2_vl):
    f = qwen2_vl
    msg = _plan_error(f"""\
merge_method: passthrough
modules:
  text_decoder: {{models: [{{model: {f['a']}}}]}}
  vision: {{models: [{{model: {f['a']}}}]}}
""")
    assert msg == "modules.vision: unknown module; this model's modules are vision_tower, multi_modal_projector, text_decoder"
    msg = _plan_error(f"merge_method: passthrough\nmodules:\n  text_decoder: {{models: [{{model: {f['a']}}}]}}\n")
    assert msg.startswith("modules: vision_tower, multi_modal_projector not given;"), msg
    msg = _plan_error(f"""\
merge_method: passthrough
modules:
  text_decoder: {{models: [{{model: {f['a']}}}]}}
  vision_tower: {{models: [{{model: {f['a']}}}]}}
  multi_modal_projector: {{slices: [{{sources: [{{model: {f['a']}, layer_range: [0, 1]}}]}}]}}
""")
    assert msg == "modules.multi_modal_projector.slices: module multi_modal_projector has no stack of layers to slice; give it `models:`"
    msg = _plan_error(f"""\
merge_method: passthrough
modules:
  text_decoder: {{models: [{{model: {f['a']}}}]}}
  vision_tower: {{merge_method: ties, models: [{{model: {f['a']}}}]}}
  multi_modal_projector: {{models: [{{model: {f['a']}}}]}}
""")
    assert msg == "modules.vision_tower.merge_method ties needs base_model"
    msg = _plan_error(f"""\
merge_method: passthrough
modules:
  text_decoder: {{slices: [{{sources: [{{model: {f['a']}, layer_range: [0, 3]}}]}}]}}
  vision_tower: {{slices: [{{sources: [{{model: {f['a']}, layer_range: [0, 3]}}]}}]}}
  multi_modal_projector: {{models: [{{model: {f['a']}}}]}}
""")
    assert msg.startswith("modules.text_decoder.slices[0].sources[0].layer_range: [0, 3] is beyond model"), msg


@pytest.mark.slow
def test_unknown_module_on_the_command_line(qwen2_vl, tmp_path):
    f = qwen2_vl
    fails(tmp_path, f"merge_method: passthrough\nmodules:\n  language_model: {{models: [{{model: {f['a']}}}]}}\n",
          "modules.language_model: unknown module", "vision_tower, multi_modal_projector, text_decoder")


def test_vision_model_is_another_name_for_the_vision_tower(qwen2_vl):
    f = qwen2_vl
    text = f"""\
merge_method: passthrough
modules:
  text_decoder: {{models: [{{model: {f['a']}}}]}}
  vision_model: {{models: [{{model: {f['b']}}}]}}
  multi_modal_projector: {{models: [{{model: {f['a']}}}]}}
"""
    plan = build_plan(parse_config(yaml.safe_load(text)))
    try:
        sources = {t.out.name: str(t.inputs[0].model) for t in plan.tasks}
    finally:
        plan.close()
    assert sources["visual.blocks.0.norm1.weight"] == str(f["b"])
    assert sources["visual.merger.ln_q.weight"] == sources["model.layers.0.mlp.up_proj.weight"] == str(f["a"])


def test_slices_on_a_vlm_state_where_the_other_modules_come_from(qwen2_vl, caplog):
    """A plain `slices:` recipe cuts the text decoder; the log says where the vision tower and the
    projector come from (the first slice's models), and they are exactly those."""
    f = qwen2_vl
    text = f"""\
merge_method: passthrough
slices:
  - sources: [{{model: {f['b']}, layer_range: [0, 2]}}]
  - sources: [{{model: {f['a']}, layer_range: [1, 2]}}]
"""
    with caplog.at_level(logging.WARNING, logger="merge_engine.plan"):
        plan = build_plan(parse_config(yaml.safe_load(text)))
    try:
        sources = {t.out.name: str(t.inputs[0].model) for t in plan.tasks}
        assert plan.out_config["text_config"]["num_hidden_layers"] == 3
    finally:
        plan.close()
    assert (
        f"slices cut the text_decoder module; vision_tower, multi_modal_projector come from the first slice's models ({f['b']})"
        in caplog.text
    )
    assert {sources[k] for k in sources if k.startswith("visual.")} == {str(f["b"])}
    assert sources["model.layers.2.mlp.up_proj.weight"] == sources["model.norm.weight"] == str(f["a"])


# Every VLM family: (the vision module's name, its stack in the loaded model, projector prefixes),
# written out here by hand from the transformers module trees, independently of the engine's split.
VLMS = {
    "gemma3vl": ("vision_tower", "model.vision_tower.encoder.layers", ("model.multi_modal_projector.",)),
    "llama4": ("vision_model", "vision_model.model.layers", ("multi_modal_projector.",)),
    "mistral3": ("vision_tower", "model.vision_tower.transformer.layers", ("model.multi_modal_projector.",)),
    "qwen2_vl": ("vision_tower", "model.visual.blocks", ("model.visual.merger.",)),
    "qwen2_5_vl": ("vision_tower", "model.visual.blocks", ("model.visual.merger.",)),
    "qwen3_vl": ("vision_tower", "model.visual.blocks", ("model.visual.merger.",)),
    "qwen3_vl_moe": ("vision_tower", "model.visual.blocks", ("model.visual.merger.",)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(VLMS))
def test_vision_tower_cut(name, tmp_path):
    """Every VLM family: the vision tower cut from two models (3 + 2 blocks), the text decoder
    merged linearly, the projector copied; loads, and every tensor is what it should be."""
    vision, stack, projector = VLMS[name]
    f = _family(tmp_path, name)
    out = _merge(f, f"""\
merge_method: linear
dtype: float32
modules:
  {vision}:
    merge_method: passthrough
    slices:
      - sources: [{{model: {f['a']}, layer_range: [0, 3]}}]
      - sources: [{{model: {f['b']}, layer_range: [1, 3]}}]
  multi_modal_projector:
    merge_method: passthrough
    models: [{{model: {f['b']}}}]
  text_decoder:
    models:
      - {{model: {f['a']}, parameters: {{weight: 0.3}}}}
      - {{model: {f['b']}, parameters: {{weight: 0.7}}}}
""", "vision_cut")
    model = _load(f["cls"], out)
    merged = model.state_dict()
    sa, sb = _load(f["cls"], f["a"]).state_dict(), _load(f["cls"], f["b"]).state_dict()
    vision_root = stack.split(".")[0] if not stack.startswith("model.") else ".".join(stack.split(".")[:2])
    keys = list(sa)
    first = next(i for i, k in enumerate(keys) if k.startswith(stack + "."))
    expected = {}
    for k in merged:
        if k.startswith(stack + "."):
            j, rest = k[len(stack) + 1 :].split(".", 1)
            j = int(j)
            expected[k] = sa[k] if j < 3 else sb[f"{stack}.{j - 2}.{rest}"]
        elif k.startswith(projector):
            expected[k] = sb[k]
        elif k.startswith(vision_root + "."):
            expected[k] = sa[k] if keys.index(k) < first else sb[k]
        else:
            expected[k] = (0.3 * sa[k].double() + 0.7 * sb[k].double()).float()
    for k, t in merged.items():
        if k.startswith(vision_root + ".") or k.startswith(projector):
            assert torch.equal(t, expected[k]), k
        else:
            torch.testing.assert_close(t, expected[k], rtol=2e-6, atol=1e-7, msg=k)
    assert len(model.get_submodule(stack)) == 5


def text_logit(model, tokenizer) -> dict:
    """A text-only score of a VLM's language part (a `python` evaluator for the worker test)."""
    return {"logit": float(model(input_ids=torch.tensor([[3, 4, 5]])).logits[0, -1, 7])}


def test_search_worker_scores_a_vlm_text_part(qwen2_vl):
    """A search worker on a VLM recipe: the resident model is Qwen2-VL's own class, and a text score
    of each candidate equals the score of the model mergekit-yaml writes for that candidate."""
    from evaluators.worker import CandidateWorker, WorkerSettings
    from helpers import _tokenizer_dir

    f = qwen2_vl
    for p in _tokenizer_dir().iterdir():  # the worker runs the donor's tokenizer
        shutil.copy(p, f["base"] / p.name)
    recipe = yaml.safe_load(_vlm_recipe(f))
    w = CandidateWorker(WorkerSettings(
        template_recipe=recipe,
        evaluator={"kind": "python", "function": "test_modules:text_logit", "directions": {"logit": "maximize"}},
        merge_options=MergeOptions(device="cpu", quiet=True),
    ))
    assert type(w.model).__name__ == "Qwen2VLForConditionalGeneration"
    recipe["modules"]["text_decoder"]["slices"][0]["sources"][0]["parameters"]["weight"] = 0.9
    result = w.evaluate(recipe)
    assert result["status"] == "complete", result
    out = _merge(f, yaml.safe_dump(recipe), "worker_candidate")
    with torch.no_grad():
        expected = text_logit(_load(f["cls"], out), None)["logit"]
    assert result["metrics"]["logit"] == pytest.approx(expected, rel=1e-6, abs=1e-7)


def test_t5_cut_not_starting_at_block_0_is_refused(t5):
    """Only block 0 of a T5 stack holds the relative position bias: a cut whose first output block
    is another block would silently lack it, so planning names the tensor and the fix."""
    f = t5
    recipe = _t5_encoder_cut(f, shared=f["a"]).replace(
        f"[{{model: {f['a']}, layer_range: [0, 2]}}]", f"[{{model: {f['a']}, layer_range: [1, 2]}}]"
    )
    assert "layer_range: [1, 2]}]\n      - sources" in recipe
    with pytest.raises(ConfigError, match=r"modules\.encoder\.slices\[0\]\.sources\[0\]\.layer_range: .*lacks "
                                          r"encoder\.block\.0\.layer\.0\.SelfAttention\.relative_attention_bias\.weight"):
        _merge(f, recipe, "t5_bad_start")
    assert not (f["root"] / "t5_bad_start").exists()
