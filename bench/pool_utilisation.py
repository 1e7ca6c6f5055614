"""Worker utilisation of the search loop: no generation barrier vs pycma's classic barrier.

4 CPU workers on a real local Ray cluster (evolve.cluster, evolve.pool), the real loop
(evolve.loop) and optimisers (evolve.optimizers), the real experiment store; the evaluator is a
fake whose evaluation time is heavy-tailed (lognormal, median 1 s, sigma 1 by default), drawn per
candidate number so every mode sees the same times. Utilisation = evaluation seconds / (workers x
wall seconds of the loop). The barrier baseline is measured in the same run.

    python bench/pool_utilisation.py [--candidates 81] [--workers 4] [--sigma 1.0] [--median 1.0]
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evolve.cluster import RayCluster  # noqa: E402
from evolve.loop import Outcome, run_loop  # noqa: E402
from evolve.optimizers import make_optimizer  # noqa: E402
from search_spaces.genome import SearchSpace  # noqa: E402
from evolve.pool import WorkerPool, WorkerSpec  # noqa: E402
from evolve.store import ExperimentStore  # noqa: E402

SPACE = SearchSpace(tuple(f"x{i}" for i in range(4)), (0.0,) * 4, (1.0,) * 4)


class SleepingEvaluator:
    """Stands in for merge + lm-eval: sleeps the payload's time, returns a smooth fitness."""

    def ready(self) -> dict:
        return {"directions": {"fitness": "maximize"}}

    def evaluate(self, payload: dict) -> dict:
        time.sleep(payload["seconds"])
        x = payload["x"]
        return {"status": "complete", "metrics": {"fitness": -sum((v - 0.3) ** 2 for v in x)}}


class BenchRunner:
    def __init__(self, pool, seconds):
        self.pool, self.seconds, self.capacity = pool, seconds, pool.capacity
        self.busy = 0.0

    def submit(self, candidate) -> None:
        s = self.seconds(candidate.number)
        self.busy += s
        self.pool.submit(candidate, {"seconds": s, "x": list(candidate.genotype)})

    def wait(self):
        return [(c, Outcome("complete", r["metrics"]["fitness"], r["metrics"])) for c, r, _ in self.pool.wait()]


def measure(label: str, optimizer_name: str, barrier: bool, args, seconds) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        store = ExperimentStore(Path(tmp), SPACE)
        store.open(f"bench {label}", {}, resume=False)
        pool = WorkerPool(WorkerSpec(SleepingEvaluator, num_cpus=1), args.workers)
        pool.start()
        optimizer = make_optimizer(optimizer_name, SPACE, [0.5] * 4, seed=0, popsize=args.popsize,
                                   generation_barrier=barrier)
        runner = BenchRunner(pool, seconds)
        t0 = time.perf_counter()
        run_loop(optimizer, runner, store, args.candidates)
        wall = time.perf_counter() - t0
        store.close()
        best = max(t.value for t in store.finished())
        pool.shutdown()
    return {"label": label, "wall": wall, "busy": runner.busy, "util": runner.busy / (args.workers * wall), "best": best}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--candidates", type=int, default=81)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--popsize", type=int, default=8)
    ap.add_argument("--median", type=float, default=1.0)
    ap.add_argument("--sigma", type=float, default=1.0)
    args = ap.parse_args()

    def seconds(number: int) -> float:
        return args.median * math.exp(random.Random(f"bench/{number}").gauss(0.0, args.sigma))

    print(f"{args.workers} workers, {args.candidates} candidates, evaluation time lognormal(median {args.median} s, "
          f"sigma {args.sigma}), CMA-ES popsize {args.popsize}")
    with RayCluster(num_cpus=args.workers, quiet=True):
        rows = [
            measure("cma, generation barrier (baseline)", "cma", True, args, seconds),
            measure("cma, no barrier (default)", "cma", False, args, seconds),
            measure("tpe (one candidate per free worker)", "tpe", False, args, seconds),
        ]
    print(f"\n| mode | wall s | busy s | utilisation | x baseline wall | best fitness |\n|---|---|---|---|---|---|")
    base = rows[0]["wall"]
    for r in rows:
        print(f"| {r['label']} | {r['wall']:.1f} | {r['busy']:.1f} | {100 * r['util']:.1f} % | {r['wall'] / base:.2f} | {r['best']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
