"""report.html for every genome kind: a parameter space, a list of methods (a method gene), model
switches, a layer path and a Pareto search (issue 22: the report asked every genome for
`num_groups`, which only the parameter-space layout has, so `mergekit-evolve report DIR` and the
report at the end of a search failed on the others).

Each experiment is a real one written without Ray, as tests/test_html_report.py writes it: a real
genome over real tiny llama checkpoints (the layer path also over a deeper model of its own), a
real optimiser, the loop and the experiment store, with metrics computed from the genotype. The
page is parsed (html.parser) and checked against what the test reads from the SQLite study itself
and computes on its own: trial counts, the best trial, and what the page says of its recipe (the
method picked, the models switched in, the layer path, the heat map's genes, the Pareto front).
"""

from __future__ import annotations

import logging
import math
import subprocess
from pathlib import Path

import pytest
import yaml

from evolve.config import parse_search_config
from evolve.html_report import write_report
from evolve.loop import Outcome, run_loop
from evolve.objectives import Scoring
from evolve.report import RunRecord, append_run, export_pareto
from evolve.build import build_genome, build_optimizer
from evolve.store import ExperimentStore, recipe_hash
from test_html_report import ENV, EVOLVE, Rows, study_rows

FAILED = 3  # this candidate's worker "dies" in every experiment: a failed trial
DIRECTIONS = {"t_a": "maximize", "t_b": "minimize"}


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


class GenotypeRunner:
    """The loop's Runner, one candidate at a time: `metrics(genes)` from the genotype by name."""

    capacity = 1

    def __init__(self, genome, config, metrics):
        self.genome = genome
        self.scoring = Scoring.for_search(config, DIRECTIONS)
        self.metrics = metrics
        self.pending = []

    def submit(self, candidate) -> None:
        self.pending.append(candidate)

    def wait(self):
        c = self.pending.pop(0)
        if c.number == FAILED:
            return [(c, Outcome("failed", None, error="worker died", attempts=2))]
        metrics = self.metrics(dict(zip((d.name for d in self.genome.dimensions), c.genotype)))
        scored = self.scoring.score(metrics)
        return [(c, Outcome("complete", scored.fitness, metrics, timings={"eval_s": 0.1}, objectives=scored.objectives,
                            violation=scored.violation, recipe_hash=recipe_hash(self.genome.decode(c.genotype))))]


def run_experiment(root: Path, search: dict, metrics, budget: int) -> None:
    """What SearchRun does with the store (open, loop, close, runs.jsonl), and for a Pareto search
    its export of the front (pareto/)."""
    text = yaml.safe_dump(search)
    config = parse_search_config(yaml.safe_load(text))
    genome = build_genome(config)
    store = ExperimentStore(root, genome.space)
    store.open(text, {"optimizer": 0}, resume=False)
    runner = GenotypeRunner(genome, config, metrics)
    store.set_directions(runner.scoring.directions)
    run_loop(build_optimizer(config, genome, genome.initial()), runner, store, budget)
    store.close()  # every result in the study before the export reads it, as in SearchRun
    if config.objective_tasks:
        export_pareto(store, genome, runner.scoring)
    append_run(root, RunRecord(started="2026-01-01T00:00:00", ended="2026-01-01T00:01:00", stop_reason="budget spent",
                               evaluated=budget))


# -- the experiments ----------------------------------------------------------------------------


def _tasks(pareto: bool = False) -> dict:
    return {"tasks": [{"name": "t_a"}, {"name": "t_b", "direction": "minimize"}],
            **({"objectives": "pareto"} if pareto else {})}


def _parameter_space(m):
    genome = {"models": [m["a"], m["b"]], "base_model": m["base"], "merge_method": "ties", "layer_granularity": 2,
              "dtype": "float32"}

    def metrics(g):
        return {"t_a": mean(v for n, v in g.items() if ".ft_a.weight." in n),
                "t_b": mean(v for n, v in g.items() if ".ft_b.density." in n)}

    return genome, metrics, "tpe", 12


def _method_list(m):
    genome = {"models": [m["a"], m["b"]], "base_model": m["base"], "merge_method": ["linear", "ties", "task_arithmetic"],
              "layer_granularity": 2, "dtype": "float32"}

    def metrics(g):  # ties scores best; within a method, ft_a's weight helps
        method = min(int(g["method"]), 2)
        return {"t_a": (1.0 if method == 1 else 0.0) + mean(v for n, v in g.items() if ".ft_a.weight." in n) / 4,
                "t_b": 0.5}

    return genome, metrics, "random", 14


