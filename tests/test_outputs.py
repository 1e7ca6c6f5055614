"""What a merge writes: files, names, dtypes and numbers, through the real CLI or run_merge.

Every model here is a tiny real transformers model built on the fly (helpers.make_model); merged
outputs are read back with safetensors/torch and, where the family allows, loaded with
transformers AutoModelForCausalLM and used to generate a few tokens.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from helpers import make_model, read_model, tiny_config, write_yaml
from merge_engine.architecture import known_architecture
from merge_engine.config import load_config
from merge_engine.options import MergeOptions
from merge_engine.plan import build_plan
from merge_engine.streaming import run_merge

REPO = Path(__file__).resolve().parents[1]
_VENV_CLI = Path(sys.executable).parent / "mergekit-yaml"
MERGEKIT_YAML = str(_VENV_CLI if _VENV_CLI.exists() else REPO / ".venv" / "bin" / "mergekit-yaml")

# Families helpers.tiny_config can build (kept in step with helpers.tiny_config).
TINY_FAMILIES = {
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "gpt2",
    "gpt_neox", "stablelm", "starcoder2", "olmo2", "granite", "cohere",
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


# ----------------------------------------------------------------------------------------------
# helpers


def cli(cfg: Path, out: Path, *flags: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [MERGEKIT_YAML, str(cfg), str(out), "--quiet", *flags],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cfg.parent,
    )
    if check:
        assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def merge(tmp_path: Path, text: str, name: str = "out", **opts) -> Path:
    """Merge in-process (same code path as the CLI after option parsing)."""
    cfg = write_yaml(tmp_path / f"{name}.yml", text)
    config, source = load_config(cfg)
    out = tmp_path / name
    run_merge(config, out, MergeOptions(quiet=True, **opts), config_text=source)
    return out


def merge_cli(tmp_path: Path, text: str, *flags: str, name: str = "out") -> Path:
    cfg = write_yaml(tmp_path / f"{name}.yml", text)
    out = tmp_path / name
    cli(cfg, out, *flags)
    return out


def header_dtypes(path: Path) -> dict[str, str]:
    """tensor name -> safetensors dtype string, straight from the file header."""
    import struct

    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: v["dtype"] for k, v in header.items() if k != "__metadata__"}


def out_config(out: Path) -> dict:
    return json.loads((out / "config.json").read_text())


def load_causal_lm(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def assert_generates(path: Path, new_tokens: int = 4) -> None:
    model = load_causal_lm(path)
    model.eval()
    prompt = torch.tensor([[0, 5, 6, 7]])
    with torch.no_grad():
        logits = model(prompt).logits
        assert torch.isfinite(logits).all()
        out = model.generate(
            prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=2
        )
    assert out.shape == (1, prompt.shape[1] + new_tokens)


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def set_architecture(model_dir: Path, name: str) -> None:
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["architectures"] = [name]
    (model_dir / "config.json").write_text(json.dumps(cfg, indent=2))


def linear_yaml(*pairs, extra: str = "") -> str:
    lines = ["merge_method: linear", "models:"]
    for path, weight in pairs:
        lines += [f"  - model: {path}", f"    parameters: {{weight: {weight}}}"]
    return "\n".join(lines) + "\n" + extra


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """Two llama models with tie_word_embeddings=True (same shapes as conftest's llama_models)."""
    root = tmp_path_factory.mktemp("tied")
    cfg = tiny_config("llama", tie_word_embeddings=True)
    x = make_model(root / "tied_x", cfg, seed=11)
    y = make_model(root / "tied_y", cfg, seed=12)
    return {"x": x, "y": y}


@pytest.fixture(scope="module")
def family_pairs(tmp_path_factory):
    """family -> (model, fine-tune of it) for a few non-llama families, built on first use."""
    root = tmp_path_factory.mktemp("families")
    cache: dict[str, tuple[Path, Path]] = {}

    def get(family: str) -> tuple[Path, Path]:
        if family not in cache:
            cfg = tiny_config(family)
            a = make_model(root / f"{family}_a", cfg, seed=3)
            b = make_model(root / f"{family}_b", cfg, seed=4, base=a)
            cache[family] = (a, b)
        return cache[family]

    return get


# ----------------------------------------------------------------------------------------------
# slices, frankenmerges, gradients


@pytest.mark.slow
def test_frankenmerge_passthrough_layers_and_generation(tmp_path, llama_models):
    a, b = llama_models["a"], llama_models["b"]
    text = f"""\
merge_method: passthrough
slices:
  - sources:
      - model: {a}
        layer_range: [0, 3]
  - sources:
      - model: {b}
        layer_range: [1, 4]
"""
    out = merge_cli(tmp_path, text)
    cfg = out_config(out)
    assert cfg["num_hidden_layers"] == 6
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    ta, tb, to = read_model(a), read_model(b), read_model(out)
    origins = [(ta, 0), (ta, 1), (ta, 2), (tb, 1), (tb, 2), (tb, 3)]
    layer_names = [n for n in ta if n.startswith("model.layers.0.")]
    assert layer_names
    for out_i, (src, in_i) in enumerate(origins):
        for name in layer_names:
            out_name = name.replace("model.layers.0.", f"model.layers.{out_i}.")
            in_name = name.replace("model.layers.0.", f"model.layers.{in_i}.")
            assert torch.equal(to[out_name], src[in_name]), (out_name, in_name)
    # pre-weights come from the first slice, post-weights from the last one
    assert torch.equal(to["model.embed_tokens.weight"], ta["model.embed_tokens.weight"])
    assert torch.equal(to["model.norm.weight"], tb["model.norm.weight"])
    assert torch.equal(to["lm_head.weight"], tb["lm_head.weight"])
    # nothing else was written
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} | {
        n.replace("model.layers.0.", f"model.layers.{i}.") for i in range(6) for n in layer_names
    }
    assert set(to) == expected
    assert_generates(out)


