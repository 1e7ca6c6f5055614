"""Hugging Face hub ids (`org/name`, `org/name@revision`) as search genome models and merge inputs.

No network: a Hugging Face hub cache is laid out by hand in a temporary folder (refs, snapshots,
blobs linked from the snapshots, as huggingface_hub itself writes them), filled with tiny real
models saved by transformers, and everything runs with HF_HUB_OFFLINE=1 against it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import make_model, read_model, tiny_config

from evolve.model_refs import check_genome_models
from merge_engine.config import ModelReference
from merge_engine.errors import ConfigError
from search_spaces.definition import GenomeDefinition
from search_spaces.genome import read_num_layers

BIN = Path(sys.executable).parent
EVOLVE = str(BIN / "mergekit-evolve")
MERGEKIT_YAML = str(BIN / "mergekit-yaml")

COMMIT = {  # commit hashes of the hand-made cache: 40 hex digits, as the hub's
    "base_main": "1" * 40,
    "base_shallow": "2" * 40,
    "ft_a": "a" * 40,
    "ft_b": "b" * 40,
}


def _add_snapshot(cache: Path, repo_id: str, commit: str, src: Path, refs: tuple[str, ...] = ()) -> Path:
    """The hub cache's layout for one commit of `repo_id`: files in blobs/, linked from
    snapshots/<commit>/, and each name in `refs` (a branch or tag) pointing at the commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for f in sorted(src.iterdir()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        if not blob.exists():
            blob.write_bytes(data)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    for ref in refs:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)  # no newline, like huggingface_hub
    return snapshot


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """Local models and a hub cache holding the same models: org/tiny-base (main: 4 layers;
    branch `shallow`: a 2-layer model), org/tiny-ft-a and org/tiny-ft-b (fine-tunes of main)."""
    root = tmp_path_factory.mktemp("hub")
    cfg = tiny_config("llama", layers=4)
    base = make_model(root / "local" / "base", cfg, seed=0)
    ft_a = make_model(root / "local" / "ft_a", cfg, seed=1, base=base)
    ft_b = make_model(root / "local" / "ft_b", cfg, seed=2, base=base)
    shallow = make_model(root / "local" / "shallow", tiny_config("llama", layers=2), seed=3)
    home = root / "hf_home"
    cache = home / "hub"
    _add_snapshot(cache, "org/tiny-base", COMMIT["base_main"], base, refs=("main",))
    _add_snapshot(cache, "org/tiny-base", COMMIT["base_shallow"], shallow, refs=("shallow",))
    _add_snapshot(cache, "org/tiny-ft-a", COMMIT["ft_a"], ft_a, refs=("main",))
    _add_snapshot(cache, "org/tiny-ft-b", COMMIT["ft_b"], ft_b, refs=("main",))
    env = dict(
        os.environ, HF_HOME=str(home), HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    return {"root": root, "home": home, "cache": cache, "env": env,
            "local": {"base": base, "ft_a": ft_a, "ft_b": ft_b, "shallow": shallow}}


@pytest.fixture
def offline_cache(hub, monkeypatch):
    """This process reads the hand-made cache, offline (huggingface_hub reads its settings once,
    at import: its constants are set as well as the environment)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HOME", str(hub["home"]))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub["cache"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HOME", str(hub["home"]))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub["cache"]))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub


def ref(text: str) -> ModelReference:
    return ModelReference.parse(text)


def genome(models, base_model=None, method="task_arithmetic", **extra) -> GenomeDefinition:
    return GenomeDefinition(models=models, base_model=base_model, merge_method=method, **extra)


# -- the hand-made cache is a real one --------------------------------------------------------------


def test_hand_made_cache_resolves_offline_through_huggingface_hub(offline_cache):
    from huggingface_hub import hf_hub_download, snapshot_download

    cache = offline_cache["cache"]
    main = snapshot_download("org/tiny-base", local_files_only=True)
    assert Path(main) == cache / "models--org--tiny-base" / "snapshots" / COMMIT["base_main"]
    for revision in ("shallow", COMMIT["base_shallow"]):
        path = Path(snapshot_download("org/tiny-base", revision=revision, local_files_only=True))
        assert path.name == COMMIT["base_shallow"]
        assert (path / "model.safetensors").read_bytes() == (offline_cache["local"]["shallow"] / "model.safetensors").read_bytes()
    config = hf_hub_download("org/tiny-ft-a", "config.json")  # HF_HUB_OFFLINE: from the cache
    assert Path(config).read_bytes() == (offline_cache["local"]["ft_a"] / "config.json").read_bytes()
    from huggingface_hub.errors import LocalEntryNotFoundError

    with pytest.raises(LocalEntryNotFoundError):
        snapshot_download("org/not-cached", local_files_only=True)


# -- read_num_layers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, layers",
    [
        ("org/tiny-base", 4),
        ("org/tiny-base@main", 4),
        ("org/tiny-base@shallow", 2),  # a branch
        (f"org/tiny-base@{COMMIT['base_shallow']}", 2),  # a commit hash
        (f"org/tiny-base@{COMMIT['base_main']}", 4),
        ("org/tiny-ft-a", 4),
        ("org/tiny-base@shallow+/some/lora_adapter", 2),  # model+lora: the base model's count
    ],
)
def test_read_num_layers_of_hub_ids_honours_the_revision(offline_cache, text, layers):
    assert read_num_layers(ref(text)) == layers


def test_read_num_layers_local_paths_unchanged(offline_cache):
    assert read_num_layers(ref(str(offline_cache["local"]["shallow"]))) == 2
    with pytest.raises(ConfigError, match=r"^genome.models: model /no/such/dir: /no/such/dir/config.json not found$"):
        read_num_layers(ref("/no/such/dir"))


@pytest.mark.parametrize("text", ["org/not-cached", "org/tiny-base@no-such-branch", "org/not-cached+/x/lora"])
def test_read_num_layers_uncached_hub_id_is_one_line(offline_cache, text):
    with pytest.raises(ConfigError) as info:
        read_num_layers(ref(text))
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"genome.models: model {text}: ")
    assert "not in the local Hugging Face cache" in msg and "HF_HUB_OFFLINE" in msg


# -- check_genome_models ----------------------------------------------------------------------------


def test_check_genome_models_passes_for_cached_ids(offline_cache, tmp_path):
    g = genome(
        ["org/tiny-ft-a", f"org/tiny-ft-b@{COMMIT['ft_b']}", str(offline_cache["local"]["ft_a"])],
        base_model="org/tiny-base@main",
    )
    check_genome_models(g, str(tmp_path / "lora_cache"), None)


@pytest.mark.parametrize(
    "models, base, key, named",
    [
        (["org/tiny-ft-a", "org/not-cached"], "org/tiny-base", "genome.models[1]", "org/not-cached"),
        (["org/tiny-ft-a", "org/tiny-ft-b"], "org/not-cached", "genome.base_model", "org/not-cached"),
        (["org/tiny-ft-a", "org/tiny-ft-b@v9"], "org/tiny-base", "genome.models[1]", "org/tiny-ft-b (revision v9)"),
        (["org/tiny-ft-a", "org/tiny-ft-b"], "org/tiny-base+org/lora-not-cached", "genome.base_model", "org/lora-not-cached"),
    ],
)
def test_check_genome_models_uncached_id_offline_is_one_line(offline_cache, tmp_path, models, base, key, named):
    with pytest.raises(ConfigError) as info:
        check_genome_models(genome(models, base_model=base), str(tmp_path / "lora_cache"), None)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"{key}: ")
    assert f"{named} is not in the local Hugging Face cache" in msg
    assert "HF_HUB_OFFLINE is set" in msg


def test_check_genome_models_missing_local_folder(offline_cache, tmp_path):
    with pytest.raises(ConfigError) as info:
        check_genome_models(genome(["org/tiny-ft-a", str(tmp_path / "nope")], base_model="org/tiny-base"), str(tmp_path), None)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"genome.models[1]: model {tmp_path / 'nope'}: ")


def test_check_genome_models_lora_of_a_hub_base_is_merged_into_the_cache(offline_cache, tmp_path):
    """`org/name+adapter`: the hub base (from the cache) and a local adapter are merged once into
    the LoRA merge cache, which the workers then read."""
    from merge_engine.sources import lora_cache_entry_name

    adapter = _tiny_adapter(offline_cache["local"]["base"], tmp_path / "adapter")
    text = f"org/tiny-base+{adapter}"
    lora_cache = tmp_path / "lora_cache"
    check_genome_models(genome(["org/tiny-ft-a", text], base_model="org/tiny-base"), str(lora_cache), "float32")
    merged = lora_cache / lora_cache_entry_name(ref(text))
    assert (merged / "config.json").is_file() and (merged / "model.safetensors").is_file()
    assert read_num_layers(ref(text)) == 4
    # the merged folder is reused: the check passes even with the adapter gone
    shutil.rmtree(adapter)
    check_genome_models(genome(["org/tiny-ft-a", text], base_model="org/tiny-base"), str(lora_cache), "float32")


def _tiny_adapter(base: Path, out: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft.save_pretrained(out)
    return out


# -- mergekit-evolve --dry-run ------------------------------------------------------------------------


def _search_yaml(path: Path, models: list[str], base: str) -> Path:
    config = {
        "genome": {"models": models, "base_model": base, "merge_method": "task_arithmetic", "layer_granularity": 2},
        "tasks": ["some_task"],
        "budget": {"max_fevals": 20},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def _dry_run(hub, cfg: Path) -> subprocess.CompletedProcess:
    return subprocess.run([EVOLVE, str(cfg), "--dry-run"], capture_output=True, text=True, env=hub["env"], timeout=120)


def test_evolve_dry_run_with_hub_ids(hub, tmp_path):
    cfg = _search_yaml(tmp_path / "search.yml", ["org/tiny-ft-a", f"org/tiny-ft-b@{COMMIT['ft_b']}"], "org/tiny-base@main")
    proc = _dry_run(hub, cfg)
    assert proc.returncode == 0, proc.stderr
    assert "genome: 4 dimensions (2 layer group(s) x 2 model(s) x 1 parameter set(s) x 1 parameter(s)); method task_arithmetic" in proc.stdout


def test_evolve_dry_run_reads_the_revision(hub, tmp_path):
    """base_model at the 2-layer revision: the layer counts differ, which only that revision explains."""
    cfg = _search_yaml(tmp_path / "search.yml", ["org/tiny-ft-a", "org/tiny-ft-b"], "org/tiny-base@shallow")
    proc = _dry_run(hub, cfg)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "different layer counts" in lines[0] and "'org/tiny-base@shallow': 2" in lines[0], proc.stderr


def test_evolve_dry_run_uncached_hub_id_exits_2_with_one_line(hub, tmp_path):
    cfg = _search_yaml(tmp_path / "search.yml", ["org/tiny-ft-a", "org/not-cached"], "org/tiny-base")
    proc = _dry_run(hub, cfg)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "org/not-cached" in lines[0] and "not in the local Hugging Face cache" in lines[0] and "HF_HUB_OFFLINE" in lines[0]
    assert proc.stdout == ""


# -- mergekit-yaml on hub ids ----------------------------------------------------------------------------


def _recipe(path: Path, base: str, a: str, b: str) -> Path:
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": base,
        "models": [
            {"model": a, "parameters": {"weight": 0.7}},
            {"model": b, "parameters": {"weight": 0.4}},
        ],
        "dtype": "float32",
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.slow
def test_mergekit_yaml_on_hub_ids_equals_the_merge_of_local_paths(hub, tmp_path):
    local = hub["local"]
    outputs = {}
    for name, (base, a, b) in {
        "local": (str(local["base"]), str(local["ft_a"]), str(local["ft_b"])),
        "hub": ("org/tiny-base", f"org/tiny-ft-a@{COMMIT['ft_a']}", "org/tiny-ft-b@main"),
    }.items():
        cfg = _recipe(tmp_path / f"{name}.yml", base, a, b)
        out = tmp_path / f"out_{name}"
        proc = subprocess.run([MERGEKIT_YAML, str(cfg), str(out), "--quiet"], capture_output=True, text=True,
                              env=hub["env"], timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs[name] = read_model(out)
    assert outputs["hub"].keys() == outputs["local"].keys() and outputs["hub"]
    for name, tensor in outputs["local"].items():
        assert tensor.dtype == outputs["hub"][name].dtype
        assert tensor.equal(outputs["hub"][name]), name
    assert not outputs["hub"]["model.layers.0.self_attn.q_proj.weight"].equal(
        read_model(local["base"])["model.layers.0.self_attn.q_proj.weight"]
    )
