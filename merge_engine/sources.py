"""Model sources: from a model reference in a recipe to an opened checkpoint.

A reference (docs/mergekit-reference.md §1) resolves to a local folder:
- a local path: that folder;
- `org/name[@revision]` that is not a local path: a Hugging Face hub snapshot, downloaded or found
  in the local cache (HF_HUB_OFFLINE is honoured);
- `model+lora`: the adapter merged into its base model, built once into the LoRA merge cache
  (`--lora-merge-cache`) and read from there afterwards, like any other folder.

Opening a folder reads its config.json and indexes its checkpoint's tensors (no tensor data).

This module imports no torch when it is imported: the search driver checks references
(`looks_like_repo_id`) without loading it. The checkpoint reader (`io`, torch) and the adapter
merge (`lora`, transformers and peft) are imported by the functions that need them.
"""

from __future__ import annotations

import logging
import os
import re
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional

from .config import ModelReference, normalize_dtype_name
from .errors import ConfigError, ModelError

if TYPE_CHECKING:
    from .io import Checkpoint

log = logging.getLogger(__name__)

# The files of a model folder that describe its tokenizer (copied next to a merged model's weights).
TOKENIZER_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
# What is fetched of a hub model: configs, safetensors weights, tokenizer files (never pickles).
HUB_MODEL_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]

# A PEFT adapter folder
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFETENSORS = "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"


def looks_like_repo_id(text: str) -> bool:
    """`org/name` that is not a local path: fetched from (or found in the cache of) the hub."""
    return text.count("/") == 1 and not text.startswith((".", "/", "~")) and not Path(text).expanduser().exists()