def test_same_slice_twice_stacks_layers(tmp_path, llama_models):
    a = llama_models["a"]
    text = f"""\
merge_method: passthrough
slices:
  - sources: [{{model: {a}, layer_range: [0, 4]}}]
  - sources: [{{model: {a}, layer_range: [0, 4]}}]
"""
    out = merge(tmp_path, text)
    assert out_config(out)["num_hidden_layers"] == 8
    ta, to = read_model(a), read_model(out)
    for i in range(8):
        name = f"model.layers.{i}.mlp.down_proj.weight"
        assert torch.equal(to[name], ta[f"model.layers.{i % 4}.mlp.down_proj.weight"])


def test_gradient_restarts_in_every_slice(tmp_path, llama_models):
    """weight gradients [1, 0] / [0, 1]: t = i/(n-1) inside each slice, t = 1 for a one-layer
    slice, and pre/post weights are planned with t = 0 (docs/mergekit-reference.md §1)."""
    a, b = llama_models["a"], llama_models["b"]
    text = f"""\
merge_method: linear
slices:
  - sources:
      - model: {a}
        layer_range: [0, 3]
        parameters: {{weight: [1, 0]}}
      - model: {b}
        layer_range: [0, 3]
        parameters: {{weight: [0, 1]}}
  - sources:
      - model: {a}
        layer_range: [3, 4]
        parameters: {{weight: [1, 0]}}
      - model: {b}
        layer_range: [3, 4]
        parameters: {{weight: [0, 1]}}
"""
    out = merge(tmp_path, text)
    ta, tb, to = read_model(a), read_model(b), read_model(out)
    name = "model.layers.{}.self_attn.q_proj.weight"
    assert torch.equal(to[name.format(0)], ta[name.format(0)])  # t = 0 -> all A
    torch.testing.assert_close(to[name.format(1)], (ta[name.format(1)] + tb[name.format(1)]) / 2)  # t = 0.5
    assert torch.equal(to[name.format(2)], tb[name.format(2)])  # t = 1 -> all B
    assert torch.equal(to[name.format(3)], tb[name.format(3)])  # one-layer slice: t = 1
    for pre_post in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(to[pre_post], ta[pre_post]), pre_post  # t = 0
    assert out_config(out)["num_hidden_layers"] == 4


def test_slice_gradient_with_three_points(tmp_path, llama_models):
    a, b = llama_models["a"], llama_models["b"]
    text = f"""\
merge_method: linear
parameters:
  normalize: false
slices:
  - sources:
      - model: {a}
        layer_range: [0, 4]
        parameters: {{weight: [0, 1, 0]}}
      - model: {b}
        layer_range: [0, 4]
        parameters: {{weight: 0}}
"""
    out = merge(tmp_path, text)
    ta, to = read_model(a), read_model(out)
    name = "model.layers.{}.mlp.up_proj.weight"
    # t = 0, 1/3, 2/3, 1 -> weights 0, 2/3, 2/3, 0
    for i, w in enumerate([0.0, 2 / 3, 2 / 3, 0.0]):
        torch.testing.assert_close(to[name.format(i)], ta[name.format(i)] * w)


def test_post_weights_use_every_source_of_the_last_slice(tmp_path, llama_models):
    a, b = llama_models["a"], llama_models["b"]
    text = f"""\
merge_method: linear
parameters: {{weight: 1.0}}
slices:
  - sources:
      - {{model: {a}, layer_range: [0, 2]}}
  - sources:
      - {{model: {a}, layer_range: [2, 4]}}
      - {{model: {b}, layer_range: [2, 4]}}
"""
    out = merge(tmp_path, text)
    ta, tb, to = read_model(a), read_model(b), read_model(out)
    assert torch.equal(to["model.embed_tokens.weight"], ta["model.embed_tokens.weight"])  # first slice
    assert torch.equal(to["model.layers.0.mlp.up_proj.weight"], ta["model.layers.0.mlp.up_proj.weight"])
    for name in ("model.norm.weight", "lm_head.weight", "model.layers.3.mlp.up_proj.weight"):
        torch.testing.assert_close(to[name], (ta[name] + tb[name]) / 2)


def test_same_model_twice_in_models_counts_twice(tmp_path, llama_models):
    a, b = llama_models["a"], llama_models["b"]
    out = merge(tmp_path, linear_yaml((a, 1.0), (a, 1.0), (b, 2.0)))
    ta, tb, to = read_model(a), read_model(b), read_model(out)
    name = "model.layers.1.self_attn.o_proj.weight"
    torch.testing.assert_close(to[name], (2 * ta[name] + 2 * tb[name]) / 4)


