#!/usr/bin/env python3
"""`mergekit-extract-lora` on the Llama-shaped bf16 checkpoints of bench/merge_throughput.py.

    python bench/extract_lora.py [--work-dir ./bench_output] [--quick] [--max-rank 32] [--device cpu]

Extracts an adapter from `ft_a` against `base` (~1.1B parameters each, or 4 layers with --quick;
generated and cached there) in its own process and prints wall time, peak RSS and the adapter's
size. Peak RSS should stay near a few weight matrices plus the SVD workspace, far below one model
(~2.2 GB in bf16): exit status 1 if it passes 1.5 GB.

Measured (2 shared CPU cores, --max-rank 32): 22 layers 223.8 s, peak RSS 0.64 GB, adapter 312.8 MB
(embed_tokens and lm_head saved whole); --quick 41.7 s, 0.63 GB. Time is the 154 float32 SVDs.
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

CLI = Path(sys.executable).parent / "mergekit-extract-lora"
RSS_LIMIT = 1.5e9


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", default="./bench_output")
    p.add_argument("--quick", action="store_true", help="4-layer models")
    p.add_argument("--max-rank", type=int, default=32)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    work = Path(args.work_dir)
    dirs = ensure_models(work, llama_spec(4 if args.quick else 22))
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
    return 0 if report["peak_rss_bytes"] <= RSS_LIMIT else 1


if __name__ == "__main__":
    sys.exit(main())
