"""Gradient steps on a search's genes, inside the worker that holds the resident model.

A gradient search (evolve.gradient) sends each candidate with a `DescentRequest`: after scoring the
candidate as usual, the worker takes `steps` projected Adam steps from it on the genes listed, and
returns where they ended and Adam's moments (`DescentResult`). The next candidate the optimiser
proposes is that end point; the moments travel back with its request. So all optimiser state is
in the journal (evolve.loop) and a resume replays it exactly, as for any optimiser.

One step: merge the model at the current genes, compute the loss of a seeded mini-batch of the
search items (evaluators.gradient_loss) with gradients on the merged parameters, turn each
parameter's gradient into gradients of its per-model weights (merge_engine.methods.differentiable),
and those into gene gradients by the chain rule through the genome's decoding.

The decoding's Jacobian comes from the recipe alone, without this package knowing the genome
(evaluators sits beside search_spaces, not above it): with each request come the recipe at the
candidate and, per gene, the recipe with that gene moved by a known step (`probes`). Planned, they
give each merged tensor's per-model weights as a function of the genes, which is affine for the
genes this optimiser trains (search_spaces: Genome.gradient_genes): a weight gene is a weight, or
a point of a gradient list that the engine interpolates linearly. For the TIES family the masks
are held fixed at each step's weights (merge_engine.methods.differentiable). Between the candidate and the
end of the steps the worker merges at `weights(x) = weights(x0) + J (x - x0)`, exactly what the
driver's decoding of x gives.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field, replace
from typing import Optional

BETAS = (0.9, 0.999)  # Adam's defaults (Kingma & Ba), as AdaMerging uses them
EPS = 1e-8


@dataclass(frozen=True)
class AdamState:
    """Adam's moments per trained gene, and how many steps made them (for the bias correction)."""

    m: tuple[float, ...]
    v: tuple[float, ...]
    steps: int = 0

    @classmethod
    def fresh(cls, n: int) -> "AdamState":
        return cls((0.0,) * n, (0.0,) * n, 0)


@dataclass(frozen=True)
class DescentRequest:
    genes: tuple[int, ...]  # the trained genes' positions in the genotype
    start: tuple[float, ...]  # their values at the candidate
    lower: tuple[float, ...]
    upper: tuple[float, ...]
    learning_rates: tuple[float, ...]  # per gene, in the gene's own units
    adam: AdamState
    steps: int  # gradient steps after the candidate is scored
    batch_size: int  # search items per step
    seed: int  # with Adam's step count, seeds each step's mini-batch
    objective: str  # evaluators.gradient_loss.OBJECTIVES
    # per gene: the candidate's recipe (plain data) with that gene moved by `probe_steps[i]`
    probes: tuple[dict, ...] = ()
    probe_steps: tuple[float, ...] = ()
    score: bool = True  # False: the candidate's scores are known already (the driver reuses them)


@dataclass(frozen=True)
class DescentResult:
    end: tuple[float, ...]  # the trained genes after the steps
    adam: AdamState
    losses: tuple[float, ...] = ()  # each step's mini-batch loss, before its update
    seconds: float = 0.0

    def to_plain(self) -> dict:
        return {"end": list(self.end), "m": list(self.adam.m), "v": list(self.adam.v), "steps": self.adam.steps,
                "losses": list(self.losses), "seconds": self.seconds}

    @classmethod
    def from_plain(cls, data: dict) -> "DescentResult":
        return cls(tuple(data["end"]), AdamState(tuple(data["m"]), tuple(data["v"]), int(data["steps"])),
                   tuple(data.get("losses", ())), float(data.get("seconds", 0.0)))


def adam_step(x: list[float], grad: list[float], state: AdamState, lr: tuple[float, ...],
              lower: tuple[float, ...], upper: tuple[float, ...]) -> tuple[list[float], AdamState]:
    """One Adam step downhill, projected onto the box [lower, upper] (plain floats: the same
    numbers on every machine, so a replayed journal and a live run agree)."""
    b1, b2 = BETAS
    t = state.steps + 1
    m = tuple(b1 * mi + (1 - b1) * g for mi, g in zip(state.m, grad))
    v = tuple(b2 * vi + (1 - b2) * g * g for vi, g in zip(state.v, grad))
    out = []
    for xi, mi, vi, a, lo, hi in zip(x, m, v, lr, lower, upper):
        step = a * (mi / (1 - b1**t)) / (math.sqrt(vi / (1 - b2**t)) + EPS)
        out.append(min(max(xi - step, lo), hi))
    return out, AdamState(m, v, t)


@dataclass
class _Jacobian:
    """d(weight of input i of task t) / d(gene k), nonzero entries only: task index -> [(i, k, slope)]."""

    entries: dict[int, list[tuple[int, int, float]]] = field(default_factory=dict)


def _layout_key(plan) -> tuple:
    """What a plan's weight Jacobian depends on: its tensors, their methods and inputs, and every
    parameter but the weights themselves (a weight of exactly 0 counts: a switched-off model)."""
    return tuple(
        (t.out.name, t.method.name, tuple(str(i.model) for i in t.inputs), tuple(sorted(t.params.items())),
         tuple((tuple(sorted((k, v) for k, v in mp.items() if k != "weight")), mp.get("weight") == 0.0)
               for mp in t.model_params))
        for t in plan.tasks)


