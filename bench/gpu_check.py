#!/usr/bin/env python3
"""The first-GPU check: install, CUDA tests, `--device cuda` streaming merges, resident candidates.

    bash bench/gpu_check.sh [--dry-run] [--budget S] [--work-dir DIR] [--layers N] [--repeats N]
                            [--no-density] [--device cpu|cuda] [--shape 7b|tiny] [--wheels DIR]

(`gpu_check.sh` only picks the interpreter and puts a hard time limit around this driver;
docs/gpu.md is the user's page.) On a bare GPU machine (Python 3.12, torch with CUDA,
transformers, numba, safetensors; no package index) it runs, each step in its own process under its
own timeout, within one overall budget:

1. `wheels`: from bench_output/gpu_wheels (made here by bench/gpu_wheels.sh), installs into a
   private folder put first on PYTHONPATH the wheels of every package the engine and the tests
   import (ROOTS) that the machine lacks or has too old, with the requirements their metadata
   lists, followed the same way; what the machine has stays in use.
2. `env`: imports every engine module the check uses, reports versions and the GPU.
3. `cuda tests`: pytest on the tests that need CUDA (tests/test_cuda_paths.py and the older CUDA
   test in tests/test_outputs.py).
4. `generate`: three Llama-2-7B-shaped bf16 checkpoints (hidden 4096, intermediate 11008, 32
   heads, vocab 32000; 4 of the 32 layers: 1.07B parameters, 2.14 GB each), a base and two
   fine-tunes, drawn on the GPU and written through the engine's writer.
5. `startup` (python + torch + merge_engine + CUDA init; the process then derives the model's
   architecture once, which the engine caches on disk, untimed) and `io floor` (plain reads of the
   three inputs, a plain write of one output's bytes: bench/merge_throughput.py's I/O floor).
6. `stream linear|ties|dare_ties`: `mergekit-yaml --device cuda` (python -m merge_engine.cli),
   recipes of bench/merge_throughput.py; ratio = (wall - startup) / the I/O floor of its inputs.
7. `resident linear|ties|dare_ties` (one process): bench/resident_merge.py's candidates in a
   ResidentMerger on the GPU; first the recipe itself, compared bit for bit with the streaming
   output; then candidates with new weights (and, rows `+dens`, new densities too), each timed
   against the copy floor (`dst.copy_(src)` over every parameter, interleaved): the HBM copy floor
   on a GPU.
8. `extract-lora`: `mergekit-extract-lora --device cuda --max-rank 32` of one fine-tune, and the
   randomized SVD's error against the exact rank-32 optimum on two modules.

It prints one table (step, status, result, time, ratio) to stdout and, when $OUT is set, writes
$OUT/gpu_check.txt (the table, rewritten after every step), gpu_check.json (every number),
gpu_check.log (the steps' output) and gpu_tests.txt (pytest's output). Exit 0 when every step
passed.

`--dry-run`: the same steps on CPU at a tiny shape (hidden 256, 2 layers), no wheel install
(tests/test_gpu_check.py runs it). `--device cpu --shape tiny` with PYTHON set to a bare
interpreter rehearses the whole check, install included, on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))  # bench/ modules (merge_throughput, resident_merge): stdlib at import

GB = 1e9
# Llama-2-7B's shape (num_key_value_heads = heads: no GQA), 4 of its 32 layers
SEVEN_B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=4, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000)
TINY = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=2048)
METHODS = ("linear", "ties", "dare_ties")
DENSITY_METHODS = ("ties", "dare_ties")
LORA_RANK = 32
LORA_RANK_TINY = 8
CUDA_TESTS = ("tests/test_cuda_paths.py", "tests/test_outputs.py::test_cuda_merge_matches_cpu")
WHEEL_DIR = REPO / "bench_output" / "gpu_wheels"

# per-step time limits (s) on the GPU machine; the overall budget cuts them further
LIMITS = {"wheels": 90, "env": 120, "cuda tests": 200, "generate": 150, "startup": 60, "io floor": 90,
          "stream": 150, "resident": 400, "extract-lora": 150, "lora error": 90}
DRY_LIMITS = {k: 60 for k in LIMITS} | {"cuda tests": 90, "resident": 120}


# ----------------------------------------------------------------------------------------------
# Rows of the table


@dataclass
class Row:
    step: str
    status: str = "..."  # ok, FAIL, TIMEOUT, skip
    result: str = ""
    seconds: Optional[float] = None
    ratio: str = ""
    data: dict = field(default_factory=dict)


def fmt_seconds(s: Optional[float]) -> str:
    if s is None:
        return ""
    if s < 0.1:
        return f"{s * 1000:.2f}ms"
    return f"{s:.2f}s" if s < 10 else f"{s:.1f}s"


def render(rows: list[Row], header: list[str]) -> str:
    wide = max([10, *(len(r.result) for r in rows)])
    lines = list(header)
    lines.append(f"{'step':<24} {'status':<7} {'result':<{wide}} {'time':>9} {'ratio':>11}")
    lines.append("-" * (24 + 1 + 7 + 1 + wide + 1 + 9 + 1 + 11))
    for r in rows:
        lines.append(f"{r.step:<24} {r.status:<7} {r.result:<{wide}} {fmt_seconds(r.seconds):>9} {r.ratio:>11}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Wheels: which carried wheels this machine needs (stdlib only: runs before anything is installed)


# What the engine and this check import, with the lowest versions that will do (pyproject.toml):
# the machine's own copy is used wherever it satisfies these; a carried wheel is installed only
# for a package that is missing or too old, and then with the requirements its metadata lists.
ROOTS = {"pydantic": ">=2.5", "click": ">=8.1", "pyyaml": ">=6", "tqdm": ">=4.66", "pytest": ">=8",
         "transformers": ">=5,<6"}

# Hard requirements in the metadata of the carried transformers group that nothing here imports:
# left out of the wheel set (a bare virtualenv imported transformers' model classes, the hub and
# the tokenizers without them; docs/gpu.md).
UNNEEDED = {"hf-xet": "hub downloads through Xet storage (the check is offline)",
            "typer": "the transformers and hub command lines", "kernels": "hub-hosted compute kernels"}


def norm_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def release(version: str) -> tuple[int, ...]:
    m = re.match(r"\d+(\.\d+)*", version.strip())
    return tuple(int(x) for x in m.group().split(".")) if m else ()


def installed_version(name: str) -> Optional[str]:
    from importlib import metadata

    for candidate in dict.fromkeys((name, name.replace("-", "_"), name.replace("-", "."))):
        try:
            return metadata.version(candidate)
        except metadata.PackageNotFoundError:
            continue
    return None


def satisfies(version: str, spec: str) -> bool:
    """`version` against a PEP 440 specifier such as '>=2.4,<3' (release numbers only: pre- and
    dev-release tags are ignored, which is all these pins need)."""
    v = release(version)
    for clause in filter(None, (c.strip() for c in spec.split(","))):
        m = re.fullmatch(r"(~=|===|==|!=|<=|>=|<|>)\s*(\S+)", clause)
        if not m:
            raise ValueError(f"unsupported version specifier {clause!r}")
        op, target = m.groups()
        if op in ("==", "!=") and target.endswith(".*"):
            prefix = release(target[:-2])
            ok = v[: len(prefix)] == prefix
            if ok != (op == "=="):
                return False
            continue
        t = release(target)
        width = max(len(v), len(t))
        a, b = v + (0,) * (width - len(v)), t + (0,) * (width - len(t))
        ok = {"==": a == b, "===": a == b, "!=": a != b, "<=": a <= b, ">=": a >= b, "<": a < b, ">": a > b,
              "~=": a >= b and v[: len(t) - 1] == t[:-1]}[op]
        if not ok:
            return False
    return True


def marker_applies(marker: str) -> bool:
    """A Requires-Dist environment marker on this interpreter; requirements of extras never apply."""
    import platform

    if re.search(r"\bextra\b", marker):
        return False
    env = {"python_version": "%d.%d" % sys.version_info[:2], "python_full_version": platform.python_version(),
           "platform_machine": platform.machine(), "sys_platform": sys.platform, "platform_system": platform.system(),
           "os_name": os.name, "implementation_name": sys.implementation.name,
           "platform_python_implementation": platform.python_implementation()}

    def compare(m) -> str:
        var, op, value = m.group(1), m.group(2), m.group(3)
        if var in ("python_version", "python_full_version"):
            return str(satisfies(env[var], op + value))
        have = env.get(var, "")
        return str({"==": have == value, "!=": have != value, "in": have in value, "not in": have not in value}.get(op, False))

    expr = re.sub(r"(\w+)\s*(==|!=|<=|>=|<|>|~=|not in|in)\s*[\"']([^\"']*)[\"']", compare, marker)
    if not re.fullmatch(r"[\s()]*((True|False|and|or|not)[\s()]*)*", expr):
        raise ValueError(f"unsupported environment marker {marker!r}")
    return bool(eval(expr, {"__builtins__": {}}))  # only True/False/and/or/not/parentheses remain


def wheel_requirements(path: Path) -> list[tuple[str, str]]:
    """(name, specifier) of a wheel's Requires-Dist lines that apply here."""
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        text = z.read(meta).decode("utf-8", "replace")
    out = []
    for line in text.split("\n\n")[0].splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req, _, marker = line[len("Requires-Dist:"):].partition(";")
        if marker.strip() and not marker_applies(marker):
            continue
        m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*\(?([^)]*)\)?", req)
        out.append((norm_name(m.group(1)), m.group(3).replace(" ", "")))
    return out


