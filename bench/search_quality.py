#!/usr/bin/env python3
"""Search quality: evolved merge recipes vs random search vs fixed merge baselines, on held-out items.

    python bench/search_quality.py [--experiment conflict|quickstart] [--seeds 5] [--budget N]
        [--optimizers cma,tpe,nsga2,random,gradient,cma+gradient] [--work-dir bench_output/search_quality] [--threads 1] [--num-workers 1]

For every (optimizer, seed) the real `mergekit-evolve` CLI runs the experiment's search.yml with
`optimizer.name`, `optimizer.seed` and `budget.max_fevals` changed (a generated copy of the file);
the exported final_model is then scored on the held-out lm-eval tasks, which the search never
sees. The baselines (uniform linear, task arithmetic with weight 1 each, TIES) are merged with
`mergekit-yaml` and scored the same way, as are the base model and the experts for reference.
The score of a model is the mean held-out accuracy over the experiment's skills.

Default optimizers: cma, tpe and random, plus nsga2 when evomerge has it (`evolve.optimizers.OPTIMIZERS`).
Variants: `name:key=value` sets optimizer options, `+racing[@z[:fraction[/fraction...]]]` turns racing on (with another confidence_z and fraction; `0.2/0.5`: stages at 20 % and 50 %), `+pareto` makes
every task an objective, and `+ps` (with a layer-path --search-yml) is PS+DFS: the seed's
parameter-space search (the experiment's search.yml with CMA-ES, cached as the plain `cma` run)
runs first and its final_model becomes the layer path's first model, so the layer-path search
starts from that merge (its evaluations are the layer-path stage's; the stage before costs as many).
Every finished run is cached in the work directory (`runs/<optimizer>-seed<S>-b<budget>/result.json`):
running the command again skips it, and a search stopped half-way is continued with `--resume`.
The table gives, per method: median and min-max of the held-out score over seeds, and the median
number of evaluations and wall seconds per search; results.json holds every number.
`--export-z` (default 0,1,2,3) also scores, per search, what the export rule
(evolve.selection) would have exported with each z: the measurement behind EXPORT_Z.
Exit status 0 when every evolved optimizer meets the robust-export targets (held-out median at
least the best naive recipe's and random search's; worst seed at most 0.02 below the best naive
recipe), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BIN = Path(sys.executable).parent
RANDOM = "random"
SEARCH_FREE = "search-free reference"


@dataclass(frozen=True)
class Experiment:
    search_yml: Path
    build: Callable[[], dict]  # -> {"base": path, "expert_<skill>": path, ...}
    write_tasks: Callable[[Path], list]
    heldout: tuple[str, ...]
    # recipes known by construction, shown for reference (not baselines the search must beat)
    references: Callable[[dict], dict] = lambda models: {}


def experiment(name: str) -> Experiment:
    if name == "conflict":
        from experiments.conflict import skills
        from experiments.conflict.build_models import build

        return Experiment(ROOT / "experiments/conflict/search.yml", lambda: build(Path("demo_output/conflict/models")),
                          skills.write_lm_eval_tasks, tuple(skills.heldout_task_names()), per_layer_choice)
    if name == "quickstart":
        from experiments.quickstart.build_models import build
        from experiments.quickstart.skills import TASKS, write_lm_eval_tasks

        return Experiment(ROOT / "experiments/quickstart/search.yml", lambda: build(Path("demo_output/quickstart/models")),
                          write_lm_eval_tasks, tuple(f"qs_{s}_heldout" for s in TASKS))
    if name == "smollm":
        from experiments.smollm import skills
        from experiments.smollm.build_models import build
        from experiments.smollm.recipes import references

        return Experiment(ROOT / "experiments/smollm/search.yml", lambda: build(Path("demo_output/smollm/models")),
                          skills.write_lm_eval_tasks, tuple(skills.heldout_task_names()), references)
    raise SystemExit(f"--experiment: unknown experiment {name!r} (known: conflict, quickstart, smollm)")


def per_layer_choice(models: dict) -> dict[str, str]:
    """The conflict experiment's designed answer: layer group k from expert k alone (weight 1)."""
    import yaml

    from experiments.conflict.build_models import own_layers
    from experiments.conflict.skills import SKILLS

    slices = []
    for owner in SKILLS:
        layers = own_layers(owner)
        span = [layers[0], layers[-1] + 1]
        sources = [{"model": str(models[f"expert_{s}"]), "layer_range": span, "parameters": {"weight": float(s == owner)}}
                   for s in SKILLS]
        slices.append({"sources": sources + [{"model": str(models["base"]), "layer_range": span}]})
    doc = {"merge_method": "task_arithmetic", "base_model": str(models["base"]), "dtype": "float32", "slices": slices}
    return {"per-layer choice by hand": yaml.safe_dump(doc, sort_keys=False)}


