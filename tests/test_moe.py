"""mergekit-moe: Mixtral / Qwen3-MoE / Qwen2-MoE outputs from tiny dense models, checked by loading
them in stock transformers, against the dense weights, and against the dense base's logits."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from helpers import make_model, read_model, tiny_config, write_yaml
from merge_engine.moe import main as moe_main

FLAG = "--i-understand-this-is-not-useful-without-training"
TOPICS = {
    "fox": ["The quick brown fox jumps over the lazy dog.", "The lazy dog sleeps while the fox jumps."],
    "math": ["One plus two is three.", "Two plus two is four. One plus one is two."],
    "geo": ["The capital of France is Paris.", "The capital of Italy is Rome."],
}


def run_moe(config: Path, out: Path, *flags: str):
    result = CliRunner().invoke(moe_main, [str(config), str(out), "--quiet", *flags])
    return result


def build(tmp_path: Path, text: str, *flags: str, name: str = "out") -> Path:
    cfg = write_yaml(tmp_path / f"{name}.yml", text)
    out = tmp_path / name
    result = run_moe(cfg, out, *flags)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return out


def experts_yaml(models, prompts=True) -> str:
    lines = []
    for (topic, ps), m in zip(TOPICS.items(), models):
        lines.append(f"  - source_model: {m}")
        if prompts:
            lines.append(f"    positive_prompts: {ps!r}".replace("'", '"'))
    return "\n".join(lines)


def load(out: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()


def generates(model) -> None:
    ids = torch.tensor([[0, 5, 6, 7]])
    gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 8)


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


def check_expert_slices(out: Path, experts: list[Path], layers: int) -> None:
    """Expert e's fused slices are that expert's dense weights, exactly."""
    moe = read_model(out)
    dense = [read_model(p) for p in experts]
    for i in range(layers):
        gu = moe[f"model.layers.{i}.mlp.experts.gate_up_proj"]
        dn = moe[f"model.layers.{i}.mlp.experts.down_proj"]
        assert gu.shape[0] == dn.shape[0] == len(experts)
        for e, d in enumerate(dense):
            I = d[f"model.layers.{i}.mlp.gate_proj.weight"].shape[0]
            assert torch.equal(gu[e, :I], d[f"model.layers.{i}.mlp.gate_proj.weight"])
            assert torch.equal(gu[e, I:], d[f"model.layers.{i}.mlp.up_proj.weight"])
            assert torch.equal(dn[e], d[f"model.layers.{i}.mlp.down_proj.weight"])


# ----------------------------------------------------------------------------------------------
# Mixtral


def _base_and_two_finetunes(tmp_path_factory, family: str) -> dict:
    root = tmp_path_factory.mktemp(family)
    cfg = tiny_config(family)
    base = make_model(root / "base", cfg, seed=0)
    return {"base": base, "a": make_model(root / "a", cfg, seed=1, base=base), "b": make_model(root / "b", cfg, seed=2, base=base)}


@pytest.fixture(scope="module")
def mistral_models(tmp_path_factory):
    return _base_and_two_finetunes(tmp_path_factory, "mistral")


@pytest.fixture(scope="module")
def qwen3_models(tmp_path_factory):
    return _base_and_two_finetunes(tmp_path_factory, "qwen3")


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_mixtral_builds_loads_generates(tmp_path, family, llama_models, mistral_models):
    models = llama_models if family == "llama" else mistral_models
    experts = [models["base"], models["a"], models["b"]]
    out = build(tmp_path, f"base_model: {models['base']}\ngate_mode: cheap_embed\nexperts_per_token: 2\nexperts:\n{experts_yaml(experts)}\n")
    import json

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["MixtralForCausalLM"] and cfg["model_type"] == "mixtral"
    assert cfg["num_local_experts"] == 3 and cfg["num_experts_per_tok"] == 2
    assert cfg["intermediate_size"] == 64 and cfg["sliding_window"] is None
    assert (out / "mergekit_moe_config.yml").is_file() and (out / "README.md").is_file()
    assert (out / "tokenizer.json").read_bytes() == (models["base"] / "tokenizer.json").read_bytes()
    tensors = read_model(out)
    assert tensors["model.layers.0.mlp.gate.weight"].shape == (3, 32)
    assert tensors["model.layers.0.mlp.experts.gate_up_proj"].shape == (3, 128, 32)
    assert tensors["model.layers.0.mlp.experts.down_proj"].shape == (3, 32, 64)
    check_expert_slices(out, experts, 4)
    base = read_model(models["base"])
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.2.self_attn.k_proj.weight", "model.norm.weight"):
        assert torch.equal(tensors[name], base[name])
    model = load(out)
    assert type(model).__name__ == "MixtralForCausalLM"
    generates(model)


def _same_expert_logits(tmp_path, models, k: int, seed: int):
    """Every expert is the base's own MLP: with normalised top-k weights the MoE is the dense base,
    whatever the (random) routing."""
    base = models["base"]
    text = f"base_model: {base}\ngate_mode: random\nexperts_per_token: {k}\nexperts:\n" + "".join(
        f"  - source_model: {base}\n" for _ in range(4)
    )
    out = build(tmp_path, text, FLAG, "--random-seed", str(seed))
    moe, dense = load(out), load(base)
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(seed))
    ref = logits(dense, ids)
    got = logits(moe, ids)
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-4), (got - ref).abs().max()
    # the router really routes: different tokens pick different experts somewhere
    G = read_model(out)["model.layers.0.mlp.gate.weight"]
    picks = (dense.model.embed_tokens(ids).reshape(-1, 32) @ G.T).argmax(-1)
    assert len(set(picks.tolist())) > 1
    return out


@pytest.mark.parametrize("k", [1, 2])
def test_mixtral_of_base_experts_is_the_dense_base(tmp_path, llama_models, k):
    _same_expert_logits(tmp_path, llama_models, k, seed=k)


def test_cheap_embed_rows_are_prompt_embeddings(tmp_path, llama_models):
    from transformers import AutoTokenizer

    experts = [llama_models["a"], llama_models["b"]]
    neg = "Evolutionary search finds good merge recipes."
    text = (
        f"base_model: {llama_models['base']}\ngate_mode: cheap_embed\nexperts:\n{experts_yaml(experts)}\n"
        f'    negative_prompts: ["{neg}"]\n'
    )
    out = build(tmp_path, text)
    G = torch.stack([read_model(out)[f"model.layers.{i}.mlp.gate.weight"] for i in range(4)])
    for i in range(1, 4):
        assert torch.equal(G[i], G[0])
    tok = AutoTokenizer.from_pretrained(llama_models["base"])
    E = read_model(llama_models["base"])["model.embed_tokens.weight"]

    def vec(prompts):
        v = torch.zeros(32)
        for p in prompts:
            for t in [tok.bos_token_id] + tok.encode(p, add_special_tokens=False):
                v += E[t]
        return v / v.norm()

    want0 = vec(TOPICS["fox"])
    want1 = vec(TOPICS["math"]) - vec([neg])
    want1 = want1 / want1.norm()
    assert torch.allclose(G[0, 0], want0, atol=1e-6)
    assert torch.allclose(G[0, 1], want1, atol=1e-6)


def test_random_gates_reproducible_and_need_the_flag(tmp_path, llama_models):
    base = llama_models["base"]
    text = f"base_model: {base}\ngate_mode: random\nexperts:\n  - source_model: {llama_models['a']}\n  - source_model: {llama_models['b']}\n"
    cfg = write_yaml(tmp_path / "r.yml", text)
    refused = run_moe(cfg, tmp_path / "refused")
    assert refused.exit_code == 2 and "--i-understand-this-is-not-useful-without-training" in refused.output
    assert not (tmp_path / "refused").exists()
    gates = []
    for name, seed in (("s1", "7"), ("s2", "7"), ("s3", "8")):
        assert run_moe(cfg, tmp_path / name, FLAG, "--random-seed", seed).exit_code == 0
        gates.append(torch.stack([read_model(tmp_path / name)[f"model.layers.{i}.mlp.gate.weight"] for i in range(4)]))
    assert torch.equal(gates[0], gates[1])
    assert not torch.allclose(gates[0], gates[2])
    # standard normal draws from a generator seeded with --random-seed (not the global RNG)
    assert torch.equal(gates[0], torch.randn(4, 2, 32, generator=torch.Generator().manual_seed(7)))


# ----------------------------------------------------------------------------------------------
# Hidden-state routers


@pytest.fixture(scope="module")
def topic_experts(tmp_path_factory, llama_models):
    """Three stand-in fine-tunes of the llama base, one per topic."""
    root = tmp_path_factory.mktemp("topic")
    cfg = tiny_config("llama")
    return [make_model(root / t, cfg, seed=10 + i, base=llama_models["base"], noise=0.02) for i, t in enumerate(TOPICS)]


@torch.no_grad()
def _layer_inputs(model, tok, prompt: str) -> torch.Tensor:
    """[L, H]: the hidden state entering each layer at the prompt's last token, prompt alone."""
    ids = torch.tensor([[tok.bos_token_id] + tok.encode(prompt, add_special_tokens=False)])
    hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    return torch.stack([h[0, -1] for h in hs[: model.config.num_hidden_layers]])