def select_wheels(wheel_dir: Path, roots: Optional[dict] = None) -> tuple[list[Path], list[str], list[str]]:
    """(wheels to install, 'name version' of what the machine already has, notes): the carried
    wheels of every root package the machine lacks or has too old, with their requirements,
    followed the same way."""
    wheels: dict[str, tuple[str, Path]] = {}
    for w in sorted(wheel_dir.glob("*.whl")):
        name, version = w.name.split("-")[:2]
        key = norm_name(name)
        if key in wheels:
            raise SystemExit(f"two wheels of {key} in {wheel_dir}: keep one version (bench/gpu_wheels.sh)")
        wheels[key] = (version, w)
    chosen: dict[str, Path] = {}
    present: dict[str, str] = {}
    skipped: set[str] = set()

    def require(name: str, spec: str, why: str) -> None:
        name = norm_name(name)
        if name in UNNEEDED and why != "the engine":
            skipped.add(name)
            return
        if name in chosen:
            if not satisfies(wheels[name][0], spec):
                raise SystemExit(f"{why} needs {name}{spec}; the carried {wheels[name][1].name} does not fit")
            return
        have = installed_version(name)
        if have is not None and satisfies(have, spec):
            present[name] = have
            return
        if name not in wheels:
            raise SystemExit(f"{why} needs {name}{spec}: this machine has {have or 'none'} and no wheel is carried")
        if not satisfies(wheels[name][0], spec):
            raise SystemExit(f"{why} needs {name}{spec}: the carried {wheels[name][1].name} does not fit")
        chosen[name] = wheels[name][1]
        present.pop(name, None)
        for dep, dep_spec in wheel_requirements(wheels[name][1]):
            require(dep, dep_spec, f"{name} {wheels[name][0]}")

    for name, spec in (ROOTS if roots is None else roots).items():
        require(name, spec, "the engine")
    notes = []
    if "transformers" in chosen:
        have = installed_version("transformers")
        notes.append(f"transformers {have or 'missing'} here: the carried {wheels['transformers'][0]} is used")
    if skipped:
        notes.append("left out: " + ", ".join(sorted(skipped)))
    return list(chosen.values()), [f"{k} {v}" for k, v in sorted(present.items())], notes


