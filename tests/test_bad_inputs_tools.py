"""Bad input and faults through the real console scripts of `mergekit-moe`, `mergekit-extract-lora`,
`mergekit-tokensurgeon` and `mergekit-multi` (docs/bad-inputs.md lists these cases beside those of
the tools' own test files).

Every case must: exit with code 2, print exactly one line (`error: ...`) that names the file, key,
tensor or option at fault, print no traceback, leave nothing at the output path (nor a temporary
folder next to it), and leave a folder of the user's that was already there untouched.

The cases of one tool run concurrently in a module fixture (each in its own folder; see `Results`),
so the file costs about as much CPU time as its processes; each test then checks one case's result.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import make_model, read_model, tiny_config, write_yaml

BIN = Path(sys.executable).parent
if not (BIN / "mergekit-moe").exists():
    BIN = Path(__file__).resolve().parents[1] / ".venv" / "bin"

USER_FILE = "precious.txt"
USER_TEXT = "the user's own work"


# ----------------------------------------------------------------------------------------------
# Inputs that do not fit


class _Hostile:
    """Unpickling this runs `touch MARKER`: a checkpoint that executes code when loaded with pickle."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, dst / f.name)


@pytest.fixture(scope="module")
def bad(tmp_path_factory, llama_models):
    """Models beside the llama fixture's: other shapes, a pickle-only one, a hostile pickle, a
    truncated file, a base with a tensor no MoE has a place for, a donor sharing no token."""
    root = tmp_path_factory.mktemp("bad_inputs")
    a = llama_models["a"]
    out = {**llama_models, "root": root}
    out["wide"] = make_model(root / "wide", tiny_config("llama", hidden=48), seed=3)
    out["short"] = make_model(root / "short", tiny_config("llama", layers=2), seed=4)

    binonly = root / "binonly"
    binonly.mkdir()
    shutil.copy(a / "config.json", binonly / "config.json")
    _copy_tokenizer(a, binonly)
    torch.save(read_model(a), binonly / "pytorch_model.bin")
    out["binonly"] = binonly

    hostile = root / "hostile"
    hostile.mkdir()
    shutil.copy(a / "config.json", hostile / "config.json")
    _copy_tokenizer(a, hostile)
    out["marker"] = root / "PWNED"
    state = dict(read_model(a))
    state["model.norm.weight"] = _Hostile(out["marker"])
    torch.save(state, hostile / "pytorch_model.bin")
    out["hostile"] = hostile

    trunc = root / "trunc"
    shutil.copytree(a, trunc)
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    out["trunc"] = trunc

    extra = root / "extra_base"
    shutil.copytree(llama_models["base"], extra)
    state = load_file(extra / "model.safetensors")
    state["model.vision_adapter.weight"] = torch.zeros(4, 32)
    save_file(state, extra / "model.safetensors", metadata={"format": "pt"})
    out["extra_base"] = extra

    # a donor whose word-level vocabulary shares no token with the model's byte-level BPE
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"\u4e00" + chr(0x4E00 + i): i for i in range(40)}
    vocab["[UNK]"] = len(vocab)
    alien = make_model(root / "alien", tiny_config("llama", vocab=len(vocab)), seed=5)
    for f in list(alien.iterdir()):
        if f.name.startswith(("tokenizer", "special_tokens")):
            f.unlink()
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(alien / "tokenizer.json"))
    (alien / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "[UNK]"}))
    out["alien"] = alien
    return out


# ----------------------------------------------------------------------------------------------
# Running the cases


@dataclass
class Case:
    argv: Callable[[dict, Path], list[str]]  # (models, case folder) -> command line after the script
    needles: tuple[str, ...]  # each must appear in the one error line ("{name}" formatted with the models)
    setup: Optional[Callable[[dict, Path], None]] = None  # prepares the case folder
    out: str = "out"  # the output folder, relative to the case folder
    user_folder: bool = False  # `out` already holds the user's work, which must survive
    checks: list[Callable[[dict, Path], None]] = field(default_factory=list)


