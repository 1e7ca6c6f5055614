"""Scoring a resident model on lm-eval tasks.

Tasks are loaded once per evaluator (one per worker); every candidate is scored on the same items:
`limit` takes the first N of each task's evaluation documents (with `shuffle`, a seeded subset). The model is wrapped by
`HFLM(pretrained=<model object>)`, so weights changed in place are what gets scored, without any
reload.
"""

from __future__ import annotations

import functools
import logging
import math
import random
from dataclasses import dataclass
from typing import Optional, Sequence

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    metric: str = "acc,none"
    weight: float = 1.0
    direction: Optional[str] = None  # "maximize" / "minimize"; None: from the metric's definition
    also: tuple = ()  # other metrics of the task to report, as "<task>:<metric>" (constraints read them)

    @property
    def metrics(self) -> list[tuple[str, str]]:
        """(key in the results, lm-eval metric) of everything this task reports."""
        return [(self.name, self.metric)] + [(f"{self.name}:{m}", m) for m in self.also]


class TaskError(Exception):
    """A task cannot be loaded or does not report the requested metric."""


def load_tasks(names: Sequence[str], include_paths: Sequence[str] = ()):
    """lm-eval's task objects (dict with 'tasks' and 'groups'), from local task folders only when
    any are given (indexing lm-eval's thousands of built-in tasks takes ~14 s)."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=list(include_paths) or None, include_defaults=not include_paths)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        where = f" in {', '.join(include_paths)}" if include_paths else ""
        raise TaskError(f"unknown lm-eval task(s) {', '.join(unknown)}{where}")
    return manager.load(list(names))


def reported_metrics(task_obj) -> list[str]:
    """The `metric,filter` keys a loaded task reports (what TaskDefinition.metric names)."""
    filters = [getattr(f, "name", "none") for f in getattr(task_obj, "_filters", None) or ()] or ["none"]
    return [f"{metric},{kept}" for metric in task_obj.aggregation() for kept in filters]


def higher_is_better(task_obj, metric: str) -> bool:
    name = metric.split(",")[0]
    try:
        return bool(task_obj.higher_is_better().get(name, True))
    except Exception:  # a task without the information: maximise
        return True


class LMEvalEvaluator:
    def __init__(
        self,
        tasks: Sequence[TaskSpec],
        include_paths: Sequence[str] = (),
        limit: Optional[int] = None,
        num_fewshot: Optional[int] = None,
        shuffle: bool = False,
        seed: int = 0,
        apply_chat_template: bool = False,
        fewshot_as_multiturn: bool = False,
        batch_size: int = 16,
        add_bos_token: Optional[bool] = None,
        progress_bars: bool = False,
        racing: bool = False,
    ):
        self.tasks = list(tasks)
        self.evaluated_items = 0  # items scored by the latest evaluation, all tasks together
        self.progress_bars = progress_bars
        self.limit = limit
        self.shuffle = shuffle
        self.seed = seed
        self.apply_chat_template = apply_chat_template
        self.fewshot_as_multiturn = fewshot_as_multiturn
        self.batch_size = batch_size
        self.add_bos_token = add_bos_token
        self.loaded = load_tasks([t.name for t in self.tasks], include_paths)
        for task_obj in self.loaded["tasks"].values():
            if num_fewshot is not None and task_obj.get_config("num_fewshot") != 0:
                task_obj.set_config(key="num_fewshot", value=num_fewshot)
            elif task_obj.get_config("num_fewshot") is None:
                task_obj.set_config(key="num_fewshot", value=0)
        self.reseed_fewshot()
        self.samples = self._subsets()
        not_mean = self._not_a_mean()
        if racing and not_mean:
            name, metric, function = not_mean
            raise TaskError(f"racing: task {name}'s metric {metric} is not a mean over items ({function}); "
                            "turn racing off for this search")
        # every metric a mean over items: per-item values come with each evaluation (what the
        # export's paired comparison reads, evolve.selection)
        self.per_item = not_mean is None
        self.item_values: Optional[dict[str, list[float]]] = None  # of the latest evaluate()
        self.directions = {
            t.name: t.direction
            or ("maximize" if higher_is_better(self.loaded["tasks"][t.name], t.metric) else "minimize")
            for t in self.tasks
        }
        self.lm = None

    @classmethod
    def from_spec(cls, tasks: Sequence[dict], **options) -> "LMEvalEvaluator":
        """Built from a worker's evaluator spec: tasks as plain dicts of TaskSpec fields."""
        return cls([TaskSpec(**{**t, "also": tuple(t.get("also", ()))}) for t in tasks], **options)

    def items(self, name: str) -> list[int]:
        """The documents of task `name` every candidate is scored on."""
        if self.samples is not None:
            return list(self.samples[name])
        return list(range(len(self.loaded["tasks"][name].eval_docs)))

    def _not_a_mean(self) -> Optional[tuple[str, str, str]]:
        """(task, metric, its aggregation) of the first metric that is not a mean over items."""
        for t in self.tasks:
            aggregation = self.loaded["tasks"][t.name].aggregation()
            for _, metric in t.metrics:
                function = aggregation.get(metric.split(",")[0])
                if getattr(function, "__name__", None) != "mean":
                    return t.name, metric, getattr(function, "__name__", "unknown")
        return None

    def _subsets(self) -> Optional[dict[str, list[int]]]:
        """The same items for every candidate: the first `limit` documents, or with `shuffle` a
        subset drawn with `seed` (mergekit-evolve's unseeded shuffle gave every candidate other items)."""
        if self.limit is None and not self.shuffle:
            return None
        out = {}
        for name, task_obj in self.loaded["tasks"].items():
            n = len(task_obj.eval_docs)
            k = min(self.limit or n, n)
            if self.shuffle:
                out[name] = sorted(random.Random(f"{self.seed}/{name}").sample(range(n), k))
            else:
                out[name] = list(range(k))
        return out

    def attach(self, model, tokenizer) -> None:
        from lm_eval.models.huggingface import HFLM

        if self.apply_chat_template and not getattr(tokenizer, "chat_template", None):
            log.warning("the tokenizer has no chat template: evaluating without apply_chat_template")
            self.apply_chat_template = False
            self.fewshot_as_multiturn = False
        self.lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size, add_bos_token=self.add_bos_token)
        if not self.progress_bars:
            # lm-eval draws progress bars per request type and candidate; a search scores
            # hundreds of candidates (and Ray would ship every bar to the driver's console)
            for request_type in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
                setattr(self.lm, request_type, functools.partial(getattr(self.lm, request_type), disable_tqdm=True))

    def reseed_fewshot(self) -> None:
        """Seed every task's few-shot sampler with the evaluation seed. lm-eval's sampler is
        stateful: without this before each evaluation, every candidate would get other few-shot
        examples (other prompts), and only the first evaluation would match the seed."""
        for task_obj in self.loaded["tasks"].values():
            task_obj.set_fewshot_seed(seed=self.seed)

    def _run(self, samples: Optional[dict], per_item: bool = False) -> dict:
        from lm_eval.evaluator import evaluate

        if self.lm is None:
            raise RuntimeError("attach a model first")
        self.reseed_fewshot()
        return evaluate(
            lm=self.lm,
            task_dict=self.loaded,
            samples=samples,
            bootstrap_iters=0,
            log_samples=per_item,
            apply_chat_template=self.apply_chat_template,
            fewshot_as_multiturn=self.fewshot_as_multiturn,
            verbosity="ERROR",
        )

    def evaluate(self) -> dict[str, float]:
        """{task name (and task:metric for `also`): metric value} for the attached model as it is
        now. With `per_item`, `item_values` then holds each value's per-item values, in the
        order of `items()` (the same for every candidate)."""
        results = self._run(self.samples, per_item=self.per_item)
        if self.per_item:
            values = self._values(results)
            self.item_values = {key: [by_doc[d] for d in self.items(key.split(":")[0])] for key, by_doc in values.items()}
        self.evaluated_items = sum(len(self.items(t.name)) for t in self.tasks)
        out = {}
        for t in self.tasks:
            task_results = results["results"].get(t.name, {})
            for key, metric in t.metrics:
                if metric not in task_results:
                    raise TaskError(
                        f"task {t.name} reports no metric {metric!r} (it has: {', '.join(k for k in task_results if k != 'alias')})"
                    )
                out[key] = float(task_results[metric])
        return out

    def _item_values(self, samples: dict) -> dict[str, dict[int, float]]:
        """{result key: {document: value}} over the given documents (racing's unit of account)."""
        return self._values(self._run(samples, per_item=True))

    def _values(self, results: dict) -> dict[str, dict[int, float]]:
        """{result key: {document: value}} from an evaluation run with per-item samples."""
        out: dict[str, dict[int, float]] = {}
        for t in self.tasks:
            for key, metric in t.metrics:
                name, _, kept = metric.partition(",")
                rows = [r for r in results["samples"].get(t.name, []) if r.get("filter", "none") == (kept or "none")]
                if not rows or name not in rows[0]:
                    raise TaskError(f"task {t.name} reports no per-item metric {metric!r}")
                out[key] = {int(r["doc_id"]): float(r[name]) for r in rows}
        return out

    def evaluate_raced(self, weights: dict[str, float], best: Optional[dict[str, list[float]]],
                       fractions: Sequence[float], z: float) -> tuple[dict, Optional[int], dict[str, list[float]]]:
        """(metrics, stopped_at, values): scored stage by stage (`fractions`: the stage boundaries,
        see evaluators.racing), checked after every stage but the last against `best`, the best
        complete candidate's per-item values (None: nothing to beat yet). `stopped_at` is the stage
        (1-based) after which the candidate was stopped, None when it was scored on every item.
        `values` (task -> per-item values in stage order) covers the items scored when stopped,
        else every stage but the last: what a later candidate is paired with if this one becomes
        the best; a stage `best` holds no values for is not checked. The metrics are over the items
        scored, computed as the mean of per-item values."""
        from .racing import should_stop, split_stages

        self.item_values = None  # racing keeps its own per-item values (`values`)
        stages = {t.name: split_stages(self.items(t.name), fractions, f"{self.seed}/race/{t.name}") for t in self.tasks}
        sizes = {t.name: len(self.items(t.name)) for t in self.tasks}
        scored: dict[str, dict[int, float]] = {}  # result key -> {document: value}
        values: dict[str, list[float]] = {t.name: [] for t in self.tasks}
        self.evaluated_items = 0
        final = len(fractions)  # the last stage's index
        for j in range(final + 1):
            samples = {name: s[j] for name, s in stages.items() if s[j]}
            if samples:
                new = self._item_values(samples)
                self.evaluated_items += sum(len(docs) for docs in samples.values())
                for key, by_doc in new.items():
                    scored.setdefault(key, {}).update(by_doc)
                if j < final:  # the last stage's values are never paired with
                    for name, docs in samples.items():
                        values[name] += [new[name][d] for d in docs]
            if not any(s[k] for s in stages.values() for k in range(j + 1, final + 1)):
                break  # every item scored
            # a best stored with fewer stages (a study resumed under a config that now has more)
            # cannot be paired beyond them: the candidate goes on, as with no best
            covered = best is not None and all(len(best[n]) >= len(v) for n, v in values.items())
            if covered and should_stop(values, best, sizes, weights, z):
                return {key: math.fsum(v.values()) / len(v) for key, v in scored.items()}, j + 1, values
        task_of = {key: t.name for t in self.tasks for key, _ in t.metrics}
        out = {}
        for key, by_doc in scored.items():
            ordered = [by_doc[d] for d in sorted(by_doc)]  # one summation order for every candidate
            if len(ordered) != sizes[task_of[key]]:
                raise TaskError(f"task {task_of[key]}: {len(ordered)} of {sizes[task_of[key]]} items scored")
            out[key] = math.fsum(ordered) / len(ordered)
        return out, None, values
