"""The planner both executors use: MergeConfig + opened inputs -> an ordered list of output-tensor
tasks.

Two steps, the same for `mergekit-yaml` (streaming) and the search's resident executor:
`open_inputs` opens the recipe's models once (sources) and checks their architectures;
`plan_merge` turns one recipe into a `MergePlan` against them. The resident executor keeps one
`MergeInputs` for every candidate; what depends only on the inputs (architecture, layer counts,
tokenizers, the built vocabulary, the chat template) is computed once there and reused.

Everything that can be checked without reading tensor data is checked here, before any work:
model directories, architectures, layer ranges, missing tensors, shapes, required parameters.
"""

from __future__ import annotations

import copy
import functools
import logging
from dataclasses import dataclass
from typing import Iterable, Optional, Union

import torch

from .architecture import (
    LAYER,
    ArchitectureInfo,
    ModuleInfo,
    WeightInfo,
    architecture_class,
    count_layers,
    get_config_value,
    layer_prefix_of,
    remap_layer_lists,
    resolve_architecture,
    set_config_value,
)
from .chat_templates import template_for
from .config import (
    InputSliceDefinition,
    MergeConfig,
    ModelReference,
    OutputSliceDefinition,
    ParameterScope,
    lookup_parameter,
)
from .errors import ConfigError, ModelError
from .io import OutputTensorSpec, torch_dtype
from .methods import REQUIRED, MethodSpec, get_method_spec
from .sources import InputModel, close_models, open_models
from .tokenizer import TokenizerCache, VocabPlan, build_vocab, resolve_chat_template, set_vocab_size, vocab_key, vocab_size_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorInput:
    model: ModelReference
    tensor_name: str  # name as stored in that model's checkpoint


@dataclass
class TensorTask:
    """One output tensor: read `inputs`, cast to `math_dtype`, merge, cast to `out.dtype`."""

    out: OutputTensorSpec
    is_embed: bool
    inputs: list[TensorInput]
    base_index: Optional[int]
    method: MethodSpec
    params: dict
    model_params: list[dict]
    math_dtype: torch.dtype
    # With a built tokenizer, an embedding's inputs are re-indexed to the output vocabulary
    # before merging; `aux_inputs` are the same tensor of models whose rows that needs although
    # they are not inputs here (the tokenizer's base model, configured token sources).
    vocab: Optional[VocabPlan] = None
    aux_inputs: tuple[TensorInput, ...] = ()
    # --unsafe-truncate-embeddings: every input keeps only its first `rows` rows as it is read
    rows: Optional[int] = None


@dataclass
class MergePlan:
    config: MergeConfig
    method: MethodSpec
    models: dict[ModelReference, InputModel]  # the recipe's models, in first-mention order
    architecture: ArchitectureInfo
    tasks: list[TensorTask]
    out_config: dict
    donor: ModelReference
    out_num_layers: int
    vocab: Optional[VocabPlan] = None  # the tokenizer to write, when one is built
    chat_template: Optional[str] = None  # Jinja text to store with the written tokenizer
    inputs: Optional["MergeInputs"] = None

    def close(self) -> None:
        """Close the inputs (a plan made by build_plan owns them)."""
        if self.inputs is not None:
            self.inputs.close()


# ----------------------------------------------------------------------------------------------
# Step 1: the inputs


def check_recipe(config: MergeConfig) -> MethodSpec:
    """What the recipe alone can get wrong, raised before any model is opened: an unknown method,
    an invalid chat template, a method that needs base_model without one."""
    method = get_method_spec(config.merge_method)
    if config.chat_template not in (None, "auto"):
        template_for(config.chat_template)
    _check_base(config)
    return method


def _check_base(config: MergeConfig) -> None:
    """A method that needs a base model has one: the recipe's, or a slice's own (a module's own
    method counts for that module)."""
    if config.base_model is not None:
        return
    if config.modules:
        items = [(f"modules.{n}.", m.merge_method or config.merge_method, m.slices) for n, m in config.modules.items()]
    else:
        items = [("", config.merge_method, config.slices)]
    for path, name, slices in items:
        if get_method_spec(name).requires_base and not any(s.base_model for s in slices or []):
            raise ConfigError(f"{path}merge_method {name} needs base_model")


