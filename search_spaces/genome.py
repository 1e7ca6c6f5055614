"""The genome of a merge search: a vector of bounded numbers <-> a merge recipe (MergeConfig).

Layout follows mergekit-evolve: the vector is `[layer groups, models, parameter sets, params]`
(parameter sets = one per filter plus a catch-all). Unlike mergekit-evolve, every dimension has
bounds in its valid range (weights, densities, t), so the optimiser never needs abs/clamp folding
and a decoded value is exactly the value merged.

evomerge's additions: `merge_method` as a list (MethodChoiceGenome: one categorical method gene),
`model_switch` (one on/off gene per model after either layout) and `kind: layer_path`
(search_spaces.layer_path). The optimisers see only bounded continuous dimensions, so a categorical
gene over k choices is a dimension in [0, k] decoded by floor (clamped to k - 1 at the upper
bound), and an on/off gene is a dimension in [0, 1] that is on at >= 0.5.

One class per layout, under `Genome` (what reports and optimisers read): WeightedGenome (per-model
weight, density, ...: linear, task arithmetic, the TIES family), SlerpGenome, GlobalParamGenome
(global parameters per layer group and filter: model_stock's switch, the SVD methods' alpha and
shares; one method each, `method_genome` picks), MethodChoiceGenome (a list of methods; `parameter_genome`
picks between the two) and search_spaces.layer_path.LayerPathGenome.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Optional, Sequence

from merge_engine.architecture import get_config_value, known_architecture
from merge_engine.config import Conditional, MergeConfig, ModelReference, ParameterScope, lookup_parameter, parse_config
from merge_engine.errors import ConfigError
from merge_engine.sources import looks_like_repo_id
from merge_engine.methods import METHODS

from .definition import GenomeDefinition

_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "text_config.num_hidden_layers")

# Which methods a search may tune, their parameters, bounds and starting values: the method
# registry's SearchSpec (merge_engine.methods); the genome only lays them out.


@dataclass(frozen=True)
class Dimension:
    name: str
    low: float
    high: float
    initial: float


@dataclass(frozen=True)
class SearchSpace:
    """The box the optimiser searches: one named, bounded dimension per gene (Genome.space; the
    experiment's study and the optimisers take their bounds from it)."""

    names: tuple[str, ...]
    lower: tuple[float, ...]
    upper: tuple[float, ...]

    @property
    def size(self) -> int:
        return len(self.names)


@dataclass(frozen=True)
class GeneValue:
    """One per-layer-group gene of a decoded genotype (GenotypeView.genes)."""

    name: str  # the dimension's name, as the optimiser and the study know it
    row: str  # what it sets, without its layer group: `<model>.<parameter>.<filter>`, `t.<filter>`, ...
    group: int  # its layer group (GenotypeView.groups)
    value: float  # the value the decoded recipe holds
    low: float
    high: float


@dataclass(frozen=True)
class GenotypeView:
    """What a genotype decodes to, in the genome's own terms: what a report shows of a recipe.
    Every genome kind returns one (Genome.explain); a field a layout does not have is empty."""

    method: str  # the recipe's merge method
    methods: tuple[str, ...] = ()  # the choices of a method gene (empty: the method is fixed)
    groups: tuple[tuple[int, int], ...] = ()  # output layers (first, last) of each layer group
    genes: tuple[GeneValue, ...] = ()  # the per-layer-group genes of the method in use
    models: tuple[tuple[str, bool], ...] = ()  # switch genes in use: (model, whether it is merged)
    path: tuple[tuple[str, int, Optional[float]], ...] = ()  # layer path: (model, its layer, scale or None) per output layer


def model_label(ref: ModelReference) -> str:
    return os.path.basename(os.path.normpath(ref.model.path)) or str(ref)


def read_num_layers(ref: ModelReference, key: str = "genome.models") -> int:
    """Layer count from config.json alone (no weights are read). For a `model+lora` reference it
    is the base model's. A hub id (`org/name`, `org/name@revision`) that is not a local folder is
    read from the Hugging Face hub's config.json (the local cache under HF_HUB_OFFLINE)."""
    folder = Path(ref.model.path).expanduser()
    if not folder.is_dir() and looks_like_repo_id(ref.model.path):
        path = _hub_config_file(ref, key)
    else:
        path = folder / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{key}: model {ref}: {path} not found") from None
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{key}: model {ref}: cannot read {path}: {_first_line(err)}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{key}: model {ref}: {path} is not a JSON object")
    arch = known_architecture(cfg)
    keys = ((arch.num_layers_key,) if arch and arch.num_layers_key else ()) + _LAYER_KEYS
    for name in keys:
        value = get_config_value(cfg, name)
        if isinstance(value, int):
            return value
    raise ConfigError(f"{key}: model {ref}: config.json has no layer count")


def _hub_config_file(ref: ModelReference, key: str) -> Path:
    """config.json of a hub model: from the local Hugging Face cache, or downloaded into it."""
    repo = ref.model.path
    where = repo if ref.model.revision is None else f"{repo} (revision {ref.model.revision})"
    try:
        from huggingface_hub import constants, hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RevisionNotFoundError
    except ImportError:  # pragma: no cover - a dependency of transformers
        raise ConfigError(f"{key}: model {ref}: not a local directory, and huggingface_hub is not installed") from None
    try:
        return Path(hf_hub_download(repo, "config.json", revision=ref.model.revision))
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            raise ConfigError(
                f"{key}: model {ref}: not a local directory, and {where} is not in the local Hugging Face "
                f"cache ({constants.HF_HUB_CACHE}) while HF_HUB_OFFLINE is set"
            ) from None
        raise ConfigError(
            f"{key}: model {ref}: not a local directory, and the Hugging Face hub cannot be reached for {where}"
        ) from None
    except RevisionNotFoundError:
        raise ConfigError(f"{key}: model {ref}: the Hugging Face hub has no revision {ref.model.revision} of {repo}") from None
    except EntryNotFoundError:
        raise ConfigError(f"{key}: model {ref}: {where} on the Hugging Face hub has no config.json") from None
    except Exception as err:  # repository not found, gated, HTTP errors, bad ids: one line
        raise ConfigError(
            f"{key}: model {ref}: not a local directory, and config.json could not be fetched from the "
            f"Hugging Face hub ({type(err).__name__}: {_first_line(err)})"
        ) from None


def _first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[0] if lines else type(err).__name__


def _unique_labels(refs: Sequence[ModelReference]) -> dict[ModelReference, str]:
    """Short names for dimension names; models whose folders share a name get their full reference."""
    short = {r: model_label(r) for r in refs}
    clashes = {v for v in short.values() if list(short.values()).count(v) > 1}
    return {r: (str(r) if short[r] in clashes else short[r]) for r in refs}


def category(value: float, k: int) -> int:
    """A categorical gene over k choices, in [0, k]: floor(value), clamped into 0..k-1."""
    return min(max(int(math.floor(value)), 0), k - 1)


class Differentiability(Enum):
    """Whether, and how, the decoded merge is differentiable in the layout's continuous genes (what
    a gradient optimiser needs to know). Categorical and on/off genes (a method gene, switch genes,
    model_stock's filter_wise) are step functions: their gradient is zero almost everywhere."""

    # no useful gradient declared: a layer path, a method list, slerp's pair choice, model_stock,
    # the SVD methods (tsvm, iso_c, iso_cts: truncated SVDs whose kept rank is a gene)
    NONE = "none"
    FULL = "full"  # the merged tensors are differentiable in every gene (linear, task arithmetic)
    # TIES, DARE, breadcrumbs, DELLA: differentiable in the weights with the sparsification and sign
    # masks fixed at the current point (the masks themselves are step functions of the genes)
    MASKS_FIXED = "masks_fixed"


class Genome:
    """What every genome gives reports and optimisers: the gene table (`dimensions`: names, bounds,
    starting values), the layer groups, the anchors, decode/encode and explain, and whether the
    decoded merge is differentiable in the genes. One subclass per layout: WeightedGenome,
    SlerpGenome, GlobalParamGenome (one method each), MethodChoiceGenome (a list of methods) and
    search_spaces.layer_path.LayerPathGenome. Subclasses set `dimensions` and implement
    `decode_plain`, `encode`, `summary`, `describe` and `explain`."""

    dimensions: list[Dimension]

    @property
    def size(self) -> int:
        return len(self.dimensions)

    @property
    def space(self) -> SearchSpace:
        return SearchSpace(tuple(d.name for d in self.dimensions), tuple(d.low for d in self.dimensions),
                           tuple(d.high for d in self.dimensions))

    @property
    def groups(self) -> tuple[tuple[int, int], ...]:
        """Output layers (first, last) of each layer group; empty for a layout without groups."""
        return ()

    @property
    def differentiable(self) -> Differentiability:
        return Differentiability.NONE

    def gradient_genes(self) -> tuple[int, ...]:
        """The genes a gradient optimiser trains (those the decoded merge is differentiable in,
        with the decoding affine in them); empty for a layout without any."""
        return ()

    def initial(self) -> list[float]:
        return [d.initial for d in self.dimensions]

    def anchors(self) -> list[tuple[str, list[float]]]:
        """The hand-made recipes this genome can express, as (label, genotype), distinct, the
        starting point first: scored before any optimiser proposal, so a search never exports
        something worse than them by chance (evolve.selection)."""
        return [("start", self.initial())]

    def default_popsize(self) -> int:
        """pycma's default population size, 4 + floor(3 ln N)."""
        return 4 + int(3 * math.log(self.size))

    def _check(self, x: Sequence[float]) -> list[float]:
        if len(x) != self.size:
            raise ValueError(f"genotype has {len(x)} values, the genome {self.size}")
        return [min(max(float(v), d.low), d.high) for v, d in zip(x, self.dimensions)]

    def decode(self, x: Sequence[float]) -> MergeConfig:
        return parse_config(self.decode_plain(self._check(x)), "decoded genome")

    def decode_plain(self, x: list[float]) -> dict:
        """The recipe as plain YAML data, for a genotype inside the bounds."""
        raise NotImplementedError

    def encode(self, config: MergeConfig) -> list[float]:
        raise NotImplementedError

    def summary(self) -> str:
        """The dry run's first line, after `genome: N dimensions `."""
        raise NotImplementedError

    def describe(self) -> list[str]:
        """The dry run's account of the genes: one line per kind of gene."""
        raise NotImplementedError

    def explain(self, x: Sequence[float]) -> GenotypeView:
        """What genotype `x` decodes to, for reports (evolve.html_report)."""
        raise NotImplementedError


def grouped_gene(name: str) -> Optional[tuple[int, str]]:
    """(layer group, row) of a per-layer-group gene's name `g<group>.<row>`, else None."""
    head, _, row = name.partition(".")
    if head[:1] == "g" and head[1:].isdigit() and row:
        return int(head[1:]), row
    return None


# -- model switches -------------------------------------------------------------------------------

SWITCH_ON = 0.75  # a switch gene's starting value: on, 1.5 default sigma0 steps from off


def switch_dimensions(labels: Sequence[str]) -> list[Dimension]:
    return [Dimension(f"switch.{label}", 0.0, 1.0, SWITCH_ON) for label in labels]


def switched_off(values: Sequence[float]) -> list[bool]:
    """Which models are off (gene < 0.5). One always stays on: when every gene is below 0.5, the
    model with the highest gene (the first of equal ones) stays on."""
    off = [v < 0.5 for v in values]
    if all(off):
        off[max(range(len(values)), key=lambda i: (values[i], -i))] = False
    return off


def zero_weights(recipe: dict, off: set[str]) -> dict:
    """Set the `weight` of each model in `off` (recipe references) to exactly 0 wherever the recipe
    gives it one. The model stays an input, so the recipe's layout does not change."""
    entries = list(recipe.get("models") or [])
    for slc in recipe.get("slices") or []:
        entries.extend(slc["sources"])
    for entry in entries:
        if entry["model"] in off and "weight" in (entry.get("parameters") or {}):
            entry["parameters"]["weight"] = 0.0
    return recipe


def _all_zero(value) -> bool:
    if isinstance(value, Conditional):
        return _all_zero(value.value)
    if isinstance(value, (tuple, list)):
        return all(_all_zero(v) for v in value)
    return float(value) == 0.0


def encode_switches(config: MergeConfig, models: Sequence[ModelReference]) -> list[float]:
    """Switch genes for a recipe: off for a model whose every weight is 0, else on."""
    weights: dict[ModelReference, list] = {m: [] for m in models}
    entries = list(config.models or [])
    for slc in config.slices or []:
        entries.extend(slc.sources)
    for entry in entries:
        if entry.model in weights and entry.parameters and "weight" in entry.parameters:
            weights[entry.model].append(entry.parameters["weight"])
    return [1.0 - SWITCH_ON if w and _all_zero(w) else SWITCH_ON for w in weights.values()]


class MethodGenome(Genome):
    """One merge method over layer groups x parameter sets (one per filter plus a catch-all),
    optionally with a switch gene per model after it (`model_switch`, methods with a `weight`
    only): mergekit-evolve's layout. Subclasses lay out the method's own genes."""

    def __init__(self, definition: GenomeDefinition, num_layers: int):
        self.definition = d = definition
        self.num_layers = num_layers
        g = d.layer_granularity
        if g and num_layers % g:
            raise ConfigError(
                f"genome.layer_granularity: {g} does not divide the models' {num_layers} layers"
            )
        self.num_groups = num_layers // g if g else 1
        self.filters: list[Optional[str]] = list(d.filters or []) + [None]  # None = catch-all
        self.method = d.merge_method
        self.spec = METHODS[self.method]
        self.params = self.spec.search.names
        self.models: list[ModelReference] = list(d.models)
        self.labels = _unique_labels(self._labelled())
        self.dimensions = self._build_dimensions()
        self.num_params = len(self.dimensions)  # the layout's genes; switch genes follow
        self.switched = bool(d.model_switch) and self.spec.search.weighted
        if self.switched:
            self.dimensions += switch_dimensions([self.labels[m] for m in self.models])

    # -- what each layout defines ---------------------------------------------------------------

    def _labelled(self) -> list[ModelReference]:
        """The models named in dimension names."""
        return self.models

    def _build_dimensions(self) -> list[Dimension]:
        raise NotImplementedError

    def _decode_genes(self, x: list[float]) -> dict:
        """The recipe's keys after merge_method, dtype and tokenizer_source."""
        raise NotImplementedError

    def _encode_genes(self, config: MergeConfig, x: list[float]) -> None:
        """Set in `x` the layout's genes that `config` gives a value."""
        raise NotImplementedError

    def _layout(self) -> str:
        raise NotImplementedError

    def _param_names(self) -> tuple[str, ...]:
        return self.params

    # -- shared ---------------------------------------------------------------------------------

    def _bounds(self, param: str) -> tuple[float, float, float]:
        p = self.spec.search.param(param)
        return p.low, p.high, p.initial

    @property
    def groups(self) -> tuple[tuple[int, int], ...]:
        size = self.num_layers // self.num_groups
        return tuple((g * size, (g + 1) * size - 1) for g in range(self.num_groups))

    def _layer_range(self, g: int) -> list[int]:
        size = self.num_layers // self.num_groups
        return [g * size, (g + 1) * size]

    def _slice_sources(self, g: int, params_of=None) -> list[dict]:
        """The sources of layer group g's slice: every model (with `params_of(model index)` as its
        parameters, if given), then base_model where it is not one of them."""
        lr = self._layer_range(g)
        sources = [{"model": str(ref), "layer_range": lr, **({"parameters": params_of(m)} if params_of else {})}
                   for m, ref in enumerate(self.models)]
        base = self.definition.base_model
        if base is not None and base not in self.models:
            sources.append({"model": str(base), "layer_range": lr})
        return sources

    def _group_points(self, config: MergeConfig):
        """(group, its first layer, its position t in [0, 1] along the groups, the recipe's
        parameter scope there, its sources there): where encode reads `config`'s parameters for
        each layer group."""
        for g in range(self.num_groups):
            layer = g * (self.num_layers // self.num_groups)
            yield (g, layer, g / (self.num_groups - 1) if self.num_groups > 1 else 0.0,
                   *self._scope_for_layer(config, layer))

    def _setting(self, values_by_filter: list) -> object:
        """One parameter's value: a scalar (or gradient), or a conditional list over the filters."""
        if len(self.filters) == 1:
            return values_by_filter[0]
        out = []
        for f, v in zip(self.filters, values_by_filter):
            out.append({"filter": f, "value": v} if f is not None else {"value": v})
        return out

    def summary(self) -> str:
        return f"({self._layout()}); method {self.method}"

    def describe(self) -> list[str]:
        lines = [f"{self.method} parameter genes: {self.num_params} ({self._layout()}: {', '.join(self._param_names())})"]
        if self.switched:
            lines.append(switch_line(len(self.models)))
        return lines

    def explain(self, x: Sequence[float]) -> GenotypeView:
        x = self._check(x)
        return GenotypeView(self.method, groups=self.groups, genes=self.gene_values(self.decode(x)),
                            models=self._switch_view(x[self.num_params :]) if self.switched else ())

    def gene_values(self, recipe: MergeConfig, prefix: str = "") -> tuple[GeneValue, ...]:
        """The layout's genes as `recipe` holds them (read back by `encode`: what is merged, so a
        switched-off model's weights are 0); dimension names get `prefix`."""
        values = self.encode(recipe)
        out = []
        for d, v in zip(self.dimensions[: self.num_params], values):
            group, row = grouped_gene(d.name)  # every layout gene is named g<group>.<row>
            out.append(GeneValue(prefix + d.name, row, group, v, d.low, d.high))
        return tuple(out)

    def _switch_view(self, genes: Sequence[float]) -> tuple[tuple[str, bool], ...]:
        return tuple((self.labels[m], not o) for m, o in zip(self.models, switched_off(genes)))

    def decode_plain(self, x: list[float]) -> dict:
        d = self.definition
        recipe: dict = {"merge_method": self.method, "dtype": d.dtype}
        if d.tokenizer_source is not None:
            recipe["tokenizer_source"] = d.tokenizer_source
        recipe.update(self._decode_genes(x[: self.num_params]))
        if self.switched:
            off = switched_off(x[self.num_params :])
            zero_weights(recipe, {str(m) for m, o in zip(self.models, off) if o})
        return recipe

    def encode(self, config: MergeConfig) -> list[float]:
        """A genotype for an existing recipe of this genome's method (a warm start). Values the
        recipe does not set keep the genome's initial value; all are clipped to the bounds."""
        if config.merge_method != self.method:
            raise ConfigError(f"warm start: recipe uses {config.merge_method}, the genome {self.method}")
        x = self.initial()
        if self.switched:
            x[self.num_params :] = encode_switches(config, self.models)
        self._encode_genes(config, x)
        return self._check(x)

    def _scope_for_layer(self, config: MergeConfig, layer: int):
        from merge_engine.config import InputSliceDefinition, OutputSliceDefinition

        if config.slices:
            out = 0
            for slc in config.slices:
                n = slc.sources[0].layer_range[1] - slc.sources[0].layer_range[0]
                if out <= layer < out + n:
                    return ParameterScope(slc, None, config.parameters), slc.sources
                out += n
            slc = config.slices[-1]
            return ParameterScope(slc, None, config.parameters), slc.sources
        sources = [
            InputSliceDefinition(model=m.model, layer_range=(0, max(1, self.num_layers)), parameters=m.parameters)
            for m in (config.models or [])
        ]
        slc = OutputSliceDefinition(sources=sources) if sources else None
        return ParameterScope(slc, None, config.parameters), sources


def _filter_name(layer: int, f: Optional[str]) -> str:
    """A tensor name of `layer` that filter `f` (None: the catch-all) selects, for encode's lookups."""
    return f"model.layers.{layer}.{f if f is not None else '__other__'}"


class WeightedGenome(MethodGenome):
    """Per-model parameters (weight, density, ...) per layer group and filter: linear, task
    arithmetic and the TIES/DARE/breadcrumbs/DELLA family."""

    @property
    def differentiable(self) -> Differentiability:
        tv = self.spec.task_vector
        if tv is None or (tv.sparsify is None and not tv.consensus):
            return Differentiability.FULL
        return Differentiability.MASKS_FIXED

    def gradient_genes(self) -> tuple[int, ...]:
        """Every weight gene (a weight, or a point of the weight's gradient list with `smooth`);
        switch genes and the sparsification's genes (density, gamma, epsilon: step functions of
        the masks) are not trained."""
        p = self.params.index("weight")
        return tuple(i for i in range(self.num_params) if i % len(self.params) == p)

    def _bounds(self, param: str) -> tuple[float, float, float]:
        if param != "weight":
            return super()._bounds(param)
        p = self.spec.search.param(param)
        high = p.high if self.definition.effective_normalize else 2 * p.high
        low = -high if self.definition.allow_negative_weights else p.low
        return low, high, 1.0 / len(self.models)

    def _build_dimensions(self) -> list[Dimension]:
        return [Dimension(f"g{g}.{self.labels[m]}.{p}.{f or 'all'}", *self._bounds(p))
                for g in range(self.num_groups) for m in self.models for f in self.filters for p in self.params]

    def _index(self, g: int, m: int, f: int, p: int) -> int:
        return ((g * len(self.models) + m) * len(self.filters) + f) * len(self.params) + p

    def _layout(self) -> str:
        return (
            f"{self.num_groups} layer group(s) x {len(self.models)} model(s) x {len(self.filters)} "
            f"parameter set(s) x {len(self.params)} parameter(s)"
        )

    def anchors(self) -> list[tuple[str, list[float]]]:
        """The starting point (mergekit-evolve's: weight 1/n, every other gene at its start, which
        for task-vector methods is the uniform merge), task arithmetic's weight 1 per model
        (methods that do not normalise weights), and, for methods with a density, the common
        hand-made density 0.5. Switch genes stay on."""
        out = [("start: weight 1/n each", self.initial())]  # every method of this layout has a weight
        one = 1.0 if not self.definition.effective_normalize else 1.0 / len(self.models)
        if one != 1.0 / len(self.models):
            out.append(("weight 1 each", self._with({"weight": one})))
        if "density" in self.params:
            out.append((f"weight {one:.3g} each, density 0.5", self._with({"weight": one, "density": 0.5})))
        return distinct_anchors(out)

    def _with(self, values: dict[str, float]) -> list[float]:
        """The starting point with every gene of the named parameters set (clipped to its bounds)."""
        x = self.initial()
        for g in range(self.num_groups):
            for m in range(len(self.models)):
                for f in range(len(self.filters)):
                    for p, param in enumerate(self.params):
                        if param in values:
                            i = self._index(g, m, f, p)
                            x[i] = min(max(values[param], self.dimensions[i].low), self.dimensions[i].high)
        return x

    def _fixed_parameters(self) -> dict:
        params = {"normalize": self.definition.effective_normalize}
        if self.spec.task_vector is not None:
            params["int8_mask"] = True
        return params

    def _decode_genes(self, x: list[float]) -> dict:
        d = self.definition
        recipe: dict = {}
        if d.base_model is not None:
            recipe["base_model"] = str(d.base_model)
        recipe["parameters"] = self._fixed_parameters()

        def model_params(g: Optional[int], m: int) -> dict:
            out = {}
            for p_i, p in enumerate(self.params):
                if g is None:  # smooth: a gradient over the layer groups
                    per_filter = [
                        [x[self._index(gg, m, f_i, p_i)] for gg in range(self.num_groups)]
                        for f_i in range(len(self.filters))
                    ]
                else:
                    per_filter = [x[self._index(g, m, f_i, p_i)] for f_i in range(len(self.filters))]
                out[p] = self._setting(per_filter)
            return out

        if self.num_groups == 1 or d.smooth:
            group = 0 if self.num_groups == 1 else None
            recipe["models"] = [
                {"model": str(ref), "parameters": model_params(group, m)} for m, ref in enumerate(self.models)
            ]
            return recipe
        recipe["slices"] = [{"sources": self._slice_sources(g, lambda m: model_params(g, m))}
                            for g in range(self.num_groups)]
        return recipe

    def _encode_genes(self, config: MergeConfig, x: list[float]) -> None:
        for g, layer, t, scope, sources in self._group_points(config):
            for m, ref in enumerate(self.models):
                source = next((s for s in sources if s.model == ref), None)
                for f_i, f in enumerate(self.filters):
                    for p_i, p in enumerate(self.params):
                        value = lookup_parameter(scope, p, _filter_name(layer, f), t, source=source)
                        if value is not None:
                            x[self._index(g, m, f_i, p_i)] = value


class GlobalParamGenome(MethodGenome):
    """Methods whose searched parameters are global, under the recipe's (or a slice's)
    `parameters:`, one gene each per layer group and filter (the models take no genes):
    model_stock's filter_wise switch, the SVD methods' (tsvm, iso_c, iso_cts) alpha and shares."""

    def __init__(self, definition: GenomeDefinition, num_layers: int):
        search = METHODS[definition.merge_method].search
        self.switch_param = search.switch.name if search.switch else None
        self.global_params = tuple(q.name for q in search.global_params) + ((self.switch_param,) if self.switch_param else ())
        super().__init__(definition, num_layers)

    def _param_names(self) -> tuple[str, ...]:
        return self.global_params

    def _bounds(self, param: str) -> tuple[float, float, float]:
        p = self.spec.search.param(param)
        if p.initial is None:  # a share of the models (tsvm's rank_share: 1 / task models)
            tasks = [m for m in self.models if m != self.definition.base_model] or self.models
            return p.low, p.high, min(max(1.0 / len(tasks), p.low), p.high)
        return super()._bounds(param)

    def _build_dimensions(self) -> list[Dimension]:
        return [Dimension(f"g{g}.{p}.{f or 'all'}", *self._bounds(p))
                for g in range(self.num_groups) for f in self.filters for p in self.global_params]

    def _index(self, g: int, f: int, p: int) -> int:
        return (g * len(self.filters) + f) * len(self.global_params) + p

    def _layout(self) -> str:
        if self.global_params == (self.switch_param,):
            return f"{self.num_groups} layer group(s) x {len(self.filters)} parameter set(s), a {self.switch_param} switch each"
        return (f"{self.num_groups} layer group(s) x {len(self.filters)} parameter set(s) x "
                f"{len(self.global_params)} global parameter(s)")

    def _values(self, x: list[float], g: Optional[int]) -> dict:
        """The global parameters of one layer group (None: gradients over the groups, `smooth`);
        the switch is true where its gene is >= 0.5."""
        def value(gg: int, f: int, p: int):
            v = x[self._index(gg, f, p)]
            return bool(v >= 0.5) if self.global_params[p] == self.switch_param else v

        out = {}
        for p_i, p in enumerate(self.global_params):
            if g is None:
                per_filter = [[value(gg, f_i, p_i) for gg in range(self.num_groups)] for f_i in range(len(self.filters))]
            else:
                per_filter = [value(g, f_i, p_i) for f_i in range(len(self.filters))]
            out[p] = self._setting(per_filter)
        return out

    def _decode_genes(self, x: list[float]) -> dict:
        base = self.definition.base_model
        recipe: dict = {} if base is None else {"base_model": str(base)}
        if self.num_groups == 1 or self.definition.smooth:
            group = 0 if self.num_groups == 1 else None
            recipe.update({"models": [{"model": str(ref)} for ref in self.models], "parameters": self._values(x, group)})
            return recipe
        recipe["slices"] = [{"sources": self._slice_sources(g), "parameters": self._values(x, g)}
                            for g in range(self.num_groups)]
        return recipe

    def _encode_genes(self, config: MergeConfig, x: list[float]) -> None:
        for g, layer, t, scope, _ in self._group_points(config):
            for f_i, f in enumerate(self.filters):
                for p_i, p in enumerate(self.global_params):
                    value = lookup_parameter(scope, p, _filter_name(layer, f), t)
                    if value is None:
                        continue
                    if p == self.switch_param:
                        value = 1.0 if value else 0.0
                    x[self._index(g, f_i, p_i)] = float(value)


class SlerpGenome(MethodGenome):
    """slerp: per layer group, which two models of the pool (models and base_model) take part
    (a score per model, the two highest win; no genes with a pool of two) and `t` per filter."""

    def __init__(self, definition: GenomeDefinition, num_layers: int):
        pool = list(definition.models)
        if definition.base_model is not None and definition.base_model not in pool:
            pool.insert(0, definition.base_model)
        self.slerp_pool = pool
        self.scored = len(pool) if len(pool) > 2 else 0  # choice scores per layer group
        super().__init__(definition, num_layers)

    def _labelled(self) -> list[ModelReference]:
        return self.slerp_pool

    def _build_dimensions(self) -> list[Dimension]:
        dims = []
        for g in range(self.num_groups):
            if self.scored:  # which two models take part in this group: the two highest scores
                dims += [Dimension(f"g{g}.{self.labels[m]}.select", 0.0, 1.0, 0.5) for m in self.slerp_pool]
            dims += [Dimension(f"g{g}.t.{f or 'all'}", *self._bounds("t")) for f in self.filters]
        return dims

    def _layout(self) -> str:
        return f"{self.num_groups} layer group(s) x ({self.scored} model choice score(s) + {len(self.filters)} t)"

    def _pair(self, x: list[float], offset: int) -> tuple[ModelReference, ModelReference]:
        pool = self.slerp_pool
        if not self.scored:
            base = self.definition.base_model or pool[0]
            return base, next(m for m in pool if m != base)
        scores = x[offset : offset + len(pool)]
        order = sorted(range(len(pool)), key=lambda i: (-scores[i], i))
        return pool[order[0]], pool[order[1]]

    def _decode_genes(self, x: list[float]) -> dict:
        per_group = self.scored + len(self.filters)
        groups = []
        for g in range(self.num_groups):
            offset = g * per_group
            base, other = self._pair(x, offset)
            t_start = offset + self.scored
            groups.append((base, other, self._setting(x[t_start : t_start + len(self.filters)])))
        if self.num_groups == 1:
            base, other, t = groups[0]
            return {"base_model": str(base), "models": [{"model": str(base)}, {"model": str(other)}], "parameters": {"t": t}}
        slices = []
        for g, (base, other, t) in enumerate(groups):
            lr = self._layer_range(g)
            slices.append(
                {
                    "sources": [{"model": str(base), "layer_range": lr}, {"model": str(other), "layer_range": lr}],
                    "base_model": str(base),
                    "parameters": {"t": t},
                }
            )
        return {"slices": slices}

    def _encode_genes(self, config: MergeConfig, x: list[float]) -> None:
        per_group = self.scored + len(self.filters)
        for g, layer, t_frac, scope, sources in self._group_points(config):
            t_start = g * per_group + self.scored
            if self.scored:
                # the recipe's pair keeps the two top scores: its base first, the other second
                base = scope.slice_def.base_model if scope.slice_def is not None and scope.slice_def.base_model else config.base_model
                used = [s.model for s in sources]
                for i, m in enumerate(self.slerp_pool):
                    x[g * per_group + i] = 1.0 if m == base else (0.5 if m in used else 0.0)
            for f_i, f in enumerate(self.filters):
                value = lookup_parameter(scope, "t", _filter_name(layer, f), t_frac)
                if value is not None:
                    x[t_start + f_i] = value


def method_genome(definition: GenomeDefinition, num_layers: int) -> MethodGenome:
    """The genome of one merge method (`definition.merge_method` a string): slerp's own layout,
    global parameters only (model_stock's switch, the SVD methods), else per-model parameters."""
    if definition.merge_method == "slerp":
        return SlerpGenome(definition, num_layers)
    search = METHODS[definition.merge_method].search
    if search.global_params or search.switch:
        return GlobalParamGenome(definition, num_layers)
    return WeightedGenome(definition, num_layers)


def distinct_anchors(anchors: list[tuple[str, list[float]]]) -> list[tuple[str, list[float]]]:
    """The anchors in order, each genotype once (the first label kept)."""
    seen, out = set(), []
    for label, x in anchors:
        if tuple(x) not in seen:
            seen.add(tuple(x))
            out.append((label, x))
    return out


def switch_line(n_models: int) -> str:
    return f"switch genes: {n_models} (one per model; below 0.5 = weight exactly 0; one model always stays on)"


class MethodChoiceGenome(Genome):
    """`merge_method` as a list: one categorical gene picks the method, then each method has its
    own genes (a Genome per method, its dimension names prefixed with the method's name); the
    genes of the methods not picked are ignored. The method gene is global, not per layer group:
    a mergekit recipe has one merge_method. Layout: [method, genes of method 1, genes of method 2,
    ..., switch genes (model_switch)]."""

    def __init__(self, definition: GenomeDefinition, num_layers: int):
        self.definition = definition
        self.num_layers = num_layers
        self.methods = definition.methods
        self.choices = [method_genome(definition.for_method(m), num_layers) for m in self.methods]
        self.models: list[ModelReference] = list(definition.models)
        k = len(self.methods)
        self.dimensions = [Dimension("method", 0.0, float(k), 0.5)]  # starts on the first method
        self.offsets = []
        for method, sub in zip(self.methods, self.choices):
            self.offsets.append(len(self.dimensions))
            self.dimensions += [Dimension(f"{method}.{d.name}", d.low, d.high, d.initial) for d in sub.dimensions]
        self.num_params = len(self.dimensions)
        self.switched = bool(definition.model_switch)
        if self.switched:
            labels = _unique_labels(self.models)
            self.dimensions += switch_dimensions([labels[m] for m in self.models])

    @property
    def groups(self) -> tuple[tuple[int, int], ...]:
        return self.choices[0].groups  # every method's genome has the same layer groups

    def chosen(self, x: Sequence[float]) -> int:
        return category(x[0], len(self.methods))

    def anchors(self) -> list[tuple[str, list[float]]]:
        """Each method's anchors, with the method gene on that method (the first method's start
        is the genome's starting point)."""
        out = []
        for i, (method, sub) in enumerate(zip(self.methods, self.choices)):
            for label, genes in sub.anchors():
                x = self.initial()
                x[0] = i + 0.5
                x[self.offsets[i] : self.offsets[i] + sub.size] = genes
                out.append((f"{method}, {label}", x))
        return distinct_anchors(out)

    def summary(self) -> str:
        switches = " + a switch per model" if self.switched else ""
        return f"(a method gene + each method's own genes{switches}); methods {', '.join(self.methods)}"

    def describe(self) -> list[str]:
        k = len(self.methods)
        lines = [f"method gene: 1 (categorical over {', '.join(self.methods)}: floor of a value in [0, {k}])"]
        for sub in self.choices:
            lines += sub.describe()
        if self.switched:
            weighted = [m for m, sub in zip(self.methods, self.choices) if sub.spec.search.weighted]
            lines.append(switch_line(len(self.models)) + f"; used by {', '.join(weighted)}")
        return lines

    def explain(self, x: Sequence[float]) -> GenotypeView:
        x = self._check(x)
        i = self.chosen(x)
        sub = self.choices[i]
        switches = ()
        if self.switched and sub.spec.search.weighted:  # the other methods ignore the switches
            labels = _unique_labels(self.models)
            switches = tuple((labels[m], not o) for m, o in zip(self.models, switched_off(x[self.num_params :])))
        return GenotypeView(self.methods[i], methods=tuple(self.methods), groups=sub.groups,
                            genes=sub.gene_values(self.decode(x), prefix=f"{self.methods[i]}."), models=switches)

    def decode_plain(self, x: list[float]) -> dict:
        i = self.chosen(x)
        sub = self.choices[i]
        recipe = sub.decode_plain(x[self.offsets[i] : self.offsets[i] + sub.size])
        if self.switched and sub.spec.search.weighted:
            off = switched_off(x[self.num_params :])
            zero_weights(recipe, {str(m) for m, o in zip(self.models, off) if o})
        return recipe

    def encode(self, config: MergeConfig) -> list[float]:
        """The recipe's method picked, its genes encoded; the other methods keep their start."""
        if config.merge_method not in self.methods:
            raise ConfigError(
                f"warm start: recipe uses {config.merge_method}, the genome one of {', '.join(self.methods)}"
            )
        i = self.methods.index(config.merge_method)
        x = self.initial()
        x[0] = i + 0.5
        x[self.offsets[i] : self.offsets[i] + self.choices[i].size] = self.choices[i].encode(config)
        if self.switched:
            x[self.num_params :] = encode_switches(config, self.models)
        return self._check(x)


def parameter_genome(definition: GenomeDefinition, num_layers: int) -> Genome:
    """The genome of a `kind: parameter_space` definition: one method, or a choice of methods."""
    if isinstance(definition.merge_method, str):
        return method_genome(definition, num_layers)
    return MethodChoiceGenome(definition, num_layers)
