"""The streaming executor behind `mergekit-yaml`: one output tensor at a time, bounded memory.

Three stages overlap: a reader thread loads the next task's inputs while the main thread merges
the current one and a writer thread appends the previous result to its shard. Memory holds the
inputs of about two output tensors and one result; shards are streamed to disk, never buffered.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

import torch

from . import __version__
from .allocator import keep_freed_buffers
from .card import render_card
from .config import MergeConfig
from .io import atomic_model_output, copy_files
from .methods.common import TensorContext
from .options import MergeOptions
from .plan import MergePlan, TensorTask, build_plan
from .sources import TOKENIZER_FILES
from .threads import set_num_threads
from .tokenizer import load_tokenizer, permute_embeddings

log = logging.getLogger(__name__)

def load_task_inputs(plan: MergePlan, task: TensorTask, device: torch.device) -> list[torch.Tensor]:
    def load(inp) -> torch.Tensor:
        x = plan.models[inp.model].checkpoint.map(inp.tensor_name)
        return (x if task.rows is None else x[: task.rows]).to(device=device, dtype=task.math_dtype)

    out = [load(inp) for inp in task.inputs]
    if task.vocab is not None:
        extra = {inp.model: load(inp) for inp in task.aux_inputs}
        out = permute_embeddings(task.vocab, task.out.name, [i.model for i in task.inputs], out, extra)
    return out


def task_context(task: TensorTask, seed: int) -> TensorContext:
    return TensorContext(task.out.name, task.is_embed, seed, [str(i.model) for i in task.inputs])


def compute_task(task: TensorTask, inputs: list[torch.Tensor], seed: int) -> torch.Tensor:
    """Run the task's method on its loaded inputs; shared by every executor."""
    result = task.method.function(inputs, task.base_index, task.params, task.model_params, task_context(task, seed))
    return result.to(task.out.dtype)


def execute_plan(
    plan: MergePlan,
    sink: Callable[[TensorTask, torch.Tensor], None],
    options: MergeOptions,
) -> None:
    device = torch.device(options.resolved_device())
    tasks = plan.tasks
    keep_freed_buffers()  # each step's output reuses the last one's pages (merge_engine/allocator.py)
    progress = None
    if not options.quiet:
        from tqdm import tqdm

        progress = tqdm(total=len(tasks), unit="tensor", desc="merging")
    with ThreadPoolExecutor(1, thread_name_prefix="reader") as reader, ThreadPoolExecutor(
        1, thread_name_prefix="writer"
    ) as writer:
        pending_read: Optional[Future] = reader.submit(load_task_inputs, plan, tasks[0], device) if tasks else None
        pending_write: Optional[Future] = None
        try:
            for i, task in enumerate(tasks):
                inputs = pending_read.result()
                pending_read = reader.submit(load_task_inputs, plan, tasks[i + 1], device) if i + 1 < len(tasks) else None
                result = compute_task(task, inputs, options.random_seed)
                del inputs
                if pending_write is not None:
                    pending_write.result()
                pending_write = writer.submit(sink, task, result)
                del result
                if progress is not None:
                    progress.update(1)
            if pending_write is not None:
                pending_write.result()
        except BaseException:
            for f in (pending_read, pending_write):
                if f is not None:
                    f.cancel()
            raise
        finally:
            if progress is not None:
                progress.close()


def run_merge(
    config: MergeConfig,
    out_path: Path,
    options: MergeOptions,
    config_text: Optional[str] = None,
    card_extra: Optional[str] = None,
) -> Path:
    """Merge into `out_path`, atomically: the folder appears only when everything is written."""
    set_num_threads(options.num_threads)
    plan = build_plan(
        config,
        allow_crimes=options.allow_crimes,
        lazy_unpickle=options.lazy_unpickle,
        lora_merge_cache=options.lora_merge_cache,
        lora_merge_dtype=options.lora_merge_dtype,
        truncate_embeddings=options.unsafe_truncate_embeddings,
    )
    try:
        specs = [t.out for t in plan.tasks]
        with atomic_model_output(out_path, options.overwrite, specs, options.out_shard_size, options.safe_serialization) as (folder, writer):
            execute_plan(plan, lambda task, tensor: writer.write(task.out.name, tensor), options)
            writer.finish(__version__)
            write_model_files(plan, folder, options, config_text, card_extra, Path(out_path))
    finally:
        plan.close()
    log.info("merged model written to %s", out_path)
    return Path(out_path)


def write_model_files(
    plan: MergePlan,
    directory: Path,
    options: MergeOptions,
    config_text: Optional[str],
    card_extra: Optional[str],
    final_path: Path,
) -> None:
    (directory / "config.json").write_text(json.dumps(plan.out_config, indent=2, sort_keys=True) + "\n")
    write_tokenizer(plan, directory, options.copy_tokenizer)
    text = config_text if config_text is not None else plan.config.to_yaml()
    if options.write_model_card:
        (directory / "mergekit_config.yml").write_text(text)
        (directory / "README.md").write_text(render_card(plan.config, text, final_path, card_extra))


def write_tokenizer(plan: MergePlan, directory: Path, copy_tokenizer: bool) -> None:
    """The built tokenizer, else (with --copy-tokenizer) the donor's: its files as they are, or
    re-saved through transformers when a chat template must be set (docs/mergekit-reference.md §4)."""
    donor_dir = plan.models[plan.donor].directory
    tokenizer = None
    if plan.vocab is not None:
        tokenizer = plan.vocab.tokenizer
    elif not copy_tokenizer:
        if plan.chat_template is not None:
            log.warning("chat_template ignored: no tokenizer is written (--no-copy-tokenizer)")
        return
    elif plan.chat_template is not None:
        tokenizer = load_tokenizer(donor_dir, str(plan.donor))
        if tokenizer is None:
            log.warning("chat_template ignored: the donor's tokenizer could not be loaded; copying its files")
    if tokenizer is None:
        copied = copy_files(donor_dir, directory, TOKENIZER_FILES)
        if not any(name in copied for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
            log.warning("donor model %s has no tokenizer files to copy", plan.donor)
        return
    if plan.chat_template is not None:
        tokenizer.chat_template = plan.chat_template
    tokenizer.save_pretrained(str(directory))
    _drop_load_options(directory / "tokenizer_config.json")
    copy_files(donor_dir, directory, ("generation_config.json",))


def _drop_load_options(file: Path) -> None:
    # transformers records how *we* loaded the tokenizer (offline, local); not the merged model's business
    if file.is_file():
        data = json.loads(file.read_text())
        if any(k in data for k in ("is_local", "local_files_only")):
            for k in ("is_local", "local_files_only"):
                data.pop(k, None)
            file.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def merge_file(config_path: Path, out_path: Path, options: MergeOptions) -> Path:
    from .config import load_config

    config, text = load_config(config_path)
    return run_merge(config, out_path, options, config_text=text)


