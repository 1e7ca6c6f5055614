"""The driver's check of the tasks a search config names, before any worker starts."""

from __future__ import annotations

from pathlib import Path

from merge_engine.errors import ConfigError

from .config import SearchConfig
from .options import EvolveOptions

BENCHMARK_PREFIXES = (
    "mmlu", "hendrycks", "agieval", "gsm8k", "hellaswag", "winogrande", "arc_", "ai2_arc",
    "truthfulqa", "bigbench", "piqa", "openbookqa", "leaderboard",
)


def check_tasks(config: SearchConfig, options: EvolveOptions) -> None:
    """Every task the config names (`tasks`, `rescore.tasks`, `constraints`) is loaded here, in the
    driver, and must report every metric asked of it: a mistake is one line naming the key before
    any worker starts (a worker would fail every candidate with it, burning the whole budget)."""
    keyed = [(f"tasks[{i}]", t) for i, t in enumerate(config.tasks)]
    if config.rescore is not None:
        keyed += [(f"rescore.tasks[{i}]", t) for i, t in enumerate(config.rescore.tasks)]
    if not options.allow_benchmark_tasks:
        flagged = [t.name for _, t in keyed[:len(config.tasks)]
                   if t.name.startswith(BENCHMARK_PREFIXES) and not t.name.endswith("_train")]
        if flagged:
            raise ConfigError(
                f"tasks: {', '.join(flagged)} look like public benchmarks; optimising on a test set "
                "overfits it (pass --i-understand-the-depths-of-the-evils-i-am-unleashing to allow)"
            )
    for path in options.task_search_path:
        if not Path(path).is_dir():
            raise ConfigError(f"--task-search-path {path}: not a directory")
    try:
        from lm_eval.tasks import TaskManager

        manager = TaskManager(
            include_path=list(options.task_search_path) or None, include_defaults=not options.task_search_path
        )
        known = manager.all_tasks
    except Exception as err:  # lm-eval could not index the tasks
        raise ConfigError(f"tasks: cannot index lm-eval tasks: {err}") from None
    where = f" (searched {', '.join(options.task_search_path)})" if options.task_search_path else ""
    for key, task in keyed:
        if task.name not in known:
            raise ConfigError(f"{key}: unknown lm-eval task {task.name!r}{where}")
    names = list(dict.fromkeys(t.name for _, t in keyed))
    try:
        import datasets

        datasets.disable_progress_bars()  # the driver's console shows the search, not dataset builds
        loaded = manager.load(names)["tasks"]
    except Exception as err:  # a task whose definition or data lm-eval cannot load
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"tasks: lm-eval cannot load {', '.join(names)}: {detail}") from None
    from evaluators.lm_eval_tasks import reported_metrics

    if config.optimizer.name in ("gradient", "cma+gradient"):
        from evaluators.gradient_loss import DIFFERENTIABLE_OUTPUT_TYPES

        for i, task in enumerate(config.tasks):
            kind = loaded[task.name].get_config("output_type") if task.name in loaded else None
            if kind not in DIFFERENTIABLE_OUTPUT_TYPES:
                raise ConfigError(
                    f"tasks[{i}]: optimizer {config.optimizer.name}: task {task.name} is {kind}, which has no differentiable "
                    f"loss (only {' and '.join(DIFFERENTIABLE_OUTPUT_TYPES)} tasks have); use another optimizer")

    asked = [(f"{key}.metric", t.name, t.metric) for key, t in keyed]
    asked += [(f"constraints[{i}].metric", c.task, c.metric) for i, c in enumerate(config.constraints) if c.metric]
    for key, name, metric in asked:
        reported = reported_metrics(loaded[name]) if name in loaded else []
        if name in loaded and metric not in reported:
            raise ConfigError(f"{key}: task {name} reports no metric {metric!r} (it reports: {', '.join(reported)})")