def donor_of(config: MergeConfig) -> ModelReference:
    """The model whose config.json (and tokenizer) the output starts from."""
    return config.base_model or config.referenced_models()[0]


class MergeInputs:
    """Opened input models, and what is derived from them alone, computed once: the architecture
    and layer counts (per donor and model set), tokenizers, built vocabularies and chat templates
    (per tokenizer setting). One recipe uses it once (streaming); the resident executor plans
    every candidate of a search against the same one."""

    def __init__(
        self,
        *,
        allow_crimes: bool = False,
        lazy_unpickle: bool = False,
        lora_merge_cache: Optional[str] = None,
        lora_merge_dtype: Optional[str] = None,
    ):
        self.allow_crimes = allow_crimes
        self._open_options = dict(lazy_unpickle=lazy_unpickle, lora_merge_cache=lora_merge_cache, lora_merge_dtype=lora_merge_dtype)
        self.models: dict[ModelReference, InputModel] = {}
        self.tokenizers = TokenizerCache(self.models)
        self._architectures: dict[tuple, tuple[ArchitectureInfo, dict[ModelReference, int]]] = {}
        self._vocabs: dict[tuple, Optional[VocabPlan]] = {}
        self._chat_templates: dict[tuple, Optional[str]] = {}

    def open(self, refs: Iterable[ModelReference]) -> None:
        """Open the references not open yet (a search's candidates may use models the first
        recipe did not)."""
        missing = [r for r in refs if r not in self.models]
        if missing:
            self.models.update(open_models(missing, **self._open_options))

    def architecture(self, refs: list[ModelReference], donor: ModelReference) -> tuple[ArchitectureInfo, dict[ModelReference, int]]:
        """The architecture of a merge of `refs` described by `donor`, and each model's layer count."""
        key = (donor, tuple(refs))
        if key not in self._architectures:
            models = {r: self.models[r] for r in refs}
            arch = choose_architecture(models, donor, self.allow_crimes)
            self._architectures[key] = (arch, {r: layer_count(arch, m) for r, m in models.items()})
        return self._architectures[key]

    def vocab(self, config: MergeConfig) -> Optional[VocabPlan]:
        """The recipe's built tokenizer and permutations (None: the donor's tokenizer is kept).
        `.tokenizer` is what the merged model must be run with."""
        key = vocab_key(config)
        if key not in self._vocabs:
            self._vocabs[key] = build_vocab(config, self._recipe_models(config), self.tokenizers)
        return self._vocabs[key]

    def chat_template(self, config: MergeConfig) -> Optional[str]:
        refs = config.referenced_models()
        key = (config.chat_template, tuple(refs))
        if key not in self._chat_templates:
            self._chat_templates[key] = resolve_chat_template(config, self.tokenizers, refs)
        return self._chat_templates[key]

    def _recipe_models(self, config: MergeConfig) -> dict[ModelReference, InputModel]:
        """The recipe's models only, in its order (the same dict a merge of it alone would see)."""
        return {r: self.models[r] for r in config.referenced_models()}

    def close(self) -> None:
        close_models(self.models)


def open_inputs(
    config: MergeConfig,
    *,
    allow_crimes: bool = False,
    lazy_unpickle: bool = False,
    lora_merge_cache: Optional[str] = None,
    lora_merge_dtype: Optional[str] = None,
) -> MergeInputs:
    """Open the recipe's models and check that they can be merged (architectures, layer counts);
    the recipe's own mistakes are raised first, before a model is opened."""
    check_recipe(config)
    inputs = MergeInputs(
        allow_crimes=allow_crimes, lazy_unpickle=lazy_unpickle, lora_merge_cache=lora_merge_cache, lora_merge_dtype=lora_merge_dtype
    )
    try:
        refs = config.referenced_models()
        inputs.open(refs)
        inputs.architecture(refs, donor_of(config))
    except BaseException:
        inputs.close()
        raise
    return inputs