def default_optimizers() -> list[str]:
    from evolve.optimizers import OPTIMIZERS

    return [o for o in ("cma", "tpe", "nsga2", RANDOM) if o in OPTIMIZERS]


def baseline_recipes(models: dict) -> dict[str, str]:
    """mergekit recipes of the fixed baselines over the experts (`models` without "base")."""
    import yaml

    experts = [str(p) for k, p in models.items() if k != "base"]
    base = str(models["base"])

    def recipe(method, params, with_base=True, **extra):
        doc = {"merge_method": method, "dtype": "float32",
               "models": [{"model": e, "parameters": dict(params)} for e in experts], **extra}
        if with_base:
            doc["base_model"] = base
        return yaml.safe_dump(doc, sort_keys=False)

    n = len(experts)
    return {
        # = task arithmetic at weight 1/N: the experts share the base's embeddings and head
        "uniform linear": recipe("linear", {"weight": 1 / n}, with_base=False),
        "task arithmetic (weight 1)": recipe("task_arithmetic", {"weight": 1.0}),
        "TIES (density 0.5, weight 1)": recipe("ties", {"weight": 1.0, "density": 0.5}),
    }


class Scorer:
    """Held-out accuracy through the same lm-eval evaluator the search uses (tasks loaded once)."""

    def __init__(self, task_dir: Path, tasks: tuple[str, ...]):
        from evaluators.lm_eval_tasks import LMEvalEvaluator, TaskSpec

        self.tasks = tasks
        self.evaluator = LMEvalEvaluator([TaskSpec(t) for t in tasks], include_paths=[str(task_dir)])

    def __call__(self, path: Path) -> dict[str, float]:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        self.evaluator.attach(model, AutoTokenizer.from_pretrained(path))
        per_task = self.evaluator.evaluate()
        return {**per_task, "mean": statistics.fmean(per_task[t] for t in self.tasks)}


def _write_json(path: Path, data) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)  # a killed bench never leaves a half-written result behind


def parse_variant(spec: str) -> tuple[str, dict, set]:
    """`name[:key=value/...][+racing[@z[:fraction[/fraction...]]]][+pareto][+ps]` -> (optimizer name or "default", optimizer
    options, modifiers). "default" names no optimizer: mergekit-evolve's own choice applies."""
    from evolve.optimizers import OPTIMIZERS

    # an optimizer whose own name holds a "+" (cma+gradient) is not a modifier
    joined = next((n for n in OPTIMIZERS if "+" in n and (spec == n or spec.startswith((n + ":", n + "+")))), None)
    if joined is not None:
        spec = spec.replace(joined, "JOINED", 1)
    base, *mods = spec.split("+")
    name, _, opts = base.partition(":")
    if joined is not None:
        name = joined
    options = {}
    for item in filter(None, opts.split("/")):
        key, _, value = item.partition("=")
        options[key] = float(value)
    unknown = {m.partition("@")[0] for m in mods} - {"racing", "pareto", "ps"}
    if unknown:
        raise SystemExit(f"--optimizers {spec}: unknown modifier(s) {', '.join(sorted(unknown))}")
    return name, options, set(mods)


