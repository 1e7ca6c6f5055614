"""What one run of `mergekit-evolve` is asked beyond the search config: the command line's options."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

from merge_engine.options import MergeOptions


@dataclass
class EvolveOptions:
    storage_path: Path
    # the merge flags (merge_engine.options): the workers' resident merges and the export use them
    merge: MergeOptions = field(default_factory=lambda: MergeOptions(device="auto"))
    resume: bool = False
    num_workers: Optional[int] = None
    ray_address: Optional[str] = None
    task_search_path: list[str] = field(default_factory=list)
    save_final_model: bool = True
    batch_size: int = 16
    allow_benchmark_tasks: bool = False
    candidate_timeout: Optional[float] = None  # seconds; a candidate running longer is cancelled
    gpus_per_worker: Optional[float] = None  # None: 1 when the cluster has GPUs (and --device allows)
    cpus_per_worker: float = 1.0

    @property
    def quiet(self) -> bool:
        return self.merge.quiet

    @property
    def device(self) -> str:
        return self.merge.device

    @property
    def lora_cache(self) -> str:
        return str(self.merge.lora_merge_cache or Path(self.storage_path) / "lora_merge_cache")

    def merge_options(self, **extra):
        """What a worker or the export merges with: progress bars off, the LoRA cache resolved."""
        return replace(self.merge, quiet=True, lora_merge_cache=self.lora_cache, **extra)
