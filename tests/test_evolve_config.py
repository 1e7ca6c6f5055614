"""search.yml (evolve.config): mergekit-evolve's keys unchanged plus evomerge's additions, defaults,
errors with key paths, unknown-key warnings; and the `mergekit-evolve` CLI's answers before any
search starts: exit 2 with one stderr line (and no study.db) for bad configs, and `--dry-run`'s
genome size, population and generation count.

Nothing here starts Ray or loads weights: genomes only read config.json.
"""

from __future__ import annotations

import json
import logging
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from evolve.config import SearchConfig, load_search_config, parse_search_config
from merge_engine.config import ModelReference
from merge_engine.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
_VENV_CLI = Path(sys.executable).parent / "mergekit-evolve"
MERGEKIT_EVOLVE = str(_VENV_CLI if _VENV_CLI.exists() else REPO / ".venv" / "bin" / "mergekit-evolve")

GENOME = {"models": ["/m/a", "/m/b"], "merge_method": "linear"}


def parse(data) -> SearchConfig:
    return parse_search_config(data, "search.yml")


def error(data) -> str:
    with pytest.raises(ConfigError) as info:
        parse(data)
    return str(info.value)


def with_genome(**changes) -> dict:
    genome = dict(GENOME)
    genome.update(changes)
    return {"genome": genome, "tasks": ["t"]}


# ----------------------------------------------------------------------------------------------
# accepted keys and defaults


FULL = """
genome:
  models:
    - /m/ft_a
    - /m/ft_b+/m/lora_b
  merge_method: dare_ties
  base_model: /m/base
  tokenizer_source: base
  layer_granularity: 8
  normalize: false
  allow_negative_weights: true
  smooth: true
  filters: [self_attn, mlp]
  dtype: float32
tasks:
  - toy_a
  - name: toy_b
    weight: 0.5
    metric: acc_norm,none
  - name: toy_ppl
    weight: 2
    metric: word_perplexity,none
    direction: minimize
limit: 50
num_fewshot: 3
shuffle: true
random_init: true
apply_chat_template: false
fewshot_as_multiturn: false
optimizer:
  name: cma
  popsize: 12
  sigma0: 0.25
  seed: 7
budget:
  max_fevals: 300
  timeout: 3600
seed: 11
"""


def test_every_key_is_accepted(caplog):
    with caplog.at_level(logging.WARNING):
        c = parse(yaml.safe_load(FULL))
    assert not caplog.records  # nothing unknown
    g = c.genome
    assert g.models == [ModelReference.parse("/m/ft_a"), ModelReference.parse("/m/ft_b+/m/lora_b")]
    assert str(g.models[1].lora) == "/m/lora_b"
    assert (g.merge_method, str(g.base_model), g.tokenizer_source) == ("dare_ties", "/m/base", "base")
    assert (g.layer_granularity, g.normalize, g.allow_negative_weights, g.smooth) == (8, False, True, True)
    assert g.filters == ["self_attn", "mlp"] and g.dtype == "float32"
    assert [(t.name, t.weight, t.metric, t.direction) for t in c.tasks] == [
        ("toy_a", 1.0, "acc,none", None),
        ("toy_b", 0.5, "acc_norm,none", None),
        ("toy_ppl", 2.0, "word_perplexity,none", "minimize"),
    ]
    assert (c.limit, c.num_fewshot, c.shuffle, c.random_init) == (50, 3, True, True)
    assert (c.apply_chat_template, c.fewshot_as_multiturn) == (False, False)
    o = c.optimizer
    assert (o.name, o.popsize, o.sigma0, o.seed) == ("cma", 12, 0.25, 7)
    assert (c.budget.max_fevals, c.budget.timeout) == (300, 3600.0)
    assert c.seed == 11