@dataclass
class Result:
    proc: subprocess.CompletedProcess
    folder: Path
    case: Case


class Results:
    """One tool's cases, by name. In a plain run every case starts at once (three processes at a
    time) when the first is asked for; under pytest-xdist, whose workers each get some of the
    tests, each case runs when its test asks for it, so no case runs twice."""

    def __init__(self, tool: str, cases: dict[str, Case], models: dict, root: Path):
        self.tool, self.cases, self.models, self.root = tool, cases, models, root
        self.done: dict[str, Result] = {}
        if not os.environ.get("PYTEST_XDIST_WORKER"):
            with ThreadPoolExecutor(max_workers=3) as pool:
                self.done = dict(zip(cases, pool.map(self._run, cases)))

    def __getitem__(self, name: str) -> Result:
        if name not in self.done:
            self.done[name] = self._run(name)
        return self.done[name]

    def _run(self, name: str) -> Result:
        case, models = self.cases[name], self.models
        folder = self.root / name
        folder.mkdir()
        if case.user_folder:
            (folder / case.out).mkdir()
            (folder / case.out / USER_FILE).write_text(USER_TEXT)
        if case.setup is not None:
            case.setup(models, folder)
        proc = subprocess.run(
            [str(BIN / self.tool), *map(str, case.argv(models, folder))],
            capture_output=True, text=True, timeout=300, cwd=folder,
        )
        return Result(proc, folder, case)


def check(result: Result, models: dict) -> str:
    proc, folder, case = result.proc, result.folder, result.case
    report = f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 2, report
    assert "Traceback" not in proc.stderr + proc.stdout, report
    assert proc.stdout == "", report
    lines = proc.stderr.strip("\n").splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), report
    for needle in case.needles:
        needle = needle.format(**{k: v for k, v in models.items() if isinstance(v, Path)})
        assert needle in lines[0], f"{needle!r} not in: {lines[0]}"
    out = folder / case.out
    left = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert left == [], left  # no temporary (or backup) folder next to the output
    if case.user_folder:
        assert sorted(p.name for p in out.iterdir()) == [USER_FILE]
        assert (out / USER_FILE).read_text() == USER_TEXT
    else:
        assert not out.exists()
    assert not models["marker"].exists(), "a pickle ran code"
    for extra in case.checks:
        extra(models, folder)
    return lines[0]


def yml(name: str, text: str) -> Callable[[dict, Path], None]:
    """A setup that writes `text` (formatted with the models' paths) to the case folder's `name`."""

    def setup(models: dict, folder: Path) -> None:
        write_yaml(folder / name, text.format(**{k: v for k, v in models.items() if isinstance(v, Path)}))

    return setup


# ----------------------------------------------------------------------------------------------
# mergekit-moe


def moe_recipe(first: str = "{a}", base: str = "{base}", extra: str = "gate_mode: cheap_embed\n") -> str:
    return (
        f"base_model: {base}\n{extra}experts:\n  - source_model: {first}\n    positive_prompts: [fox]\n"
        "  - source_model: {b}\n    positive_prompts: [math]\n"
    )


def moe(text: str, *flags: str, **kw) -> Case:
    return Case(lambda m, f: [f / "moe.yml", f / "out", "--quiet", *flags], setup=yml("moe.yml", text), **kw)


