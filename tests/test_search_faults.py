"""mergekit-evolve under faults, end to end: the real CLI, a real local Ray cluster, real lm-eval
tasks, a real SQLite study. The driver is SIGKILLed at random moments and during the export, a
worker process is SIGKILLed mid-search; every trial is compared with an uninterrupted run. The
drivers that are killed start private clusters (the test checks that nothing of one outlives its
driver); the uninterrupted runs and the last resumes join the test process's cluster
(shared_ray.py)."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from test_search import ENV, EVOLVE, check_raced, run_evolve, search_yaml, trials

pytestmark = [pytest.mark.e2e, pytest.mark.ray, pytest.mark.slow]  # searches killed and resumed

BUDGET = 22


def descendants(pid: int) -> dict[int, str]:
    """{pid: command line} of every process below `pid`, from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = {}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in found:
                try:
                    found[child] = (Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
                except OSError:
                    found[child] = "?"
                frontier.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def complete_count(storage: Path) -> int:
    if not (storage / "study.db").exists():
        return 0
    try:
        return sum(1 for r in trials(storage) if r["state"] == "COMPLETE")
    except sqlite3.Error:
        return 0


def kill_driver_when(proc: subprocess.Popen, ready, what: str, timeout: float = 240) -> dict[int, str]:
    """SIGKILL the driver alone (not its process group) once `ready()`; returns the processes
    that were below it at that moment."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the search ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    below = descendants(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    return below


def assert_nothing_left(below: dict[int, str], at_least: int = 3) -> None:
    assert len(below) >= at_least, below  # the driver had started a cluster: the check is not vacuous
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(alive(p) for p in below):
        time.sleep(0.25)
    survivors = {p: cmd for p, cmd in below.items() if alive(p)}
    assert not survivors, f"30 s after the driver was killed these are still alive: {survivors}"


def start(cfg: Path, storage: Path, tasks: Path, *extra: str) -> subprocess.Popen:
    cmd = [EVOLVE, str(cfg), "--storage-path", str(storage), "--task-search-path", str(tasks), *extra]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def comparable(rows: list[dict]) -> list[tuple]:
    return [(r["number"], r["state"], r["value"], r["generation"], r["index"], r["metrics"]) for r in rows]


def params(storage: Path) -> list[list[float]]:
    con = sqlite3.connect(storage / "study.db")
    rows = con.execute(
        "SELECT t.number, p.param_name, p.param_value FROM trial_params p JOIN trials t USING (trial_id) ORDER BY t.number, p.param_name"
    ).fetchall()
    con.close()
    out: dict[int, list[float]] = {}
    for number, _, value in rows:
        out.setdefault(number, []).append(value)
    return [out[n] for n in sorted(out)]


def test_sigkill_at_random_moments_and_during_export_resumes_to_the_uninterrupted_run(quickstart, tmp_path):
    cfg = search_yaml(quickstart, tmp_path / "search.yml", budget=BUDGET, popsize=6)
    reference = tmp_path / "reference"
    proc = run_evolve(cfg, reference, quickstart["tasks"], "--quiet", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    storage = tmp_path / "killed"
    moments = sorted(random.Random(11).sample(range(2, BUDGET - 2), 3))
    for i, moment in enumerate(moments):
        driver = start(cfg, storage, quickstart["tasks"], *(["--resume"] if i else []))
        below = kill_driver_when(driver, lambda: complete_count(storage) >= moment, f"{moment} finished trials")
        assert_nothing_left(below)
        assert not (storage / "final_model").exists()
    # the fourth run finishes the budget; it is killed as soon as it starts its export
    driver = start(cfg, storage, quickstart["tasks"], "--resume")
    below = kill_driver_when(driver, lambda: "search stopped" in (driver.stdout.readline() or ""), "the export")
    assert_nothing_left(below, at_least=0)  # the cluster was shut down before the export began
    assert complete_count(storage) == BUDGET
    assert not (storage / "final_model").exists()  # no half-written model where the result belongs
    final = run_evolve(cfg, storage, quickstart["tasks"], "--resume", "--quiet", timeout=600)
    assert final.returncode == 0, final.stderr[-3000:]

    got, want = trials(storage), trials(reference)
    assert comparable(got) == comparable(want)  # every candidate, fitness and metric
    assert params(storage) == params(reference)  # bit-identical genotypes
    assert all(r["attempts"] == 1 for r in got)  # nothing finished was evaluated twice
    assert (storage / "best_config.yaml").read_text() == (reference / "best_config.yaml").read_text()
    assert (storage / "final_model" / "model.safetensors").read_bytes() == (reference / "final_model" / "model.safetensors").read_bytes()
    assert not list(storage.glob(".final_model.incomplete-*"))  # the killed export's leftovers are cleaned
    runs = (storage / "runs.jsonl").read_text().splitlines()
    assert len(runs) == 2  # the runs that reached their end (the export's and the last); killed ones could not


def test_a_worker_killed_mid_search_is_replaced_and_nothing_fails(quickstart, tmp_path):
    cfg = search_yaml(quickstart, tmp_path / "search.yml", budget=12, popsize=4)
    storage = tmp_path / "run"
    driver = start(cfg, storage, quickstart["tasks"], "--num-workers", "2", "--no-save-final-model")
    deadline = time.monotonic() + 240
    while complete_count(storage) < 4:
        assert driver.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    workers = {p: cmd for p, cmd in descendants(driver.pid).items() if "CandidateWorker" in cmd}
    assert len(workers) == 2, workers
    victim = min(workers)
    os.kill(victim, signal.SIGKILL)
    out, _ = driver.communicate(timeout=600)
    assert driver.returncode == 0, out[-3000:]
    rows = trials(storage)
    assert len(rows) == 12 and all(r["state"] == "COMPLETE" for r in rows), [(r["state"], r.get("error")) for r in rows]
    retried = [r for r in rows if r["attempts"] == 2]
    assert len(retried) <= 1  # the victim was idle between two candidates, or its candidate ran again
    assert "1 worker(s) replaced" in out
    record = yaml.safe_load((storage / "runs.jsonl").read_text().splitlines()[-1])
    assert record["replaced"] == 1 and record["retried"] == len(retried) and record["evaluated"] == 12


def test_a_raced_search_killed_twice_resumes_to_the_uninterrupted_run(quickstart, tmp_path):
    """Racing pairs every candidate with the best complete one so far: a resumed driver must
    find the same best (with its per-item values, read back from the study) and so stop the
    same candidates, at the same stages, with the same estimates, as the run that was never
    stopped. Two stages (20 % and 50 % of the items, then the rest)."""
    cfg = search_yaml(quickstart, tmp_path / "search.yml", budget=16, popsize=5)
    data = yaml.safe_load(cfg.read_text())
    data["racing"] = {"fraction": [0.2, 0.5], "confidence_z": 1.0}
    cfg.write_text(yaml.safe_dump(data))
    reference = tmp_path / "reference"
    proc = run_evolve(cfg, reference, quickstart["tasks"], "--quiet", "--no-save-final-model", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    def finished(storage: Path) -> int:
        try:
            return sum(1 for r in trials(storage) if r["state"] in ("COMPLETE", "PRUNED")) if (storage / "study.db").exists() else 0
        except sqlite3.Error:
            return 0

    storage = tmp_path / "killed"
    for i, moment in enumerate((4, 9)):
        driver = start(cfg, storage, quickstart["tasks"], "--no-save-final-model", *(["--resume"] if i else []))
        kill_driver_when(driver, lambda: finished(storage) >= moment, f"{moment} finished trials")
    last = run_evolve(cfg, storage, quickstart["tasks"], "--resume", "--quiet", "--no-save-final-model", timeout=600)
    assert last.returncode == 0, last.stderr[-3000:]

    def raced(rows):
        return [(*comparable([r])[0], r.get("estimate"), r.get("paired_with"), r.get("first_items"), r.get("stage"),
                 r.get("items")) for r in rows]

    got, want = trials(storage), trials(reference)
    # racing stopped candidates at both stages: the comparison covers both
    assert {r.get("stage") for r in want if r["state"] == "PRUNED"} == {1, 2}
    check_raced(want, [0.2, 0.5], {"qs_arithmetic": 66, "qs_facts": 20})
    assert raced(got) == raced(want)
    assert params(storage) == params(reference)
    assert (storage / "best_config.yaml").read_text() == (reference / "best_config.yaml").read_text()
