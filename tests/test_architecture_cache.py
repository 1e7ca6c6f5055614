"""The on-disk cache of derived architectures: a later process reads the description instead of
importing transformers, reads back exactly what derivation gives, and never trusts a stale or
broken file."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import tiny_config
from merge_engine import architecture as A

REPO = Path(__file__).resolve().parent.parent


def _config(family: str) -> dict:
    cfg = tiny_config(family).to_dict()
    cfg["architectures"] = [{"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel", "qwen2": "Qwen2ForCausalLM"}[family]]
    return cfg


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("EVOMERGE_CACHE_DIR", str(tmp_path / "cache"))
    A._derive.cache_clear()
    yield tmp_path / "cache" / "architectures"
    A._derive.cache_clear()


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_cached_description_equals_derivation(cache_dir, family):
    cfg = _config(family)
    first = A.derive_architectures(cfg)
    files = list(cache_dir.glob("*.json"))
    assert len(files) == 1 and files[0].name.startswith(cfg["architectures"][0] + "-")
    A._derive.cache_clear()  # the next call must come from the file
    again = A.derive_architectures(cfg)
    assert again == first and len(first) >= 1
    assert again[0].origin == "derived"
    assert isinstance(again[0].layer_templates, tuple) and isinstance(again[0].layer_templates[0], A.WeightInfo)
    # and the file really is what was read: rewriting one weight name changes the result
    data = json.loads(files[0].read_text())
    data[0]["layer_templates"][0]["name"] = "renamed.{layer}.weight"
    files[0].write_text(json.dumps(data))
    A._derive.cache_clear()
    assert A.derive_architectures(cfg)[0].layer_templates[0].name == "renamed.{layer}.weight"


def test_broken_file_is_derived_again_and_replaced(cache_dir):
    cfg = _config("llama")
    expected = A.derive_architectures(cfg)
    (path,) = cache_dir.glob("*.json")
    path.write_text('[{"__type__": "ArchitectureInfo", "name": ')  # a torn write
    A._derive.cache_clear()
    assert A.derive_architectures(cfg) == expected
    assert json.loads(path.read_text())[0]["name"] == expected[0].name


def test_key_changes_with_config_transformers_version_and_code(cache_dir, monkeypatch):
    text = json.dumps({"hidden_size": 32}, sort_keys=True)
    base = A._disk_cache_path("LlamaForCausalLM", text)
    assert A._disk_cache_path("LlamaForCausalLM", json.dumps({"hidden_size": 64}, sort_keys=True)) != base
    assert A._disk_cache_path("MistralForCausalLM", text) != base
    monkeypatch.setattr(A, "_code_version", lambda: "4.0.0/0123456789abcdef")
    assert A._disk_cache_path("LlamaForCausalLM", text) != base


def test_empty_cache_dir_setting_disables_the_disk_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EVOMERGE_CACHE_DIR", "")
    A._derive.cache_clear()
    try:
        assert A.architecture_cache_dir() is None
        assert A.derive_architectures(_config("llama"))[0].origin == "derived"
    finally:
        A._derive.cache_clear()


@pytest.mark.slow
def test_second_process_does_not_import_transformers(tmp_path):
    cfg_path = tmp_path / "config.json"
    cfg_path.write_text(json.dumps(_config("llama")))
    probe = (
        "import json, sys; from merge_engine.architecture import derive_architectures; "
        f"a = derive_architectures(json.load(open({str(cfg_path)!r}))); "
        "print(json.dumps([a[0].name, len(a[0].layer_templates), 'transformers' in sys.modules]))"
    )
    env = {**__import__("os").environ, "EVOMERGE_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(REPO)}
    runs = [json.loads(subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                                      check=True).stdout.strip().splitlines()[-1]) for _ in range(2)]
    assert runs[0][:2] == runs[1][:2] and runs[0][1] == 9  # 4 projections + gate/up/down + 2 norms
    assert runs[0][2] is True and runs[1][2] is False
