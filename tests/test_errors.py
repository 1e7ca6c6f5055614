"""Bad input through the real `mergekit-yaml` CLI.

Every user error must: exit with code 2, print exactly one line on stderr that names the file, key
or tensor at fault, and leave nothing at OUT (nor a complete-looking folder next to it).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import textwrap
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import make_model, read_model, tiny_config, write_yaml
from merge_engine.config import load_config
from merge_engine.options import MergeOptions
from merge_engine.streaming import run_merge

REPO = Path(__file__).resolve().parents[1]
_VENV_CLI = Path(sys.executable).parent / "mergekit-yaml"
MERGEKIT_YAML = str(_VENV_CLI if _VENV_CLI.exists() else REPO / ".venv" / "bin" / "mergekit-yaml")

# Every option of mergekit-yaml (docs/mergekit-reference.md §4); boolean options come as --x/--no-x pairs.
SPEC_OPTIONS = [
    "--allow-crimes", "--transformers-cache", "--lora-merge-cache", "--lora-merge-dtype", "--cuda",
    "--device", "--low-cpu-memory", "--out-shard-size", "--copy-tokenizer", "--clone-tensors",
    "--trust-remote-code", "--random-seed", "--lazy-unpickle", "--write-model-card",
    "--safe-serialization", "-v", "--quiet", "--read-to-gpu", "--multi-gpu", "--num-threads", "-j",
    "--gpu-rich", "--async-write", "--write-threads",
]
SPEC_BOOLEAN_PAIRS = [
    "allow-crimes", "cuda", "low-cpu-memory", "copy-tokenizer", "clone-tensors", "trust-remote-code",
    "lazy-unpickle", "write-model-card", "safe-serialization", "read-to-gpu", "multi-gpu", "async-write",
]


# ----------------------------------------------------------------------------------------------
# helpers


def run_cli(cfg: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [MERGEKIT_YAML, str(cfg), str(out), *flags],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cfg.parent,
    )


def leftovers(out: Path) -> list[str]:
    """Anything next to OUT that carries its name (a final or temporary output folder)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name == out.name or p.name.startswith(f".{out.name}."))


def assert_user_error(proc: subprocess.CompletedProcess, out: Path, *needles: str) -> str:
    assert proc.returncode == 2, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    lines = proc.stderr.strip("\n").splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{proc.stderr}"
    line = lines[0]
    for needle in needles:
        assert needle in line, f"{needle!r} not in error line: {line}"
    assert "Traceback" not in proc.stderr
    assert leftovers(out) == [], leftovers(out)
    return line


def fails(tmp_path: Path, text: str, *needles: str, flags: tuple[str, ...] = (), name: str = "cfg.yml") -> str:
    cfg = write_yaml(tmp_path / name, text)
    out = tmp_path / "out"
    return assert_user_error(run_cli(cfg, out, *flags), out, *needles)