def install_wheels(wheels: list[Path], target: Path, log) -> str:
    """pip install --target (no index, no deps); where pip is missing, unpack the wheels."""
    import shutil

    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    if subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode == 0:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--disable-pip-version-check", "--target", str(target), *map(str, wheels)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        log.write(f"$ {shlex.join(cmd)}\n{proc.stdout}{proc.stderr}\n")
        if proc.returncode != 0:
            raise RuntimeError(f"pip install failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}")
        return "pip"
    for w in wheels:  # a wheel is a zip of the files as installed (+ *.data/ for scripts and headers)
        with zipfile.ZipFile(w) as z:
            z.extractall(target)
        for data in target.glob("*.data"):
            for sub in ("purelib", "platlib"):
                if (data / sub).is_dir():
                    for item in (data / sub).iterdir():
                        shutil.move(str(item), str(target / item.name))
            shutil.rmtree(data)
    return "unzip"


# ----------------------------------------------------------------------------------------------
# Workers: each runs in its own process (`gpu_check.py _name ...`) and writes JSON to --result


def worker_env(a) -> dict:
    import importlib

    t0 = time.perf_counter()
    import torch

    out = {"python": sys.version.split()[0], "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "cuda_available": torch.cuda.is_available(), "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gb=round(props.total_memory / GB, 1),
                   gpus=torch.cuda.device_count())
        torch.zeros(1, device="cuda")
    mods = {}
    for m in ("merge_engine.cli", "merge_engine.config", "merge_engine.streaming", "merge_engine.resident",
              "merge_engine.extract_lora", "merge_engine.methods.fused", "pytest"):  # transformers: by the tests
        importlib.import_module(m)
        mods[m] = "ok"
    from merge_engine.methods import fused

    out["numba_kernels"] = fused.available()
    site = os.environ.get("GPU_CHECK_SITE")
    tf = installed_version("transformers")
    out["transformers"] = (tf or "missing") + (" (carried)" if site and (Path(site) / "transformers").is_dir() else "")
    for dist in ("numba", "numpy", "safetensors", "pydantic", "click", "pyyaml", "tqdm", "pytest"):
        try:
            mod = importlib.import_module({"pyyaml": "yaml"}.get(dist, dist))
            where = getattr(mod, "__file__", "") or ""
            out[dist] = getattr(mod, "__version__", "?") + (" (carried)" if site and where.startswith(site) else "")
        except Exception as e:  # numba may fail to import on a mismatched numpy: the engine runs without it
            out[dist] = f"unavailable: {type(e).__name__}: {e}"[:120]
    out["import_s"] = time.perf_counter() - t0
    return out


def worker_generate(a) -> dict:
    """Base + two fine-tunes (base + small noise), drawn on `device` in float32, stored as bf16
    through the engine's atomic sharded writer; reused when the folder already matches."""
    import contextlib

    import torch

    from merge_engine import __version__
    from merge_engine.io import OutputTensorSpec, atomic_model_output
    from merge_throughput import (BASE_STD, FT_NOISE_STD, INPUT_SHARD_BYTES, MODEL_NAMES, llama_config,
                                  model_is_valid, tensor_list, tensor_seed)

    spec = json.loads(a.spec)
    root = Path(a.dir)
    dirs = {m: root / m for m in MODEL_NAMES}
    names = tensor_list(spec)
    n_params = sum(int(torch.Size(s).numel()) for _, s in names)
    if all(model_is_valid(d, spec) for d in dirs.values()):
        return {"reused": True, "params": n_params, "bytes": 3 * 2 * n_params}
    dev = torch.device(a.device)
    specs = [OutputTensorSpec(name, shape, torch.bfloat16) for name, shape in names]
    root.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=dev)
    with contextlib.ExitStack() as stack:
        out = {m: stack.enter_context(atomic_model_output(dirs[m], True, specs, INPUT_SHARD_BYTES, True)) for m in MODEL_NAMES}
        for name, shape in names:
            gen.manual_seed(tensor_seed(name))
            if name.endswith("norm.weight"):
                base, noise = torch.ones(shape, device=dev), FT_NOISE_STD * 5
            else:
                base, noise = torch.randn(shape, generator=gen, device=dev).mul_(BASE_STD), FT_NOISE_STD
            out["base"][1].write(name, base.to(torch.bfloat16).cpu())
            for m in MODEL_NAMES[1:]:
                ft = torch.randn(shape, generator=gen, device=dev).mul_(noise).add_(base)
                out[m][1].write(name, ft.to(torch.bfloat16).cpu())
                del ft
            del base
        for folder, writer in out.values():
            writer.finish(__version__)
            (folder / "config.json").write_text(json.dumps(llama_config(spec), indent=2) + "\n")
    bad = [m for m, d in dirs.items() if not model_is_valid(d, spec)]
    if bad:
        raise RuntimeError(f"generated checkpoints fail validation: {bad}")
    return {"reused": False, "params": n_params, "bytes": 3 * 2 * n_params}


def worker_startup(a) -> dict:
    import torch

    import merge_engine.cli  # noqa: F401
    import merge_engine.streaming  # noqa: F401

    if a.device.startswith("cuda"):
        torch.zeros(1, device=a.device)
        torch.cuda.synchronize()
    # the first merge of a model class derives its architecture (transformers, meta device) and
    # caches it on disk: done here, outside the startup time, so that no stream step pays it
    t0 = time.perf_counter()
    from merge_engine.config import load_config
    from merge_engine.plan import build_plan

    build_plan(load_config(Path(a.recipe))[0])
    return {"derive_s": time.perf_counter() - t0}


def timed_candidates(merger, config, floor, repeats: int, vary_density: bool) -> dict:
    """bench/resident_merge.py's measurement: candidates alternating weights (and densities),
    each followed by the copy floor on the same model."""
    import statistics

    from resident_merge import candidate

    times, floors = [], []
    for r in range(repeats):
        # weights 0.4/0.6 against the recipe's 0.5; densities 0.55/0.5 against the recipe's 0.5 (the
        # first density candidate has the weight the weight-only run may have ended with)
        density = (0.55 if r % 2 == 0 else 0.5) if vary_density else None
        stats = merger.apply(candidate(config, 0.4 if r % 2 == 0 else 0.6, density))
        if stats.unchanged:
            raise RuntimeError(f"{stats.unchanged} tensors skipped as unchanged: the candidates did not differ")
        times.append(stats.seconds)
        floors.append(floor())
    return {"candidate_s": min(times), "candidate_median_s": statistics.median(times), "floor_s": min(floors),
            "ratio": min(times) / min(floors), "paired_median": statistics.median(t / f for t, f in zip(times, floors))}


