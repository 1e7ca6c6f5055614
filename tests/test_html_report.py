"""report.html from a real SQLite Optuna study, written by evolve.store.ExperimentStore the way a
search writes it (real genome over real tiny llama checkpoints, real optimiser, the loop), with
per-task metrics computed from the genotype instead of lm-eval (the report does not care where
the numbers come from). Concurrency is tested against other processes holding SQLite locks."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from evolve.config import parse_search_config
from evolve.html_report import write_report
from evolve.loop import Outcome, run_loop
from evolve.report import RunRecord, append_run
from evolve.objectives import Scoring
from evolve.build import build_genome, build_optimizer
from evolve.store import ExperimentStore, recipe_hash

ROOT = Path(__file__).resolve().parents[1]
EVOLVE = str(Path(sys.executable).parent / "mergekit-evolve")
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), HF_HUB_OFFLINE="1")
FAILED = 5  # this candidate's worker "dies": a failed trial
BUDGET = 24
DIRECTIONS = {"t_a": "maximize", "t_b": "minimize"}


def config_text(models: dict, budget: int = BUDGET, optimizer: str = "tpe") -> str:
    return yaml.safe_dump({
        "genome": {
            "models": [str(models["a"]), str(models["b"])],
            "base_model": str(models["base"]),
            "merge_method": "ties",
            "layer_granularity": 1,
            "filters": ["self_attn"],
            "dtype": "float32",
        },
        "tasks": [{"name": "t_a"}, {"name": "t_b", "direction": "minimize"}],
        "optimizer": {"name": optimizer, "seed": 0},
        "budget": {"max_fevals": budget},
    })


class MetricRunner:
    """The loop's Runner, one candidate at a time: t_a = mean of ft_a's weights, t_b = mean of
    ft_b's densities (conflicting enough for a front of several trials)."""

    capacity = 1

    def __init__(self, genome, config):
        self.genome = genome
        self.config = config
        self.pending = []

    def submit(self, candidate) -> None:
        self.pending.append(candidate)

    def wait(self):
        c = self.pending.pop(0)
        if c.number == FAILED:
            return [(c, Outcome("failed", None, error="worker died", attempts=2))]
        names = [d.name for d in self.genome.dimensions]
        genes = dict(zip(names, c.genotype))
        metrics = {
            "t_a": sum(v for n, v in genes.items() if ".ft_a.weight." in n) / self.genome.num_groups / 2,
            "t_b": sum(v for n, v in genes.items() if ".ft_b.density." in n) / self.genome.num_groups / 2,
        }
        fit = Scoring.for_search(self.config, DIRECTIONS).fitness(metrics)
        return [(c, Outcome("complete", fit, metrics, timings={"eval_s": 0.1}, recipe_hash=recipe_hash(self.genome.decode(c.genotype))))]


def run_search(root: Path, models: dict, budget: int = BUDGET, pause: float = 0.0, optimizer: str = "tpe") -> None:
    """What SearchRun does with the store: open, loop (ask/tell journal), checkpoint, runs.jsonl."""
    text = config_text(models, budget, optimizer)
    config = parse_search_config(yaml.safe_load(text))
    genome = build_genome(config)
    store = ExperimentStore(root, genome.space)
    store.open(text, {"optimizer": 0}, resume=False)
    optimizer = build_optimizer(config, genome, genome.initial())
    state = run_loop(optimizer, MetricRunner(genome, config), store, budget, on_outcome=lambda c, o: time.sleep(pause))
    store.close()
    append_run(root, RunRecord(started="2026-01-01T00:00:00", ended="2026-01-01T00:01:00", stop_reason="budget spent",
                               evaluated=budget))


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, llama_models):
    models = {"base": llama_models["base"], "a": llama_models["a"], "b": llama_models["b"]}
    root = tmp_path_factory.mktemp("experiment") / "run"
    run_search(root, models)
    return root, models


