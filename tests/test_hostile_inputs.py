"""mergekit-evolve against broken and hostile inputs, through the real CLI: experiment directories
whose files were replaced by pickle gadgets or damaged, references the driver must check before
any worker starts, and a search whose every candidate fails alike. Each case checks what the user
sees (one line, its exit code), that no gadget ran (a marker file is never created) and that the
user's files are left as they were. docs/bad-inputs.md lists them."""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import pickle
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from test_search import ENV, EVOLVE, run_evolve, search_yaml, trials

pytestmark = [pytest.mark.e2e, pytest.mark.ray, pytest.mark.slow]


# -- pickle gadgets -------------------------------------------------------------------------------


class _Gadget:
    """Unpickling calls `call(*args)`: what an attacker would put in a shared experiment folder."""

    def __init__(self, call, args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


def gadgets(marker: Path) -> list[bytes]:
    """os.system, subprocess.call, eval and a builtins.getattr chain, each in protocols 0 to 5:
    every one creates `marker` when unpickled."""
    cmd = f"touch {marker}"
    calls = [
        (os.system, (cmd,)),
        (subprocess.call, (["touch", str(marker)],)),
        (builtins.eval, (f"__import__('os').system({cmd!r})",)),
        (builtins.exec, (f"import pathlib; pathlib.Path({str(marker)!r}).touch()",)),
    ]
    out = [pickle.dumps(_Gadget(c, a), protocol=p) for c, a in calls for p in range(0, pickle.HIGHEST_PROTOCOL + 1)]
    # builtins.getattr(__import__("os"), "system")(cmd), written as opcodes (a module object cannot
    # be pickled), behind each protocol's header
    body = (b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(S'os'\ntRS'system'\ntR(" + repr(cmd).encode()
            .replace(b'"', b"'").join([b"S", b"\ntR."]))
    out += [body if p < 2 else bytes([0x80, p]) + body for p in range(0, pickle.HIGHEST_PROTOCOL + 1)]
    return out


def test_the_gadgets_work(tmp_path):
    """The check below means something only if the gadgets really run code when unpickled."""
    marker = tmp_path / "marker"
    for blob in gadgets(marker):
        pickle.loads(blob)
        assert marker.exists()
        marker.unlink()


# -- a finished experiment to tamper with ---------------------------------------------------------


@pytest.fixture(scope="module")
def experiment(quickstart, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    cfg = search_yaml(quickstart, root / "search.yml", budget=5, popsize=4)
    storage = root / "evolve"
    proc = run_evolve(cfg, storage, quickstart["tasks"], "--no-save-final-model", "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"cfg": cfg, "storage": storage, "tasks": quickstart["tasks"]}


def copy_of(experiment, tmp_path) -> Path:
    dest = tmp_path / "evolve"
    shutil.copytree(experiment["storage"], dest)
    return dest


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_line(proc, code: int, *words: str) -> str:
    out = (proc.stderr + proc.stdout).strip().splitlines()
    assert proc.returncode == code, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.strip().splitlines()]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    for w in words:
        assert w in errors[0], errors[0]
    assert out  # something was said
    return errors[0]


def resume(experiment, storage: Path, *extra: str):
    return run_evolve(experiment["cfg"], storage, experiment["tasks"], "--resume", "--no-save-final-model", "--quiet", *extra)


def test_resume_never_opens_a_planted_checkpoint_and_continues(experiment, tmp_path):
    """checkpoint.pkl (the file older versions unpickled on --resume) replaced by every gadget in
    turn, and gadgets in the other files a report reads (runs.jsonl lines, rescore.json): the
    search resumes from its journal, finishes its larger budget, and no gadget ever runs."""
    storage = copy_of(experiment, tmp_path)
    marker = tmp_path / "marker"
    blobs = gadgets(marker)
    (storage / "checkpoint.pkl").write_bytes(blobs[0])
    with open(storage / "runs.jsonl", "ab") as f:
        f.write(blobs[1] + b"\n")
    before = [(t["number"], t["value"]) for t in trials(storage)]
    proc = resume(experiment, storage, "--max-fevals", "7")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not marker.exists()
    after = trials(storage)
    assert [(t["number"], t["value"]) for t in after[:5]] == before  # finished work kept, not redone
    assert len(after) == 7 and all(t["state"] in ("COMPLETE", "FAIL", "PRUNED") for t in after)
    for blob in blobs[::5]:  # a spread of gadgets and protocols (the report never opens the file at all)
        (storage / "checkpoint.pkl").write_bytes(blob)
        report = subprocess.run([EVOLVE, "report", str(storage)], capture_output=True, text=True, env=ENV, timeout=120)
        assert report.returncode == 0, report.stderr
        assert not marker.exists()


@pytest.mark.parametrize("name, words, report_code", [
    ("study.db", ["study.db", "not an SQLite database"], 2),  # the report has nothing to show
    ("manifest.json", ["manifest.json", "not an evomerge manifest"], 0),  # the report shows the study without it
])
def test_a_gadget_in_place_of_an_experiment_file_is_one_line(experiment, tmp_path, name, words, report_code):
    storage = copy_of(experiment, tmp_path)
    marker = tmp_path / "marker"
    for blob in gadgets(marker)[::5]:  # a spread of gadgets and protocols
        (storage / name).write_bytes(blob)
        one_line(resume(experiment, storage), 2, *words)
        report = subprocess.run([EVOLVE, "report", str(storage)], capture_output=True, text=True, env=ENV, timeout=120)
        assert report.returncode == report_code, report.stderr
        assert len(report.stderr.strip().splitlines()) <= 1 and "Traceback" not in report.stderr, report.stderr
        assert not marker.exists()
        assert (storage / name).read_bytes() == blob  # left as it was


def test_a_damaged_study_is_one_line_and_left_as_it_was(experiment, tmp_path):
    storage = copy_of(experiment, tmp_path)
    db = storage / "study.db"
    data = bytearray(db.read_bytes())
    data[4096:8192] = b"\xff" * 4096  # the second page overwritten
    db.write_bytes(bytes(data))
    before = digest(db)
    line = one_line(resume(experiment, storage), 2, str(db))
    assert "damaged" in line or "malformed" in line, line
    assert digest(db) == before


def test_a_foreign_sqlite_file_and_a_foreign_manifest_are_refused(experiment, tmp_path):
    storage = copy_of(experiment, tmp_path)
    db = storage / "study.db"
    db.unlink()
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE notes (text TEXT)")
    con.commit()
    con.close()
    before = digest(db)
    one_line(resume(experiment, storage), 2, str(db), "no such table")
    assert digest(db) == before
    storage = copy_of(experiment, tmp_path / "b")
    (storage / "manifest.json").write_text(json.dumps({"name": "some other tool", "version": 3}))
    one_line(resume(experiment, storage), 2, "manifest.json", "another tool")


def test_a_folder_of_another_tool_is_not_taken_as_a_new_experiment(quickstart, tmp_path):
    """--storage-path pointed at a model folder by mistake: refused, nothing written into it."""
    folder = tmp_path / "somebody's model"
    shutil.copytree(quickstart["models"]["base"], folder)
    before = {p.name: digest(p) for p in folder.iterdir()}
    proc = run_evolve(search_yaml(quickstart, tmp_path / "s.yml"), folder, quickstart["tasks"])
    one_line(proc, 2, str(folder), "not an experiment")
    assert {p.name: digest(p) for p in folder.iterdir()} == before


def test_a_damaged_rescore_table_is_one_line(experiment, tmp_path):
    from merge_engine.errors import ConfigError
    from evolve.rescore import read_rescore

    (tmp_path / "rescore.json").write_bytes(gadgets(tmp_path / "marker")[3])
    with pytest.raises(ConfigError, match="rescore.json: unreadable re-scoring table"):
        read_rescore(tmp_path)
    (tmp_path / "rescore.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="not an evomerge re-scoring table"):
        read_rescore(tmp_path)
    assert not (tmp_path / "marker").exists()


# -- references checked in the driver, before any worker -----------------------------------------


def config_with(quickstart, path: Path, **changes) -> Path:
    search_yaml(quickstart, path)
    config = yaml.safe_load(path.read_text())
    config.update(changes)
    path.write_text(yaml.safe_dump(config))
    return path


def refused_before_workers(quickstart, tmp_path, cfg: Path, *words: str) -> str:
    storage = tmp_path / "evolve"
    proc = run_evolve(cfg, storage, quickstart["tasks"])
    line = one_line(proc, 2, *words)
    assert not storage.exists()  # refused before the experiment (and Ray) started
    return line


def test_an_unknown_rescore_task_is_refused_before_any_worker(quickstart, tmp_path):
    cfg = config_with(quickstart, tmp_path / "s.yml", rescore={"tasks": ["qs_facts_heldout", "qs_no_such_task"]})
    refused_before_workers(quickstart, tmp_path, cfg, "rescore.tasks[1]", "qs_no_such_task")


def test_a_metric_the_task_does_not_report_is_refused_before_any_worker(quickstart, tmp_path):
    cfg = config_with(quickstart, tmp_path / "s.yml", tasks=["qs_arithmetic", {"name": "qs_facts", "metric": "f1_macro,none"}])
    line = refused_before_workers(quickstart, tmp_path, cfg, "tasks[1].metric", "f1_macro,none")
    assert "acc,none" in line  # what the task does report


def test_a_constraint_metric_the_task_does_not_report_is_refused(quickstart, tmp_path):
    cfg = config_with(quickstart, tmp_path / "s.yml",
                      constraints=[{"task": "qs_facts", "metric": "exact_match,none", "min": 0.1}])
    refused_before_workers(quickstart, tmp_path, cfg, "constraints[0].metric", "exact_match,none")


def test_a_rescore_metric_the_task_does_not_report_is_refused(quickstart, tmp_path):
    cfg = config_with(quickstart, tmp_path / "s.yml",
                      rescore={"tasks": [{"name": "qs_facts_heldout", "metric": "acc_norm,none"}]})
    refused_before_workers(quickstart, tmp_path, cfg, "rescore.tasks[0].metric", "acc_norm,none")


def expert_copy(src: Path, dest: Path, change) -> Path:
    shutil.copytree(src, dest)
    files = sorted(dest.glob("*.safetensors"))
    tensors = load_file(files[0])
    change(tensors)
    save_file(tensors, files[0], metadata={"format": "pt"})
    return dest


def test_an_expert_of_another_size_is_refused_before_any_worker(quickstart, tmp_path):
    name = "model.layers.0.mlp.up_proj.weight"

    def halve(tensors):
        tensors[name] = tensors[name][: tensors[name].shape[0] // 2].contiguous()

    odd = expert_copy(quickstart["models"]["expert_facts"], tmp_path / "odd_expert", halve)
    cfg = search_yaml(quickstart, tmp_path / "s.yml")
    config = yaml.safe_load(cfg.read_text())
    config["genome"]["models"][1] = str(odd)
    cfg.write_text(yaml.safe_dump(config))
    refused_before_workers(quickstart, tmp_path, cfg, "genome", "shape mismatch", name)


def test_an_expert_with_a_nan_stops_the_search_in_one_line(quickstart, tmp_path):
    """An expert with a NaN in one tensor (the driver reads no tensor data): every worker finds it
    when it merges its starting recipe, refuses to start, and the search ends in one line naming
    the tensor, exit 1, with nothing exported."""
    name = "model.layers.1.self_attn.q_proj.weight"

    def poison(tensors):
        tensors[name] = tensors[name].clone()
        tensors[name][0, 0] = float("nan")

    bad = expert_copy(quickstart["models"]["expert_facts"], tmp_path / "nan_expert", poison)
    cfg = search_yaml(quickstart, tmp_path / "s.yml", budget=40)
    config = yaml.safe_load(cfg.read_text())
    config["genome"]["models"][1] = str(bad)
    cfg.write_text(yaml.safe_dump(config))
    storage = tmp_path / "evolve"
    proc = run_evolve(cfg, storage, quickstart["tasks"], "--quiet")
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "failed to start" in errors[0] and name in errors[0] and "non-finite" in errors[0], errors[0]
    assert not trials(storage)  # no candidate was scored with a broken model
    assert not (storage / "final_model").exists() and not (storage / "best_config.yaml").exists()


def test_candidates_failing_alike_stop_the_search(quickstart, tmp_path):
    """The rule behind the early stop, on a real SearchRun (no workers): three failures with one
    error before any success stop it; a success first, or different errors, do not."""
    from evolve.config import load_search_config
    from evolve.loop import Outcome
    from evolve.options import EvolveOptions
    from evolve.search import SearchRun
    from merge_engine.errors import RunFailure

    cfg = search_yaml(quickstart, tmp_path / "s.yml")
    config, text = load_search_config(cfg)

    def run(name):
        return SearchRun(config, text, EvolveOptions(storage_path=tmp_path / name, task_search_path=[str(quickstart["tasks"])]))

    search = run("a")
    boom = Outcome("failed", None, error="TaskError: the same")
    search._stop_if_failing_alike(boom)
    search._stop_if_failing_alike(Outcome("failed", None, error="ModelError: another"))
    search._stop_if_failing_alike(boom)
    search._stop_if_failing_alike(boom)
    with pytest.raises(RunFailure, match="the first 3 candidates all failed with: TaskError: the same"):
        search._stop_if_failing_alike(boom)
    assert search.record.stop_reason == "every candidate failed alike"
    search = run("b")
    search._stop_if_failing_alike(Outcome("complete", 0.5))
    for _ in range(5):
        search._stop_if_failing_alike(boom)  # a configuration that worked once is not the cause