def choose_architecture(
    models: dict[ModelReference, InputModel], reference: ModelReference, allow_crimes: bool
) -> ArchitectureInfo:
    classes = {ref: architecture_class(m.config) for ref, m in models.items()}
    distinct = sorted({c or "<none>" for c in classes.values()})
    if len(distinct) > 1 and not allow_crimes:
        detail = ", ".join(f"{c} in {ref}" for ref, c in classes.items())
        raise ModelError(f"models have different architectures ({detail}); pass --allow-crimes to merge them anyway")
    ref_model = models[reference]
    names = [set(m.checkpoint.tensors) for m in models.values()]
    try:
        return resolve_architecture(ref_model.config, ref_model.checkpoint.tensors, names, str(reference))
    except ValueError as err:
        raise ModelError(f"model {reference}: cannot describe its architecture: {err}") from None


def layer_count(arch: ArchitectureInfo, model: InputModel) -> int:
    if arch.num_layers_key:
        value = get_config_value(model.config, arch.num_layers_key)
        if isinstance(value, int):
            return value
    if arch.origin != "override":  # e.g. T5's num_decoder_layers, absent when it equals num_layers
        return count_layers(model.checkpoint.tensors, layer_prefix_of(arch))
    raise ModelError(f"model {model.label}: config.json has no integer '{arch.num_layers_key}'")


# ----------------------------------------------------------------------------------------------
# Step 2: the tensors


@dataclass
class _Slice:
    definition: OutputSliceDefinition
    path: str  # key path for error messages, e.g. "slices[1]"
    base: Optional[ModelReference]


@dataclass
class _Module:
    """One module to plan: its weights (a ModuleInfo, or the whole ArchitectureInfo for
    single-module recipes), its slices, parameters and method, and each model's layer count."""

    name: str
    weights: Union[ArchitectureInfo, ModuleInfo]
    slices: list[_Slice]
    params: Optional[dict]
    method: MethodSpec
    layers: dict[ModelReference, int]
    sliced: bool  # the recipe cut it into slices (its layer count is written to the config)


def module_layer_count(module: ModuleInfo, model: InputModel) -> int:
    """A model's layer count for one module: its config key, else the blocks its checkpoint has."""
    if not module.layer_templates:
        return 0
    value = get_config_value(model.config, module.num_layers_key) if module.num_layers_key else None
    if isinstance(value, int):
        return value
    tpl = module.layer_templates[0].name
    return count_layers(model.checkpoint.tensors, tpl[: tpl.index(f".{LAYER}.")])


def _slices_of(
    config: MergeConfig, model_defs, slice_defs, prefix: str, layers: dict[ModelReference, int], method: MethodSpec
) -> list[_Slice]:
    """`models:` becomes one slice over every model's full layer range, with base_model appended as
    an input when it is not listed (mergekit's rule; not for passthrough, which takes one input)."""
    if model_defs:
        def source(model, parameters=None) -> InputSliceDefinition:
            # a module without a stack (a projector) has no layer range: built unvalidated
            return InputSliceDefinition.model_construct(model=model, layer_range=(0, layers[model]), parameters=parameters)

        sources = [source(m.model, m.parameters) for m in model_defs]
        if (
            config.base_model is not None
            and all(m.model != config.base_model for m in model_defs)
            and method.name != "passthrough"
        ):
            sources.append(source(config.base_model))
        return [_Slice(OutputSliceDefinition(sources=sources), f"{prefix}models", config.base_model)]
    return [_Slice(s, f"{prefix}slices[{i}]", s.base_model or config.base_model) for i, s in enumerate(slice_defs)]


_STATED: set[str] = set()  # where a slices recipe's other modules come from, said once


