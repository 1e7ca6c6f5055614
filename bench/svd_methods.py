#!/usr/bin/env python3
"""Streaming merge time of the SVD methods (`tsvm`, `iso_c`, `iso_cts`) against `ties`, measured
in the same run on the same checkpoints, printed as ratios.

    python bench/svd_methods.py [--work-dir ./bench_output] [--layers 22] [--repeats 1]

The checkpoints are bench/merge_throughput.py's (generated once into --work-dir and reused): a
Llama-shaped random bf16 base and two fine-tunes of the TinyLlama 1.1B shape (hidden 2048,
intermediate 5632, 32000 vocabulary), `--layers` of its 22 layers (fewer layers: the same tensor
shapes, less of them; every layer costs the same). Each merge runs as `mergekit-yaml cfg out
--quiet` in a fresh process (wall time, startup included; outputs removed untimed):
- `ties`: weights 0.5, density 0.5 (bench/merge_throughput.py's recipe);
- `tsvm`, `iso_c`, `iso_cts`: their defaults (alpha 1; rank share 1/2; common share 0.8).
The machine's load average (os.getloadavg) is printed before and after: on a shared machine the
absolute times move with it, the ratios less.

    python bench/svd_methods.py --heldout conflict [--heldout smollm]

instead scores fixed recipes (no search) on an experiment's held-out tasks, as
bench/search_quality.py does (`experiment`, `Scorer`, `baseline_recipes`): task arithmetic
(weight 1) and TIES (density 0.5, weight 1) beside `tsvm`, `iso_c` and `iso_cts` at their
defaults, all over the experiment's experts. The conflict experiment's models are built (or
reused) as search_quality builds them; smollm's are only used when already built in
demo_output/smollm/models.

Measured (2-core machine shared with another session's benchmarks, load average 4.3-6.2 during
the run; `--layers 2`, as a full 22-layer run of tsvm would take over an hour there): ties 11.4 s,
tsvm 521.6 s (45.6x), iso_c 149.9 s (13.1x), iso_cts 476.0 s (41.6x). The SVD methods are
CPU-bound in LAPACK: iso_c takes one exact SVD per 2-D weight, tsvm (two models: k = r/2, past
the randomized threshold) and iso_cts about four of the same size each (two task SVDs, or the sum
and two residuals, and the polar factors of the stacked bases). Held-out accuracy on the conflict
experiment (fixed recipes, mean over its three skills): task arithmetic (weight 1) 0.376, TIES
0.259, tsvm 0.282, iso_c 0.213, iso_cts 0.196 (defaults, alpha 1: the conflict experts' task
vectors contradict each other by design, docs/search-quality.md); on smollm (4 experts) task
arithmetic 0.376, TIES 0.375, tsvm 0.387, iso_c 0.319, iso_cts 0.287 (merges of 5.4, 8.1, 101.6,
17.5 and 241.7 s, load 2-3).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_throughput import ensure_models, llama_spec  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MERGEKIT_YAML = Path(sys.executable).parent / "mergekit-yaml"
METHODS = ("ties", "tsvm", "iso_c", "iso_cts")


def recipe(method: str, dirs: dict[str, Path]) -> str:
    lines = [f"merge_method: {method}", f"base_model: {dirs['base']}", "dtype: bfloat16", "models:"]
    for m in ("ft_a", "ft_b"):
        lines.append(f"  - model: {dirs[m]}")
        if method == "ties":
            lines.append("    parameters: {weight: 0.5, density: 0.5}")
    return "\n".join(lines) + "\n"


def measure(method: str, dirs: dict[str, Path], work: Path) -> float:
    cfg = work / f"svd_bench_{method}.yml"
    out = work / f"svd_bench_{method}_out"
    cfg.write_text(recipe(method, dirs))
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    start = time.perf_counter()
    proc = subprocess.run([str(MERGEKIT_YAML), str(cfg), str(out), "--quiet"], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{method}: mergekit-yaml failed:\n{proc.stderr}")
    shutil.rmtree(out, ignore_errors=True)
    return seconds


def heldout(name: str, work: Path) -> None:
    import torch
    import yaml

    from search_quality import Scorer, baseline_recipes, experiment

    os.chdir(REPO)  # the experiments name their models relative to the repository root
    exp = experiment(name)
    if name == "smollm":
        # never built here (a build takes long and may be in progress in another process): only a
        # finished one, marked by its build.json stamp, is used
        root = REPO / "demo_output" / "smollm" / "models"
        models = {p.name: p for p in sorted(root.glob("*")) if (p / "model.safetensors").exists()} if root.is_dir() else {}
        if not (root / "build.json").exists() or "base" not in models or len(models) < 3:
            print("smollm: demo_output/smollm/models holds no finished build (build.json); skipped")
            return
        models = {"base": models.pop("base"), **models}
    else:
        models = exp.build()
    task_dir = work / name / "svd_tasks"
    exp.write_tasks(task_dir)
    score = Scorer(task_dir, exp.heldout)
    experts = [str(p) for k, p in models.items() if k != "base"]
    recipes = {k: v for k, v in baseline_recipes(models).items() if k != "uniform linear"}
    for method in METHODS[1:]:
        doc = {"merge_method": method, "dtype": "float32", "base_model": str(models["base"]),
               "models": [{"model": e} for e in experts]}
        recipes[f"{method} (paper defaults)"] = yaml.safe_dump(doc, sort_keys=False)
    rows = []
    for label, text in recipes.items():
        slug = label.split(" (")[0].replace(" ", "_")
        cfg, out = work / name / f"svd_{slug}.yml", work / name / f"svd_{slug}"
        cfg.write_text(text)
        start = time.perf_counter()
        subprocess.run([str(MERGEKIT_YAML), str(cfg), str(out), "--overwrite", "--quiet"], check=True)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            result = score(out)
        rows.append((label, result, seconds))
        print(f"  {label}: mean {result['mean']:.3f} (merge {seconds:.1f} s)", flush=True)
    tasks = list(exp.heldout)
    print(f"\n{name}: held-out accuracy of fixed recipes over {len(experts)} experts (no search)")
    print(f"{'recipe':<32}" + "".join(f"{t[-24:]:>26}" for t in tasks) + f"{'mean':>8}")
    for label, result, _ in rows:
        print(f"{label:<32}" + "".join(f"{result[t]:>26.3f}" for t in tasks) + f"{result['mean']:>8.3f}")


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, default=REPO / "bench_output")
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--repeats", type=int, default=1, help="keep the best of N runs per method")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--heldout", action="append", choices=("conflict", "smollm"),
                        help="score fixed recipes on this experiment's held-out tasks instead of timing")
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    if args.heldout:
        for name in args.heldout:
            heldout(name, args.work_dir.resolve())
        return
    methods = ["ties"] + [m for m in args.methods if m != "ties"]  # the baseline is always measured
    args.work_dir.mkdir(parents=True, exist_ok=True)
    dirs = ensure_models(args.work_dir, llama_spec(args.layers))
    print(f"load average before: {load()} ({os.cpu_count()} CPUs)")
    times = {}
    for method in methods:
        times[method] = min(measure(method, dirs, args.work_dir) for _ in range(args.repeats))
        print(f"  {method}: {times[method]:.1f} s (load {load()})", flush=True)
    print(f"load average after: {load()}")
    print(f"\n1.1B shape, {args.layers} of 22 layers, bf16, streaming mergekit-yaml, best of {args.repeats}")
    print(f"{'method':<10}{'seconds':>10}{'x ties':>9}")
    for method in methods:
        print(f"{method:<10}{times[method]:>10.1f}{times[method] / times['ties']:>9.2f}")


if __name__ == "__main__":
    main()
