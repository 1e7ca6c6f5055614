"""Merging a PEFT LoRA adapter into its base model (transformers + peft), for `model+lora` inputs
(docs/mergekit-reference.md §1). `sources` finds the folders, checks the adapter and owns the merge
cache; this module only loads the base, applies the adapter and saves the merged weights into a folder.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Optional

from .config import ModelReference
from .errors import ModelError
from .io import Checkpoint


def _staged_adapter(config_file: Path, weights: Path, staging: Path) -> Path:
    """An adapter folder peft can read: the original, or, for a pickle file, a safetensors copy
    (same name, `.safetensors`) made through the restricted unpickler (peft itself would call
    torch.load)."""
    if weights.suffix == ".safetensors":
        return weights.parent
    from safetensors.torch import save_file

    ckpt = Checkpoint(weights.parent, str(weights.parent), files=[weights])
    try:
        tensors = {name: ckpt.read(name).contiguous() for name in ckpt.tensors}
    finally:
        ckpt.close()
    shutil.copyfile(config_file, staging / config_file.name)
    save_file(tensors, staging / weights.with_suffix(".safetensors").name, metadata={"format": "pt"})
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


def merge_adapter(ref: ModelReference, base_dir: Path, config_file: Path, weights: Path, dtype: Optional[str], out: Path) -> None:
    """Save into `out` the model of `base_dir` with the adapter (`config_file`, `weights`) merged
    in, in `dtype` (None: the base's own). An adapter that does not fit the base is a ModelError."""
    with _quiet_transformers():
        _merge(ref, base_dir, config_file, weights, dtype, out)


def _merge(ref: ModelReference, base_dir: Path, config_file: Path, weights: Path, dtype: Optional[str], out: Path) -> None:
    import torch
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    try:
        base = AutoModelForCausalLM.from_pretrained(
            base_dir, dtype=getattr(torch, dtype) if dtype else "auto", trust_remote_code=False
        )
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ModelError(f"model {ref.model}: transformers cannot load it to apply LoRA {ref.lora}: {_first_line(err)}") from None
    with tempfile.TemporaryDirectory(prefix=".adapter-", dir=out) as staging:
        source = _staged_adapter(config_file, weights, Path(staging))
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
