"""bench/gpu_check.sh, the first-GPU check (docs/gpu.md): its --dry-run runs every step on CPU at a
tiny shape and must print the full table with real numbers; the wheel selection installs exactly
what a machine lacks."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import gpu_check  # noqa: E402
from merge_throughput import numel, tensor_list  # noqa: E402

STEPS = [
    "wheels", "env", "cuda tests", "generate", "startup", "io floor",
    "stream linear", "stream ties", "stream dare_ties", "copy floor",
    "resident linear", "resident ties", "resident ties +dens", "resident dare_ties", "resident dare_ties +dens",
    "extract-lora", "total",
]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_check")
    out = root / "out"
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(out))
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run", "--work-dir", str(root / "work")],
                          capture_output=True, text=True, timeout=400, env=env, cwd=REPO)
    return proc, out


def table_rows(text: str) -> dict[str, tuple[str, str, str, str]]:
    """step -> (status, result, time, ratio), parsed from the printed table's fixed columns."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("step ")) + 2
    rows = {}
    for ln in lines[start:]:
        step, status, rest = ln[:24].strip(), ln[25:32].strip(), ln[33:]
        m = re.match(r"(.*?)\s+(\S+)\s+(\S*x \S+|n/a)?\s*$", rest)
        assert m, ln
        rows[step] = (status, m.group(1).strip(), m.group(2), m.group(3) or "")
    return rows


def test_dry_run_prints_every_row_with_numbers(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "evomerge GPU check (DRY RUN: CPU, tiny shape)" in proc.stdout
    rows = table_rows(proc.stdout)
    assert list(rows) == STEPS
    for step, (status, result, time_s, ratio) in rows.items():
        assert status == ("skip" if step == "wheels" else "ok"), (step, status, result)
        assert re.fullmatch(r"[\d.]+(ms|s)", time_s), (step, time_s)
    # the same table in $OUT, and every number in gpu_check.json
    assert (out / "gpu_check.txt").read_text() == proc.stdout
    assert (out / "gpu_tests.txt").exists() and (out / "gpu_check.log").exists()
    assert re.search(r"\d+ passed, 0 failed, \d+ skipped", rows["cuda tests"][1])
    for step in ("copy floor", "resident linear", "resident ties", "resident dare_ties", "resident ties +dens"):
        ratio = rows[step][3]
        assert re.fullmatch(r"\d+\.\d\dx copy", ratio), (step, ratio)
        assert float(ratio.split("x")[0]) > 0
    assert rows["copy floor"][3] == "1.00x copy" and rows["io floor"][3] == "1.00x io"
    for m in ("linear", "ties", "dare_ties"):
        assert re.fullmatch(r"-?\d+\.\d\dx io|n/a", rows[f"stream {m}"][3])
        assert rows[f"resident {m}"][1].startswith("bit-equal to stream 21/21")


def test_dry_run_json_numbers(dry_run):
    proc, out = dry_run
    data = json.loads((out / "gpu_check.json").read_text())
    steps = data["steps"]
    assert data["mode"] == "dry-run" and data["spec"] == gpu_check.TINY
    params = sum(numel(s) for _, s in tensor_list(gpu_check.TINY))
    model_bytes = 2 * params
    assert steps["generate"]["params"] == params and steps["generate"]["bytes"] == 3 * model_bytes
    counts = steps["cuda tests"]["counts"]
    assert counts.get("failed", 0) == 0 and counts.get("passed", 0) + counts.get("skipped", 0) >= 30
    floor = steps["io floor"]
    # file sizes: the tensors' bytes plus a safetensors header each (the same for the three models)
    assert floor["read_bytes"] == 3 * floor["write_bytes"]
    assert model_bytes < floor["write_bytes"] < model_bytes + 100_000
    assert floor["read_s"] > 0 and floor["write_s"] > 0
    assert steps["startup"]["seconds"] > 0
    tensors = 9 * gpu_check.TINY["num_hidden_layers"] + 3
    for m in gpu_check.METHODS:
        s = steps[f"stream {m}"]
        assert s["tensors"] == tensors and s["bytes"] == model_bytes and s["wall_s"] > 0
        r = steps[f"resident {m}"]
        assert r["agree"] == {"equal": tensors, "total": tensors, "differ": [], "max_abs": 0.0, "missing_in_model": []}
        assert r["bytes"] == model_bytes
        w = r["weights"]
        assert 0 < w["floor_s"] and 0 < w["candidate_s"] <= w["candidate_median_s"]
        assert w["ratio"] == pytest.approx(w["candidate_s"] / w["floor_s"])
        if m in gpu_check.DENSITY_METHODS:
            assert r["density"]["candidate_s"] > 0
    assert steps["copy floor"]["bytes"] == model_bytes and steps["copy floor"]["seconds"] > 0
    lora = steps["extract-lora"]
    assert lora["r"] == gpu_check.LORA_RANK_TINY and lora["adapter_bytes"] > 0
    assert 1.0 <= lora["error"]["worst"] <= 1.01 and lora["error"]["adapter_worst"] <= 1.05
    assert [r["step"] for r in data["rows"]] == STEPS


# ----------------------------------------------------------------------------------------------
# which carried wheels a machine needs


def wheel(folder: Path, name: str) -> None:
    (folder / name).write_bytes(b"")


def test_wheel_selection(tmp_path):
    from importlib.metadata import version

    click = version("click")
    newer = ".".join(str(int(x) + 1) if i == 0 else x for i, x in enumerate(click.split(".")))
    wheel(tmp_path, f"click-{newer}-py3-none-any.whl")  # newer than installed: installed
    wheel(tmp_path, "pyyaml-1.0-cp312-cp312-manylinux2014_x86_64.whl")  # older than installed: kept
    wheel(tmp_path, "no_such_package_here-1.0-py3-none-any.whl")  # missing: installed
    wheel(tmp_path, "transformers-999.0-py3-none-any.whl")  # this machine's transformers is 5.x: group unused
    wheel(tmp_path, "huggingface_hub-999.0-py3-none-any.whl")
    install, present, notes = gpu_check.select_wheels(tmp_path)
    assert sorted(p.name.split("-")[0] for p in install) == ["click", "no_such_package_here"]
    assert {p.split()[0] for p in present} == {"pyyaml", "transformers", "huggingface-hub"}
    assert notes == []


def test_wheel_selection_refuses_two_versions(tmp_path):
    wheel(tmp_path, "click-1.0-py3-none-any.whl")
    wheel(tmp_path, "click-2.0-py3-none-any.whl")
    with pytest.raises(SystemExit, match="two wheels of click"):
        gpu_check.select_wheels(tmp_path)
