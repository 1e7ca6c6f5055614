"""A search worker: one resident model, merged in place per candidate, then scored.

`CandidateWorker` is plain Python; the search runs it as a Ray actor (one per GPU, or
`--num-workers` on CPU). A candidate that fails (non-finite weights, an evaluator error) comes
back as a failed result with its reason: it never raises into the driver.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Optional

log = logging.getLogger(__name__)


@dataclass
class WorkerSettings:
    template_recipe: dict  # a decoded recipe: fixes the models, method and layer layout
    tasks: list[dict]  # TaskSpec fields
    include_paths: list[str] = field(default_factory=list)
    limit: Optional[int] = None
    num_fewshot: Optional[int] = None
    shuffle: bool = False
    seed: int = 0
    apply_chat_template: bool = False
    fewshot_as_multiturn: bool = False
    batch_size: int = 16
    device: str = "auto"
    merge_seed: int = 0
    allow_crimes: bool = False
    lora_merge_cache: Optional[str] = None
    lora_merge_dtype: Optional[str] = None
    eval_dtype: Optional[str] = None  # None: float32 on CPU (bf16 maths is slow there), bfloat16 on GPU
    threads: Optional[int] = None


@dataclass
class CandidateResult:
    status: str  # "complete" | "failed"
    metrics: dict
    merge_s: float
    eval_s: float
    recomputed: int = 0
    error: Optional[str] = None
    worker: str = ""


class CandidateWorker:
    def __init__(self, settings: WorkerSettings):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        import torch
        from transformers import AutoTokenizer

        from evaluators.lm_eval_tasks import LMEvalEvaluator, TaskSpec
        from merge_engine.config import parse_config
        from merge_engine.options import MergeOptions
        from merge_engine.resident import ResidentMerger

        if settings.threads:
            torch.set_num_threads(settings.threads)
        self.settings = settings
        options = MergeOptions(
            device=settings.device, random_seed=settings.merge_seed, allow_crimes=settings.allow_crimes, quiet=True,
            lora_merge_cache=settings.lora_merge_cache, lora_merge_dtype=settings.lora_merge_dtype,
        )
        template = parse_config(settings.template_recipe, "search template")
        self.merger = ResidentMerger(template, options)
        device = self.merger.device
        if settings.eval_dtype:
            dtype = getattr(torch, settings.eval_dtype)
        else:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.model = self.merger.build_model(template, dtype=dtype)
        # Read every input and form the task vectors now, at start-up, not inside the first
        # candidate's time: the starting recipe uses every model the search will.
        self.merger.apply(template)
        # with tokenizer merging the candidates are run with the merged tokenizer, else the donor's
        vocab = self.merger.vocab(template)
        if vocab is not None and vocab.tokenizer is not None:
            self.tokenizer = vocab.tokenizer
        else:
            self.tokenizer = AutoTokenizer.from_pretrained(self.merger.models[self.merger.donor].directory)
        self.evaluator = LMEvalEvaluator(
            [TaskSpec(**t) for t in settings.tasks],
            include_paths=settings.include_paths,
            limit=settings.limit,
            num_fewshot=settings.num_fewshot,
            shuffle=settings.shuffle,
            seed=settings.seed,
            apply_chat_template=settings.apply_chat_template,
            fewshot_as_multiturn=settings.fewshot_as_multiturn,
            batch_size=settings.batch_size,
        )
        self.evaluator.attach(self.model, self.tokenizer)
        self.name = f"{os.uname().nodename}:{os.getpid()}"

    def directions(self) -> dict[str, str]:
        return dict(self.evaluator.directions)

    def evaluate(self, recipe: dict) -> dict:
        from merge_engine.config import parse_config

        start = time.perf_counter()
        merge_s = 0.0
        try:
            config = parse_config(recipe, "candidate")
            stats = self.merger.apply(config, check_finite=True)
            merge_s = time.perf_counter() - start
            t_eval = time.perf_counter()
            metrics = self.evaluator.evaluate()
            eval_s = time.perf_counter() - t_eval
            return asdict(CandidateResult("complete", metrics, merge_s, eval_s, stats.recomputed, worker=self.name))
        except Exception as err:  # a failed candidate is data, not a crash
            log.debug("candidate failed: %s", traceback.format_exc())
            return asdict(
                CandidateResult(
                    "failed", {}, merge_s, time.perf_counter() - start - merge_s,
                    error=f"{type(err).__name__}: {err}", worker=self.name,
                )
            )
