"""`mergekit-moe CONFIG OUT [options]`: a mixture of experts from dense models (docs/mergekit-reference.md §6).

Outputs MixtralForCausalLM, Qwen2MoeForCausalLM or Qwen3MoeForCausalLM checkpoints that stock
transformers loads without custom code."""

from __future__ import annotations

from pathlib import Path

import click

from ..cli import apply_environment, check_device, console, run_cli, setup_logging
from ..options import merge_options, options_from_flags
from ..errors import ConfigError


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("config_file", type=click.Path(dir_okay=False))
@click.argument("out_path", type=click.Path(file_okay=False))
@click.option("--load-in-4bit", is_flag=True, default=False, help="Load the base in 4 bit for hidden-state routers (not supported yet).")
@click.option("--load-in-8bit", is_flag=True, default=False, help="Load the base in 8 bit for hidden-state routers (not supported yet).")
@click.option(
    "--i-understand-this-is-not-useful-without-training", "understood", is_flag=True, default=False,
    help="Allow random routers, and experts that are all one model.",
)
@merge_options
def main(config_file: str, out_path: str, load_in_4bit: bool, load_in_8bit: bool, understood: bool, **kw) -> None:
    """Build a mixture of experts described by a mergekit-moe YAML recipe into OUT_PATH."""
    setup_logging(kw["verbose"], kw["quiet"])
    apply_environment(kw)

    def action() -> None:
        if load_in_4bit or load_in_8bit:
            raise ConfigError("--load-in-4bit/--load-in-8bit: quantised loading of the base is not supported yet")
        from .config import load_moe_config

        config, text = load_moe_config(Path(config_file))
        options = options_from_flags(kw)
        check_device(options)
        from .build import build_moe

        build_moe(config, text, Path(out_path), options, config_file, understood)
        if not options.quiet:
            click.echo(f"mixture of experts written to {out_path}")

    run_cli(kw["verbose"], action)


console_main = console(main)
