"""The CUDA paths of the merge engine, the resident executor and mergekit-extract-lora (skipped
without CUDA; bench/gpu_check.sh runs this file first on a GPU machine, docs/gpu.md).

What is asserted, and why with these tolerances:
- resident on CUDA == streaming on CUDA, bit for bit: the engine's invariant (same recipe, seed,
  device and dtype), here on the device where it has never been checked.
- streaming on CUDA against streaming on CPU: the engine promises no bit equality across devices.
  The CPU runs the fused numba kernels (tensors of 16K entries and more) or torch's CPU ops, CUDA
  runs torch's CUDA ops; both round every op to the tensor's dtype, but CUDA may contract a
  multiply and an add into one FMA, and DARE's float64 L1 norms are summed in another order (a
  rescale factor may differ in its last bit, docs/methods.md). So: every entry within 1 ulp of
  the CPU's, except a share of at most 1e-3 (a last-bit difference can flip TIES's sign election
  or a top-k tie on an entry). Whether a merge was bit-equal is recorded, not asserted: with
  GPU_CHECK_NOTES set, each comparison appends a JSON line there and the GPU check's table
  counts them.
- extract-lora on CUDA against CPU: cuSOLVER's and LAPACK's SVDs and the two devices' random
  sketches differ in rounding, so the products B @ A (not the factors, whose signs are arbitrary)
  are compared, within 1e-4 of the delta's norm; modules saved whole are equal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

from helpers import make_model, read_model, tiny_config, write_yaml  # noqa: E402
from merge_engine.config import load_config, parse_config  # noqa: E402
from merge_engine.options import MergeOptions  # noqa: E402
from merge_engine.resident import ResidentMerger  # noqa: E402
from merge_engine.streaming import run_merge  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MISMATCH_SHARE = 1e-3

# name -> (merge_method, global parameters, per-model parameters, base_model: None, "base" or "a")
RECIPES = {
    "linear": ("linear", {}, {"weight": 0.6}, None),
    "task_arithmetic": ("task_arithmetic", {}, {"weight": 0.7}, "base"),
    "ties": ("ties", {}, {"weight": 0.6, "density": 0.5}, "base"),
    "dare_ties": ("dare_ties", {}, {"weight": 0.6, "density": 0.5}, "base"),
    "dare_linear": ("dare_linear", {}, {"weight": 0.5, "density": 0.6}, "base"),
    "della": ("della", {}, {"weight": 0.6, "density": 0.5, "epsilon": 0.1}, "base"),
    "breadcrumbs_ties": ("breadcrumbs_ties", {}, {"weight": 0.6, "density": 0.7, "gamma": 0.05}, "base"),
    "slerp": ("slerp", {"t": 0.3}, None, "a"),  # a and b, from a
    "model_stock": ("model_stock", {}, None, "base"),
}


def note(**fields) -> None:
    path = os.environ.get("GPU_CHECK_NOTES")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(fields) + "\n")


def recipe(models: dict, name: str, dtype: str, weight_scale: float = 1.0):
    method, global_params, per_model, base = RECIPES[name]
    entries = []
    for key in ("a", "b"):
        entry = {"model": str(models[key])}
        if per_model:
            entry["parameters"] = {k: (v * weight_scale if k == "weight" else v) for k, v in per_model.items()}
        entries.append(entry)
    data = {"merge_method": method, "models": entries, "dtype": dtype}
    if base:
        data["base_model"] = str(models[base])
    if global_params:
        data["parameters"] = dict(global_params)
    return parse_config(data, f"{name}.yml")


def stream(tmp_path: Path, config, device: str, name: str) -> dict[str, torch.Tensor]:
    out = tmp_path / name
    run_merge(config, out, MergeOptions(quiet=True, device=device, random_seed=0), config_text=config.to_yaml())
    return read_model(out)


def ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in units in the last place between same-signed floats of one dtype (large where
    the signs differ)."""
    ints = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[a.dtype]
    x, y = a.contiguous().view(ints).to(torch.int64), b.contiguous().view(ints).to(torch.int64)
    return (x - y).abs()


def compare(got: dict, ref: dict) -> dict:
    """Per output: how many entries differ at all, and how many by more than 1 ulp."""
    assert set(got) == set(ref)
    total = differ = far = 0
    for k in ref:
        assert got[k].dtype == ref[k].dtype and got[k].shape == ref[k].shape, k
        assert torch.isfinite(got[k]).all(), k
        d = ulps(got[k], ref[k])
        total += d.numel()
        differ += int((d > 0).sum())
        far += int((d > 1).sum())
    return {"total": total, "differ": differ, "far": far}