def _normalized_modules(
    config: MergeConfig, models: dict[ModelReference, InputModel], arch: ArchitectureInfo, whole_layers: dict[ModelReference, int]
) -> list[_Module]:
    """The modules to plan, in checkpoint order. `models:` and `slices:` recipes are one module over
    the whole description: on a multi-module model, `slices:` cut the text/decoder stack and every
    other module comes from the first slice's models (stated in a warning). A `modules:` recipe on
    a multi-module model names every module of the model (docs/architectures.md)."""
    method = get_method_spec(config.merge_method)
    if not config.modules or not arch.modules:
        model_defs, slice_defs, params, prefix = config.models, config.slices, None, ""
        if config.modules:
            if len(config.modules) != 1:
                raise ConfigError(
                    f"modules: {architecture_class(models[next(iter(models))].config) or 'this model'} has one module; "
                    f"give one module (mergekit calls it 'default'), got {', '.join(config.modules)}"
                )
            (name, module), = config.modules.items()
            model_defs, slice_defs, params, prefix = module.models, module.slices, module.parameters, f"modules.{name}."
            method = get_method_spec(module.merge_method or config.merge_method)
        slices = _slices_of(config, model_defs, slice_defs, prefix, whole_layers, method)
        if slice_defs and arch.modules:
            others = [m.name for m in arch.modules if m.name != arch.main_module]
            message = (
                f"slices cut the {arch.main_module} module; {', '.join(others)} come from the first slice's models "
                f"({', '.join(str(s.model) for s in slices[0].definition.sources)}), merged as its pre-layer weights; "
                "a `modules:` recipe chooses each module's source"
            )
            if message not in _STATED:  # once per process: a search plans every candidate
                _STATED.add(message)
                log.warning("%s", message)
        return [_Module(arch.main_module or "default", arch, slices, params, method, whole_layers, bool(slice_defs))]

    by_name = {}
    for m in arch.modules:
        for n in (m.name,) + m.aliases:
            by_name[n] = m
    names = ", ".join(m.name for m in arch.modules)
    given: dict[str, tuple[str, object]] = {}
    for name, definition in config.modules.items():
        if name not in by_name:
            raise ConfigError(f"modules.{name}: unknown module; this model's modules are {names}")
        info = by_name[name]
        if info.name in given:
            raise ConfigError(f"modules.{name}: module {info.name} is already given as modules.{given[info.name][0]}")
        given[info.name] = (name, definition)
    missing = [m.name for m in arch.modules if m.name not in given]
    if missing:
        raise ConfigError(
            f"modules: {', '.join(missing)} not given; every module of this model needs its source stated "
            f"(e.g. `{missing[0]}: {{models: [{{model: <base>}}]}}`); its modules are {names}"
        )
    out = []
    for info in arch.modules:
        name, definition = given[info.name]
        prefix = f"modules.{name}."
        if definition.slices and not info.layer_templates:
            raise ConfigError(f"{prefix}slices: module {info.name} has no stack of layers to slice; give it `models:`")
        mod_method = get_method_spec(definition.merge_method or config.merge_method)
        layers = whole_layers if info.name == arch.main_module else {ref: module_layer_count(info, m) for ref, m in models.items()}
        slices = _slices_of(config, definition.models, definition.slices, prefix, layers, mod_method)
        out.append(_Module(info.name, info, slices, definition.parameters, mod_method, layers, bool(definition.slices)))
    return out