def study_rows(root: Path) -> list[dict]:
    """The trials straight from the SQLite file, independently of Optuna."""
    con = sqlite3.connect(root / "study.db")
    out = []
    for trial_id, number, state in con.execute("SELECT trial_id, number, state FROM trials ORDER BY number"):
        value = con.execute("SELECT value FROM trial_values WHERE trial_id=?", (trial_id,)).fetchone()
        params = dict(con.execute("SELECT param_name, param_value FROM trial_params WHERE trial_id=?", (trial_id,)))
        attrs = {k: json.loads(v) for k, v in con.execute(
            "SELECT key, value_json FROM trial_user_attributes WHERE trial_id=?", (trial_id,))}
        out.append({"number": number, "state": state, "value": value[0] if value else None, "params": params, **attrs})
    con.close()
    return out


class Rows(HTMLParser):
    """Every <tr> and <td>: the row's attributes and its cells' text, and the <td>s' attributes."""

    def __init__(self, text: str):
        super().__init__()
        self.rows: list[tuple[dict, list[str]]] = []
        self.cells: list[dict] = []
        self._cell = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append((dict(attrs), []))
        elif tag == "td":
            self.cells.append(dict(attrs))
            self._cell = ""

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.rows[-1][1].append(self._cell.strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def with_class(self, cls: str) -> list[tuple[dict, list[str]]]:
        return [(a, c) for a, c in self.rows if cls in a.get("class", "").split()]


def test_report_matches_the_study(experiment):
    import hashlib

    root, _ = experiment
    before = hashlib.sha256((root / "study.db").read_bytes()).hexdigest()
    path = write_report(root)
    assert hashlib.sha256((root / "study.db").read_bytes()).hexdigest() == before  # read, never written
    assert path == root / "report.html"
    text = path.read_text()
    rows = study_rows(root)
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    assert len(rows) == BUDGET and [r["number"] for r in rows if r["state"] == "FAIL"] == [FAILED]
    best = max(complete, key=lambda r: (r["value"], -r["number"]))
    assert f'<span id="best-fitness" data-value="{best["value"]!r}">{best["value"]:.6g}</span> (trial {best["number"]})' in text
    assert f"{BUDGET} finished ({BUDGET - 1} complete, 1 failed), 0 running" in text
    assert "budget spent, 24 evaluated" in text
    assert 'src="http' not in text and "<script" not in text  # self-contained, no script
    assert text.count('src="data:image/png;base64,') == 2  # fitness and Pareto figures

    # the heat map: one cell per gene (4 layer groups x 2 models x 2 parameter sets x 2 params),
    # each the best trial's value of that gene as the decoded recipe holds it
    page = Rows(text)
    heat = [c for c in page.cells if c.get("class") == "heat"]
    assert len(heat) == 4 * 2 * 2 * 2 == len(best["params"])
    assert {c["data-dim"]: float(c["data-value"]) for c in heat} == pytest.approx(best["params"], abs=0, rel=1e-12)
    assert "<th>layers 0-0</th><th>layers 1-1</th><th>layers 2-2</th><th>layers 3-3</th>" in text
    assert "<tr><th>ft_a.weight.self_attn</th>" in text and "<tr><th>ft_b.density.all</th>" in text

    # the Pareto front: t_a maximised, t_b minimised; brute force over the complete trials
    points = {r["number"]: (r["metrics"]["t_a"], r["metrics"]["t_b"]) for r in complete}
    front = {
        n for n, (a, b) in points.items()
        if not any(a2 >= a and b2 <= b and (a2 > a or b2 < b) for m, (a2, b2) in points.items() if m != n)
    }
    listed = page.with_class("pareto-member")
    assert {int(a["data-trial"]) for a, _ in listed} == front and len(listed) == len(front) >= 2
    for attrs, cells in listed:
        n = int(attrs["data-trial"])
        assert cells == [str(n), f"{points[n][0]:.4f}", f"{points[n][1]:.4f}", f"{next(r['value'] for r in complete if r['number'] == n):.4f}"]
    assert f"{len(front)} of {len(complete)} complete, feasible trials are not dominated on (t_a maximize, t_b minimize)" in text

    # importance: the 25 most important of 32 genes, fANOVA's shares (they sum to 1 over all 32)
    imp = page.with_class("importance")
    assert len(imp) == 25 and {a["data-param"] for a, _ in imp} <= set(best["params"])
    shares = [float(c[1]) for _, c in imp]
    assert shares == sorted(shares, reverse=True) and 0.5 < sum(shares) <= 1.0 + 1e-3
    assert "Re-scoring" not in text  # no rescore.json


def test_rescore_table_and_exported_front(experiment, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(experiment[0], root)
    rescore = {
        "tasks": ["t_a", "t_b"],
        "rows": [
            {"number": 3, "recipe_hash": "abc123", "search_fitness": 0.25, "heldout_fitness": 0.125,
             "metrics": {"t_a": 0.5, "t_b": 0.375}, "status": "complete"},
            {"number": 7, "recipe_hash": "def456", "search_fitness": 0.5, "heldout_fitness": None,
             "metrics": {}, "status": "pending"},
            {"number": 9, "recipe_hash": "0f0f0f", "search_fitness": 0.75, "heldout_fitness": None,
             "metrics": {}, "status": "failed"},
        ],
        "chosen": 3,
    }
    (root / "rescore.json").write_text(json.dumps(rescore))
    (root / "pareto").mkdir()
    (root / "pareto" / "front.json").write_text(json.dumps({
        "directions": DIRECTIONS,
        "members": [{"number": 2, "metrics": {"t_a": 0.5, "t_b": 0.25}, "fitness": 0.25, "recipe": "pareto/2.yaml"},
                    {"number": 11, "metrics": {"t_a": 0.75, "t_b": 0.5}, "fitness": 0.25, "recipe": "pareto/11.yaml"}],
    }))
    page = Rows(write_report(root).read_text())
    table = page.with_class("rescore-row")
    assert [(a["data-trial"], a["class"], c) for a, c in table] == [
        ("3", "rescore-row chosen", ["3", "abc123", "0.2500", "0.1250", "0.5000", "0.3750", "complete"]),
        ("7", "rescore-row", ["7", "def456", "0.5000", "–", "–", "–", "pending"]),
        ("9", "rescore-row", ["9", "0f0f0f", "0.7500", "–", "–", "–", "failed"]),
    ]
    members = page.with_class("pareto-member")
    assert [(a["data-trial"], c) for a, c in members] == [
        ("2", ["2", "0.5000", "0.2500", "0.2500", "pareto/2.yaml"]),
        ("11", ["11", "0.7500", "0.5000", "0.2500", "pareto/11.yaml"]),
    ]
    assert '<a href="pareto/11.yaml">' in (root / "report.html").read_text()


def test_one_complete_trial_and_models_out_of_reach(tmp_path, llama_models):
    """Too few trials for importance; models moved away: the heat map shows the genotype."""
    import shutil

    models = {}
    for key, name in (("base", "base"), ("a", "ft_a"), ("b", "ft_b")):
        models[key] = tmp_path / "models" / name
        shutil.copytree(llama_models[key], models[key])
    root = tmp_path / "run"
    run_search(root, models, budget=1)
    shutil.rmtree(tmp_path / "models")
    text = write_report(root).read_text()
    assert "Too few complete trials (1) to estimate importance (at least 10)." in text
    assert "the values shown are the trial's genotype" in text
    heat = [c for c in Rows(text).cells if c.get("class") == "heat"]
    params = study_rows(root)[0]["params"]
    assert {c["data-dim"]: float(c["data-value"]) for c in heat} == params and len(heat) == 32


def test_cli_report_subcommand(experiment, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(experiment[0], root)
    (root / "report.html").unlink(missing_ok=True)
    proc = subprocess.run([EVOLVE, "report", str(root)], capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(root / "report.html") and (root / "report.html").stat().st_size > 10_000
    assert not list(root.glob(".report.html.tmp"))

    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run([EVOLVE, "report", str(empty)], capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {empty}: no study here (study.db not found); pass the --storage-path of a search"
    assert not (empty / "report.html").exists()

    # the search command and its --help are unchanged
    proc = subprocess.run([EVOLVE, "--help"], capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 0 and "GENOME_CONFIG_PATH" in proc.stdout and "--storage-path" in proc.stdout
    assert "mergekit-evolve report DIR" in proc.stdout
    proc = subprocess.run([EVOLVE, str(tmp_path / "none.yml"), "--storage-path", str(tmp_path / "x")],
                          capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 2 and "none.yml: search config not found" in proc.stderr


HOLD = """
import sqlite3, sys
con = sqlite3.connect(sys.argv[1], isolation_level=None)
con.execute("BEGIN " + sys.argv[2])
con.execute("UPDATE trial_values SET value = value + 100")  # uncommitted
print("locked", flush=True)
sys.stdin.readline()  # holds the lock until the test says so
con.execute("ROLLBACK" if sys.argv[2] == "IMMEDIATE" else "COMMIT")
print("released", flush=True)
"""


def _hold(db: Path, mode: str) -> subprocess.Popen:
    """Another process inside a write transaction on `db` (`mode`: IMMEDIATE or EXCLUSIVE) until
    `_release` is called: no timing involved."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(db), mode], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _release(proc: subprocess.Popen) -> None:
    proc.stdin.write("go\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "released" and proc.wait(timeout=60) == 0


def _write_locked(db: Path) -> bool:
    """Whether another process holds a write lock on `db` now (a writer without waiting gets none)."""
    con = sqlite3.connect(db, timeout=0, isolation_level=None)
    try:
        con.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as err:
        assert "locked" in str(err)
        return True
    finally:
        con.close()  # rolls back a transaction it got
    return False


def test_reading_while_another_process_writes(experiment, tmp_path, monkeypatch):
    import shutil
    import threading

    from evolve import html_report

    root = tmp_path / "copy"
    shutil.copytree(experiment[0], root)
    db = root / "study.db"
    best = max(r["value"] for r in study_rows(root) if r["value"] is not None)

    # a writer inside its transaction (RESERVED lock) that ends only when told to: the report,
    # written while the lock is still held (checked before and after), shows the committed state
    holder = _hold(db, "IMMEDIATE")
    try:
        assert _write_locked(db)
        text = write_report(root).read_text()
        assert holder.poll() is None and _write_locked(db)  # the writer's transaction never ended meanwhile
        assert f'data-value="{best!r}"' in text
        _release(holder)  # rolled back
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()

    # a writer committing (EXCLUSIVE lock: readers are shut out): the report, reading while it is
    # held, cannot finish before the commit; it waits for it and shows the committed values
    reading = threading.Event()
    backup = html_report._backup

    def signalled_backup(src, dest):
        reading.set()
        return backup(src, dest)

    monkeypatch.setattr(html_report, "_backup", signalled_backup)
    holder = _hold(db, "EXCLUSIVE")
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(text=write_report(root).read_text()), daemon=True)
    try:
        thread.start()
        assert reading.wait(timeout=60)  # the report has begun to copy the study
        assert thread.is_alive() and "text" not in result  # and cannot end while the lock is held
        _release(holder)  # committed
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    thread.join(timeout=120)
    assert not thread.is_alive() and f'data-value="{best + 100!r}"' in result["text"]  # the committed values

    # the report leaves no lock behind: a writer gets an exclusive lock without waiting
    con = sqlite3.connect(db, timeout=0, isolation_level=None)
    con.execute("BEGIN EXCLUSIVE")
    con.execute("ROLLBACK")
    con.close()


WRITER = """
import sys, time
from pathlib import Path
import test_html_report as t
models = {"base": Path(sys.argv[2]), "a": Path(sys.argv[3]), "b": Path(sys.argv[4])}
t.run_search(Path(sys.argv[1]), models, budget=30, pause=0.2, optimizer="random")
print("done", flush=True)
"""


def test_reports_during_a_running_search(llama_models, tmp_path):
    """A search writing its study (the store's writer thread, Optuna's default SQLite settings)
    while reports are written over and over: neither side fails, and the counts only grow."""
    root = tmp_path / "live"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(root), str(llama_models["base"]), str(llama_models["a"]), str(llama_models["b"])],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )
    seen = []
    try:
        deadline = time.monotonic() + 120
        while writer.poll() is None and time.monotonic() < deadline:
            if (root / "study.db").exists():
                try:
                    text = write_report(root).read_text()
                except Exception as err:  # study.db exists before Optuna has created the study in it
                    if not any(m in str(err) for m in ("no study named", "no such table", "holds no evomerge study",
                                                      "not an SQLite database")):
                        raise
                    continue
                finished = int(text.split(" finished (")[0].rsplit(">", 1)[1])
                seen.append(finished)
            time.sleep(0.3)
        out, err = writer.communicate(timeout=120)
    finally:
        if writer.poll() is None:
            writer.kill()
    assert writer.returncode == 0, err[-2000:]
    assert out.strip() == "done"
    assert len(seen) >= 3 and seen == sorted(seen) and seen[-1] <= 30
    text = write_report(root).read_text()
    assert "30 finished (29 complete, 1 failed), 0 running" in text


def test_a_real_search_writes_its_report(llama_models, tmp_path):
    """mergekit-evolve (Ray workers, lm-eval tasks) ends by writing DIR/report.html."""
    from experiments.quickstart.skills import write_lm_eval_tasks

    tasks = tmp_path / "tasks"
    write_lm_eval_tasks(tasks)
    cfg = tmp_path / "search.yml"
    cfg.write_text(yaml.safe_dump({
        "genome": {"models": [str(llama_models["a"]), str(llama_models["b"])], "base_model": str(llama_models["base"]),
                   "merge_method": "task_arithmetic", "layer_granularity": 2, "dtype": "float32"},
        "tasks": ["qs_arithmetic", "qs_facts"], "limit": 8,
        "apply_chat_template": False, "fewshot_as_multiturn": False,
        "optimizer": {"name": "random", "seed": 0}, "budget": {"max_fevals": 3},
    }))
    storage = tmp_path / "run"
    proc = subprocess.run([EVOLVE, str(cfg), "--storage-path", str(storage), "--task-search-path", str(tasks),
                           "--no-save-final-model"], capture_output=True, text=True, env=dict(ENV, RAY_AUTH_MODE="disabled"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-1] == f"report: {storage / 'report.html'}"
    text = (storage / "report.html").read_text()
    complete = [r for r in study_rows(storage) if r["state"] == "COMPLETE"]
    best = max(complete, key=lambda r: (r["value"], -r["number"]))
    assert f'data-value="{best["value"]!r}">{best["value"]:.6g}</span> (trial {best["number"]})' in text
    assert "3 finished (3 complete, 0 failed), 0 running" in text and "budget spent, 3 evaluated" in text
    heat = [c for c in Rows(text).cells if c.get("class") == "heat"]
    assert {c["data-dim"]: float(c["data-value"]) for c in heat} == best["params"] and len(heat) == 2 * 2


def test_fitness_plot_is_drawn_again_only_when_the_trials_changed(tmp_path, llama_models, monkeypatch):
    """The export and the HTML report at the end of a search both want the fitness figure: the
    report (drawn from its own copy of the study) gets the bytes the export drew for the same
    trials; another set of trials is drawn again."""
    import base64

    import matplotlib.figure

    from evolve.report import plot_fitness

    models = {"base": llama_models["base"], "a": llama_models["a"], "b": llama_models["b"]}
    drawn = []
    real_savefig = matplotlib.figure.Figure.savefig

    def savefig(fig, target, **kw):
        if isinstance(target, Path) and target.name == "fitness.png":  # the report draws other figures too
            drawn.append(target)
        return real_savefig(fig, target, **kw)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)

    def export_plot(root: Path, budget: int) -> Path:
        """What export_best does first, on the search's own store."""
        text = config_text(models, budget, "tpe")
        store = ExperimentStore(root, build_genome(parse_search_config(yaml.safe_load(text))).space)
        store.open(text, {"optimizer": 0}, resume=True)
        try:
            return plot_fitness(store)
        finally:
            store.close()

    for budget in (3, 4):
        root = tmp_path / f"run{budget}"
        run_search(root, models, budget=budget)
        before = len(drawn)
        figure = export_plot(root, budget)
        report = write_report(root).read_text()
        assert len(drawn) == before + 1  # drawn once for the export, reused by the report
        png = figure.read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and base64.b64encode(png).decode() in report
    assert len(drawn) == 2 and drawn[0] != drawn[1]  # the four trials were drawn anew