def _model_switches(m):
    genome = {"models": [m["base"], m["a"], m["b"]], "merge_method": "linear", "model_switch": True, "dtype": "float32"}

    def metrics(g):  # ft_a in and ft_b out score best
        return {"t_a": g["switch.ft_a"] - g["switch.ft_b"], "t_b": 0.25 * g["switch.base"]}

    return genome, metrics, "random", 12


def _layer_path(m):
    genome = {"kind": "layer_path", "models": [m["a"], m["deep"]], "num_layers": 5, "scale": True, "max_repeats": 1,
              "dtype": "float32"}

    def metrics(g):  # the deep model's layers at odd positions, ft_a's at even ones; scales near 1
        mix = mean((g[f"p{i}.model"] >= 1) == (i % 2 == 1) for i in range(5))
        return {"t_a": mix, "t_b": mean(abs(g[f"p{i}.scale"] - 1) for i in range(5))}

    return genome, metrics, "tpe", 14


def _pareto(m):
    genome, metrics, _, _ = _parameter_space(m)
    return genome, metrics, "nsga2", 16


KINDS = {"parameter_space": _parameter_space, "method_list": _method_list, "model_switches": _model_switches,
         "layer_path": _layer_path, "pareto": _pareto}


@pytest.fixture(scope="module")
def models(llama_models, tmp_path_factory):
    """Paths as strings: the tiny llama base and fine-tunes (4 layers), and a 6-layer model of the
    same width for the layer path (models of different depths share one path)."""
    from helpers import make_model, tiny_config

    deep = make_model(tmp_path_factory.mktemp("deep") / "deep", tiny_config("llama", layers=6), seed=3)
    return {"base": str(llama_models["base"]), "a": str(llama_models["a"]), "b": str(llama_models["b"]), "deep": str(deep)}


@pytest.fixture(scope="module")
def experiments(models, tmp_path_factory):
    out = {}
    for kind, make in KINDS.items():
        genome, metrics, optimizer, budget = make(models)
        root = tmp_path_factory.mktemp(kind) / "run"
        search = {"genome": genome, **_tasks(pareto=kind == "pareto"), "optimizer": {"name": optimizer, "seed": 0},
                  "budget": {"max_fevals": budget}}
        run_experiment(root, search, metrics, budget)
        out[kind] = (root, search, budget)
    return out