def test_defaults():
    c = parse({"genome": {"models": ["/m/a"], "merge_method": "linear"}, "tasks": ["t"]})
    g = c.genome
    assert g.base_model is None and g.tokenizer_source is None
    assert (g.layer_granularity, g.normalize, g.allow_negative_weights, g.smooth, g.filters) == (0, None, False, False, None)
    assert g.dtype == "bfloat16"  # mergekit-evolve's fixed merge dtype
    assert [(t.name, t.weight, t.metric, t.direction) for t in c.tasks] == [("t", 1.0, "acc,none", None)]
    assert (c.limit, c.num_fewshot, c.shuffle, c.random_init) == (None, None, False, False)
    assert (c.apply_chat_template, c.fewshot_as_multiturn) == (True, True)  # mergekit-evolve's defaults
    # no optimizer named: chosen when the search starts, from the budget per gene
    assert (c.optimizer.name, c.optimizer.popsize, c.optimizer.sigma0, c.optimizer.seed) == (None, None, None, 0)
    assert (c.budget.max_fevals, c.budget.timeout) == (100, None)
    assert c.seed == 0


@pytest.mark.parametrize(
    "method,expected",
    [("linear", True), ("ties", True), ("dare_ties", True), ("task_arithmetic", False), ("slerp", False),
     ("dare_linear", False)],
)
def test_normalize_auto_rule(method, expected):
    base = {"base_model": "/m/base"} if method != "linear" else {}
    assert parse(with_genome(merge_method=method, **base)).genome.effective_normalize is expected
    assert parse(with_genome(merge_method=method, normalize=not expected, **base)).genome.effective_normalize is (not expected)


@pytest.mark.parametrize("name", ["cma", "optuna-cmaes", "tpe", "random"])
def test_optimizer_as_a_string_or_a_mapping(name):
    c = parse({**with_genome(), "optimizer": name})
    assert (c.optimizer.name, c.optimizer.popsize, c.optimizer.seed) == (name, None, 0)
    c = parse({**with_genome(), "optimizer": {"name": name, "popsize": 6, "seed": 3}})
    assert (c.optimizer.name, c.optimizer.popsize, c.optimizer.seed) == (name, 6, 3)


def test_optimizer_mapping_without_name_is_chosen_at_the_start():
    from evolve.build import resolve_optimizer

    c = parse({**with_genome(), "optimizer": {"sigma0": 0.1}, "budget": {"max_fevals": 400}})
    assert (c.optimizer.name, c.optimizer.sigma0) == (None, 0.1)
    resolved, _ = resolve_optimizer(c, 6)  # 400 evaluations over 6 genes: CMA-ES, the user's step kept
    assert (resolved.optimizer.name, resolved.optimizer.sigma0) == ("cma", 0.1)


def test_tasks_bare_strings_and_mappings_mix():
    c = parse({"genome": GENOME, "tasks": ["x", {"name": "y", "weight": -1}, "z"]})
    assert [(t.name, t.weight) for t in c.tasks] == [("x", 1.0), ("y", -1.0), ("z", 1.0)]


def test_base_model_may_be_listed_among_models():
    c = parse(with_genome(merge_method="ties", models=["/m/base", "/m/a"], base_model="/m/base"))
    assert c.genome.base_model in c.genome.models


def test_slerp_with_base_model_and_one_model_is_two():
    c = parse(with_genome(merge_method="slerp", models=["/m/a"], base_model="/m/base"))
    assert c.genome.merge_method == "slerp"


# ----------------------------------------------------------------------------------------------
# errors name the key path


