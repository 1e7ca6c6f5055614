#!/usr/bin/env python3
"""Exported search recipes replayed through the real mergekit, compared with evomerge's own export.

    python bench/replay_exports.py [EXPERIMENT_DIR ...] [--runs bench_output/search_quality]
        [--mergekit-venv bench_output/mergekit-venv] [--limit N]

A finished `mergekit-evolve` search leaves `best_config.yaml` (a plain merge recipe) and
`final_model/` (what evomerge merged from it). Each given storage folder, or every
`runs/*/evolve` folder at any depth under --runs that has both, is replayed: the real mergekit 0.1.5 (its own
venv, made by bench/vs_mergekit.py's installer; it only runs as a command) merges
`best_config.yaml`, and every tensor of its output is compared with `final_model` bit for bit.
The recipes name their models by the paths the search used, so run this from the folder the
searches ran in (the repository root for bench/search_quality.py's runs).

One line per replayed search (tensors, mismatching tensors, largest |difference|) and a count at
the end; exit status 0 when every replay is bit-identical, 1 otherwise. Recipes of methods that
draw random masks (DARE, DELLA) cannot be replayed bit for bit by mergekit, whose masks come from
torch's unseeded global generator: they are listed as such and not counted as failures.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from merge_throughput import open_checkpoint  # noqa: E402
from vs_mergekit import ensure_mergekit  # noqa: E402

RANDOM_MASKS = {"dare_ties", "dare_linear", "della", "della_linear"}


def searches(args) -> list[Path]:
    if args.dirs:
        return [Path(d) for d in args.dirs]
    found = sorted(p.parent for p in Path(args.runs).glob("**/runs/*/evolve/best_config.yaml"))
    return [d for d in found if (d / "final_model").is_dir()][: args.limit or None]


def tensors(folder: Path) -> dict:
    model = open_checkpoint(folder)
    return {name: model.read(name) for name in model.tensors}


def replay(mergekit: Path, storage: Path) -> tuple[str, bool]:
    recipe = storage / "best_config.yaml"
    method = (yaml.safe_load(recipe.read_text()) or {}).get("merge_method", "?")
    with tempfile.TemporaryDirectory(prefix="replay-") as tmp:
        out = Path(tmp) / "merged"
        proc = subprocess.run([str(mergekit), str(recipe), str(out), "--no-copy-tokenizer", "--no-write-model-card"],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
            return f"{storage}: mergekit failed ({method}): {tail[:200]}", False
        ours, theirs = tensors(storage / "final_model"), tensors(out)
    if ours.keys() != theirs.keys():
        return f"{storage}: tensor names differ ({method}): {sorted(set(ours) ^ set(theirs))[:4]}", False
    misshapen = [k for k in ours if ours[k].shape != theirs[k].shape]
    if misshapen:
        return f"{storage}: shapes differ ({method}): {misshapen[:4]}", False
    differ = [k for k in ours if ours[k].dtype != theirs[k].dtype or not torch.equal(ours[k], theirs[k])]
    worst = max((float((ours[k].double() - theirs[k].double()).abs().max()) for k in differ), default=0.0)
    line = f"{storage}: {method}, {len(ours)} tensors, {len(differ)} differ (max |difference| {worst:.3g})"
    if differ and method in RANDOM_MASKS:
        return line + " [random masks: mergekit's are unseeded]", True
    return line, not differ


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dirs", nargs="*", help="search storage folders (default: every finished run under --runs)")
    p.add_argument("--runs", default="bench_output/search_quality")
    p.add_argument("--mergekit-venv", default="bench_output/mergekit-venv")
    p.add_argument("--limit", type=int, default=0, help="replay at most N runs (0: all)")
    args = p.parse_args(argv)
    todo = searches(args)
    if not todo:
        print("nothing to replay: no folder with best_config.yaml and final_model/")
        return 1
    mergekit = ensure_mergekit(Path(args.mergekit_venv))
    identical = 0
    for storage in todo:
        line, ok = replay(mergekit, storage)
        identical += ok
        print(("ok   " if ok else "DIFF ") + line, flush=True)
    print(f"{identical} of {len(todo)} exported recipes replayed bit-identically by mergekit 0.1.5")
    return 0 if identical == len(todo) else 1


if __name__ == "__main__":
    sys.exit(main())
