"""`model+lora` inputs (docs/mergekit-reference.md §1): the PEFT adapter is merged into its base model once, and the
result is cached as an ordinary model folder that the merge then reads like any other input.

The cache entry is built in a temporary sibling folder and renamed into place when complete, so an
interrupted or failed build never leaves a folder that a later run would take as finished.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import warnings
import zlib
from pathlib import Path
from typing import Optional

from .config import ModelReference, normalize_dtype_name
from .errors import ConfigError, ModelError
from .io import AtomicOutputDir, Checkpoint, copy_files, hub_snapshot, looks_like_repo_id, read_json, resolve_model_dir

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFETENSORS = "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"


def _crc32(text: str) -> str:
    return f"{zlib.crc32(text.encode('utf-8')):08x}"


def cache_entry_name(ref: ModelReference) -> str:
    """`<basename(model)>_<crc32(model)>_<basename(lora)>_<crc32(lora)>`, mergekit's naming, so
    a cache folder filled by one tool is found by the other."""
    assert ref.lora is not None
    model, lora = str(ref.model), str(ref.lora)
    return f"{Path(ref.model.path).name}_{_crc32(model)}_{Path(ref.lora.path).name}_{_crc32(lora)}"


def materialize_lora(
    ref: ModelReference,
    cache_dir: Optional[str],
    dtype: Optional[str] = None,
    lazy_unpickle: bool = False,
) -> Path:
    """Folder of `ref`'s base model with its adapter merged in; built on first use, then reused."""
    if ref.lora is None:
        raise ValueError("not a LoRA reference")
    if not cache_dir:
        raise ConfigError(
            f"model {ref}: a LoRA adapter must be merged into its base model first; "
            "pass --lora-merge-cache DIR to say where to keep the merged model"
        )
    target = Path(cache_dir).expanduser() / cache_entry_name(ref)
    if target.is_dir():
        log.info("LoRA %s: reusing the merged model in %s", ref, target)
        return target
    try:
        dtype = normalize_dtype_name(dtype)
        if dtype == "int64":
            raise ValueError("LoRAs are applied in a floating-point dtype (bfloat16, float16 or float32)")
    except ValueError as err:
        raise ConfigError(f"--lora-merge-dtype: {err}") from None
    adapter_dir = _adapter_dir(ref, lazy_unpickle)
    adapter_config = read_json(adapter_dir / ADAPTER_CONFIG, f"LoRA adapter {ref.lora}")
    if not isinstance(adapter_config, dict) or "peft_type" not in adapter_config:
        raise ModelError(f"LoRA adapter {ref.lora}: {ADAPTER_CONFIG} is not a PEFT adapter config (no peft_type)")
    weights = _adapter_weights(ref, adapter_dir, lazy_unpickle)
    base_dir = resolve_model_dir(ModelReference(ref.model, None, ref.override_architecture))
    log.info("merging LoRA adapter %s into %s (cached in %s)", ref.lora, ref.model, target)
    out = AtomicOutputDir(target)
    try:
        with _quiet_transformers():
            _build(ref, base_dir, adapter_dir, weights, dtype, out.path)
        if target.is_dir():  # another run finished the same entry meanwhile: keep theirs
            out.discard()
        else:
            out.commit()
    except BaseException:
        out.discard()
        raise
    return target


def _adapter_dir(ref: ModelReference, lazy_unpickle: bool) -> Path:
    path = Path(ref.lora.path).expanduser()
    if path.is_dir():
        return path
    if not looks_like_repo_id(ref.lora.path):
        raise ModelError(f"LoRA adapter {ref.lora}: directory not found: {path}")
    patterns = [ADAPTER_CONFIG, ADAPTER_SAFETENSORS] + ([ADAPTER_BIN] if lazy_unpickle else [])
    return hub_snapshot(ref.lora.path, ref.lora.revision, patterns, f"LoRA adapter {ref.lora}")


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


def _staged_adapter(adapter_dir: Path, weights: Path, staging: Path) -> Path:
    """An adapter folder peft can read: the original, or, for a pickle file, a safetensors copy
    made through the restricted unpickler (peft itself would call torch.load)."""
    if weights.suffix == ".safetensors":
        return adapter_dir
    from safetensors.torch import save_file

    ckpt = Checkpoint(adapter_dir, str(adapter_dir), files=[weights])
    try:
        tensors = {name: ckpt.read(name).contiguous() for name in ckpt.tensors}
    finally:
        ckpt.close()
    shutil.copyfile(adapter_dir / ADAPTER_CONFIG, staging / ADAPTER_CONFIG)
    save_file(tensors, staging / ADAPTER_SAFETENSORS, metadata={"format": "pt"})
    return staging


def _first_line(err: BaseException) -> str:
    """The informative line of an error: torch's load_state_dict puts a title line first."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading state_dict"):
        lines = lines[1:]
    return lines[0] if lines else type(err).__name__


@contextlib.contextmanager
def _quiet_transformers():
    """No loading bars or deprecation chatter from transformers/peft: a failed build must still
    end in one line on stderr, and progress here is reported by our own log line."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _build(ref: ModelReference, base_dir: Path, adapter_dir: Path, weights: Path, dtype: Optional[str], out: Path) -> None:
    import torch
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    from .streaming import TOKENIZER_FILES

    try:
        base = AutoModelForCausalLM.from_pretrained(
            base_dir, dtype=getattr(torch, dtype) if dtype else "auto", trust_remote_code=False
        )
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ModelError(f"model {ref.model}: transformers cannot load it to apply LoRA {ref.lora}: {_first_line(err)}") from None
    with tempfile.TemporaryDirectory(prefix=".adapter-", dir=out) as staging:
        source = _staged_adapter(adapter_dir, weights, Path(staging))
        try:
            peft_config = PeftConfig.from_pretrained(str(source))
            peft_config.inference_mode = True
            model = PeftModel(base, peft_config)
            result = model.load_adapter(str(source), adapter_name="default")
        except (ValueError, RuntimeError, KeyError, TypeError) as err:
            # target modules the base lacks, shape mismatches: an adapter made for another model
            raise ModelError(f"LoRA adapter {ref.lora} does not fit model {ref.model}: {_first_line(err)}") from None
    for kind, keys in (("no weights for", result.missing_keys), ("no place for its tensor", result.unexpected_keys)):
        if keys:
            raise ModelError(
                f"LoRA adapter {ref.lora} does not fit model {ref.model}: {kind} {keys[0]}"
                + (f" (and {len(keys) - 1} more)" if len(keys) > 1 else "")
            )
    merged = model.merge_and_unload()
    merged.save_pretrained(out)
    copy_files(base_dir, out, TOKENIZER_FILES)