class Planner:
    def __init__(
        self,
        config: MergeConfig,
        models: dict[ModelReference, InputModel],
        arch: ArchitectureInfo,
        layers: dict[ModelReference, int],
        seed_dtype: Optional[str],
        vocab: Optional[VocabPlan] = None,
        truncate_embeddings: bool = False,
    ):
        self.config = config
        self.vocab = vocab
        self.truncate_embeddings = truncate_embeddings
        self.models = models
        self.arch = arch
        self.layers = layers
        self.method = get_method_spec(config.merge_method)
        self.dtype = torch_dtype(seed_dtype)
        self.out_dtype = torch_dtype(config.out_dtype)
        self.tasks: list[TensorTask] = []
        # (model, input layer index) that each output layer of the main stack comes from (its
        # slice's first source)
        self.layer_origins: list[tuple[ModelReference, int]] = []
        # per module with a layer-count key: (key, output layers, origins, the donor's count, sliced)
        self.module_layers: list[tuple[str, int, list[tuple[ModelReference, int]], int, bool]] = []
        # The output config (the donor's) says the LM head is a separate tensor: it must be written.
        donor = donor_of(config)
        self.donor = donor
        self.untied_output = models[donor].config.get("tie_word_embeddings") is False
        # the vocabulary size the output config declares (the donor's), for the truncation warning
        self.out_vocab = get_config_value(models[donor].config, vocab_size_key(models[donor].config))

    def plan(self) -> tuple[list[TensorTask], int]:
        modules = _normalized_modules(self.config, self.models, self.arch, self.layers)
        for mod in modules:
            for slc in mod.slices:
                self._check_slice(slc, mod.layers)
        main_layers = 0
        for mod in modules:
            origins: list[tuple[ModelReference, int]] = []
            count = self._plan_module(mod, origins)
            if mod.weights is self.arch or mod.name == self.arch.main_module:
                main_layers, self.layer_origins = count, origins
            if mod.weights.num_layers_key:
                self.module_layers.append((mod.weights.num_layers_key, count, origins, mod.layers[self.donor], mod.sliced))
        return self.tasks, main_layers

    def _plan_module(self, mod: _Module, origins: list) -> int:
        """Mergekit's order: pre weights from the first slice's sources (t = 0), the layers slice by
        slice (input layer = layer_range start + i, a running output index), post weights from the
        last slice's sources (t = 0). Returns the module's output layer count."""
        out_layer = 0
        first, last = mod.slices[0], mod.slices[-1]
        plan = functools.partial(self._plan_tensor, module_params=mod.params, method=mod.method)
        for w in mod.weights.pre_weights:
            plan(w, [(s, w) for s in first.definition.sources], first, t=0.0)
        if mod.weights.layer_templates:
            for slc in mod.slices:
                sources = slc.definition.sources
                n = sources[0].layer_range[1] - sources[0].layer_range[0]
                for i in range(n):
                    t = i / (n - 1) if n > 1 else 1.0
                    out_weights = mod.weights.layer_weights(out_layer)
                    in_weights = [mod.weights.layer_weights(s.layer_range[0] + i) for s in sources]
                    if out_layer == 0:
                        self._check_first_layer(mod, slc, in_weights)
                    for j, w in enumerate(out_weights):
                        plan(w, [(s, iw[j]) for s, iw in zip(sources, in_weights)], slc, t=t)
                    origins.append((sources[0].model, sources[0].layer_range[0] + i))
                    out_layer += 1
        for w in mod.weights.post_weights:
            plan(w, [(s, w) for s in last.definition.sources], last, t=0.0)
        return out_layer

    def _check_first_layer(self, mod: _Module, slc: _Slice, in_weights: list[list[WeightInfo]]) -> None:
        """A stack's output layer 0 needs what only an input's layer 0 holds (T5 keeps its relative
        position bias in block 0 of each stack): without it the output silently lacks the tensor."""
        layer0 = mod.weights.layer_weights(0)
        for j, (src, weights) in enumerate(zip(slc.definition.sources, in_weights)):
            if src.layer_range[0] == 0:
                continue
            ckpt = self.models[src.model].checkpoint
            for first, here in zip(layer0, weights):
                if first.optional and ckpt.find(first.all_names) and not ckpt.find(here.all_names):
                    raise ConfigError(
                        f"{slc.path}.sources[{j}].layer_range: the stack's first output layer comes from layer "
                        f"{src.layer_range[0]} of {src.model}, which lacks {first.name} (only its layer 0 has it): "
                        f"start the first slice at layer 0"
                    )

    def _check_slice(self, slc: _Slice, layers: dict[ModelReference, int]) -> None:
        lengths = set()
        for j, src in enumerate(slc.definition.sources):
            start, end = src.layer_range
            have = layers[src.model]
            if end > have:
                raise ConfigError(
                    f"{slc.path}.sources[{j}].layer_range: [{start}, {end}] is beyond model "
                    f"{src.model}, which has {have} layers"
                )
            lengths.add(end - start)
        if len(lengths) > 1:
            raise ConfigError(f"{slc.path}: all sources of a slice must span the same number of layers, got {sorted(lengths)}")

    def _plan_tensor(
        self, out_w: WeightInfo, sources, slc: _Slice, module_params, t: float, method: Optional[MethodSpec] = None
    ) -> None:
        method = method or self.method
        # An optional tensor (e.g. an untied lm_head) is written only if some input really has it,
        # or, for a tied head, if the output config is untied (slices whose last inputs are tied
        # models after an untied donor): then the inputs' embeddings stand in for it.
        if out_w.optional and not any(self.models[s.model].checkpoint.find(w.all_names) for s, w in sources):
            if not (
                out_w.tied_names
                and self.untied_output
                and any(self.models[s.model].checkpoint.find(w.tied_names) for s, w in sources)
            ):
                return
        inputs: list[TensorInput] = []
        input_sources = []
        for source, in_w in sources:
            ckpt = self.models[source.model].checkpoint
            found = ckpt.find(in_w.all_names) or ckpt.find(in_w.tied_names)
            if found is None:
                if out_w.optional:
                    continue
                raise ModelError(f"tensor {in_w.name} required but not present in model {source.model}")
            inputs.append(TensorInput(source.model, found))
            input_sources.append(source)
        base_index = next((i for i, inp in enumerate(inputs) if inp.model == slc.base), None)
        scope = ParameterScope(slc.definition, module_params, self.config.parameters)

        params = {}
        for name, default in method.global_params.items():
            value = lookup_parameter(scope, name, out_w.name, t)
            if value is None:
                if default is REQUIRED:
                    raise ConfigError(
                        f"missing required parameter '{name}' for {method.name} (tensor {out_w.name}); "
                        f"set it under 'parameters'"
                    )
                value = default
            params[name] = value
        model_params = []
        for i, (inp, source) in enumerate(zip(inputs, input_sources)):
            values = {}
            for name, default in method.model_params.items():
                value = lookup_parameter(scope, name, inp.tensor_name, t, source=source)
                if value is None:
                    if default is REQUIRED and i != base_index:
                        raise ConfigError(
                            f"missing required parameter '{name}' for model {inp.model} "
                            f"(tensor {inp.tensor_name}, {slc.path})"
                        )
                    value = None if default is REQUIRED else default
                values[name] = value
            model_params.append(values)
        if method.name == "linear" and base_index is not None and model_params[base_index].get("weight") is None:
            raise ConfigError(
                f"linear: base_model {slc.base} is an input of the merge but has no 'weight' "
                "(mergekit adds base_model to the inputs; give it a weight or drop base_model)"
            )

        locations = [self.models[inp.model].checkpoint.tensors[inp.tensor_name] for inp in inputs]
        first = locations[base_index] if base_index is not None else locations[0]
        math_dtype = self.dtype or first.dtype
        vocab, aux, rows = None, (), None
        if self.vocab is not None and out_w.is_embed and all(len(loc.shape) == 2 for loc in locations):
            vocab, aux = self.vocab, self._vocab_inputs(out_w, inputs)
            shape = self._vocab_shape(out_w, list(inputs) + list(aux))
        else:
            shape, rows = self._output_shape(out_w, inputs, [loc.shape for loc in locations], base_index, method)
        self.tasks.append(
            TensorTask(
                out=OutputTensorSpec(out_w.name, shape, self.out_dtype or math_dtype),
                is_embed=out_w.is_embed,
                inputs=inputs,
                base_index=base_index,
                method=method,
                params=params,
                model_params=model_params,
                math_dtype=math_dtype,
                vocab=vocab,
                aux_inputs=aux,
                rows=rows,
            )
        )

    def _vocab_inputs(self, out_w: WeightInfo, inputs: list[TensorInput]) -> tuple[TensorInput, ...]:
        present = {inp.model for inp in inputs}
        wanted = self.vocab.row_models() - present
        aux = []
        for ref in (r for r in self.models if r in wanted):
            ckpt = self.models[ref].checkpoint
            found = ckpt.find(out_w.all_names) or ckpt.find(out_w.tied_names)
            if found is None:
                if ref != self.vocab.base:
                    raise ModelError(f"tensor {out_w.name}: model {ref}, a source of tokenizer.tokens, has no such tensor")
                continue  # the default rule then looks at the inputs only
            aux.append(TensorInput(ref, found))
        return tuple(aux)

    def _vocab_shape(self, out_w: WeightInfo, inputs: list[TensorInput]) -> tuple[int, int]:
        """[V', H]; every input must be as wide as the others and hold every row it is mapped to."""
        vocab = self.vocab
        shapes = [self.models[inp.model].checkpoint.tensors[inp.tensor_name].shape for inp in inputs]
        for inp, s in zip(inputs, shapes):
            if s[1] != shapes[0][1]:
                raise ModelError(
                    f"shape mismatch for tensor {out_w.name}: model {inputs[0].model} has {list(shapes[0])}, "
                    f"model {inp.model} has {list(s)}"
                )
            rows = [int(vocab.permutations[inp.model].max())]
            rows += [src.row for src in vocab.configured.values() if src.model == inp.model]
            if max(rows) >= s[0]:
                raise ModelError(
                    f"model {inp.model}: tensor {inp.tensor_name} has {s[0]} rows, but the merged vocabulary "
                    f"needs its row {max(rows)}"
                )
        return (vocab.padded_size, shapes[0][1])

    def _output_shape(
        self, out_w: WeightInfo, inputs, shapes, base_index, method: MethodSpec
    ) -> tuple[tuple[int, ...], Optional[int]]:
        """(output shape, rows every input is cut to as it is read: --unsafe-truncate-embeddings only)."""
        hint = ""

        def mismatch(i: int, j: int) -> ModelError:
            return ModelError(
                f"shape mismatch for tensor {out_w.name}: model {inputs[i].model} has {list(shapes[i])}, "
                f"model {inputs[j].model} has {list(shapes[j])}{hint}"
            )

        ref = base_index if (method.embed_shape == "base" and base_index is not None) else 0
        if out_w.is_embed and all(len(s) == 2 for s in shapes):
            rows = [s[0] for s in shapes]
            no_tokenizer_rule = self.config.tokenizer_source is None and self.config.tokenizer is None
            differ = min(rows) != max(rows) and no_tokenizer_rule
            base_rule = method.embed_shape == "base" and base_index is not None
            fix = f"--unsafe-truncate-embeddings to keep the first {min(rows)} rows of each"
            # task vectors: inputs larger than the base are cut to its rows (mergekit's rule); only
            # what goes beyond that is the unsafe truncation
            if differ and self.truncate_embeddings and (not base_rule or rows[ref] > min(rows)):
                return self._truncated(out_w, inputs, shapes, ref if base_rule else None, mismatch), min(rows)
            if base_rule:
                hint = f" (or pass {fix})" if differ else ""
                for i, s in enumerate(shapes):
                    if s[0] < shapes[ref][0] or s[1] < shapes[ref][1]:
                        raise mismatch(ref, i)
                return tuple(shapes[ref]), None
            if differ:  # as mergekit: refuse rather than guess
                small, large = rows.index(min(rows)), rows.index(max(rows))
                raise ConfigError(
                    f"tensor {out_w.name}: vocabulary sizes differ (model {inputs[small].model} has {rows[small]} rows, "
                    f"model {inputs[large].model} has {rows[large]}), so the common rows could mix unrelated tokens; "
                    f"align the vocabularies with `tokenizer_source: base` or `tokenizer_source: union` (or pass {fix})"
                )
            return (min(rows), min(s[1] for s in shapes)), None
        for i, s in enumerate(shapes):
            if tuple(s) != tuple(shapes[ref]):
                raise mismatch(ref, i)
        return tuple(shapes[ref]), None

    def _truncated(self, out_w: WeightInfo, inputs, shapes, ref: Optional[int], mismatch) -> tuple[int, int]:
        """--unsafe-truncate-embeddings: every input keeps the rows they all have (as mergekit's
        flag, per tensor, without touching the output config)."""
        rows = min(s[0] for s in shapes)
        if ref is None:
            cols = min(s[1] for s in shapes)
        else:
            cols = shapes[ref][1]
            for i, s in enumerate(shapes):
                if s[1] < cols:
                    raise mismatch(ref, i)
        log.warning(
            "UNSAFE vocabulary truncation: tensor %s keeps the first %d rows of each input (%s); "
            "config.json keeps vocab_size %s",
            out_w.name, rows, ", ".join(f"{inp.model}: {s[0]} rows" for inp, s in zip(inputs, shapes)), self.out_vocab,
        )
        return (rows, cols)


