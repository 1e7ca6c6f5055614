#!/usr/bin/env python3
"""`mergekit-extract-lora` on the Llama-shaped bf16 checkpoints of bench/merge_throughput.py.

    python bench/extract_lora.py [--work-dir ./bench_output] [--quick] [--max-rank 32] [--device cpu]

Extracts an adapter from `ft_a` against `base` (~1.1B parameters each, or 4 layers with --quick;
generated and cached there) in its own process and prints wall time, peak RSS and the adapter's
size. Peak RSS should stay near a few weight matrices plus the SVD workspace, far below one model
(~2.2 GB in bf16): exit status 1 if it passes 1.5 GB.

Then, in this process, the randomized SVD's reconstruction error is compared with the exact rank-r
optimum (the root of the sum of the discarded squared singular values, from `torch.linalg.svdvals`)
on the 7 linear modules of 4 layers spread over the model. Targets: at most 30 s for the 22-layer
shape at rank 32, every sampled error within 1 % of its optimum (exit status 1 otherwise).

Measured (2 CPU cores, --max-rank 32, 22 layers): 21.1 s, peak RSS 0.51 GB, adapter 312.8 MB
(embed_tokens and lm_head saved whole); error / optimum over 28 modules: worst 1.00253, mean
1.00136. Before the randomized SVD (a full float32 SVD of every module): 223.8 s, 0.64 GB.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from merge_throughput import ensure_models, llama_spec, measured, model_files, open_checkpoint, read_all, remove  # noqa: E402  (shared checkpoints)

CLI = Path(sys.executable).parent / "mergekit-extract-lora"
RSS_LIMIT = 1.5e9
TIME_LIMIT_S = 30.0  # 22 layers, rank 32
ERROR_LIMIT = 1.01  # randomized error / exact rank-r optimum


def error_vs_optimum(dirs: dict, layers: list[int], rank: int) -> list[tuple[str, float, float]]:
    """(tensor, randomized error, exact optimum) for the linear modules of `layers`."""
    import torch

    from merge_engine.extract_lora import top_singular_triplets

    ft, base = open_checkpoint(dirs["ft_a"]), open_checkpoint(dirs["base"])
    out = []
    for name in sorted(ft.tensors):
        parts = name.split(".")
        if not (name.endswith("proj.weight") and len(parts) > 2 and parts[2].isdigit() and int(parts[2]) in layers):
            continue
        delta = ft.read(name).float() - base.read(name).float()
        u, s, vh = top_singular_triplets(delta, rank)
        err = float(torch.linalg.matrix_norm(delta - (u * s) @ vh))
        sv = torch.linalg.svdvals(delta).double()
        out.append((name, err, float(sv[rank:].square().sum().sqrt())))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", default="./bench_output")
    p.add_argument("--quick", action="store_true", help="4-layer models")
    p.add_argument("--max-rank", type=int, default=32)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    work = Path(args.work_dir)
    spec_layers = 4 if args.quick else 22
    dirs = ensure_models(work, llama_spec(spec_layers))
    read_all([f for k in ("base", "ft_a") for f in model_files(dirs[k])], bytearray(64 << 20))  # warm page cache
    out = work / "extract-lora-out"
    remove(out)
    cmd = [str(CLI), "--model", str(dirs["ft_a"]), "--base-model", str(dirs["base"]), "--out-path", str(out),
           "--max-rank", str(args.max_rank), "--device", args.device, "--quiet"]
    report = measured(cmd, work, "extract-lora")
    size = sum(f.stat().st_size for f in out.iterdir())
    cfg = json.loads((out / "adapter_config.json").read_text())
    remove(out)
    print(f"extract-lora max-rank {args.max_rank} on {args.device}: {report['wall_s']:.1f} s, "
          f"peak RSS {report['peak_rss_bytes'] / 1e9:.2f} GB, adapter {size / 1e6:.1f} MB "
          f"(r={cfg['r']}, {len(cfg['target_modules'])} target names)")
    layers = sorted({0, spec_layers // 3, 2 * spec_layers // 3, spec_layers - 1})
    errors = error_vs_optimum(dirs, layers, args.max_rank)
    worst = max(err / opt for _, err, opt in errors)
    print(f"reconstruction error / exact rank-{args.max_rank} optimum over {len(errors)} modules of layers {layers}: "
          f"worst {worst:.5f}, mean {sum(e / o for _, e, o in errors) / len(errors):.5f}")
    ok = report["peak_rss_bytes"] <= RSS_LIMIT and worst <= ERROR_LIMIT
    if not args.quick:
        ok &= report["wall_s"] <= TIME_LIMIT_S
        print(f"targets: <= {TIME_LIMIT_S:.0f} s, error <= {ERROR_LIMIT:.2f}x optimum: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