@pytest.fixture(scope="module")
def bf16_models(tmp_path_factory):
    """A bfloat16 llama base and two fine-tunes, hidden 128: the projections (16K entries and
    more) take the fused CPU kernels, as real models do."""
    root = tmp_path_factory.mktemp("bf16")
    cfg = tiny_config("llama", hidden=128, layers=2)
    base = make_model(root / "base", cfg, seed=0, dtype=torch.bfloat16)
    a = make_model(root / "ft_a", cfg, seed=1, base=base, dtype=torch.bfloat16, noise=0.01)
    b = make_model(root / "ft_b", cfg, seed=2, base=base, dtype=torch.bfloat16, noise=0.01)
    return {"base": base, "a": a, "b": b}


def pick_models(request, kind: str) -> dict:
    return request.getfixturevalue("llama_models" if kind == "float32" else "bf16_models")


# ----------------------------------------------------------------------------------------------
# streaming: CUDA against CPU


@pytest.mark.parametrize("kind", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", list(RECIPES))
def test_streaming_cuda_matches_cpu(tmp_path, request, name, kind):
    models = pick_models(request, kind)
    config = recipe(models, name, kind)
    on_cuda = stream(tmp_path, config, "cuda", "on_cuda")
    on_cpu = stream(tmp_path, config, "cpu", "on_cpu")
    c = compare(on_cuda, on_cpu)
    note(test="streaming cuda vs cpu", method=name, dtype=kind, bit_equal=c["differ"] == 0, **c)
    assert c["far"] <= MISMATCH_SHARE * c["total"], c


# ----------------------------------------------------------------------------------------------
# resident on CUDA: bit-equal to streaming on CUDA, first candidate and changed ones


@pytest.mark.parametrize("kind", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["linear", "task_arithmetic", "ties", "dare_ties", "della", "breadcrumbs_ties", "slerp"])
def test_resident_cuda_matches_streaming_cuda(tmp_path, request, name, kind):
    models = pick_models(request, kind)
    first = recipe(models, name, kind)
    merger = ResidentMerger(first, MergeOptions(quiet=True, device="cuda", random_seed=0))
    model = merger.build_model(first)
    assert next(model.parameters()).device.type == "cuda"
    for i, scale in enumerate((1.0, 0.5, 1.0)):  # a new candidate, then back: recomputed each time
        config = recipe(models, name, kind, weight_scale=scale) if name != "slerp" else parse_config(
            {**first.to_plain(), "parameters": {"t": 0.3 * (1 + scale)}}, "slerp.yml")
        stats = merger.apply(config)
        assert stats.recomputed > 0
        live = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        ref = stream(tmp_path, config, "cuda", f"stream{i}")
        for k, v in ref.items():
            assert torch.equal(live[k], v), f"{name} {kind} candidate {i}: {k} differs from the streaming merge"
    merger.close()


# ----------------------------------------------------------------------------------------------
# the CLIs with --device cuda (option parsing, device checks), as a user runs them


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env


def test_mergekit_yaml_cli_on_cuda(tmp_path, bf16_models):
    config = recipe(bf16_models, "dare_ties", "bfloat16")
    cfg = write_yaml(tmp_path / "r.yml", config.to_yaml())
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-m", "merge_engine.cli", str(cfg), str(out), "--device", "cuda", "--quiet"],
                          capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stderr
    loaded, _ = load_config(cfg)
    ref = stream(tmp_path, loaded, "cuda", "inproc")
    got = read_model(out)
    assert set(got) == set(ref)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k


# ----------------------------------------------------------------------------------------------
# extract-lora on CUDA


@pytest.fixture(scope="module")
def lora_pair(tmp_path_factory):
    """A base and a fine-tune with full-rank deltas (float32, hidden 64): the rank-8 factors are
    the truncated SVD of a generic matrix, not an exact low-rank delta."""
    root = tmp_path_factory.mktemp("lora")
    cfg = tiny_config("llama", hidden=64, layers=2)
    base = make_model(root / "base", cfg, seed=0)
    ft = make_model(root / "ft", cfg, seed=1, base=base, noise=0.02)
    return {"base": base, "ft": ft}


def _extract(pair, out: Path, device: str, rank: int) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    from merge_engine.extract_lora import extract_lora

    cfg = extract_lora(str(pair["ft"]), str(pair["base"]), out, max_rank=rank, device=device, quiet=True)
    return cfg, load_file(out / "adapter_model.safetensors")


def test_extract_lora_cuda_matches_cpu(tmp_path, lora_pair):
    """Rank 8 of 32-128-wide matrices: the exact SVD path on both devices (the randomized one,
    whose sketches differ between devices, is checked below against the optimum)."""
    cfg_gpu, gpu = _extract(lora_pair, tmp_path / "gpu", "cuda", 8)
    cfg_cpu, cpu = _extract(lora_pair, tmp_path / "cpu", "cpu", 8)
    cfg_gpu.pop("base_model_name_or_path"), cfg_cpu.pop("base_model_name_or_path")
    assert cfg_gpu == cfg_cpu
    assert set(gpu) == set(cpu)
    ft, base = read_model(lora_pair["ft"]), read_model(lora_pair["base"])
    checked = 0
    for name in cpu:
        if name.endswith("lora_A.weight"):
            b_name = name.replace("lora_A", "lora_B")
            prod_gpu = gpu[b_name].double() @ gpu[name].double()
            prod_cpu = cpu[b_name].double() @ cpu[name].double()
            module = name[len("base_model.model."): -len(".lora_A.weight")]
            delta = (ft[module + ".weight"].double() - base[module + ".weight"].double())
            scale = float(torch.linalg.matrix_norm(delta))
            assert float(torch.linalg.matrix_norm(prod_gpu - prod_cpu)) <= 1e-4 * scale, name
            checked += 1
        elif "lora_" not in name:
            assert torch.equal(gpu[name], cpu[name]), name
    assert checked >= 7 * 2  # every projection of both layers


def test_randomized_svd_on_cuda():
    """The randomized range finder (docs/extract-lora.md) on CUDA: within 1 % of the exact
    rank-r optimum, as on CPU, on a slowly decaying spectrum."""
    from merge_engine.extract_lora import top_singular_triplets

    gen = torch.Generator().manual_seed(0)
    m, n, r = 600, 1200, 32
    u, _ = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, m, generator=gen, dtype=torch.float64))
    s = torch.arange(1, m + 1, dtype=torch.float64) ** -0.7
    a = ((u * s) @ v.T).float()
    optimum = float(s[r:].square().sum().sqrt())
    errors = {}
    for device in ("cpu", "cuda"):
        x = a.to(device)
        uu, ss, vh = top_singular_triplets(x, r)
        assert uu.device.type == device
        errors[device] = float(torch.linalg.matrix_norm(x - (uu * ss) @ vh).cpu()) / optimum
    assert errors["cuda"] <= 1.01, errors
    assert abs(errors["cuda"] - errors["cpu"]) <= 0.005, errors