@pytest.mark.parametrize(
    "data,path,words",
    [
        (with_genome(merge_method="karcher"), "genome.merge_method", ["karcher"]),
        (with_genome(merge_method="passthrough"), "genome.merge_method", ["passthrough"]),
        ({"genome": GENOME, "tasks": ["x", {"name": "y", "weight": "heavy"}]}, "tasks[1].weight", []),
        ({"genome": GENOME, "tasks": ["x", {"name": "y", "direction": "up"}]}, "tasks[1].direction", ["minimize"]),
        ({"genome": GENOME, "tasks": ["x", {"weight": 1}]}, "tasks[1].name", ["missing"]),
        ({"genome": GENOME, "tasks": []}, "tasks", []),
        ({"genome": GENOME}, "tasks", ["missing"]),
        ({"tasks": ["x"]}, "genome", ["missing"]),
        (with_genome(models=[]), "genome.models", []),
        ({"genome": {"merge_method": "linear"}, "tasks": ["x"]}, "genome.models", ["missing"]),
        (with_genome(layer_granularity=-2), "genome.layer_granularity", []),
        (with_genome(layer_granularity="eight"), "genome.layer_granularity", []),
        (with_genome(dtype="float8"), "genome.dtype", ["float8"]),
        (with_genome(filters="mlp"), "genome.filters", []),
        (with_genome(smooth="sometimes"), "genome.smooth", []),
        ({**with_genome(), "optimizer": "nelder-mead"}, "optimizer.name", ["cma"]),
        ({**with_genome(), "optimizer": {"popsize": 1}}, "optimizer.popsize", []),
        ({**with_genome(), "optimizer": {"sigma0": 0}}, "optimizer.sigma0", []),
        ({**with_genome(), "optimizer": {"seed": "lucky"}}, "optimizer.seed", []),
        ({**with_genome(), "budget": {"max_fevals": 0}}, "budget.max_fevals", []),
        ({**with_genome(), "budget": {"timeout": -5}}, "budget.timeout", []),
        ({**with_genome(), "limit": 0}, "limit", []),
        ({**with_genome(), "num_fewshot": -1}, "num_fewshot", []),
        ({**with_genome(), "shuffle": "perhaps"}, "shuffle", []),
        ({**with_genome(), "seed": "x"}, "seed", []),
    ],
)
def test_errors_name_the_key_path(data, path, words):
    msg = error(data)
    assert msg.startswith("search.yml: ")
    assert re.search(rf"(^|[ '']){re.escape(path)}($|[:' ])", msg), msg
    for w in words:
        assert w in msg, msg


@pytest.mark.parametrize("method", ["ties", "dare_ties", "task_arithmetic", "dare_linear"])
def test_task_vector_methods_need_base_model(method):
    msg = error(with_genome(merge_method=method))
    assert "genome" in msg and "base_model" in msg and method in msg


def test_smooth_with_slerp_is_refused():
    msg = error(with_genome(merge_method="slerp", smooth=True))
    assert "genome" in msg and "smooth" in msg and "slerp" in msg


def test_slerp_needs_two_models():
    msg = error(with_genome(merge_method="slerp", models=["/m/a"]))
    assert "genome" in msg and "two" in msg


def test_not_a_mapping():
    assert "mapping" in error(["genome"])
    assert "mapping" in error(None)


def test_unknown_keys_warn_with_their_path(caplog):
    data = {
        "genome": {**GENOME, "mutation_rate": 0.1},
        "tasks": ["x", {"name": "y", "weght": 2}],
        "optimizer": {"name": "cma", "elitism": True},
        "budget": {"max_evals": 10},
        "wandb_project": "p",
    }
    with caplog.at_level(logging.WARNING):
        c = parse(data)
    assert c.budget.max_fevals == 100  # the misspelt key does nothing
    warned = " | ".join(r.getMessage() for r in caplog.records)
    for path in ("genome.mutation_rate", "tasks[1].weght", "optimizer.elitism", "budget.max_evals", "wandb_project"):
        assert f"'{path}'" in warned, warned
    assert all(r.levelno == logging.WARNING for r in caplog.records)


def test_load_search_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_search_config(tmp_path / "nope.yml")
    bad = tmp_path / "bad.yml"
    bad.write_text("genome:\n  models: [a\ntasks: x\n")
    with pytest.raises(ConfigError, match="malformed YAML at line"):
        load_search_config(bad)
    good = tmp_path / "good.yml"
    good.write_text(yaml.safe_dump(with_genome()))
    config, text = load_search_config(good)
    assert text == good.read_text() and config.genome.merge_method == "linear"


