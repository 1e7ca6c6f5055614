#!/usr/bin/env python3
"""Merge methods on a shared machine: each method quiet, then beside 1 and 2 busy processes.

    python bench/under_load.py [--work-dir ./bench_output] [--full] [--methods a,b,...] [--before]

Uses the Llama-shaped bf16 checkpoints of bench/merge_throughput.py (4 layers of the 1.1B shape by
default, all 22 with --full), the recipes of bench/method_catalogue.py, and one `mergekit-yaml`
process per run. The busy processes are pure-Python loops started and stopped here. The table
reports wall and CPU seconds and the ratio busy/quiet; the fair share on a 2-core machine is 2x
with one busy process beside the merge. `--before` also runs every case with the engine's thread
defaults undone (`GOMP_SPINCOUNT` left to the OpenMP runtime: long spinning waits), the way it
ran before they existed, as a baseline measured in the same run.

`--resident a,b,...` (default linear,ties,dare_ties; empty to skip) adds search candidates: a
ResidentMerger in this process holds the inputs, and each timed `apply` materialises a candidate
(new weights, every tensor recomputed) into a live transformers model, as a search worker does
(the median of `--candidates` applies per load level).

`--quiet-pairs N` instead measures what the thread defaults cost a quiet merge: per method, N
pairs of runs without and with them (`GOMP_SPINCOUNT` empty vs the engine's 1000), the order
alternating within each pair; it prints the medians and their ratio (target: within 10 %).
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from merge_throughput import ensure_models, llama_spec, model_files, read_all, remove, write_config  # noqa: E402
from method_catalogue import CLI, RECIPES, write_recipe  # noqa: E402
from resident_merge import candidate  # noqa: E402

TARGET = 2.0  # busy (one process beside) / quiet
BUSY_LOOP = "while True:\n    pass\n"


def run(recipe: Path, out: Path, env: dict) -> tuple[float, float]:
    """(wall, CPU) seconds of one mergekit-yaml process."""
    remove(out)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run([str(CLI), str(recipe), str(out), "--quiet"], env=env, check=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    remove(out)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


class Busy:
    """`count` CPU-bound processes for the duration of a with block."""

    def __init__(self, count: int):
        self.count, self.procs = count, []

    def __enter__(self):
        self.procs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(self.count)]
        time.sleep(0.5 if self.count else 0)  # let them reach full speed
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
            p.wait()


def resident_times(method: str, dirs, work: Path, count: int) -> dict[int, tuple[float, float]]:
    """{busy processes: (median wall, median CPU) seconds of one resident candidate}."""
    import statistics

    import torch

    from merge_engine.config import load_config
    from merge_engine.options import MergeOptions
    from merge_engine.resident import ResidentMerger

    recipe = work / f"under-load-resident-{method}.yml"
    write_config(recipe, method, dirs)
    config, _ = load_config(recipe)
    merger = ResidentMerger(config, MergeOptions(quiet=True))
    merger.build_model(config, dtype=torch.bfloat16)
    merger.apply(config)  # reads the inputs once; untimed
    times, n = {}, 0
    for busy in (0, 1, 2):
        walls, cpus = [], []
        with Busy(busy):
            for _ in range(count):
                n += 1  # alternating weights: every candidate recomputes every tensor
                c0 = time.process_time()
                stats = merger.apply(candidate(config, 0.4 if n % 2 == 0 else 0.6))
                assert stats.unchanged == 0, stats
                walls.append(stats.seconds)
                cpus.append(time.process_time() - c0)
        times[busy] = (statistics.median(walls), statistics.median(cpus))
    merger.close()
    return times


def quiet_pairs(methods, dirs, work: Path, pairs: int) -> int:
    import statistics

    variants = {"unset": {**os.environ, "GOMP_SPINCOUNT": ""}, "1000": dict(os.environ)}
    print("| method | GOMP_SPINCOUNT unset: median s | 1000: median s | ratio 1000/unset | pairs |")
    print("|---|---|---|---|---|")
    worst = 0.0
    for method in methods:
        recipe = work / f"under-load-{method}.yml"
        write_recipe(recipe, method, dirs)
        times = {v: [] for v in variants}
        for i in range(pairs):
            order = list(variants) if i % 2 == 0 else list(reversed(variants))
            for v in order:
                times[v].append(run(recipe, work / "under-load-out", variants[v])[0])
        unset, spin = statistics.median(times["unset"]), statistics.median(times["1000"])
        worst = max(worst, spin / unset)
        print(f"| {method} | {unset:.2f} | {spin:.2f} | {spin / unset:.3f} | {pairs} |", flush=True)
    print(f"\ntarget: quiet time with the defaults within 10 % of without: {'PASS' if worst <= 1.10 else 'FAIL'} (worst {worst:.3f})")
    return 0 if worst <= 1.10 else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", default="./bench_output")
    p.add_argument("--full", action="store_true", help="all 22 layers (default: 4)")
    p.add_argument("--methods", default=",".join(RECIPES))
    p.add_argument("--before", action="store_true", help="also measure without the engine's thread defaults")
    p.add_argument("--resident", default="linear,ties,dare_ties", help="methods timed as resident candidates ('' to skip)")
    p.add_argument("--candidates", type=int, default=5, help="resident candidates timed per load level (median)")
    p.add_argument("--quiet-pairs", type=int, default=0, help="only compare quiet runs without/with the thread defaults, N pairs")
    args = p.parse_args(argv)
    work = Path(args.work_dir)
    dirs = ensure_models(work, llama_spec(22 if args.full else 4))
    read_all([f for d in dirs.values() for f in model_files(d)], bytearray(64 << 20))  # warm page cache
    methods = [m for m in args.methods.split(",") if m]
    variants = {"now": dict(os.environ)}
    if args.before:
        # an empty value is ignored by the OpenMP runtime (which then uses its own default) and
        # keeps our default from being applied
        variants = {"before": {**os.environ, "GOMP_SPINCOUNT": ""}, **variants}
    warm = work / "under-load-warm.yml"
    write_recipe(warm, "ties", dirs)
    run(warm, work / "under-load-out", dict(os.environ))  # numba kernels compiled and cached, untimed
    if args.quiet_pairs:
        return quiet_pairs(methods, dirs, work, args.quiet_pairs)
    rows = []
    for method in methods:
        recipe = work / f"under-load-{method}.yml"
        write_recipe(recipe, method, dirs)
        for variant, env in variants.items():
            times = {}
            for busy in (0, 1, 2):
                with Busy(busy):
                    times[busy] = run(recipe, work / "under-load-out", env)
            row = (method, variant, times)
            rows.append(row)
            q = times[0][0]
            print(f"  {method:17s} {variant:6s} quiet {q:6.2f}s  1 busy {times[1][0]:6.2f}s ({times[1][0] / q:.2f}x)  "
                  f"2 busy {times[2][0]:6.2f}s ({times[2][0] / q:.2f}x)", flush=True)
    for method in [m for m in args.resident.split(",") if m]:
        times = resident_times(method, dirs, work, args.candidates)
        rows.append((f"{method} (resident candidate)", "now", times))
        q = times[0][0]
        print(f"  {method:17s} resident quiet {q:6.3f}s  1 busy {times[1][0]:6.3f}s ({times[1][0] / q:.2f}x)  "
              f"2 busy {times[2][0]:6.3f}s ({times[2][0] / q:.2f}x)", flush=True)
    print(f"\n| method | threads | quiet s (CPU s) | 1 busy s (CPU s) | x quiet | 2 busy s (CPU s) | x quiet |")
    print("|---|---|---|---|---|---|---|")
    failed = False
    for method, variant, t in rows:
        r1, r2 = t[1][0] / t[0][0], t[2][0] / t[0][0]
        if variant == "now":
            failed |= r1 > TARGET
        print(f"| {method} | {variant} | {t[0][0]:.3f} ({t[0][1]:.3f}) | {t[1][0]:.3f} ({t[1][1]:.3f}) | {r1:.2f} | "
              f"{t[2][0]:.3f} ({t[2][1]:.3f}) | {r2:.2f} |")
    print(f"\ntarget: every method at most {TARGET:.1f}x its quiet time with one busy process beside it: "
          f"{'FAIL' if failed else 'PASS'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
