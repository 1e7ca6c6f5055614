"""The evolutionary search end to end: a real local Ray cluster, real lm-eval tasks, a real SQLite
study, on a smaller version of the quickstart experiment (tiny models trained in the fixture)."""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import shared_ray
from evolve.selection import BOUND_EPS, EXPORT_Z

pytestmark = [pytest.mark.e2e, pytest.mark.ray, pytest.mark.slow]  # mergekit-evolve on a local Ray cluster

EVOLVE = str(Path(sys.executable).parent / "mergekit-evolve")
ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", RAY_AUTH_MODE="disabled")


def search_yaml(qs, path: Path, optimizer: str = "cma", budget: int = 17, popsize: int = 8, method: str = "task_arithmetic") -> Path:
    m = qs["models"]
    config = {
        "genome": {
            "models": [str(m["expert_arithmetic"]), str(m["expert_facts"])],
            "base_model": str(m["base"]),
            "merge_method": method,
            "layer_granularity": 2,
            "dtype": "float32",
        },
        "tasks": ["qs_arithmetic", {"name": "qs_facts", "weight": 1.0, "metric": "acc,none"}],
        "apply_chat_template": False,
        "fewshot_as_multiturn": False,
        "optimizer": {"name": optimizer, "popsize": popsize, "seed": 0},
        "budget": {"max_fevals": budget},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def run_evolve(cfg: Path, storage: Path, tasks: Path, *extra: str, timeout: int = 300, shared: bool = True):
    """The CLI in a subprocess; `shared`: it joins this test process's Ray cluster (shared_ray.py)
    instead of starting a private one."""
    cmd = [EVOLVE, str(cfg), "--storage-path", str(storage), "--task-search-path", str(tasks), *extra]
    env = dict(ENV, RAY_ADDRESS=shared_ray.address()) if shared else ENV
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def trials(storage: Path) -> list[dict]:
    """Finished trials straight from the SQLite file (what optuna-dashboard reads)."""
    con = sqlite3.connect(storage / "study.db")
    rows = con.execute("SELECT trial_id, number, state FROM trials ORDER BY number").fetchall()
    out = []
    for trial_id, number, state in rows:
        attrs = dict(con.execute("SELECT key, value_json FROM trial_user_attributes WHERE trial_id=?", (trial_id,)).fetchall())
        value = con.execute("SELECT value FROM trial_values WHERE trial_id=?", (trial_id,)).fetchone()
        out.append({
            "number": number, "state": state, "value": value[0] if value else None,
            **{k: json.loads(v) for k, v in attrs.items()},
        })
    con.close()
    return out


def exported_by_rule(rows: list[dict], z: float = EXPORT_Z) -> dict:
    """The export rule computed here from the study's rows (float64, numpy): the highest lower
    confidence bound of the paired lead over the best anchor, the anchor itself at 0 (a bound
    must beat it by more than rounding, BOUND_EPS)."""
    import numpy as np

    complete = sorted((r for r in rows if r["state"] == "COMPLETE" and r.get("violation", 0.0) <= 0),
                      key=lambda r: (-r["value"], r["tell_order"]))
    anchor = next(r for r in complete if r.get("anchor"))
    best, best_bound = anchor, 0.0
    for r in complete:
        if r is anchor:
            continue
        d = {t: np.array(r["item_values"][t], dtype=np.float64) - np.array(anchor["item_values"][t], dtype=np.float64)
             for t in ("qs_arithmetic", "qs_facts")}
        bound = sum(v.mean() for v in d.values()) - z * np.sqrt(sum(v.var(ddof=1) / len(v) for v in d.values()))
        if bound > best_bound + BOUND_EPS:
            best, best_bound = r, bound
    return best


def test_search_improves_on_its_starting_point_and_exports(quickstart, tmp_path):
    cfg = search_yaml(quickstart, tmp_path / "search.yml")
    storage = tmp_path / "run"
    proc = run_evolve(cfg, storage, quickstart["tasks"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = trials(storage)
    assert len(rows) == 17 and all(r["state"] == "COMPLETE" for r in rows)
    start = rows[0]
    # the anchors are scored first: the starting point (weight 1/n) and task arithmetic's weight 1
    assert [(r["generation"], r.get("anchor")) for r in rows[:3]] == [
        (-1, "start: weight 1/n each"), (-1, "weight 1 each"), (0, None)]
    assert all(r.get("anchor") is None for r in rows[2:])
    top = max(rows, key=lambda r: r["value"])
    assert top["value"] > start["value"], [r["value"] for r in rows]
    # every complete candidate keeps its per-item values: the export rule pairs them
    assert all(len(r["item_values"]["qs_arithmetic"]) == 66 and len(r["item_values"]["qs_facts"]) == 20 for r in rows)
    for r in rows:
        assert r["metrics"]["qs_facts"] == pytest.approx(sum(r["item_values"]["qs_facts"]) / 20, abs=1e-12)
    best = exported_by_rule(rows)
    # every trial carries its metrics, recipe hash and timings; fitness = sum of weighted metrics
    for r in rows:
        assert set(r["metrics"]) == {"qs_arithmetic", "qs_facts"}
        assert r["value"] == pytest.approx(r["metrics"]["qs_arithmetic"] + r["metrics"]["qs_facts"])
        assert len(r["recipe_hash"]) == 16 and r["timings"]["eval_s"] > 0 and r["timings"]["total_s"] >= r["timings"]["eval_s"]
        assert r["attempts"] == 1 and r["status"] == "complete"
    # the journal: candidates are numbered in ask order and told in order with one worker
    assert [r["tell_order"] for r in rows] == list(range(17))
    assert [r["told_before"] for r in rows] == list(range(17))
    # the best recipe keeps the user's model references and is a valid mergekit recipe
    text = (storage / "best_config.yaml").read_text()
    recipe = yaml.safe_load(text)
    assert recipe["merge_method"] == "task_arithmetic" and recipe["base_model"] == str(quickstart["models"]["base"])
    refs = {s["model"] for slc in recipe["slices"] for s in slc["sources"]}
    assert refs == {str(p) for p in quickstart["models"].values()}
    assert f"trial {best['number']}, fitness {best['value']:.6g}" in text.splitlines()[0]
    # the final model: merged by the streaming engine, with the search summary in its card
    final = storage / "final_model"
    assert (final / "model.safetensors").is_file() and (final / "config.json").is_file()
    card = (final / "README.md").read_text()
    assert "Evolutionary search" in card and f"Exported: trial {best['number']}, search fitness {best['value']:.6g}" in card
    assert "2 hand-made recipe(s) scored first (anchors): trial 0 start: weight 1/n each" in card
    assert (storage / "fitness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = json.loads((storage / "manifest.json").read_text())
    assert manifest["versions"]["torch"] and manifest["config"] == cfg.read_text()
    # a second run into the same directory without --resume is refused, nothing is touched
    again = run_evolve(cfg, storage, quickstart["tasks"])
    assert again.returncode == 2 and "--resume" in again.stderr
    assert len(trials(storage)) == 17


@pytest.mark.parametrize("method", ["della", "model_stock"])
def test_search_over_della_and_model_stock(quickstart, tmp_path, method):
    """The newer searchable methods run through the whole loop: resident merges on the Ray workers,
    the exported recipe and the final streaming merge."""
    cfg = search_yaml(quickstart, tmp_path / "search.yml", budget=5, popsize=4, method=method)
    storage = tmp_path / "run"
    proc = run_evolve(cfg, storage, quickstart["tasks"], "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = trials(storage)
    assert len(rows) == 5 and all(r["state"] == "COMPLETE" for r in rows)
    recipe = yaml.safe_load((storage / "best_config.yaml").read_text())
    assert recipe["merge_method"] == method and len(recipe["slices"]) == 2
    for slc in recipe["slices"]:
        if method == "della":
            for src in slc["sources"][:2]:
                p = src["parameters"]
                assert 0 < p["density"] - p["epsilon"] and p["density"] + p["epsilon"] < 1
        else:
            assert slc["parameters"]["filter_wise"] in (True, False)
            assert len(slc["sources"]) == 3
    assert (storage / "final_model" / "model.safetensors").is_file()


def test_search_with_a_lora_genome_model_and_tokenizer_union(quickstart, tmp_path):
    """A `model+adapter` genome model is merged once into DIR/lora_merge_cache before the workers
    start; the exported recipe keeps the user's `model+adapter` reference. `tokenizer_source:
    union` runs the candidates with the merged tokenizer and exports it."""
    from test_lora_inputs import make_adapter

    m = quickstart["models"]
    adapter = make_adapter(m["expert_facts"], tmp_path / "facts_adapter")
    cfg = search_yaml(quickstart, tmp_path / "search.yml", budget=3, popsize=2)
    data = yaml.safe_load(cfg.read_text())
    data["genome"]["models"][1] = f"{m['expert_facts']}+{adapter}"
    data["genome"]["tokenizer_source"] = "union"
    cfg.write_text(yaml.safe_dump(data))
    storage = tmp_path / "run"
    proc = run_evolve(cfg, storage, quickstart["tasks"], "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(trials(storage)) == 3
    entries = [p for p in (storage / "lora_merge_cache").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1 and (entries[0] / "config.json").is_file()
    recipe = yaml.safe_load((storage / "best_config.yaml").read_text())
    assert f"{m['expert_facts']}+{adapter}" in {s["model"] for slc in recipe["slices"] for s in slc["sources"]}
    assert recipe["tokenizer_source"] == "union"
    assert (storage / "final_model" / "model.safetensors").is_file()
    from transformers import AutoTokenizer

    merged_tok = AutoTokenizer.from_pretrained(storage / "final_model")
    base_tok = AutoTokenizer.from_pretrained(m["base"])
    assert merged_tok.get_vocab() == base_tok.get_vocab()  # the experts share the base's vocabulary


def test_optuna_sampler_search_and_dry_run(quickstart, tmp_path):
    cfg = search_yaml(quickstart, tmp_path / "search.yml", optimizer="tpe", budget=6)
    dry = subprocess.run([EVOLVE, str(cfg), "--dry-run"], capture_output=True, text=True, env=ENV, timeout=60)
    assert dry.returncode == 0 and "4 dimensions" in dry.stdout
    storage = tmp_path / "run"
    proc = run_evolve(cfg, storage, quickstart["tasks"], "--no-save-final-model", "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = trials(storage)
    assert len(rows) == 6 and all(r["state"] == "COMPLETE" for r in rows)
    assert not (storage / "final_model").exists()
    assert (storage / "best_config.yaml").is_file()


def _paired_bound(candidate: dict, best: dict, sizes: dict, z: float) -> float:
    """Independent of evaluators.racing: the upper bound of fitness(candidate) - fitness(best) with
    unit weights, from the per-item differences (statistics.variance: n - 1 in the denominator) on
    the candidate's items (the first as many of the best's)."""
    import statistics

    mean = variance = 0.0
    for task, size in sizes.items():
        d = [c - b for c, b in zip(candidate[task], best[task][:len(candidate[task])], strict=True)]
        mean += statistics.fmean(d)
        variance += statistics.variance(d) * (size - len(d)) / (size * len(d))
    return mean + z * math.sqrt(variance)


def check_raced(rows: list[dict], shares: list[float], sizes: dict, z: float = 1.0) -> None:
    """Every raced trial of a unit-weight search against the rule read independently: a stopped
    one's items, values and estimate come from the stages it was scored on, its bound is below
    the best's fitness at its stage and was not at any earlier one; a complete one passed every
    stage and keeps its values on every stage but the last."""
    cumulative = {}
    for task, n in sizes.items():  # items scored after each stage: round(f * N), at least 1, nested
        counts = [min(max(1, round(f * n)), n) for f in shares]
        cumulative[task] = [max(counts[:k + 1]) for k in range(len(counts))] + [n]
    for r in rows:
        if r.get("paired_with") is None or r.get("reused_from") is not None:
            continue
        best = rows[r["paired_with"]]
        assert best["state"] == "COMPLETE" and all(len(best["first_items"][t]) == cumulative[t][-2] for t in sizes)
        stopped_at = r.get("stage") if r["state"] == "PRUNED" else len(shares) + 1
        for k in range(1, min(stopped_at, len(shares)) + 1):
            prefix = {t: r["first_items"][t][:cumulative[t][k - 1]] for t in sizes}
            below = _paired_bound(prefix, best["first_items"], sizes, z) < 0
            assert below == (k == stopped_at), (r["number"], k, stopped_at)
        if r["state"] == "PRUNED":
            assert r["status"] == "stopped" and 1 <= r["stage"] <= len(shares)
            scored = {t: cumulative[t][r["stage"] - 1] for t in sizes}
            assert r["items"] == sum(scored.values())
            assert {t: len(v) for t, v in r["first_items"].items()} == scored
            assert {t: math.fsum(r["first_items"][t]) / scored[t] for t in sizes} == pytest.approx(
                {t: r["metrics"][t] for t in sizes}, abs=1e-12)
            diff = sum(math.fsum(r["first_items"][t]) / scored[t] - math.fsum(best["first_items"][t][:scored[t]]) / scored[t]
                       for t in sizes)
            assert r["estimate"] == pytest.approx(best["value"] + diff, abs=1e-12)
        else:
            assert "stage" not in r and r["items"] == sum(sizes.values())
            assert {t: len(v) for t, v in r["first_items"].items()} == {t: cumulative[t][-2] for t in sizes}


def test_racing_rescoring_and_identical_recipes(quickstart, tmp_path):
    """Racing stops candidates that cannot beat the best on their first items (pruned trials with
    their estimate), an identical recipe is never evaluated twice, and the top candidates are
    re-scored on held-out tasks: the exported recipe is the best there."""
    cfg = search_yaml(quickstart, tmp_path / "search.yml", optimizer="tpe", budget=14)
    data = yaml.safe_load(cfg.read_text())
    data["racing"] = {"fraction": 0.3, "confidence_z": 1.0}
    data["rescore"] = {"tasks": ["qs_arithmetic_heldout", "qs_facts_heldout"], "top_k": 3}
    cfg.write_text(yaml.safe_dump(data))
    storage = tmp_path / "run"
    proc = run_evolve(cfg, storage, quickstart["tasks"], "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = trials(storage)
    assert len(rows) == 14
    full_items = rows[0]["items"]  # the starting point has nothing to beat: scored on every item
    assert full_items == 66 + 20  # two thirds of 100 arithmetic items, 20 of 30 facts
    stopped = [r for r in rows if r["state"] == "PRUNED"]
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    assert stopped, "racing stopped nothing"
    weights = {"qs_arithmetic": 1.0, "qs_facts": 1.0}
    sizes = {"qs_arithmetic": 66, "qs_facts": 20}
    for r in stopped:
        assert r["status"] == "stopped" and r["items"] == round(0.3 * 66) + round(0.3 * 20)
        # paired with the best complete candidate told before it, and stopped because its bound is below it
        best = rows[r["paired_with"]]
        earlier = [c for c in complete if c["tell_order"] < r["tell_order"]]
        assert best["value"] == max(c["value"] for c in earlier)
        assert {t: math.fsum(v) / len(v) for t, v in r["first_items"].items()} == pytest.approx(
            {t: r["metrics"][t] for t in weights}, abs=1e-12)
        assert _paired_bound(r["first_items"], best["first_items"], sizes, 1.0) < 0
        # told as its paired estimate: the best's fitness plus the mean difference on the first items
        diff = sum(math.fsum(r["first_items"][t]) / len(r["first_items"][t])
                   - math.fsum(best["first_items"][t]) / len(best["first_items"][t]) for t in weights)
        assert r["estimate"] == pytest.approx(best["value"] + diff, abs=1e-12) and r["estimate"] < best["value"]
    for r in complete:
        assert r["items"] in (full_items, 0) and r["value"] == pytest.approx(r["metrics"]["qs_arithmetic"] + r["metrics"]["qs_facts"])
        if r.get("paired_with") is not None and not r.get("reused_from"):  # raced and not stopped
            assert _paired_bound(r["first_items"], rows[r["paired_with"]]["first_items"], sizes, 1.0) >= 0
    check_raced(rows, [0.3], sizes)
    reused = [r for r in rows if r.get("reused_from") is not None]
    for r in reused:
        source = rows[r["reused_from"]]
        assert r["recipe_hash"] == source["recipe_hash"] and r["metrics"] == source["metrics"] and r["items"] == 0
    assert len({r["recipe_hash"] for r in rows}) == len(rows) - len(reused)
    table = json.loads((storage / "rescore.json").read_text())
    ranked = sorted((r for r in complete if r.get("reused_from") is None), key=lambda r: (-r["value"], r["number"]))
    assert [r["number"] for r in table["rows"]] == [r["number"] for r in ranked[:3]]
    for r in table["rows"]:
        assert r["status"] == "complete"
        assert r["heldout_fitness"] == pytest.approx(r["metrics"]["qs_arithmetic_heldout"] + r["metrics"]["qs_facts_heldout"])
    chosen = max(table["rows"], key=lambda r: (r["heldout_fitness"], r["search_fitness"], -r["number"]))
    assert table["chosen"] == chosen["number"]
    assert f"trial {chosen['number']}," in (storage / "best_config.yaml").read_text().splitlines()[0]
    card = (storage / "final_model" / "README.md").read_text()
    assert "held-out" in card and f"| {chosen['number']} (exported) |" in card


def test_pareto_search_with_a_constraint(quickstart, tmp_path):
    """NSGA-II over the two tasks as separate objectives: pareto/ holds exactly the
    non-dominated feasible trials, and an infeasible trial is never exported."""
    from evolve.pareto import pareto_front

    cfg = search_yaml(quickstart, tmp_path / "search.yml", optimizer="nsga2", budget=12, popsize=4)
    data = yaml.safe_load(cfg.read_text())
    data["objectives"] = "pareto"
    data["constraints"] = [{"task": "qs_facts", "min": 0.6}]
    cfg.write_text(yaml.safe_dump(data))
    storage = tmp_path / "run"
    proc = run_evolve(cfg, storage, quickstart["tasks"], "--no-save-final-model", "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = trials(storage)
    assert len(rows) == 12
    for r in rows:
        m = r["metrics"]
        assert r["objectives"] == pytest.approx([m["qs_arithmetic"], m["qs_facts"]])
        assert r.get("violation", 0.0) == pytest.approx(max(0.0, 0.6 - m["qs_facts"]))
    feasible = {}
    for r in rows:  # identical recipes: the first trial stands for them
        if r.get("violation", 0.0) == 0 and r["recipe_hash"] not in {f["recipe_hash"] for f in feasible.values()}:
            feasible[r["number"]] = r
    points = [(r["metrics"]["qs_arithmetic"], r["metrics"]["qs_facts"]) for r in feasible.values()]
    expected = [list(feasible)[i] for i in pareto_front(points, ["maximize", "maximize"])]
    front = json.loads((storage / "pareto" / "front.json").read_text())
    assert [m["number"] for m in front["members"]] == expected
    for m in front["members"]:
        recipe = yaml.safe_load((storage / m["recipe"]).read_text())
        assert recipe["merge_method"] == "task_arithmetic"
    exported = int((storage / "best_config.yaml").read_text().split("trial ")[1].split(",")[0])
    assert exported == exported_by_rule(rows)["number"]  # the one export rule, over the weighted sum


def test_raced_evaluation_equals_the_full_one(quickstart):
    """The evaluator's stages add up to exactly what one full evaluation gives, a stopped
    candidate's metrics are its means over the items it was scored on, and `items` counts what
    was scored."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evaluators.lm_eval_tasks import LMEvalEvaluator, TaskSpec
    from evaluators.racing import split_stages

    path = quickstart["models"]["expert_arithmetic"]
    ev = LMEvalEvaluator([TaskSpec("qs_arithmetic"), TaskSpec("qs_facts")], include_paths=[str(quickstart["tasks"])], racing=True)
    ev.attach(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path))
    full = ev.evaluate()
    weights = {"qs_arithmetic": 1.0, "qs_facts": 1.0}
    raced, stopped, values = ev.evaluate_raced(weights, None, [0.25], 1.0)
    assert stopped is None and ev.evaluated_items == 86
    assert raced == pytest.approx(full, abs=1e-12)
    # raced against itself: every paired difference is 0, so it is never stopped
    again, stopped, same = ev.evaluate_raced(weights, values, [0.25], 1.0)
    assert stopped is None and again == raced and same == values
    # against a best one point higher on every first item: stopped after the first stage
    better = {t: [v + 1 for v in vs] for t, vs in values.items()}
    cut, stopped, cut_values = ev.evaluate_raced(weights, better, [0.25], 1.0)
    assert stopped == 1 and cut_values == values and ev.evaluated_items == round(0.25 * 66) + round(0.25 * 20)
    first = {name: split_stages(ev.items(name), [0.25], f"0/race/{name}")[0] for name in ("qs_arithmetic", "qs_facts")}
    assert {t: len(v) for t, v in values.items()} == {t: len(f) for t, f in first.items()}
    ev.samples = first  # an ordinary evaluation of just those items
    plain = ev.evaluate()
    assert cut == pytest.approx(plain, abs=1e-12)
    assert {t: math.fsum(v) / len(v) for t, v in values.items()} == pytest.approx(plain, abs=1e-12)


def test_two_stage_raced_evaluation(quickstart):
    """Stages at 20 % and 50 %: a complete candidate keeps its values on the first two stages
    (stage 1's documents sorted, then stage 2's), equal to plain evaluations of those documents;
    a candidate stopped at stage 2 has its metrics and values from stages 1 + 2, and is counted
    for exactly those items; one stopped at stage 1 for stage 1's."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evaluators.lm_eval_tasks import LMEvalEvaluator, TaskSpec
    from evaluators.racing import split_stages

    path = quickstart["models"]["expert_facts"]
    ev = LMEvalEvaluator([TaskSpec("qs_arithmetic"), TaskSpec("qs_facts")], include_paths=[str(quickstart["tasks"])], racing=True)
    ev.attach(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path))
    names = ("qs_arithmetic", "qs_facts")
    stages = {n: split_stages(ev.items(n), [0.2, 0.5], f"0/race/{n}") for n in names}
    # 66 and 20 items: cumulative round(13.2) = 13, round(33) = 33; round(4) = 4, round(10) = 10
    assert {n: [len(s) for s in st] for n, st in stages.items()} == {"qs_arithmetic": [13, 20, 33], "qs_facts": [4, 6, 10]}
    full = ev.evaluate()
    weights = {n: 1.0 for n in names}
    raced, stopped, values = ev.evaluate_raced(weights, None, [0.2, 0.5], 1.0)
    assert stopped is None and ev.evaluated_items == 86 and raced == pytest.approx(full, abs=1e-12)
    plain = {}
    for k in (1, 2):  # plain evaluations of stage 1's and stage 2's documents: their per-item values
        ev.samples = {n: stages[n][k - 1] for n in names}
        plain[k] = ev._item_values(ev.samples)
    ev.samples = None
    for n in names:
        assert values[n] == [plain[1][n][d] for d in stages[n][0]] + [plain[2][n][d] for d in stages[n][1]]
    # a best equal on stage 1 and one point higher on stage 2's items: passes stage 1, stopped at 2
    best = {n: v[:13 if n == "qs_arithmetic" else 4] + [x + 1 for x in v[13 if n == "qs_arithmetic" else 4:]]
            for n, v in values.items()}
    cut, stopped, cut_values = ev.evaluate_raced(weights, best, [0.2, 0.5], 1.0)
    assert stopped == 2 and ev.evaluated_items == 33 + 10 and cut_values == values
    for n in names:
        both = stages[n][0] + stages[n][1]
        assert cut[n] == pytest.approx(math.fsum({**plain[1][n], **plain[2][n]}[d] for d in both) / len(both), abs=1e-12)
    # one point higher on every item: stopped after stage 1, with stage 1's values only
    higher = {n: [x + 1 for x in v] for n, v in values.items()}
    cut, stopped, cut_values = ev.evaluate_raced(weights, higher, [0.2, 0.5], 1.0)
    assert stopped == 1 and ev.evaluated_items == 13 + 4 and cut_values == {n: values[n][:len(stages[n][0])] for n in names}
    # a best stored with one stage (a study resumed under two stages) is paired on stage 1 only,
    # and stage 2 is not checked: the candidate is scored on every item
    stage1_only = {n: v[:len(stages[n][0])] for n, v in values.items()}
    again, stopped, _ = ev.evaluate_raced(weights, stage1_only, [0.2, 0.5], 1.0)
    assert stopped is None and ev.evaluated_items == 86 and again == raced
    assert ev.evaluate_raced(weights, {n: [x + 1 for x in v] for n, v in stage1_only.items()}, [0.2, 0.5], 1.0)[1] == 1