# ----------------------------------------------------------------------------------------------
# the CLI: errors before any search, and --dry-run


def fake_model(root: Path, name: str, layers: int) -> str:
    """A model folder with only config.json: genomes and dry runs read nothing else."""
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": layers,
        "hidden_size": 64, "vocab_size": 100,
    }))
    return str(path)


def evolve_cli(tmp_path: Path, config: dict, *flags: str) -> subprocess.CompletedProcess:
    path = tmp_path / "search.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return subprocess.run([MERGEKIT_EVOLVE, str(path), *flags], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)


@pytest.fixture
def models32(tmp_path):
    return [fake_model(tmp_path / "models", n, 32) for n in ("m1", "m2", "m3")]


def refused(tmp_path, config, *flags, words=()) -> str:
    storage = tmp_path / "storage"
    proc = evolve_cli(tmp_path, config, "--storage-path", str(storage), *flags)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w in lines[0], lines[0]
    assert not (storage / "study.db").exists()
    return lines[0]


def test_cli_layer_granularity_not_dividing_layers(tmp_path, llama_models):
    cfg = {"genome": {"models": [str(llama_models["a"]), str(llama_models["b"])],
                      "base_model": str(llama_models["base"]), "merge_method": "ties", "layer_granularity": 3},
           "tasks": ["t"]}
    refused(tmp_path, cfg, words=["layer_granularity", "3", "4"])


@pytest.mark.slow
def test_cli_models_with_different_layer_counts(tmp_path):
    cfg = {"genome": {"models": [fake_model(tmp_path, "x", 4), fake_model(tmp_path, "y", 6)],
                      "merge_method": "linear"}, "tasks": ["t"]}
    refused(tmp_path, cfg, words=["genome.models", "layer counts"])


@pytest.mark.slow
def test_cli_missing_model(tmp_path):
    cfg = {"genome": {"models": [str(tmp_path / "nowhere"), fake_model(tmp_path, "y", 4)],
                      "merge_method": "linear"}, "tasks": ["t"]}
    refused(tmp_path, cfg, words=["genome.models", "nowhere"])


@pytest.mark.slow
def test_cli_unknown_task(tmp_path, llama_models):
    empty = tmp_path / "no_tasks"
    empty.mkdir()
    cfg = {"genome": {"models": [str(llama_models["a"]), str(llama_models["b"])], "merge_method": "linear"},
           "tasks": ["evomerge_no_such_task"]}
    refused(tmp_path, cfg, "--task-search-path", str(empty), words=["tasks", "evomerge_no_such_task"])


@pytest.mark.slow
def test_cli_task_search_path_not_a_directory(tmp_path, llama_models):
    cfg = {"genome": {"models": [str(llama_models["a"]), str(llama_models["b"])], "merge_method": "linear"},
           "tasks": ["t"]}
    refused(tmp_path, cfg, "--task-search-path", str(tmp_path / "missing"), words=["--task-search-path"])


@pytest.mark.slow
def test_cli_benchmark_task_refused(tmp_path, llama_models):
    cfg = {"genome": {"models": [str(llama_models["a"]), str(llama_models["b"])], "merge_method": "linear"},
           "tasks": ["toy", "gsm8k"]}
    refused(tmp_path, cfg, words=["gsm8k", "--i-understand-the-depths-of-the-evils-i-am-unleashing"])


def test_cli_ties_without_base_model(tmp_path):
    cfg = {"genome": {"models": ["/m/a", "/m/b"], "merge_method": "ties"}, "tasks": ["t"]}
    refused(tmp_path, cfg, words=["search.yml", "genome", "base_model"])


def test_cli_smooth_with_slerp(tmp_path):
    cfg = {"genome": {"models": ["/m/a", "/m/b"], "merge_method": "slerp", "smooth": True}, "tasks": ["t"]}
    refused(tmp_path, cfg, words=["genome", "smooth", "slerp"])


