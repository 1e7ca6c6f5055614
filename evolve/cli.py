"""`mergekit-evolve search.yml --storage-path DIR [options]` and `mergekit-evolve report DIR`.

mergekit-evolve's options keep their names; those that have no effect here say so in --help.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Optional

import click

from merge_engine.cli import apply_environment, console, run_cli, setup_logging
from merge_engine.options import NO_EFFECT, merge_options, options_from_flags

from .report import faults_text

# The shared merge flags as a search reads them: the workers' resident merges and the final
# model's export use them; a few mean something else here.
EVOLVE_FLAGS = {
    "device": {"default": "auto", "show_default": True, "help": "Merge and evaluation device: auto, cpu, cuda."},
    "cuda": {"help": "Same as --device cuda."},
    "random_seed": {"help": "Seed of random merge methods (DARE), shared by search and export."},
    "allow_crimes": {"help": "Allow models of different architectures."},
    "lora_merge_cache": {
        "type": click.Path(file_okay=False),
        "help": "Where model+lora genome models are merged and kept (default: DIR/lora_merge_cache).",
    },
    "trust_remote_code": {"help": f"{NO_EFFECT}: no model code is run beyond transformers' own classes."},
    "num_threads": {"help": "torch (and numba) threads per worker (default: torch's, the cores the worker may use)."},
    "quiet": {"help": "No progress lines."},
    "overwrite": {"help": f"{NO_EFFECT}: DIR/final_model is replaced by each export."},
    "out_shard_size": {"help": "Maximum shard size of the final model in bytes; suffixes k/M/B are powers of ten (default 5B)."},
    "copy_tokenizer": {"help": "Copy the tokenizer files of the base (or first) model into the final model."},
    "write_model_card": {"help": "Write README.md and mergekit_config.yml into the final model."},
    "safe_serialization": {"help": "Write the final model as safetensors (default) or pytorch_model.bin shards."},
    "read_to_gpu": {"help": f"{NO_EFFECT}: each worker reads its inputs once onto its device."},
}


@click.command(context_settings={"help_option_names": ["-h", "--help"]},
               epilog="mergekit-evolve report DIR: write DIR/report.html from the experiment's current state.")
@click.argument("genome_config_path", type=click.Path(dir_okay=False))
@click.option("--storage-path", type=click.Path(file_okay=False), required=False, help="Experiment directory: study, checkpoints, best recipe, final model.")
@click.option("--resume", is_flag=True, help="Continue the stopped experiment in --storage-path.")
@click.option("--dry-run", is_flag=True, help="Print the genome size, population and generations the budget allows, then exit.")
@click.option("--max-fevals", type=click.IntRange(min=1), default=None, help="Evaluation budget (overrides budget.max_fevals; default 100).")
@click.option("--timeout", type=float, default=None, help="Stop after this many seconds and export (overrides budget.timeout).")
@click.option("--sigma0", type=float, default=None, help="CMA-ES initial step size, relative to each dimension's range (default 1/6).")
@click.option("--force-population-size", type=click.IntRange(min=2), default=None, help="Population size (CMA-ES) / candidates per batch.")
@click.option("--num-workers", type=click.IntRange(min=1), default=None, help="Ray workers (default: one per GPU, else 1).")
@click.option("--num-gpus", type=click.IntRange(min=0), default=None, help="Same as --num-workers when GPUs are present.")
@click.option("--ray-address", default=None, help="Join an existing Ray cluster (auto or HOST:PORT; default: $RAY_ADDRESS) instead of starting a private local one.")
@click.option("--candidate-timeout", type=click.FloatRange(min=0, min_open=True), default=None, help="Cancel a candidate that runs longer than this many seconds (its worker is replaced; recorded as failed).")
@click.option("--gpus-per-worker", type=click.FloatRange(min=0, min_open=True), default=None, help="GPUs each worker reserves (fractional for small models; default 1 when the cluster has GPUs).")
@click.option("--cpus-per-worker", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True, help="CPUs each worker reserves.")
@click.option("--task-search-path", multiple=True, type=click.Path(), help="Folder of local lm-eval task YAMLs (repeatable).")
@click.option("--save-final-model/--no-save-final-model", default=True, help="Merge the best recipe into DIR/final_model at the end.")
@click.option("--merge-cuda/--no-merge-cuda", default=None, help="--no-merge-cuda = --device cpu.")
@click.option("--batch-size", type=int, default=16, show_default=True, help="lm-eval batch size.")
@click.option("--i-understand-the-depths-of-the-evils-i-am-unleashing", "allow_benchmarks", is_flag=True, help="Allow optimising on public benchmark tasks.")
@click.option("--strategy", "-s", default="pool", help=f"mergekit-evolve scheduling strategy {NO_EFFECT}: workers are always kept busy.")
@click.option("--in-memory/--no-in-memory", default=True, help=f"{NO_EFFECT}: candidates are always merged in memory.")
@click.option("--vllm/--no-vllm", default=False, help=f"{NO_EFFECT}: evaluation uses transformers models.")
@click.option("--reshard/--no-reshard", default=True, help=f"{NO_EFFECT}: inputs are read once per worker.")
@click.option("--load-in-8bit", is_flag=True, help=NO_EFFECT)
@click.option("--load-in-4bit", is_flag=True, help=NO_EFFECT)
@click.option("--wandb/--no-wandb", default=False, help=f"{NO_EFFECT}: use optuna-dashboard on DIR/study.db.")
@click.option("--wandb-project", default=None, help=NO_EFFECT)
@click.option("--wandb-entity", default=None, help=NO_EFFECT)
@merge_options(overrides=EVOLVE_FLAGS)
def search_command(genome_config_path, storage_path, resume, dry_run, max_fevals, timeout, sigma0, force_population_size,
         num_workers, num_gpus, ray_address, candidate_timeout, gpus_per_worker, cpus_per_worker, task_search_path,
         save_final_model, merge_cuda, batch_size, allow_benchmarks, **kw):
    """Search merge recipes with an evolutionary optimiser; export the best one."""
    verbose, quiet = kw["verbose"], kw["quiet"]
    setup_logging(verbose, quiet)
    apply_environment(kw)

    def action() -> None:
        from merge_engine.errors import ConfigError, RunFailure

        from .config import load_search_config

        config, text = load_search_config(Path(genome_config_path))
        updates = {}
        if max_fevals is not None or timeout is not None:
            budget = config.budget.model_copy(
                update={k: v for k, v in (("max_fevals", max_fevals), ("timeout", timeout)) if v is not None}
            )
            updates["budget"] = budget
        opt_updates = {k: v for k, v in (("sigma0", sigma0), ("popsize", force_population_size)) if v is not None}
        if opt_updates:
            updates["optimizer"] = config.optimizer.model_copy(update=opt_updates)
        if updates:
            config = config.model_copy(update=updates)
        if dry_run:
            from .dry_run import dry_run_report

            click.echo(dry_run_report(config))
            return
        if not storage_path:
            raise ConfigError("--storage-path is required (except with --dry-run)")
        from .options import EvolveOptions
        from .search import SearchRun

        device = "cpu" if merge_cuda is False else "cuda" if (kw["cuda"] or kw["gpu_rich"]) and kw["device"] == "auto" else kw["device"]
        options = EvolveOptions(
            storage_path=Path(storage_path), merge=options_from_flags(kw, device=device), resume=resume,
            num_workers=num_workers or num_gpus or None, ray_address=ray_address,
            task_search_path=list(task_search_path), save_final_model=save_final_model, batch_size=batch_size,
            allow_benchmark_tasks=allow_benchmarks, candidate_timeout=candidate_timeout,
            gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker,
        )
        search = SearchRun(config, text, options)
        previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)  # a scheduler's stop: export, then exit
        failure = None
        try:
            search.run()
        except RunFailure as err:  # reported after what was done so far is exported
            failure = err
        finally:
            signal.signal(signal.SIGTERM, previous)
        # whatever stopped the search, the work done so far is exported
        try:
            chosen = _export(search, Path(storage_path), quiet)
        except (RunFailure, OSError) as err:
            if failure is not None:
                raise failure from None  # the first cause (a full disk fails the export too)
            raise err if isinstance(err, RunFailure) else RunFailure(f"{storage_path}: export failed: {err}") from None
        if failure is not None:
            raise failure
        if chosen is None:
            raise RunFailure(f"no candidate completed in {storage_path}: nothing was exported")

    run_cli(verbose, action)


def _export(search, storage_path: Path, quiet: bool) -> Optional[dict]:
    """best_config.yaml, final_model/ and report.html from what the search did; the exported row."""
    if not quiet:
        click.echo(f"search stopped: {search.record.stop_reason}; {search.finished} evaluations in {storage_path}"
                   + (f" ({faults})" if (faults := faults_text(search.record.retried, search.record.replaced, search.record.timed_out)) else ""))
        if search.overhead_report():
            click.echo(search.overhead_report())
    out = search.export()
    selection = search.selection()
    if selection is not None:
        click.echo(f"exported trial {selection.number} (search fitness {selection.row.fitness:.6g}; "
                   f"{selection.reason}); recipe: {storage_path / 'best_config.yaml'}")
    if out is not None:
        click.echo(f"final model: {out}")
    _write_report(storage_path, quiet)
    return None if selection is None else selection.row


def _write_report(root: Path, quiet: bool) -> None:
    """report.html at the end of a search; a report that fails must not fail the search."""
    import logging

    from .html_report import write_report

    try:
        path = write_report(root)
    except Exception as err:  # noqa: BLE001 - the search's results are on disk either way
        logging.getLogger(__name__).warning("report.html not written: %s (retry with: mergekit-evolve report %s)", err, root)
        return
    if not quiet:
        click.echo(f"report: {path}")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("storage_path", type=click.Path(file_okay=False))
@click.option("-v", "--verbose", count=True, help="-v info, -vv debug; tracebacks on errors.")
def report_command(storage_path, verbose):
    """Write STORAGE_PATH/report.html (fitness, best recipe per layer, Pareto front, parameter
    importance, re-scoring) from the experiment's study; works while a search is running."""
    setup_logging(verbose, False)

    def action() -> None:
        from .html_report import write_report

        click.echo(write_report(Path(storage_path)))

    run_cli(verbose, action)


def main(args=None) -> None:
    """`mergekit-evolve report DIR` or `mergekit-evolve search.yml [options]` (a search config
    named `report` is passed as `./report`)."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] == ["report"]:
        report_command(argv[1:], prog_name="mergekit-evolve report")
    else:
        search_command(argv, prog_name="mergekit-evolve")


def _sigterm_as_interrupt(signum, frame):
    raise KeyboardInterrupt


console_main = console(main)

if __name__ == "__main__":
    console_main()
