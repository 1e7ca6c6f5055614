"""Hand-made merge recipes of the SmolLM2 experiment (references, not baselines a search must beat):
what the experiment's construction says a good per-layer-group recipe is."""

from __future__ import annotations

from experiments.smollm.build_models import LAYERS_PER_GROUP
from experiments.smollm.skills import EXPERTS, HARMFUL, SKILLS


def group_recipe(models: dict, weights: dict[str, list[float]]) -> dict:
    """A task-arithmetic recipe with one weight per expert and group of ten layers (what the
    search's genome decodes to): `weights[expert][g]` for group g; experts left out get 0."""
    slices = []
    for g in range(len(SKILLS)):
        span = [g * LAYERS_PER_GROUP, (g + 1) * LAYERS_PER_GROUP]
        sources = [{"model": str(models[f"expert_{e}"]), "layer_range": span,
                    "parameters": {"weight": float(weights.get(e, [0.0] * len(SKILLS))[g])}}
                   for e in EXPERTS if f"expert_{e}" in models]
        slices.append({"sources": sources + [{"model": str(models["base"]), "layer_range": span}]})
    return {"merge_method": "task_arithmetic", "base_model": str(models["base"]), "dtype": "float32", "slices": slices}


def own_groups(rivals: float = 0.0) -> dict[str, list[float]]:
    """Group k from skill expert k at weight 1, the rival skill experts at `rivals`, nothing from
    the harmful expert."""
    return {e: [1.0 if g == k else rivals for g in range(len(SKILLS))] for k, e in enumerate(SKILLS)} | {
        HARMFUL: [0.0] * len(SKILLS)}


def references(models: dict) -> dict[str, str]:
    """{name: recipe YAML} of the hand-made recipes (bench/search_quality.py's `references`)."""
    import yaml

    return {
        "own layer groups by hand": yaml.safe_dump(group_recipe(models, own_groups()), sort_keys=False),
        "own groups, rivals 0.2 by hand": yaml.safe_dump(group_recipe(models, own_groups(0.2)), sort_keys=False),
    }