def resident_method(method: str, work: Path, device: str, repeats: int, density: bool) -> dict:
    import torch

    from merge_engine.config import load_config
    from merge_engine.io import Checkpoint
    from merge_engine.options import MergeOptions
    from merge_engine.resident import ResidentMerger
    from resident_merge import CopyFloor

    t_start = time.perf_counter()
    config, _ = load_config(work / f"recipe-{method}.yml")
    merger = ResidentMerger(config, MergeOptions(device=device, quiet=True, random_seed=0))
    model = merger.build_model(config, dtype=torch.bfloat16)
    t0 = time.perf_counter()
    merger.apply(config)  # the recipe itself: reads every input once, then must equal the streaming output
    load_s = time.perf_counter() - t0
    params = dict(model.named_parameters())
    out = {"load_s": load_s, "tensors": len(params), "bytes": sum(p.numel() * p.element_size() for p in params.values())}
    stream_out = work / f"stream-{method}"
    if stream_out.is_dir():
        ref = Checkpoint(stream_out, "streaming output")
        differ, max_abs = [], 0.0
        for name, p in params.items():
            if name not in ref.tensors:
                differ.append(name)
                continue
            r = ref.read(name).to(p.device)
            if r.dtype != p.dtype or r.shape != p.shape or not torch.equal(r, p.data):
                differ.append(name)
                if r.shape == p.shape:
                    max_abs = max(max_abs, float((r.float() - p.data.float()).abs().max()))
        missing = sorted(set(ref.tensors) - set(params))
        ref.close()
        out["agree"] = {"equal": len(params) - len(differ), "total": len(params), "differ": differ[:5],
                        "max_abs": max_abs, "missing_in_model": missing[:5]}
    floor = CopyFloor(model, merger.device)
    out["weights"] = timed_candidates(merger, config, floor, repeats, False)
    if density:
        out["density"] = timed_candidates(merger, config, floor, repeats, True)
    merger.close()
    out["wall_s"] = time.perf_counter() - t_start
    return out


def worker_resident(a) -> dict:
    """Every method in one process (one torch, transformers and CUDA start-up for all); the result
    file is rewritten after each method, so a timeout keeps the methods that finished."""
    import gc
    import traceback

    import torch

    results = {}
    for method in a.methods.split(","):
        try:
            results[method] = resident_method(method, Path(a.dir), a.device, a.repeats, a.density and method in DENSITY_METHODS)
        except Exception as e:
            results[method] = {"error": f"{type(e).__name__}: {e}"[:300], "traceback": traceback.format_exc()[-3000:]}
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        Path(a.result).write_text(json.dumps(results, indent=1, default=str))
    return results


def worker_lora_error(a) -> dict:
    """The randomized SVD's error against the exact rank-r optimum, on the merge device, for two
    modules of layer 0; and the adapter's B @ A for the same modules against the fine-tune's delta."""
    import torch
    from safetensors import safe_open

    from merge_engine.extract_lora import top_singular_triplets
    from merge_engine.io import Checkpoint

    dev = torch.device(a.device)
    ft, base = Checkpoint(Path(a.ft), "ft"), Checkpoint(Path(a.base), "base")
    adapter = Path(a.adapter) / "adapter_model.safetensors"
    rows = []
    with safe_open(str(adapter), framework="pt", device="cpu") as f:
        keys = set(f.keys())
        for module in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"):
            w = module + ".weight"
            delta = ft.read(w).to(dev, torch.float32) - base.read(w).to(dev, torch.float32)
            u, s, vh = top_singular_triplets(delta, a.rank)
            err = float(torch.linalg.matrix_norm(delta - (u * s) @ vh))
            sv = torch.linalg.svdvals(delta).double()
            optimum = float(sv[a.rank:].square().sum().sqrt())
            prefix = f"base_model.model.{module}"
            lora_a, lora_b = prefix + ".lora_A.weight", prefix + ".lora_B.weight"
            adapter_err = None
            if lora_a in keys and lora_b in keys:
                ba = f.get_tensor(lora_b).to(dev, torch.float32) @ f.get_tensor(lora_a).to(dev, torch.float32)
                adapter_err = float(torch.linalg.matrix_norm(delta - ba))
            rows.append({"module": module, "error": err, "optimum": optimum, "ratio": err / optimum,
                         "adapter_error": adapter_err, "adapter_ratio": adapter_err / optimum if adapter_err else None})
    ft.close()
    base.close()
    return {"modules": rows, "worst": max(r["ratio"] for r in rows),
            "adapter_worst": max((r["adapter_ratio"] or 0.0) for r in rows)}


WORKERS = {"_env": worker_env, "_generate": worker_generate, "_startup": worker_startup,
           "_resident": worker_resident, "_lora_error": worker_lora_error}


def run_worker(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog=f"gpu_check.py {argv[0]}")
    p.add_argument("--result", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--spec")
    p.add_argument("--dir")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--recipe")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--density", action="store_true")
    p.add_argument("--ft")
    p.add_argument("--base")
    p.add_argument("--adapter")
    p.add_argument("--rank", type=int, default=LORA_RANK)
    a = p.parse_args(argv[1:])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from merge_engine.threads import configure_process

    configure_process()  # as every engine command does, before torch is imported
    data = WORKERS[argv[0]](a)
    Path(a.result).write_text(json.dumps(data, indent=1, default=str))
    return 0


# ----------------------------------------------------------------------------------------------
# The driver


class Budget(Exception):
    pass


