"""The README.md model card written next to a merged model (docs/mergekit-reference.md §8)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import yaml

from .config import MergeConfig, ModelReference
from .methods import get_method_spec


def is_hub_id(path: str) -> bool:
    return not path.startswith(("/", "~", ".")) and path.count("/") == 1 and not os.path.exists(path)


def render_model(ref: ModelReference) -> str:
    text = f"[{ref.model.path}](https://huggingface.co/{ref.model.path})" if is_hub_id(ref.model.path) else ref.model.path
    return text + (f" + {ref.lora}" if ref.lora is not None else "")


def card_header(refs, library: str, tags: list[str], out_dir: Path) -> list[str]:
    """The card's YAML front matter (hub models as `base_model`) and its title, as lines."""
    hub = sorted({r.model.path for r in refs if is_hub_id(r.model.path)})
    front = {"base_model": hub, "library_name": library, "tags": tags}
    return ["---", yaml.safe_dump(front, sort_keys=True).rstrip(), "---", f"# {out_dir.name}", ""]


def render_card(config: MergeConfig, config_text: str, out_dir: Path, extra_sections: Optional[str] = None) -> str:
    refs = config.referenced_models()
    spec = get_method_spec(config.merge_method)
    method = spec.pretty_name or spec.name
    if spec.reference_url:
        method = f"[{method}]({spec.reference_url})"
    base_clause = ""
    if config.base_model is not None and spec.name != "slerp":
        base_clause = f" using {render_model(config.base_model)} as a base"
    listed = [r for r in refs if spec.name == "slerp" or r != config.base_model]
    lines = [
        *card_header(refs, "transformers", ["mergekit", "merge", "evomerge"], out_dir),
        "This is a merge of pre-trained language models created with evomerge "
        "(compatible with [mergekit](https://github.com/arcee-ai/mergekit) recipes).",
        "",
        "## Merge Details",
        "### Merge Method",
        "",
        f"This model was merged using the {method} merge method{base_clause}.",
        "",
        "### Models Merged",
        "",
        "The following models were included in the merge:",
        *[f"* {render_model(r)}" for r in listed],
        "",
    ]
    if extra_sections:
        lines += [extra_sections.rstrip(), ""]
    lines += [
        "### Configuration",
        "",
        "The following YAML configuration was used to produce this model:",
        "",
        "```yaml",
        config_text.rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)