def search_yml_copy(source: Path, optimizer: str, seed: int, budget: int, layer_source=None) -> str:
    """`layer_source` (+ps): a model folder put first in the genome's models (the starting point
    of a layer-path genome is then that model's own layers)."""
    import yaml

    name, options, mods = parse_variant(optimizer)
    doc = yaml.safe_load(source.read_text())
    # popsize etc. belong to the file's own optimizer; another one gets its defaults
    opt = dict(doc.get("optimizer") or {}) if (doc.get("optimizer") or {}).get("name") == name else {}
    doc["optimizer"] = {**opt, **options, "seed": seed, **({} if name == "default" else {"name": name})}
    doc["budget"] = {**(doc.get("budget") or {}), "max_fevals": budget}
    for mod in mods:
        if mod.startswith("racing"):  # racing, or racing@Z[:F[/F2...]] for another confidence_z (and stages)
            z, _, fraction = mod.partition("@")[2].partition(":")
            shares = [float(f) for f in fraction.split("/")] if fraction else []
            doc["racing"] = {**({"confidence_z": float(z)} if z else {}),
                             **({"fraction": shares[0] if len(shares) == 1 else shares} if shares else {})} or True
    if "pareto" in mods:
        doc["objectives"] = "pareto"
    if layer_source is not None:
        doc["genome"] = {**doc["genome"], "models": [str(layer_source), *doc["genome"]["models"]]}
    return yaml.safe_dump(doc, sort_keys=False)


def evaluated_items(storage: Path) -> int:
    """Items scored over the whole search (racing's saving), from the study's `items` attributes."""
    import sqlite3

    con = sqlite3.connect(f"file:{storage / 'study.db'}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT value_json FROM trial_user_attributes WHERE key = 'items'").fetchall()
    finally:
        con.close()
    return sum(int(json.loads(v)) for (v,) in rows)


def run_search(run_dir: Path, source: Path, optimizer: str, seed: int, budget: int, task_dir: Path,
               threads: int, score: Scorer, layer_source=None, workers: int = 1) -> dict:
    """One cached (optimizer, seed) search: the CLI, then the held-out score of its final model."""
    done = run_dir / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = run_dir / "search.yml"
    cfg.write_text(search_yml_copy(source, optimizer, seed, budget, layer_source))
    storage = run_dir / "evolve"
    cmd = [str(BIN / "mergekit-evolve"), str(cfg), "--storage-path", str(storage), "--task-search-path", str(task_dir),
           "-j", str(threads), "--quiet", *(["--num-workers", str(workers)] if workers > 1 else [])]
    if (storage / "study.db").exists():
        cmd.append("--resume")  # an earlier bench run stopped inside this search
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    final = storage / "final_model"
    if proc.returncode != 0 or not (final / "config.json").exists():
        err = (proc.stderr or proc.stdout).strip().splitlines()
        return {"error": err[-1] if err else f"exit status {proc.returncode}", "wall_s": wall}
    from evolve.report import read_runs

    result = {
        "optimizer": optimizer, "seed": seed, "wall_s": wall,
        "evaluations": sum(r.evaluated for r in read_runs(storage)),
        "items": evaluated_items(storage),
        "optimizer_used": json.loads((storage / "manifest.json").read_text()).get("optimizer", optimizer),
        "heldout": score(final),
    }
    _write_json(done, result)
    return result


def exports_by_z(storage: Path, zs: tuple[float, ...]) -> dict[float, tuple[int, object]]:
    """z -> (trial number, its merge recipe) that the export rule (evolve.selection.choose) picks
    with that z, read from a finished search's study: what another EXPORT_Z would have exported."""
    import optuna

    from evolve.config import parse_search_config
    from evolve.objectives import Scoring
    from evolve.build import build_genome
    from evolve.selection import choose
    from evolve.store import STUDY_NAME, trial_row
    from merge_engine.config import load_yaml_text

    manifest = json.loads((storage / "manifest.json").read_text())
    config = parse_search_config(load_yaml_text(manifest["config"], "manifest.json"), "manifest.json")
    genome = build_genome(config)
    names = genome.space.names
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{storage / 'study.db'}")
    trials = {t.number: t for t in study.get_trials(deepcopy=False) if t.state.is_finished() and t.value is not None}
    rows = [trial_row(t) for t in trials.values()]
    weights = Scoring.for_search(config, study.user_attrs.get("directions", {})).signed_weights
    picks = {}
    for z in zs:
        number = choose(rows, weights, z).number
        picks[z] = (number, genome.decode([float(trials[number].params[n]) for n in names]))
    return picks


