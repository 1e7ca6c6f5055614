"""mergekit-extract-lora through the real console script: the adapter PEFT loads reproduces the
fine-tune; truncation errors are what the discarded singular values predict; bad input fails cleanly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import make_model, tiny_config

SCRIPT = Path(sys.executable).parent / "mergekit-extract-lora"
DELTA_RANK = 4
Q0 = "model.layers.0.self_attn.q_proj"  # gets a rank-2 delta: a module whose rank differs


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny llama base and a fine-tune of it: a known rank-4 delta on every linear layer (rank 2 on
    Q0), a rank-3 change to the embeddings, and a changed input_layernorm in every layer."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("extract")
    cfg = tiny_config("llama")
    base = make_model(root / "base", cfg, seed=0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    gen = torch.Generator().manual_seed(7)
    deltas = {}
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear):
                rank = 2 if name == Q0 else DELTA_RANK
                out_f, in_f = mod.weight.shape
                d = torch.randn(out_f, rank, generator=gen) @ torch.randn(rank, in_f, generator=gen) * 0.05
                mod.weight.add_(d)
                deltas[name] = d
            elif name.endswith("input_layernorm"):
                mod.weight.add_(torch.randn(mod.weight.shape, generator=gen) * 0.05)
        emb = model.model.embed_tokens.weight
        d = torch.randn(emb.shape[0], 3, generator=gen) @ torch.randn(3, emb.shape[1], generator=gen) * 0.05
        emb.add_(d)
        deltas["model.embed_tokens"] = d
    ft = root / "ft"
    model.save_pretrained(ft)
    wide = make_model(root / "wide", tiny_config("llama", hidden=48), seed=3)
    return {"base": base, "ft": ft, "wide": wide, "deltas": deltas}


def extract(out: Path, models, *args: str) -> subprocess.CompletedProcess:
    cmd = [str(SCRIPT), "--model", str(models["ft"]), "--base-model", str(models["base"]), "--out-path", str(out), "--quiet", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


_ids = torch.tensor([[0, 5, 17, 33, 60, 99, 3, 42, 11, 7]])


def logits_of(model) -> torch.Tensor:
    with torch.no_grad():
        return model(_ids).logits


def adapter_logits(models, out: Path) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(models["base"], dtype=torch.float32)
    return logits_of(PeftModel.from_pretrained(base, out).eval())


def ft_logits(models) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    return logits_of(AutoModelForCausalLM.from_pretrained(models["ft"], dtype=torch.float32).eval())


@pytest.fixture(scope="module")
def rank8(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("r8") / "adapter"
    proc = extract(out, models, "--max-rank", "8")
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.slow
def test_rank8_adapter_reproduces_finetune(models, rank8):
    files = sorted(p.name for p in rank8.iterdir())
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((rank8 / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["lora_alpha"] == 8 and cfg["rank_pattern"] == {}
    assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert set(cfg["modules_to_save"]) == {"embed_tokens", "lm_head", "input_layernorm"}  # post_attention_layernorm unchanged
    sd = load_file(rank8 / "adapter_model.safetensors")
    a, b = sd[f"base_model.model.{Q0}.lora_A.weight"], sd[f"base_model.model.{Q0}.lora_B.weight"]
    assert a.shape == (8, 32) and b.shape == (32, 8)
    assert "base_model.model.model.layers.2.input_layernorm.weight" in sd
    assert "base_model.model.model.norm.weight" not in sd
    for name, d in models["deltas"].items():
        if name in ("model.embed_tokens", "lm_head"):
            continue
        recon = sd[f"base_model.model.{name}.lora_B.weight"] @ sd[f"base_model.model.{name}.lora_A.weight"]
        torch.testing.assert_close(recon, d, atol=1e-5, rtol=0)
    # distribute-scale: A A^T = B^T B = diag(s)
    torch.testing.assert_close(a @ a.T, b.T @ b, atol=1e-5, rtol=0)
    torch.testing.assert_close(ft_logits(models), adapter_logits(models, rank8), atol=1e-4, rtol=0)
    card = (rank8 / "README.md").read_text()
    assert "library_name: peft" in card and "--max-rank 8" in card and str(models["ft"]) in card


@pytest.mark.slow
def test_rank2_error_is_the_discarded_singular_values(models, rank8, tmp_path):
    out = tmp_path / "r2"
    proc = extract(out, models, "--max-rank", "2", "--no-distribute-scale")
    assert proc.returncode == 0, proc.stderr
    sd = load_file(out / "adapter_model.safetensors")
    for name, d in models["deltas"].items():
        if name in ("model.embed_tokens", "lm_head"):
            continue
        a, b = sd[f"base_model.model.{name}.lora_A.weight"], sd[f"base_model.model.{name}.lora_B.weight"]
        assert a.shape[0] == 2
        torch.testing.assert_close(b.T @ b, torch.eye(2), atol=1e-5, rtol=0)  # no scale: B = U_r
        s = torch.linalg.svdvals(d.double())
        predicted = float((s[2:] ** 2).sum())
        err = float(((b @ a).double() - d.double()).pow(2).sum())
        assert err == pytest.approx(predicted, rel=1e-3, abs=1e-9), name
        if name != Q0:
            assert predicted > 1e-4  # the rank-4 deltas really lose something
    ft = ft_logits(models)
    err2 = (adapter_logits(models, out) - ft).abs().max()
    err8 = (adapter_logits(models, rank8) - ft).abs().max()
    assert err8 < 1e-4 < 1e-2 < err2


@pytest.mark.slow
def test_embed_lora_and_rank_pattern(models, tmp_path):
    out = tmp_path / "emb"
    proc = extract(out, models, "--max-rank", "8", "--embed-lora", "--sv-epsilon", "1e-4")
    assert proc.returncode == 0, proc.stderr
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 4
    assert cfg["rank_pattern"] == {Q0: 2, "model.embed_tokens": 3} == cfg["alpha_pattern"]
    assert "embed_tokens" in cfg["target_modules"] and "lm_head" in cfg["target_modules"]
    assert cfg["modules_to_save"] == ["input_layernorm"]
    sd = load_file(out / "adapter_model.safetensors")
    ea, eb = sd["base_model.model.model.embed_tokens.lora_embedding_A"], sd["base_model.model.model.embed_tokens.lora_embedding_B"]
    d = models["deltas"]["model.embed_tokens"]
    assert ea.shape == (3, d.shape[0]) and eb.shape == (d.shape[1], 3)
    torch.testing.assert_close(eb @ ea, d.T, atol=1e-5, rtol=0)
    torch.testing.assert_close(ft_logits(models), adapter_logits(models, out), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_skip_undecomposable_and_regexes(models, tmp_path):
    out = tmp_path / "skip"
    proc = extract(out, models, "--max-rank", "4", "--skip-undecomposable", "-e", r"mlp\.", "--save-module", "o_proj")
    assert proc.returncode == 0, proc.stderr
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj"}
    assert cfg["modules_to_save"][0] == "o_proj" and set(cfg["modules_to_save"]) == {"o_proj", "embed_tokens", "lm_head"}
    sd = load_file(out / "adapter_model.safetensors")
    assert not [k for k in sd if "mlp" in k or "layernorm" in k]
    ft = load_file(models["ft"] / "model.safetensors")
    assert torch.equal(sd["base_model.model.model.layers.1.self_attn.o_proj.weight"], ft["model.layers.1.self_attn.o_proj.weight"])


@pytest.mark.slow
@pytest.mark.parametrize("case", ["shape", "missing", "rank0"])
def test_bad_input_fails_cleanly(models, tmp_path, case):
    out = tmp_path / "out"
    if case == "shape":
        proc = extract(out, dict(models, base=models["wide"]), "--max-rank", "8")
        expected = "error: tensor model.layers.0.mlp.down_proj.weight: fine-tune"
    elif case == "missing":
        proc = extract(out, dict(models, base=tmp_path / "nowhere"))
        expected = "directory not found"
    else:
        proc = extract(out, models, "--max-rank", "0")
        expected = "--max-rank"
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    if case != "rank0":  # click's own usage errors add a usage line
        assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert expected in proc.stderr
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_transposed_weights_come_from_the_architecture_description(tmp_path):
    """The description marks exactly the weights of transformers' Conv1D modules as stored [in, out],
    under either GPT-2 spelling; a Llama has none."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    from merge_engine.architecture import transposed_weights
    from merge_engine.io import Checkpoint

    model_dir = make_model(tmp_path / "gpt2", tiny_config("gpt2"), seed=0)
    config = json.loads((model_dir / "config.json").read_text())
    names = set(Checkpoint(model_dir, "gpt2").tensors)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    expected = {f"{path}.weight" for path, mod in meta.named_modules() if isinstance(mod, Conv1D)}
    assert len(expected) == 4 * 4 and expected <= names
    assert transposed_weights(config, names) == expected
    bare = {n.removeprefix("transformer.") for n in names if n != "lm_head.weight"}  # GPT2Model's spelling
    assert transposed_weights(config, bare) == {n.removeprefix("transformer.") for n in expected}
    llama_dir = make_model(tmp_path / "llama", tiny_config("llama"), seed=0)
    llama_config = json.loads((llama_dir / "config.json").read_text())
    assert transposed_weights(llama_config, Checkpoint(llama_dir, "llama").tensors) == set()


