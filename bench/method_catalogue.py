#!/usr/bin/env python3
"""Every merge method through `mergekit-yaml`, timed against `linear` measured in the same run.

    python bench/method_catalogue.py [--work-dir ./bench_output] [--quick] [--methods a,b,...] [--repeats N]

Uses the Llama-shaped bf16 checkpoints of bench/merge_throughput.py (base + two fine-tunes,
~1.1B parameters each, or 4 layers with --quick; generated there, cached in --work-dir). Each
method merges the models it takes (base + both fine-tunes where it can, base + one where it
merges exactly two) with weights 0.5 and density 0.5, in its own `mergekit-yaml` process, and the
table reports wall time, peak RSS and the ratio to `linear`'s time. Targets: every method within
4x of linear except the iterative `karcher` (8x); peak RSS under 1.5 GB (streaming keeps a few tensors in memory, whatever the method). Exit status 1 when a
target fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from merge_throughput import ensure_models, llama_spec, measured, model_files, read_all, remove  # noqa: E402  (shared checkpoints)

CLI = Path(sys.executable).parent / "mergekit-yaml"
RSS_LIMIT = 1.5e9
RATIO_LIMIT = {"karcher": 8.0}
DEFAULT_RATIO_LIMIT = 4.0

# method -> (uses base, how many fine-tunes, per-model parameters, global parameters)
RECIPES = {
    "linear": (False, 2, "weight: 0.5", ""),
    "slerp": (True, 1, "", "t: 0.5"),
    "nuslerp": (True, 2, "weight: 0.5", ""),
    "multislerp": (True, 2, "weight: 0.5", ""),
    "karcher": (False, 2, "", ""),
    "task_arithmetic": (True, 2, "weight: 0.5", ""),
    "ties": (True, 2, "weight: 0.5, density: 0.5", ""),
    "dare_ties": (True, 2, "weight: 0.5, density: 0.5", ""),
    "dare_linear": (True, 2, "weight: 0.5, density: 0.5", ""),
    "breadcrumbs": (True, 2, "weight: 0.5, density: 0.5", ""),
    "breadcrumbs_ties": (True, 2, "weight: 0.5, density: 0.5", ""),
    "della": (True, 2, "weight: 0.5, density: 0.5", ""),
    "della_linear": (True, 2, "weight: 0.5, density: 0.5", ""),
    "model_stock": (True, 2, "", ""),
    "sce": (True, 2, "", "select_topk: 0.5"),
    "ram": (True, 2, "", ""),
    "ramplus_tl": (True, 2, "", ""),
    "nearswap": (True, 1, "", "t: 0.001"),
    "arcee_fusion": (True, 1, "", ""),
    "passthrough": (False, 1, "", ""),
}


def write_recipe(path: Path, method: str, dirs: dict[str, Path]) -> None:
    uses_base, count, model_params, global_params = RECIPES[method]
    lines = [f"merge_method: {method}", "dtype: bfloat16"]
    if uses_base:
        lines.append(f"base_model: {dirs['base']}")
    lines.append("models:")
    for name in ("ft_a", "ft_b")[:count]:
        lines.append(f"  - model: {dirs[name]}")
        if model_params:
            lines.append(f"    parameters: {{{model_params}}}")
    if global_params:
        lines.append(f"parameters: {{{global_params}}}")
    path.write_text("\n".join(lines) + "\n")


def run_once(recipe: Path, out: Path, work: Path) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one mergekit-yaml process, measured by its own wrapper."""
    remove(out)
    report = measured([str(CLI), str(recipe), str(out), "--quiet"], work, f"catalogue-{recipe.stem}")
    return report["wall_s"], report["peak_rss_bytes"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", default="./bench_output")
    p.add_argument("--quick", action="store_true", help="4-layer models")
    p.add_argument("--methods", default=",".join(RECIPES), help="comma-separated subset (linear is always run)")
    p.add_argument("--repeats", type=int, default=1, help="keep the best of N runs per method")
    args = p.parse_args(argv)
    methods = ["linear"] + [m for m in args.methods.split(",") if m and m != "linear"]
    unknown = [m for m in methods if m not in RECIPES]
    if unknown:
        sys.exit(f"unknown method(s): {', '.join(unknown)}")
    work = Path(args.work_dir)
    spec = llama_spec(4 if args.quick else 22)
    dirs = ensure_models(work, spec)
    # every input read once, so that the first method (linear, the baseline) is not the one
    # that pays for a cold page cache
    read_all([f for d in dirs.values() for f in model_files(d)], bytearray(64 << 20))
    results = {}
    for method in methods:
        recipe = work / f"catalogue-{method}.yml"
        write_recipe(recipe, method, dirs)
        best_wall, best_rss = None, None
        for _ in range(args.repeats):
            wall, rss = run_once(recipe, work / f"catalogue-out-{method}", work)
            best_wall = wall if best_wall is None else min(best_wall, wall)
            best_rss = rss if best_rss is None else max(best_rss, rss)
        remove(work / f"catalogue-out-{method}")
        results[method] = {"wall_s": best_wall, "peak_rss": best_rss}
        print(f"  {method:17s} {best_wall:7.2f} s", flush=True)

    linear = results["linear"]["wall_s"]
    failed = False
    print(f"\n{'method':17s} {'wall':>8s} {'x linear':>9s} {'target':>7s} {'peak RSS':>9s}  verdict")
    for method, r in results.items():
        ratio = r["wall_s"] / linear
        limit = RATIO_LIMIT.get(method, DEFAULT_RATIO_LIMIT)
        rss = r["peak_rss"]
        ok = ratio <= limit and rss < RSS_LIMIT
        failed |= not ok
        r.update(ratio=ratio, target=limit, ok=ok)
        print(f"{method:17s} {r['wall_s']:7.2f}s {ratio:8.2f}x {limit:6.1f}x {rss / 1e9:7.2f} GB  {'PASS' if ok else 'FAIL'}")
    (work / f"catalogue-results-L{spec['num_hidden_layers']}.json").write_text(json.dumps(results, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