# ----------------------------------------------------------------------------------------------
# the gradient search's chain rule on CUDA (evaluators.descent; lm-eval is not on the GPU machine,
# so the engine's part is checked here: per-weight gradients of resident merges)


@pytest.mark.parametrize("name", ["linear", "task_arithmetic"])
@pytest.mark.parametrize("kind", ["float32", "bfloat16"])
def test_weight_gradients_on_cuda_match_cpu(request, name, kind):
    """dL/d(each model's weight) of every merged tensor, L = sum(G * merged) with a fixed random
    G: on CUDA within 1e-3 (relative to the largest) of the CPU's (float32 sums in other orders)."""
    models = pick_models(request, kind)
    config = recipe(models, name, kind)
    got = {}
    for device in ("cpu", "cuda"):
        merger = ResidentMerger(config, MergeOptions(quiet=True, device=device, random_seed=0))
        out = {}
        for task in merger.plan(config).tasks:
            shape = tuple(task.out.shape)
            grad = torch.randn(shape, generator=torch.Generator().manual_seed(len(out))).to(device=device, dtype=task.out.dtype)
            out[task.out.name] = merger.weight_gradients(task, grad)
        got[device] = out
        merger.close()
    scale = max(abs(g) for gs in got["cpu"].values() for g in gs)
    for key, cpu in got["cpu"].items():
        assert got["cuda"][key] == pytest.approx(cpu, abs=1e-3 * scale), key