@pytest.mark.slow
def test_extraction_with_a_cached_architecture_does_not_import_transformers(tmp_path, models):
    """Which weights are transposed is read from the cached description: a second extraction (new
    process) never imports transformers, which alone took ~2.4 s."""
    probe = (
        "import sys\n"
        "from merge_engine.extract_lora import main\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "print('transformers' in sys.modules)\n"
    )
    for i in range(2):
        out = tmp_path / f"adapter{i}"
        proc = subprocess.run([sys.executable, "-c", probe, "--model", str(models["ft"]), "--base-model",
                               str(models["base"]), "--out-path", str(out), "--max-rank", "4", "--quiet"],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
    assert load_file(tmp_path / "adapter0" / "adapter_model.safetensors").keys() == \
        load_file(tmp_path / "adapter1" / "adapter_model.safetensors").keys()


@pytest.mark.slow
def test_gpt2_conv1d_layers(tmp_path):
    """GPT-2's Conv1D weights are stored [in, out]: the factors are those of the transposed delta, the
    config says fan_in_fan_out, and PEFT applied to the base reproduces the fine-tune."""
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    base = make_model(tmp_path / "base", tiny_config("gpt2"), seed=0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    gen = torch.Generator().manual_seed(3)
    deltas = {}
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, Conv1D):
                n_in, n_out = mod.weight.shape
                d = torch.randn(n_in, 3, generator=gen) @ torch.randn(3, n_out, generator=gen) * 0.05
                mod.weight.add_(d)
                mod.bias.add_(torch.randn(n_out, generator=gen) * 0.05)
                deltas[name] = d
    model.save_pretrained(tmp_path / "ft")
    out = tmp_path / "adapter"
    proc = extract(out, {"ft": tmp_path / "ft", "base": base}, "--max-rank", "4")
    assert proc.returncode == 0, proc.stderr
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True and cfg["lora_bias"] is True
    assert set(cfg["target_modules"]) == {"c_attn", "c_proj", "c_fc"}
    sd = load_file(out / "adapter_model.safetensors")
    assert len(deltas) == 4 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj in each of 4 layers
    for name, d in deltas.items():
        a, b = sd[f"base_model.model.{name}.lora_A.weight"], sd[f"base_model.model.{name}.lora_B.weight"]
        assert a.shape == (4, d.shape[0]) and b.shape == (d.shape[1], 4)  # A [r, in], B [out, r]
        torch.testing.assert_close((b @ a).T, d, atol=1e-5, rtol=0)
    models = {"base": base, "ft": tmp_path / "ft"}
    torch.testing.assert_close(ft_logits(models), adapter_logits(models, out), atol=1e-4, rtol=0)
