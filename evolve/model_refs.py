"""The genome's models must all be at hand before any Ray worker starts.

A local folder must exist; a Hugging Face hub id (`org/name`, `org/name@revision`) is downloaded
into the local cache here, once (with HF_HUB_OFFLINE set it must already be cached), so workers
only ever read the cache; a `model+lora` reference is merged into the LoRA merge cache here, once,
instead of by every worker racing to build the same folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from merge_engine.config import ModelPath, ModelReference
from merge_engine.errors import ConfigError, MergeError
from merge_engine.sources import lora_cache_dir, looks_like_repo_id, resolve_adapter_dir, resolve_model_dir

from .store import FINAL_MODEL, is_experiment


def _genome_refs(genome_definition) -> list[tuple[str, ModelReference]]:
    g = genome_definition
    refs = [(f"genome.models[{i}]", ref) for i, ref in enumerate(g.models)]
    if g.base_model is not None:
        refs.append(("genome.base_model", g.base_model))
    return refs


def check_experiment_references(genome_definition) -> None:
    """A finished search's DIR/final_model is a model like any other (a later search may take it
    as a layer source, docs/mergekit-evolve.md); name the two mistakes around it in one line."""
    for key, ref in _genome_refs(genome_definition):
        folder = Path(ref.model.path).expanduser()
        if is_experiment(folder):
            raise ConfigError(f"{key}: {ref} is a mergekit-evolve experiment directory, not a model; "
                              f"the model it exported is {folder / FINAL_MODEL}")
        if folder.name == FINAL_MODEL and not folder.exists() and is_experiment(folder.parent):
            raise ConfigError(
                f"{key}: {ref} does not exist: the search in {folder.parent} has not exported its model (still "
                f"running, stopped, or run with --no-save-final-model); finish it with --resume, or merge its "
                f"best_config.yaml into that folder with mergekit-yaml"
            )


def check_genome_models(genome_definition, lora_merge_cache: str, lora_merge_dtype: Optional[str]) -> None:
    """Resolve every model of `genome_definition` (a search_spaces.definition.GenomeDefinition): its models
    and base_model, and for a `model+lora` reference its base and its adapter. Raises a one-line
    ConfigError naming the key (`genome.models[1]`, `genome.base_model`) of the first that does
    not resolve."""
    check_experiment_references(genome_definition)
    done: set[ModelReference] = set()
    for key, ref in _genome_refs(genome_definition):
        if ref in done:  # base_model listed under models too
            continue
        done.add(ref)
        what = f"{key}: model {ref}"
        if ref.lora is None:
            _resolve(what, ref.model, lambda: resolve_model_dir(ref), f"model {ref}")
            continue
        if lora_merge_cache and lora_cache_dir(ref, lora_merge_cache).is_dir():
            continue  # merged by an earlier run: resolve_model_dir reads only that folder
        base = ModelReference(ref.model, None, ref.override_architecture)
        _resolve(f"{what}: base model {ref.model}", ref.model, lambda: resolve_model_dir(base), f"model {ref.model}")
        _resolve(f"{what}: LoRA adapter {ref.lora}", ref.lora, lambda: resolve_adapter_dir(ref), f"LoRA adapter {ref.lora}")
        # the merge of the adapter into its base, built once into the LoRA merge cache
        _resolve(what, None, lambda: resolve_model_dir(ref, lora_merge_cache, lora_merge_dtype), f"model {ref}")


def _resolve(what: str, part: Optional[ModelPath], resolve: Callable[[], Path], named: str) -> None:
    """Run `resolve`; turn its error into one ConfigError line that starts with `what` (`named`:
    how the resolver's own message names the model, so it is not named twice)."""
    try:
        resolve()
    except MergeError as err:
        if part is not None and _offline() and looks_like_repo_id(part.path):
            raise ConfigError(f"{what}: {_offline_reason(part, err)}") from None
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        detail = detail[len(named) + 2 :] if detail.startswith(f"{named}: ") else detail
        raise ConfigError(f"{what}: {detail}") from None


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _offline_reason(part: ModelPath, err: BaseException) -> str:
    from huggingface_hub import constants
    from huggingface_hub.errors import IncompleteSnapshotError

    where = part.path if part.revision is None else f"{part.path} (revision {part.revision})"
    # resolve_model_dir raises its own error `from None`: the hub's error is still its context
    if isinstance(err.__context__, IncompleteSnapshotError):
        state = "is only partly in the local Hugging Face cache"
    else:
        state = "is not in the local Hugging Face cache"
    return (
        f"{where} {state} ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set; download it first "
        f"(`hf download {part.path}" + (f" --revision {part.revision}" if part.revision else "") + "`) or unset HF_HUB_OFFLINE"
    )


def check_template_recipe(recipe, merge_options) -> None:
    """Plan the recipe every worker starts from (headers and config.json files only, no tensor
    data): what would stop each worker at start (an expert of another size, a missing tensor, an
    architecture mismatch) is one line naming the tensor or model, before any worker starts."""
    from merge_engine.plan import build_plan

    try:
        plan = build_plan(
            recipe, allow_crimes=merge_options.allow_crimes, lazy_unpickle=merge_options.lazy_unpickle,
            lora_merge_cache=merge_options.lora_merge_cache, lora_merge_dtype=merge_options.lora_merge_dtype,
        )
    except MergeError as err:
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"genome: the models cannot be merged: {detail}") from None
    plan.close()