def linear_yaml(*pairs) -> str:
    lines = ["merge_method: linear", "models:"]
    for path, weight in pairs:
        lines += [f"  - model: {path}", f"    parameters: {{weight: {weight}}}"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def odd_models(tmp_path_factory, llama_models):
    """Models that do not fit llama_models: other shapes, another architecture, a missing tensor."""
    root = tmp_path_factory.mktemp("odd")
    wide = make_model(root / "wide", tiny_config("llama", hidden=48), seed=7)
    fat_mlp = make_model(root / "fat_mlp", tiny_config("llama", intermediate_size=80), seed=8)
    mistral = make_model(root / "mistral", tiny_config("mistral"), seed=9)
    holey = root / "holey"
    shutil.copytree(llama_models["b"], holey)
    state = load_file(holey / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, holey / "model.safetensors", metadata={"format": "pt"})
    return {"wide": wide, "fat_mlp": fat_mlp, "mistral": mistral, "holey": holey}


# ----------------------------------------------------------------------------------------------
# recipe errors


def test_malformed_yaml(tmp_path):
    line = fails(tmp_path, "merge_method: linear\nmodels: [\n  - model: a\n", "cfg.yml", "malformed YAML")
    assert "line" in line


def test_yaml_that_is_not_a_mapping(tmp_path):
    fails(tmp_path, "- just\n- a list\n", "cfg.yml", "mapping")


def test_config_file_not_found(tmp_path):
    out = tmp_path / "out"
    proc = run_cli(tmp_path / "nope.yml", out)
    assert_user_error(proc, out, "nope.yml", "not found")


def test_unknown_merge_method(tmp_path, llama_models):
    fails(tmp_path, f"merge_method: frobnicate\nmodels:\n  - model: {llama_models['a']}\n",
          "cfg.yml", "merge_method", "frobnicate")


def test_missing_merge_method(tmp_path, llama_models):
    fails(tmp_path, f"models:\n  - model: {llama_models['a']}\n", "cfg.yml", "merge_method")


def test_both_models_and_slices(tmp_path, llama_models):
    a = llama_models["a"]
    text = f"""\
merge_method: passthrough
models:
  - model: {a}
slices:
  - sources:
      - model: {a}
        layer_range: [0, 2]
"""
    fails(tmp_path, text, "cfg.yml", "models", "slices")


def test_neither_models_nor_slices(tmp_path):
    fails(tmp_path, "merge_method: linear\nparameters:\n  weight: 1.0\n", "cfg.yml", "models", "slices")


def test_unknown_dtype(tmp_path, llama_models):
    fails(tmp_path, f"merge_method: passthrough\ndtype: float8\nmodels:\n  - model: {llama_models['a']}\n",
          "cfg.yml", "dtype", "float8")


def test_bad_layer_range_order(tmp_path, llama_models):
    text = f"""\
merge_method: passthrough
slices:
  - sources:
      - model: {llama_models['a']}
        layer_range: [3, 1]
"""
    fails(tmp_path, text, "cfg.yml", "slices[0].sources[0].layer_range")


@pytest.mark.slow
def test_missing_required_parameter_linear_weight(tmp_path, llama_models):
    a, b = llama_models["a"], llama_models["b"]
    text = f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n  - model: {b}\n"
    fails(tmp_path, text, "weight", str(b))


@pytest.mark.slow
def test_missing_required_parameter_slerp_t(tmp_path, llama_models):
    base, a = llama_models["base"], llama_models["a"]
    text = f"merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {base}\n  - model: {a}\n"
    fails(tmp_path, text, "'t'", "slerp")


@pytest.mark.slow
def test_task_arithmetic_without_base(tmp_path, llama_models):
    fails(tmp_path, linear_yaml((llama_models["a"], 1.0)).replace("linear", "task_arithmetic"), "base_model")


# ----------------------------------------------------------------------------------------------
# model errors


@pytest.mark.slow
def test_missing_model_directory(tmp_path, llama_models):
    missing = tmp_path / "no_such_model"
    fails(tmp_path, linear_yaml((llama_models["a"], 0.5), (missing, 0.5)), str(missing))


@pytest.mark.slow
def test_model_directory_without_checkpoint(tmp_path, llama_models):
    empty = tmp_path / "empty_model"
    empty.mkdir()
    shutil.copy(llama_models["a"] / "config.json", empty / "config.json")
    fails(tmp_path, linear_yaml((llama_models["a"], 0.5), (empty, 0.5)), str(empty))


@pytest.mark.slow
def test_tensor_missing_from_one_model(tmp_path, llama_models, odd_models):
    holey = odd_models["holey"]
    fails(tmp_path, linear_yaml((llama_models["a"], 0.5), (holey, 0.5)),
          "model.layers.1.mlp.up_proj.weight", str(holey))


@pytest.mark.slow
def test_tensor_missing_in_a_slice_that_uses_it(tmp_path, llama_models, odd_models):
    holey = odd_models["holey"]
    ok = f"""\
merge_method: passthrough
slices:
  - sources: [{{model: {holey}, layer_range: [2, 4]}}]
"""
    config, source = load_config(write_yaml(tmp_path / "ok.yml", ok))
    run_merge(config, tmp_path / "fine", MergeOptions(quiet=True), config_text=source)  # layer 1 unused: fine
    bad = ok.replace("[2, 4]", "[0, 2]")
    fails(tmp_path, bad, "model.layers.1.mlp.up_proj.weight", str(holey))


@pytest.mark.slow
def test_shape_mismatch_hidden_size(tmp_path, llama_models, odd_models):
    wide = odd_models["wide"]
    line = fails(tmp_path, linear_yaml((llama_models["a"], 0.5), (wide, 0.5)),
                 "shape mismatch", "model.layers.0.", str(wide), str(llama_models["a"]))
    assert "48" in line and "32" in line


@pytest.mark.slow
def test_shape_mismatch_intermediate_size(tmp_path, llama_models, odd_models):
    fat = odd_models["fat_mlp"]
    line = fails(tmp_path, linear_yaml((llama_models["a"], 0.5), (fat, 0.5)), "shape mismatch", "mlp", str(fat))
    assert "80" in line and "64" in line


@pytest.mark.slow
def test_layer_range_beyond_model(tmp_path, llama_models):
    a, b = llama_models["a"], llama_models["b"]
    text = f"""\
merge_method: linear
slices:
  - sources:
      - model: {a}
        layer_range: [0, 2]
        parameters: {{weight: 0.5}}
      - model: {b}
        layer_range: [2, 6]
        parameters: {{weight: 0.5}}
"""
    line = fails(tmp_path, text, "slices[0].sources[1].layer_range", str(b))
    assert "4" in line


@pytest.mark.slow
def test_slice_sources_of_different_lengths(tmp_path, llama_models):
    a, b = llama_models["a"], llama_models["b"]
    text = f"""\
merge_method: linear
parameters: {{weight: 0.5}}
slices:
  - sources:
      - {{model: {a}, layer_range: [0, 2]}}
      - {{model: {b}, layer_range: [0, 3]}}
"""
    fails(tmp_path, text, "slices[0]", "same number of layers")


@pytest.mark.slow
def test_different_architectures_need_allow_crimes(tmp_path, llama_models, odd_models):
    a, mistral = llama_models["a"], odd_models["mistral"]
    text = linear_yaml((a, 0.5), (mistral, 0.5))
    fails(tmp_path, text, "LlamaForCausalLM", "MistralForCausalLM", "--allow-crimes")

    # same tensor names and shapes: with --allow-crimes the merge goes through
    out = tmp_path / "crimes"
    proc = run_cli(tmp_path / "cfg.yml", out, "--allow-crimes", "--quiet")
    assert proc.returncode == 0, proc.stderr
    ta, tm, to = read_model(a), read_model(mistral), read_model(out)
    assert set(to) == set(ta)
    for k in ta:
        torch.testing.assert_close(to[k], (ta[k] + tm[k]) / 2)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


@pytest.mark.slow
def test_passthrough_with_two_inputs_fails_mid_merge(tmp_path, llama_models):
    # raised while tensors are being merged (after the temporary folder exists): it is removed
    a, b = llama_models["a"], llama_models["b"]
    fails(tmp_path, f"merge_method: passthrough\nmodels:\n  - model: {a}\n  - model: {b}\n", "passthrough",
          "model.embed_tokens.weight", flags=("--quiet",))


@pytest.mark.slow
def test_slerp_with_three_models_fails_mid_merge(tmp_path, llama_models):
    base, a, b = llama_models["base"], llama_models["a"], llama_models["b"]
    text = f"""\
merge_method: slerp
base_model: {base}
parameters: {{t: 0.5}}
models:
  - model: {base}
  - model: {a}
  - model: {b}
"""
    fails(tmp_path, text, "slerp", "model.embed_tokens.weight", flags=("--quiet",))


@pytest.mark.slow
def test_bin_only_model_without_lazy_unpickle(tmp_path, llama_models):
    d = tmp_path / "binmodel"
    d.mkdir()
    shutil.copy(llama_models["a"] / "config.json", d / "config.json")
    torch.save(read_model(llama_models["a"]), d / "pytorch_model.bin")
    fails(tmp_path, f"merge_method: passthrough\nmodels:\n  - model: {d}\n", str(d), "--lazy-unpickle")


# ----------------------------------------------------------------------------------------------
# the output folder


@pytest.mark.slow
def test_existing_output_needs_overwrite(tmp_path, llama_models):
    a, b = llama_models["a"], llama_models["b"]
    cfg = write_yaml(tmp_path / "cfg.yml", linear_yaml((a, 0.5), (b, 0.5)))
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")

    proc = run_cli(cfg, out)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert str(out.name) in lines[0] and "--overwrite" in lines[0]
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]
    assert (out / "precious.txt").read_text() == "keep me"
    assert leftovers(out) == ["out"]

    proc = run_cli(cfg, out, "--overwrite", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert not (out / "precious.txt").exists()
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert leftovers(out) == ["out"]


def test_output_path_is_a_file(tmp_path, llama_models):
    cfg = write_yaml(tmp_path / "cfg.yml", linear_yaml((llama_models["a"], 0.5), (llama_models["b"], 0.5)))
    out = tmp_path / "out"
    out.write_text("not a folder")
    proc = run_cli(cfg, out)
    assert proc.returncode == 2  # click's usage error (several lines), naming the path
    assert str(out) in proc.stderr
    assert out.read_text() == "not a folder"
    assert leftovers(out) == ["out"]


@pytest.fixture(scope="module")
def big_recipe(tmp_path_factory):
    """A recipe whose merge takes a noticeable moment: a 16-layer, 63 MB model read three times
    (through symlinks, so the inputs are distinct references), written to many shards."""
    root = tmp_path_factory.mktemp("big")
    big = make_model(root / "big", tiny_config("llama", layers=16, hidden=256, intermediate_size=1024), seed=0)
    refs = [big]
    for i in range(1, 3):
        link = root / f"big_link{i}"
        link.symlink_to(big, target_is_directory=True)
        refs.append(link)
    text = "dtype: float32\nout_dtype: bfloat16\n" + linear_yaml(*[(r, 1.0) for r in refs])
    return write_yaml(root / "big.yml", text)


def _start_and_wait_for_temp_folder(cfg: Path, out: Path, with_shard: bool = False) -> subprocess.Popen:
    """Start the big merge; return once `.OUT.incomplete-*` exists (and, with `with_shard`, holds
    a first shard file, i.e. tensors are being written)."""
    proc = subprocess.Popen(
        [MERGEKIT_YAML, str(cfg), str(out), "--quiet", "--out-shard-size", "100k"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    pattern = f".{out.name}.incomplete-*"
    deadline = time.monotonic() + 120

    def ready() -> bool:
        found = list(out.parent.glob(pattern))
        return bool(found) and (not with_shard or any(next(f.glob("*.safetensors"), None) for f in found))

    while not ready():
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"merge ended (exit {proc.returncode}) before its temporary folder was seen:\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the temporary output folder never appeared")
        time.sleep(0.0005)
    return proc


@pytest.mark.slow
def test_merge_killed_halfway_leaves_no_output(tmp_path, big_recipe, llama_models):
    out = tmp_path / "out"
    proc = _start_and_wait_for_temp_folder(big_recipe, out)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    # what remains is only the hidden temporary folder, which does not look like a model folder
    rest = leftovers(out)
    assert rest and all(name.startswith(f".{out.name}.incomplete-") for name in rest), rest
    for name in rest:
        assert not (out.parent / name / "config.json").exists()

    # a re-run into the same OUT works despite the stale temporary folder
    small = write_yaml(tmp_path / "small.yml", linear_yaml((llama_models["a"], 0.5), (llama_models["b"], 0.5)))
    config, source = load_config(small)
    run_merge(config, out, MergeOptions(quiet=True), config_text=source)
    assert (out / "model.safetensors").is_file()


@pytest.mark.slow
def test_merge_interrupted_cleans_up(tmp_path, big_recipe):
    out = tmp_path / "out"
    proc = _start_and_wait_for_temp_folder(big_recipe, out, with_shard=True)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert len(err.strip().splitlines()) == 1, err
    assert "interrupted" in err
    assert leftovers(out) == []


@pytest.mark.slow
def test_merge_interrupted_at_once_cleans_up(tmp_path, big_recipe):
    out = tmp_path / "out"
    proc = _start_and_wait_for_temp_folder(big_recipe, out)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert not out.exists()
    assert leftovers(out) == []


# ----------------------------------------------------------------------------------------------
# --help and option parsing


def test_help_lists_every_spec_option():
    proc = subprocess.run([MERGEKIT_YAML, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    import re

    flags = set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", text))
    missing = [opt for opt in SPEC_OPTIONS if opt not in flags]
    assert not missing, f"--help does not list {missing}:\n{text}"
    missing_pairs = [f"--no-{name}" for name in SPEC_BOOLEAN_PAIRS if f"--no-{name}" not in flags]
    assert not missing_pairs, missing_pairs
    assert "CONFIG_FILE" in text and "OUT_PATH" in text


def test_bad_out_shard_size(tmp_path, llama_models):
    cfg = write_yaml(tmp_path / "cfg.yml", linear_yaml((llama_models["a"], 0.5), (llama_models["b"], 0.5)))
    out = tmp_path / "out"
    proc = run_cli(cfg, out, "--out-shard-size", "lots")
    assert proc.returncode == 2
    assert "out-shard-size" in proc.stderr and "lots" in proc.stderr
    assert leftovers(out) == []


@pytest.mark.slow
def test_unsupported_device(tmp_path, llama_models):
    fails(tmp_path, linear_yaml((llama_models["a"], 0.5), (llama_models["b"], 0.5)), "--device", "bogus",
          flags=("--device", "bogus"))


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda(tmp_path, llama_models):
    fails(tmp_path, linear_yaml((llama_models["a"], 0.5), (llama_models["b"], 0.5)), "--device cuda", "CUDA",
          flags=("--cuda",))


def test_bad_num_threads(tmp_path, llama_models):
    cfg = write_yaml(tmp_path / "cfg.yml", linear_yaml((llama_models["a"], 0.5), (llama_models["b"], 0.5)))
    out = tmp_path / "out"
    proc = run_cli(cfg, out, "--num-threads", "-1")
    assert proc.returncode == 2  # click's usage error
    assert "num-threads" in proc.stderr and "Traceback" not in proc.stderr
    assert leftovers(out) == []


def test_config_error_does_not_import_torch(tmp_path):
    """Recipe errors are reported before any heavy import (no timing assert: torch is not loaded)."""
    cfg = write_yaml(tmp_path / "cfg.yml", "merge_method: frobnicate\nmodels:\n  - model: x\n")
    code = (
        "import sys\n"
        "from merge_engine.cli import main\n"
        f"try:\n    main([{str(cfg)!r}, {str(tmp_path / 'out')!r}])\n"
        "except SystemExit as e:\n    assert e.code == 2, e.code\n"
        "print('torch' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False", "a config error imported torch"


def test_an_uncommitted_output_folder_is_removed_by_the_interrupt_handler(tmp_path):
    """An interrupt between a temporary folder's creation and its owner's `try` still leaves nothing:
    the CLI's handler removes every folder that was neither committed nor discarded."""
    from merge_engine.io import AtomicOutputDir, discard_incomplete

    kept = AtomicOutputDir(tmp_path / "kept")
    (kept.path / "x").write_text("done")
    kept.commit()
    orphan = AtomicOutputDir(tmp_path / "out")
    (orphan.path / "shard").write_bytes(b"\0" * 10)
    discard_incomplete()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]
    assert (tmp_path / "kept" / "x").read_text() == "done"


def test_signals_are_held_while_an_output_folder_is_recorded_whatever_thread_gets_them():
    """`_signals_deferred` holds SIGINT even when the kernel delivers it to another thread (a
    signal blocked in the main thread alone still reached Python through the others), and lets it
    act once the block ends."""
    code = textwrap.dedent("""
        import os, signal, threading, time
        from merge_engine.io import _signals_deferred
        stop = threading.Event()
        threading.Thread(target=lambda: stop.wait(), daemon=True).start()  # a thread that can receive it
        steps = []
        try:
            with _signals_deferred():
                os.kill(os.getpid(), signal.SIGINT)
                for _ in range(200000):  # bytecodes: Python would raise here if the signal were not held
                    pass
                time.sleep(0.2)
                steps.append("block finished")
            steps.append("after the block")
        except KeyboardInterrupt:
            steps.append("interrupted")
        print(steps, signal.getsignal(signal.SIGINT) is signal.default_int_handler)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "['block finished', 'interrupted'] True", proc.stdout + proc.stderr