class Check:
    def __init__(self, args):
        self.args = args
        self.dry = args.dry_run
        self.device = args.device or ("cpu" if self.dry else "cuda")
        self.tiny = (args.shape or ("tiny" if self.dry else "7b")) == "tiny"
        self.spec = dict(TINY if self.tiny else SEVEN_B)
        if args.layers:
            self.spec["num_hidden_layers"] = args.layers
        self.limits = DRY_LIMITS if self.tiny else LIMITS
        self.start = time.monotonic()
        self.deadline = self.start + args.budget
        self.work = Path(args.work_dir or REPO / "bench_output" / ("gpu_check_dry" if self.dry else "gpu_check")).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        (self.work / "logs").mkdir(exist_ok=True)
        self.out = Path(args.out).resolve() if args.out else None
        if self.out:
            self.out.mkdir(parents=True, exist_ok=True)
        self.rows: list[Row] = []
        self.header: list[str] = []
        self.env = dict(os.environ)
        self.env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                        EVOMERGE_CACHE_DIR=str(self.work / "arch_cache"), PYTHONUNBUFFERED="1")
        self.env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
        sys.path.insert(0, str(REPO))
        from merge_engine.threads import THREAD_ENVIRONMENT  # torch-free

        for name, value in THREAD_ENVIRONMENT.items():
            self.env.setdefault(name, value)
        self.child: Optional[subprocess.Popen] = None
        self.results: dict = {"mode": "dry-run" if self.dry else "full", "device": self.device, "spec": self.spec, "steps": {}}
        self.log_path = self.work / "gpu_check.log"
        self.log_path.write_text("")

    # -- plumbing -------------------------------------------------------------------------------

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def limit(self, kind: str) -> float:
        left = self.remaining() - 3
        if left < 5:
            raise Budget()
        return min(self.limits[kind], left)

    def log(self, text: str) -> None:
        with open(self.log_path, "a") as f:
            f.write(text)

    def progress(self, row: Row) -> None:
        elapsed = time.monotonic() - self.start
        print(f"[{elapsed:6.1f}s] {row.step}: {row.status} {row.result} {fmt_seconds(row.seconds)} {row.ratio}",
              file=sys.stderr, flush=True)
        self.publish()

    def publish(self, final: bool = False) -> str:
        text = render(self.rows, self.header) + "\n"
        if self.out:
            (self.out / "gpu_check.txt").write_text(text)
            (self.out / "gpu_check.json").write_text(json.dumps(self.results, indent=1, default=str) + "\n")
            if final:
                log = self.log_path.read_text(errors="replace")
                (self.out / "gpu_check.log").write_text(log[-4_000_000:])
        return text

    def run(self, cmd: list[str], kind: str, label: str) -> tuple[int, str, float]:
        """Run `cmd` in its own process group under the step's limit: (exit code or 'timeout', output, s)."""
        timeout = self.limit(kind)
        t0 = time.monotonic()
        self.log(f"\n===== {label}: {shlex.join(cmd)} (limit {timeout:.0f}s)\n")
        self.child = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, errors="replace", start_new_session=True)
        try:
            output, _ = self.child.communicate(timeout=timeout)
            rc = self.child.returncode
        except subprocess.TimeoutExpired:
            self.kill_child()
            output, _ = self.child.communicate()
            rc = "timeout"
        seconds = time.monotonic() - t0
        self.child = None
        self.log(output + f"\n===== {label}: exit {rc} after {seconds:.1f}s\n")
        return rc, output, seconds

    def kill_child(self) -> None:
        if self.child is not None and self.child.poll() is None:
            try:
                os.killpg(self.child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def worker(self, name: str, kind: str, label: str, *args: str) -> tuple[object, Optional[dict], str, float]:
        result = self.work / f".{name.strip('_')}-{re.sub(r'[^a-z0-9]+', '-', label)}.json"
        result.unlink(missing_ok=True)
        rc, output, seconds = self.run([sys.executable, str(Path(__file__).resolve()), name, "--result", str(result),
                                        "--device", self.device, *args], kind, label)
        data = json.loads(result.read_text()) if result.exists() else None  # partial after a timeout
        return rc, data, output, seconds

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def failed(self, row: Row, rc, output: str, seconds: float) -> Row:
        row.seconds = seconds
        if rc == "timeout":
            row.status, row.result = "TIMEOUT", f"killed after {seconds:.0f}s"
        else:
            tail = [ln for ln in output.strip().splitlines() if ln.strip()]
            row.status, row.result = "FAIL", f"exit {rc}: " + (tail[-1][-120:] if tail else "no output")
        return row

    def step_rows(self, name: str) -> Row:
        row = self.add(Row(name))
        self.results["steps"][name] = row.data
        return row

    # -- steps ----------------------------------------------------------------------------------

    def step_wheels(self) -> None:
        row = self.step_rows("wheels")
        wheel_dir = Path(self.args.wheels).resolve()
        t0 = time.monotonic()
        if not wheel_dir.is_dir() or not any(wheel_dir.glob("*.whl")):
            row.status = "skip" if self.dry else "FAIL"
            row.result = f"no wheels in {wheel_dir} (run bash bench/gpu_wheels.sh here)"
            row.seconds = 0.0
            return self.progress(row)
        install, present, notes = select_wheels(wheel_dir)
        names = [w.name.split("-")[0] for w in install]
        row.data.update(install=names, present=present, notes=notes)
        if self.dry:
            row.status = "skip"
            row.result = f"dry run: {len(install)} of the {len(list(wheel_dir.glob('*.whl')))} carried wheels needed here"
            row.seconds = time.monotonic() - t0
            return self.progress(row)
        site = Path(self.args.site)
        if install:
            with open(self.log_path, "a") as log:
                how = install_wheels(install, site, log)
            self.env["PYTHONPATH"] = os.pathsep.join([str(site), self.env["PYTHONPATH"]])
            self.env["GPU_CHECK_SITE"] = str(site)
        else:
            how = "-"
        row.status = "ok"
        shown = ", ".join(names[:4]) + (f" +{len(names) - 4}" if len(names) > 4 else "")  # all of them: gpu_check.json
        row.result = f"{len(install)} installed ({how}{': ' + shown if names else ''}), {len(present)} present"
        if "transformers" in names:
            row.result += "; transformers: the carried one"  # why, and what was left out: gpu_check.json
        row.seconds = time.monotonic() - t0
        self.progress(row)

    def step_env(self) -> bool:
        row = self.step_rows("env")
        rc, data, output, seconds = self.worker("_env", "env", "env")
        if data is None:
            self.progress(self.failed(row, rc, output, seconds))
            return False
        row.data.update(data)
        row.seconds = seconds
        gpu = data.get("gpu") or "no GPU"
        self.header.append(
            f"machine: {gpu}{' x%d' % data['gpus'] if data.get('gpus', 1) > 1 else ''}"
            f"{' (%.0f GB)' % data['gpu_memory_gb'] if data.get('gpu_memory_gb') else ''}, {data['cpus']} CPUs; "
            f"python {data['python']}, torch {data['torch']} (CUDA {data['torch_cuda']}), transformers {data['transformers']}, "
            f"numba {data['numba']}, pydantic {data['pydantic']}")
        if self.device.startswith("cuda") and not data["cuda_available"]:
            row.status, row.result = "FAIL", "torch.cuda.is_available() is False"
            self.progress(row)
            return False
        row.status = "ok"
        row.result = f"engine imports ok; {gpu}; numba kernels {'on' if data['numba_kernels'] else 'off'}"
        self.progress(row)
        return True

    def step_tests(self) -> None:
        row = self.step_rows("cuda tests")
        notes = self.work / "test_notes.jsonl"
        notes.unlink(missing_ok=True)
        self.env["GPU_CHECK_NOTES"] = str(notes)
        # the machine's own pytest plugins (xdist, cov, benchmark, ...) stay out: none is needed
        self.env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", *CUDA_TESTS]
        rc, output, seconds = self.run(cmd, "cuda tests", "cuda tests")
        del self.env["GPU_CHECK_NOTES"], self.env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"]
        if self.out:
            (self.out / "gpu_tests.txt").write_text(output[-2_000_000:])
        counts = {}
        summary = [ln for ln in output.splitlines() if re.search(r"\d+ (passed|failed|skipped|errors?)\b", ln)]
        if summary:
            for n, what in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)", summary[-1]):
                counts[what.rstrip("s") if what.startswith("error") else what] = int(n)
        row.data.update(counts=counts, rc=rc)
        row.seconds = seconds
        passed, failed, skipped, errors = (counts.get(k, 0) for k in ("passed", "failed", "skipped", "error"))
        row.result = f"{passed} passed, {failed} failed, {skipped} skipped" + (f", {errors} errors" if errors else "")
        if notes.exists():
            lines = [json.loads(ln) for ln in notes.read_text().splitlines() if ln.strip()]
            row.data["notes"] = lines
            cmp = [n for n in lines if "bit_equal" in n]
            if cmp:
                row.result += f"; cuda vs cpu bit-equal in {sum(n['bit_equal'] for n in cmp)}/{len(cmp)} merges"
        if rc == "timeout":
            row.status = "TIMEOUT"
            row.result = f"killed after {seconds:.0f}s; " + row.result
        elif rc != 0 or failed or errors:
            row.status = "FAIL"
        elif self.device.startswith("cuda") and skipped:
            row.status, row.result = "FAIL", row.result + " (a CUDA test skipped on a CUDA machine)"
        elif not summary:
            row.status, row.result = "FAIL", f"exit {rc}, no pytest summary"
        else:
            row.status = "ok"
        self.progress(row)

    def step_generate(self) -> Optional[dict]:
        row = self.step_rows("generate")
        models = self.work / "models" / f"{'tiny' if self.tiny else 'llama7b'}-L{self.spec['num_hidden_layers']}"
        rc, data, output, seconds = self.worker("_generate", "generate", "generate", "--spec", json.dumps(self.spec),
                                                "--dir", str(models))
        if data is None:
            self.progress(self.failed(row, rc, output, seconds))
            return None
        row.data.update(data)
        row.status, row.seconds = "ok", seconds
        row.result = (f"3 models x {data['params'] / 1e9:.3f}B params bf16, {data['bytes'] / GB:.2f} GB"
                      f"{' (reused)' if data['reused'] else f' drawn on {self.device}'}")
        self.progress(row)
        return {m: models / m for m in ("base", "ft_a", "ft_b")}

    def step_startup(self, dirs: dict) -> Optional[float]:
        from merge_throughput import write_config

        for m in METHODS:
            write_config(self.work / f"recipe-{m}.yml", m, dirs)
        row = self.step_rows("startup")
        rc, data, output, seconds = self.worker("_startup", "startup", "startup", "--recipe",
                                                str(self.work / f"recipe-{METHODS[0]}.yml"))
        if data is None:
            self.progress(self.failed(row, rc, output, seconds))
            return None
        startup = seconds - data["derive_s"]
        row.status, row.seconds = "ok", startup
        row.result = ("python + torch + merge_engine" + (" + CUDA init" if self.device == "cuda" else "")
                      + f" (then the architecture, derived once and cached: {data['derive_s']:.2f}s)")
        row.data.update(seconds=startup, derive_s=data["derive_s"])
        self.progress(row)
        return startup

    def step_io_floor(self, dirs: dict) -> Optional[dict]:
        from merge_throughput import data_bytes, model_files

        row = self.step_rows("io floor")
        files = [str(f) for m in ("base", "ft_a", "ft_b") for f in model_files(dirs[m])]
        out_bytes = data_bytes(dirs["base"])
        report = self.work / ".iofloor.json"
        report.unlink(missing_ok=True)
        self.env["BENCH_CHILD_REPORT"] = str(report)
        cmd = [sys.executable, str(HERE / "merge_throughput.py"), "_iofloor", "--out", str(self.work / ".iofloor.bin"),
               "--write-bytes", str(out_bytes), "--read", *files]
        rc, output, seconds = self.run(cmd, "io floor", "io floor")
        del self.env["BENCH_CHILD_REPORT"]
        (self.work / ".iofloor.bin").unlink(missing_ok=True)
        if rc != 0 or not report.exists():
            self.progress(self.failed(row, rc, output, seconds))
            return None
        data = json.loads(report.read_text())
        data["model_bytes"] = out_bytes
        row.data.update(data)
        row.status = "ok"
        row.seconds = data["read_s"] + data["write_s"]
        row.result = (f"read {data['read_bytes'] / GB:.2f} GB at {data['read_bytes'] / GB / data['read_s']:.1f} GB/s, "
                      f"write {out_bytes / GB:.2f} GB at {out_bytes / GB / data['write_s']:.1f} GB/s")
        row.ratio = "1.00x io"
        self.progress(row)
        return data

    def io_floor_for(self, floor: dict, method: str) -> float:
        """The I/O floor of one merge: the measured floor read 3 models; linear reads 2."""
        share = (2 if method == "linear" else 3) / 3
        return floor["read_s"] * share + floor["write_s"]

    def step_stream(self, method: str, dirs: dict, startup: Optional[float], floor: Optional[dict]) -> Optional[Path]:
        from merge_throughput import write_config

        row = self.step_rows(f"stream {method}")
        recipe = self.work / f"recipe-{method}.yml"
        if not recipe.exists():
            write_config(recipe, method, dirs)
        out = self.work / f"stream-{method}"
        if out.exists():  # an earlier run's: the resident step compares with this run's only
            import shutil

            shutil.rmtree(out)
        cmd = [sys.executable, "-m", "merge_engine.cli", str(recipe), str(out), "--device", self.device, "--quiet",
               "--random-seed", "0", "--overwrite"]
        rc, output, seconds = self.run(cmd, "stream", row.step)
        if rc != 0:
            self.progress(self.failed(row, rc, output, seconds))
            return None
        n, nbytes = output_tensors(out)
        row.data.update(wall_s=seconds, tensors=n, bytes=nbytes)
        row.status, row.seconds = "ok", seconds
        row.result = f"{n} tensors, {nbytes / GB:.2f} GB written on {self.device}"
        if startup is not None and floor is not None:
            beyond = seconds - startup
            row.data["beyond_startup_s"] = beyond
            row.data["io_floor_s"] = self.io_floor_for(floor, method)
            # below the startup time: the machine was busy while one of them was measured
            row.ratio = f"{beyond / row.data['io_floor_s']:.2f}x io" if beyond > 0 else "n/a"
        self.progress(row)
        return out

    def step_residents(self, dirs: dict) -> None:
        from merge_throughput import write_config

        rows = {m: self.step_rows(f"resident {m}") for m in METHODS}
        for m in METHODS:
            if not (self.work / f"recipe-{m}.yml").exists():
                write_config(self.work / f"recipe-{m}.yml", m, dirs)
        args = ["--dir", str(self.work), "--methods", ",".join(METHODS), "--repeats", str(self.args.repeats)]
        if not self.args.no_density:
            args.append("--density")
        rc, data, output, seconds = self.worker("_resident", "resident", "resident", *args)
        for m, row in rows.items():
            got = (data or {}).get(m)
            if got is None or "error" in got:
                self.failed(row, rc if got is None else 1, got["error"] if got else output, seconds)
                if got is None and rc == 0:
                    row.status, row.result = "FAIL", "no result"
                self.progress(row)
                continue
            row.data.update(got)
            w = got["weights"]
            row.seconds, row.ratio = w["candidate_s"], f"{w['ratio']:.2f}x copy"
            agree = got.get("agree")
            if agree is None:
                row.status, row.result = "FAIL", "no streaming output to compare with"
            elif agree["equal"] == agree["total"] and not agree["missing_in_model"]:
                row.status, row.result = "ok", f"bit-equal to stream {agree['equal']}/{agree['total']}"
            else:
                row.status = "FAIL"
                row.result = f"differs from stream: {agree['equal']}/{agree['total']} equal, max |d| {agree['max_abs']:.3g}"
            row.result += f"; first load {got['load_s']:.2f}s; paired {w['paired_median']:.2f}x"
            self.progress(row)
            if "density" in got:
                d = got["density"]
                extra = Row(f"resident {m} +dens", "ok", f"weights and densities change; paired {d['paired_median']:.2f}x",
                            d["candidate_s"], f"{d['ratio']:.2f}x copy", d)
                self.rows.insert(self.rows.index(row) + 1, extra)
                self.progress(extra)

    def step_extract(self, dirs: dict) -> None:
        row = self.step_rows("extract-lora")
        rank = LORA_RANK_TINY if self.tiny else LORA_RANK
        out = self.work / "lora"
        cmd = [sys.executable, "-m", "merge_engine.extract_lora", "--model", str(dirs["ft_a"]), "--base-model",
               str(dirs["base"]), "--out-path", str(out), "--max-rank", str(rank), "--device", self.device,
               "--quiet", "--overwrite"]
        rc, output, seconds = self.run(cmd, "extract-lora", "extract-lora")
        if rc != 0:
            self.progress(self.failed(row, rc, output, seconds))
            return
        cfg = json.loads((out / "adapter_config.json").read_text())
        size = sum(f.stat().st_size for f in out.glob("adapter_model*"))
        row.data.update(wall_s=seconds, adapter_bytes=size, r=cfg["r"], modules=cfg["target_modules"])
        row.seconds = seconds
        row.result = f"rank {cfg['r']}, adapter {size / GB:.2f} GB"
        rc, data, output, secs = self.worker("_lora_error", "lora error", "lora error", "--ft", str(dirs["ft_a"]),
                                            "--base", str(dirs["base"]), "--adapter", str(out), "--rank", str(rank))
        if data is None:
            self.failed(row, rc, output, seconds)
            row.result = "adapter written; error check " + row.result
            return self.progress(row)
        row.data["error"] = data
        row.result += f"; error/optimum {data['worst']:.4f} (svd), {data['adapter_worst']:.4f} (adapter, bf16)"
        # randomized SVD within 1 % of the optimum (docs/extract-lora.md); the stored bf16 factors add rounding
        row.status = "ok" if data["worst"] <= 1.01 and data["adapter_worst"] <= 1.05 else "FAIL"
        self.progress(row)

    # -- the whole check ------------------------------------------------------------------------

    def main(self) -> int:
        try:  # a copied working tree may come without .git, a bare machine without git
            commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            commit = ""
        s = self.spec
        params_b = 0.0
        try:
            from merge_throughput import numel, tensor_list

            params_b = sum(numel(sh) for _, sh in tensor_list(s)) / 1e9
        except Exception:
            pass
        self.header += [
            f"evomerge GPU check{' (DRY RUN: CPU, tiny shape)' if self.dry else ''}"
            f"{' (REHEARSAL: device %s, %s shape)' % (self.device, 'tiny' if self.tiny else '7B') if not self.dry and (self.tiny or self.device == 'cpu') else ''}: "
            f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}, git {commit or '?'}, budget {self.args.budget:.0f}s",
            f"model: {'tiny Llama' if self.tiny else 'Llama-2-7B'} shape (hidden {s['hidden_size']}, intermediate "
            f"{s['intermediate_size']}, {s['num_attention_heads']} heads, vocab {s['vocab_size']}), {s['num_hidden_layers']} layers"
            f"{'' if self.tiny else ' of 32'}, bf16: {params_b:.3f}B params per model; base + 2 fine-tunes",
        ]
        overall = Row("total")
        try:
            self.step_wheels()
            if self.step_env():
                self.step_tests()
                dirs = self.step_generate()
                if dirs is not None:
                    startup = self.step_startup(dirs)
                    floor = self.step_io_floor(dirs)
                    for m in METHODS:
                        self.step_stream(m, dirs, startup, floor)
                    floor_row = self.add(Row("copy floor"))
                    self.step_residents(dirs)
                    floors = [r.data["weights"]["floor_s"] for r in self.rows
                              if r.step.startswith("resident") and "weights" in r.data]
                    if floors:
                        nbytes = next(r.data["bytes"] for r in self.rows if r.step.startswith("resident") and "bytes" in r.data)
                        best = min(floors)
                        mem = "HBM" if self.device == "cuda" else "RAM"
                        floor_row.status, floor_row.seconds, floor_row.ratio = "ok", best, "1.00x copy"
                        floor_row.result = (f"{mem}: dst.copy_(src) over {nbytes / GB:.2f} GB of parameters, "
                                            f"{2 * nbytes / GB / best:.3g} GB/s read+write")
                        floor_row.data.update(seconds=best, bytes=nbytes)
                    else:
                        floor_row.status, floor_row.result = "FAIL", "no resident step finished"
                    self.results["steps"]["copy floor"] = floor_row.data
                    self.step_extract(dirs)
        except Budget:
            for r in self.rows:
                if r.status == "...":
                    r.status, r.result = "skip", "not started: the budget is spent"
            self.add(Row("(budget)", "FAIL", f"budget of {self.args.budget:.0f}s spent: later steps not run"))
        except KeyboardInterrupt:
            self.kill_child()
            for r in self.rows:
                if r.status == "...":
                    r.status, r.result = "KILLED", "stopped by the hard time limit (or Ctrl-C)"
            self.add(Row("(stopped)", "FAIL", "interrupted: later steps not run"))
        except Exception as e:  # a bug of this driver must not cost the table of what already ran
            import traceback

            self.kill_child()
            self.log("\n===== driver error\n" + traceback.format_exc())
            for r in self.rows:
                if r.status == "...":
                    r.status, r.result = "FAIL", "driver error"
            self.add(Row("(driver error)", "FAIL", f"{type(e).__name__}: {e}"[:200] + " (traceback: gpu_check.log)"))
        bad = [r.step for r in self.rows if r.status not in ("ok", "skip")]
        overall.status = "FAIL" if bad else "ok"
        overall.result = f"failed: {', '.join(bad)}" if bad else f"all {sum(r.status == 'ok' for r in self.rows)} steps ok"
        overall.seconds = time.monotonic() - self.start
        self.rows.append(overall)
        self.results["rows"] = [{"step": r.step, "status": r.status, "result": r.result, "seconds": r.seconds,
                                 "ratio": r.ratio} for r in self.rows]
        text = self.publish(final=True)
        print(text, end="", flush=True)
        return 1 if bad else 0


