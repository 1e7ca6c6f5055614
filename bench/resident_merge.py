#!/usr/bin/env python3
"""Resident merge benchmark: one search candidate's materialisation against a memory-copy floor.

    python bench/resident_merge.py [--work-dir ./bench_output] [--quick] [--device cpu|cuda] [--repeats 3]

With the ~1.1B-parameter Llama-shaped bf16 checkpoints of bench/merge_throughput.py (generated
there, shared and cached in --work-dir) resident in a ResidentMerger (base + 2 fine-tunes), it
times one candidate's `linear`, `ties` and `dare_ties` materialisation into a live transformers model: every
output tensor is recomputed (consecutive candidates alternate their weights, so nothing is
skipped as unchanged). The floor, measured in the same run on the same model: `dst.copy_(src)`
over every parameter, i.e. moving the output's bytes once in memory. Targets: linear within 1.2x
of the floor, ties within 2x, dare_ties within 3x. Prints a table and exits 1 if a target fails.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from merge_throughput import ensure_models, llama_spec, write_config  # noqa: E402  (shared checkpoints)

TARGETS = {"linear": 1.2, "ties": 2.0, "dare_ties": 3.0}


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_floor(model, device, repeats: int) -> float:
    import torch

    params = [p for p in model.parameters()]
    sources = [p.detach().clone() for p in params]  # real, resident bytes (not lazily zeroed pages)
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            for dst, src in zip(params, sources):
                dst.copy_(src)
            sync(device)
            times.append(time.perf_counter() - t0)
    del sources
    return min(times)


def candidate(config, weight: float):
    from merge_engine.config import parse_config

    data = config.to_plain()
    for m in data["models"]:
        if "parameters" in m:
            m["parameters"]["weight"] = weight
    return parse_config(data, "candidate")


def bench_method(method: str, dirs, work: Path, device: str, repeats: int) -> dict:
    import torch

    from merge_engine.config import load_config
    from merge_engine.options import MergeOptions
    from merge_engine.resident import ResidentMerger

    recipe = work / f"resident-{method}.yml"
    write_config(recipe, method, dirs)
    config, _ = load_config(recipe)
    merger = ResidentMerger(config, MergeOptions(device=device, quiet=True))
    model = merger.build_model(config, dtype=torch.bfloat16)
    t0 = time.perf_counter()
    merger.apply(config)  # first candidate: reads every input once (and builds task vectors)
    load_s = time.perf_counter() - t0
    times = []
    for r in range(repeats):
        stats = merger.apply(candidate(config, 0.4 if r % 2 == 0 else 0.6))
        assert stats.unchanged == 0, stats
        times.append(stats.seconds)
    floor = copy_floor(model, merger.device, repeats)
    out = {
        "method": method,
        "load_s": load_s,
        "candidate_s": min(times),
        "candidate_median_s": statistics.median(times),
        "floor_s": floor,
        "ratio": min(times) / floor,
        "tensors": stats.recomputed,
        "bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
    }
    merger.close()
    del merger, model
    gc.collect()
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, default=Path("bench_output"))
    parser.add_argument("--quick", action="store_true", help="4 layers instead of 22")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    dirs = ensure_models(args.work_dir, llama_spec(4 if args.quick else 22))
    device_name = args.device
    if device_name.startswith("cuda"):
        device_name += f" ({torch.cuda.get_device_name(0)})"
    print(f"resident merge benchmark on {device_name}, torch threads {torch.get_num_threads()}")
    rows = [bench_method(m, dirs, args.work_dir, args.device, args.repeats) for m in TARGETS]
    print(f"\n{'method':<8} {'tensors':>7} {'GB out':>7} {'first load':>10} {'candidate':>10} {'copy floor':>10} {'ratio':>6} {'target':>7}")
    ok = True
    for r in rows:
        target = TARGETS[r["method"]]
        passed = r["ratio"] <= target
        ok &= passed
        print(
            f"{r['method']:<8} {r['tensors']:>7} {r['bytes'] / 1e9:>7.2f} {r['load_s']:>9.2f}s {r['candidate_s']:>9.3f}s "
            f"{r['floor_s']:>9.3f}s {r['ratio']:>5.2f}x {'<=' + str(target) + 'x':>7} {'PASS' if passed else 'FAIL'}"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