@pytest.mark.slow
def test_cli_bad_value_names_its_path(tmp_path):
    cfg = {"genome": GENOME, "tasks": ["x", {"name": "y", "weight": "heavy"}]}
    refused(tmp_path, cfg, words=["tasks[1].weight"])
    cfg = {"genome": {**GENOME, "merge_method": "nuslerp"}, "tasks": ["x"]}
    refused(tmp_path, cfg, words=["genome.merge_method", "nuslerp"])


@pytest.mark.slow
def test_check_tasks_finds_a_local_task(tmp_path):
    """The positive side of the unknown-task check: a task YAML in --task-search-path is found."""
    from evolve.options import EvolveOptions
    from evolve.tasks_check import check_tasks

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "toy.jsonl").write_text('{"q": "one plus one is", "a": " two"}\n')  # the driver loads every task
    (tasks / "toy.yaml").write_text(
        f"task: evomerge_toy_task\ndataset_path: json\ndataset_kwargs:\n  data_files: {{test: {tasks / 'toy.jsonl'}}}\n"
        "test_split: test\noutput_type: loglikelihood\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\n"
        "metric_list:\n  - metric: acc\n"
    )
    config = parse({"genome": GENOME, "tasks": ["evomerge_toy_task"]})
    check_tasks(config, EvolveOptions(storage_path=tmp_path / "s", task_search_path=[str(tasks)]))
    config = parse({"genome": GENOME, "tasks": ["evomerge_toy_task", "evomerge_other"]})
    with pytest.raises(ConfigError, match="evomerge_other") as info:
        check_tasks(config, EvolveOptions(storage_path=tmp_path / "s", task_search_path=[str(tasks)]))
    assert "evomerge_toy_task" not in str(info.value)


def dry_run_numbers(text: str) -> tuple[int, int, int]:
    size = int(re.search(r"genome: (\d+) dimensions", text).group(1))
    pop = int(re.search(r"population (\d+)", text).group(1))
    gens = int(re.search(r"about (\d+) generation", text).group(1))
    return size, pop, gens


def cma_popsize(n: int) -> int:
    return 4 + math.floor(3 * math.log(n))


def generations(budget: int, pop: int) -> int:
    return math.ceil((budget - 1) / pop)  # the starting point is evaluated first, alone


@pytest.mark.parametrize(
    "granularity,filters,size,pop",
    [(8, None, 24, 13), (8, ["self_attn", "mlp"], 72, 16), (1, ["self_attn", "mlp"], 576, 23),
     (0, None, 6, 9), (32, ["mlp"], 12, 11)],
)
@pytest.mark.slow
def test_cli_dry_run_reports_size_population_generations(tmp_path, models32, granularity, filters, size, pop):
    genome = {"models": models32, "merge_method": "dare_ties", "base_model": models32[0],
              "layer_granularity": granularity}
    if filters:
        genome["filters"] = filters
    storage = tmp_path / "storage"
    proc = evolve_cli(tmp_path, {"genome": genome, "tasks": ["t"], "optimizer": "cma"}, "--dry-run", "--storage-path", str(storage))
    assert proc.returncode == 0, proc.stderr
    assert pop == cma_popsize(size)
    assert dry_run_numbers(proc.stdout) == (size, pop, generations(100, pop))
    assert not storage.exists()  # a dry run writes nothing


