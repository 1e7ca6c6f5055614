"""What a search shows and hands back: the status line, the run log, the fitness plot, the model
card's summary and the export of the best recipe (YAML and full model).

Reads the experiment store; never drives the search.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from evaluators import Status

from .store import FINAL_MODEL

log = logging.getLogger(__name__)

RUN_LOG = "runs.jsonl"  # one line per run of the driver (a search resumed 3 times has 4)


@dataclass
class RunRecord:
    """One run of the driver over an experiment, appended to DIR/runs.jsonl when it ends."""

    started: str
    ended: str = ""
    stop_reason: str = ""
    evaluated: int = 0  # candidates finished in this run
    retried: int = 0  # attempts started again after a worker died
    replaced: int = 0  # workers started to replace dead or timed-out ones
    timed_out: int = 0
    workers: int = 0


def append_run(root: Path, record: RunRecord) -> None:
    with open(Path(root) / RUN_LOG, "a", encoding="utf-8") as f:
        f.write(json.dumps(asdict(record)) + "\n")


def read_runs(root: Path) -> list[RunRecord]:
    path = Path(root) / RUN_LOG
    if not path.exists():
        return []
    runs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            runs.append(RunRecord(**json.loads(line)))
        except (ValueError, TypeError):  # a line cut by a kill: skip it
            continue
    return runs


class StatusLine:
    """One line per finished candidate; on a terminal the line is rewritten in place and only new
    bests and failures stay on screen."""

    def __init__(self, budget: int, quiet: bool = False):
        self.budget = budget
        self.quiet = quiet
        self.started = time.time()
        self.done_this_run = 0
        self.line_open = False

    def update(self, number: int, finished: int, fitness: Optional[float], note: Optional[str], exported: Optional[float],
               timings: dict, faults: str) -> None:
        """`note`: why a candidate failed, or what else to know about it (stopped early, ...)."""
        self.done_this_run += 1
        if self.quiet:
            return
        elapsed = max(time.time() - self.started, 1e-9)
        rate = 60 * self.done_this_run / elapsed
        left = self.budget - finished
        eta = f"{left / rate:.1f} min left" if rate > 0 and left > 0 else "done"
        if fitness is not None and math.isfinite(fitness):
            status = f"fitness {fitness:.4f}" + (f" ({note})" if note else "")
        else:
            status = f"FAILED ({note})"
        best_text = f"{exported:.4f}" if exported is not None else "none yet"
        line = (
            f"[{finished}/{self.budget}] trial {number}: {status} | export {best_text} | {rate:.1f} candidates/min, {eta} | "
            f"merge {timings.get('merge_s', 0.0):.2f}s eval {timings.get('eval_s', 0.0):.2f}s"
            + (f" | {faults}" if faults else "")
        )
        if not sys.stdout.isatty():
            print(line, flush=True)
            return
        keep = fitness is None or fitness == exported
        print("\r\033[K" + line, end="\n" if keep else "", flush=True)
        self.line_open = not keep

    def close(self) -> None:
        if self.line_open:
            print(flush=True)
            self.line_open = False


def overhead_text(seconds: dict, count: int) -> str:
    """How much of a candidate's time, as the driver saw it, is not evaluation: merge, Ray and
    scheduling. `seconds` sums the candidates' timings (eval_s, merge_s, total_s)."""
    total = seconds.get("total_s", 0.0)
    if not count or total <= 0:
        return ""
    evaluation, merge = seconds.get("eval_s", 0.0), seconds.get("merge_s", 0.0)
    other = max(total - evaluation - merge, 0.0)
    return (
        f"time per candidate outside evaluation: {100 * (total - evaluation) / total:.1f}% (per candidate: "
        f"evaluation {evaluation / count:.3f}s, merge {merge / count:.3f}s, Ray and scheduling {other / count:.3f}s)"
    )


def faults_text(retried: int, replaced: int, timed_out: int = 0) -> str:
    parts = []
    if retried:
        parts.append(f"{retried} attempt(s) retried")
    if replaced:
        parts.append(f"{replaced} worker(s) replaced")
    if timed_out:
        parts.append(f"{timed_out} timed out")
    return ", ".join(parts)


# The last figure this process drew: the (number, value) pairs it shows, and its PNG bytes.
_LAST_PLOT: tuple = ((), b"")


def plot_fitness(store) -> Optional[Path]:
    """fitness.png: every evaluation's fitness and the best so far. The figure depends on the
    finished trials' numbers and values alone: the same ones as the last figure this process drew
    reuse its bytes (the export and the HTML report at the end of a search both want it, and
    matplotlib takes about 0.6 s per figure)."""
    global _LAST_PLOT
    trials = sorted(store.finished(), key=lambda t: t.number)
    if not trials:
        return None
    path = store.root / "fitness.png"
    drawn = tuple((t.number, t.value) for t in trials)
    if _LAST_PLOT[0] == drawn:
        path.write_bytes(_LAST_PLOT[1])
        return path
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [t.number for t in trials if t.value is not None]
    ys = [t.value for t in trials if t.value is not None]
    best, running = [], -math.inf
    for y in ys:
        running = max(running, y)
        best.append(running)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.scatter(xs, ys, s=12, alpha=0.6, label="candidate")
    ax.step(xs, best, where="post", color="C3", label="best so far")
    failed = [t.number for t in trials if t.value is None]
    if failed:
        ax.scatter(failed, [min(ys) if ys else 0] * len(failed), marker="x", color="k", label="failed")
    ax.set_xlabel("evaluation")
    ax.set_ylabel("fitness")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    _LAST_PLOT = (drawn, path.read_bytes())
    return path