class Descent:
    """The worker's gradient steps (see the module docstring). `merger`: the worker's
    ResidentMerger (its model attached); `evaluator`: the worker's lm-eval evaluator."""

    def __init__(self, merger, evaluator):
        from .gradient_loss import ItemLoss, check_differentiable

        check_differentiable(evaluator)
        self.merger = merger
        self.loss = ItemLoss(evaluator)
        # the decoding is affine in the trained genes, so its Jacobian depends only on the recipe's
        # layout and on what is not trained (densities, switched-off models): planned once per
        # layout, not once per candidate (120 plans cost most of an evaluation on a 30-layer model)
        self._jacobians: dict[tuple, _Jacobian] = {}

    def _jacobian(self, plan, request: DescentRequest) -> _Jacobian:
        """The Jacobian at `plan` (cached by everything it depends on, `_layout_key`)."""
        key = (request.genes, _layout_key(plan))
        if key not in self._jacobians:
            self._jacobians[key] = self._plan_jacobian(plan, request)
        return self._jacobians[key]

    def _plan_jacobian(self, plan, request: DescentRequest) -> _Jacobian:
        from merge_engine.config import parse_config
        from merge_engine.methods.differentiable import has_weight_gradients

        jac = _Jacobian()
        for k, (probe, h) in enumerate(zip(request.probes, request.probe_steps)):
            moved = self.merger.plan(parse_config(probe, "gradient probe"))
            if [t.out.name for t in moved.tasks] != [t.out.name for t in plan.tasks]:
                raise ValueError("gradient probe: moving one gene changed the recipe's tensors (not a weight gene)")
            for n, (a, b) in enumerate(zip(plan.tasks, moved.tasks)):
                if not has_weight_gradients(a.method):
                    continue
                for i, (pa, pb) in enumerate(zip(a.model_params, b.model_params)):
                    if pa.get("weight") is None or pb.get("weight") is None:
                        continue  # an input without a weight (task arithmetic's base)
                    slope = (pb["weight"] - pa["weight"]) / h
                    if slope != 0.0:
                        jac.entries.setdefault(n, []).append((i, k, slope))
        return jac

    @staticmethod
    def _plan_at(plan, jac: _Jacobian, delta: list[float]):
        """The plan with every task's weights moved by J @ delta."""
        tasks = list(plan.tasks)
        for n, entries in jac.entries.items():
            params = [dict(p) for p in tasks[n].model_params]
            for i, k, slope in entries:
                params[i]["weight"] = params[i]["weight"] + slope * delta[k]
            tasks[n] = replace(tasks[n], model_params=params)
        return replace(plan, tasks=tasks)

    def run(self, recipe, request: DescentRequest) -> DescentResult:
        """Take the request's steps from `recipe` (the candidate, a MergeConfig)."""
        start = time.perf_counter()
        plan0 = self.merger.plan(recipe)
        jac = self._jacobian(plan0, request)
        x = list(request.start)
        adam = request.adam
        losses = []
        items = self.loss.items
        for _ in range(request.steps):
            plan = self._plan_at(plan0, jac, [a - b for a, b in zip(x, request.start)])
            self.merger.apply_plan(plan, check_finite=True)
            rng = random.Random(f"{request.seed}/{adam.steps}")
            batch = sorted(rng.sample(range(len(items)), min(request.batch_size, len(items))))
            loss, grads = self._loss_and_gradients(plan, jac, len(x), [items[b] for b in batch], request.objective)
            if not all(math.isfinite(g) for g in grads) or not math.isfinite(loss):
                raise FloatingPointError(f"gradient step {adam.steps + 1}: the loss or its gradient is not finite")
            losses.append(loss)
            x, adam = adam_step(x, grads, adam, request.learning_rates, request.lower, request.upper)
        return DescentResult(tuple(x), adam, tuple(losses), time.perf_counter() - start)

    def _loss_and_gradients(self, plan, jac: _Jacobian, n_genes: int, batch, objective: str) -> tuple[float, list[float]]:
        """The mini-batch loss and its gradient in every trained gene. Each parameter's gradient
        is turned into gene gradients as soon as the backward pass has finished it, then freed:
        no model-sized gradient buffer ever exists (a hook after gradient accumulation, which
        runs once per parameter, after a tied parameter's uses are summed)."""
        import torch

        model = self.merger.model
        tasks_of: dict[int, list[int]] = {}  # parameter -> the output tensors written to it
        trained: dict[int, torch.Tensor] = {}
        for n in jac.entries:
            param = self.merger.parameter(plan.tasks[n], plan)
            if param is not None:  # None: a tied LM head, the embedding's parameter stands for it
                tasks_of.setdefault(id(param), []).append(n)
                trained[id(param)] = param
        genes = [0.0] * n_genes

        def consume(param: torch.Tensor) -> None:
            for n in tasks_of[id(param)]:
                per_input = self.merger.weight_gradients(plan.tasks[n], param.grad)
                for i, k, slope in jac.entries[n]:
                    genes[k] += slope * per_input[i]
            param.grad = None

        flags = {name: p.requires_grad for name, p in model.named_parameters()}
        hooks = []
        try:
            for p in model.parameters():
                p.requires_grad_(id(p) in trained)
                p.grad = None
            hooks = [p.register_post_accumulate_grad_hook(consume) for p in trained.values()]
            with torch.enable_grad():
                loss = self.loss.loss(batch, objective)
                loss.backward()
            return float(loss.detach()), genes
        finally:
            for hook in hooks:
                hook.remove()
            for name, p in model.named_parameters():
                p.grad = None
                p.requires_grad_(flags[name])
