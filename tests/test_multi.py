"""`mergekit-multi` (docs/mergekit-reference.md §4): a YAML stream of recipes, named intermediates written to
--intermediate-dir and used by name, one unnamed final recipe written to --out-path."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import read_model, write_yaml

REPO = Path(__file__).resolve().parents[1]
_VENV_CLI = Path(sys.executable).parent / "mergekit-multi"
MERGEKIT_MULTI = str(_VENV_CLI if _VENV_CLI.exists() else REPO / ".venv" / "bin" / "mergekit-multi")


def run_multi(cfg: Path, inter: Path, out: Path | None, *flags: str) -> subprocess.CompletedProcess:
    out_flags = ["--out-path", str(out)] if out is not None else []
    return subprocess.run(
        [MERGEKIT_MULTI, str(cfg), "--intermediate-dir", str(inter), *out_flags, "--quiet", *flags],
        capture_output=True, text=True, timeout=300, cwd=cfg.parent,
    )


def linear(models: list[tuple[str, float]], name: str | None = None) -> str:
    head = f"name: {name}\n" if name else ""
    body = "".join(f"  - model: {m}\n    parameters: {{weight: {w}}}\n" for m, w in models)
    return f"{head}merge_method: linear\nmodels:\n{body}dtype: float32\n"


def snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


@pytest.mark.slow
def test_intermediate_then_final(tmp_path, llama_models):
    base, a, b = (str(llama_models[k]) for k in ("base", "a", "b"))
    # the final recipe comes first in the file: recipes run in dependency order, not file order
    text = linear([("mid", 0.6), (base, 0.4)]) + "---\n" + linear([(a, 0.3), (b, 0.7)], name="mid")
    cfg = write_yaml(tmp_path / "multi.yml", text)
    inter, out = tmp_path / "inter", tmp_path / "out"
    proc = run_multi(cfg, inter, out)
    assert proc.returncode == 0, proc.stderr

    ta, tb, tbase = read_model(a), read_model(b), read_model(base)
    mid, final = read_model(inter / "mid"), read_model(out)
    assert set(final) == set(ta) == set(mid)
    for name in ta:
        want_mid = 0.3 * ta[name].double() + 0.7 * tb[name].double()
        torch.testing.assert_close(mid[name].double(), want_mid, rtol=0, atol=1e-6)
        want = 0.6 * want_mid + 0.4 * tbase[name].double()
        torch.testing.assert_close(final[name].double(), want, rtol=0, atol=2e-6)
    # the final's recorded recipe points at the intermediate's folder, so mergekit-yaml can rerun it
    assert str(inter / "mid") in (out / "mergekit_config.yml").read_text()

    # --lazy (default): the existing intermediate is reused, its files untouched
    before = snapshot(inter)
    proc = run_multi(cfg, inter, tmp_path / "out2")
    assert proc.returncode == 0, proc.stderr
    assert snapshot(inter) == before
    again = read_model(tmp_path / "out2")
    assert all(torch.equal(again[k], final[k]) for k in final)

    # --no-lazy: the intermediate is merged again (new files), same values
    proc = run_multi(cfg, inter, tmp_path / "out3", "--no-lazy")
    assert proc.returncode == 0, proc.stderr
    after = snapshot(inter)
    assert set(after) == set(before)
    assert after["mid/model.safetensors"] != before["mid/model.safetensors"]
    remerged = read_model(inter / "mid")
    assert all(torch.equal(remerged[k], mid[k]) for k in mid)


@pytest.mark.slow
def test_lazy_reuse_reads_the_existing_intermediate(tmp_path, llama_models):
    """A lazily reused intermediate is really what the final merge reads (not merged again)."""
    base, a, b = (str(llama_models[k]) for k in ("base", "a", "b"))
    inter = tmp_path / "inter"
    inter.mkdir()
    # a stand-in for an earlier run's result: fine-tune b itself
    shutil.copytree(b, inter / "mid")
    text = linear([(a, 0.5), (base, 0.5)], name="mid") + "---\n" + linear([("mid", 0.5), (a, 0.5)])
    cfg = write_yaml(tmp_path / "multi.yml", text)
    proc = run_multi(cfg, inter, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    ta, tb, final = read_model(a), read_model(b), read_model(tmp_path / "out")
    name = "model.layers.1.mlp.up_proj.weight"
    torch.testing.assert_close(final[name].double(), 0.5 * tb[name].double() + 0.5 * ta[name].double(), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_slerp_final_of_an_intermediate(tmp_path, llama_models):
    base, a, b = (str(llama_models[k]) for k in ("base", "a", "b"))
    text = (
        linear([(a, 0.5), (b, 0.5)], name="mid") + "---\n"
        f"merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {base}\n  - model: mid\n"
        "parameters: {t: 0.3}\ndtype: float32\n"
    )
    cfg = write_yaml(tmp_path / "multi.yml", text)
    proc = run_multi(cfg, tmp_path / "inter", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    ta, tb, tbase, final = read_model(a), read_model(b), read_model(base), read_model(tmp_path / "out")
    name = "model.layers.2.self_attn.o_proj.weight"
    v0 = tbase[name].double().flatten()
    v1 = (0.5 * ta[name].double() + 0.5 * tb[name].double()).flatten()
    # slerp from the formula: angle between the normalised vectors, sin-weighted combination
    cos = float(torch.dot(v0 / v0.norm(), v1 / v1.norm()))
    theta = torch.arccos(torch.tensor(cos, dtype=torch.float64))
    s0 = torch.sin((1 - 0.3) * theta) / torch.sin(theta)
    s1 = torch.sin(0.3 * theta) / torch.sin(theta)
    want = (s0 * v0 + s1 * v1).reshape(tbase[name].shape)
    torch.testing.assert_close(final[name].double(), want, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# errors: exit 2, one line naming the recipe, and no merge has run


def assert_fails(tmp_path: Path, text: str, *needles: str) -> str:
    cfg = write_yaml(tmp_path / "multi.yml", text)
    inter, out = tmp_path / "inter", tmp_path / "out"
    proc = run_multi(cfg, inter, out)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out.exists()
    assert not inter.exists() or list(inter.iterdir()) == []
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".out.")] == []
    return lines[0]


def test_two_unnamed_recipes(tmp_path, llama_models):
    a, b = str(llama_models["a"]), str(llama_models["b"])
    text = linear([(a, 0.5), (b, 0.5)], name="mid") + "---\n" + linear([(a, 0.5), (b, 0.5)]) + "---\n" + linear([("mid", 0.5), (b, 0.5)])
    assert_fails(tmp_path, text, "#2", "#3", "name")


@pytest.mark.slow
def test_only_named_recipes_need_no_out_path(tmp_path, llama_models):
    a, b = str(llama_models["a"]), str(llama_models["b"])
    text = linear([(a, 0.5), (b, 0.5)], name="mid") + "---\n" + linear([("mid", 0.5), (b, 0.5)], name="top")
    cfg = write_yaml(tmp_path / "multi.yml", text)
    inter = tmp_path / "inter"
    proc = run_multi(cfg, inter, None)
    assert proc.returncode == 0, proc.stderr
    ta, tb = read_model(a), read_model(b)
    top = read_model(inter / "top")
    for name in ta:
        want = 0.5 * (0.5 * ta[name].double() + 0.5 * tb[name].double()) + 0.5 * tb[name].double()
        torch.testing.assert_close(top[name].double(), want, rtol=0, atol=2e-6)
    assert sorted(p.name for p in inter.iterdir()) == ["mid", "top"]


def test_final_recipe_without_out_path(tmp_path, llama_models):
    a, b = str(llama_models["a"]), str(llama_models["b"])
    cfg = write_yaml(tmp_path / "multi.yml", linear([(a, 0.5), (b, 0.5)]))
    proc = run_multi(cfg, tmp_path / "inter", None)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "needs --out-path" in lines[0], proc.stderr
    assert not (tmp_path / "inter").exists() or list((tmp_path / "inter").iterdir()) == []


def test_unknown_reference(tmp_path, llama_models):
    a, b = str(llama_models["a"]), str(llama_models["b"])
    text = linear([(a, 0.5), (b, 0.5)], name="mid") + "---\n" + linear([("mdi", 0.5), (b, 0.5)])
    assert_fails(tmp_path, text, "final recipe (#2)", "'mdi'", "mid")


@pytest.mark.parametrize("self_loop", [False, True])
def test_cycle(tmp_path, llama_models, self_loop):
    a = str(llama_models["a"])
    if self_loop:
        text = linear([("x", 0.5), (a, 0.5)], name="x") + "---\n" + linear([("x", 0.5), (a, 0.5)])
        assert_fails(tmp_path, text, "cycle", "x -> x")
    else:
        text = (
            linear([("y", 0.5), (a, 0.5)], name="x") + "---\n"
            + linear([("x", 0.5), (a, 0.5)], name="y") + "---\n"
            + linear([("x", 0.5), (a, 0.5)])
        )
        assert_fails(tmp_path, text, "cycle", "x -> y -> x")


def test_duplicate_names(tmp_path, llama_models):
    a, b = str(llama_models["a"]), str(llama_models["b"])
    text = linear([(a, 0.5), (b, 0.5)], name="mid") + "---\n" + linear([(a, 0.2), (b, 0.8)], name="mid") + "---\n" + linear([("mid", 1.0)])
    assert_fails(tmp_path, text, "recipe #2", "'mid'", "#1")


def test_bad_key_in_a_later_recipe_stops_before_any_merge(tmp_path, llama_models):
    a, b = str(llama_models["a"]), str(llama_models["b"])
    bad = linear([("mid", 0.5), (b, 0.5)]).replace("dtype: float32", "dtype: float33")
    text = linear([(a, 0.5), (b, 0.5)], name="mid") + "---\n" + bad
    assert_fails(tmp_path, text, "recipe #2", "dtype", "float33")


def test_bad_name(tmp_path, llama_models):
    a, b = str(llama_models["a"]), str(llama_models["b"])
    text = linear([(a, 0.5), (b, 0.5)], name="../escape") + "---\n" + linear([(a, 0.5), (b, 0.5)])
    assert_fails(tmp_path, text, "recipe #1", "name")
