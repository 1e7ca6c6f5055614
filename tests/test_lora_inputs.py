"""`model+lora` inputs (docs/mergekit-reference.md §1): the adapter is merged into its base once, cached under
`--lora-merge-cache`, and the cached folder is merged like any other model.

Expected tensors are computed here from the adapter's own safetensors file (W + alpha/r * B @ A),
not through peft.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import make_model, read_model, tiny_config, write_yaml
from merge_engine.config import parse_config
from merge_engine.options import MergeOptions
from merge_engine.resident import ResidentMerger

REPO = Path(__file__).resolve().parents[1]
_VENV_CLI = Path(sys.executable).parent / "mergekit-yaml"
MERGEKIT_YAML = str(_VENV_CLI if _VENV_CLI.exists() else REPO / ".venv" / "bin" / "mergekit-yaml")

RANK, ALPHA = 4, 8
TARGETS = ("q_proj", "v_proj")
LAYERS = 4


def make_adapter(base: Path, out: Path, seed: int = 3) -> Path:
    """A real PEFT LoRA adapter for `base`, with non-zero B (init_lora_weights=False)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS), init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, llama_models):
    return make_adapter(llama_models["base"], tmp_path_factory.mktemp("lora") / "my_adapter")


def run_cli(cfg: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [MERGEKIT_YAML, str(cfg), str(out), "--quiet", *flags],
        capture_output=True, text=True, timeout=300, cwd=cfg.parent,
    )


def linear_yaml(first: str, second: str) -> str:
    return (
        "merge_method: linear\n"
        f"models:\n  - model: {first}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {second}\n    parameters: {{weight: 0.5}}\n"
        "dtype: float32\n"
    )


