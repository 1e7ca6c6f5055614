"""DIR/report.html: one static page about a search (no server, no script, images inline).

    fitness over evaluations        the same figure as fitness.png (evolve.report.plot_fitness)
    best recipe                     as its genome explains it (search_spaces Genome.explain): the merge
                                    method (picked by a method gene or fixed), the models switch genes leave
                                    in, a layer path (which model's layer at each output layer, scales), and a
                                    heat map of the per-layer-group genes (rows model x parameter, columns
                                    layer groups)
    Pareto front                    DIR/pareto/front.json when present, else computed over the per-task metrics
    parameter importance            Optuna's fANOVA over the complete trials
    re-scoring                      DIR/rescore.json when present

`mergekit-evolve report DIR` writes it at any time, also while a search runs: the study is read
from a copy taken with SQLite's backup API under one short read lock, so the search's writer waits
at most for that copy (milliseconds for a study of thousands of trials) and never sees an error.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
import sqlite3
import tempfile
from pathlib import Path
from typing import Optional
from urllib.parse import quote

from merge_engine.errors import ConfigError

from .objectives import Scoring
from .selection import Selection, exported, ranked

log = logging.getLogger(__name__)

REPORT = "report.html"
RESCORE = "rescore.json"
PARETO_FRONT = Path("pareto") / "front.json"
MAX_IMPORTANCES = 25  # a genome can have hundreds of genes: the page lists the most important
READ_TIMEOUT_S = 30.0  # how long the copy waits for a writer's transaction to end
# fANOVA's forest: Optuna's default (64 trees, depth 64) took 2 minutes on 2000 trials of 64 genes,
# this one 5 to 20 s (2 busy cores); on the quickstart study both rank the genes alike
FANOVA_TREES, FANOVA_DEPTH = 32, 8
# below this many complete trials fANOVA's forest fits noise (and loading it, scikit-learn, is most
# of a small report's time): the section says so instead
MIN_IMPORTANCE_TRIALS = 10


# -- reading ------------------------------------------------------------------------------------


def copy_study(db: Path, dest: Path) -> None:
    """A consistent copy of `db`, read without writing to it (a hot journal left by a killed
    writer is the exception: only a read-write connection can roll it back)."""
    try:
        src = sqlite3.connect(f"file:{quote(str(db.resolve()))}?mode=ro", uri=True, timeout=READ_TIMEOUT_S)
        try:
            _backup(src, dest)
        finally:
            src.close()
    except sqlite3.OperationalError as err:
        if "readonly" not in str(err).replace(" ", "").replace("-", ""):
            raise
        src = sqlite3.connect(str(db), timeout=READ_TIMEOUT_S)
        try:
            _backup(src, dest)
        finally:
            src.close()


def _backup(src: sqlite3.Connection, dest: Path) -> None:
    dst = sqlite3.connect(str(dest))
    try:
        src.backup(dst)  # all pages in one step: one read lock, no restart when the writer commits
    finally:
        dst.close()


def _load_study(root: Path, workdir: Path):
    import optuna

    from .store import SQLITE_HEADER, STUDY_NAME, check_study_file

    db = root / "study.db"
    if not db.is_file():
        raise ConfigError(f"{root}: no study here ({db.name} not found); pass the --storage-path of a search")
    with open(db, "rb") as f:
        if f.read(len(SQLITE_HEADER)) != SQLITE_HEADER:
            check_study_file(db)  # raises: not an SQLite database (read as bytes, no SQLite involved)
    copy = workdir / "study.db"
    try:
        copy_study(db, copy)
    except sqlite3.DatabaseError as err:  # damaged beyond copying, or a writer's lock held past READ_TIMEOUT_S
        raise ConfigError(f"{db}: cannot read the study: {err}") from None
    # the checks (an integrity check reads every page) run on the copy, page for page the study: on
    # the study itself they would hold a read lock that long, and give up on a writer's lock after
    # SQLite's default 5 s instead of READ_TIMEOUT_S. Their messages name the study, not the copy.
    try:
        check_study_file(copy)
    except ConfigError as err:
        raise ConfigError(str(err).replace(str(copy), str(db))) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(f"sqlite:///{copy}")
    try:
        return optuna.load_study(study_name=STUDY_NAME, storage=storage), storage
    except KeyError:
        storage.engine.dispose()
        raise ConfigError(f"{db}: holds no study named {STUDY_NAME!r}; not written by mergekit-evolve") from None


def _read_json(path: Path) -> Optional[dict]:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        log.warning("%s: not readable (%s); left out of the report", path, err)
        return None
    return data if isinstance(data, dict) else None


def _search_config(manifest: Optional[dict]):
    """The search config the experiment was started with (manifest.json), or None."""
    if not manifest or not manifest.get("config"):
        return None
    from merge_engine.config import load_yaml_text

    from .config import parse_search_config

    try:
        return parse_search_config(load_yaml_text(manifest["config"], "manifest.json"), "manifest.json")
    except ConfigError as err:
        log.warning("manifest.json: %s", err)
        return None


def _genome(config):
    """The genome, when its models' config.json files can be read from here (relative model paths
    are relative to where the search was started)."""
    if config is None:
        return None
    from .search import build_genome

    try:
        return build_genome(config)
    except (ConfigError, OSError) as err:
        log.info("genome not rebuilt: %s", err)
        return None


# -- the page's parts ---------------------------------------------------------------------------


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _num(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else _esc(value)


def _png(fig) -> str:
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return _img(buf.getvalue())


def _img(data: bytes) -> str:
    return f'<img alt="" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _color(fraction: float) -> tuple[str, str]:
    """Background (viridis at `fraction` of the dimension's range) and a readable text colour."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    r, g, b, _ = colormaps["viridis"](min(max(fraction, 0.0), 1.0))
    return to_hex((r, g, b)), ("#000" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "#fff")


def _heat_map(genes: list, groups: list[tuple[int, int]]) -> str:
    """genes: search_spaces.genome.GeneValue's; rows are their distinct `row`s (model.parameter.filter,
    or t / select / filter_wise), columns the layer groups (`groups`: first and last layer of each)."""
    cells = {}
    rows: list[str] = []
    for gene in genes:
        if gene.row not in rows:
            rows.append(gene.row)
        cells[(gene.row, gene.group)] = gene
    count = max([len(groups)] + [g.group + 1 for g in genes])
    columns = [f"layers {first}-{last}" for first, last in groups] if len(groups) == count else [f"group {g}" for g in range(count)]
    out = ['<table class="heatmap"><tr><th></th>' + "".join(f"<th>{_esc(c)}</th>" for c in columns) + "</tr>"]
    for row in rows:
        tds = []
        for g in range(count):
            gene = cells.get((row, g))
            if gene is None:
                tds.append("<td></td>")
                continue
            low, high, value = gene.low, gene.high, gene.value
            bg, fg = _color((value - low) / (high - low) if high > low else 0.5)
            tds.append(
                f'<td class="heat" data-dim="{_esc(gene.name)}" data-value="{value!r}" title="{_esc(gene.name)} = {value:.6g} '
                f'(range {low:g} to {high:g})" style="background:{bg};color:{fg}">{value:.3f}</td>'
            )
        out.append(f"<tr><th>{_esc(row)}</th>{''.join(tds)}</tr>")
    out.append("</table>")
    return "\n".join(out)


def _raw_genes(names, values, lower, upper) -> list:
    """A genotype as heat-map genes when the genome cannot be rebuilt: a name `g<group>.<row>`
    (a parameter genome's layout) goes to its group's column; any other gene is a row of its own."""
    from search_spaces.genome import GeneValue, grouped_gene

    out = []
    for name, value, low, high in zip(names, values, lower, upper):
        group, row = grouped_gene(name) or (0, name)
        out.append(GeneValue(name, row, group, value, low, high))
    return out


def _table(headers: list[str], rows: list[tuple[str, list[str]]]) -> str:
    """rows: (the <tr>'s attributes, its cells as HTML)."""
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = "\n".join(f"<tr{attrs}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>" for attrs, cells in rows)
    return f"<table><tr>{head}</tr>\n{body}</table>"


def _pareto_plot(tasks: list[str], points: dict[int, list[float]], members: list[int]) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    xs = [p[0] for p in points.values()]
    ys = [p[1] for p in points.values()]
    ax.scatter(xs, ys, s=12, alpha=0.4, color="C0", label="candidate")
    front = sorted((points[n] for n in members if n in points), key=lambda p: (p[0], p[1]))
    # joined only for two tasks: with more, the front seen along two of them is no staircase
    style = "o-" if len(tasks) == 2 else "o"
    ax.plot([p[0] for p in front], [p[1] for p in front], style, color="C3", label="Pareto front")
    ax.set_xlabel(tasks[0])
    ax.set_ylabel(tasks[1])
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


class _Page:
    def __init__(self, root: Path):
        self.root = root
        self.parts: list[str] = []

    def section(self, title: str, body: str) -> None:
        self.parts.append(f"<section><h2>{_esc(title)}</h2>\n{body}\n</section>")

    def html(self, title: str) -> str:
        return (
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_esc(title)}</title><style>{STYLE}</style></head><body>\n"
            + "\n".join(self.parts)
            + "\n</body></html>\n"
        )


STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:72em;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .5em;text-align:right}
th{background:#f4f4f4}table.heatmap td{min-width:3.5em;font-family:monospace}
.bar{background:#4c72b0;height:.8em;display:inline-block}.note{color:#666}pre{background:#f6f6f6;padding:.5em;overflow:auto}
tr.chosen td{font-weight:bold}
"""


# -- the report ---------------------------------------------------------------------------------


def write_report(storage_path) -> Path:
    """Write DIR/report.html from the experiment directory's current state; return its path.
    Raises ConfigError when DIR holds no study."""
    import matplotlib

    matplotlib.use("Agg")
    root = Path(storage_path)
    with tempfile.TemporaryDirectory(prefix="evomerge-report-") as tmp:
        study, storage = _load_study(root, Path(tmp))
        try:
            text = _render(root, study, Path(tmp))
        finally:
            storage.engine.dispose()  # the copy's connections, before the folder goes
    from .store import _atomic_write

    path = root / REPORT
    _atomic_write(path, text.encode("utf-8"))
    return path


def _render(root: Path, study, tmp: Path) -> str:
    import optuna

    from .report import plot_fitness, read_runs
    from .store import ExperimentStore
    from search_spaces.genome import SearchSpace

    manifest = _read_json(root / "manifest.json")
    config = _search_config(manifest)
    genome = _genome(config)
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    if genome is not None:
        space = genome.space
    else:  # the genes as the study recorded them
        dists = next((t.distributions for t in trials if t.distributions), {})
        space = SearchSpace(tuple(dists), tuple(d.low for d in dists.values()), tuple(d.high for d in dists.values()))
    # the store's own reading of a study (finished, best, genotype), over the copy; its root is
    # the scratch folder, so the fitness figure does not replace the search's fitness.png
    store = ExperimentStore(tmp, space)
    store.study = study
    finished = store.finished()
    complete = [t for t in finished if t.value is not None]
    failed = len(finished) - len(complete)
    running = sum(1 for t in trials if t.state == optuna.trial.TrialState.RUNNING)
    tasks = [t.name for t in config.tasks] if config is not None else sorted(
        {k for t in complete for k in t.user_attrs.get("metrics", {})}
    )
    # the evaluator's directions (recorded by the search) know lower-is-better metrics; else the config's
    directions = {t.name: t.direction or "maximize" for t in config.tasks} if config is not None else {}
    directions.update(store.directions())
    rows = store.rows()
    top = ranked(rows)
    best = store.trial(top[0].number) if top else None
    # the candidate the search exports, by its one rule (without the config: the best fitness)
    selection = exported(rows, Scoring.for_search(config, directions), _read_json(root / RESCORE)) if config is not None \
        else (Selection(top[0], "the best search fitness") if top else None)
    chosen = store.trial(selection.number) if selection is not None else None
    page = _Page(root)

    # header
    runs = read_runs(root)
    facts = [
        ("experiment", _esc(root.resolve())),
        ("started", _esc((manifest or {}).get("created", "?"))),
        ("optimizer", _esc((manifest or {}).get("optimizer") or (config.optimizer.name if config else None) or "?")),
        ("tasks", _esc(", ".join(f"{t} ({directions.get(t, 'maximize')})" for t in tasks))),
        *([("objectives", _esc("Pareto front over " + ", ".join(t.name for t in config.objective_tasks)))]
          if config is not None and config.objective_tasks else []),
        ("trials", f"{len(finished)} finished ({len(complete)} complete, {failed} failed), {running} running"),
        ("best fitness", f'<span id="best-fitness" data-value="{best.value!r}">{best.value:.6g}</span> (trial {best.number})'
         if best is not None else "none yet"),
        ("exported", f'<span id="exported" data-trial="{selection.number}">trial {selection.number}</span>: '
                     f"{_esc(selection.reason)}" if selection is not None else "none yet"),
    ]
    for i, run in enumerate(runs, 1):
        facts.append((f"run {i}", _esc(f"{run.started} to {run.ended}: {run.stop_reason}, {run.evaluated} evaluated"
                                       + (f", {run.retried} retried" if run.retried else "")
                                       + (f", {run.replaced} worker(s) replaced" if run.replaced else ""))))
    if not runs:
        facts.append(("runs", "none finished yet (a search may be running)"))
    header = "<table>" + "".join(f"<tr><th>{k}</th><td style=\"text-align:left\">{v}</td></tr>" for k, v in facts) + "</table>"
    page.parts.append(f"<h1>Merge search: {_esc(root.resolve().name)}</h1>\n{header}")

    # fitness
    plot = plot_fitness(store)
    page.section("Fitness over evaluations", _img(plot.read_bytes()) if plot else '<p class="note">No candidate has finished yet.</p>')

    # best recipe
    page.section("Exported recipe", _best_recipe(store, chosen, genome))

    # Pareto front
    page.section("Pareto front", _pareto(root, complete, tasks, directions))

    # importance
    page.section("Parameter importance", _importance(study, complete))

    # re-scoring
    rescore = _read_json(root / RESCORE)
    if rescore is not None:
        page.section("Re-scoring on held-out items", _rescore(rescore))

    db = root.resolve() / "study.db"
    page.parts.append(
        f'<p class="note">Regenerate with <code>mergekit-evolve report {_esc(root)}</code>; browse every trial with '
        f"<code>optuna-dashboard sqlite:///{_esc(db)}</code>.</p>"
    )
    return page.html(f"Merge search: {root.resolve().name}")


HEAT_NOTE = "<p>Colour: where the value lies in its gene's range (dark: low end, yellow: high end).</p>"


def _best_recipe(store, best, genome) -> str:
    """The best trial's recipe as the genome sees it (Genome.explain, which every genome kind
    answers): its merge method, the models a switch leaves in, the layer path, the per-layer-group
    genes; then the recipe's YAML."""
    if best is None:
        return '<p class="note">No candidate has completed yet.</p>'
    genotype = store.genotype_of(best)
    intro = f"<p>Trial {best.number}, fitness {best.value:.6g}"
    metrics = best.user_attrs.get("metrics", {})
    if metrics:
        intro += " (" + ", ".join(f"{_esc(k)} {v:.4g}" for k, v in metrics.items()) + ")"
    intro += ".</p>"
    if genome is None:
        note = ('<p class="note">The genome\'s models could not be read from here (run the report from where the '
                "search was started): the values shown are the trial's genotype.</p>")
        space = store.space
        return intro + note + HEAT_NOTE + _heat_map(_raw_genes(space.names, genotype, space.lower, space.upper), [])
    view = genome.explain(genotype)
    recipe = genome.decode(genotype)
    parts = [intro, _method(view)]
    if view.models:
        rows = [(f' class="model-switch" data-model="{_esc(label)}" data-in="{str(merged).lower()}"',
                 [_esc(label), "in" if merged else "out (weight 0)"]) for label, merged in view.models]
        parts.append(f"<p>Models in the merge (switch genes): {sum(m for _, m in view.models)} of {len(view.models)}.</p>"
                     + _table(["model", "merged"], rows))
    if view.path:
        parts.append(_layer_path(view.path))
    if view.genes:
        parts.append(HEAT_NOTE + _heat_map(list(view.genes), list(view.groups)))
    parts.append(f"<details><summary>recipe (YAML)</summary><pre>{_esc(recipe.to_yaml())}</pre></details>")
    return "\n".join(parts)


def _method(view) -> str:
    text = f'<p>Merge method: <b id="merge-method" data-method="{_esc(view.method)}">{_esc(view.method)}</b>'
    if view.methods:
        others = [m for m in view.methods if m != view.method]
        text += f" (picked by the method gene; the other choice(s): {_esc(', '.join(others))})"
    return text + ".</p>"


def _layer_path(path) -> str:
    """Which model's layer each output layer is (and its scale); runs of consecutive layers of one
    model are what the recipe's slices hold."""
    scaled = any(scale is not None for _, _, scale in path)
    counts: dict[str, int] = {}
    for label, _, _ in path:
        counts[label] = counts.get(label, 0) + 1
    note = (f"<p>Layer path: {len(path)} output layers, "
            + ", ".join(f"{n} from {_esc(label)}" for label, n in counts.items()) + ".</p>")
    rows = []
    for i, (label, layer, scale) in enumerate(path):
        attrs = f' class="path-position" data-position="{i}" data-model="{_esc(label)}" data-layer="{layer}"'
        cells = [str(i), _esc(label), str(layer)]
        if scaled:
            attrs += f' data-scale="{scale!r}"'
            cells.append(f"{scale:.3f}")
        rows.append((attrs, cells))
    return note + _table(["output layer", "model", "its layer"] + (["scale"] if scaled else []), rows)


def _pareto(root: Path, complete: list, tasks: list[str], directions: dict) -> str:
    from .pareto import pareto_front

    exported = _read_json(root / PARETO_FRONT)
    points = {t.number: [t.user_attrs.get("metrics", {}).get(k) for k in tasks] for t in complete}
    points = {n: p for n, p in points.items() if all(isinstance(v, (int, float)) for v in p)}
    fitness = {t.number: t.value for t in complete}
    if exported is not None and isinstance(exported.get("members"), list):
        members = [m for m in exported["members"] if isinstance(m, dict) and "number" in m]
        note = f"<p>The exported front ({_esc(PARETO_FRONT)}): {len(members)} recipe(s).</p>"
        rows = []
        for m in members:
            metrics = m.get("metrics") or {}
            link = f'<a href="{_esc(m["recipe"])}">{_esc(m["recipe"])}</a>' if m.get("recipe") else ""
            rows.append((f' class="pareto-member" data-trial="{int(m["number"])}"',
                         [str(int(m["number"]))] + [_num(metrics.get(k)) for k in tasks] + [_num(m.get("fitness")), link]))
        numbers = [int(m["number"]) for m in members]
        plot = _pareto_plot(tasks, points, numbers) if len(tasks) >= 2 and points else ""
        return note + _table(["trial"] + tasks + ["fitness", "recipe"], rows) + plot
    if len(tasks) < 2:
        return '<p class="note">One task: the front is the best trial.</p>'
    if not points:
        return '<p class="note">No candidate with every task\'s metric yet.</p>'
    # as the export does: infeasible trials (outside the constraints) never join the front
    violation = {t.number: t.user_attrs.get("violation", 0.0) for t in complete}
    numbers = [n for n in points if violation[n] <= 0]
    dirs = [directions.get(k, "maximize") for k in tasks]
    front = [numbers[i] for i in pareto_front([points[n] for n in numbers], dirs)]
    note = (f"<p>{len(front)} of {len(numbers)} complete, feasible trials are not dominated on ("
            + ", ".join(f"{_esc(k)} {d}" for k, d in zip(tasks, dirs)) + ").</p>")
    rows = [(f' class="pareto-member" data-trial="{n}"', [str(n)] + [_num(v) for v in points[n]] + [_num(fitness[n])])
            for n in sorted(front, key=lambda n: -fitness[n])]
    return note + _table(["trial"] + tasks + ["fitness"], rows) + _pareto_plot(tasks, points, front)


def _importance(study, complete: list) -> str:
    import optuna

    if len(complete) < MIN_IMPORTANCE_TRIALS:
        return (f'<p class="note">Too few complete trials ({len(complete)}) to estimate importance '
                f'(at least {MIN_IMPORTANCE_TRIALS}).</p>')
    try:
        importances = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(n_trees=FANOVA_TREES, max_depth=FANOVA_DEPTH, seed=0)
        )
    except Exception as err:  # noqa: BLE001 - e.g. every trial has the same fitness; the page goes on
        return f'<p class="note">Importance could not be estimated: {_esc(err)}</p>'
    if not importances:
        return '<p class="note">No gene varies across the complete trials.</p>'
    top = list(importances.items())[:MAX_IMPORTANCES]
    rows = [(f' class="importance" data-param="{_esc(k)}"',
             [_esc(k), f"{v:.3f}", f'<span class="bar" style="width:{20 * v:.2f}em"></span>']) for k, v in top]
    more = f" (the {MAX_IMPORTANCES} most important of {len(importances)})" if len(importances) > MAX_IMPORTANCES else ""
    return (f"<p>Optuna's fANOVA ({FANOVA_TREES} trees of depth {FANOVA_DEPTH}) over {len(complete)} complete trials{more}: the share of the fitness's variance "
            "each gene explains.</p>" + _table(["gene", "importance", ""], rows))


def _rescore(data: dict) -> str:
    tasks = [str(t) for t in data.get("tasks") or []]
    chosen = data.get("chosen")
    rows = []
    for r in data.get("rows") or []:
        if not isinstance(r, dict) or "number" not in r:
            continue
        n = int(r["number"])
        metrics = r.get("metrics") or {}
        cls = "rescore-row chosen" if chosen is not None and n == chosen else "rescore-row"
        rows.append((f' class="{cls}" data-trial="{n}"',
                     [str(n), _esc(r.get("recipe_hash", "")), _num(r.get("search_fitness")), _num(r.get("heldout_fitness"))]
                     + [_num(metrics.get(t)) for t in tasks] + [_esc(r.get("status", ""))]))
    note = f"<p>Chosen: trial {int(chosen)} (bold).</p>" if chosen is not None else "<p>No recipe chosen yet.</p>"
    return note + _table(["trial", "recipe", "search fitness", "held-out fitness"] + tasks + ["status"], rows)
