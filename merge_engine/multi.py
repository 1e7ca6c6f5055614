"""`mergekit-multi CONFIG --intermediate-dir DIR [--out-path OUT]`: several merges from one YAML
stream (docs/mergekit-reference.md §4).

Documents are separated by `---`. A document with `name: X` is a named merge written to DIR/X; any
later (or earlier) recipe may use `X` as a model reference. At most one document has no name: the
final merge, written to OUT (so `--out-path` is needed exactly when there is one). Recipes run in
dependency order; every recipe is validated before the first merge starts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional

import click
from pydantic import BaseModel

from .cli import apply_environment, check_device, console, run_cli, setup_logging
from .options import merge_options, options_from_flags
from .config import (
    MergeConfig,
    ModelPath,
    ModelReference,
    TokenizerConfig,
    load_yaml_text,
    parse_config,
    read_config_text,
)
from .errors import ConfigError, MergeError

log = logging.getLogger(__name__)


@dataclass
class Recipe:
    number: int  # 1-based position among the stream's documents
    name: Optional[str]  # None: the final merge
    config: MergeConfig
    needs: list[str]  # names of the intermediates it reads

    @property
    def label(self) -> str:
        return f"recipe '{self.name}' (#{self.number})" if self.name else f"final recipe (#{self.number})"


# ----------------------------------------------------------------------------------------------
# Model references inside a parsed recipe


def map_model_paths(obj: Any, fn: Callable[[str], Optional[str]]) -> Any:
    """`obj` with every model path p replaced by fn(p) where that is not None (the LoRA part of a
    reference is kept). Walks the parsed schema, so it covers models, slices, base models and
    tokenizer sources alike; unchanged parts are returned as they are."""
    if isinstance(obj, ModelReference):
        new = fn(obj.model.path) if obj.model.revision is None else None
        return obj if new is None else replace(obj, model=ModelPath(new))
    if isinstance(obj, BaseModel):
        updates = {}
        for field in type(obj).model_fields:
            value = getattr(obj, field)
            if isinstance(value, str) and _is_model_string(obj, field):
                new = None if value in ("base", "union") else fn(value)
            else:
                new = map_model_paths(value, fn)
            if new is not None and new is not value:
                updates[field] = new
        return obj.model_copy(update=updates) if updates else obj
    if isinstance(obj, (list, tuple)):
        items = [map_model_paths(v, fn) for v in obj]
        return type(obj)(items) if any(a is not b for a, b in zip(items, obj)) else obj
    if isinstance(obj, dict):
        items = {k: map_model_paths(v, fn) for k, v in obj.items()}
        return items if any(items[k] is not obj[k] for k in obj) else obj
    return obj


def _is_model_string(obj: BaseModel, field: str) -> bool:
    """Plain-string fields that may name a model (besides the keywords base/union)."""
    if isinstance(obj, MergeConfig):
        return field == "tokenizer_source"
    return isinstance(obj, TokenizerConfig) and field == "source"


def model_paths(config: MergeConfig) -> list[str]:
    seen: list[str] = []
    map_model_paths(config, lambda p: seen.append(p) if p not in seen else None)
    return seen


def lora_paths(config: MergeConfig) -> list[str]:
    return [str(r.lora.path) for r in config.referenced_models() if r.lora is not None]


# ----------------------------------------------------------------------------------------------
# Loading and ordering


def load_recipes(path: Path) -> list[Recipe]:
    """Parse and check every recipe of the stream; returns them in an order where each recipe
    comes after the intermediates it uses."""
    text = read_config_text(path)
    documents = [d for d in load_yaml_text(text, str(path), stream=True) if d is not None]
    if not documents:
        raise ConfigError(f"{path}: no merge recipes in the file")
    recipes: list[Recipe] = []
    names: dict[str, int] = {}
    for number, doc in enumerate(documents, start=1):
        if not isinstance(doc, dict):
            raise ConfigError(f"{path}: recipe #{number}: a recipe must be a YAML mapping, got {type(doc).__name__}")
        doc = dict(doc)
        name = doc.pop("name", None)
        where = f"{path}: recipe #{number}"
        if name is not None:
            if not isinstance(name, str) or not name.strip():
                raise ConfigError(f"{where}: name: must be a non-empty string, got {name!r}")
            if "/" in name or "\\" in name or name.startswith(".") or "+" in name or "@" in name:
                raise ConfigError(
                    f"{where}: name: {name!r} must be a plain folder name (no '/', '+', '@' or leading '.')"
                )
            if name in names:
                raise ConfigError(f"{where}: name: '{name}' is already used by recipe #{names[name]}")
            names[name] = number
            where = f"{path}: recipe '{name}' (#{number})"
        recipes.append(Recipe(number, name, parse_config(doc, where), []))
    finals = [r for r in recipes if r.name is None]
    if len(finals) > 1:
        raise ConfigError(
            f"{path}: recipes #{finals[0].number} and #{finals[1].number} both have no 'name:'; "
            "only the final recipe may be unnamed (give intermediates a name)"
        )
    for recipe in recipes:
        for p in model_paths(recipe.config):
            if p in names:
                if p not in recipe.needs:
                    recipe.needs.append(p)
            elif not _exists_or_hub_id(p):
                raise ConfigError(
                    f"{path}: {recipe.label}: unknown model '{p}': not a recipe name "
                    f"({', '.join(sorted(names)) or 'none defined'}), a local directory or a hub repo id"
                )
        for p in lora_paths(recipe.config):
            if not _exists_or_hub_id(p):
                raise ConfigError(f"{path}: {recipe.label}: LoRA adapter '{p}' not found (no such directory)")
    return _dependency_order(recipes, path)


def _exists_or_hub_id(text: str) -> bool:
    from .sources import looks_like_repo_id  # torch-free

    return Path(text).expanduser().exists() or looks_like_repo_id(text)


def _dependency_order(recipes: list[Recipe], path: Path) -> list[Recipe]:
    """Depth-first topological order (file order among independent recipes); a cycle is an error
    naming the recipes on it."""
    by_name = {r.name: r for r in recipes if r.name}
    order: list[Recipe] = []
    state: dict[int, str] = {}  # number -> "visiting" | "done"

    def visit(recipe: Recipe, stack: list[Recipe]) -> None:
        if state.get(recipe.number) == "done":
            return
        if state.get(recipe.number) == "visiting":
            cycle = stack[stack.index(recipe):] + [recipe]
            raise ConfigError(
                f"{path}: {recipe.label}: recipes depend on each other in a cycle: "
                + " -> ".join(r.name or "<final>" for r in cycle)
            )
        state[recipe.number] = "visiting"
        for name in recipe.needs:
            visit(by_name[name], stack + [recipe])
        state[recipe.number] = "done"
        order.append(recipe)

    for recipe in recipes:
        visit(recipe, [])
    return order


# ----------------------------------------------------------------------------------------------
# Running


def check_recipes(config_path: Path, out_path: Optional[Path], options) -> list[Recipe]:
    """Every check that needs no model and no torch: the recipes (in dependency order), --out-path."""
    recipes = load_recipes(config_path)
    has_final = any(r.name is None for r in recipes)
    if has_final and out_path is None:
        raise ConfigError(f"{config_path}: the unnamed (final) recipe needs --out-path")
    if has_final and not options.overwrite:
        # refused here, before any intermediate is merged, not after them
        target = Path(out_path).expanduser()
        if target.is_dir() and any(target.iterdir()):
            raise ConfigError(
                f"{config_path}: final recipe: output directory {out_path} already exists and is not empty "
                "(choose a new path, or pass --overwrite to replace it once the merge completes)"
            )
    if not has_final and out_path is not None:
        log.warning("%s: every recipe is named, so nothing is written to --out-path %s", config_path, out_path)
    return recipes


def run_multi(
    config_path: Path, intermediate_dir: Path, out_path: Optional[Path], options, lazy: bool = True,
    recipes: Optional[list[Recipe]] = None,
) -> list[Path]:
    """Runs every recipe; returns the folders written or reused (the final merge last, if any).
    `recipes`: those `check_recipes` returned for the same arguments (checked here otherwise)."""
    if recipes is None:
        recipes = check_recipes(config_path, out_path, options)
    from .streaming import run_merge

    intermediate_dir = Path(intermediate_dir).expanduser().resolve()
    locations = {r.name: str(intermediate_dir / r.name) for r in recipes if r.name}
    written: list[Path] = []
    for recipe in recipes:
        config = map_model_paths(recipe.config, locations.get)
        target = Path(locations[recipe.name]) if recipe.name else Path(out_path)
        written.append(target)
        if recipe.name and lazy and target.is_dir() and any(target.iterdir()):
            log.info("%s: %s exists, reusing it (--no-lazy re-merges)", recipe.label, target)
            continue
        # an intermediate is replaced only once its new merge is complete (atomic output)
        step_options = replace(options, overwrite=True) if recipe.name else options
        log.info("%s: merging into %s", recipe.label, target)
        try:
            run_merge(config, target, step_options, config_text=config.to_yaml())
        except MergeError as err:
            raise type(err)(f"{recipe.label}: {err}") from None
    return written


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("config_file", type=click.Path(dir_okay=False))
@click.option("--intermediate-dir", required=True, type=click.Path(file_okay=False), help="Folder for the named (intermediate) merges, one sub-folder per name.")
@click.option("--out-path", default=None, type=click.Path(file_okay=False), help="Folder for the final (unnamed) merge; needed when the file has one.")
@click.option("--lazy/--no-lazy", default=True, show_default=True, help="Reuse intermediate merges whose folder already exists.")
@merge_options
def main(config_file: str, intermediate_dir: str, out_path: Optional[str], lazy: bool, **kw) -> None:
    """Run the merges of a multi-document YAML file: named merges, then the final (unnamed) one if any."""
    setup_logging(kw["verbose"], kw["quiet"])
    apply_environment(kw)

    def action() -> None:
        options = options_from_flags(kw)
        out = Path(out_path) if out_path else None
        recipes = check_recipes(Path(config_file), out, options)  # answers before torch is imported
        check_device(options)
        written = run_multi(Path(config_file), Path(intermediate_dir), out, options, lazy=lazy, recipes=recipes)
        if not options.quiet:
            click.echo(f"merged model written to {written[-1]}" if out_path and written else
                       "merged models written to " + ", ".join(str(p) for p in written))

    run_cli(kw["verbose"], action)


console_main = console(main)

if __name__ == "__main__":
    console_main()