def plan_merge(config: MergeConfig, inputs: MergeInputs, truncate_embeddings: bool = False) -> MergePlan:
    """One recipe's plan against opened inputs (models it names that are not open yet are opened).
    Reads no tensor data; every mistake the recipe can make with these models is raised here.
    `truncate_embeddings`: --unsafe-truncate-embeddings."""
    method = check_recipe(config)
    refs = config.referenced_models()
    inputs.open(refs)
    donor = donor_of(config)
    arch, layers = inputs.architecture(refs, donor)
    models = inputs._recipe_models(config)
    vocab = inputs.vocab(config)
    chat_template = inputs.chat_template(config)
    planner = Planner(config, models, arch, layers, config.dtype, vocab, truncate_embeddings)
    tasks, out_layers = planner.plan()
    out_config = _output_config(
        config, models, donor, arch, layers[donor], out_layers, planner.layer_origins, vocab, module_layers=planner.module_layers
    )
    return MergePlan(config, method, models, arch, tasks, out_config, donor, out_layers, vocab, chat_template, inputs)


def build_plan(
    config: MergeConfig,
    *,
    allow_crimes: bool = False,
    lazy_unpickle: bool = False,
    lora_merge_cache: Optional[str] = None,
    lora_merge_dtype: Optional[str] = None,
    truncate_embeddings: bool = False,
) -> MergePlan:
    """Open the recipe's inputs and plan it: the plan owns the inputs (`plan.close()`)."""
    inputs = open_inputs(
        config, allow_crimes=allow_crimes, lazy_unpickle=lazy_unpickle, lora_merge_cache=lora_merge_cache, lora_merge_dtype=lora_merge_dtype
    )
    try:
        return plan_merge(config, inputs, truncate_embeddings)
    except BaseException:
        inputs.close()
        raise


