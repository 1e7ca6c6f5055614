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

The `tokenizer-union` row merges (task_arithmetic, `tokenizer_source: union`) three small Llama
checkpoints made here whose tokenizers differ: a byte-level BPE vocabulary trained on the fly for
the base, and fine-tunes that add different tokens (`<|im_start|>`, `<|im_end|>` special in one;
`<|im_end|>` special and `<tool>` plain in the other) with their own embedding rows. Both outputs'
token sets must be equal; mergekit numbers the appended tokens in Python set order (it changes
with PYTHONHASHSEED), so embedding and LM-head rows are compared token by token, the other tensors
bit for bit.
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from merge_throughput import compare_outputs, ensure_models, llama_spec, measured, model_files, open_checkpoint, read_all, remove  # noqa: E402

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


TOKEN_CORPUS = [f"the {a} {b} merges {c} of the {d}" for a in ("small", "large", "odd", "new") for b in ("model", "tensor", "vocab")
                for c in ("rows", "weights", "tokens") for d in ("base", "fine-tune", "union")]


def tokenizer_models(work: Path) -> dict[str, Path]:
    """base / ft_a / ft_b: 4-layer bf16 Llama checkpoints (hidden 256) with tokenizers that
    differ in their added tokens (made once, reused)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from experiments.quickstart.build_models import train_tokenizer

    root = work / "models" / "tok-union"
    dirs = {m: root / m for m in ("base", "ft_a", "ft_b")}
    if all((d / "tokenizer.json").exists() and (d / "model.safetensors").exists() for d in dirs.values()):
        return dirs
    tok = train_tokenizer(dirs["base"], TOKEN_CORPUS, vocab_size=300)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    base.save_pretrained(dirs["base"])
    added = {"ft_a": (["<|im_start|>", "<|im_end|>"], []), "ft_b": (["<|im_end|>"], ["<tool>"])}
    for seed, (name, (special, plain)) in enumerate(added.items(), start=1):
        gen = torch.Generator().manual_seed(seed)
        model = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), dtype=torch.bfloat16)  # resizing edits its config
        with torch.no_grad():
            for p, q in zip(model.parameters(), base.parameters()):
                p.copy_(q + 0.02 * torch.randn(q.shape, generator=gen).to(q.dtype))
        t = AutoTokenizer.from_pretrained(dirs["base"])
        t.add_special_tokens({"additional_special_tokens": special})
        if plain:
            t.add_tokens(plain)
        model.resize_token_embeddings(len(t), mean_resizing=False)
        with torch.no_grad():  # distinctive rows for the added tokens
            for w in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
                w[len(tok):] = (1.0 + torch.randn(w.shape[0] - len(tok), w.shape[1], generator=gen)).to(w.dtype)
        model.save_pretrained(dirs[name])
        t.save_pretrained(dirs[name])
    return dirs


def tokenizer_recipe(dirs: dict[str, Path]) -> str:
    return (f"merge_method: task_arithmetic\ndtype: bfloat16\nbase_model: {dirs['base']}\ntokenizer_source: union\nmodels:\n"
            f"  - model: {dirs['ft_a']}\n    parameters: {{weight: 0.6}}\n  - model: {dirs['ft_b']}\n    parameters: {{weight: 0.4}}\n")


def vocab(out: Path) -> dict[str, int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab(with_added_tokens=True)


def compare_union(ours: Path, theirs: Path, names: list[str]) -> str:
    """Same token set; embedding rows compared token by token (mergekit appends the added tokens
    in Python set order, which changes with PYTHONHASHSEED), every other tensor bit for bit."""
    import torch

    va, vb = vocab(ours), vocab(theirs)
    if set(va) != set(vb):
        return f"token sets DIFFER: {sorted(set(va) ^ set(vb))}"
    by_id = sorted(va, key=va.get)
    perm = torch.tensor([vb[t] for t in by_id])
    same_ids = all(va[t] == vb[t] for t in va)
    embeddings = [n for n in names if n.endswith(("embed_tokens.weight", "lm_head.weight"))]
    cmp = compare_outputs(ours, theirs, [n for n in names if n not in embeddings])
    if "error" in cmp:
        return cmp["error"]
    mo, mt = open_checkpoint(ours), open_checkpoint(theirs)
    rows_differ = sum(int((mo.read(n).view(torch.int16) != mt.read(n)[perm].view(torch.int16)).any(1).sum()) for n in embeddings)
    return (f"{len(va)} tokens, same token set ({'same ids' if same_ids else 'added tokens in another order'}); "
            f"embedding rows differing by token: {rows_differ}; other tensors: "
            f"{'bit-identical' if not cmp['mismatched'] else str(cmp['mismatched']) + ' elements differ'}")


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

    o, b = open_checkpoint(out), open_checkpoint(base)
    changed = total = 0
    norm2 = 0.0
    for name in o.tensors:
        if ".layers." not in name:
            continue
        delta = o.read(name).float() - b.read(name).float()
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
    all_recipes = recipes(dirs, layers)
    all_recipes["tokenizer-union"] = tokenizer_recipe(tokenizer_models(work))
    for method, text in all_recipes.items():
        recipe = work / f"vs-{method}.yml"
        recipe.write_text(text)
        best = {}
        for _ in range(args.repeats):
            for tool, exe in (("evomerge", OURS), ("mergekit", theirs)):  # alternating
                out = work / f"vs-out-{tool}"
                remove(out)
                cmd = [str(exe), str(recipe), str(out)]
                cmd += [] if method == "tokenizer-union" else ["--no-copy-tokenizer"]
                cmd += ["--quiet"] if tool == "evomerge" else []
                report = measured(cmd, work, f"vs-{tool}")
                if tool not in best or report["wall_s"] < best[tool]["wall_s"]:
                    best[tool] = report
        ours, theirs_out = work / "vs-out-evomerge", work / "vs-out-mergekit"
        names = list(open_checkpoint(theirs_out).tensors)
        if method in RANDOM:
            (ka, na), (kb, nb) = statistics(ours, dirs["base"]), statistics(theirs_out, dirs["base"])
            agree = abs(ka / kb - 1) < 0.01 and abs(na / nb - 1) < 0.01
            verdict = f"changed {ka:.4f} vs {kb:.4f}, |delta| {na:.3f} vs {nb:.3f}: {'statistically equal' if agree else 'DIFFER'}"
        elif method == "tokenizer-union":
            verdict = compare_union(ours, theirs_out, names)
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
