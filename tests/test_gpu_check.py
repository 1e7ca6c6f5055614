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


@pytest.mark.slow
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


@pytest.mark.slow
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


def wheel(folder: Path, name: str, version: str, *requires: str) -> None:
    """A stand-in wheel: only its name and its METADATA's Requires-Dist lines matter here."""
    import zipfile

    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as z:
        z.writestr(f"{name}-{version}.dist-info/METADATA", meta + "\nlong description\nRequires-Dist: not-a-header\n")


def picked(install) -> list[str]:
    return sorted(p.name.split("-")[0] for p in install)


def test_wheel_selection_takes_what_is_missing_with_its_requirements(tmp_path):
    wheel(tmp_path, "no_such_root", "1.0", "no_such_dep>=2", "no_such_windows_dep; platform_system == 'Windows'",
          "no_such_extra_dep; extra == 'docs'", "click>=8.0", 'no_such_old_python_dep; python_version < "3.8"')
    wheel(tmp_path, "no_such_dep", "2.1", "no_such_leaf (>=0.5)")
    wheel(tmp_path, "no_such_leaf", "0.5.1")
    wheel(tmp_path, "click", "99.0")  # this machine's click satisfies >=8.0: not installed
    install, present, notes = gpu_check.select_wheels(tmp_path, {"no_such_root": ">=1"})
    assert picked(install) == ["no_such_dep", "no_such_leaf", "no_such_root"]
    assert [p.split()[0] for p in present] == ["click"]
    assert notes == []


def test_wheel_selection_keeps_what_the_machine_has(tmp_path):
    # this venv has every root (pydantic, click, pyyaml, tqdm, pytest, transformers 5): nothing to install
    wheel(tmp_path, "pydantic", "999.0", "no_such_dep")
    wheel(tmp_path, "transformers", "5.999", "no_such_dep")
    install, present, _ = gpu_check.select_wheels(tmp_path)
    assert install == []
    assert {p.split()[0] for p in present} == set(gpu_check.ROOTS)


def test_wheel_selection_refuses_what_does_not_fit(tmp_path):
    wheel(tmp_path, "no_such_root", "1.0", "no_such_dep>=3")
    wheel(tmp_path, "no_such_dep", "2.0")
    with pytest.raises(SystemExit, match="no-such-dep>=3: the carried no_such_dep-2.0"):
        gpu_check.select_wheels(tmp_path, {"no_such_root": ">=1"})
    with pytest.raises(SystemExit, match="no-such-other: this machine has none and no wheel is carried"):
        gpu_check.select_wheels(tmp_path, {"no_such_other": ""})
    wheel(tmp_path, "no_such_dep", "3.0")
    with pytest.raises(SystemExit, match="two wheels of no-such-dep"):
        gpu_check.select_wheels(tmp_path, {"no_such_root": ">=1"})


@pytest.mark.parametrize("version, spec, ok", [
    ("2.14.4", ">=2.5", True), ("2.4", ">=2.5", False), ("5.17.0", ">=5,<6", True), ("6.0", ">=5,<6", False),
    ("2.50.5", "==2.50.5", True), ("2.50.4", "==2.50.5", False), ("0.50.0", ">=0.50.0dev0", True),
    ("1.4.2", "~=1.4", True), ("2.0", "~=1.4", False), ("3.12.3", "==3.12.*", True), ("4.15.0", ">=4.16.0", False),
])
def test_version_specifiers(version, spec, ok):
    assert gpu_check.satisfies(version, spec) is ok