def render_with_cli(root: Path) -> str:
    """`mergekit-evolve report DIR`, as a user runs it."""
    (root / "report.html").unlink(missing_ok=True)
    proc = subprocess.run([EVOLVE, "report", str(root)], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == str(root / "report.html") and "Traceback" not in proc.stderr
    return (root / "report.html").read_text()


def check_common(root: Path, budget: int, text: str) -> dict:
    """The header against the study (read with sqlite3): counts and the best trial; returns the best row."""
    rows = study_rows(root)
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    assert len(rows) == budget and [r["number"] for r in rows if r["state"] == "FAIL"] == [FAILED]
    assert f"{budget} finished ({budget - 1} complete, 1 failed), 0 running" in text
    best = max(complete, key=lambda r: (r["value"], -r["number"]))
    assert f'<span id="best-fitness" data-value="{best["value"]!r}">{best["value"]:.6g}</span> (trial {best["number"]})' in text
    assert f"<p>Trial {best['number']}, fitness {best['value']:.6g}" in text
    assert "<script" not in text and 'src="http' not in text
    return best


class Page(Rows):
    """Rows, plus every element's attributes by id."""

    def __init__(self, text: str):
        self.ids: dict[str, dict] = {}
        super().__init__(text)

    def handle_starttag(self, tag, attrs):
        super().handle_starttag(tag, attrs)
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids[attrs["id"]] = attrs

    def heat(self) -> dict[str, float]:
        return {c["data-dim"]: float(c["data-value"]) for c in self.cells if c.get("class") == "heat"}


def label(path: str) -> str:
    return Path(path).name


# -- the tests ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_parameter_space(experiments):
    root, search, budget = experiments["parameter_space"]
    text = write_report(root).read_text()
    best = check_common(root, budget, text)
    page = Page(text)
    assert page.ids["merge-method"]["data-method"] == "ties" and "picked by the method gene" not in text
    # the heat map: every gene (2 layer groups x 2 models x 1 parameter set x weight, density) at the
    # value the best trial's recipe merges; columns are the layer groups
    assert page.heat() == pytest.approx(best["params"], rel=1e-12, abs=0) and len(best["params"]) == 8
    assert "<th>layers 0-1</th><th>layers 2-3</th>" in text
    assert "<tr><th>ft_a.weight.all</th>" in text and "<tr><th>ft_b.density.all</th>" in text
    assert not page.with_class("model-switch") and not page.with_class("path-position")


@pytest.mark.slow
def test_method_list(experiments):
    """The method the best trial's gene picks, and the heat map of that method's genes only (the
    other methods' genes are not merged); rendered by the CLI."""
    root, search, budget = experiments["method_list"]
    text = render_with_cli(root)
    best = check_common(root, budget, text)
    methods = search["genome"]["merge_method"]
    picked = methods[min(max(math.floor(best["params"]["method"]), 0), len(methods) - 1)]
    assert picked == "ties"  # the metrics favour it
    page = Page(text)
    assert page.ids["merge-method"]["data-method"] == picked
    assert "(picked by the method gene; the other choice(s): linear, task_arithmetic)" in text
    own = {n: v for n, v in best["params"].items() if n.startswith(f"{picked}.")}
    assert len(own) == 2 * 2 * 2 and page.heat() == pytest.approx(own, rel=1e-12, abs=0)
    assert "<th>layers 0-1</th><th>layers 2-3</th>" in text and "<tr><th>ft_b.density.all</th>" in text
    assert "merge_method: ties" in text  # the recipe's YAML
    # every method was tried (the page is not showing a method by default)
    tried = {methods[min(math.floor(r["params"]["method"]), 2)] for r in study_rows(root) if r["state"] == "COMPLETE"}
    assert tried == set(methods)


@pytest.mark.slow
def test_model_switches(experiments):
    """Which models the best trial's switch genes leave in (below 0.5 = out, one always stays),
    and the heat map's weights as merged: exactly 0 for a model switched out."""
    root, search, budget = experiments["model_switches"]
    text = write_report(root).read_text()
    best = check_common(root, budget, text)
    labels = [label(m) for m in search["genome"]["models"]]
    genes = [best["params"][f"switch.{name}"] for name in labels]
    merged = [g >= 0.5 for g in genes]
    if not any(merged):
        merged[genes.index(max(genes))] = True
    assert merged == [merged[0], True, False]  # the metrics favour ft_a in, ft_b out
    page = Page(text)
    listed = page.with_class("model-switch")
    assert [(a["data-model"], a["data-in"], c) for a, c in listed] == [
        (name, str(m).lower(), [name, "in" if m else "out (weight 0)"]) for name, m in zip(labels, merged)]
    assert f"Models in the merge (switch genes): {sum(merged)} of 3." in text
    expected = {f"g0.{name}.weight.all": best["params"][f"g0.{name}.weight.all"] if m else 0.0
                for name, m in zip(labels, merged)}
    assert page.heat() == pytest.approx(expected, rel=1e-12, abs=0)
    assert page.ids["merge-method"]["data-method"] == "linear"


def _expected_path(search: dict, params: dict) -> list[tuple[str, int, float]]:
    """(model, layer, scale) per output layer from the recipe the best genotype decodes to: its
    passthrough slices expanded layer by layer, the scale read from the slice's conditional list."""
    config = parse_search_config(search)
    genome = build_genome(config)
    recipe = genome.decode([params[d.name] for d in genome.dimensions])
    out = []
    for slc in recipe.slices:
        (source,) = slc.sources
        scale = [c.value for c in source.parameters["scale"] if c.filter == "o_proj"]
        for layer in range(*source.layer_range):
            out.append((label(source.model.model.path), layer, scale[0]))
    return out


@pytest.mark.slow
def test_layer_path(experiments):
    """Which model's layer each output layer is, with its scale: from the CLI, and from the report
    a search writes when it ends (issue 22's 'report.html not written')."""
    from evolve.cli import _write_report

    root, search, budget = experiments["layer_path"]
    text = render_with_cli(root)
    best = check_common(root, budget, text)
    expected = _expected_path(search, best["params"])
    assert len(expected) == 5 and {m for m, _, _ in expected} == {"ft_a", "deep"}
    page = Page(text)
    listed = page.with_class("path-position")
    assert [(int(a["data-position"]), a["data-model"], int(a["data-layer"]), float(a["data-scale"])) for a, _ in listed] == [
        (i, m, layer, pytest.approx(s, rel=1e-12, abs=0)) for i, (m, layer, s) in enumerate(expected)]
    assert [c for _, c in listed] == [[str(i), m, str(layer), f"{s:.3f}"] for i, (m, layer, s) in enumerate(expected)]
    counts = {m: sum(1 for e in expected if e[0] == m) for m in dict.fromkeys(e[0] for e in expected)}
    assert "Layer path: 5 output layers, " + ", ".join(f"{n} from {m}" for m, n in counts.items()) + "." in text
    assert page.ids["merge-method"]["data-method"] == "passthrough" and not page.heat()
    assert len(set((m, layer) for m, layer, _ in expected)) == 5  # max_repeats 1

    # the end of a search: the CLI's last step writes the same page and says where
    (root / "report.html").unlink()
    messages = []
    handler = logging.Handler()
    handler.emit = messages.append
    logging.getLogger("evolve.cli").addHandler(handler)
    try:
        _write_report(root, quiet=True)
    finally:
        logging.getLogger("evolve.cli").removeHandler(handler)
    assert not messages and (root / "report.html").read_text().count('class="path-position"') == 5


@pytest.mark.slow
def test_pareto(experiments):
    """A Pareto search (objectives: pareto, NSGA-II): the exported front (pareto/front.json, one
    recipe per distinct member) is the front the test computes over the study's metrics."""
    root, search, budget = experiments["pareto"]
    text = write_report(root).read_text()
    best = check_common(root, budget, text)
    assert "Pareto front over t_a, t_b" in text
    rows = [r for r in study_rows(root) if r["state"] == "COMPLETE"]
    first = {}  # identical recipes: the first candidate stands for them
    for r in rows:
        first.setdefault(r["recipe_hash"], r)
    points = {r["number"]: (r["metrics"]["t_a"], r["metrics"]["t_b"]) for r in first.values()}
    front = sorted(
        n for n, (a, b) in points.items()
        if not any(a2 >= a and b2 <= b and (a2 > a or b2 < b) for m, (a2, b2) in points.items() if m != n)
    )
    page = Page(text)
    listed = page.with_class("pareto-member")
    assert sorted(int(a["data-trial"]) for a, _ in listed) == front and len(front) >= 2
    value = {r["number"]: r["value"] for r in rows}
    for attrs, cells in listed:
        n = int(attrs["data-trial"])
        assert cells == [str(n), f"{points[n][0]:.4f}", f"{points[n][1]:.4f}", f"{value[n]:.4f}", f"pareto/{n}.yaml"]
        assert (root / "pareto" / f"{n}.yaml").is_file()
    assert f"The exported front (pareto/front.json): {len(front)} recipe(s)." in text
    assert page.heat() == pytest.approx(best["params"], rel=1e-12, abs=0)  # the best weighted sum's recipe


def test_explain_answers_for_every_layout_without_model_files():
    """Genome.explain (what the report asks every genome) on layouts built without models:
    one switched-in model when every switch gene is off, no switch view for a picked method
    without weights, a layer path's placement rule (a used-up layer goes to the nearest free one)."""
    from search_spaces.genome import parameter_genome
    from search_spaces.layer_path import LayerPathGenome

    def definition(**genome):
        return parse_search_config({"genome": genome, "tasks": ["t"]}).genome

    g = parameter_genome(definition(models=["/m/a", "/m/b"], merge_method="linear", model_switch=True,
                                    layer_granularity=2), 4)
    x = g.initial()
    x[-2:] = [0.1, 0.3]  # both off: the higher gene's model stays in
    view = g.explain(x)
    assert view.method == "linear" and view.methods == () and view.path == ()
    assert view.models == (("a", False), ("b", True)) and view.groups == ((0, 1), (2, 3))
    assert [(v.name, v.row, v.group, v.value) for v in view.genes] == [
        ("g0.a.weight.all", "a.weight.all", 0, 0.0), ("g0.b.weight.all", "b.weight.all", 0, 0.5),
        ("g1.a.weight.all", "a.weight.all", 1, 0.0), ("g1.b.weight.all", "b.weight.all", 1, 0.5)]

    g = parameter_genome(definition(models=["/m/a", "/m/b", "/m/c"], base_model="/m/base", model_switch=True,
                                    merge_method=["ties", "model_stock"]), 4)
    x = g.initial()
    x[0] = 1.5  # model_stock: no weights, so no switches in use
    view = g.explain(x)
    assert view.method == "model_stock" and view.methods == ("ties", "model_stock") and view.models == ()
    assert [(v.name, v.row, v.value) for v in view.genes] == [("model_stock.g0.filter_wise.all", "filter_wise.all", 0.0)]

    g = LayerPathGenome(parse_search_config({"genome": {"kind": "layer_path", "models": ["/m/a", "/m/deep"],
                                                        "num_layers": 3, "max_repeats": 1}, "tasks": ["t"]}).genome, [4, 6])
    # positions 0 and 1 both ask for deep's layer 3 (depth 0.55 of 6): the second gets layer 2
    view = g.explain([1.5, 0.55, 1.5, 0.55, 0.5, 0.99])
    assert view.method == "passthrough" and view.genes == () and view.models == ()
    assert view.path == (("deep", 3, None), ("deep", 2, None), ("a", 3, None))
