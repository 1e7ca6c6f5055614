"""Options of a merge run (the `mergekit-yaml` flags), torch-free."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


def parse_size(text: str) -> int:
    """`5B`, `500M`, `100k` or a plain integer; suffixes are powers of ten (mergekit's rule)."""
    s = str(text).strip().lower()
    mult = {"k": 10**3, "m": 10**6, "b": 10**9}
    try:
        if s and s[-1] in mult:
            return int(float(s[:-1]) * mult[s[-1]])
        return int(s)
    except ValueError:
        raise ValueError(f"invalid size {text!r} (use e.g. 5B, 500M, 100k or a byte count)") from None


@dataclass
class MergeOptions:
    device: str = "cpu"  # math device: cpu, cuda, cuda:N, auto
    out_shard_size: int = 5_000_000_000  # bytes
    copy_tokenizer: bool = True
    allow_crimes: bool = False
    random_seed: int = 0  # seeds random methods per (seed, output tensor name)
    lazy_unpickle: bool = False
    write_model_card: bool = True
    safe_serialization: bool = True
    quiet: bool = False
    read_to_gpu: bool = False
    low_cpu_memory: bool = False
    num_threads: Optional[int] = None
    overwrite: bool = False
    trust_remote_code: bool = False
    lora_merge_cache: Optional[str] = None  # where model+lora inputs are merged and kept
    lora_merge_dtype: Optional[str] = None  # dtype for applying LoRAs (None: the base's)

    def resolved_device(self) -> str:
        if self.device == "auto":
            import torch

            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device
