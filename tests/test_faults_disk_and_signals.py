"""Faults of the real world, injected: a disk that fills up while a search writes its journal or
its final model (a small tmpfs, mounted by the test; skipped where mounting is not allowed), and
SIGTERM during re-scoring and during the export. Each time: one line naming the path, nothing
finished lost, and `--resume` finishes the job. The runs that meet the fault start private
clusters; the resumes that finish the job join the test process's cluster (shared_ray.py), so
each resume also shows that an experiment does not depend on the cluster it started in."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from test_search import ENV, EVOLVE, run_evolve, search_yaml, trials

pytestmark = [pytest.mark.e2e, pytest.mark.ray, pytest.mark.slow]
MERGEKIT_YAML = str(Path(sys.executable).parent / "mergekit-yaml")


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB tmpfs at tmp_path/disk (root only; skipped elsewhere), unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", f"evomerge-test-{uuid.uuid4().hex[:8]}", str(mount)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(disk: Path, leave: int) -> Path:
    """Fill `disk` up to `leave` free bytes with a file the user could delete."""
    filler = disk / "filler"
    st = os.statvfs(disk)
    free = st.f_bavail * st.f_frsize
    with open(filler, "wb") as f:
        f.write(b"\0" * max(free - leave, 0))
    return filler


def error_lines(proc) -> list[str]:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return [line for line in proc.stderr.strip().splitlines() if line.startswith("error:")]


def test_mergekit_yaml_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, small_disk, llama_models):
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "dtype": "float32", "models": [
        {"model": str(llama_models["a"]), "parameters": {"weight": 0.5}},
        {"model": str(llama_models["b"]), "parameters": {"weight": 0.5}}]}))
    fill(small_disk, 64 * 1024)  # the tiny model's weights are larger than this
    out = small_disk / "merged"
    proc = subprocess.run([MERGEKIT_YAML, str(recipe), str(out)], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 1, proc.stderr
    lines = error_lines(proc)  # after the progress bar, one line
    assert len(lines) == 1 and str(out) in lines[0] and "No space left on device" in lines[0], proc.stderr
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]  # no half-written folder


def test_a_journal_that_hits_a_full_disk_stops_in_one_line_and_resumes(quickstart, tmp_path, small_disk):
    """The study grows with every candidate; the disk fills part-way. The search stops at its next
    ask or tell with one line naming study.db; what was written is intact; after the user frees
    space, --resume finishes the budget without evaluating a finished candidate again."""
    cfg = search_yaml(quickstart, tmp_path / "search.yml", budget=20, popsize=6)
    storage = small_disk / "evolve"
    cmd = [EVOLVE, str(cfg), "--storage-path", str(storage), "--task-search-path", str(quickstart["tasks"]),
           "--no-save-final-model", "--quiet"]
    log = tmp_path / "stderr.txt"  # a file, not a pipe nobody reads while the test polls
    with open(log, "w") as err_file:
        driver = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=err_file, text=True)
        try:
            deadline = time.monotonic() + 600
            while sum(1 for t in _trials_or_none(storage) if t["state"] == "COMPLETE") < 3:  # part-way
                assert driver.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "no candidate finished"
                time.sleep(0.2)
            filler = fill(small_disk, 0)  # the disk is full from here on
            driver.wait(timeout=600)
        finally:
            if driver.poll() is None:
                driver.kill()
    proc = subprocess.CompletedProcess(cmd, driver.returncode, "", log.read_text())
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = error_lines(proc)
    # the first write that failed names its file: the journal, or best_config.yaml written beside it
    assert len(lines) == 1 and "--resume" in lines[0], proc.stderr[-2000:]
    assert str(storage / "study.db") in lines[0] or str(storage / "best_config.yaml") in lines[0], lines[0]
    before = {t["number"]: t["value"] for t in trials(storage) if t["state"] == "COMPLETE"}
    assert 0 < len(before) < 20
    filler.unlink()
    proc = run_evolve(cfg, storage, quickstart["tasks"], "--resume", "--no-save-final-model", "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = trials(storage)
    assert len(after) == 20 and all(t["state"] in ("COMPLETE", "FAIL", "PRUNED") for t in after)
    assert {n: v for n, v in ((t["number"], t["value"]) for t in after) if n in before} == before
    assert all(t["attempts"] == 1 for t in after if t["number"] in before)  # finished work not redone
    assert (storage / "best_config.yaml").exists()


def test_an_export_that_hits_a_full_disk_is_one_line_and_resume_exports(quickstart, tmp_path, small_disk):
    cfg = search_yaml(quickstart, tmp_path / "search.yml", budget=4, popsize=4)
    storage = small_disk / "evolve"
    proc = run_evolve(cfg, storage, quickstart["tasks"], "--quiet", "--no-save-final-model")
    assert proc.returncode == 0, proc.stderr[-3000:]
    filler = fill(small_disk, 128 * 1024)  # the journal is written; the model does not fit
    proc = run_evolve(cfg, storage, quickstart["tasks"], "--resume", "--quiet")
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = error_lines(proc)
    assert len(lines) == 1 and str(storage / "final_model") in lines[0], proc.stderr[-2000:]
    assert not (storage / "final_model").exists() and not list(storage.glob(".final_model.incomplete-*"))
    filler.unlink()
    proc = run_evolve(cfg, storage, quickstart["tasks"], "--resume", "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (storage / "final_model" / "model.safetensors").exists()
    assert all(t["attempts"] == 1 for t in trials(storage))
    # the two resumes had nothing to evaluate: they exported without starting a worker
    runs = [json.loads(line) for line in (storage / "runs.jsonl").read_text().splitlines()]
    assert [(r["workers"], r["evaluated"]) for r in runs] == [(1, 4), (0, 0), (0, 0)]


def _trials_or_none(storage: Path) -> list[dict]:
    """The study's trials, or none while it is being created (or locked by the writer)."""
    import sqlite3

    try:
        return trials(storage) if (storage / "study.db").exists() else []
    except sqlite3.Error:
        return []


