"""The method registry (merge_engine.methods.METHODS) is the single source of truth: its facts are
consistent with each other, the code paths that used to keep their own tables follow it, and the
docs' tables say what it says."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from merge_engine.methods import (
    DELLA_DENSITY,
    DELLA_EPSILON,
    DENSITY,
    FILTER_WISE,
    GAMMA,
    METHODS,
    REQUIRED,
    SLERP_T,
    searchable_methods,
    task_vector_methods,
)

REPO = Path(__file__).resolve().parents[1]
FAMILY = {"task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"}


def test_task_vector_family_facts():
    assert set(task_vector_methods()) == FAMILY
    for name in FAMILY:
        spec = METHODS[name]
        tv = spec.task_vector
        assert spec.requires_base and spec.embed_shape == "base"
        assert tv.consensus == (name in ("ties", "dare_ties", "breadcrumbs_ties", "della"))
        assert spec.random == tv.random == (tv.sparsify in ("random", "della_magprune"))
        if tv.extra is not None:
            assert tv.extra in spec.model_params
        # every task-vector method takes a weight and a density per model
        assert spec.model_params["weight"] is REQUIRED and spec.model_params["density"] == 1.0
    assert METHODS["ties"].task_vector.sparsify == "magnitude"
    assert METHODS["task_arithmetic"].task_vector.sparsify is None


def test_search_facts_are_valid_parameters_with_valid_bounds():
    for name in searchable_methods():
        spec = METHODS[name]
        for p in spec.search.params + spec.search.global_params + ((spec.search.switch,) if spec.search.switch else ()):
            assert p.name in spec.model_params or p.name in spec.global_params, (name, p.name)
            assert p.low < p.high
            assert p.initial is None or p.low <= p.initial <= p.high, (name, p)
        assert spec.search.needs_base == (spec.requires_base and name != "slerp")
    # DELLA: density +/- epsilon stays inside (0, 1) at every corner of the box
    for density in (DELLA_DENSITY.low, DELLA_DENSITY.high):
        assert 0 < density - DELLA_EPSILON.high and density + DELLA_EPSILON.high < 1


def test_search_config_and_genome_read_the_registry():
    from evolve.config import parse_search_config
    from search_spaces.definition import SEARCHABLE_METHODS
    from search_spaces.genome import MethodGenome, method_genome

    assert set(SEARCHABLE_METHODS) == set(searchable_methods())
    for name in searchable_methods():
        spec = METHODS[name]
        genome = {"models": ["/m/a", "/m/b", "/m/c"], "merge_method": name}
        if spec.search.needs_base:
            with pytest.raises(Exception, match="needs base_model"):
                parse_search_config({"genome": genome, "tasks": ["t"]})
            genome["base_model"] = "/m/base"
        definition = parse_search_config({"genome": genome, "tasks": ["t"]}).genome
        assert definition.effective_normalize == spec.search.normalize
        g = method_genome(definition, num_layers=2)
        assert g.params == spec.search.names
        for dim in g.dimensions:
            param = dim.name.split(".")[-2]
            if param == "weight" or dim.name.endswith(".select"):  # weights: the genome's rule; slerp's model choice
                continue
            p = spec.search.param(param)
            initial = p.initial if p.initial is not None else 1 / 3  # a share of the three task models
            assert (dim.low, dim.high, dim.initial) == (p.low, p.high, initial), dim
        recipe = g.decode([d.initial for d in g.dimensions])
        assert recipe.parameters.get("int8_mask") == (True if spec.task_vector else None)


# ----------------------------------------------------------------------------------------------
# docs


def _value(text: str):
    return {"true": True, "false": False}[text] if text in ("true", "false") else float(text)


def test_readme_method_table_matches_the_registry():
    readme = (REPO / "README.md").read_text()
    start = readme.index("| method | base model | global parameters | per-model parameters |")
    rows = []
    for line in readme[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    listed = set()
    for names_cell, base_cell, global_cell, model_cell in rows:
        names = re.findall(r"`(\w+)`", names_cell)
        listed.update(names)
        specs = [METHODS[n] for n in names]
        for spec in specs:
            assert ("required" in base_cell) == spec.requires_base, spec.name
        for cell, kind in ((global_cell, "global_params"), (model_cell, "model_params")):
            for param, default in re.findall(r"`(\w+)`(?: \(([^)]*)\))?", cell):
                if param in METHODS:  # "`ramplus_tl` also ..."
                    continue
                owners = [s for s in specs if param in getattr(s, kind)]
                assert owners, f"README: {names_cell}: {param} is not a parameter of the method"
                if default:
                    for s in owners:
                        actual = getattr(s, kind)[param]
                        assert actual == _value(default), f"README: {s.name}.{param} default {default}, registry {actual}"
    assert listed == set(METHODS)


def _num(x: float) -> str:
    return f"{x:g}"


def test_genome_docs_match_the_registry():
    doc = (REPO / "docs" / "mergekit-evolve.md").read_text()
    rows = [
        f"| `density` | [{_num(DENSITY.low)}, {_num(DENSITY.high)}]; della: [{_num(DELLA_DENSITY.low)}, "
        f"{_num(DELLA_DENSITY.high)}] | {_num(DENSITY.initial)}; della: {_num(DELLA_DENSITY.initial)} |",
        f"| `epsilon` (della, della_linear) | [{_num(DELLA_EPSILON.low)}, {_num(DELLA_EPSILON.high)}]",
        f"| `gamma` (breadcrumbs, breadcrumbs_ties) | [{_num(GAMMA.low)}, {_num(GAMMA.high)}] | {_num(GAMMA.initial)} |",
        f"| `t` (slerp) | [{_num(SLERP_T.low)}, {_num(SLERP_T.high)}] | {_num(SLERP_T.initial)} |",
        f"{_num(FILTER_WISE.initial)} (off) |",
    ]
    for row in rows:
        assert row in doc, row
    text = " ".join(doc.split())
    searchable = text[text.index("Searchable methods:"):text.index("`normalize` defaults")]
    assert {n for n in re.findall(r"`(\w+)`", searchable) if n in METHODS} == set(searchable_methods())
    sentence = text[text.index("`normalize` defaults to on for"):].split(".")[0]
    assert set(re.findall(r"`(\w+)`", sentence)) - {"normalize"} == {
        n for n in searchable_methods() if METHODS[n].search.normalize
    }