def test_slice_level_base_model(tmp_path, llama_models):
    """slerp t = 0 returns the base: each slice's own base_model is used inside it, and pre/post
    weights follow the first/last slice."""
    a, b = llama_models["a"], llama_models["b"]
    text = f"""\
merge_method: slerp
parameters: {{t: 0.0}}
slices:
  - base_model: {a}
    sources:
      - {{model: {a}, layer_range: [0, 2]}}
      - {{model: {b}, layer_range: [0, 2]}}
  - base_model: {b}
    sources:
      - {{model: {a}, layer_range: [2, 4]}}
      - {{model: {b}, layer_range: [2, 4]}}
"""
    out = merge(tmp_path, text)
    ta, tb, to = read_model(a), read_model(b), read_model(out)
    for i, src in enumerate([ta, ta, tb, tb]):
        name = f"model.layers.{i}.self_attn.k_proj.weight"
        assert torch.equal(to[name], src[name]), name
    assert torch.equal(to["model.embed_tokens.weight"], ta["model.embed_tokens.weight"])
    assert torch.equal(to["lm_head.weight"], tb["lm_head.weight"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_merge_matches_cpu(tmp_path, llama_models):
    a, b = llama_models["a"], llama_models["b"]
    text = linear_yaml((a, 0.3), (b, 0.7))
    on_gpu = read_model(merge(tmp_path, text, name="gpu", device="cuda"))
    on_cpu = read_model(merge(tmp_path, text, name="cpu", device="cpu"))
    assert set(on_gpu) == set(on_cpu)
    for k in on_cpu:
        assert on_gpu[k].dtype == on_cpu[k].dtype
        torch.testing.assert_close(on_gpu[k], on_cpu[k])


# ----------------------------------------------------------------------------------------------
# sharding


@pytest.mark.slow
def test_sharded_output_names_and_index(tmp_path, llama_models):
    a, b = llama_models["a"], llama_models["b"]
    limit = 20_000
    out = merge_cli(tmp_path, linear_yaml((a, 0.5), (b, 0.5)), "--out-shard-size", "20k")
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(shards)
    assert n > 2
    assert shards == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    assert not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    assert set(weight_map.values()) == set(shards)

    total = 0
    seen: dict[str, str] = {}
    for shard in shards:
        with safe_open(str(out / shard), framework="pt") as f:
            keys = list(f.keys())
            sizes = [f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in keys]
            assert f.metadata() == {"format": "pt"}
        for k in keys:
            assert k not in seen, f"{k} in both {seen.get(k)} and {shard}"
            seen[k] = shard
        total += sum(sizes)
        # a shard over the limit holds exactly one (oversized) tensor
        assert sum(sizes) <= limit or len(keys) == 1, (shard, sizes)
    assert weight_map == seen
    assert index["metadata"]["total_size"] == total
    assert "mergekit_version" in index["metadata"]

    # the same merge unsharded has the same tensors
    single = merge(tmp_path, linear_yaml((a, 0.5), (b, 0.5)), name="single")
    ref = read_model(single)
    sharded = read_model(out)
    assert set(ref) == set(sharded) == set(weight_map)
    for k in ref:
        assert torch.equal(ref[k], sharded[k])
    assert_generates(out)


def _anonymous_kb(address: int) -> int:
    """The anonymous (copied, process-private) memory of the mapping holding `address`, in kB."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == "Anonymous:":
            return int(line.split()[1])
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_mapped_inputs_share_the_page_cache_and_writes_stay_private(tmp_path):
    from merge_engine.io import Checkpoint

    values = torch.arange(3 * 1024 * 1024, dtype=torch.float32).reshape(3, -1)  # 12 MiB, many pages
    file = tmp_path / "model.safetensors"
    save_file({"w": values}, str(file))
    before = file.read_bytes()
    checkpoint = Checkpoint(tmp_path, "model")
    mapped = checkpoint.map("w")
    assert torch.equal(mapped, values)
    # populated for reading: the file's cached pages, not private copies (a write-populate of
    # a private mapping would copy all 12 MiB up front)
    assert _anonymous_kb(mapped.data_ptr()) < 64
    mapped[1].add_(1.0)  # a method writing into its input gets private pages; the file is untouched
    assert _anonymous_kb(mapped.data_ptr()) >= 4 * 1024
    assert torch.equal(mapped[1], values[1] + 1) and torch.equal(mapped[0], values[0])
    assert file.read_bytes() == before
    assert torch.equal(checkpoint.map("w"), values)
    checkpoint.close()


@pytest.mark.slow
def test_single_shard_has_no_index(tmp_path, llama_models):
    a, b = llama_models["a"], llama_models["b"]
    out = merge_cli(tmp_path, linear_yaml((a, 0.5), (b, 0.5)), "--out-shard-size", "1B")
    assert (out / "model.safetensors").is_file()
    assert not (out / "model.safetensors.index.json").exists()
    assert list(out.glob("model-*")) == []


def test_shard_size_plain_byte_count(tmp_path, llama_models):
    a = llama_models["a"]
    text = f"merge_method: passthrough\nmodels:\n  - model: {a}\n"
    out = merge(tmp_path, text, out_shard_size=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    n = len(set(index["weight_map"].values()))
    assert n > 1
    assert sorted(p.name for p in out.glob("model-*.safetensors")) == [
        f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)
    ]
    ta, to = read_model(a), read_model(out)
    assert set(ta) == set(to) and all(torch.equal(ta[k], to[k]) for k in ta)


# ----------------------------------------------------------------------------------------------
# dtypes


def test_dtype_casts_inputs_and_output(tmp_path, llama_models):
    a = llama_models["a"]
    text = f"merge_method: passthrough\ndtype: bfloat16\nmodels:\n  - model: {a}\n"
    out = merge(tmp_path, text)
    assert set(header_dtypes(out / "model.safetensors").values()) == {"BF16"}
    assert out_config(out)["dtype"] == "bfloat16"
    ta, to = read_model(a), read_model(out)
    for k in ta:
        assert torch.equal(to[k], ta[k].to(torch.bfloat16)), k
    assert_generates(out)


def test_out_dtype_only_casts_output(tmp_path, llama_models):
    a, b = llama_models["a"], llama_models["b"]
    out = merge(tmp_path, linear_yaml((a, 0.3), (b, 0.7), extra="dtype: float32\nout_dtype: float16\n"))
    assert set(header_dtypes(out / "model.safetensors").values()) == {"F16"}
    assert out_config(out)["dtype"] == "float16"
    ta, tb, to = read_model(a), read_model(b), read_model(out)
    name = "model.layers.2.mlp.gate_proj.weight"
    expected = (ta[name] * 0.3 + tb[name] * 0.7) / (0.3 + 0.7)
    torch.testing.assert_close(to[name].float(), expected, atol=1e-3, rtol=1e-3)


def test_no_dtype_keeps_input_dtype(tmp_path, llama_models):
    a, b = llama_models["a"], llama_models["b"]
    out = merge(tmp_path, linear_yaml((a, 0.5), (b, 0.5)))
    assert set(header_dtypes(out / "model.safetensors").values()) == {"F32"}
    assert out_config(out)["dtype"] == "float32"


def test_bf16_inputs_with_out_dtype_float32(tmp_path):
    cfg = tiny_config("llama", layers=2)
    a = make_model(tmp_path / "a16", cfg, seed=5, dtype=torch.bfloat16)
    out = merge(tmp_path, f"merge_method: passthrough\nout_dtype: float32\nmodels:\n  - model: {a}\n")
    assert set(header_dtypes(a / "model.safetensors").values()) == {"BF16"}
    assert set(header_dtypes(out / "model.safetensors").values()) == {"F32"}
    assert out_config(out)["dtype"] == "float32"
    ta, to = read_model(a), read_model(out)
    for k in ta:
        assert torch.equal(to[k], ta[k].float())


# ----------------------------------------------------------------------------------------------
# tied embeddings


def test_tied_checkpoints_have_no_lm_head_and_output_has_none(tmp_path, tied):
    x, y = tied["x"], tied["y"]
    tx, ty = read_model(x), read_model(y)
    assert "lm_head.weight" not in tx and "lm_head.weight" not in ty
    out = merge(tmp_path, linear_yaml((x, 0.5), (y, 0.5)))
    to = read_model(out)
    assert "lm_head.weight" not in to
    assert out_config(out)["tie_word_embeddings"] is True
    torch.testing.assert_close(
        to["model.embed_tokens.weight"], (tx["model.embed_tokens.weight"] + ty["model.embed_tokens.weight"]) / 2
    )
    model = load_causal_lm(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert_generates(out)


@pytest.mark.slow
def test_untied_plus_tied_writes_lm_head_from_embedding(tmp_path, llama_models, tied):
    a, x = llama_models["a"], tied["x"]
    ta, tx = read_model(a), read_model(x)
    assert "lm_head.weight" in ta and "lm_head.weight" not in tx
    out = merge(tmp_path, linear_yaml((a, 0.5), (x, 0.5)))  # donor = a (untied)
    to = read_model(out)
    assert "lm_head.weight" in to
    torch.testing.assert_close(to["lm_head.weight"], (ta["lm_head.weight"] + tx["model.embed_tokens.weight"]) / 2)
    torch.testing.assert_close(
        to["model.embed_tokens.weight"], (ta["model.embed_tokens.weight"] + tx["model.embed_tokens.weight"]) / 2
    )
    assert out_config(out)["tie_word_embeddings"] is False
    assert_generates(out)

    # order does not matter: the tied model listed first still contributes its embedding
    out2 = merge(tmp_path, linear_yaml((x, 0.5), (a, 0.5)), name="out2")
    torch.testing.assert_close(read_model(out2)["lm_head.weight"], to["lm_head.weight"])


def test_untied_donor_with_tied_last_slice_still_gets_lm_head(tmp_path, llama_models, tied):
    """The output config comes from the untied first model, so the head must be written even
    though the last slice (post-weights) reads only a tied model: its embedding stands in."""
    a, x = llama_models["a"], tied["x"]
    text = f"""\
merge_method: passthrough
slices:
  - sources: [{{model: {a}, layer_range: [0, 2]}}]
  - sources: [{{model: {x}, layer_range: [2, 4]}}]
"""
    out = merge(tmp_path, text)
    assert out_config(out)["tie_word_embeddings"] is False
    ta, tx, to = read_model(a), read_model(x), read_model(out)
    assert torch.equal(to["model.embed_tokens.weight"], ta["model.embed_tokens.weight"])
    assert torch.equal(to["lm_head.weight"], tx["model.embed_tokens.weight"])
    from transformers import AutoModelForCausalLM

    _, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"], info

    # the reverse (tied donor first): the config says tied; the last slice's real head is still
    # written (mergekit's rule: some input has it), and transformers ties over it on load
    text2 = text.replace(str(a), "@A@").replace(str(x), str(a)).replace("@A@", str(x))
    out2 = merge(tmp_path, text2, name="out2")
    assert out_config(out2)["tie_word_embeddings"] is True
    assert torch.equal(read_model(out2)["lm_head.weight"], ta["lm_head.weight"])


def test_passthrough_of_tied_model_slices(tmp_path, tied):
    x = tied["x"]
    text = f"""\
merge_method: passthrough
slices:
  - sources: [{{model: {x}, layer_range: [0, 2]}}]
  - sources: [{{model: {x}, layer_range: [2, 4]}}]
"""
    out = merge(tmp_path, text)
    assert set(read_model(out)) == set(read_model(x))


# ----------------------------------------------------------------------------------------------
# families


@pytest.mark.slow
def test_qwen2_qkv_biases_are_merged(tmp_path, family_pairs):
    a, b = family_pairs("qwen2")
    ta, tb = read_model(a), read_model(b)
    biases = [n for n in ta if n.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias"))]
    assert len(biases) == 3 * 4
    out = merge(tmp_path, linear_yaml((a, 0.25), (b, 0.75)))
    to = read_model(out)
    assert set(to) == set(ta)
    for n in biases:
        assert not torch.equal(ta[n], tb[n])
        torch.testing.assert_close(to[n], ta[n] * 0.25 + tb[n] * 0.75)
    assert_generates(out)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "qwen3", "gemma2"])
def test_non_llama_family_merges_and_loads(tmp_path, family_pairs, family):
    a, b = family_pairs(family)
    ta, tb = read_model(a), read_model(b)
    out = merge(tmp_path, linear_yaml((a, 0.5), (b, 0.5)))
    to = read_model(out)
    # the output keeps the checkpoint names transformers 5 saves (GPT-NeoX's head: embed_out)
    assert set(to) == set(ta)
    for k in ta:
        if ta[k].is_floating_point():
            torch.testing.assert_close(to[k], (ta[k] + tb[k]) / 2, msg=k)
    cfg = out_config(out)
    assert cfg["architectures"] == json.loads((a / "config.json").read_text())["architectures"]
    assert_generates(out)
    # the loaded model really uses the merged head (not a freshly initialised one)
    model = load_causal_lm(out)
    head = model.get_output_embeddings().weight
    embed = next(w.name for w in known_architecture(cfg).pre_weights if w.is_embed)
    head_name = next((n for n in ("lm_head.weight", "embed_out.weight") if n in to), embed)  # tied: the embedding
    expected = to[head_name]
    assert torch.equal(head.detach(), expected)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gemma2", "gpt2"])
def test_non_llama_family_frankenmerge_loads(tmp_path, family_pairs, family):
    a, b = family_pairs(family)
    text = f"""\
merge_method: passthrough
slices:
  - sources: [{{model: {a}, layer_range: [0, 2]}}]
  - sources: [{{model: {b}, layer_range: [1, 4]}}]
"""
    out = merge(tmp_path, text)
    cfg = out_config(out)
    key = "n_layer" if family == "gpt2" else "num_hidden_layers"
    assert cfg[key] == 5
    if isinstance(cfg.get("layer_types"), list):
        src = json.loads((a / "config.json").read_text())["layer_types"]
        assert cfg["layer_types"] == [src[0], src[1], src[1], src[2], src[3]]
    model = load_causal_lm(out)
    assert model.config.num_hidden_layers == 5
    assert_generates(out)


# ----------------------------------------------------------------------------------------------
# unknown architectures: inferred from tensor names


def test_unknown_architecture_is_inferred_and_merges(tmp_path, llama_models):
    a = copy_model(llama_models["a"], tmp_path / "custom_a")
    b = copy_model(llama_models["b"], tmp_path / "custom_b")
    for d in (a, b):
        set_architecture(d, "MyCustomForCausalLM")
    text = linear_yaml((a, 0.4), (b, 0.6))
    config, _ = load_config(write_yaml(tmp_path / "probe.yml", text))
    plan = build_plan(config)
    try:
        assert plan.architecture.inferred
        assert known_architecture({"architectures": ["MyCustomForCausalLM"]}) is None
    finally:
        plan.close()

    out = merge(tmp_path, text)
    ref = merge(tmp_path, linear_yaml((llama_models["a"], 0.4), (llama_models["b"], 0.6)), name="ref")
    to, tr = read_model(out), read_model(ref)
    assert set(to) == set(tr) == set(read_model(a))
    for k in tr:
        torch.testing.assert_close(to[k], tr[k], msg=k)
    assert out_config(out)["architectures"] == ["MyCustomForCausalLM"]


@pytest.mark.slow
def test_unknown_architecture_frankenmerge(tmp_path, llama_models):
    a = copy_model(llama_models["a"], tmp_path / "custom_a")
    set_architecture(a, "MyCustomForCausalLM")
    text = f"""\
merge_method: passthrough
slices:
  - sources: [{{model: {a}, layer_range: [1, 4]}}]
  - sources: [{{model: {a}, layer_range: [0, 2]}}]
"""
    out = merge(tmp_path, text)
    assert out_config(out)["num_hidden_layers"] == 5
    ta, to = read_model(a), read_model(out)
    for out_i, in_i in enumerate([1, 2, 3, 0, 1]):
        for suffix in ("self_attn.v_proj.weight", "input_layernorm.weight", "mlp.down_proj.weight"):
            assert torch.equal(to[f"model.layers.{out_i}.{suffix}"], ta[f"model.layers.{in_i}.{suffix}"])
    assert torch.equal(to["lm_head.weight"], ta["lm_head.weight"])
    # put the class name back: the output is a valid llama checkpoint
    set_architecture(out, "LlamaForCausalLM")
    assert_generates(out)


def test_known_family_with_undescribed_tensor_falls_back_to_inference(tmp_path, llama_models):
    """A tensor the table does not know is kept (the model is described from its names)."""
    a = copy_model(llama_models["a"], tmp_path / "extra")
    state = load_file(a / "model.safetensors")
    state["model.extra_scale"] = torch.arange(4, dtype=torch.float32)
    save_file(state, a / "model.safetensors", metadata={"format": "pt"})
    out = merge(tmp_path, f"merge_method: passthrough\nmodels:\n  - model: {a}\n")
    to = read_model(out)
    assert set(to) == set(state)
    assert all(torch.equal(to[k], state[k]) for k in state)


@pytest.mark.slow
def test_gpt2_checkpoint_without_transformer_prefix(tmp_path, family_pairs):
    """Old GPT-2 checkpoints name tensors without "transformer."; they are read through aliases
    and written under the current names."""
    a, b = family_pairs("gpt2")
    old = copy_model(a, tmp_path / "gpt2_old")
    state = load_file(old / "model.safetensors")
    renamed = {k.removeprefix("transformer."): v for k, v in state.items()}
    assert set(renamed) != set(state)
    save_file(renamed, old / "model.safetensors", metadata={"format": "pt"})
    out = merge(tmp_path, linear_yaml((old, 0.5), (b, 0.5)))
    ta, tb, to = read_model(a), read_model(b), read_model(out)
    assert set(to) == set(ta)
    for k in ta:
        torch.testing.assert_close(to[k], (ta[k] + tb[k]) / 2, msg=k)
    assert_generates(out)


# ----------------------------------------------------------------------------------------------
# architecture table against real checkpoints


def _table_families() -> list[str]:
    return sorted(TINY_FAMILIES)


def test_table_families_are_tested():
    assert len(_table_families()) >= 10


@pytest.mark.parametrize("family", _table_families())
def test_architecture_table_matches_checkpoint(tmp_path, family):
    model_dir = make_model(tmp_path / family, tiny_config(family), seed=0)
    config = json.loads((model_dir / "config.json").read_text())
    (cls,) = config["architectures"]
    arch = known_architecture(config)
    assert arch.origin == "derived" and arch.name.startswith(cls)
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    layers = config[arch.num_layers_key]
    weights = arch.all_weights(layers)
    covered = set()
    for w in weights:
        covered.update(w.all_names)
        present = [n for n in w.all_names if n in names]
        assert len(present) <= 1, f"{family}: several names of one weight present: {present}"
        if not w.optional:
            assert present, f"{family}: required weight {w.name} missing from a saved {cls} checkpoint"
    extra = sorted(n for n in names - covered if not arch.is_ignored(n))
    assert not extra, f"{family}: checkpoint tensors the table does not describe: {extra}"
    # the tied lm_head: present exactly when the model is untied
    if not config.get("tie_word_embeddings", False):
        assert "lm_head.weight" in names or "embed_out.weight" in names
    # and the planner takes the table, not inference
    text = f"merge_method: passthrough\nmodels:\n  - model: {model_dir}\n"
    cfg, _ = load_config(write_yaml(tmp_path / "probe.yml", text))
    plan = build_plan(cfg)
    try:
        assert not plan.architecture.inferred
        planned = {(t.out.name, t.inputs[0].tensor_name) for t in plan.tasks}
        assert {src for _, src in planned} == names
        for out_name, src in planned:
            assert out_name == src or src in next(w.aliases for w in weights if w.name == out_name)
    finally:
        plan.close()


@pytest.mark.slow
@pytest.mark.parametrize("family", _table_families())
def test_frankenmerge_of_every_table_family_loads(tmp_path, family):
    """Slices [0, 2) + [1, 4) -> 5 layers: the layer-count key (and per-layer config lists such
    as layer_types) are rewritten, and transformers loads every written tensor, none missing."""
    from transformers import AutoModelForCausalLM

    src = make_model(tmp_path / family, tiny_config(family), seed=1)
    text = f"""\
merge_method: passthrough
slices:
  - sources: [{{model: {src}, layer_range: [0, 2]}}]
  - sources: [{{model: {src}, layer_range: [1, 4]}}]
"""
    out = merge(tmp_path, text)
    cfg = out_config(out)
    arch = known_architecture(cfg)
    assert cfg[arch.num_layers_key] == 5
    if isinstance(cfg.get("layer_types"), list):
        assert len(cfg["layer_types"]) == 5
    model, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert model.config.num_hidden_layers == 5
    written = read_model(out)
    state = model.state_dict()
    for name, tensor in written.items():
        if name in state:
            assert torch.equal(state[name], tensor), name
    assert_generates(out)

    # the same recipe on the same checkpoint under an unknown class name: inference from the
    # tensor names plans the same tensors under the same names
    custom = copy_model(src, tmp_path / "custom")
    set_architecture(custom, "MyCustomForCausalLM")
    inferred = read_model(merge(tmp_path, text.replace(str(src), str(custom)), name="inferred"))
    assert set(inferred) == set(written)
    for k, v in inferred.items():
        assert torch.equal(v, written[k]), k
    assert out_config(tmp_path / "inferred")[arch.num_layers_key] == 5


# ----------------------------------------------------------------------------------------------
# tokenizer, model card, serialization


def _with_marked_tokenizer(src: Path, dst: Path, mark: str) -> Path:
    d = copy_model(src, dst)
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc["evomerge_test_mark"] = mark
    (d / "tokenizer_config.json").write_text(json.dumps(tc, indent=1))
    return d


def test_tokenizer_files_copied_from_base(tmp_path, llama_models):
    base = _with_marked_tokenizer(llama_models["base"], tmp_path / "base", "base")
    a = _with_marked_tokenizer(llama_models["a"], tmp_path / "a", "a")
    b = _with_marked_tokenizer(llama_models["b"], tmp_path / "b", "b")
    text = f"""\
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.5}}
  - model: {b}
    parameters: {{weight: 0.5}}
