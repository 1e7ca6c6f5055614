"""`kind: layer_path`: a frankenmerge search (the data-flow space of evolutionary model merging).

The output has `num_layers` decoder layers. For each output position i the genome holds:

- `p{i}.model` (only with two or more models): a categorical gene in [0, k] over `genome.models`,
  decoded by floor (clamped to k - 1 at the upper bound);
- `p{i}.layer`: the source layer's relative depth in [0, 1]; in a model of L layers it is layer
  floor(value * L), clamped to L - 1. A relative depth keeps its meaning when the model gene
  changes and lets models of different depths share one path;
- `p{i}.scale` (with `scale: true`): a factor in `scale_range` for the tensors whose names contain
  one of `scale_filters` (by default `o_proj` and `down_proj`: what the layer adds to the residual
  stream); every other tensor of the layer is copied unscaled.

No input layer may appear more than `max_repeats` times. A genotype that asks for a layer already
used that often decodes, position by position from the first, to the nearest layer of the same
model that is still free (the shallower of two equally near ones); if the model has none left, to
the next model in the list (cyclically) at the same relative depth, by the same rule. The decoded
recipe is therefore a deterministic function of the genotype, and the config is refused up front
when `num_layers` exceeds `max_repeats` x the models' layers (no valid path exists).

The recipe is `merge_method: passthrough` with one slice per run of consecutive layers of one model
with the same scale (a run is exactly its layers one by one), each with `parameters: {scale: ...}`
when scale genes exist. As in mergekit, the embeddings come from the first slice's model and the
final norm and LM head from the last slice's. The starting point is the identity path: model 0's
layers in order (spread evenly when `num_layers` differs from its layer count), scale 1. With a
finished search's `final_model` as model 0 (PS+DFS), the search therefore starts at that merge.
Search workers re-point unscaled layers to their resident inputs instead of copying them
(merge_engine.resident).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

from merge_engine.config import MergeConfig, ParameterScope, lookup_parameter
from merge_engine.errors import ConfigError

from .definition import GenomeDefinition
from .genome import Dimension, GenotypeView, Genome, distinct_anchors, _unique_labels, category


class LayerPathGenome(Genome):
    def __init__(self, definition: GenomeDefinition, layer_counts: Sequence[int]):
        """`definition`: of kind layer_path; `layer_counts`: each model's number of layers, in the
        order of `definition.models`."""
        d = self.definition = definition
        self.models = list(d.models)
        self.layer_counts = list(layer_counts)
        self.num_layers = d.num_layers or self.layer_counts[0]
        self.max_repeats = d.max_repeats
        capacity = self.max_repeats * sum(self.layer_counts)
        if self.num_layers > capacity:
            raise ConfigError(
                f"genome.num_layers: {self.num_layers} output layers, but max_repeats {self.max_repeats} x the "
                f"models' {sum(self.layer_counts)} layers allow at most {capacity}"
            )
        self.labels = _unique_labels(self.models)
        self.scale_filters = list(d.scale_filters) if d.scale else []
        k = len(self.models)
        dims = []
        for i in range(self.num_layers):
            if k > 1:
                dims.append(Dimension(f"p{i}.model", 0.0, float(k), 0.5))
            dims.append(Dimension(f"p{i}.layer", 0.0, 1.0, (i + 0.5) / self.num_layers))
            if d.scale:
                dims.append(Dimension(f"p{i}.scale", d.scale_range[0], d.scale_range[1], 1.0))
        self.dimensions = dims
        self.per_position = len(dims) // self.num_layers

    # -- decode ---------------------------------------------------------------------------------

    def _genes(self, x: Sequence[float], i: int) -> tuple[int, float, float]:
        """Position i's (model, relative depth, scale) as the genotype asks for them."""
        at = i * self.per_position
        model = 0
        if len(self.models) > 1:
            model, at = category(x[at], len(self.models)), at + 1
        depth = x[at]
        scale = x[at + 1] if self.scale_filters else 1.0
        return model, depth, scale

    def _layer(self, model: int, depth: float) -> int:
        n = self.layer_counts[model]
        return min(max(int(math.floor(depth * n)), 0), n - 1)

    def _place(self, model: int, depth: float, used: Counter) -> tuple[int, int]:
        """The layer position i gets: the asked one, or the nearest free one (module docstring)."""
        k = len(self.models)
        for step in range(k):
            m = (model + step) % k
            n = self.layer_counts[m]
            want = self._layer(m, depth)
            for dist in range(n):
                for layer in (want - dist, want + dist) if dist else (want,):
                    if 0 <= layer < n and used[(m, layer)] < self.max_repeats:
                        return m, layer
        raise AssertionError("no free layer: the capacity check in __init__ rules this out")

    def path(self, x: Sequence[float]) -> list[tuple[int, int, float]]:
        """(model index, source layer, scale) for each output position of a clipped genotype."""
        used: Counter = Counter()
        out = []
        for i in range(self.num_layers):
            model, depth, scale = self._genes(x, i)
            m, layer = self._place(model, depth, used)
            used[(m, layer)] += 1
            out.append((m, layer, scale))
        return out

    def explain(self, x: Sequence[float]) -> GenotypeView:
        path = self.path(self._check(x))
        return GenotypeView("passthrough", path=tuple(
            (self.labels[self.models[m]], layer, scale if self.scale_filters else None) for m, layer, scale in path))

    def _scale_setting(self, scale: float) -> list:
        return [{"filter": f, "value": scale} for f in self.scale_filters] + [{"value": 1.0}]

    def decode_plain(self, x: list[float]) -> dict:
        runs: list[list] = []  # [model, first layer, end layer, scale]
        for m, layer, scale in self.path(x):
            last = runs[-1] if runs else None
            if last is not None and last[0] == m and last[2] == layer and last[3] == scale:
                last[2] = layer + 1
            else:
                runs.append([m, layer, layer + 1, scale])
        slices = []
        for m, start, end, scale in runs:
            source = {"model": str(self.models[m]), "layer_range": [start, end]}
            if self.scale_filters:
                source["parameters"] = {"scale": self._scale_setting(scale)}
            slices.append({"sources": [source]})
        return {"merge_method": "passthrough", "dtype": self.definition.dtype, "slices": slices}

    # -- encode ---------------------------------------------------------------------------------

    def encode(self, config: MergeConfig) -> list[float]:
        """A genotype for a passthrough recipe over this genome's models with `num_layers` layers
        (a warm start); scales are read for the first scale filter's tensors. decode(encode(r))
        is r itself when r's runs are maximal and its layers within `max_repeats`."""
        if config.merge_method != "passthrough":
            raise ConfigError(f"warm start: recipe uses {config.merge_method}, a layer_path genome passthrough")
        positions = []
        if config.slices:
            for slc in config.slices:
                source = slc.sources[0]
                start, end = source.layer_range
                for j, layer in enumerate(range(start, end)):
                    t = j / (end - start - 1) if end - start > 1 else 1.0
                    positions.append((source, slc, layer, t))
        else:
            for entry in config.models or []:
                n = self.layer_counts[self._model_index(entry.model)]
                positions += [(entry, None, layer, layer / (n - 1) if n > 1 else 1.0) for layer in range(n)]
        if len(positions) != self.num_layers:
            raise ConfigError(f"warm start: recipe has {len(positions)} layers, the genome {self.num_layers}")
        x = []
        for source, slc, layer, t in positions:
            m = self._model_index(source.model)
            if len(self.models) > 1:
                x.append(m + 0.5)
            x.append((layer + 0.5) / self.layer_counts[m])
            if self.scale_filters:
                scope = ParameterScope(slc, None, config.parameters)
                name = f"model.layers.{layer}.{self.scale_filters[0]}.weight"
                value = lookup_parameter(scope, "scale", name, t, source=source)
                x.append(1.0 if value is None else value)
        return self._check(x)

    def anchors(self) -> list[tuple[str, list[float]]]:
        """The identity path of every model (its layers in order, spread evenly when its depth
        differs from `num_layers`, scale 1): the starting point is model 0's."""
        k = len(self.models)
        out = []
        for m, label in enumerate(self.labels[ref] for ref in self.models):
            x = self.initial()
            if k > 1:
                for i in range(self.num_layers):
                    x[i * self.per_position] = m + 0.5
            out.append((f"{label} as it is" if self.layer_counts[m] == self.num_layers else f"{label}'s layers, spread",
                        self._check(x)))
        return distinct_anchors(out)

    def _model_index(self, ref) -> int:
        if ref not in self.models:
            raise ConfigError(f"warm start: recipe uses model {ref}, which is not in genome.models")
        return self.models.index(ref)

    # -- the dry run ----------------------------------------------------------------------------

    def summary(self) -> str:
        return f"({self.num_layers} output position(s) x {self.per_position} gene(s)); layer path, passthrough"

    def describe(self) -> list[str]:
        k = len(self.models)
        genes = (["source model (floor of [0, %d])" % k] if k > 1 else []) + ["source layer (relative depth in [0, 1])"]
        if self.scale_filters:
            low, high = self.definition.scale_range
            genes.append(f"scale in [{low}, {high}] of {', '.join(self.scale_filters)}")
        sources = ", ".join(f"{self.labels[m]} ({n} layers)" for m, n in zip(self.models, self.layer_counts))
        return [
            f"layer-path position genes: {self.num_layers} position(s) x {self.per_position} "
            f"({'; '.join(genes)})",
            f"output: {self.num_layers} layers (passthrough slices) from {sources}; each input layer at most "
            f"{self.max_repeats} time(s), a layer used up goes to the nearest free one",
            f"starting point: the identity path of {self.labels[self.models[0]]} ("
            + ("its layers in order" if self.num_layers == self.layer_counts[0] else "its layers spread evenly")
            + (", scale 1)" if self.scale_filters else ")"),
        ]
