#!/usr/bin/env python3
"""evomerge's `mergekit-yaml` beside the real mergekit's, same recipes, runs alternating.

    python bench/vs_mergekit.py [--work-dir ./bench_output] [--quick] [--mergekit-venv DIR] [--repeats N]

The real mergekit (0.1.5 from PyPI, LGPL) is installed into its own venv made here (torch pinned
first, as for evomerge); nothing of it is imported into this process, it only runs as a command.
Checkpoints: the Llama-shaped bf16 base + two fine-tunes of bench/merge_throughput.py (1.1B shape,
or 4 layers with --quick). Each recipe runs once per tool per repeat, alternating, and the table
shows the best wall time, its CPU time and the peak RSS of each. Outputs are compared tensor by
tensor: deterministic methods bit for bit (mismatching elements, max |difference|); random methods
(DARE, DELLA) statistically, by the share of entries that differ from the base and the norm of the
merged task vector, which must agree within 1 %.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from merge_throughput import PlainModel, compare_outputs, ensure_models, llama_spec, measured, model_files, read_all, remove  # noqa: E402

OURS = Path(sys.executable).parent / "mergekit-yaml"
RANDOM = {"dare_ties", "della"}


def recipes(dirs: dict, layers: int) -> dict[str, str]:
    base, a, b = dirs["base"], dirs["ft_a"], dirs["ft_b"]
    two = f"  - model: {a}\n    parameters: {{weight: 0.5, density: 0.5}}\n  - model: {b}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
    return {
        "linear": f"merge_method: linear\ndtype: bfloat16\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n"
                  f"  - model: {b}\n    parameters: {{weight: 0.5}}\n",
        "slerp": f"merge_method: slerp\ndtype: bfloat16\nbase_model: {base}\nparameters: {{t: 0.5}}\nmodels:\n"
                 f"  - model: {base}\n  - model: {a}\n",
        "ties": f"merge_method: ties\ndtype: bfloat16\nbase_model: {base}\nmodels:\n{two}",
        "dare_ties": f"merge_method: dare_ties\ndtype: bfloat16\nbase_model: {base}\nmodels:\n{two}",
        "della": f"merge_method: della\ndtype: bfloat16\nbase_model: {base}\nmodels:\n{two}",
        "frankenmerge": f"merge_method: passthrough\ndtype: bfloat16\nslices:\n"
                        f"  - sources: [{{model: {a}, layer_range: [0, {layers // 2}]}}]\n"
                        f"  - sources: [{{model: {b}, layer_range: [{layers // 4}, {layers}]}}]\n",
    }


def ensure_mergekit(venv: Path) -> Path:
    exe = venv / "bin" / "mergekit-yaml"
    if exe.exists():
        return exe
    print(f"installing mergekit 0.1.5 into {venv} (a few minutes) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "pip"), "install", "-q"]
    subprocess.run(pip + ["torch==2.13.0"], check=True)  # pinned first: else pip pulls CUDA wheels
    subprocess.run(pip + ["mergekit==0.1.5"], check=True)
    return exe


def statistics(out: Path, base: Path) -> tuple[float, float]:
    """(share of entries that differ from the base, norm of out - base) over the layer tensors."""
    import torch

    o, b = PlainModel(out), PlainModel(base)
    changed = total = 0
    norm2 = 0.0
    for name in o.where:
        if ".layers." not in name:
            continue
        delta = o.get(name).float() - b.get(name).float()
        changed += int((delta != 0).sum())
        total += delta.numel()
        norm2 += float(delta.double().square().sum())
    return changed / total, norm2 ** 0.5


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", default="./bench_output")
    p.add_argument("--quick", action="store_true", help="4-layer models")
    p.add_argument("--mergekit-venv", default=None, help="default: WORK/mergekit-venv")
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args(argv)
    work = Path(args.work_dir)
    layers = 4 if args.quick else 22
    dirs = ensure_models(work, llama_spec(layers))
    theirs = ensure_mergekit(Path(args.mergekit_venv or work / "mergekit-venv"))
    read_all([f for d in dirs.values() for f in model_files(d)], bytearray(64 << 20))
    rows = []
    for method, text in recipes(dirs, layers).items():
        recipe = work / f"vs-{method}.yml"
        recipe.write_text(text)
        best = {}
        for _ in range(args.repeats):
            for tool, exe in (("evomerge", OURS), ("mergekit", theirs)):  # alternating
                out = work / f"vs-out-{tool}"
                remove(out)
                cmd = [str(exe), str(recipe), str(out), "--no-copy-tokenizer"]
                cmd += ["--quiet"] if tool == "evomerge" else []
                report = measured(cmd, work, f"vs-{tool}")
                if tool not in best or report["wall_s"] < best[tool]["wall_s"]:
                    best[tool] = report
        ours, theirs_out = work / "vs-out-evomerge", work / "vs-out-mergekit"
        names = list(PlainModel(theirs_out).where)
        if method in RANDOM:
            (ka, na), (kb, nb) = statistics(ours, dirs["base"]), statistics(theirs_out, dirs["base"])
            agree = abs(ka / kb - 1) < 0.01 and abs(na / nb - 1) < 0.01
            verdict = f"changed {ka:.4f} vs {kb:.4f}, |delta| {na:.3f} vs {nb:.3f}: {'statistically equal' if agree else 'DIFFER'}"
        else:
            cmp = compare_outputs(ours, theirs_out, names)
            verdict = cmp.get("error") or (f"{cmp['mismatched']} of {cmp['total']} elements differ (max {cmp['max_abs_diff']:.3g})"
                                            if cmp["mismatched"] else "bit-identical")
        rows.append((method, best["evomerge"], best["mergekit"], verdict))
        print(f"  {method:13s} evomerge {best['evomerge']['wall_s']:6.1f}s  mergekit {best['mergekit']['wall_s']:6.1f}s  {verdict}", flush=True)
        for tool in ("evomerge", "mergekit"):
            remove(work / f"vs-out-{tool}")
    print(f"\n{'1.1B shape' if not args.quick else '4 layers of the 1.1B shape'}, bf16, base + 2 fine-tunes, CPU\n")
    print("| recipe | evomerge wall (CPU) | mergekit wall (CPU) | x faster | evomerge RSS | mergekit RSS | outputs |")
    print("|---|---|---|---|---|---|---|")
    for method, o, m, verdict in rows:
        print(f"| {method} | {o['wall_s']:.1f} s ({o['cpu_s']:.1f} s) | {m['wall_s']:.1f} s ({m['cpu_s']:.1f} s) | "
              f"{m['wall_s'] / o['wall_s']:.2f} | {o['peak_rss_bytes'] / 1e9:.2f} GB | {m['peak_rss_bytes'] / 1e9:.2f} GB | {verdict} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