"""
    out = merge(tmp_path, text)
    for name in TOKENIZER_FILES:
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.decode(tok("The quick brown fox")["input_ids"]) == "The quick brown fox"

    # without a base the first model in the recipe is the donor
    out2 = merge(tmp_path, linear_yaml((b, 0.5), (a, 0.5)), name="out2")
    assert json.loads((out2 / "tokenizer_config.json").read_text())["evomerge_test_mark"] == "b"
    assert out_config(out2) == json.loads((b / "config.json").read_text())


@pytest.mark.slow
def test_no_copy_tokenizer(tmp_path, llama_models):
    a, b = llama_models["a"], llama_models["b"]
    out = merge_cli(tmp_path, linear_yaml((a, 0.5), (b, 0.5)), "--no-copy-tokenizer")
    assert not (out / "tokenizer.json").exists()
    assert not (out / "tokenizer_config.json").exists()
    assert (out / "model.safetensors").is_file()


@pytest.mark.slow
def test_model_card_and_verbatim_config(tmp_path, llama_models):
    a, b = llama_models["a"], llama_models["b"]
    text = f"""\
# a comment that a re-dump would lose
merge_method:   linear   # trailing comment
models:
  - model: {a}
    parameters:
      weight: 0.5       # odd spacing kept
  - model: {b}
    parameters: {{weight: 0.5}}