def search_summary(store, optimizer_name: str, genome_size: int, selection=None) -> str:
    """The model card's section on how the recipe was found (`selection`: the exported candidate,
    an evolve.selection.Selection, None when nothing completed)."""
    from .rescore import read_rescore

    trials = store.finished()
    best = store.trial(selection.number) if selection is not None else None
    runs = read_runs(store.root)
    retried = sum(max(t.user_attrs.get("attempts", 1) - 1, 0) for t in trials)
    replaced = sum(r.replaced for r in runs)
    timed_out = sum(1 for t in trials if "timed out" in str(t.user_attrs.get("error", "")))
    memory = sum(t.user_attrs.get("faults", []).count("memory") for t in trials)
    lines = ["## Evolutionary search", ""]
    lines.append(
        f"Found by `mergekit-evolve` (evomerge) with {optimizer_name} over a genome of {genome_size} dimensions: "
        f"{len(trials)} evaluations ({sum(1 for t in trials if t.value is None)} failed) in {max(len(runs), 1)} run(s); "
        f"{retried} attempt(s) retried after a worker died ({memory} of them out of memory), {replaced} worker(s) "
        f"replaced, {timed_out} timed out."
    )
    stopped = sum(1 for t in trials if t.user_attrs.get("status") == Status.STOPPED)
    reused = sum(1 for t in trials if t.user_attrs.get("reused_from") is not None)
    if stopped or reused:
        lines.append(f"{stopped} candidate(s) stopped early by racing; {reused} identical recipe(s) not evaluated again.")
    anchors = [(t.number, t.user_attrs["anchor"], t.value) for t in sorted(trials, key=lambda t: t.number)
               if t.user_attrs.get("anchor")]
    if anchors:
        lines.append(f"{len(anchors)} hand-made recipe(s) scored first (anchors): " + "; ".join(
            f"trial {n} {label} ({'failed' if v is None else f'{v:.6g}'})" for n, label, v in anchors) + ".")
    if best is not None:
        lines.append(f"Exported: trial {best.number}, search fitness {best.value:.6g}: {selection.reason}. Task metrics:")
        lines.append("")
        for name, value in best.user_attrs.get("metrics", {}).items():
            lines.append(f"* {name}: {value:.6g}")
    rescored = read_rescore(store.root)
    if rescored and rescored.get("rows"):
        lines += ["", f"Re-scored on held-out tasks ({', '.join(rescored['tasks'])}); the exported model is the best there:", "",
                  "| trial | search fitness | held-out fitness |", "|---|---|---|"]
        for r in rescored["rows"]:
            held = r["heldout_fitness"]
            mark = " (exported)" if r["number"] == rescored.get("chosen") else ""
            lines.append(f"| {r['number']}{mark} | {r['search_fitness']:.6g} | "
                         + (f"{held:.6g}" if held is not None else r["status"]) + " |")
    return "\n".join(lines)


def export_pareto(store, genome, scoring) -> Optional[Path]:
    """DIR/pareto/: the Pareto front of the complete, feasible candidates over the objective
    tasks, one recipe per distinct member (`<number>.yaml`, the user's model references) and
    front.json with their scores. Rewritten whole at each export."""
    import shutil

    rows, seen = [], set()
    for row in sorted(store.rows(), key=lambda r: r.number):
        if row.recipe_hash not in seen:  # identical recipes: the first candidate stands for them
            seen.add(row.recipe_hash)
            rows.append(row)
    front = scoring.front(rows)
    out = store.root / "pareto"
    tmp = store.root / ".pareto.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    members = []
    for row in front:
        recipe = genome.decode(store.genotype_of(store.trial(row.number)))
        (tmp / f"{row.number}.yaml").write_text(
            f"# Pareto front member: trial {row.number}, metrics {json.dumps(row.metrics)}\n" + recipe.to_yaml()
        )
        members.append({"number": row.number, "metrics": row.metrics, "fitness": row.fitness,
                        "recipe": f"pareto/{row.number}.yaml"})
    names = scoring.objective_names or [t.name for t in scoring.tasks]
    (tmp / "front.json").write_text(json.dumps(
        {"directions": {n: scoring.directions[n] for n in names}, "members": members}, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def export_best(store, genome, merge_options, save_final_model: bool, summary: str, quiet: bool = False,
                number: Optional[int] = None) -> Optional[Path]:
    """best_config.yaml (the user's model references) and, unless disabled, DIR/final_model merged
    by the streaming engine (written atomically: a kill during export leaves no half model), for
    candidate `number` (evolve.selection decides which; None: nothing completed)."""
    plot = plot_fitness(store)
    if plot and not quiet:
        print(f"fitness plot: {plot}")
    best = store.trial(number) if number is not None else None
    if best is None:
        print("no candidate completed: nothing to export", file=sys.stderr)
        return None
    recipe = genome.decode(store.genotype_of(best))
    store.write_best_config(recipe, best.value, best.user_attrs.get("metrics", {}), best.number)
    store.flush()
    if not save_final_model:
        return None
    import shutil

    from merge_engine.streaming import run_merge

    out = store.root / FINAL_MODEL
    for stale in store.root.glob(f".{out.name}.incomplete-*"):  # left by an export that was killed
        shutil.rmtree(stale, ignore_errors=True)
    run_merge(recipe, out, merge_options, config_text=recipe.to_yaml(), card_extra=summary)
    return out
