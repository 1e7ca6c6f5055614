"""Options of a merge run (the `mergekit-yaml` flags), torch-free."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


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

    def resolved_device(self) -> str:
        if self.device == "auto":
            import torch

            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device
