"""`mergekit-yaml CONFIG OUT [options]`: the options of mergekit's CLI (docs/mergekit-reference.md §4), same names.

Imports stay light until a merge really starts, so `--help` and config errors answer fast.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from .errors import MergeError, RunFailure
from .options import merge_options, options_from_flags

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
    except RunFailure as err:
        if verbose:
            logging.exception("run failed")
        click.echo(f"error: {err}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        io = sys.modules.get(f"{__package__}.io")  # not imported yet: no output folder was made
        if io is not None:
            io.discard_incomplete()  # also a folder created just before its owner's cleanup took over
        click.echo("interrupted: no output was written", err=True)
        sys.exit(130)


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
