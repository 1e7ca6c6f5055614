#!/usr/bin/env python3
"""A layer-path (frankenmerge) candidate in the resident executor: re-pointed layers vs copies.

    python bench/layer_path_resident.py [--work-dir bench_output] [--repeats 5] [--threads 1] [--no-check-finite]

Two float32 Llama-shaped checkpoints (hidden 1024, 8 layers, vocab 32000: 156M parameters, 0.62 GB
each; generated once into --work-dir) are held by a ResidentMerger with a live float32 model of 12
layers, as a search worker on CPU holds them. Candidates alternate between two 12-position paths
that differ at every position (so nothing is skipped as unchanged), each in a fresh process per
mode:

- `copy`: `ResidentMerger.repoint = False`, every output tensor copied into the model's own
  buffer (the executor before re-pointing);
- `repoint`: the default, unscaled layers re-pointed to the resident inputs;
- `scaled`: the same paths with every layer's o_proj/down_proj scaled by 0.9 (those tensors are
  computed into buffers of their own, the rest re-pointed).

Reported per mode: the median seconds of one candidate's apply() (with the non-finite check a
search worker makes, unless --no-check-finite), the bytes of the distinct storages behind the
model's tensors and the merger's inputs together (exact), and the process's resident memory after
the candidates. Measured on the 2-core CPU machine shared with other work (load about 3), --repeats
7, --threads 1:

    mode     candidate s (worker's check)   candidate s (--no-check-finite)   model + inputs GB   RSS GB
    copy     0.82 (0.098 with the sum check)  0.093                             2.05                2.52
    repoint  0.0020 (0.0017)                 0.0019                            1.25                1.72
    scaled   0.17 (0.031)                    0.035                             1.43                1.94-2.03

The inputs alone hold 1.25 GB. Re-pointing removes the model's copy of every unscaled tensor (0.80
GB here: the 12 layers, the embedding, the norm and the head all live in the inputs already), the
candidate's cost of writing them and of checking them for inf/NaN (each input is checked once, when
first re-pointed): what is left is planning. The inf/NaN check was most of a copied candidate's
time on CPU (0.73 of 0.82 s) while it was `isfinite(t).all()`; the values in parentheses are with
the check `resident.all_finite` makes now (a finite sum proves every entry finite). Until the
first recipe is applied, the freshly built model holds buffers of its own; they are freed one by
one as that recipe re-points them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GB = 1e9
LAYERS, OUT_LAYERS = 8, 12
# two paths over (model, layer) with layers repeated, differing at every output position
PATH_A = [(0, 0), (0, 1), (1, 1), (1, 2), (0, 2), (0, 3), (1, 3), (1, 4), (0, 5), (0, 6), (1, 6), (1, 7)]
PATH_B = [(1, 0), (1, 1), (0, 1), (0, 2), (1, 2), (1, 3), (0, 3), (0, 4), (1, 5), (1, 6), (0, 6), (0, 7)]


def ensure_models(work: Path) -> list[Path]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dirs = [work / "models" / f"layer-path-llama-{name}" for name in ("a", "b")]
    if all((d / "model.safetensors").exists() for d in dirs):
        return dirs
    cfg = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=LAYERS, num_attention_heads=16,
                      num_key_value_heads=4, vocab_size=32000, max_position_embeddings=512)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    for i, d in enumerate(dirs):
        if i:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p) * 0.01)
        model.save_pretrained(d)
    return dirs


def recipe(dirs: list[Path], path, scale) -> dict:
    def source(m, layer):
        src = {"model": str(dirs[m]), "layer_range": [layer, layer + 1]}
        if scale is not None:
            src["parameters"] = {"scale": [{"filter": "o_proj", "value": scale}, {"filter": "down_proj", "value": scale},
                                           {"value": 1.0}]}
        return src

    return {"merge_method": "passthrough", "dtype": "float32",
            "slices": [{"sources": [source(m, layer)]} for m, layer in path]}


def storage_bytes(tensors) -> int:
    seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t.numel()}
    return sum(seen.values())


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def measure(mode: str, dirs: list[Path], repeats: int, threads: int, check_finite: bool) -> dict:
    """One mode in this process (run by main() in a fresh process per mode)."""
    import gc

    import torch

    from merge_engine.config import parse_config
    from merge_engine.options import MergeOptions
    from merge_engine.resident import ResidentMerger

    torch.set_num_threads(threads)
    scale = 0.9 if mode == "scaled" else None
    a, b = (parse_config(recipe(dirs, p, scale)) for p in (PATH_A, PATH_B))
    merger = ResidentMerger(a, MergeOptions(quiet=True))
    merger.repoint = mode != "copy"
    model = merger.build_model(a, dtype=torch.float32)
    merger.apply(a, check_finite=check_finite)  # reads every input once (a worker's start-up)
    merger.apply(b, check_finite=check_finite)
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        stats = merger.apply(a if i % 2 == 0 else b, check_finite=check_finite)
        times.append(time.perf_counter() - start)
        assert stats.unchanged == 0
    gc.collect()
    held = list(model.parameters()) + list(model.buffers()) + list(merger._inputs.values())
    return {"mode": mode, "candidate_s": statistics.median(times), "times": times,
            "model_plus_inputs_bytes": storage_bytes(held), "inputs_bytes": storage_bytes(merger._inputs.values()),
            "repointed": len(merger.repointed), "rss_bytes": rss_bytes()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", type=Path, default=Path("bench_output"))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-check-finite", action="store_true",
                   help="apply without the non-finite check a search worker makes (the merge alone)")
    p.add_argument("--mode", choices=["copy", "repoint", "scaled"], help=argparse.SUPPRESS)  # one child process
    args = p.parse_args(argv)
    dirs = ensure_models(args.work_dir.resolve())
    if args.mode:
        print(json.dumps(measure(args.mode, dirs, args.repeats, args.threads, not args.no_check_finite)))
        return 0
    rows = []
    for mode in ("copy", "repoint", "scaled"):
        out = subprocess.run([sys.executable, __file__, "--work-dir", str(args.work_dir), "--repeats", str(args.repeats),
                              "--threads", str(args.threads), "--mode", mode]
                             + (["--no-check-finite"] if args.no_check_finite else []), capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'mode':<8} {'candidate s':>12} {'model + inputs GB':>18} {'RSS GB':>7}  re-pointed tensors")
    for r in rows:
        print(f"{r['mode']:<8} {r['candidate_s']:>12.4f} {r['model_plus_inputs_bytes'] / GB:>18.2f} "
              f"{r['rss_bytes'] / GB:>7.2f}  {r['repointed']}")
    print(f"inputs alone: {rows[0]['inputs_bytes'] / GB:.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
