"""`mergekit-extract-lora --model FT --base-model BASE --out-path DIR`: a PEFT LoRA adapter from the
difference between a fine-tune and its base (docs/mergekit-reference.md §7).

Module by module: read the two weights, take the truncated SVD of their difference in float32, spill
the factors to a scratch file, and at the end copy them into `adapter_model.safetensors`. Memory holds
a few weight matrices at a time, never a whole model (ranks are only known after each SVD, so the
final file's header cannot be written up front).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import click

from .cli import apply_environment, console, run_cli, setup_logging
from .options import NO_EFFECT, merge_options, options_from_flags
from .errors import ConfigError, ModelError

_SVD_NAMES = ("EXACT_SVD_SHARE", "POWER_ITERATIONS", "top_singular_triplets")


def __getattr__(name: str):
    """The SVD's names, re-exported from methods.svd on first use (it imports torch; --help must not)."""
    if name in _SVD_NAMES:
        from .methods import svd

        return getattr(svd, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


log = logging.getLogger(__name__)

_INPUT_EMBED_KEYS = ("embed_tokens", "wte", "embed_in", "word_embeddings", "wpe", "position_embeddings")
_OUTPUT_EMBED_KEYS = ("lm_head", "embed_out")


@dataclass
class Module:
    name: str  # module path, e.g. model.layers.0.self_attn.q_proj
    kind: str  # "linear", "conv1d" (GPT-2's transposed linear), "embedding" or "other" (norms, convolutions: saved whole)
    tensors: list[str] = field(default_factory=list)  # its checkpoint tensors (weight first)

    @property
    def leaf(self) -> str:
        return self.name.rsplit(".", 1)[-1]


def _modules(names: dict, transposed: set[str] = frozenset()) -> list[Module]:
    """Modules of a checkpoint from its tensor names and shapes (a 2-D weight is a linear layer unless
    it is an embedding, or a `conv1d` one when its weight is in `transposed`); order follows the
    checkpoint."""
    mods: dict[str, Module] = {}
    for name, loc in names.items():
        if not loc.dtype.is_floating_point or not name.endswith((".weight", ".bias")):
            continue
        mod, _, suffix = name.rpartition(".")
        m = mods.setdefault(mod, Module(mod, "other"))
        if suffix == "weight":
            m.tensors.insert(0, name)
            leaf = mod.rsplit(".", 1)[-1]
            if len(loc.shape) == 2:
                m.kind = "embedding" if leaf in _INPUT_EMBED_KEYS else "conv1d" if name in transposed else "linear"
        else:
            m.tensors.append(name)
    return [m for m in mods.values() if m.tensors and m.tensors[0].endswith(".weight")]


@dataclass
class Spilled:
    """One output tensor: bytes in the scratch file, or a tensor copied whole from the fine-tune."""

    name: str
    shape: tuple
    dtype: object
    offset: int = -1
    source: Optional[str] = None


def check_regexes(include_regexes: tuple, exclude_regexes: tuple) -> None:
    for flag, patterns in (("--include-regex", include_regexes), ("--exclude-regex", exclude_regexes)):
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ConfigError(f"{flag} {pattern!r}: not a valid regular expression ({err})") from None


def extract_lora(
    model: str,
    base_model: str,
    out_path: Path,
    max_rank: int = 128,
    distribute_scale: bool = True,
    embed_lora: bool = False,
    save_modules: tuple = (),
    include_regexes: tuple = (),
    exclude_regexes: tuple = (),
    sv_epsilon: float = 0.0,
    skip_undecomposable: bool = False,
    device: str = "cpu",
    lora_merge_cache: Optional[str] = None,
    lora_merge_dtype: Optional[str] = None,
    lazy_unpickle: bool = False,
    safe_serialization: bool = True,
    overwrite: bool = False,
    quiet: bool = False,
    command_line: Optional[str] = None,
    write_model_card: bool = True,
) -> dict:
    """Write the adapter to `out_path` (atomically); returns the adapter config."""
    check_regexes(include_regexes, exclude_regexes)
    import torch
    from tqdm import tqdm

    from .architecture import transposed_weights
    from .config import ModelReference
    from .io import AtomicOutputDir, OutputTensorSpec, ShardedWriter
    from .sources import open_model

    ft_ref, base_ref = ModelReference.parse(model), ModelReference.parse(base_model)
    opening = dict(lazy_unpickle=lazy_unpickle, lora_merge_cache=lora_merge_cache, lora_merge_dtype=lora_merge_dtype)
    ft_model = open_model(ft_ref, **opening)
    ft_config = ft_model.config
    ft = ft_model.checkpoint
    base = open_model(base_ref, **opening).checkpoint
    dev = torch.device(device)

    # which weights are stored [in, out]: from the architecture description (cached on disk, so
    # transformers is imported only the first time a model class is seen)
    modules = _modules(ft.tensors, transposed_weights(ft_config, ft.tensors))
    for m in modules:
        for t in m.tensors:
            if t not in base:
                raise ModelError(f"base model {base_ref}: tensor {t} of the fine-tune is missing")

    def shape_mismatch(m: Module) -> Optional[str]:
        return next((t for t in m.tensors if ft.tensors[t].shape != base.tensors[t].shape), None)

    vocab_differs = any(m.kind == "embedding" and shape_mismatch(m) for m in modules)
    if vocab_differs and embed_lora:
        log.warning("the vocabulary sizes differ: --embed-lora is turned off, embeddings are saved whole")
        embed_lora = False

    def selected(m: Module) -> bool:
        if include_regexes and not any(re.search(r, m.name) for r in include_regexes):
            return False
        return not any(re.search(r, m.name) for r in exclude_regexes)

    to_save = list(dict.fromkeys(save_modules))
    if not embed_lora:
        for m in modules:
            if (m.kind == "embedding" or m.leaf in _OUTPUT_EMBED_KEYS) and selected(m) and m.leaf not in to_save:
                to_save.append(m.leaf)
    for m in modules:
        if m.leaf in to_save or m.name in to_save:
            continue
        if selected(m) and m.kind != "other" and shape_mismatch(m):
            t = shape_mismatch(m)
            raise ModelError(
                f"tensor {t}: fine-tune {ft_ref} has shape {list(ft.tensors[t].shape)}, base {base_ref} has "
                f"{list(base.tensors[t].shape)} (is {base_ref} really the base of {ft_ref}?)"
            )

    def changed(m: Module) -> bool:
        return any(
            ft.tensors[t].shape != base.tensors[t].shape or not torch.equal(ft.read(t), base.read(t)) for t in m.tensors
        )

    # Undecomposable modules (norms, ...) are saved whole, all modules of a name alike (PEFT wraps them
    # by name), but only where one of them changed.
    others: dict[str, list[Module]] = {}
    for m in modules:
        if m.kind == "other" and selected(m) and m.leaf not in to_save and m.name not in to_save:
            others.setdefault(m.leaf, []).append(m)
    for leaf, group in others.items():
        if any(changed(m) for m in group):
            if skip_undecomposable:
                log.warning(f"{leaf}: changed but cannot be decomposed; skipped (--skip-undecomposable)")
            else:
                to_save.append(leaf)

    out = AtomicOutputDir(Path(out_path), overwrite=overwrite)
    try:
        scratch_path = out.path / ".factors.scratch"
        spilled: list[Spilled] = []
        ranks: dict[str, int] = {}
        targets: list[str] = []
        bias_deltas = False
        with open(scratch_path, "wb") as scratch:

            def spill(name: str, tensor) -> None:
                tensor = tensor.detach().to("cpu").contiguous()
                spilled.append(Spilled(name, tuple(tensor.shape), tensor.dtype, offset=scratch.tell()))
                if tensor.numel():
                    scratch.write(tensor.view(torch.uint8).numpy().data if tensor.dim() else tensor.reshape(1).view(torch.uint8).numpy().data)

            todo = [m for m in modules if m.leaf in to_save or m.name in to_save or (selected(m) and m.kind != "other")]
            for m in tqdm(todo, desc="extracting", unit="module", disable=quiet):
                prefix = f"base_model.model.{m.name}"
                if m.leaf in to_save or m.name in to_save:
                    for t in m.tensors:
                        loc = ft.tensors[t]
                        spilled.append(Spilled(f"base_model.model.{t}", loc.shape, loc.dtype, source=t))
                    continue
                w_ft = ft.read(m.tensors[0])
                delta = w_ft.to(dev, torch.float32) - base.read(m.tensors[0]).to(dev, torch.float32)
                if m.kind in ("embedding", "conv1d"):
                    # PEFT's embedding factors: B [H, r] @ A [r, V] = delta^T; a Conv1D weight is [in, out]
                    # and PEFT (fan_in_fan_out) applies (B @ A)^T to it, B [out, r], A [r, in]
                    delta = delta.T
                a, b = low_rank_factors(delta, max_rank, sv_epsilon, distribute_scale)
                del delta
                ranks[m.name] = a.shape[0]
                if m.leaf not in targets:
                    targets.append(m.leaf)
                if m.kind == "embedding":
                    spill(f"{prefix}.lora_embedding_A", a.to(w_ft.dtype))
                    spill(f"{prefix}.lora_embedding_B", b.to(w_ft.dtype))
                else:
                    spill(f"{prefix}.lora_A.weight", a.to(w_ft.dtype))
                    spill(f"{prefix}.lora_B.weight", b.to(w_ft.dtype))
                    if len(m.tensors) > 1:  # a bias: its delta goes to lora_B's bias
                        bias_deltas = True
                        spill(f"{prefix}.lora_B.bias", (ft.read(m.tensors[1]).float() - base.read(m.tensors[1]).float()).to(w_ft.dtype))
            if bias_deltas:  # with lora_bias every LoRA linear layer has a bias in PEFT: zeros where none
                have = {s.name for s in spilled}
                for m in modules:
                    name = f"base_model.model.{m.name}.lora_B.bias"
                    if m.name in ranks and m.kind in ("linear", "conv1d") and name not in have:
                        out_dim = ft.tensors[m.tensors[0]].shape[0 if m.kind == "linear" else 1]
                        spill(name, torch.zeros(out_dim, dtype=ft.tensors[m.tensors[0]].dtype))
        if not ranks and not to_save:
            raise ModelError("nothing to extract: no module is selected (check --include-regex/--exclude-regex)")

        specs = [OutputTensorSpec(s.name, tuple(s.shape), s.dtype) for s in spilled]
        writer = ShardedWriter(out.path, specs, 0, safe_serialization, base_name="adapter_model")
        fd = os.open(scratch_path, os.O_RDONLY)
        try:
            for s in spilled:
                if s.source is not None:
                    writer.write(s.name, ft.read(s.source))
                    continue
                spec = OutputTensorSpec(s.name, tuple(s.shape), s.dtype)
                raw = os.pread(fd, spec.nbytes, s.offset) if spec.nbytes else b""
                buf = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
                writer.write(s.name, buf.view(s.dtype).reshape(s.shape))
            writer.finish("evomerge")
        finally:
            os.close(fd)
            writer.abort()
        scratch_path.unlink()

        r = max(ranks.values(), default=max_rank)
        pattern = {name: rank for name, rank in ranks.items() if rank != r}
        adapter_config = {
            "base_model_name_or_path": base_model,
            "peft_type": "LORA",
            "use_rslora": False,
            "target_modules": targets,
            "modules_to_save": to_save or None,
            "task_type": "CAUSAL_LM",
            "r": r,
            "lora_alpha": r,  # scaling alpha / r = 1: B @ A is the delta itself
            "rank_pattern": pattern,
            "alpha_pattern": dict(pattern),
            "lora_dropout": 0.0,
            # PEFT transposes the product for Conv1D targets; for an nn.Linear target it turns this off itself
            "fan_in_fan_out": any(m.kind == "conv1d" and m.name in ranks for m in modules),
            "inference_mode": True,
            "lora_bias": bias_deltas,
        }
        (out.path / "adapter_config.json").write_text(json.dumps(adapter_config, indent=4))
        if write_model_card:
            (out.path / "README.md").write_text(
                render_lora_card(ft_ref, base_ref, Path(out_path), vocab_differs, command_line or "mergekit-extract-lora ...")
            )
        out.commit()
    except BaseException:
        out.discard()
        raise
    finally:
        ft.close()
        base.close()
    return adapter_config


def low_rank_factors(delta, max_rank: int, sv_epsilon: float, distribute_scale: bool):
    """(A [r, in], B [out, r]) with B @ A the best rank-r approximation of `delta` (float32)."""
    from .methods.svd import top_singular_triplets

    u, s, vh = top_singular_triplets(delta.float(), max_rank)
    r = s.numel()
    if sv_epsilon > 0:
        r = max(1, min(r, int((s > sv_epsilon).sum())))  # rank 1 (near zero) keeps PEFT's layout uniform
    u, s, vh = u[:, :r], s[:r], vh[:r]
    if distribute_scale:
        root = s.sqrt()
        return root[:, None] * vh, u * root[None, :]
    return s[:, None] * vh, u


def render_lora_card(ft_ref, base_ref, out_dir: Path, vocab_differs: bool, command_line: str) -> str:
    from .card import card_header, render_model

    lines = [
        *card_header([ft_ref, base_ref], "peft", ["mergekit", "peft", "evomerge"], out_dir),
        f"This LoRA adapter was extracted from {render_model(ft_ref)} and uses {render_model(base_ref)} as a base.",
        "",
    ]
    if vocab_differs:
        lines += [
            "The two models have different vocabulary sizes: the embeddings are saved whole, so resize the "
            "base model's token embeddings to the fine-tune's vocabulary (`model.resize_token_embeddings(n)`) "
            "before loading this adapter.",
            "",
        ]
    lines += ["## Parameters", "", "The following command was used to extract this LoRA adapter:", "", "```sh", command_line, "```", ""]
    return "\n".join(lines)


# The shared merge flags, as extract-lora reads them; those only a merge needs are accepted and
# say so.
_UNUSED = {
    "allow_crimes": "the two models are compared tensor by tensor, never merged",
    "unsafe_truncate_embeddings": "the two models are compared tensor by tensor, never merged",
    "out_shard_size": "the adapter is one unsharded file",
    "copy_tokenizer": "an adapter carries no tokenizer",
    "random_seed": "the SVDs are deterministic",
    "clone_tensors": "the adapter is written once, at the end",
    "async_write": "the adapter is written once, at the end",
    "write_threads": "the adapter is written once, at the end",
    "low_cpu_memory": "memory holds a few weight matrices at a time",
    "read_to_gpu": "each weight goes to the SVD device as it is read",
    "multi_gpu": "one device is used",
}
EXTRACT_FLAGS = {
    "device": {"help": "Device for the SVDs: cpu, cuda, cuda:N (default cpu, or cuda with --cuda)."},
    "cuda": {"help": "Same as --device cuda."},
    "lora_merge_cache": {"help": "Folder where model+lora inputs are merged once and kept."},
    "lora_merge_dtype": {"help": "dtype for applying input LoRAs."},
    "lazy_unpickle": {"help": "Allow pytorch_model.bin inputs (restricted unpickler)."},
    "safe_serialization": {"help": "adapter_model.safetensors (default) or adapter_model.bin."},
    "overwrite": {"help": "Replace an existing non-empty output folder once the new one is complete."},
    "write_model_card": {"help": "Write README.md (the adapter's model card)."},
    "num_threads": {"help": "torch threads for the SVDs."},
    **{name: {"help": f"{NO_EFFECT}: {why}."} for name, why in _UNUSED.items()},
}


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", required=True, help="The fine-tuned model (directory, hub id, or model+lora).")
@click.option("--base-model", required=True, help="The base model the fine-tune started from.")
@click.option("--out-path", required=True, type=click.Path(file_okay=False), help="Output folder for the adapter.")
@click.option("--max-rank", type=click.IntRange(min=1), default=128, show_default=True, help="Largest rank of a LoRA module.")
@click.option("--distribute-scale/--no-distribute-scale", default=True, help="Split the singular values as sqrt(S) on A and B (default), or put them all on A.")
@click.option("--embed-lora/--no-embed-lora", default=False, help="Decompose embeddings too (default: save them whole).")
@click.option("--save-module", "save_modules", multiple=True, help="Module name (or last name component) to save at full rank; repeatable.")
@click.option("-i", "--include-regex", "include_regexes", multiple=True, help="Only modules whose name matches (re.search); repeatable.")
@click.option("-e", "--exclude-regex", "exclude_regexes", multiple=True, help="Skip modules whose name matches (re.search); repeatable.")
@click.option("--sv-epsilon", type=click.FloatRange(min=0), default=0.0, show_default=True, help="Drop singular values at or below this.")
@click.option("--skip-undecomposable/--no-skip-undecomposable", default=False, help="Skip changed modules that cannot be decomposed (norms) instead of saving them whole.")
@merge_options(overrides=EXTRACT_FLAGS)
def main(model, base_model, out_path, max_rank, distribute_scale, embed_lora, save_modules, include_regexes,
         exclude_regexes, sv_epsilon, skip_undecomposable, **kw) -> None:
    """Extract a PEFT LoRA adapter from the difference between MODEL and BASE_MODEL."""
    setup_logging(kw["verbose"], kw["quiet"])
    apply_environment(kw)
    command_line = shlex.join(["mergekit-extract-lora", *sys.argv[1:]])

    def action() -> None:
        from .cli import check_device
        from .threads import set_num_threads

        check_regexes(include_regexes, exclude_regexes)
        options = options_from_flags(kw)
        check_device(options)
        set_num_threads(options.num_threads)
        extract_lora(
            model, base_model, Path(out_path), max_rank=max_rank, distribute_scale=distribute_scale,
            embed_lora=embed_lora, save_modules=save_modules, include_regexes=include_regexes,
            exclude_regexes=exclude_regexes, sv_epsilon=sv_epsilon, skip_undecomposable=skip_undecomposable,
            device=options.resolved_device(), lora_merge_cache=options.lora_merge_cache,
            lora_merge_dtype=options.lora_merge_dtype, lazy_unpickle=options.lazy_unpickle,
            safe_serialization=options.safe_serialization, overwrite=options.overwrite, quiet=options.quiet,
            write_model_card=options.write_model_card, command_line=command_line,
        )
        if not options.quiet:
            click.echo(f"LoRA adapter written to {out_path}")

    run_cli(kw["verbose"], action)


console_main = console(main)

if __name__ == "__main__":
    console_main()