def score_exports_by_z(run_dir: Path, result: dict, zs: tuple[float, ...], score: Scorer) -> dict:
    """result["by_z"][str(z)] = {"number", "heldout"}: the held-out score of what each z exports
    (the search's own export reused; the others merged with mergekit-yaml). Cached in result.json."""
    by_z = dict(result.get("by_z") or {})
    todo = [z for z in zs if f"{z:g}" not in by_z]
    if not todo or "heldout" not in result:
        return result
    storage = run_dir / "evolve"
    header = (storage / "best_config.yaml").read_text().split("\n", 1)[0]  # "# best recipe so far: trial N, ..."
    exported_number = int(header.split("trial ", 1)[1].split(",", 1)[0])
    picks = exports_by_z(storage, tuple(todo))
    scored: dict[int, float] = {v["number"]: v["heldout"] for v in by_z.values()}
    for z, (number, recipe) in picks.items():
        if number not in scored:
            if number == exported_number:
                scored[number] = result["heldout"]["mean"]
            else:
                cfg, out = run_dir / f"trial{number}.yml", run_dir / f"trial{number}"
                cfg.write_text(recipe.to_yaml())
                subprocess.run([str(BIN / "mergekit-yaml"), str(cfg), str(out), "--overwrite", "--quiet"], check=True)
                scored[number] = score(out)["mean"]
                import shutil

                shutil.rmtree(out, ignore_errors=True)
        by_z[f"{z:g}"] = {"number": number, "heldout": scored[number]}
    result = {**result, "by_z": by_z}
    _write_json(run_dir / "result.json", result)
    return result


def summarise(name: str, results: list[dict]) -> dict:
    ok = [r for r in results if "heldout" in r]
    scores = [r["heldout"]["mean"] for r in ok]
    row = {"method": name, "runs": len(ok), "failed": [r["error"] for r in results if "error" in r]}
    if scores:
        row.update(median=statistics.median(scores), min=min(scores), max=max(scores), scores=scores)
        evals = [r["evaluations"] for r in ok if "evaluations" in r]
        row["evaluations"] = statistics.median(evals) if evals else None
        walls = [r["wall_s"] for r in ok if "wall_s" in r]
        row["wall_s"] = statistics.median(walls) if walls else None
        items = [r["items"] for r in ok if r.get("items")]
        row["items"] = statistics.median(items) if items else None
    return row


# the worst seed may fall this far below the best naive recipe (the robust-export targets)
WORST_SEED_SLACK = 0.02


def targets(search: dict, naive: list[dict], random: dict | None) -> dict[str, bool]:
    """The robust-export targets for one optimizer's row: its held-out median at least the best
    naive recipe's and random search's, its worst seed at most WORST_SEED_SLACK below the best
    naive recipe."""
    best = max((r["median"] for r in naive if "median" in r), default=float("-inf"))
    median, worst = search.get("median", float("-inf")), search.get("min", float("-inf"))
    out = {f"median {median:.3f} >= best naive {best:.3f}": median >= best,
           f"worst seed {worst:.3f} >= best naive - {WORST_SEED_SLACK} = {best - WORST_SEED_SLACK:.3f}":
               worst >= best - WORST_SEED_SLACK - 1e-12}
    if random is not None and "median" in random:
        out[f"median {median:.3f} >= random search's {random['median']:.3f}"] = median >= random["median"]
    return out


