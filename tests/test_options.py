"""MergeOptions, declared once: the flags every command generates from it, parsing them back, the
search worker's copy, and --unsafe-truncate-embeddings on real checkpoints."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from helpers import make_model, read_model, tiny_config, tokenizer_vocab_size, write_yaml
from merge_engine.config import load_config
from merge_engine.errors import MergeError
from merge_engine.options import MergeOptions, option_flags, options_from_flags

REPO = Path(__file__).resolve().parents[1]


def commands():
    from evolve.cli import search_command
    from merge_engine.cli import main as yaml_main
    from merge_engine.extract_lora import main as extract_main
    from merge_engine.moe import main as moe_main
    from merge_engine.multi import main as multi_main

    # each command with the arguments it requires besides the merge flags
    return {
        "mergekit-yaml": (yaml_main, ["cfg.yml", "out"]),
        "mergekit-multi": (multi_main, ["cfg.yml", "--intermediate-dir", "tmp", "--out-path", "out"]),
        "mergekit-moe": (moe_main, ["cfg.yml", "out"]),
        "mergekit-extract-lora": (extract_main, ["--model", "ft", "--base-model", "base", "--out-path", "out"]),
        "mergekit-evolve": (search_command, ["search.yml"]),
    }


def parse(command: str, *flags: str) -> dict:
    main, required = commands()[command]
    ctx = main.make_context(command, [*required, *flags])
    return ctx.params


@pytest.mark.parametrize("command", ["mergekit-yaml", "mergekit-multi", "mergekit-moe", "mergekit-extract-lora", "mergekit-evolve"])
def test_every_option_has_its_flag_in_every_command(command):
    main, _ = commands()[command]
    params = {p.name: p for p in main.params}
    for name, flag in option_flags().items():
        assert name in params, f"{command} lacks the flag of MergeOptions.{name}"
        assert set(params[name].opts) | set(params[name].secondary_opts) == {
            o for d in flag.decls for o in d.split("/")
        }, (command, name)


# a non-default value for every field, as flags, and the MergeOptions they must give
NON_DEFAULT_FLAGS = [
    "--allow-crimes", "--transformers-cache", "/hf", "--lora-merge-cache", "/lc", "--lora-merge-dtype", "bf16",
    "--device", "cuda:1", "--cuda", "--low-cpu-memory", "--out-shard-size", "2M", "--no-copy-tokenizer",
    "--clone-tensors", "--trust-remote-code", "--random-seed", "7", "--lazy-unpickle", "--no-write-model-card",
    "--no-safe-serialization", "-vv", "--quiet", "--read-to-gpu", "--multi-gpu", "-j", "3", "--gpu-rich",
    "--async-write", "--write-threads", "4", "--overwrite", "--unsafe-truncate-embeddings",
]
EXPECTED = MergeOptions(
    allow_crimes=True, transformers_cache="/hf", lora_merge_cache="/lc", lora_merge_dtype="bfloat16", cuda=True,
    device="cuda:1", low_cpu_memory=True, out_shard_size=2_000_000, copy_tokenizer=False, clone_tensors=True,
    trust_remote_code=True, random_seed=7, lazy_unpickle=True, write_model_card=False, safe_serialization=False,
    verbose=2, quiet=True, read_to_gpu=True, multi_gpu=True, num_threads=3, gpu_rich=True, async_write=True,
    write_threads=4, overwrite=True, unsafe_truncate_embeddings=True,
)


@pytest.mark.parametrize("command", ["mergekit-yaml", "mergekit-multi", "mergekit-moe", "mergekit-extract-lora", "mergekit-evolve"])
def test_flags_parse_back_to_the_options(command):
    assert options_from_flags(parse(command, *NON_DEFAULT_FLAGS)) == EXPECTED
    defaults = options_from_flags(parse(command))
    # evolve merges and evaluates on the GPU when there is one
    assert defaults == MergeOptions(device="auto" if command == "mergekit-evolve" else "cpu")
    assert all(f.name in EXPECTED.__dict__ and getattr(EXPECTED, f.name) != getattr(MergeOptions(), f.name) for f in fields(MergeOptions))


def test_device_follows_cuda_and_gpu_rich_unless_given():
    assert options_from_flags(parse("mergekit-yaml", "--cuda")).device == "cuda"
    rich = options_from_flags(parse("mergekit-yaml", "--gpu-rich"))
    assert (rich.device, rich.cuda, rich.low_cpu_memory, rich.read_to_gpu, rich.multi_gpu) == ("cuda", True, True, True, True)
    assert options_from_flags(parse("mergekit-yaml", "--cuda", "--device", "cpu")).device == "cpu"
    assert options_from_flags(parse("mergekit-extract-lora", "--cuda")).device == "cuda"


def test_command_specific_help_and_defaults():
    main, _ = commands()["mergekit-evolve"]
    params = {p.name: p for p in main.params}
    assert params["device"].default == "auto" and "evaluation" in params["device"].help
    assert "no effect" in params["overwrite"].help
    extract, _ = commands()["mergekit-extract-lora"]
    params = {p.name: p for p in extract.params}
    assert "SVD" in params["device"].help and "no effect" in params["out_shard_size"].help
    yaml_params = {p.name: p for p in commands()["mergekit-yaml"][0].params}
    assert "UNSAFE" in yaml_params["unsafe_truncate_embeddings"].help


def test_search_worker_receives_the_merge_options(tmp_path):
    from evolve.options import EvolveOptions

    merge = options_from_flags(parse("mergekit-evolve", "--random-seed", "5", "--lazy-unpickle", "-j", "2",
                                     "--unsafe-truncate-embeddings", "--device", "cpu"))
    options = EvolveOptions(storage_path=tmp_path, merge=merge)
    worker = options.merge_options()
    assert isinstance(worker, MergeOptions)
    assert (worker.random_seed, worker.lazy_unpickle, worker.num_threads, worker.unsafe_truncate_embeddings) == (5, True, 2, True)
    # progress bars off in workers; model+lora inputs merged under the experiment by default
    assert worker.quiet and worker.lora_merge_cache == str(tmp_path / "lora_merge_cache")
    assert options.merge_options(overwrite=True).overwrite


@pytest.mark.parametrize("module", ["merge_engine.cli", "merge_engine.multi", "merge_engine.moe", "merge_engine.extract_lora", "evolve.cli"])
def test_help_does_not_import_torch(module):
    code = (
        f"import sys; from {module} import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert "--unsafe-truncate-embeddings" in proc.stdout


# ----------------------------------------------------------------------------------------------
# --unsafe-truncate-embeddings


@pytest.fixture(scope="module")
def vocab_models(tmp_path_factory):
    """Two unrelated tiny llamas whose vocabularies differ by 6 rows (untied LM heads)."""
    root = tmp_path_factory.mktemp("vocab")
    v = tokenizer_vocab_size()
    small = make_model(root / "small", tiny_config(vocab=v + 2, layers=2, tie_word_embeddings=False), seed=1)
    large = make_model(root / "large", tiny_config(vocab=v + 8, layers=2, tie_word_embeddings=False), seed=2)
    return {"small": small, "large": large, "rows": v + 2, "big": v + 8}


EMBEDS = ("model.embed_tokens.weight", "lm_head.weight")


def merge(tmp_path, text, **options):
    from merge_engine.streaming import run_merge

    cfg = write_yaml(tmp_path / "cfg.yml", text)
    config, source = load_config(cfg)
    out = tmp_path / "out"
    run_merge(config, out, MergeOptions(quiet=True, **options), config_text=source)
    return out


def linear_text(m, first, second):
    return f"merge_method: linear\nmodels:\n  - model: {m[first]}\n    parameters: {{weight: 0.25}}\n" \
           f"  - model: {m[second]}\n    parameters: {{weight: 0.75}}\ndtype: float32\n"


@pytest.mark.parametrize("first,second", [("large", "small"), ("small", "large")])
def test_different_vocabularies_are_an_error_naming_the_tensor_and_the_flag(vocab_models, tmp_path, first, second):
    with pytest.raises(MergeError, match=r"tensor model\.embed_tokens\.weight: .*--unsafe-truncate-embeddings"):
        merge(tmp_path, linear_text(vocab_models, first, second))
    assert not (tmp_path / "out").exists()


def test_unsafe_truncation_keeps_the_common_rows(vocab_models, tmp_path, caplog):
    m = vocab_models
    with caplog.at_level(logging.WARNING):
        out = merge(tmp_path, linear_text(m, "large", "small"), unsafe_truncate_embeddings=True)
    assert "UNSAFE vocabulary truncation" in caplog.text
    merged, large, small = read_model(out), read_model(m["large"]), read_model(m["small"])
    r = m["rows"]
    for name in EMBEDS:
        expected = 0.25 * large[name][:r].double() + 0.75 * small[name].double()
        assert merged[name].shape == (r, large[name].shape[1])
        torch.testing.assert_close(merged[name].double(), expected, rtol=1e-6, atol=1e-7)
    # as mergekit's flag: the donor's config is written unchanged
    assert json.loads((out / "config.json").read_text())["vocab_size"] == m["big"]


def test_a_base_smaller_than_the_fine_tune_needs_no_flag(vocab_models, tmp_path, caplog):
    # task vectors: an input larger than the base is cut to the base's rows (mergekit's rule)
    m = vocab_models
    text = f"merge_method: task_arithmetic\nbase_model: {m['small']}\nmodels:\n  - model: {m['large']}\n" \
           f"    parameters: {{weight: 0.5}}\ndtype: float32\n"
    for flag in (False, True):
        folder = tmp_path / str(flag)
        folder.mkdir()
        with caplog.at_level(logging.WARNING):
            out = merge(folder, text, unsafe_truncate_embeddings=flag)
        merged, large, small = read_model(out), read_model(m["large"]), read_model(m["small"])
        r = m["rows"]
        for name in EMBEDS:
            base = small[name].double()
            torch.testing.assert_close(merged[name].double(), base + 0.5 * (large[name][:r].double() - base), rtol=1e-6, atol=1e-7)
    assert "UNSAFE" not in caplog.text


def test_unsafe_truncation_of_a_larger_base_in_task_arithmetic(vocab_models, tmp_path):
    m = vocab_models
    text = f"merge_method: task_arithmetic\nbase_model: {m['large']}\nmodels:\n  - model: {m['small']}\n" \
           f"    parameters: {{weight: 0.5}}\ndtype: float32\n"
    with pytest.raises(MergeError, match="shape mismatch for tensor model.embed_tokens.weight.*unsafe-truncate-embeddings"):
        merge(tmp_path, text)
    out = merge(tmp_path, text, unsafe_truncate_embeddings=True)
    merged, large, small = read_model(out), read_model(m["large"]), read_model(m["small"])
    r = m["rows"]
    for name in EMBEDS:
        base = large[name][:r].double()
        torch.testing.assert_close(merged[name].double(), base + 0.5 * (small[name].double() - base), rtol=1e-6, atol=1e-7)
    # other tensors are untouched by the flag
    name = "model.layers.0.mlp.up_proj.weight"
    expected = large[name].double() + 0.5 * (small[name].double() - large[name].double())
    torch.testing.assert_close(merged[name].double(), expected, rtol=1e-6, atol=1e-7)


def test_resident_executor_truncates_as_the_streaming_one(vocab_models, tmp_path):
    from merge_engine.config import parse_config
    from merge_engine.resident import ResidentMerger

    m = vocab_models
    out = merge(tmp_path, linear_text(m, "large", "small"), unsafe_truncate_embeddings=True)
    config = parse_config(load_config(tmp_path / "cfg.yml")[0].to_plain(), "test")
    merger = ResidentMerger(config, MergeOptions(quiet=True, unsafe_truncate_embeddings=True))
    try:
        tensors = merger.merged_tensors(config)
    finally:
        merger.close()
    written = read_model(out)
    for name in EMBEDS:
        assert torch.equal(tensors[name], written[name])


def test_cli_error_is_one_line_and_exit_2(vocab_models, tmp_path):
    from merge_engine.cli import main

    cfg = write_yaml(tmp_path / "cfg.yml", linear_text(vocab_models, "large", "small"))
    result = CliRunner().invoke(main, [str(cfg), str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 2
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "model.embed_tokens.weight" in lines[0] and "--unsafe-truncate-embeddings" in lines[0]
    ok = CliRunner().invoke(main, [str(cfg), str(tmp_path / "out"), "--quiet", "--unsafe-truncate-embeddings"])
    assert ok.exit_code == 0, ok.output