def test_hidden_rows_are_mean_layer_inputs(tmp_path, llama_models, topic_experts):
    from transformers import AutoTokenizer

    neg = "Evolutionary search finds good merge recipes."
    text = f"base_model: {llama_models['base']}\ngate_mode: hidden\nexperts:\n{experts_yaml(topic_experts)}\n"
    text += f'    negative_prompts: ["{neg}", "Merging models combines what each fine-tune learned."]\n'
    out = build(tmp_path, text)
    G = torch.stack([read_model(out)[f"model.layers.{i}.mlp.gate.weight"] for i in range(4)])  # [L, E, H]
    base, tok = load(llama_models["base"]), AutoTokenizer.from_pretrained(llama_models["base"])
    # one prompt at a time, no padding: the batched, left-padded computation must agree
    for e, (topic, prompts) in enumerate(TOPICS.items()):
        v = sum(_layer_inputs(base, tok, p) for p in prompts) / len(prompts)
        if e == 2:
            negs = [neg, "Merging models combines what each fine-tune learned."]
            v = v - sum(_layer_inputs(base, tok, p) for p in negs) / 2
        want = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-8)  # layer 0: same last token "." -> 0
        assert torch.allclose(G[:, e], want, atol=1e-5), (e, (G[:, e] - want).abs().max())