def export_rule_rows(optimizers: list[str], results: dict[str, list[dict]], zs: tuple[float, ...]) -> list[dict]:
    """A table row per (optimizer, z): the held-out scores of what that z would have exported."""
    rows = []
    for opt in optimizers:
        for z in zs:
            scores = [r["by_z"][f"{z:g}"]["heldout"] for r in results[opt] if f"{z:g}" in (r.get("by_z") or {})]
            if scores:
                rows.append({"method": f"{opt}, export z = {z:g}", "runs": len(scores), "group": "search",
                             "median": statistics.median(scores), "min": min(scores), "max": max(scores),
                             "scores": scores})
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"| {'method':<30} | held-out median | min - max     | evaluations | items scored | search wall s |",
             f"|{'-' * 32}|-----------------|---------------|-------------|--------------|---------------|"]
    for r in rows:
        if "median" not in r:
            lines.append(f"| {r['method']:<30} | failed: {'; '.join(r['failed'])[:80]}")
            continue
        spread = f"{r['min']:.3f} - {r['max']:.3f}" if r["runs"] > 1 else "(1 run)" if r.get("group") == "search" else "(fixed)"
        ev = f"{r['evaluations']:g}" if r.get("evaluations") is not None else "-"
        wall = f"{r['wall_s']:.0f}" if r.get("wall_s") is not None else "-"
        items = f"{r['items']:g}" if r.get("items") is not None else "-"
        lines.append(f"| {r['method']:<30} | {r['median']:>15.3f} | {spread:<13} | {ev:>11} | {items:>12} | {wall:>13} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experiment", default="conflict", choices=["conflict", "quickstart", "smollm"])
    p.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 per optimizer (default 5)")
    p.add_argument("--budget", type=int, default=None, help="evaluations per search (default: the search.yml's)")
    p.add_argument("--optimizers", default=None, help="comma-separated (default: cma,tpe,nsga2 if available,random)")
    p.add_argument("--work-dir", type=Path, default=Path("bench_output/search_quality"))
    p.add_argument("--search-yml", type=Path, default=None,
                   help="search this config instead of the experiment's search.yml (e.g. experiments/conflict/layer_path.yml)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per search worker and for scoring (default 1: the models are tiny, and on a "
                        "busy machine two threads waiting on each other are far slower than one)")
    p.add_argument("--num-workers", type=int, default=1,
                   help="search workers per search (mergekit-evolve --num-workers; runs cached apart, with -wN)")
    p.add_argument("--export-z", default="0,1,2,3",
                   help="also score what the export rule would export with each of these z (evolve.selection; "
                        "'' for none): the measurement behind EXPORT_Z")
    args = p.parse_args(argv)
    zs = tuple(float(z) for z in args.export_z.split(",") if z.strip())
    from evolve.optimizers import OPTIMIZERS

    optimizers = args.optimizers.split(",") if args.optimizers else default_optimizers()
    unknown = [o for o in optimizers if parse_variant(o)[0] not in (*OPTIMIZERS, "default")]
    if unknown:
        raise SystemExit(f"--optimizers: unknown {', '.join(unknown)} (known: {', '.join(OPTIMIZERS)})")
    import torch
    import yaml

    torch.set_num_threads(args.threads)  # held-out scoring in this process: tiny models, see --threads
    os.chdir(ROOT)  # the search.yml files name their models relative to the repository root
    exp = experiment(args.experiment)
    source = (args.search_yml if args.search_yml.is_absolute() else ROOT / args.search_yml) if args.search_yml else exp.search_yml
    budget = args.budget or (yaml.safe_load(source.read_text()).get("budget") or {}).get("max_fevals", 100)
    work = exp_work = (args.work_dir if args.work_dir.is_absolute() else ROOT / args.work_dir) / args.experiment
    if args.search_yml:
        work = work / source.stem  # its own runs, beside the experiment's shared tasks and baselines
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    models = exp.build()
    task_dir = work / "tasks"
    exp.write_tasks(task_dir)
    score = Scorer(task_dir, exp.heldout)
    print(f"models and tasks ready in {time.perf_counter() - t0:.0f}s", flush=True)

    rows: list[dict] = []
    for name, path in models.items():
        rows.append({**summarise(name, [{"heldout": score(path)}]), "group": SEARCH_FREE})
    fixed = [(n, r, "baseline") for n, r in baseline_recipes(models).items()]
    fixed += [(n, r, "reference") for n, r in exp.references(models).items()]
    for name, recipe, group in fixed:
        slug = name.split(" (")[0].replace(" ", "_")
        out = work / "baselines" / slug
        (work / "baselines").mkdir(parents=True, exist_ok=True)
        cfg = work / "baselines" / f"{slug}.yml"
        cfg.write_text(recipe)
        subprocess.run([str(BIN / "mergekit-yaml"), str(cfg), str(out), "--overwrite", "--quiet"], check=True)
        rows.append({**summarise(name, [{"heldout": score(out)}]), "group": group})
    print(table(rows), flush=True)

    results: dict[str, list[dict]] = {o: [] for o in optimizers}
    # seed-major order: a change in the machine's load falls on every optimiser alike
    for seed in range(args.seeds):
        for opt in optimizers:
            run_name = opt.replace(':', '_').replace('=', '').replace(',', '_').replace('/', '-')
            run_dir = work / "runs" / f"{run_name}-seed{seed}-b{budget}{f'-w{args.num_workers}' if args.num_workers > 1 else ''}"
            layer_source = None
            if "ps" in parse_variant(opt)[2]:
                # PS+DFS: this seed's parameter-space search first (the experiment's own search.yml,
                # CMA-ES, cached with the plain runs), its final_model then the layer path's model 0
                ps_budget = (yaml.safe_load(exp.search_yml.read_text()).get("budget") or {}).get("max_fevals", 100)
                ps_dir = exp_work / "runs" / f"cma-seed{seed}-b{ps_budget}"
                ps = run_search(ps_dir, exp.search_yml, "cma", seed, ps_budget, task_dir, args.threads, score)
                if "heldout" not in ps:
                    results[opt].append({"error": f"parameter-space stage: {ps['error']}"})
                    continue
                layer_source = ps_dir / "evolve" / "final_model"
            r = run_search(run_dir, source, opt, seed, budget, task_dir, args.threads, score, layer_source, args.num_workers)
            if zs and "heldout" in r:
                r = score_exports_by_z(run_dir, r, zs, score)
            if layer_source is not None and "heldout" in r:
                r = {**r, "ps_heldout": ps["heldout"]["mean"], "ps_wall_s": ps["wall_s"]}
            results[opt].append(r)
            status = f"{r['heldout']['mean']:.3f} held-out, {r['evaluations']} evaluations" if "heldout" in r else r["error"]
            if "ps_heldout" in r:
                status += f" (its parameter-space stage: {r['ps_heldout']:.3f})"
            print(f"  {opt} seed {seed}: {status} ({r.get('wall_s', 0):.0f}s)", flush=True)
    for opt in optimizers:
        rows.append({**summarise(f"{opt} search", results[opt]), "group": "search"})

    print(f"\nexperiment {args.experiment}, {args.seeds} seed(s), budget {budget} evaluations, "
          f"held-out score = mean accuracy over {', '.join(exp.heldout)}")
    print(table(rows))
    z_rows = export_rule_rows(optimizers, results, zs)
    if z_rows:
        print("\nwhat each z of the export rule would have exported (held-out, over the same searches):")
        print(table(z_rows))
    by_method = {r["method"]: r for r in rows}
    verdict = {}
    for opt in (o for o in optimizers if parse_variant(o)[0] != RANDOM):
        verdict[opt] = targets(by_method[f"{opt} search"], [r for r in rows if r["group"] == "baseline"],
                               by_method.get(f"{RANDOM} search"))
        missed = [name for name, ok in verdict[opt].items() if not ok]
        print(f"{opt}: " + ("meets every target" if not missed else f"misses: {'; '.join(missed)}"))
    _write_json(work / "results.json", {
        "experiment": args.experiment, "seeds": args.seeds, "budget": budget, "optimizers": optimizers,
        "heldout_tasks": list(exp.heldout), "rows": rows, "runs": results, "verdict": verdict,
    })
    print(f"results: {work / 'results.json'}  (total {time.perf_counter() - t0:.0f}s)")
    return 0 if verdict and all(all(v.values()) for v in verdict.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