MOE = {
    "config_not_found": Case(lambda m, f: [f / "nope.yml", f / "out"], ("nope.yml", "not found")),
    "malformed_yaml": moe("base_model: {base}\nexperts: [\n", needles=("moe.yml", "malformed YAML", "line")),
    "unknown_gate_mode": moe(moe_recipe(extra="gate_mode: frobnicate\n"), needles=("moe.yml", "gate_mode", "cheap_embed")),
    "experts_per_token_not_int": moe(
        moe_recipe(extra="gate_mode: cheap_embed\nexperts_per_token: two\n"), needles=("moe.yml", "experts_per_token", "integer")
    ),
    "expert_without_source_model": moe(
        "base_model: {base}\ngate_mode: cheap_embed\nexperts:\n  - positive_prompts: [fox]\n  - source_model: {b}\n"
        "    positive_prompts: [math]\n",
        needles=("moe.yml", "experts[0].source_model"),
    ),
    "positive_prompts_not_a_list": moe(
        moe_recipe().replace("[fox]", "fox"), needles=("moe.yml", "experts[0].positive_prompts", "list")
    ),
    "same_prompts_for_every_expert": moe(moe_recipe().replace("[math]", "[fox]"), needles=("moe.yml", "experts", "same prompts")),
    "unknown_architecture": moe(moe_recipe(extra="gate_mode: cheap_embed\narchitecture: gpt5\n"), needles=("moe.yml", "architecture", "gpt5")),
    "integer_dtype": moe(moe_recipe(extra="gate_mode: cheap_embed\ndtype: int64\n"), needles=("{base}", "int64", "floating-point")),
    "missing_expert_model": moe(moe_recipe(first="{root}/nowhere"), needles=("{root}/nowhere", "not found")),
    "expert_of_fewer_layers": moe(moe_recipe(first="{short}"), needles=("{short}", "num_hidden_layers 2", "{base}")),
    "bin_only_expert_without_lazy_unpickle": moe(moe_recipe(first="{binonly}"), needles=("{binonly}", "--lazy-unpickle")),
    "hostile_pickle_with_lazy_unpickle": moe(
        moe_recipe(first="{hostile}"), "--lazy-unpickle", needles=("{hostile}/pytorch_model.bin", "refusing to unpickle", "system")
    ),
    "truncated_safetensors": moe(moe_recipe(first="{trunc}"), needles=("{trunc}/model.safetensors", "truncated")),
    # raised after every tensor was written, inside the temporary folder: nothing is left
    "base_tensor_without_a_place": moe(
        moe_recipe(base="{extra_base}"), needles=("{extra_base}", "model.vision_adapter.weight", "MixtralForCausalLM")
    ),
    "quantised_loading": moe(moe_recipe(), "--load-in-4bit", needles=("--load-in-4bit",)),
    "output_exists_not_empty": moe(moe_recipe(), needles=("out", "already exists", "--overwrite"), user_folder=True),
    # --overwrite, but the build fails: the user's folder is kept as it was
    "overwrite_then_failure_keeps_old_output": moe(
        moe_recipe(first="{trunc}"), "--overwrite", needles=("{trunc}", "truncated"), user_folder=True
    ),
}


@pytest.fixture(scope="module")
def moe_results(bad, tmp_path_factory):
    return Results("mergekit-moe", MOE, bad, tmp_path_factory.mktemp("moe_cases"))


@pytest.mark.slow
@pytest.mark.parametrize("case", list(MOE))
def test_moe(case, moe_results, bad):
    check(moe_results[case], bad)


# ----------------------------------------------------------------------------------------------
# mergekit-extract-lora


def lora(model: str = "{a}", base: str = "{base}", *flags: str, **kw) -> Case:
    def argv(m: dict, f: Path) -> list[str]:
        paths = {k: v for k, v in m.items() if isinstance(v, Path)}
        return ["--model", model.format(**paths), "--base-model", base.format(**paths), "--out-path", f / "out", "--quiet", *flags]

    return Case(argv, **kw)