dtype: float32
"""
    out = merge_cli(tmp_path, text, name="my-merge")
    assert (out / "mergekit_config.yml").read_text() == text
    card = (out / "README.md").read_text()
    assert card.startswith("---\n")
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "transformers"
    assert {"mergekit", "merge"} <= set(front["tags"])
    assert front["base_model"] == []  # local paths are not hub ids
    assert "# my-merge" in card
    assert "Linear" in card and "https://arxiv.org/abs/2203.05482" in card
    assert f"* {a}" in card and f"* {b}" in card
    assert "```yaml\n" + text.rstrip() + "\n```" in card


def test_model_card_base_clause(tmp_path, llama_models):
    base, a = llama_models["base"], llama_models["a"]
    text = f"""\
merge_method: slerp
base_model: {base}
models:
  - model: {base}
  - model: {a}
parameters:
  t: 0.5
"""
    out = merge(tmp_path, text)
    card = (out / "README.md").read_text()
    assert "SLERP" in card
    assert "as a base" not in card  # slerp omits the base clause ...
    assert f"* {base}" in card and f"* {a}" in card  # ... and lists the base

    text2 = f"""\
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 1.0}}
"""
    out2 = merge(tmp_path, text2, name="out2")
    card2 = (out2 / "README.md").read_text()
    assert f"using {base} as a base" in card2
    assert f"* {a}" in card2 and f"* {base}" not in card2


def test_model_card_links_hub_ids():
    from merge_engine.card import render_card
    from merge_engine.config import parse_config

    config = parse_config(
        {
            "merge_method": "ties",
            "base_model": "org/base-model",
            "models": [
                {"model": "org/fine-tune", "parameters": {"weight": 1.0}},
                {"model": "/local/path/model", "parameters": {"weight": 1.0}},
            ],
        }
    )
    card = render_card(config, "merge_method: ties\n", Path("/x/out-dir"))
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["base_model"] == ["org/base-model", "org/fine-tune"]
    assert "[org/fine-tune](https://huggingface.co/org/fine-tune)" in card
    assert "using [org/base-model](https://huggingface.co/org/base-model) as a base" in card
    assert "* /local/path/model" in card
    assert "* [org/base-model]" not in card
    assert "# out-dir" in card
    assert "TIES" in card and "https://arxiv.org/abs/2306.01708" in card


def test_config_redumped_when_no_source_text(tmp_path, llama_models):
    """run_merge without the recipe text writes a re-dump that loads back to the same recipe."""
    a, b = llama_models["a"], llama_models["b"]
    cfg = write_yaml(tmp_path / "cfg.yml", linear_yaml((a, 0.5), (b, [0.2, 0.8])))
    config, _ = load_config(cfg)
    out = tmp_path / "out"
    run_merge(config, out, MergeOptions(quiet=True))
    again, text = load_config(out / "mergekit_config.yml")
    assert again.to_plain() == config.to_plain()
    assert "[0.2, 0.8]" in text  # numeric lists in flow style
    assert "```yaml\n" + text.rstrip() + "\n```" in (out / "README.md").read_text()


@pytest.mark.slow
def test_no_write_model_card(tmp_path, llama_models):
    a, b = llama_models["a"], llama_models["b"]
    out = merge_cli(tmp_path, linear_yaml((a, 0.5), (b, 0.5)), "--no-write-model-card")
    assert not (out / "README.md").exists()
    assert not (out / "mergekit_config.yml").exists()
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()


@pytest.mark.slow
def test_no_safe_serialization_writes_pytorch_bin(tmp_path, llama_models):
    a, b = llama_models["a"], llama_models["b"]
    text = linear_yaml((a, 0.5), (b, 0.5))
    out = merge_cli(tmp_path, text, "--no-safe-serialization")
    assert (out / "pytorch_model.bin").is_file()
    assert not list(out.glob("*.safetensors"))
    assert not (out / "pytorch_model.bin.index.json").exists()
    state = torch.load(out / "pytorch_model.bin", weights_only=True, map_location="cpu")
    ref = read_model(merge(tmp_path, text, name="ref"))
    assert set(state) == set(ref)
    for k in ref:
        assert torch.equal(state[k], ref[k]), k
    assert_generates(out)


def test_no_safe_serialization_sharded(tmp_path, llama_models):
    a = llama_models["a"]
    text = f"merge_method: passthrough\nmodels:\n  - model: {a}\n"
    out = merge(tmp_path, text, safe_serialization=False, out_shard_size=50_000)
    index = json.loads((out / "pytorch_model.bin.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    n = len(files)
    assert n > 1
    assert files == [f"pytorch_model-{k:05d}-of-{n:05d}.bin" for k in range(1, n + 1)]
    assert sorted(p.name for p in out.glob("*.bin")) == files
    merged = {}
    for f in files:
        merged.update(torch.load(out / f, weights_only=True, map_location="cpu"))
    ta = read_model(a)
    assert set(merged) == set(ta) == set(index["weight_map"])
    assert all(torch.equal(merged[k], ta[k]) for k in ta)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in ta.values())

    # and the engine reads its own sharded .bin output back (with --lazy-unpickle)
    back = merge(tmp_path, f"merge_method: passthrough\nmodels:\n  - model: {out}\n", name="back", lazy_unpickle=True)
    tb = read_model(back)
    assert set(tb) == set(ta) and all(torch.equal(tb[k], ta[k]) for k in ta)


# ----------------------------------------------------------------------------------------------
# pickle (.bin) inputs


def _bin_model(src: Path, dst: Path, dtype=None, views: bool = True) -> Path:
    """A model folder with config.json + pytorch_model.bin holding src's tensors. With `views`,
    every tensor is a view into one shared flat storage (non-zero storage offsets)."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, dst / f.name)
    state = read_model(src)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    if views:
        flat = torch.cat([v.reshape(-1) for v in state.values()])
        out, pos = {}, 0
        for k, v in state.items():
            out[k] = flat[pos : pos + v.numel()].view(v.shape)
            pos += v.numel()
        state = out
    torch.save(state, dst / "pytorch_model.bin")
    return dst


