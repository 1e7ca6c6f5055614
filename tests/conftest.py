import os
import tempfile

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