EXTRACT = {
    "missing_model": lora("{root}/nowhere", needles=("{root}/nowhere", "not found")),
    "base_of_fewer_layers": lora(base="{short}", needles=("{short}", "model.layers.2.", "missing")),
    "bin_only_base_without_lazy_unpickle": lora(base="{binonly}", needles=("{binonly}", "--lazy-unpickle")),
    "hostile_pickle_with_lazy_unpickle": lora(
        "{hostile}", "{base}", "--lazy-unpickle", needles=("{hostile}/pytorch_model.bin", "refusing to unpickle", "system")
    ),
    "truncated_safetensors": lora("{trunc}", needles=("{trunc}/model.safetensors", "truncated")),
    "invalid_include_regex": lora("{a}", "{base}", "-i", "[", needles=("--include-regex", "'['", "regular expression")),
    "invalid_exclude_regex": lora("{a}", "{base}", "-e", "(a", needles=("--exclude-regex", "'(a'", "regular expression")),
    # raised once the temporary folder holds the scratch file: it is removed
    "nothing_selected": lora("{a}", "{base}", "-i", "no_such_module", needles=("nothing to extract", "--include-regex")),
    "lora_input_without_cache": lora("{a}+{root}/adapter", needles=("{a}+{root}/adapter", "--lora-merge-cache")),
    "output_exists_not_empty": lora(needles=("out", "already exists", "--overwrite"), user_folder=True),
    "overwrite_then_failure_keeps_old_output": lora(
        "{a}", "{wide}", "--overwrite", needles=("model.layers.0.", "{wide}", "shape"), user_folder=True
    ),
}


@pytest.fixture(scope="module")
def extract_results(bad, tmp_path_factory):
    return Results("mergekit-extract-lora", EXTRACT, bad, tmp_path_factory.mktemp("extract_cases"))


@pytest.mark.slow
@pytest.mark.parametrize("case", list(EXTRACT))
def test_extract_lora(case, extract_results, bad):
    check(extract_results[case], bad)


# ----------------------------------------------------------------------------------------------
# mergekit-tokensurgeon


def surgeon(model: str = "{a}", donor: str = "{b}", *flags: str, **kw) -> Case:
    def argv(m: dict, f: Path) -> list[str]:
        paths = {k: v for k, v in m.items() if isinstance(v, Path)}
        return [model.format(**paths), donor.format(**paths), f / "out", "--quiet", *flags]

    return Case(argv, **kw)


SURGEON = {
    "missing_donor": surgeon(donor="{root}/nowhere", needles=("donor {root}/nowhere", "not found")),
    "donor_sharing_no_token": surgeon(donor="{alien}", needles=("{alien}", "{a}", "fewer than 2 shared tokens")),
    "k_zero": surgeon("{a}", "{b}", "-k", "0", needles=("--k 0", "at least 1")),
    "bin_only_model_without_lazy_unpickle": surgeon("{binonly}", needles=("{binonly}", "--lazy-unpickle")),
    "hostile_pickle_with_lazy_unpickle": surgeon(
        "{hostile}", "{b}", "--lazy-unpickle", needles=("{hostile}/pytorch_model.bin", "refusing to unpickle", "system")
    ),
    "truncated_model": surgeon("{trunc}", needles=("{trunc}/model.safetensors", "truncated")),
    "truncated_donor": surgeon(donor="{trunc}", needles=("{trunc}/model.safetensors", "truncated", "donor's embeddings")),
    "output_exists_not_empty": surgeon(needles=("out", "already exists", "--overwrite"), user_folder=True),
    "overwrite_then_failure_keeps_old_output": surgeon(
        "{a}", "{alien}", "--overwrite", needles=("{alien}", "shared tokens"), user_folder=True
    ),
}


@pytest.fixture(scope="module")
def surgeon_results(bad, tmp_path_factory):
    return Results("mergekit-tokensurgeon", SURGEON, bad, tmp_path_factory.mktemp("surgeon_cases"))


@pytest.mark.slow
@pytest.mark.parametrize("case", list(SURGEON))
def test_tokensurgeon(case, surgeon_results, bad):
    check(surgeon_results[case], bad)


# ----------------------------------------------------------------------------------------------
# mergekit-multi


def linear(first: str, second: str, name: Optional[str] = None) -> str:
    head = f"name: {name}\n" if name else ""
    return (
        f"{head}merge_method: linear\nmodels:\n  - model: {first}\n    parameters: {{{{weight: 0.5}}}}\n"
        f"  - model: {second}\n    parameters: {{{{weight: 0.5}}}}\ndtype: float32\n"
    )


