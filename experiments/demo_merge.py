"""`make demo` (plain merge): build two tiny experts from one base, merge them with
`mergekit-yaml`, and show what the merged model can do.

1. builds (once, cached) a tiny Llama base and two experts fine-tuned from it on two synthetic
   skills: small-number addition and a table of invented facts;
2. writes a merge recipe and runs the real `mergekit-yaml` CLI on it;
3. prints where the merged model is, a sample generation, and held-out accuracy of the base, each
   expert and the merge on both skills.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from experiments.quickstart.build_models import build  # noqa: E402

OUT = ROOT / "demo_output"

RECIPE = """\
# A plain linear merge of two experts fine-tuned from the same base.
merge_method: linear
dtype: float32
models:
  - model: {arithmetic}
    parameters:
      weight: 0.5
  - model: {facts}
    parameters:
      weight: 0.5
"""


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from experiments.quickstart.score import held_out_scores

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    t0 = time.time()
    print("building the tiny base model and two experts (cached after the first run)...")
    paths = build(OUT / "models")
    print(f"  done in {time.time() - t0:.1f}s: {', '.join(str(p) for p in paths.values())}")

    recipe = OUT / "linear_merge.yml"
    recipe.write_text(RECIPE.format(arithmetic=paths["expert_arithmetic"], facts=paths["expert_facts"]))
    merged = OUT / "merged"
    cli = Path(sys.executable).parent / "mergekit-yaml"
    t0 = time.time()
    cmd = [str(cli), str(recipe), str(merged), "--overwrite", "--quiet"]
    print("running:", " ".join(cmd))
    subprocess.run(cmd, check=True)
    print(f"  merged model written to {merged} in {time.time() - t0:.1f}s")

    tokenizer = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    print("\nsample generations from the merged model (greedy):")
    for prompt in ["3+4=", "the zorp is"]:
        ids = tokenizer(tokenizer.bos_token + prompt, return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        text = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        print(f"  {prompt!r} -> {text!r}")

    print("\nheld-out multiple-choice accuracy:")
    print(f"  {'model':<20} {'arithmetic':>10} {'facts':>7} {'mean':>6}")
    rows = [("base", paths["base"]), ("expert_arithmetic", paths["expert_arithmetic"]),
            ("expert_facts", paths["expert_facts"]), ("linear merge", merged)]
    for name, path in rows:
        m = model if path == merged else AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        s = held_out_scores(m, tokenizer)
        print(f"  {name:<20} {s['arithmetic']:>10.2f} {s['facts']:>7.2f} {(s['arithmetic'] + s['facts']) / 2:>6.2f}")
    print(f"\nthe merged model, its config.json, tokenizer, model card and recipe are in {merged}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
