"""`mergekit-yaml CONFIG OUT [options]`: the options of mergekit's CLI (docs/mergekit-reference.md §4), same names.

Imports stay light until a merge really starts, so `--help` and config errors answer fast.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from .errors import MergeError

NO_EFFECT = "(accepted for compatibility; no effect here)"


def _size(ctx, param, value):
    from .options import parse_size  # torch-free: config errors must stay fast

    try:
        return parse_size(value)
    except ValueError as err:
        raise click.BadParameter(str(err)) from None


def check_lora_dtype(ctx, param, value):
    from .config import normalize_dtype_name  # torch-free

    try:
        name = normalize_dtype_name(value)
    except ValueError as err:
        raise click.BadParameter(str(err)) from None
    if name not in (None, "bfloat16", "float16", "float32"):
        raise click.BadParameter(f"{value!r} is not a floating-point dtype (use bfloat16, float16 or float32)")
    return name


def setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    if quiet and verbose == 0:
        level = logging.ERROR
    logging.basicConfig(level=level, format="%(levelname)s: %(message)s", stream=sys.stderr)


def run_cli(verbose: int, action) -> None:
    """Run `action`; user errors become one line on stderr and exit code 2 (traceback with -v).
    SIGTERM unwinds like Ctrl-C, so temporary output is removed either way."""
    import signal

    from .threads import configure_process

    configure_process()  # before anything imports torch

    def _terminate(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    try:
        action()
    except MergeError as err:
        if verbose:
            logging.exception("merge failed")
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted: no output was written", err=True)
        sys.exit(130)


def merge_options(f):
    """The shared merge flags, reused by every command that runs a merge."""
    opts = [
        click.option("--allow-crimes/--no-allow-crimes", default=False, help="Allow merging models of different architectures."),
        click.option("--transformers-cache", type=click.Path(), default=None, help="Hugging Face cache directory for hub models."),
        click.option("--lora-merge-cache", type=click.Path(), default=None, help="Folder where each model+LoRA input is merged once and kept for reuse (needed for LoRA inputs)."),
        click.option("--lora-merge-dtype", default=None, callback=check_lora_dtype, help="dtype for applying LoRAs: bfloat16, float16 or float32 (default: the base model's)."),
        click.option("--cuda/--no-cuda", default=False, help="Do the merge maths on CUDA (same as --device cuda)."),
        click.option("--device", default=None, help="Math device: cpu, cuda, cuda:N or auto (default cpu, or cuda with --cuda)."),
        click.option("--low-cpu-memory/--no-low-cpu-memory", default=False, help=f"Keep results on the math device. {NO_EFFECT}: memory is bounded by design."),
        click.option("--out-shard-size", default="5B", callback=_size, help="Maximum shard size in bytes; suffixes k/M/B are powers of ten (default 5B)."),
        click.option("--copy-tokenizer/--no-copy-tokenizer", default=True, help="Copy the tokenizer files of the base (or first) model."),
        click.option("--clone-tensors/--no-clone-tensors", default=False, help=f"Clone tensors before saving. {NO_EFFECT}: every output is written from its own buffer."),
        click.option("--trust-remote-code/--no-trust-remote-code", default=False, help=f"Allow custom model code. {NO_EFFECT}: merges never run model code."),
        click.option("--random-seed", type=int, default=0, show_default=True, help="Seed of random methods (DARE); each tensor draws from (seed, tensor name)."),
        click.option("--lazy-unpickle/--no-lazy-unpickle", default=False, help="Allow pytorch_model.bin inputs, read through a restricted unpickler."),
        click.option("--write-model-card/--no-write-model-card", default=True, help="Write README.md and mergekit_config.yml."),
        click.option("--safe-serialization/--no-safe-serialization", default=True, help="Write safetensors (default) or pytorch_model.bin shards."),
        click.option("-v", "--verbose", count=True, help="-v info, -vv debug; tracebacks on errors."),
        click.option("--quiet/--no-quiet", default=False, help="No progress bar."),
        click.option("--read-to-gpu/--no-read-to-gpu", default=False, help="Move inputs to the math device as they are read (always the case with --device cuda)."),
        click.option("--multi-gpu/--no-multi-gpu", default=False, help=f"Spread tensors over several GPUs. {NO_EFFECT}: one device is used."),
        click.option("-j", "--num-threads", type=click.IntRange(min=1), default=None, help="torch intra-op threads."),
        click.option("--gpu-rich", is_flag=True, default=False, help="Shorthand for --cuda --low-cpu-memory --read-to-gpu --multi-gpu."),
        click.option("--async-write/--no-async-write", default=False, help=f"Write shards in the background. {NO_EFFECT}: writing always overlaps computing."),
        click.option("--write-threads", type=int, default=1, help=f"Writer threads. {NO_EFFECT}."),
        click.option("--overwrite/--no-overwrite", default=False, help="Replace an existing non-empty output folder (only after the new merge is complete)."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def options_from_flags(kw: dict):
    from .options import MergeOptions

    device = kw.get("device")
    if kw.get("gpu_rich"):
        kw["cuda"] = True
    if device is None:
        device = "cuda" if kw.get("cuda") else "cpu"
    return MergeOptions(
        device=device,
        out_shard_size=kw["out_shard_size"],
        copy_tokenizer=kw["copy_tokenizer"],
        allow_crimes=kw["allow_crimes"],
        random_seed=kw["random_seed"],
        lazy_unpickle=kw["lazy_unpickle"],
        write_model_card=kw["write_model_card"],
        safe_serialization=kw["safe_serialization"],
        quiet=kw["quiet"],
        read_to_gpu=kw["read_to_gpu"],
        low_cpu_memory=kw["low_cpu_memory"],
        num_threads=kw["num_threads"],
        overwrite=kw["overwrite"],
        trust_remote_code=kw["trust_remote_code"],
        lora_merge_cache=kw.get("lora_merge_cache"),
        lora_merge_dtype=kw.get("lora_merge_dtype"),
    )


def apply_environment(kw: dict) -> None:
    if kw.get("transformers_cache"):
        import os

        os.environ["HF_HUB_CACHE"] = kw["transformers_cache"]


def check_device(options) -> None:
    """A device that cannot run the merge is a user error, reported before any work."""
    if options.device == "auto":
        return
    import torch

    try:
        device = torch.device(options.device)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise MergeError(f"--device {options.device}: unsupported device (use cpu, cuda, cuda:N or auto)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MergeError(f"--device {options.device}: no CUDA device is available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise MergeError(f"--device {options.device}: only {torch.cuda.device_count()} CUDA device(s) are available")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("config_file", type=click.Path(dir_okay=False))
@click.argument("out_path", type=click.Path(file_okay=False))
@merge_options
def main(config_file: str, out_path: str, **kw) -> None:
    """Merge models as described by a mergekit YAML recipe into OUT_PATH."""
    setup_logging(kw["verbose"], kw["quiet"])
    apply_environment(kw)

    def action() -> None:
        from .config import load_config

        config, text = load_config(Path(config_file))
        options = options_from_flags(kw)
        check_device(options)
        from .streaming import run_merge

        run_merge(config, Path(out_path), options, config_text=text)
        if not options.quiet:
            click.echo(f"merged model written to {out_path}")

    run_cli(kw["verbose"], action)


if __name__ == "__main__":
    main()