def snapshot(folder: Path) -> dict[str, int]:
    """Every file under `folder` with its modification time (ns)."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


def leftovers(out: Path) -> list[str]:
    if not out.parent.exists():
        return []
    return sorted(p.name for p in out.parent.iterdir() if p.name == out.name or p.name.startswith(f".{out.name}."))


def expected_entry(base: Path, adapter: Path) -> str:
    crc = lambda s: f"{zlib.crc32(s.encode()) & 0xFFFFFFFF:08x}"  # noqa: E731
    return f"{base.name}_{crc(str(base))}_{adapter.name}_{crc(str(adapter))}"


def lora_weight(base_sd: dict, adapter_sd: dict, layer: int, proj: str) -> torch.Tensor:
    prefix = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
    a = adapter_sd[f"{prefix}.lora_A.weight"].double()
    b = adapter_sd[f"{prefix}.lora_B.weight"].double()
    w = base_sd[f"model.layers.{layer}.self_attn.{proj}.weight"].double()
    out = w.clone()
    scaling = ALPHA / RANK
    for i in range(w.shape[0]):  # the low-rank update, row by row: W[i] + s * sum_r B[i, r] * A[r]
        for r in range(RANK):
            out[i] += scaling * b[i, r] * a[r]
    return out


@pytest.mark.slow
def test_lora_input_merges_and_cache_is_reused(tmp_path, llama_models, adapter):
    base, other = llama_models["base"], llama_models["a"]
    cache = tmp_path / "cache"
    cfg = write_yaml(tmp_path / "m.yml", linear_yaml(f"{base}+{adapter}", str(other)))
    proc = run_cli(cfg, tmp_path / "out", "--lora-merge-cache", str(cache), "-v")
    assert proc.returncode == 0, proc.stderr
    assert "merging LoRA adapter" in proc.stderr

    # the cache holds exactly mergekit's entry name, with a complete model and the base's tokenizer
    entry = expected_entry(base, adapter)
    assert sorted(p.name for p in cache.iterdir()) == [entry]
    assert (cache / entry / "model.safetensors").is_file()
    assert (cache / entry / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()

    base_sd, other_sd = read_model(base), read_model(other)
    adapter_sd = load_file(adapter / "adapter_model.safetensors")
    out = read_model(tmp_path / "out")
    for layer in range(LAYERS):
        for proj in TARGETS:
            name = f"model.layers.{layer}.self_attn.{proj}.weight"
            want = 0.5 * lora_weight(base_sd, adapter_sd, layer, proj) + 0.5 * other_sd[name].double()
            torch.testing.assert_close(out[name].double(), want, rtol=0, atol=1e-6)
            # the adapter really changed this tensor (well beyond the tolerance)
            assert (want - 0.5 * (base_sd[name].double() + other_sd[name].double())).abs().max() > 1e-3
        name = f"model.layers.{layer}.self_attn.k_proj.weight"  # not targeted: the base's own weight
        torch.testing.assert_close(out[name].double(), 0.5 * base_sd[name].double() + 0.5 * other_sd[name].double(), rtol=0, atol=1e-6)

    # second run: the cache entry is reused untouched, nothing rebuilt
    before = snapshot(cache)
    proc = run_cli(cfg, tmp_path / "out2", "--lora-merge-cache", str(cache), "-v")
    assert proc.returncode == 0, proc.stderr
    assert "merging LoRA adapter" not in proc.stderr and "reusing" in proc.stderr
    assert snapshot(cache) == before
    out2 = read_model(tmp_path / "out2")
    assert all(torch.equal(out[k], out2[k]) for k in out)


@pytest.mark.slow
def test_lora_merge_dtype_bfloat16(tmp_path, llama_models, adapter):
    base = llama_models["base"]
    cache = tmp_path / "cache"
    cfg = write_yaml(tmp_path / "m.yml", f"merge_method: passthrough\nmodels:\n  - model: {base}+{adapter}\n")
    proc = run_cli(cfg, tmp_path / "out", "--lora-merge-cache", str(cache), "--lora-merge-dtype", "bf16")
    assert proc.returncode == 0, proc.stderr
    out = read_model(tmp_path / "out")
    name = "model.layers.2.self_attn.q_proj.weight"
    assert out[name].dtype == torch.bfloat16
    want = lora_weight(read_model(base), load_file(adapter / "adapter_model.safetensors"), 2, "q_proj")
    # applied in bfloat16: within bfloat16 rounding of the exact value
    torch.testing.assert_close(out[name].double(), want, rtol=2e-2, atol=2e-3)


@pytest.mark.slow
def test_adapter_in_pickle_file_needs_lazy_unpickle(tmp_path, llama_models, adapter):
    base = llama_models["base"]
    pickled = tmp_path / "bin_adapter"
    pickled.mkdir()
    shutil.copy(adapter / "adapter_config.json", pickled)
    torch.save(load_file(adapter / "adapter_model.safetensors"), pickled / "adapter_model.bin")
    cfg = write_yaml(tmp_path / "m.yml", f"merge_method: passthrough\nmodels:\n  - model: {base}+{pickled}\n")
    cache = tmp_path / "cache"

    proc = run_cli(cfg, tmp_path / "out", "--lora-merge-cache", str(cache))
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    assert str(pickled) in proc.stderr and "--lazy-unpickle" in proc.stderr
    assert leftovers(tmp_path / "out") == []

    proc = run_cli(cfg, tmp_path / "out", "--lora-merge-cache", str(cache), "--lazy-unpickle")
    assert proc.returncode == 0, proc.stderr
    out = read_model(tmp_path / "out")
    want = lora_weight(read_model(base), load_file(adapter / "adapter_model.safetensors"), 1, "v_proj")
    torch.testing.assert_close(out["model.layers.1.self_attn.v_proj.weight"].double(), want, rtol=0, atol=1e-6)


def test_resident_merger_opens_lora_inputs(tmp_path, llama_models, adapter):
    base, other = llama_models["base"], llama_models["b"]
    config = parse_config({
        "merge_method": "linear", "dtype": "float32",
        "models": [{"model": f"{base}+{adapter}", "parameters": {"weight": 0.5}},
                   {"model": str(other), "parameters": {"weight": 0.5}}],
    })
    merger = ResidentMerger(config, MergeOptions(quiet=True, lora_merge_cache=str(tmp_path / "cache")))
    try:
        merged = merger.merged_tensors(config)
    finally:
        merger.close()
    name = "model.layers.3.self_attn.q_proj.weight"
    want = 0.5 * lora_weight(read_model(base), load_file(adapter / "adapter_model.safetensors"), 3, "q_proj") \
        + 0.5 * read_model(other)[name].double()
    torch.testing.assert_close(merged[name].double(), want, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# errors: exit 2, one line naming the adapter, no output folder, no cache entry


def assert_clean_failure(proc, out: Path, cache: Path, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert leftovers(out) == []
    assert not cache.exists() or list(cache.iterdir()) == []


@pytest.mark.slow
def test_no_lora_merge_cache(tmp_path, llama_models, adapter):
    cfg = write_yaml(tmp_path / "m.yml", linear_yaml(f"{llama_models['base']}+{adapter}", str(llama_models["a"])))
    proc = run_cli(cfg, tmp_path / "out")
    assert_clean_failure(proc, tmp_path / "out", tmp_path / "cache", "--lora-merge-cache", str(adapter))


@pytest.mark.slow
def test_adapter_directory_missing(tmp_path, llama_models):
    missing = tmp_path / "no_such_adapter"
    cfg = write_yaml(tmp_path / "m.yml", linear_yaml(f"{llama_models['base']}+{missing}", str(llama_models["a"])))
    proc = run_cli(cfg, tmp_path / "out", "--lora-merge-cache", str(tmp_path / "cache"))
    assert_clean_failure(proc, tmp_path / "out", tmp_path / "cache", str(missing), "not found")


@pytest.mark.slow
@pytest.mark.parametrize("kept,missing", [("adapter_model.safetensors", "adapter_config.json"), ("adapter_config.json", "adapter_model.safetensors")])
def test_adapter_missing_a_file(tmp_path, llama_models, adapter, kept, missing):
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(adapter / kept, broken)
    cfg = write_yaml(tmp_path / "m.yml", linear_yaml(f"{llama_models['base']}+{broken}", str(llama_models["a"])))
    proc = run_cli(cfg, tmp_path / "out", "--lora-merge-cache", str(tmp_path / "cache"))
    assert_clean_failure(proc, tmp_path / "out", tmp_path / "cache", str(broken), missing)


@pytest.mark.slow
def test_adapter_for_a_different_base(tmp_path, llama_models):
    wide = make_model(tmp_path / "wide_base", tiny_config("llama", hidden=64), seed=5)
    foreign = make_adapter(wide, tmp_path / "wide_adapter")
    cfg = write_yaml(tmp_path / "m.yml", linear_yaml(f"{llama_models['base']}+{foreign}", str(llama_models["a"])))
    cache = tmp_path / "cache"
    proc = run_cli(cfg, tmp_path / "out", "--lora-merge-cache", str(cache))
    assert_clean_failure(proc, tmp_path / "out", cache, str(foreign), "does not fit")


@pytest.mark.slow
def test_adapter_targets_modules_the_base_lacks(tmp_path, llama_models, adapter):
    foreign = tmp_path / "gpt2_style"
    shutil.copytree(adapter, foreign)
    cfg_json = json.loads((foreign / "adapter_config.json").read_text())
    cfg_json["target_modules"] = ["c_attn"]
    (foreign / "adapter_config.json").write_text(json.dumps(cfg_json))
    cfg = write_yaml(tmp_path / "m.yml", linear_yaml(f"{llama_models['base']}+{foreign}", str(llama_models["a"])))
    cache = tmp_path / "cache"
    proc = run_cli(cfg, tmp_path / "out", "--lora-merge-cache", str(cache))
    assert_clean_failure(proc, tmp_path / "out", cache, str(foreign), "does not fit")


def test_bad_lora_merge_dtype(tmp_path, llama_models, adapter):
    cfg = write_yaml(tmp_path / "m.yml", linear_yaml(f"{llama_models['base']}+{adapter}", str(llama_models["a"])))
    proc = run_cli(cfg, tmp_path / "out", "--lora-merge-cache", str(tmp_path / "cache"), "--lora-merge-dtype", "int64")
    assert proc.returncode == 2
    assert "--lora-merge-dtype" in proc.stderr
    assert leftovers(tmp_path / "out") == []
