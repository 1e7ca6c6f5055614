"""What the search's workers are started with: the evaluator they score with, the template recipe
and merge options (evaluators.worker.WorkerSettings), their environment, and the pool of them."""

from __future__ import annotations

import os
from pathlib import Path

from merge_engine.threads import thread_environment
from search_spaces.genome import Genome

from .config import SearchConfig
from .objectives import extra_metrics
from .options import EvolveOptions


def evaluator_spec(config: SearchConfig, options: EvolveOptions, tasks=None) -> dict:
    """The workers' lm-eval evaluator: the search tasks (or `tasks`, e.g. the held-out ones), each
    also reporting the other metrics constraints read (as `task:metric`)."""
    extra = extra_metrics(config.tasks, config.constraints) if tasks is None else {}
    return {
        "kind": "lm_eval",
        "tasks": [{"name": t.name, "metric": t.metric, "weight": t.weight, "direction": t.direction,
                   "also": extra.get(t.name, [])} for t in (tasks or config.tasks)],
        "include_paths": [str(Path(p).resolve()) for p in options.task_search_path],
        "limit": config.limit,
        "num_fewshot": config.num_fewshot,
        "shuffle": config.shuffle,
        "seed": config.seed,
        "apply_chat_template": config.apply_chat_template,
        "fewshot_as_multiturn": config.fewshot_as_multiturn,
        "batch_size": options.batch_size,
        "racing": config.racing is not None and tasks is None,
    }


def worker_settings(config: SearchConfig, genome: Genome, options: EvolveOptions, x0: list[float], evaluator=None):
    from evaluators.worker import WorkerSettings

    return WorkerSettings(
        template_recipe=genome.decode(x0).to_plain(),
        evaluator=evaluator or evaluator_spec(config, options),
        merge_options=options.merge_options(),
    )


def hub_environment() -> dict:
    """The driver's Hugging Face cache settings, for workers on other nodes of a joined cluster
    (a private local cluster inherits them anyway): they resolve hub ids in the same cache."""
    from huggingface_hub import constants

    env = {"HF_HUB_CACHE": str(constants.HF_HUB_CACHE)}
    for name in ("HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(name):
            env[name] = os.environ[name]
    return env


def worker_pool(config: SearchConfig, genome: Genome, options: EvolveOptions, x0: list[float], evaluator=None):
    """A WorkerPool (evolve.pool), not started yet, on the Ray cluster the driver joined: one worker
    per GPU (`--gpus-per-worker`) or `--num-workers`, each with the search's evaluator or `evaluator`."""
    import ray

    from evaluators.worker import CandidateWorker

    from .pool import WorkerPool, WorkerSpec

    gpus = ray.cluster_resources().get("GPU", 0)
    use_gpu = gpus > 0 and options.device in ("auto", "cuda")
    per_worker = (options.gpus_per_worker or 1.0) if use_gpu else 0.0
    count = options.num_workers or (max(int(gpus // per_worker), 1) if use_gpu else 1)
    # progress bars inside workers (lm-eval, datasets) would be shipped to the driver's
    # console for every candidate: noise, and CPU taken from the evaluation
    env = {"TQDM_DISABLE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", **hub_environment(), **thread_environment()}
    spec = WorkerSpec(CandidateWorker, (worker_settings(config, genome, options, x0, evaluator),),
                      num_cpus=options.cpus_per_worker, num_gpus=per_worker, env=env)
    return WorkerPool(spec, count, timeout=options.candidate_timeout)