@pytest.mark.slow
def test_hidden_routing_sends_prompts_to_their_expert(tmp_path, llama_models, topic_experts):
    from transformers import AutoTokenizer

    text = f"base_model: {llama_models['base']}\ngate_mode: hidden\nexperts_per_token: 1\nexperts:\n{experts_yaml(topic_experts)}\n"
    out = build(tmp_path, text)
    moe, tok = load(out), AutoTokenizer.from_pretrained(out)
    hits = torch.zeros(4)
    total = 0
    for e, prompts in enumerate(TOPICS.values()):
        for p in prompts:
            h = _layer_inputs(moe, tok, p)  # the output model's own layer inputs
            total += 1
            for i, layer in enumerate(moe.model.layers):
                hits[i] += (layer.mlp.gate.weight @ h[i]).argmax().item() == e
    print(f"routing: expert's own prompts top-1 per layer {hits.tolist()} of {total}; all layers {hits.sum() / (4 * total):.2f}")
    # Layer 0's input is the last token's embedding, and every prompt ends in ".": that layer cannot
    # tell the topics apart; from layer 1 on the context decides.
    assert hits.sum() / (4 * total) >= 0.75
    assert hits[1:].sum() / (3 * total) >= 0.9


# ----------------------------------------------------------------------------------------------
# Qwen3-MoE and Qwen2-MoE


def test_qwen3_moe_builds_loads_generates(tmp_path, qwen3_models):
    import json

    experts = [qwen3_models["a"], qwen3_models["b"]]
    out = build(tmp_path, f"base_model: {qwen3_models['base']}\ngate_mode: cheap_embed\nexperts_per_token: 1\nexperts:\n{experts_yaml(experts)}\n")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3MoeForCausalLM"] and cfg["model_type"] == "qwen3_moe"
    assert (cfg["num_local_experts"], cfg["num_experts"], cfg["num_experts_per_tok"], cfg["moe_intermediate_size"]) == (2, 2, 1, 64)
    assert cfg["norm_topk_prob"] is True and cfg["decoder_sparse_step"] == 1 and cfg["mlp_only_layers"] == []
    tensors = read_model(out)
    assert tensors["model.layers.1.mlp.experts.gate_up_proj"].shape == (2, 128, 32)
    assert tensors["model.layers.1.mlp.experts.down_proj"].shape == (2, 32, 64)
    assert tensors["model.layers.1.mlp.gate.weight"].shape == (2, 32)
    base = read_model(qwen3_models["base"])
    assert torch.equal(tensors["model.layers.3.self_attn.q_norm.weight"], base["model.layers.3.self_attn.q_norm.weight"])
    check_expert_slices(out, experts, 4)
    model = load(out)
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    generates(model)


