import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# derived architectures are cached on disk: keep the tests' cache out of the user's home, and
# fresh per run so derivation itself is exercised (subprocesses inherit it)
os.environ["EVOMERGE_CACHE_DIR"] = tempfile.mkdtemp(prefix="evomerge-test-cache-")

from helpers import make_model, tiny_config  # noqa: E402


@pytest.fixture(scope="session")
def llama_models(tmp_path_factory):
    """A tiny llama base and two fine-tunes of it (float32, 4 layers, hidden 32)."""
    root = tmp_path_factory.mktemp("llama")
    cfg = tiny_config("llama")
    base = make_model(root / "base", cfg, seed=0)
    a = make_model(root / "ft_a", cfg, seed=1, base=base)
    b = make_model(root / "ft_b", cfg, seed=2, base=base)
    return {"base": base, "a": a, "b": b}


# Trained models are built once per test run: the session fixtures below build into a folder that
# every pytest-xdist worker of the run shares (the run's base temp), under a file lock, so the
# first worker that needs them trains them and the others wait and reuse them (the builders
# themselves reuse a finished build: `build.json`). Tests must not modify these models.

def _run_dir(tmp_path_factory) -> Path:
    """The base temp of this run, the same for all xdist workers (each worker has a subfolder)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def _once(tmp_path_factory, name: str, make):
    """make(folder) under a lock shared by the run's workers; its result is reused by the others."""
    from filelock import FileLock

    root = _run_dir(tmp_path_factory) / "shared" / name
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock"):
        return make(root)


def _quickstart(root: Path) -> dict:
    from experiments.quickstart.build_models import build
    from experiments.quickstart.skills import write_lm_eval_tasks

    tasks, done = root / "tasks", root / "tasks.done"
    if not done.exists():  # written once: another worker's search may be reading them
        write_lm_eval_tasks(tasks)
        done.touch()
    return {"root": root, "models": build(root / "models", steps_scale=0.6), "tasks": tasks}


@pytest.fixture(scope="session")
def quickstart(tmp_path_factory):
    """The quickstart experiment at reduced training (steps_scale 0.6): base, expert_arithmetic,
    expert_facts, and its lm-eval task folder; one build per test run."""
    return _once(tmp_path_factory, "quickstart", _quickstart)


@pytest.fixture(scope="session")
def quickstart_models(quickstart):
    return quickstart


@pytest.fixture(scope="session")
def reduced_build(tmp_path_factory):
    """The conflict experiment's models at steps_scale 0.04; one build per test run."""
    from experiments.conflict.build_models import build

    return _once(tmp_path_factory, "conflict_models", lambda root: build(root, steps_scale=0.04))


# What a test starts decides its markers (`make test-fast` runs only unmarked tests). Files mark
# their tests themselves (`pytestmark`, decorators); the rules below cover what they cannot:
# - a test using the trained models above is slow (whichever runs first trains them);
# - tests/test_html_report.py, by test name (its owners may move these marks into the file).
_TRAINED = {"quickstart", "quickstart_models", "reduced_build"}
_BY_NAME = {
    "test_html_report.py": {
        "test_a_real_search_writes_its_report": ("slow", "ray", "e2e"),
        "test_reports_during_a_running_search": ("slow", "e2e"),
        "test_cli_report_subcommand": ("slow", "e2e"),
        "test_reading_while_another_process_writes": ("slow",),
        "test_report_matches_the_study": ("slow",),  # its module fixture runs a small study
        "test_rescore_table_and_exported_front": ("slow",),
    },
}


# Heaviest files first: `make test` hands whole files to its two workers in collection order, so a
# file of end-to-end searches collected last ran alone for minutes at the end. A file's weight is
# a rough cost from its marks (an e2e test starts a whole search, a ray test a cluster).
_MARK_COST = {"e2e": 4, "ray": 2, "slow": 1}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _TRAINED & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
        for name in _BY_NAME.get(item.path.name, {}).get(item.originalname, ()):
            item.add_marker(getattr(pytest.mark, name))
    weight: dict = {}
    for item in items:
        weight[item.path] = weight.get(item.path, 0) + sum(c for m, c in _MARK_COST.items() if item.get_closest_marker(m))
    first_seen = {path: i for i, path in reversed(list(enumerate(item.path for item in items)))}
    items.sort(key=lambda item: (-weight[item.path], first_seen[item.path]))  # stable: a file's own order kept
