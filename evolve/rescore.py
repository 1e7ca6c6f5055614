"""Held-out re-scoring: the search set picks candidates, held-out tasks pick the exported one.

When a search with `rescore:` ends, its top_k candidates (complete and feasible, by search
fitness, one per distinct recipe) are scored on the held-out tasks, which the optimiser never saw.
The exported recipe and model are the best of them on those tasks. Progress is kept in
DIR/rescore.json after every result (atomically), so a stopped re-scoring continues where it
stopped:

    {"tasks": [held-out task names], "top_k": k,
     "rows": [{"number", "recipe_hash", "search_fitness", "heldout_fitness", "metrics", "status"}],
     "chosen": number of the exported candidate, or null while rows are pending}

status: evaluators.Status: "pending" (not scored yet), "complete" or "failed".
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Sequence

from merge_engine.errors import ConfigError

from evaluators import Status

from .objectives import Scoring
from .selection import CandidateRow, ranked

RESCORE_FILE = "rescore.json"


def top_candidates(rows: Sequence[CandidateRow], top_k: int) -> list[CandidateRow]:
    """The k best feasible rows by search fitness (earlier first on ties), one per recipe."""
    out, seen = [], set()
    for r in ranked(rows):
        if r.recipe_hash in seen:
            continue
        seen.add(r.recipe_hash)
        out.append(r)
        if len(out) == top_k:
            break
    return out


def read_rescore(root: Path) -> Optional[dict]:
    path = Path(root) / RESCORE_FILE
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: unreadable re-scoring table ({err}); delete it to score the held-out tasks again") from None
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise ConfigError(f"{path}: not an evomerge re-scoring table; delete it to score the held-out tasks again")
    return data


class Rescoring:
    """The re-scoring table of one experiment: which candidates, their held-out scores, the pick."""

    def __init__(self, root: Path, tasks: Sequence, top_k: int):
        self.path = Path(root) / RESCORE_FILE
        self.tasks = list(tasks)
        self.top_k = top_k
        self.state = {"tasks": [t.name for t in self.tasks], "top_k": top_k, "rows": [], "chosen": None}
        previous = read_rescore(root)
        if previous and previous.get("tasks") == self.state["tasks"] and previous.get("top_k") == top_k:
            self.state = previous  # a resumed re-scoring: keep what was scored

    def select(self, rows: Sequence[CandidateRow]) -> None:
        """Fix the candidates (once: a resumed search that added candidates re-selects, keeping
        the scores of those already scored)."""
        scored = {r["number"]: r for r in self.state["rows"] if r["status"] == Status.COMPLETE}
        self.state["rows"] = [
            scored.get(r.number) or {"number": r.number, "recipe_hash": r.recipe_hash,
                                     "search_fitness": r.fitness, "heldout_fitness": None, "metrics": {},
                                     "status": Status.PENDING}
            for r in top_candidates(rows, self.top_k)
        ]
        self._choose()  # all scored already (a resume after the re-scoring ended): the same pick
        self._save()

    def pending(self) -> list[int]:
        return [r["number"] for r in self.state["rows"] if r["status"] != Status.COMPLETE]

    def record(self, number: int, status: str, metrics: dict, scoring: Scoring) -> None:
        row = next(r for r in self.state["rows"] if r["number"] == number)
        row["status"], row["metrics"] = status, metrics
        if status == Status.COMPLETE:
            try:
                row["heldout_fitness"] = scoring.fitness(metrics)
            except KeyError as err:
                row["status"], row["metrics"] = Status.FAILED, {"error": f"no metric {err}"}
        self._choose()
        self._save()

    def _choose(self) -> None:
        if any(r["status"] == Status.PENDING for r in self.state["rows"]):
            self.state["chosen"] = None
            return
        done = [r for r in self.state["rows"] if r["status"] == Status.COMPLETE and math.isfinite(r["heldout_fitness"])]
        # the best held-out score; equal held-out scores: the better search fitness, then the earlier
        best = max(done, key=lambda r: (r["heldout_fitness"], r["search_fitness"], -r["number"]), default=None)
        self.state["chosen"] = best["number"] if best else None

    @property
    def chosen(self) -> Optional[int]:
        return self.state["chosen"]

    def _save(self) -> None:
        from .store import _atomic_write

        _atomic_write(self.path, json.dumps(self.state, indent=2).encode())


def score_held_out(table: Rescoring, pool, numbers: Sequence[int], decode, scoring: Scoring, quiet: bool) -> None:
    """Score candidates `numbers` on a pool of workers built with the held-out evaluator, recording
    each result in `table` as it comes in. `decode`: candidate number -> its recipe (MergeConfig)."""
    for number in numbers:
        pool.submit(number, decode(number).to_plain())
    remaining = len(numbers)
    while remaining:
        for number, result, _attempts in pool.wait():
            remaining -= 1
            table.record(number, result["status"], result.get("metrics", {}), scoring)
            if not quiet:
                row = next(r for r in table.state["rows"] if r["number"] == number)
                held = row["heldout_fitness"]
                print(f"  trial {number}: search {row['search_fitness']:.4f}, held-out "
                      + (f"{held:.4f}" if held is not None else row["status"]), flush=True)