def sigterm_when(proc: subprocess.Popen, line_starts: str, timeout: float = 400) -> list[str]:
    """Read the driver's stdout until a line starting with `line_starts`, then SIGTERM it."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if line.startswith(line_starts):
            os.kill(proc.pid, signal.SIGTERM)
            proc.communicate(timeout=300)
            return seen
    proc.kill()
    raise AssertionError(f"never saw {line_starts!r}: {seen}")


def test_sigterm_during_rescoring_and_during_export_then_resume_finishes_both(quickstart, tmp_path):
    cfg = search_yaml(quickstart, tmp_path / "search.yml", budget=6, popsize=4)
    data = yaml.safe_load(cfg.read_text())
    data["rescore"] = {"tasks": ["qs_arithmetic_heldout", "qs_facts_heldout"], "top_k": 3}
    cfg.write_text(yaml.safe_dump(data))
    storage = tmp_path / "evolve"
    cmd = [EVOLVE, str(cfg), "--storage-path", str(storage), "--task-search-path", str(quickstart["tasks"])]
    driver = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    sigterm_when(driver, "  trial ")  # the first held-out score is in: re-scoring is under way
    table = json.loads((storage / "rescore.json").read_text())
    assert table["chosen"] is None  # interrupted before the end
    # second run: resumes the re-scoring, and is stopped as its export begins
    driver = subprocess.Popen(cmd + ["--resume"], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    sigterm_when(driver, "search stopped")
    assert not list(storage.glob(".final_model.incomplete-*"))
    table = json.loads((storage / "rescore.json").read_text())
    assert table["chosen"] is not None and all(r["status"] == "complete" for r in table["rows"])
    scored_once = {r["number"]: r["heldout_fitness"] for r in table["rows"]}
    proc = run_evolve(cfg, storage, quickstart["tasks"], "--resume", "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = json.loads((storage / "rescore.json").read_text())
    assert {r["number"]: r["heldout_fitness"] for r in table["rows"]} == scored_once  # not scored again
    assert f"trial {table['chosen']}," in (storage / "best_config.yaml").read_text().splitlines()[0]
    assert (storage / "final_model" / "model.safetensors").exists()
    assert len(trials(storage)) == 6