def hub_snapshot(repo_id: str, revision: Optional[str], patterns: list[str], what: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        with _quiet_hub():
            return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as err:  # offline, not found, no permission, cut off: one clear line
        cut = _cut_off_download(err)
        if cut is not None:
            raise ModelError(
                f"{what}: the download of {cut} from the Hugging Face hub was cut off ({_first_line(err)}); "
                "run again to download it (the cache keeps no partial copy that a later run would use)"
            ) from None
        raise ModelError(
            f"{what}: no local directory of that name, and it could not be fetched from the "
            f"Hugging Face hub ({type(err).__name__}: {_first_line(err)})"
        ) from None


def _first_line(err: BaseException) -> str:
    return str(err).splitlines()[0] if str(err) else ""


# The file's bytes stopped before the announced Content-Length (the connection closed, a read
# failed or timed out): the exceptions of huggingface_hub's HTTP client (httpx2, httpx before 2.x).
_CUT_OFF_ERRORS = ("RemoteProtocolError", "ReadError", "ReadTimeout")


def _cut_off_download(err: BaseException) -> Optional[str]:
    """The name of the file whose download ended early, or None for any other error.
    huggingface_hub writes a download to a temporary file of its own and deletes it on such an
    error: no blob, no snapshot link, nothing that a later run would take as the file."""
    if type(err).__module__.split(".")[0] in ("httpx2", "httpx") and type(err).__name__ in _CUT_OFF_ERRORS:
        try:
            where = str(err.request.url).split("?")[0]
        except (AttributeError, RuntimeError):  # no request attached
            return "a file"
    elif isinstance(err, OSError) and str(err).startswith("Consistency check failed"):  # fewer bytes than announced
        found = re.search(r"([^/\s()]+)\)\.?$", _first_line(err))  # "... (<url or file name>)."
        where = found.group(1) if found else ""
    else:
        return None
    return where.rsplit("/", 1)[-1] or "a file"


@contextmanager
def _quiet_hub():
    """huggingface_hub's own output around a download: its retry warnings (several lines each)
    only with -v, since the outcome is reported in one line either way, and no progress bars
    with --quiet. HF_HUB_VERBOSITY, where set, is left alone."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    if not log.isEnabledFor(logging.INFO) and not os.environ.get("HF_HUB_VERBOSITY"):
        hub_log.setLevel(logging.ERROR)
    bars_off = not log.isEnabledFor(logging.WARNING) and not are_progress_bars_disabled()
    if bars_off:
        disable_progress_bars()
    try:
        yield
    finally:
        hub_log.setLevel(level)
        if bars_off:
            enable_progress_bars()


def resolve_model_dir(
    ref: ModelReference,
    lora_merge_cache: Optional[str] = None,
    lora_merge_dtype: Optional[str] = None,
    lazy_unpickle: bool = False,
) -> Path:
    """Local directory of a model reference. A path that does not exist locally is fetched from
    the Hugging Face hub only if it looks like a repo id (`org/name`); offline mode is honoured.
    A `model+lora` reference resolves to the cached merge of the adapter into its base."""
    if ref.lora is not None:
        return _merged_lora_dir(ref, lora_merge_cache, lora_merge_dtype, lazy_unpickle)
    path = Path(ref.model.path).expanduser()
    if path.is_dir():
        return path
    if not looks_like_repo_id(ref.model.path):
        raise ModelError(f"model {ref}: directory not found: {path}")
    return hub_snapshot(ref.model.path, ref.model.revision, HUB_MODEL_PATTERNS, f"model {ref}")


def resolve_adapter_dir(ref: ModelReference, lazy_unpickle: bool = False) -> Path:
    """The folder of `ref`'s LoRA adapter: local, or its files from the hub (cached)."""
    path = Path(ref.lora.path).expanduser()
    if path.is_dir():
        return path
    if not looks_like_repo_id(ref.lora.path):
        raise ModelError(f"LoRA adapter {ref.lora}: directory not found: {path}")
    patterns = [ADAPTER_CONFIG, ADAPTER_SAFETENSORS] + ([ADAPTER_BIN] if lazy_unpickle else [])
    return hub_snapshot(ref.lora.path, ref.lora.revision, patterns, f"LoRA adapter {ref.lora}")


# ----------------------------------------------------------------------------------------------
# `model+lora`: the merge cache


def _crc32(text: str) -> str:
    return f"{zlib.crc32(text.encode('utf-8')):08x}"


def lora_cache_entry_name(ref: ModelReference) -> str:
    """`<basename(model)>_<crc32(model)>_<basename(lora)>_<crc32(lora)>`, mergekit's naming, so
    a cache folder filled by one tool is found by the other."""
    assert ref.lora is not None
    model, lora = str(ref.model), str(ref.lora)
    return f"{Path(ref.model.path).name}_{_crc32(model)}_{Path(ref.lora.path).name}_{_crc32(lora)}"


def lora_cache_dir(ref: ModelReference, cache_dir: Optional[str]) -> Path:
    """Where the merge of `ref`'s adapter into its base is (or will be) kept."""
    if not cache_dir:
        raise ConfigError(
            f"model {ref}: a LoRA adapter must be merged into its base model first; "
            "pass --lora-merge-cache DIR to say where to keep the merged model"
        )
    return Path(cache_dir).expanduser() / lora_cache_entry_name(ref)


def _merged_lora_dir(ref: ModelReference, cache_dir: Optional[str], dtype: Optional[str], lazy_unpickle: bool) -> Path:
    """Folder of `ref`'s base model with its adapter merged in; built on first use, then reused.

    The entry is built in a temporary sibling folder and renamed into place when complete, so an
    interrupted or failed build never leaves a folder that a later run would take as finished."""
    target = lora_cache_dir(ref, cache_dir)
    if target.is_dir():
        log.info("LoRA %s: reusing the merged model in %s", ref, target)
        return target
    try:
        dtype = normalize_dtype_name(dtype)
        if dtype == "int64":
            raise ValueError("LoRAs are applied in a floating-point dtype (bfloat16, float16 or float32)")
    except ValueError as err:
        raise ConfigError(f"--lora-merge-dtype: {err}") from None
    from .io import AtomicOutputDir, copy_files, read_json

    adapter_dir = resolve_adapter_dir(ref, lazy_unpickle)
    adapter_config = read_json(adapter_dir / ADAPTER_CONFIG, f"LoRA adapter {ref.lora}")
    if not isinstance(adapter_config, dict) or "peft_type" not in adapter_config:
        raise ModelError(f"LoRA adapter {ref.lora}: {ADAPTER_CONFIG} is not a PEFT adapter config (no peft_type)")
    weights = _adapter_weights(ref, adapter_dir, lazy_unpickle)
    base_dir = resolve_model_dir(ModelReference(ref.model, None, ref.override_architecture))
    log.info("merging LoRA adapter %s into %s (cached in %s)", ref.lora, ref.model, target)
    from .lora import merge_adapter  # transformers and peft: only when an adapter is merged

    out = AtomicOutputDir(target)
    try:
        merge_adapter(ref, base_dir, adapter_dir / ADAPTER_CONFIG, weights, dtype, out.path)
        copy_files(base_dir, out.path, TOKENIZER_FILES)
        if target.is_dir():  # another run finished the same entry meanwhile: keep theirs
            out.discard()
        else:
            out.commit()
    except BaseException:
        out.discard()
        raise
    return target


def _adapter_weights(ref: ModelReference, adapter_dir: Path, lazy_unpickle: bool) -> Path:
    if (adapter_dir / ADAPTER_SAFETENSORS).is_file():
        return adapter_dir / ADAPTER_SAFETENSORS
    if (adapter_dir / ADAPTER_BIN).is_file():
        if lazy_unpickle:
            return adapter_dir / ADAPTER_BIN
        raise ModelError(
            f"LoRA adapter {ref.lora}: only {ADAPTER_BIN} found; pickle files are read only with "
            "--lazy-unpickle (restricted unpickler)"
        )
    raise ModelError(f"LoRA adapter {ref.lora}: no {ADAPTER_SAFETENSORS} in {adapter_dir}")


# ----------------------------------------------------------------------------------------------
# Opened models


@dataclass
class InputModel:
    """One resolved and opened input: its folder, its config.json and its checkpoint's index."""

    ref: ModelReference
    directory: Path
    config: dict
    checkpoint: "Checkpoint"

    @property
    def label(self) -> str:
        return str(self.ref)


def open_model(
    ref: ModelReference,
    *,
    lazy_unpickle: bool = False,
    lora_merge_cache: Optional[str] = None,
    lora_merge_dtype: Optional[str] = None,
) -> InputModel:
    from .io import Checkpoint, read_json

    directory = resolve_model_dir(ref, lora_merge_cache, lora_merge_dtype, lazy_unpickle)
    model_config = read_json(directory / "config.json", f"model {ref}")
    if ref.override_architecture:
        model_config["architectures"] = [ref.override_architecture]
    return InputModel(ref, directory, model_config, Checkpoint(directory, str(ref), lazy_unpickle))


def open_models(
    refs: Iterable[ModelReference],
    *,
    lazy_unpickle: bool = False,
    lora_merge_cache: Optional[str] = None,
    lora_merge_dtype: Optional[str] = None,
) -> dict[ModelReference, InputModel]:
    """Every reference opened, in order; on any failure the ones already opened are closed."""
    models: dict[ModelReference, InputModel] = {}
    try:
        for ref in refs:
            models[ref] = open_model(
                ref, lazy_unpickle=lazy_unpickle, lora_merge_cache=lora_merge_cache, lora_merge_dtype=lora_merge_dtype
            )
    except BaseException:
        close_models(models)
        raise
    return models


def close_models(models: dict[ModelReference, InputModel]) -> None:
    for m in models.values():
        m.checkpoint.close()
