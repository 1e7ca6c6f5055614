"""Held-out (and search) accuracy of the SmolLM2 experiment's fixed recipes, measured with the
repository's own tools: merges through `mergekit-yaml`, scores through
`evaluators.lm_eval_tasks.LMEvalEvaluator` (as bench/search_quality.py does).

    python -m experiments.smollm.measure [--models demo_output/smollm/models]
        [--work-dir bench_output/smollm_measure] [--chat-template]

Rows: the base, each expert, uniform linear, task arithmetic (weight 1), TIES (density 0.5,
weight 1), the hand-made per-layer-group recipes (experiments/smollm/recipes.py). With
`--chat-template` the base and the first hand-made recipe are also scored with the tokenizer's
chat template applied (how search.yml's `apply_chat_template` was decided). Writes results.json
into the work directory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def baselines(models: dict) -> dict[str, str]:
    """The naive recipes, as bench/search_quality.py writes them."""
    import yaml

    experts = [str(p) for k, p in models.items() if k != "base"]

    def recipe(method, params, with_base=True):
        doc = {"merge_method": method, "dtype": "float32",
               "models": [{"model": e, "parameters": dict(params)} for e in experts]}
        if with_base:
            doc["base_model"] = str(models["base"])
        return yaml.safe_dump(doc, sort_keys=False)

    return {
        "uniform linear": recipe("linear", {"weight": 1 / len(experts)}, with_base=False),
        "task arithmetic (weight 1)": recipe("task_arithmetic", {"weight": 1.0}),
        "TIES (density 0.5, weight 1)": recipe("ties", {"weight": 1.0, "density": 0.5}),
    }


class Scorer:
    def __init__(self, task_dir: Path, tasks: list[str], chat: bool = False):
        from evaluators.lm_eval_tasks import LMEvalEvaluator, TaskSpec

        self.tasks = tasks
        self.evaluator = LMEvalEvaluator([TaskSpec(t) for t in tasks], include_paths=[str(task_dir)],
                                         apply_chat_template=chat)

    def __call__(self, path: Path) -> dict[str, float]:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        self.evaluator.attach(model, AutoTokenizer.from_pretrained(path))
        out = self.evaluator.evaluate()
        return {**out, "mean": statistics.fmean(out[t] for t in self.tasks)}


def main(argv=None) -> int:
    import torch

    from experiments.smollm import skills
    from experiments.smollm.build_models import build
    from experiments.smollm.recipes import references

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=Path, default=ROOT / "demo_output/smollm/models")
    p.add_argument("--work-dir", type=Path, default=ROOT / "bench_output/smollm_measure")
    p.add_argument("--chat-template", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="torch threads for scoring (default 1)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    models = build(args.models)
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    task_dir = work / "tasks"
    skills.write_lm_eval_tasks(task_dir)
    heldout, search = skills.heldout_task_names(), skills.search_task_names()
    score_held, score_search = Scorer(task_dir, heldout), Scorer(task_dir, search)
    rows = []

    def record(name, path, group):
        rows.append({"method": name, "group": group, "heldout": score_held(path), "search": score_search(path)})
        r = rows[-1]
        per_skill = " ".join(f"{t.split('_')[1]} {r['heldout'][t]:.3f}" for t in heldout)
        print(f"{name:34s} held-out {r['heldout']['mean']:.3f} ({per_skill})  search {r['search']['mean']:.3f}", flush=True)

    for name, path in models.items():
        record(name, path, "model")
    fixed = [(n, r, "baseline") for n, r in baselines(models).items()]
    fixed += [(n, r, "reference") for n, r in references(models).items()]
    merged = {}
    for name, recipe, group in fixed:
        slug = name.split(" (")[0].replace(" ", "_").replace(",", "")
        cfg, out = work / f"{slug}.yml", work / slug
        cfg.write_text(recipe)
        t = time.perf_counter()
        subprocess.run([str(BIN / "mergekit-yaml"), str(cfg), str(out), "--overwrite", "--quiet"], check=True)
        print(f"  merged {name} in {time.perf_counter() - t:.0f} s", flush=True)
        merged[name] = out
        record(name, out, group)
    if args.chat_template:
        chat = Scorer(task_dir, heldout, chat=True)
        first_reference = next(n for n, _, g in fixed if g == "reference")
        for name, path in (("base", models["base"]), (first_reference, merged[first_reference])):
            rows.append({"method": f"{name}, chat template", "group": "chat", "heldout": chat(path)})
            print(f"{name + ', chat template':34s} held-out {rows[-1]['heldout']['mean']:.3f}", flush=True)
    (work / "results.json").write_text(json.dumps({"rows": rows, "heldout_tasks": heldout}, indent=1))
    print(f"total {time.perf_counter() - t0:.0f} s; results: {work / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