def output_tensors(folder: Path) -> tuple[int, int]:
    """(tensor count, data bytes) of a safetensors model folder, from the headers (stdlib only)."""
    import struct

    n = nbytes = 0
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        for k, v in header.items():
            if k != "__metadata__":
                n += 1
                nbytes += v["data_offsets"][1] - v["data_offsets"][0]
    return n, nbytes


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in WORKERS:
        return run_worker(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="every step on CPU at a tiny shape, no wheel install")
    p.add_argument("--budget", type=float, default=None, help="overall seconds (default 450; dry run 170)")
    p.add_argument("--work-dir", default=None, help="models and outputs (default bench_output/gpu_check[_dry])")
    p.add_argument("--wheels", default=str(WHEEL_DIR), help="carried wheels (default bench_output/gpu_wheels)")
    p.add_argument("--site", default="/tmp/evomerge-gpu-site", help="where the wheels are installed")
    p.add_argument("--out", default=os.environ.get("OUT") or None, help="result folder (default $OUT)")
    p.add_argument("--layers", type=int, default=None, help="layers of the generated models (default 4; dry run 2)")
    p.add_argument("--repeats", type=int, default=None, help="resident candidates per row (default 10; dry run 3)")
    p.add_argument("--no-density", action="store_true", help="skip the resident rows that also change densities")
    p.add_argument("--device", default=None, help="merge device (default cuda; dry run cpu); cpu to rehearse")
    p.add_argument("--shape", choices=("7b", "tiny"), default=None, help="generated model shape (default 7b; dry run tiny)")
    args = p.parse_args(argv)
    tiny = (args.shape or ("tiny" if args.dry_run else "7b")) == "tiny"
    if args.budget is None:
        args.budget = 170.0 if tiny else 450.0
    if args.repeats is None:
        args.repeats = 3 if tiny else 10
    check = Check(args)

    def on_term(signum, frame):  # the outer `timeout` (gpu_check.sh): stop the step, keep the table
        check.kill_child()
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    return check.main()


if __name__ == "__main__":
    sys.exit(main())