@pytest.mark.parametrize("k", [1, 2])
def test_qwen3_moe_of_base_experts_is_the_dense_base(tmp_path, qwen3_models, k):
    out = _same_expert_logits(tmp_path, qwen3_models, k, seed=10 + k)
    assert type(load(out)).__name__ == "Qwen3MoeForCausalLM"


@pytest.fixture(scope="module")
def qwen2_models(tmp_path_factory):
    return _base_and_two_finetunes(tmp_path_factory, "qwen2")


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_qwen2_moe_with_a_shared_expert(tmp_path, family, llama_models, mistral_models, qwen2_models):
    import json

    models = {"llama": llama_models, "mistral": mistral_models, "qwen2": qwen2_models}[family]
    experts = [models["a"], models["b"]]
    text = (
        f"base_model: {models['base']}\ngate_mode: hidden\narchitecture: qwen\nexperts:\n{experts_yaml(experts)}\n"
        f"shared_experts:\n  - source_model: {models['base']}\n    positive_prompts: [\"The capital of France is Paris.\"]\n"
        "    residual_scale: 0.5\n"
    )
    out = build(tmp_path, text)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2MoeForCausalLM"] and cfg["model_type"] == "qwen2_moe"
    assert (cfg["num_experts"], cfg["num_experts_per_tok"]) == (2, 2)
    assert cfg["moe_intermediate_size"] == cfg["shared_expert_intermediate_size"] == 64
    assert cfg["norm_topk_prob"] is True and cfg["use_sliding_window"] is False
    t, base = read_model(out), read_model(models["base"])
    check_expert_slices(out, experts, 4)
    for i in range(4):
        p = f"model.layers.{i}"
        assert torch.equal(t[f"{p}.mlp.shared_expert.gate_proj.weight"], base[f"{p}.mlp.gate_proj.weight"])
        assert torch.equal(t[f"{p}.mlp.shared_expert.up_proj.weight"], base[f"{p}.mlp.up_proj.weight"])
        assert torch.equal(t[f"{p}.mlp.shared_expert.down_proj.weight"], base[f"{p}.mlp.down_proj.weight"] * 0.5)
        assert t[f"{p}.mlp.shared_expert_gate.weight"].shape == (1, 32)
        assert torch.allclose(t[f"{p}.mlp.shared_expert_gate.weight"].norm(), torch.tensor(1.0)) or i == 0
        for proj, n in (("q", 32), ("k", 16), ("v", 16)):
            bias = t[f"{p}.self_attn.{proj}_proj.bias"]
            want = base.get(f"{p}.self_attn.{proj}_proj.bias", torch.zeros(n))  # llama has none: zeros
            assert torch.equal(bias, want)
    model = load(out)
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    generates(model)


# ----------------------------------------------------------------------------------------------
# Bad input through the real console script: exit 2, one line naming the problem, no output


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("wide") / "m", tiny_config("llama", hidden=48), seed=3)