def multi(text: str, *flags: str, **kw) -> Case:
    return Case(
        lambda m, f: [f / "multi.yml", "--intermediate-dir", f / "inter", "--out-path", f / "out", "--quiet", *flags],
        setup=yml("multi.yml", text), **kw,
    )


def no_intermediate(models: dict, folder: Path) -> None:
    inter = folder / "inter"
    assert not inter.exists() or list(inter.iterdir()) == []


def intermediate_kept(models: dict, folder: Path) -> None:
    """The intermediate merged before the failure is complete and kept (a rerun reuses it)."""
    mid = folder / "inter" / "mid"
    assert sorted(p.name for p in (folder / "inter").iterdir()) == ["mid"]
    tensors, ta, tb = read_model(mid), read_model(models["a"]), read_model(models["b"])
    assert set(tensors) == set(ta)
    name = "model.layers.1.mlp.up_proj.weight"
    torch.testing.assert_close(tensors[name], (ta[name] + tb[name]) / 2)


TWO_STEPS = linear("{a}", "{b}", name="mid") + "---\n" + linear("mid", "{base}")

MULTI = {
    "empty_file": multi("", needles=("multi.yml", "no merge recipes"), checks=[no_intermediate]),
    "malformed_yaml": multi("merge_method: linear\nmodels: [\n", needles=("multi.yml", "malformed YAML"), checks=[no_intermediate]),
    "recipe_not_a_mapping": multi(
        linear("{a}", "{b}", name="mid") + "---\n- a\n- b\n", needles=("multi.yml", "recipe #2", "mapping"), checks=[no_intermediate]
    ),
    "missing_model_folder": multi(
        linear("{a}", "{b}", name="mid") + "---\n" + linear("mid", "{root}/nowhere"),
        needles=("final recipe (#2)", "{root}/nowhere"), checks=[no_intermediate],
    ),
    "bin_only_input_without_lazy_unpickle": multi(
        linear("{a}", "{binonly}", name="mid") + "---\n" + linear("mid", "{base}"),
        needles=("recipe 'mid' (#1)", "{binonly}", "--lazy-unpickle"), checks=[no_intermediate],
    ),
    "hostile_pickle_with_lazy_unpickle": multi(
        linear("{a}", "{hostile}", name="mid") + "---\n" + linear("mid", "{base}"), "--lazy-unpickle",
        needles=("recipe 'mid' (#1)", "{hostile}/pytorch_model.bin", "refusing to unpickle"), checks=[no_intermediate],
    ),
    "truncated_input": multi(
        linear("{a}", "{trunc}", name="mid") + "---\n" + linear("mid", "{base}"),
        needles=("recipe 'mid' (#1)", "{trunc}/model.safetensors", "truncated"), checks=[no_intermediate],
    ),
    # the intermediate is merged, then the final recipe fails: the intermediate stays, complete
    "final_fails_after_an_intermediate": multi(
        linear("{a}", "{b}", name="mid") + "---\n" + linear("mid", "{wide}"),
        needles=("final recipe (#2)", "shape mismatch", "{wide}"), checks=[intermediate_kept],
    ),
    # refused before any merge (not after the intermediates)
    "output_exists_not_empty": multi(
        TWO_STEPS, needles=("multi.yml", "out", "already exists", "--overwrite"), user_folder=True, checks=[no_intermediate]
    ),
    "overwrite_then_failure_keeps_old_output": multi(
        linear("{a}", "{b}", name="mid") + "---\n" + linear("mid", "{wide}"), "--overwrite",
        needles=("final recipe (#2)", "shape mismatch"), user_folder=True, checks=[intermediate_kept],
    ),
}


@pytest.fixture(scope="module")
def multi_results(bad, tmp_path_factory):
    return Results("mergekit-multi", MULTI, bad, tmp_path_factory.mktemp("multi_cases"))


@pytest.mark.slow
@pytest.mark.parametrize("case", list(MULTI))
def test_multi(case, multi_results, bad):
    check(multi_results[case], bad)
