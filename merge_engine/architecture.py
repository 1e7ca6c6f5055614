"""Which tensors a model has: pre-layer weights, per-layer templates, post-layer weights.

A checkpoint is described, in this order, by
1. `OVERRIDES`: the few things derivation cannot know (a class name transformers spells otherwise);
2. derivation: the model class transformers would build for config.json, instantiated on the meta
   device (no memory, no weights); its module tree gives the repeated block stacks, the weights
   before and after the main one, the embeddings and the tied weights, and transformers' own
   save-time renaming gives the names checkpoints really hold (`derive_architectures`);
3. inference from tensor names (the most frequent `.N.` stack), for classes transformers lacks.
Importing this module imports neither torch nor transformers: derivation imports them when it runs.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

log = logging.getLogger(__name__)

LAYER = "{layer}"  # placeholder for the layer index in layer templates


@dataclass(frozen=True)
class WeightInfo:
    name: str
    is_embed: bool = False  # vocabulary-indexed matrix (embeddings, LM head)
    optional: bool = False
    aliases: tuple[str, ...] = ()  # other names the same tensor has in older checkpoints
    tied_names: tuple[str, ...] = ()  # read these when the tensor itself is absent (tied LM head)
    # a linear layer's weight stored [in, out] (transformers' Conv1D, the GPT-2 family)
    transposed: bool = False

    def for_layer(self, index: int) -> "WeightInfo":
        return dataclasses.replace(
            self,
            name=self.name.replace(LAYER, str(index)),
            aliases=tuple(a.replace(LAYER, str(index)) for a in self.aliases),
            tied_names=tuple(t.replace(LAYER, str(index)) for t in self.tied_names),
        )

    @property
    def all_names(self) -> tuple[str, ...]:
        return (self.name,) + self.aliases


@dataclass(frozen=True)
class StackInfo:
    """One stack of repeated blocks (decoder layers, a vision tower, an encoder)."""

    path: str  # module path in the transformers model, e.g. "model.vision_tower.encoder.layers"
    templates: tuple[WeightInfo, ...]
    num_layers: int  # in the config it was derived from
    num_layers_key: Optional[str]  # dotted config key that sets it, when one was found


@dataclass(frozen=True)
class ModuleInfo:
    """One module of a multi-module model (mergekit's `modules:`): a VLM's text decoder, vision tower
    or projector, an encoder-decoder's encoder or decoder. A module has at most one sliceable stack
    (`layer_templates`); weights of other stacks inside it are spelled out among its pre/post weights."""

    name: str
    pre_weights: tuple[WeightInfo, ...]
    layer_templates: tuple[WeightInfo, ...]  # () for a module without a stack (a projector)
    post_weights: tuple[WeightInfo, ...]
    num_layers_key: Optional[str]
    stack: Optional[str] = None  # module path of the stack, e.g. "model.visual.blocks"
    aliases: tuple[str, ...] = ()  # other names recipes may use for it

    def layer_weights(self, index: int) -> list[WeightInfo]:
        return list(_layer_weights(self.layer_templates, index))

    def all_weights(self, num_layers: int) -> list[WeightInfo]:
        out = list(self.pre_weights)
        for i in range(num_layers if self.layer_templates else 0):
            out.extend(self.layer_weights(i))
        out.extend(self.post_weights)
        return out


@dataclass(frozen=True)
class ArchitectureInfo:
    name: str
    pre_weights: tuple[WeightInfo, ...]
    layer_templates: tuple[WeightInfo, ...]
    post_weights: tuple[WeightInfo, ...]
    num_layers_key: Optional[str]  # dotted path in config.json, e.g. "num_hidden_layers"
    inferred: bool = False
    # Non-weight buffers some old checkpoints carry; never merged, never reported as unknown.
    ignored_patterns: tuple[str, ...] = field(default=())
    origin: str = "override"  # "override", "derived" or "inferred": how the description was found
    # Every repeated-block stack of a derived model, the main one included. Stacks other than the
    # main one are also spelled out, layer by layer, in pre_weights/post_weights.
    stacks: tuple[StackInfo, ...] = ()
    # The modules of a multi-stack model, in checkpoint order, the text/decoder module among them;
    # () for single-module models (the whole description is then the one module).
    modules: tuple[ModuleInfo, ...] = ()
    main_module: Optional[str] = None  # the module whose stack `layer_templates` describes

    def layer_weights(self, index: int) -> list[WeightInfo]:
        return list(_layer_weights(self.layer_templates, index))

    def all_weights(self, num_layers: int) -> list[WeightInfo]:
        out = list(self.pre_weights)
        for i in range(num_layers):
            out.extend(self.layer_weights(i))
        out.extend(self.post_weights)
        return out

    def is_ignored(self, tensor_name: str) -> bool:
        return any(re.search(p, tensor_name) for p in self.ignored_patterns)


@functools.lru_cache(maxsize=8192)
def _layer_weights(templates: tuple[WeightInfo, ...], index: int) -> tuple[WeightInfo, ...]:
    # planned again for every search candidate: the names of a layer are built once
    return tuple(w.for_layer(index) for w in templates)


def get_config_value(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def set_config_value(config: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    node = config
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


# Lists of layer indices (not one entry per layer) that sit next to a layer count in a config.
_LAYER_INDEX_LISTS = ("moe_layers", "mlp_only_layers")


def remap_layer_lists(out: dict, count_key: str, count: int, origins: list[tuple[dict, int]]) -> None:
    """After a frankenmerge, rewrite the per-layer lists next to `count_key` in the output config
    (layer_types, Llama 4's no_rope_layers, and index lists such as moe_layers), so that output
    layer i keeps the settings of the input layer it came from, `origins[i]` = (that model's
    config, its layer index). transformers rejects, or silently misbuilds, a config whose lists do
    not match its layer count."""
    parent = count_key.rpartition(".")[0]
    siblings = get_config_value(out, parent) if parent else out
    for name, value in list((siblings or {}).items()):
        if not isinstance(value, list) or "layer" not in name:
            continue
        key = f"{parent}.{name}" if parent else name
        sources = [(get_config_value(cfg, key), idx) for cfg, idx in origins]
        if name in _LAYER_INDEX_LISTS:
            if all(isinstance(src, list) for src, _ in sources):
                set_config_value(out, key, [i for i, (src, idx) in enumerate(sources) if idx in src])
        elif len(value) == count:
            set_config_value(out, key, [(src if isinstance(src, list) else value)[idx] for src, idx in sources])


# ----------------------------------------------------------------------------------------------
# Overrides: only what derivation cannot know

# Buffers that older transformers versions saved into checkpoints (rotary tables, GPT-2's causal
# masks); today's classes keep them out of the state dict, so derivation never sees them.
_LEGACY_BUFFERS = (r"rotary_emb\.inv_freq$", r"\.attn\.bias$", r"\.attn\.masked_bias$", r"\.attention\.bias$", r"\.attention\.masked_bias$")

# config.json class names transformers does not spell that way -> the class that reads them.
CLASS_ALIASES: dict[str, str] = {
    "LLaMaForCausalLM": "LlamaForCausalLM",  # early LLaMA conversions wrote this spelling
}

# Hand-written descriptions that win over derivation, keyed by config.json class name. Empty: every
# family the old hand table held is derived identically (tests/test_architectures.py checks it).
OVERRIDES: dict[str, ArchitectureInfo] = {}


def architecture_class(config: dict) -> Optional[str]:
    archs = config.get("architectures") or []
    return archs[0] if len(archs) == 1 else None


def architecture_candidates(config: dict) -> tuple[ArchitectureInfo, ...]:
    """Descriptions of a config's class, most trusted first: the override, else the derived layouts
    (names as transformers saves them, then as its modules name them). Empty when neither applies."""
    cls = architecture_class(config)
    if not cls:
        return ()
    if cls in OVERRIDES:
        return (OVERRIDES[cls],)
    return derive_architectures(config)


def known_architecture(config: dict) -> Optional[ArchitectureInfo]:
    candidates = architecture_candidates(config)
    return candidates[0] if candidates else None


def resolve_architecture(
    config: dict, reference_names: Iterable[str], all_model_names: list[set[str]], label: str = "model"
) -> ArchitectureInfo:
    """The description of a checkpoint: the first candidate that describes every tensor of the
    reference checkpoint and finds every required one, else inference from tensor names (ValueError
    when that fails too)."""
    names = list(reference_names)
    present = set(names)
    candidates = architecture_candidates(config)
    problems = [_misfit(arch, config, present) for arch in candidates]
    for arch, (uncovered, missing) in zip(candidates, problems):
        if not uncovered and not missing:
            return arch
    for arch, (uncovered, missing) in zip(candidates, problems):
        if not uncovered:
            return arch  # the planner names the missing tensor; inference would drop it silently
    cls = architecture_class(config)
    if candidates:
        uncovered = problems[0][0]
        log.warning(
            "model %s has tensors the %s description lacks (%s%s); describing the model from its tensor names instead",
            label, candidates[0].name, ", ".join(uncovered[:3]), "..." if len(uncovered) > 3 else "",
        )
    elif cls:
        log.info("architecture %s cannot be derived; inferring it from tensor names", cls)
    return infer_architecture(names, all_model_names, config)


def transposed_weights(config: dict, names: Iterable[str]) -> set[str]:
    """The checkpoint tensors among `names` that are linear weights stored [in, out] (transformers'
    `Conv1D`, the GPT-2 family); empty when the architecture is not derivable (a weight is then
    taken as [out, in])."""
    present = set(names)
    try:
        arch = resolve_architecture(config, present, [present])
    except ValueError:
        return set()
    weights = arch.all_weights(_layers_in(arch, config, present))
    return {n for w in weights if w.transposed for n in w.all_names if n in present}


def _layers_in(arch: ArchitectureInfo, config: dict, present: set[str]) -> int:
    """The number of layers of a checkpoint: the config's count, else counted from its tensor names."""
    layers = get_config_value(config, arch.num_layers_key) if arch.num_layers_key else None
    return layers if isinstance(layers, int) else count_layers(present, layer_prefix_of(arch))


def _misfit(arch: ArchitectureInfo, config: dict, present: set[str]) -> tuple[list[str], list[str]]:
    """(checkpoint tensors the description lacks, required weights the checkpoint lacks)"""
    covered: set[str] = set()
    missing = []
    for w in arch.all_weights(_layers_in(arch, config, present)):
        covered.update(w.all_names)
        if not w.optional and not any(n in present for n in w.all_names):
            missing.append(w.name)
    uncovered = sorted(n for n in present if n not in covered and not arch.is_ignored(n))
    return uncovered, missing


# ----------------------------------------------------------------------------------------------
# Derivation from the transformers model class

# config.json keys that do not change which tensors a model has: left out of the cache key
_VOLATILE_KEYS = ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures", "auto_map")
_COUNT_NAME = re.compile(r"layer|depth", re.IGNORECASE)


def derive_architectures(config: dict) -> tuple[ArchitectureInfo, ...]:
    """The derived layouts for a config (see `_derive`); () when transformers lacks the class or
    cannot build it from this config."""
    cls = architecture_class(config)
    if not cls:
        return ()
    cls = CLASS_ALIASES.get(cls, cls)
    key = {k: v for k, v in config.items() if k not in _VOLATILE_KEYS}
    try:
        text = json.dumps(key, sort_keys=True)
    except (TypeError, ValueError):
        return ()
    return _derive(cls, text)


@functools.lru_cache(maxsize=64)
def _derive(cls_name: str, config_text: str) -> tuple[ArchitectureInfo, ...]:
    # Cached per (class, config) in memory (planning runs once per search candidate) and on disk
    # (deriving imports transformers and builds a meta model: ~2.5 s a one-off merge would pay).
    path = _disk_cache_path(cls_name, config_text)
    cached = _read_cached(path)
    if cached is not None:
        return cached
    derived = _derive_uncached(cls_name, config_text)
    _write_cached(path, derived)
    return derived


def _derive_uncached(cls_name: str, config_text: str) -> tuple[ArchitectureInfo, ...]:
    config = json.loads(config_text)
    cls = _transformers_class(cls_name, config)
    if cls is None:
        return ()
    try:
        model = _meta_model(cls, config)
    except Exception as err:  # a config this transformers rejects: inference takes over
        log.info("cannot build %s on the meta device (%s: %s)", cls_name, type(err).__name__, str(err).splitlines()[0] if str(err) else "")
        return ()
    try:
        return _describe(cls, model, config)
    except Exception as err:  # _NotDerivable, or a module tree this code did not foresee
        log.info("cannot derive %s: %s", cls_name, err)
        return ()


# -- on-disk cache of derived descriptions ---------------------------------------------------------
# One JSON file per (class, config, transformers version, this module's source): a new transformers
# or a change to the derivation code is a new key, so a stale description is never read.

_CACHED_TYPES = {c.__name__: c for c in (WeightInfo, StackInfo, ModuleInfo, ArchitectureInfo)}


def architecture_cache_dir() -> Optional[Path]:
    """Where derived descriptions are kept: $EVOMERGE_CACHE_DIR/architectures, else under
    $XDG_CACHE_HOME (~/.cache)/evomerge. None when EVOMERGE_CACHE_DIR is set to an empty string
    (no disk cache)."""
    root = os.environ.get("EVOMERGE_CACHE_DIR")
    if root is None:
        root = str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "evomerge")
    return Path(root).expanduser() / "architectures" if root else None


@functools.lru_cache(maxsize=1)
def _code_version() -> str:
    """transformers' version and a digest of this module's source (without importing transformers)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        tv = version("transformers")
    except PackageNotFoundError:  # pragma: no cover - a dependency of the package
        tv = "none"
    return tv + "/" + hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def _disk_cache_path(cls_name: str, config_text: str) -> Optional[Path]:
    folder = architecture_cache_dir()
    if folder is None:
        return None
    digest = hashlib.sha256("\n".join((_code_version(), cls_name, config_text)).encode()).hexdigest()
    return folder / f"{cls_name}-{digest[:32]}.json"


def _encode(value):
    if isinstance(value, tuple):
        return [_encode(v) for v in value]
    if isinstance(value, tuple(_CACHED_TYPES.values())):
        return {"__type__": type(value).__name__, **{f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    return value


def _decode(value):
    if isinstance(value, list):  # every sequence in these descriptions is a tuple
        return tuple(_decode(v) for v in value)
    if isinstance(value, dict):
        cls = _CACHED_TYPES[value["__type__"]]
        return cls(**{k: _decode(v) for k, v in value.items() if k != "__type__"})
    return value


def _read_cached(path: Optional[Path]) -> Optional[tuple[ArchitectureInfo, ...]]:
    if path is None or not path.is_file():
        return None
    try:
        return _decode(json.loads(path.read_text()))
    except Exception as err:  # unreadable or from a foreign writer: derive again (and overwrite)
        log.debug("ignoring the cached architecture %s: %s", path, err)
        return None


def _write_cached(path: Optional[Path], derived: tuple[ArchitectureInfo, ...]) -> None:
    if path is None:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(_encode(derived)))
        os.replace(tmp, path)  # concurrent writers (search workers) each replace it whole
    except OSError as err:  # a read-only home: derivation simply runs again next time
        log.debug("cannot cache the architecture in %s: %s", path, err)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


class _NotDerivable(Exception):
    pass


def _transformers_class(cls_name: str, config: dict):
    """transformers' own class of that name for this config, or None (absent, or the config's
    model_type belongs to remote code borrowing the name, e.g. phi-msft under PhiForCausalLM)."""
    try:
        import transformers
    except ImportError:  # pragma: no cover - a dependency of the package
        return None
    cls = getattr(transformers, cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        return None
    expected = getattr(cls.config_class, "model_type", "")
    if config.get("model_type") and expected and config["model_type"] != expected:
        return None
    return cls


def transformers_class(config: dict):
    """transformers' class for config.json's `architectures` (no remote code), or None."""
    cls_name = architecture_class(config)
    return _transformers_class(CLASS_ALIASES.get(cls_name, cls_name), config) if cls_name else None


def _meta_model(cls, config: dict):
    import torch

    cfg = config_object(cls, config)
    with torch.device("meta"), _quiet():
        return cls(cfg)


def config_object(cls, config: dict):
    """The transformers config of `cls` for a config.json dict (nested text/vision configs too)."""
    # config.json spells infinities as {"__float__": "Infinity"}; transformers' reader decodes them
    decode = getattr(cls.config_class, "_decode_special_floats", lambda d: d)
    with _quiet():
        return cls.config_class.from_dict(decode(copy.deepcopy(config)))


@contextlib.contextmanager
def _quiet():
    # a config's validation notes (rope ranges, token ids) are not the merge's business
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def _stacks(model) -> list[tuple[str, int]]:
    """(module path, length) of every outermost nn.ModuleList that holds parameters."""
    from torch import nn

    found: list[tuple[str, int]] = []
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if any(path.startswith(p + ".") for p, _ in found):
            continue  # a list inside a block (experts) belongs to the block's template
        if next(module.parameters(), None) is None:
            continue
        found.append((path, len(module)))
    return found


def _main_stack(model, stacks: list[tuple[str, int]]) -> tuple[str, int]:
    """The stack of text decoder blocks: inside the module transformers calls the decoder (the
    language model of a VLM, the decoder of an encoder-decoder), with the text config's length."""
    names = {id(m): p for p, m in model.named_modules()}
    decoder = ""
    try:
        decoder = names.get(id(model.get_decoder()), "")
    except Exception:
        pass
    inside = [s for s in stacks if not decoder or s[0].startswith(decoder + ".")] or stacks
    try:
        wanted = model.config.get_text_config(decoder=True).num_hidden_layers
    except Exception:
        wanted = None
    for s in inside:
        if s[1] == wanted:
            return s
    return max(inside, key=lambda s: s[1])