BAD = {
    "other_architecture": (
        "base_model: {base}\ngate_mode: cheap_embed\nexperts:\n  - source_model: {a}\n    positive_prompts: [x]\n"
        "  - source_model: {qwen3}\n    positive_prompts: [y]\n",
        "different model_types",
    ),
    "other_hidden_size": (
        "base_model: {base}\ngate_mode: cheap_embed\nexperts:\n  - source_model: {a}\n    positive_prompts: [x]\n"
        "  - source_model: {wide}\n    positive_prompts: [y]\n",
        "hidden_size 48",
    ),
    "qwen2_moe_without_shared": (
        "base_model: {base}\narchitecture: qwen\ngate_mode: cheap_embed\nexperts:\n  - source_model: {a}\n"
        "    positive_prompts: [x]\n  - source_model: {b}\n    positive_prompts: [y]\n",
        "exactly one shared expert (the recipe has 0)",
    ),
    "qwen2_moe_two_shared": (
        "base_model: {base}\narchitecture: qwen\ngate_mode: cheap_embed\nexperts:\n  - source_model: {a}\n"
        "    positive_prompts: [x]\n  - source_model: {b}\n    positive_prompts: [y]\nshared_experts:\n"
        "  - source_model: {base}\n    positive_prompts: [z]\n  - source_model: {a}\n    positive_prompts: [w]\n",
        "exactly one shared expert (the recipe has 2)",
    ),
    "empty_positive_prompts": (
        "base_model: {base}\nexperts:\n  - source_model: {a}\n    positive_prompts: [x]\n"
        "  - source_model: {b}\n    positive_prompts: []\n",
        "experts[1].positive_prompts",
    ),
    "missing_positive_prompts": (
        "base_model: {base}\ngate_mode: hidden\nexperts:\n  - source_model: {a}\n    positive_prompts: [x]\n"
        "  - source_model: {b}\n",
        "experts[1].positive_prompts",
    ),
    "deepseek": (
        "base_model: {base}\narchitecture: deepseek\ngate_mode: cheap_embed\nexperts:\n  - source_model: {a}\n"
        "    positive_prompts: [x]\n  - source_model: {b}\n    positive_prompts: [y]\n",
        "trust_remote_code",
    ),
    "missing_base": ("experts:\n  - source_model: {a}\n", "missing required key 'base_model'"),
    "too_few_experts": (
        "base_model: {base}\nexperts_per_token: 3\nexperts:\n  - source_model: {a}\n    positive_prompts: [x]\n"
        "  - source_model: {b}\n    positive_prompts: [y]\n",
        "experts_per_token",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_recipes_fail_cleanly(tmp_path, case, llama_models, qwen3_models, wide_llama):
    text, expected = BAD[case]
    names = dict(base=llama_models["base"], a=llama_models["a"], b=llama_models["b"], qwen3=qwen3_models["a"], wide=wide_llama)
    cfg = write_yaml(tmp_path / "bad.yml", text.format(**names))
    out = tmp_path / "out"
    script = Path(sys.executable).parent / "mergekit-moe"
    proc = subprocess.run([str(script), str(cfg), str(out), "--quiet"], capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], proc.stderr
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temporary folder left


def test_noise_scale_and_uniform_random(tmp_path, llama_models):
    base, a = llama_models["base"], llama_models["a"]
    text = (
        f"base_model: {base}\ngate_mode: uniform_random\nexperts:\n  - source_model: {a}\n    noise_scale: 0.5\n"
        f"  - source_model: {base}\n"
    )
    out = build(tmp_path, text, FLAG, "--random-seed", "3")
    t, dense_a, dense_base = read_model(out), read_model(a), read_model(base)
    # uniform_random: U(-1/sqrt(H), 1/sqrt(H)) from the seeded generator
    want = (torch.rand(4, 2, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1) / 32**0.5
    assert torch.equal(t["model.layers.2.mlp.gate.weight"], want[2])
    # noise only on the expert that asks for it, with the requested spread
    diff = t["model.layers.1.mlp.experts.down_proj"][0] - dense_a["model.layers.1.mlp.down_proj.weight"]
    assert 0.4 < diff.std().item() < 0.6
    assert torch.equal(t["model.layers.1.mlp.experts.down_proj"][1], dense_base["model.layers.1.mlp.down_proj.weight"])
    again = build(tmp_path, text, FLAG, "--random-seed", "3", name="again")
    assert torch.equal(read_model(again)["model.layers.1.mlp.experts.gate_up_proj"], t["model.layers.1.mlp.experts.gate_up_proj"])


def test_experts_per_token_null_means_two():
    from merge_engine.moe.config import parse_moe_config

    recipe = {"base_model": "./b", "experts": [{"source_model": "./a", "positive_prompts": ["x"]}] * 3}
    assert parse_moe_config({**recipe, "experts_per_token": None}, "moe.yml").experts_per_token == 2
    assert parse_moe_config({**recipe, "experts_per_token": 3}, "moe.yml").experts_per_token == 3