@pytest.mark.slow
def test_dry_run_budget_and_population_overrides(tmp_path, models32):
    genome = {"models": models32, "merge_method": "ties", "base_model": models32[0], "layer_granularity": 8}
    cfg = {"genome": genome, "tasks": ["t"], "budget": {"max_fevals": 40}, "optimizer": {"name": "cma", "popsize": 10}}
    # N = 4 groups x 3 models x 1 set x 2 params
    proc = evolve_cli(tmp_path, cfg, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert dry_run_numbers(proc.stdout) == (24, 10, generations(40, 10))
    # CLI flags override the file
    proc = evolve_cli(tmp_path, cfg, "--dry-run", "--max-fevals", "61", "--force-population-size", "6")
    assert dry_run_numbers(proc.stdout) == (24, 6, 10)
    # without a popsize, CMA's default
    cfg["optimizer"] = "cma"
    proc = evolve_cli(tmp_path, cfg, "--dry-run", "--max-fevals", "27")
    assert dry_run_numbers(proc.stdout) == (24, 13, 2)


def test_dry_run_report_in_process(tmp_path):
    from evolve.dry_run import dry_run_report

    models = [fake_model(tmp_path, n, 4) for n in ("a", "b")]
    cfg = parse({"genome": {"models": models, "merge_method": "slerp", "base_model": fake_model(tmp_path, "base", 4),
                            "layer_granularity": 2, "filters": ["mlp"]}, "tasks": ["t"], "budget": {"max_fevals": 50},
                 "optimizer": "cma"})
    size, pop, gens = dry_run_numbers(dry_run_report(cfg))
    # slerp, pool of 3: per group 3 selection scores + 2 t values
    assert (size, pop, gens) == (10, cma_popsize(10), generations(50, cma_popsize(10)))


def test_racing_fraction_one_number_or_increasing_stages(tmp_path):
    from evolve.dry_run import dry_run_report

    assert parse({**with_genome(), "racing": True}).racing.fractions == [0.2, 0.5]  # the default: two checks
    assert parse({**with_genome(), "racing": {"confidence_z": 2}}).racing.fractions == [0.2, 0.5]
    one = parse({**with_genome(), "racing": {"fraction": 0.3}}).racing
    assert one.fraction == 0.3 and one.fractions == [0.3]  # a number stays a number: stored configs read alike
    assert parse({**with_genome(), "racing": {"fraction": [0.15, 0.4]}}).racing.fractions == [0.15, 0.4]
    for bad, words in (([0.5, 0.2], "strictly increasing"), ([0.2, 0.2], "strictly increasing"), (1.0, "(0, 1)"),
                       (0, "(0, 1)"), ([], "(0, 1)"), ([0.2, 1.5], "(0, 1)"), (True, "(0, 1)"), ("half", "(0, 1)")):
        msg = error({**with_genome(), "racing": {"fraction": bad}})
        assert msg.startswith("search.yml: racing.fraction: ") and words in msg, msg
    models = [fake_model(tmp_path, n, 4) for n in ("a", "b")]
    cfg = {"genome": {"models": models, "merge_method": "linear"}, "tasks": ["t"], "optimizer": "cma"}
    assert "racing: 20% of each task's items first;" in dry_run_report(parse({**cfg, "racing": {"fraction": 0.2}}))
    line = [x for x in dry_run_report(parse({**cfg, "racing": True})).splitlines() if x.startswith("racing")]
    assert line[0].startswith("racing: checks after 20%, 50% of each task's items; scoring goes on only while")


@pytest.mark.slow
def test_cli_dry_run_warns_unknown_keys_with_their_path(tmp_path, models32):
    cfg = {"genome": {"models": models32[:2], "merge_method": "linear", "mutation": 1},
           "tasks": [{"name": "t", "wieght": 2}], "population": 5}
    proc = evolve_cli(tmp_path, cfg, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    for path in ("genome.mutation", "tasks[0].wieght", "population"):
        assert re.search(rf"unknown key '{re.escape(path)}'", proc.stderr), proc.stderr
    assert dry_run_numbers(proc.stdout) == (2, cma_popsize(2), generations(100, cma_popsize(2)))


def test_cli_dry_run_bad_config_exits_2(tmp_path):
    proc = evolve_cli(tmp_path, {"genome": {"models": ["/m/a"], "merge_method": "ties"}, "tasks": ["t"]}, "--dry-run")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "base_model" in proc.stderr
