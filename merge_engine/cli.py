"""`mergekit-yaml CONFIG OUT [options]`: the options of mergekit's CLI (docs/mergekit-reference.md §4), same names.

Imports stay light until a merge really starts, so `--help` and config errors answer fast.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Callable

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


def console(main: Callable[[], object]) -> Callable[[], None]:
    """The console-script entry point of a CLI's `main` (a click command, or a function that calls
    one): it runs `main`, then leaves through `exit_now`. Tests that invoke `main` in-process
    (click's CliRunner) keep Python's normal exit."""

    def entry() -> None:
        try:
            main()
            code = 0
        except SystemExit as done:
            code = done.code
        exit_now(code)

    entry.__doc__ = main.__doc__
    return entry


def exit_now(code) -> None:
    """Exit with `code` (SystemExit's meaning) without Python's interpreter teardown: freeing the
    modules of torch, transformers and lm-eval one by one takes 0.4-1.4 s after the work is done
    (measured on the 2-core machine, docs/setup.md). Everything a normal exit does that matters
    still happens: atexit callbacks (temporary folders, logging, Ray), and the standard streams
    are flushed. Threads that Python would wait for are waited for: with any alive, the normal
    exit is taken."""
    import atexit
    import os
    import threading

    status = 0 if code is None else code if isinstance(code, int) else 1
    if not isinstance(code, (int, type(None))):
        print(code, file=sys.stderr)
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(status)
    atexit._run_exitfuncs()  # what Py_Finalize would run (CPython's own hook, present since 3.0)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can be said
            pass
    os._exit(status)


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


console_main = console(main)

if __name__ == "__main__":
    console_main()