def _saved_names(model, state: dict, stacks: list[tuple[str, int]]) -> Optional[dict[str, list[str]]]:
    """In-memory state-dict name -> the names save_pretrained writes for it (transformers 5 reverts
    its load-time conversions on save: VLM prefixes, per-expert MoE weights, GPT-NeoX's embed_out).
    None when the mapping cannot be made one key at a time."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return None

    def revert(part: dict) -> list[str]:
        return list(revert_weight_conversion(model, part))

    try:
        whole = set(revert(dict(state)))
        # One call per key costs milliseconds (transformers walks the model each time): a block's
        # weights are mapped once per stack and re-indexed for the other blocks; the comparison
        # with the whole mapping below catches a conversion that depends on the index.
        per_key: dict[str, list[str]] = {}
        seen: dict[tuple[str, str], tuple[int, list[str]]] = {}
        for k, t in state.items():
            where = _in_stack(k, stacks)
            if where is not None and (where[0], where[2]) in seen:
                j, names = seen[(where[0], where[2])]
                per_key[k] = [_reindex(n, j, where[1]) for n in names]
                continue
            per_key[k] = revert({k: t})
            if where is not None:
                seen[(where[0], where[2])] = (where[1], per_key[k])
        if {n for names in per_key.values() for n in names} != whole:
            per_key = {k: revert({k: t}) for k, t in state.items()}
    except Exception as err:
        log.debug("cannot map %s's names to saved names: %s", type(model).__name__, err)
        return None
    if {n for names in per_key.values() for n in names} != whole:
        return None  # a conversion that needs several tensors at once
    return per_key


def _in_stack(key: str, stacks: list[tuple[str, int]]) -> Optional[tuple[str, int, str]]:
    """(stack path, block index, rest of the name) of a key inside a stack, else None."""
    for path, _ in stacks:
        if key.startswith(path + "."):
            index, _, rest = key[len(path) + 1 :].partition(".")
            if index.isdigit():
                return path, int(index), rest
    return None


def _reindex(name: str, old: int, new: int) -> str:
    # the block index is the first `.N.` of a name (expert indices come after it)
    at = name.find(f".{old}.")
    return name if at < 0 else name[:at] + f".{new}." + name[at + len(str(old)) + 2 :]


def _tied_targets(model) -> dict[str, str]:
    """Tied parameter -> the parameter it shares, whether or not this config ties them: merged
    models may differ in tie_word_embeddings, and an absent head is read from its source."""
    from transformers import PreTrainedModel

    tied: dict[str, str] = {}
    plain = re.compile(r"^[A-Za-z0-9_.]+$")
    for prefix, sub in model.named_modules():
        if not isinstance(sub, PreTrainedModel):
            continue
        mapping = getattr(type(sub), "_tied_weights_keys", None) or {}
        if isinstance(mapping, dict):
            for target, source in mapping.items():
                if plain.match(target) and plain.match(source):  # regex patterns: expanded below
                    p = f"{prefix}." if prefix else ""
                    tied.setdefault(p + target, p + source)
    tied.update(getattr(model, "all_tied_weights_keys", None) or {})
    return tied


def _embedding_names(model, tied: dict[str, str]) -> set[str]:
    names = {id(m): p for p, m in model.named_modules()}
    out: set[str] = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            module = getattr(model, getter)()
        except Exception:
            module = None
        if module is not None and id(module) in names and getattr(module, "weight", None) is not None:
            if module.weight.dim() == 2:
                out.add(f"{names[id(module)]}.weight" if names[id(module)] else "weight")
    for target, source in tied.items():  # T5's encoder/decoder embed_tokens tied to `shared`
        if source in out or target in out:
            out.update((target, source))
    return out


def _transposed_weights(model) -> set[str]:
    """State-dict keys of the weights transformers stores [in, out] (its `Conv1D` modules)."""
    from transformers.pytorch_utils import Conv1D

    return {f"{path}.weight" for path, module in model.named_modules() if isinstance(module, Conv1D)}


def _describe(cls, model, config: dict) -> tuple[ArchitectureInfo, ...]:
    state = model.state_dict()
    keys = list(state)
    stacks = _stacks(model)
    if not stacks:
        raise _NotDerivable("no stack of repeated blocks")
    main_path, main_len = _main_stack(model, stacks)
    counts = _count_keys(cls, config, stacks)
    tied = _tied_targets(model)
    embeds = _embedding_names(model, tied)
    transposed = _transposed_weights(model)
    base_prefix = getattr(cls, "base_model_prefix", "") or ""

    layouts: list[tuple[str, dict[str, list[str]]]] = []
    saved = _saved_names(model, state, stacks)
    if saved is not None:
        layouts.append(("saved", saved))
    memory = {k: [k] for k in keys}
    split = _split_modules(model, keys, stacks, main_path, counts)
    if saved is None or saved != memory:
        layouts.append(("modules", memory))

    out = []
    for layout, names_of in layouts:
        def weight(k: str, name: str, optional: bool = False) -> WeightInfo:
            aliases = []
            if len(names_of[k]) == 1 and name != k:
                aliases.append(k)  # the module name, as checkpoints written by other versions hold it
            tied_to = tied.get(k)
            tied_names = tuple(names_of.get(tied_to, [tied_to])) if tied_to else ()
            return WeightInfo(name, k in embeds, optional or bool(tied_to), tuple(aliases), tied_names, k in transposed)

        stack_infos = []
        templates_by_path = {}
        for path, length in stacks:
            templates_by_path[path] = _templates(path, length, keys, names_of, weight)
            stack_infos.append(StackInfo(path, templates_by_path[path], length, counts.get(path)))
        first = next(i for i, k in enumerate(keys) if k.startswith(main_path + "."))
        last = max(i for i, k in enumerate(keys) if k.startswith(main_path + "."))
        pre_keys = [k for k in keys[:first] for _ in names_of[k]]
        post_keys = [k for k in keys[last + 1 :] for _ in names_of[k]]
        pre = [weight(k, n) for k in keys[:first] for n in names_of[k]]
        post = [weight(k, n) for k in keys[last + 1 :] for n in names_of[k]]
        pre, main, post = _with_prefix_aliases(pre, templates_by_path[main_path], post, base_prefix)
        modules = ()
        if split is not None:
            modules = _module_infos(
                split, keys, list(zip(pre_keys, pre)) + list(zip(post_keys, post)), templates_by_path, main, counts
            )
        out.append(
            ArchitectureInfo(
                name=f"{cls.__name__} ({layout} names)",
                pre_weights=tuple(pre),
                layer_templates=main,
                post_weights=tuple(post),
                num_layers_key=counts.get(main_path),
                ignored_patterns=_LEGACY_BUFFERS,
                origin="derived",
                stacks=tuple(stack_infos),
                modules=modules,
                main_module=split.main if split is not None else None,
            )
        )
    return tuple(out)


# ----------------------------------------------------------------------------------------------
# Modules of multi-stack models (mergekit's `modules:`)


@dataclass(frozen=True)
class _Split:
    main: str  # name of the text/decoder module
    module_of: dict  # in-memory state-dict key -> module name
    stack_of: dict  # module name -> the path of its sliceable stack (None: no stack)
    aliases: dict  # module name -> other names recipes may use


_VISION_GROUPS = ("visual", "vision_tower", "vision_model", "vision")


def _split_modules(model, keys: list[str], stacks: list[tuple[str, int]], main_path: str, counts: dict[str, str]) -> Optional[_Split]:
    """Which module every weight belongs to, for a model with several stacks. The module tree
    below the deepest module holding every stack is cut into groups (its children: a VLM's
    `visual`/`vision_tower` and `language_model`, T5's `shared`, `encoder` and `decoder`); the
    group of the main stack, and every weight after that stack (final norm, LM head), is the text
    (or decoder) module; a projector (a path part naming a projector, or Qwen's vision `merger`)
    is a module of its own, as in mergekit's VLM definitions; every other group is a module."""
    if len(stacks) < 2:
        return None
    paths = [p.split(".") for p, _ in stacks]
    root: list[str] = []
    for parts in zip(*paths):
        if len(set(parts)) > 1:
            break
        root.append(parts[0])

    def group(key: str) -> str:
        parts = key.split(".")
        if parts[: len(root)] == root and len(parts) > len(root) + 1:
            return ".".join(parts[: len(root) + 1])
        return parts[0]

    main_group = group(main_path)
    last_main = max(i for i, k in enumerate(keys) if k.startswith(main_path + "."))
    other = {group(p): [] for p, _ in stacks if p != main_path}
    for p, length in stacks:
        if p != main_path:
            other[group(p)].append((p, length))
    encdec = any("encoder" in g.rsplit(".", 1)[-1] for g in other)
    main = "decoder" if encdec else "text_decoder"

    def name_of_group(g: str) -> str:
        short = g.rsplit(".", 1)[-1]
        if encdec and "encoder" in short:
            return "encoder"
        if short in _VISION_GROUPS:
            return "vision_model" if short == "vision_model" else "vision_tower"
        return short

    stack_paths = [p for p, _ in stacks]
    module_of: dict[str, str] = {}
    for i, k in enumerate(keys):
        in_stack = any(k.startswith(p + ".") for p in stack_paths)
        parts = k.split(".")
        if k.startswith(main_path + ".") or group(k) == main_group or i > last_main:
            module_of[k] = main
        elif not in_stack and any("projector" in part or part == "merger" for part in parts[:-1]):
            module_of[k] = "multi_modal_projector"
        else:
            module_of[k] = name_of_group(group(k))
    stack_of: dict[str, Optional[str]] = {name: None for name in module_of.values()}
    stack_of[main] = main_path
    for g, members in other.items():
        # the stack a layer-count key sets, the longest first (Qwen3-VL's deepstack mergers are
        # spelled out as weights of the vision module)
        keyed = [m for m in members if m[0] in counts] or members
        stack_of[name_of_group(g)] = max(keyed, key=lambda m: m[1])[0]
    if len(stack_of) < 2:
        return None
    aliases = {n: tuple(v for v in ("vision_tower", "vision_model") if v != n) if n in ("vision_tower", "vision_model") else () for n in stack_of}
    return _Split(main, module_of, stack_of, aliases)


def _module_infos(split: _Split, keys: list[str], weights, templates_by_path, main_templates, counts) -> tuple[ModuleInfo, ...]:
    """ModuleInfos in checkpoint order from (in-memory key, WeightInfo) pairs of the weights outside
    the main stack; weights in a module's own stack become its templates."""
    order = {k: i for i, k in enumerate(keys)}
    names: list[str] = []
    for k in keys:
        if split.module_of[k] not in names:
            names.append(split.module_of[k])
    out = []
    for name in names:
        path = split.stack_of[name]
        start = min((order[k] for k in keys if path and k.startswith(path + ".")), default=None)
        pre, post = [], []
        for k, w in weights:
            if split.module_of[k] != name or (path and k.startswith(path + ".")):
                continue
            (pre if start is None or order[k] < start else post).append(w)
        templates = main_templates if name == split.main else (templates_by_path[path] if path else ())
        out.append(ModuleInfo(name, tuple(pre), tuple(templates), tuple(post), counts.get(path) if path else None, path, split.aliases.get(name, ())))
    return tuple(out)


def _templates(path: str, length: int, keys: list[str], names_of, weight) -> tuple[WeightInfo, ...]:
    """The union of the stack's per-layer names with the index replaced; a template some layer
    lacks (hybrid stacks: attention in some layers, convolutions in others) is optional."""
    per_layer: list[dict[str, tuple[str, str]]] = []
    for i in range(length):
        prefix = f"{path}.{i}."
        layer: dict[str, tuple[str, str]] = {}
        for k in keys:
            if not k.startswith(prefix):
                continue
            for n in names_of[k]:
                at = n.find(f".{i}.")
                if at < 0:
                    raise _NotDerivable(f"saved name {n} of {k} has no layer index")
                layer[n[:at] + f".{LAYER}." + n[at + len(str(i)) + 2 :]] = (k, n)
        for tpl in layer:
            if tpl.replace(LAYER, str(i)) != layer[tpl][1]:
                raise _NotDerivable(f"layer {i} of {path}: names do not follow one template")
        per_layer.append(layer)
    order: dict[str, tuple[str, str]] = {}
    for layer in per_layer:
        for tpl, kn in layer.items():
            order.setdefault(tpl, kn)
    out = []
    for tpl, (k, n) in order.items():
        w = weight(k, n, optional=not all(tpl in layer for layer in per_layer))
        at = k.find(f"{path}.") + len(path) + 1
        index = k[at:].split(".", 1)[0]
        out.append(
            dataclasses.replace(
                w, name=tpl,
                aliases=tuple(_to_template(a, path, index) for a in w.aliases),
                tied_names=tuple(_to_template(t, path, index) for t in w.tied_names),
            )
        )
    return tuple(out)


def _to_template(name: str, path: str, index: str) -> str:
    prefix = f"{path}.{index}."
    return f"{path}.{LAYER}." + name[len(prefix):] if name.startswith(prefix) else name


def _with_prefix_aliases(pre, templates, post, base_prefix: str):
    """Checkpoints of the bare base model (GPT-2's `h.0...` instead of `transformer.h.0...`) lack
    the base-model prefix: that spelling is an alias, unless it is another weight's name."""
    if not base_prefix:
        return pre, templates, post
    head = base_prefix + "."
    taken = {w.name for w in (*pre, *post, *templates)}

    def add(w: WeightInfo) -> WeightInfo:
        short = w.name[len(head):] if w.name.startswith(head) else None
        if short is None or short in taken or short in w.aliases:
            return w
        return dataclasses.replace(w, aliases=w.aliases + (short,))

    return [add(w) for w in pre], tuple(add(w) for w in templates), [add(w) for w in post]


def _count_keys(cls, config: dict, stacks: list[tuple[str, int]]) -> dict[str, str]:
    """Stack path -> the config key that sets its length, found by building the model again with
    each candidate key changed and seeing which stack follows."""
    try:
        full = config_object(cls, config).to_dict()
    except Exception:
        full = config
    lengths = {length for _, length in stacks}
    candidates = [
        (path, value) for path, value in _int_leaves(full)
        if value in lengths and _COUNT_NAME.search(path.rsplit(".", 1)[-1])
    ]
    found: dict[str, tuple[int, str]] = {}  # stack -> (how many stacks the key moves, key)
    for path, value in candidates:
        new = value - 1 if value > 1 else value + 1
        probe = copy.deepcopy(config)
        parent = get_config_value(probe, path.rsplit(".", 1)[0]) if "." in path else probe
        set_config_value(probe, path, new)
        if not isinstance(parent, dict):
            parent = get_config_value(probe, path.rsplit(".", 1)[0])
        for k, v in list(parent.items()):  # per-layer lists (layer_types) must keep the new length
            if isinstance(v, list) and len(v) == value and _COUNT_NAME.search(k):
                parent[k] = v[:new] if new < value else v + v[-1:]
        try:
            probed = dict(_stacks(_meta_model(cls, probe)))
        except Exception:
            continue
        moved = [p for p, length in stacks if probed.get(p, 0) != length]
        for p, length in stacks:
            if probed.get(p) == new and length == value:
                if p not in found or len(moved) < found[p][0]:
                    found[p] = (len(moved), path)
    return {p: key for p, (_, key) in found.items()}


def _int_leaves(node: dict, prefix: str = ""):
    for k, v in node.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _int_leaves(v, path + ".")
        elif isinstance(v, int) and not isinstance(v, bool):
            yield path, v


# ----------------------------------------------------------------------------------------------
# Inference from tensor names

_LAYER_INDEX = re.compile(r"\.(\d+)\.")
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "text_config.num_hidden_layers")


def _is_embed_name(name: str) -> bool:
    return any(k in name for k in ("embed_tokens", "wte.", "embed_in", "word_embeddings", "lm_head", "embed_out"))


def infer_architecture(
    reference_names: Iterable[str], all_model_names: list[set[str]], reference_config: dict
) -> ArchitectureInfo:
    """Describe a decoder from its tensor names: the most common `<prefix>.N.` stack is the layer
    stack; other names are pre-layer (embeddings) or post-layer weights."""
    names = list(reference_names)
    by_prefix: dict[str, int] = {}
    for n in names:
        m = _LAYER_INDEX.search(n)
        if m:
            by_prefix[n[: m.start()]] = by_prefix.get(n[: m.start()], 0) + 1
    if not by_prefix:
        raise ValueError("no layer stack found in the tensor names (no '.N.' pattern)")
    layer_prefix = max(by_prefix, key=lambda p: by_prefix[p])

    def present_everywhere(n: str) -> bool:
        return all(n in s for s in all_model_names)

    embed_names = [n for n in names if _is_embed_name(n) and "lm_head" not in n and "embed_out" not in n]
    templates: dict[str, None] = {}
    pre, post = [], []
    for n in names:
        m = _LAYER_INDEX.search(n)
        if m and n[: m.start()] == layer_prefix:
            templates[n[: m.start()] + f".{LAYER}." + n[m.end() :]] = None
            continue
        tied = ()
        if ("lm_head" in n or "embed_out" in n) and embed_names:
            tied = (embed_names[0],)
        info = WeightInfo(n, is_embed=_is_embed_name(n), optional=not present_everywhere(n) or bool(tied), tied_names=tied)
        (pre if any(k in n for k in ("embed", "wte", "wpe")) and not tied else post).append(info)
    layer_templates = []
    for tpl in templates:
        optional = not all(
            all(tpl.replace(LAYER, str(i)) in s for i in range(count_layers(s, layer_prefix)))
            for s in all_model_names
        )
        layer_templates.append(WeightInfo(tpl, optional=optional))
    count = count_layers(set(names), layer_prefix)
    key = next((k for k in _LAYER_COUNT_KEYS if get_config_value(reference_config, k) == count), None)
    return ArchitectureInfo(
        name=f"inferred({layer_prefix})",
        pre_weights=tuple(pre),
        layer_templates=tuple(layer_templates),
        post_weights=tuple(post),
        num_layers_key=key,
        inferred=True,
        ignored_patterns=_LEGACY_BUFFERS[:1],
        origin="inferred",
    )


def count_layers(names: Iterable[str], layer_prefix: str) -> int:
    indices = set()
    for n in names:
        m = _LAYER_INDEX.search(n)
        if m and n[: m.start()] == layer_prefix:
            indices.add(int(m.group(1)))
    return max(indices) + 1 if indices else 0


def layer_prefix_of(arch: ArchitectureInfo) -> str:
    tpl = arch.layer_templates[0].name
    return tpl[: tpl.index(f".{LAYER}.")]
