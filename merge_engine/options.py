"""Options of a merge run, declared once (torch-free).

Every field of `MergeOptions` carries its command-line flag (declarations, help, the flag's
default). `merge_options()` generates the click options from them for every command that runs a
merge or reads models (`mergekit-yaml`, `mergekit-multi`, `mergekit-moe`, `mergekit-extract-lora`,
`mergekit-evolve`), and `options_from_flags()` turns the parsed flags back into one `MergeOptions`.
A command may change a flag's help or default (`overrides`) and adds its own flags beside them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Optional

NO_EFFECT = "(accepted for compatibility; no effect here)"


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


_FIELD_DEFAULT = object()  # marker: the flag's default is the field's


@dataclass(frozen=True)
class Flag:
    """How one MergeOptions field appears on the command line."""

    decls: tuple[str, ...]  # click declarations: "--copy-tokenizer/--no-copy-tokenizer", "-j", ...
    help: str
    # the flag's default where it differs from the field's (device: None = resolved from --cuda)
    default: Any = _FIELD_DEFAULT
    kind: Optional[str] = None  # None (from the default), "size", "lora_dtype", "path", "threads", "count", "flag"
    show_default: bool = False


def _opt(value, *decls: str, help: str, **flag) -> Any:
    """A field with default `value` and its flag (`flag`: Flag's other fields)."""
    return field(default=value, metadata={"flag": Flag(tuple(decls), help, **flag)})


@dataclass
class MergeOptions:
    allow_crimes: bool = _opt(False, "--allow-crimes/--no-allow-crimes", help="Allow merging models of different architectures.")
    transformers_cache: Optional[str] = _opt(None, "--transformers-cache", kind="path", help="Hugging Face cache directory for hub models.")
    lora_merge_cache: Optional[str] = _opt(  # where model+lora inputs are merged and kept
        None, "--lora-merge-cache", kind="path",
        help="Folder where each model+LoRA input is merged once and kept for reuse (needed for LoRA inputs).")
    lora_merge_dtype: Optional[str] = _opt(  # dtype for applying LoRAs (None: the base's)
        None, "--lora-merge-dtype", kind="lora_dtype",
        help="dtype for applying LoRAs: bfloat16, float16 or float32 (default: the base model's).")
    cuda: bool = _opt(False, "--cuda/--no-cuda", help="Do the merge maths on CUDA (same as --device cuda).")
    device: str = _opt(  # math device: cpu, cuda, cuda:N, auto
        "cpu", "--device", default=None,
        help="Math device: cpu, cuda, cuda:N or auto (default cpu, or cuda with --cuda).")
    low_cpu_memory: bool = _opt(
        False, "--low-cpu-memory/--no-low-cpu-memory",
        help=f"Keep results on the math device. {NO_EFFECT}: memory is bounded by design.")
    out_shard_size: int = _opt(  # bytes
        5_000_000_000, "--out-shard-size", default="5B", kind="size",
        help="Maximum shard size in bytes; suffixes k/M/B are powers of ten (default 5B).")
    copy_tokenizer: bool = _opt(True, "--copy-tokenizer/--no-copy-tokenizer", help="Copy the tokenizer files of the base (or first) model.")
    clone_tensors: bool = _opt(
        False, "--clone-tensors/--no-clone-tensors",
        help=f"Clone tensors before saving. {NO_EFFECT}: every output is written from its own buffer.")
    trust_remote_code: bool = _opt(
        False, "--trust-remote-code/--no-trust-remote-code",
        help=f"Allow custom model code. {NO_EFFECT}: merges never run model code.")
    random_seed: int = _opt(  # seeds random methods per (seed, output tensor name)
        0, "--random-seed", show_default=True,
        help="Seed of random methods (DARE); each tensor draws from (seed, tensor name).")
    lazy_unpickle: bool = _opt(False, "--lazy-unpickle/--no-lazy-unpickle", help="Allow pytorch_model.bin inputs, read through a restricted unpickler.")
    write_model_card: bool = _opt(True, "--write-model-card/--no-write-model-card", help="Write README.md and mergekit_config.yml.")
    safe_serialization: bool = _opt(True, "--safe-serialization/--no-safe-serialization", help="Write safetensors (default) or pytorch_model.bin shards.")
    verbose: int = _opt(0, "-v", "--verbose", kind="count", help="-v info, -vv debug; tracebacks on errors.")
    quiet: bool = _opt(False, "--quiet/--no-quiet", help="No progress bar.")
    read_to_gpu: bool = _opt(
        False, "--read-to-gpu/--no-read-to-gpu",
        help="Move inputs to the math device as they are read (always the case with --device cuda).")
    multi_gpu: bool = _opt(
        False, "--multi-gpu/--no-multi-gpu", help=f"Spread tensors over several GPUs. {NO_EFFECT}: one device is used.")
    num_threads: Optional[int] = _opt(None, "-j", "--num-threads", kind="threads", help="torch intra-op threads.")
    gpu_rich: bool = _opt(
        False, "--gpu-rich", kind="flag", help="Shorthand for --cuda --low-cpu-memory --read-to-gpu --multi-gpu.")
    async_write: bool = _opt(
        False, "--async-write/--no-async-write",
        help=f"Write shards in the background. {NO_EFFECT}: writing always overlaps computing.")
    write_threads: int = _opt(1, "--write-threads", help=f"Writer threads. {NO_EFFECT}.")
    overwrite: bool = _opt(
        False, "--overwrite/--no-overwrite",
        help="Replace an existing non-empty output folder (only after the new merge is complete).")
    unsafe_truncate_embeddings: bool = _opt(
        False, "--unsafe-truncate-embeddings/--no-unsafe-truncate-embeddings",
        help="UNSAFE: with no tokenizer_source/tokenizer, merge embeddings of different vocabulary sizes by "
        "keeping the first rows every input has (default: an error naming the tensor); config.json keeps "
        "the donor's vocab_size.")

    def resolved_device(self) -> str:
        if self.device == "auto":
            import torch

            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device


def option_flags() -> dict[str, Flag]:
    """Field name -> its flag, in declaration order."""
    return {f.name: f.metadata["flag"] for f in fields(MergeOptions)}


def _click_kwargs(spec: Flag, field_default: Any) -> dict:
    import click

    default = field_default if spec.default is _FIELD_DEFAULT else spec.default
    kw: dict[str, Any] = {"default": default, "help": spec.help}
    if spec.show_default:
        kw["show_default"] = True
    if spec.kind == "size":
        kw["callback"] = _size
    elif spec.kind == "lora_dtype":
        kw["callback"] = check_lora_dtype
    elif spec.kind == "path":
        kw["type"] = click.Path()
    elif spec.kind == "threads":
        kw["type"] = click.IntRange(min=1)
    elif spec.kind == "count":
        kw = {"count": True, "help": spec.help}
    elif spec.kind == "flag":
        kw["is_flag"] = True
    elif isinstance(default, int) and not isinstance(default, bool):
        kw["type"] = int
    return kw


def merge_options(f=None, *, overrides: Optional[dict[str, dict]] = None):
    """Decorator adding one click option per MergeOptions field. `overrides` maps a field name to
    click keyword arguments that replace the generated ones for this command (help, default, type)."""

    unknown = set(overrides or {}) - set(option_flags())
    if unknown:
        raise ValueError(f"overrides for fields MergeOptions does not have: {sorted(unknown)}")

    def decorate(func):
        import click

        defaults = {fl.name: fl.default for fl in fields(MergeOptions)}
        for name, spec in reversed(list(option_flags().items())):
            kw = _click_kwargs(spec, defaults[name])
            kw.update((overrides or {}).get(name, {}))
            func = click.option(*spec.decls, name, **kw)(func)
        return func

    return decorate if f is None else decorate(f)


def options_from_flags(kw: dict, **fixed) -> MergeOptions:
    """The MergeOptions of parsed flags (`kw` may hold a command's own flags too); `fixed` sets
    fields the command decides itself."""
    values = {name: kw[name] for name in option_flags() if name in kw}
    values.update(fixed)
    if values.get("gpu_rich"):
        values.update(cuda=True, low_cpu_memory=True, read_to_gpu=True, multi_gpu=True)
    if values.get("device") is None:
        values["device"] = "cuda" if values.get("cuda") else "cpu"
    return MergeOptions(**values)


def _size(ctx, param, value):
    import click

    try:
        return parse_size(value)
    except ValueError as err:
        raise click.BadParameter(str(err)) from None


def check_lora_dtype(ctx, param, value):
    import click

    from .config import normalize_dtype_name  # torch-free

    try:
        name = normalize_dtype_name(value)
    except ValueError as err:
        raise click.BadParameter(str(err)) from None
    if name not in (None, "bfloat16", "float16", "float32"):
        raise click.BadParameter(f"{value!r} is not a floating-point dtype (use bfloat16, float16 or float32)")
    return name
