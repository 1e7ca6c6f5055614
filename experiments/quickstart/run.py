"""`make demo`: the quickstart evolutionary merge, end to end, on CPU.

1. builds (cached) a tiny base model and two experts fine-tuned from it on two synthetic skills,
   and the local lm-eval tasks for both skills (search items and held-out items);
2. runs `mergekit-evolve experiments/quickstart/search.yml` (CMA-ES over per-layer-group task
   arithmetic weights, scored by lm-eval on the search items, workers on a local Ray cluster);
3. merges a uniform linear baseline with `mergekit-yaml`;
4. prints held-out accuracy for the base, each expert, the uniform merge and the evolved merge.

The console shows the steps, the search's status line and the final table; lm-eval, transformers,
datasets and Ray logging, warnings and progress bars go to demo_output/quickstart/demo.log.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from experiments.quickstart.build_models import build  # noqa: E402
from experiments.quickstart.skills import write_lm_eval_tasks  # noqa: E402

WORK = Path("demo_output/quickstart")
LOG = WORK / "demo.log"
UNIFORM = """\
merge_method: linear
dtype: float32
models:
  - model: {arithmetic}
    parameters: {{weight: 0.5}}
  - model: {facts}
    parameters: {{weight: 0.5}}
"""


@contextlib.contextmanager
def details_to_log():
    """This process's stdout and stderr (file descriptors 1 and 2, so libraries' logging, warnings
    and progress bars included) are appended to LOG instead of the console."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(LOG, "a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def run_logged(cmd: list[str]) -> None:
    """Run `cmd` with its stdout on the console and its stderr appended to LOG; on failure, the
    log's last lines say why."""
    with open(LOG, "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.run(cmd, stderr=log)
    if proc.returncode:
        tail = LOG.read_text(errors="replace").splitlines()[-15:]
        print("\n".join(tail), file=sys.stderr)
        sys.exit(f"{cmd[0]} failed (exit code {proc.returncode}); the full log: {LOG}")


def held_out_scores(paths: dict[str, Path], task_dir: Path) -> dict[str, dict[str, float]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evaluators.lm_eval_tasks import LMEvalEvaluator, TaskSpec

    evaluator = LMEvalEvaluator(
        [TaskSpec("qs_arithmetic_heldout"), TaskSpec("qs_facts_heldout")], include_paths=[str(task_dir)]
    )
    scores = {}
    for name, path in paths.items():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        evaluator.attach(model, AutoTokenizer.from_pretrained(path))
        scores[name] = evaluator.evaluate()
    return scores


def sample_generations(path: Path, prompts: list[str]) -> list[tuple[str, str]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    out = []
    for prompt in prompts:
        ids = tokenizer(tokenizer.bos_token + prompt, return_tensors="pt")
        gen = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        out.append((prompt, tokenizer.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-fevals", type=int, default=None, help="override the search budget")
    parser.add_argument("--resume", action="store_true", help="continue a stopped demo search")
    args = parser.parse_args()
    os.chdir(ROOT)
    bin_dir = Path(sys.executable).parent
    t0 = time.time()
    WORK.mkdir(parents=True, exist_ok=True)
    LOG.write_text("")
    print(f"(lm-eval, transformers and Ray details: {LOG})", flush=True)
    print("1. building the tiny base model, two experts and the lm-eval tasks (cached)...", flush=True)
    with details_to_log():
        models = build(WORK / "models")
        task_dir = WORK / "tasks"
        write_lm_eval_tasks(task_dir)
    print(f"   done in {time.time() - t0:.1f}s", flush=True)

    storage = WORK / "evolve"
    if storage.exists() and not args.resume:
        shutil.rmtree(storage)
    cmd = [str(bin_dir / "mergekit-evolve"), "experiments/quickstart/search.yml", "--storage-path", str(storage),
           "--task-search-path", str(task_dir)]
    if args.max_fevals:
        cmd += ["--max-fevals", str(args.max_fevals)]
    if args.resume:
        cmd.append("--resume")
    print("2. evolutionary search:", " ".join(cmd), flush=True)
    run_logged(cmd)

    uniform = WORK / "uniform_linear"
    recipe = WORK / "uniform_linear.yml"
    recipe.write_text(UNIFORM.format(arithmetic=models["expert_arithmetic"], facts=models["expert_facts"]))
    print("3. uniform linear merge with mergekit-yaml", flush=True)
    run_logged([str(bin_dir / "mergekit-yaml"), str(recipe), str(uniform), "--overwrite", "--quiet"])

    print("4. held-out accuracy (items the search never saw):", flush=True)
    rows = {
        "base": models["base"],
        "expert_arithmetic": models["expert_arithmetic"],
        "expert_facts": models["expert_facts"],
        "uniform linear merge": uniform,
        "evolved merge": storage / "final_model",
    }
    with details_to_log():
        scores = held_out_scores(rows, task_dir)
        samples = sample_generations(storage / "final_model", ["3+4=", "the zorp is"])
    print(f"   {'model':<22} {'arithmetic':>10} {'facts':>7} {'mean':>6}")
    means = {}
    for name, s in scores.items():
        a, f = s["qs_arithmetic_heldout"], s["qs_facts_heldout"]
        means[name] = (a + f) / 2
        print(f"   {name:<22} {a:>10.3f} {f:>7.3f} {means[name]:>6.3f}")
    print("\n   sample generations from the evolved merge (greedy):")
    for prompt, text in samples:
        print(f"   {prompt!r} -> {text!r}")
    rivals = ["uniform linear merge", "expert_arithmetic", "expert_facts"]
    beaten = [r for r in rivals if means["evolved merge"] > means[r]]
    print(f"\nthe evolved merge beats {len(beaten)} of {len(rivals)} baselines on the held-out mean"
          f" ({', '.join(beaten) or 'none'})")
    print(f"recipe: {storage / 'best_config.yaml'}\nmodel:  {storage / 'final_model'}\nreport: {storage / 'report.html'}"
          f"\nlog:    {LOG}")
    print(f"total {time.time() - t0:.0f}s")
    return 0 if len(beaten) == len(rivals) else 1


if __name__ == "__main__":
    sys.exit(main())