@pytest.mark.slow
def test_bin_input_requires_lazy_unpickle(tmp_path, llama_models):
    a = _bin_model(llama_models["a"], tmp_path / "a_bin")
    cfg = write_yaml(tmp_path / "cfg.yml", f"merge_method: passthrough\nmodels:\n  - model: {a}\n")
    out = tmp_path / "out"
    proc = cli(cfg, out, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "pytorch_model.bin" in lines[0] and "--lazy-unpickle" in lines[0]
    assert not out.exists()

    cli(cfg, out, "--lazy-unpickle")
    ta, to = read_model(llama_models["a"]), read_model(out)
    assert set(ta) == set(to)
    for k in ta:
        assert torch.equal(to[k], ta[k]), k


def test_bin_inputs_merge_like_safetensors(tmp_path, llama_models):
    a_bin = _bin_model(llama_models["a"], tmp_path / "a_bin")
    b_bin = _bin_model(llama_models["b"], tmp_path / "b_bin", views=False)
    out = merge(tmp_path, linear_yaml((a_bin, 0.3), (b_bin, 0.7)), lazy_unpickle=True)
    ref = merge(tmp_path, linear_yaml((llama_models["a"], 0.3), (llama_models["b"], 0.7)), name="ref")
    to, tr = read_model(out), read_model(ref)
    assert set(to) == set(tr)
    for k in tr:
        assert torch.equal(to[k], tr[k]), k


def test_bf16_sharded_bin_input(tmp_path, llama_models):
    src = llama_models["a"]
    d = tmp_path / "sharded_bin"
    d.mkdir()
    shutil.copy(src / "config.json", d / "config.json")
    state = {k: v.to(torch.bfloat16) for k, v in read_model(src).items()}
    keys = sorted(state)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
    weight_map = {}
    for i, part in enumerate(halves, start=1):
        fname = f"pytorch_model-{i:05d}-of-00002.bin"
        torch.save({k: state[k] for k in part}, d / fname)
        weight_map.update({k: fname for k in part})
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    out = merge(tmp_path, f"merge_method: passthrough\nmodels:\n  - model: {d}\n", lazy_unpickle=True)
    to = read_model(out)
    assert set(header_dtypes(out / "model.safetensors").values()) == {"BF16"}
    assert set(to) == set(state) and all(torch.equal(to[k], state[k]) for k in state)


class _RunsShell:
    """Unpickling this runs a shell command (the classic malicious-pickle trick)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _CustomObject:
    def __init__(self):
        self.payload = 42


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["os_system", "custom_class"])
def test_restricted_unpickler_refuses_foreign_globals(tmp_path, llama_models, kind):
    d = tmp_path / "evil"
    d.mkdir()
    shutil.copy(llama_models["a"] / "config.json", d / "config.json")
    state = dict(read_model(llama_models["a"]))
    marker = tmp_path / "pwned"
    state["model.norm.weight_extra"] = _RunsShell(marker) if kind == "os_system" else _CustomObject()
    torch.save(state, d / "pytorch_model.bin")
    cfg = write_yaml(tmp_path / "cfg.yml", f"merge_method: passthrough\nmodels:\n  - model: {d}\n")
    out = tmp_path / "out"
    proc = cli(cfg, out, "--lazy-unpickle", check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "refus" in lines[0] and "pytorch_model.bin" in lines[0]
    assert ("system" in lines[0]) if kind == "os_system" else ("_CustomObject" in lines[0])
    assert not marker.exists()
    assert not out.exists()
    assert not list(tmp_path.glob(".out.incomplete-*"))
