"""Hugging Face hub ids as model references, without importing torch (the search driver's
`--dry-run` and config checks stay fast)."""

from __future__ import annotations

from pathlib import Path


def looks_like_repo_id(text: str) -> bool:
    """`org/name` that is not a local path: fetched from (or found in the cache of) the hub."""
    return text.count("/") == 1 and not text.startswith((".", "/", "~")) and not Path(text).expanduser().exists()