def _output_config(
    config: MergeConfig,
    models: dict[ModelReference, InputModel],
    donor: ModelReference,
    arch: ArchitectureInfo,
    donor_layers: int,
    out_layers: int,
    layer_origins: list[tuple[ModelReference, int]],
    vocab: Optional[VocabPlan] = None,
    module_layers: Optional[list] = None,
) -> dict:
    out = copy.deepcopy(models[donor].config)  # nested keys (text_config.*) may be rewritten
    if vocab is not None:
        set_vocab_size(out, vocab.padded_size)
    dtype = config.out_dtype or config.dtype
    if dtype:
        keys = [k for k in ("dtype", "torch_dtype") if k in out] or ["dtype"]
        for k in keys:
            out[k] = dtype
    if module_layers is not None and arch.modules and config.modules:
        # a modules: recipe: each module's count under its own key. A key the donor's config lacks
        # (T5's num_decoder_layers, which then follows num_layers) is written too, so that cutting
        # one stack leaves the other as it was.
        for key, count, origins, donor_count, sliced in module_layers:
            if sliced:
                set_config_value(out, key, count)
                remap_layer_lists(out, key, donor_count, [(models[ref].config, idx) for ref, idx in origins])
            elif get_config_value(out, key) is None:
                set_config_value(out, key, count)
        return out
    uses_slices = bool(config.slices) or any(m.slices for m in (config.modules or {}).values())
    if uses_slices:
        if arch.num_layers_key:
            set_config_value(out, arch.num_layers_key, out_layers)
            # layer_types and the like follow the layers they came from
            remap_layer_lists(
                out, arch.num_layers_key, donor_layers,
                [(models[ref].config, idx) for ref, idx in layer_origins],
            )
        else:
            log.warning("cannot record the new layer count (%d) in config.json: no layer-count key known", out_layers)
    return out
