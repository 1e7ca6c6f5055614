"""Chat templates (docs/mergekit-reference.md §4): the bundled templates render their formats, and `chat_template`
(bundled name, literal Jinja, auto) ends up in the merged model's tokenizer."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from helpers import _tokenizer_dir
from merge_engine.chat_templates import BUNDLED
from merge_engine.config import parse_config
from merge_engine.options import MergeOptions
from merge_engine.streaming import run_merge

CHAT = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! "},
    {"role": "user", "content": "Add 1+1"},
]

EXPECTED = {
    "chatml": (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\nHello! <|im_end|>\n"
        "<|im_start|>user\nAdd 1+1<|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
    "llama3": (
        "<s><|start_header_id|>system<|end_header_id|>\n\nYou are helpful.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAdd 1+1<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "mistral": "<s>[INST] You are helpful.\n\nHi there [/INST]Hello! </s>[INST] Add 1+1 [/INST]",
    "exaone": (
        "[|system|]You are helpful.[|endofturn|]\n"
        "[|user|]Hi there\n"
        "[|assistant|]Hello! [|endofturn|]\n"
        "[|user|]Add 1+1\n"
        "[|assistant|]"
    ),
}


def render(template: str, messages, generation_prompt: bool = True) -> str:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(_tokenizer_dir())  # bos <s>, eos </s>
    tok.chat_template = template
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bundled_template_renders_its_format(name):
    assert render(BUNDLED[name], CHAT) == EXPECTED[name]


def test_mistral_without_system_and_with_a_final_answer():
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert render(BUNDLED["mistral"], messages) == "<s>[INST] a [/INST]b</s>"


def test_mistral_refuses_roles_that_do_not_alternate():
    from jinja2 import TemplateError

    with pytest.raises(TemplateError, match="alternate"):
        render(BUNDLED["mistral"], [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_alpaca_blocks():
    messages = [
        {"role": "system", "content": "Below is an instruction."},
        {"role": "user", "content": "Translate"},
        {"role": "user_context", "content": "bonjour"},
        {"role": "assistant", "content": "hello"},
    ]
    head = "Below is an instruction.\n\n### Instruction:\nTranslate\n\n### Input:\nbonjour\n\n"
    assert render(BUNDLED["alpaca"], messages, False) == head + "### Response:\nhello</s>\n\n"
    assert render(BUNDLED["alpaca"], messages[:3], True) == head + "### Response:\n"


# ----------------------------------------------------------------------------------------------
# through a merge


def merged_template(models: dict[str, Path], out: Path, chat_template: str, options=None, **extra):
    from transformers import AutoTokenizer

    config = parse_config(
        {"merge_method": "linear", "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in models.values()],
         "chat_template": chat_template, **extra}
    )
    run_merge(config, out, options or MergeOptions(quiet=True), config_text=config.to_yaml())
    return AutoTokenizer.from_pretrained(out).chat_template


def test_bundled_name_is_saved_with_the_copied_tokenizer(llama_models, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "out"
    assert merged_template(llama_models, out, "chatml") == BUNDLED["chatml"]
    donor = AutoTokenizer.from_pretrained(llama_models["base"])
    assert AutoTokenizer.from_pretrained(out).get_vocab() == donor.get_vocab()


def test_literal_template_is_saved(llama_models, tmp_path):
    literal = "{% for m in messages %}<<{{ m['role'] }}>>{{ m['content'] }}{% endfor %}"
    out = tmp_path / "out"
    assert merged_template(llama_models, out, literal) == literal
    assert render(literal, CHAT[:2]) == "<<system>>You are helpful.<<user>>Hi there"


def test_template_with_a_built_tokenizer(llama_models, tmp_path):
    assert merged_template(llama_models, tmp_path / "out", "llama3", tokenizer_source="union") == BUNDLED["llama3"]


def test_auto_picks_the_most_common_template(llama_models, tmp_path):
    from transformers import AutoTokenizer

    one = "{% for m in messages %}ONE {{ m['content'] }}{% endfor %}"
    two = "{% for m in messages %}TWO {{ m['content'] }}{% endfor %}"
    models = {}
    for name, template in (("base", one), ("a", two), ("b", two)):
        models[name] = shutil.copytree(llama_models[name], tmp_path / name)
        tok = AutoTokenizer.from_pretrained(models[name])
        tok.chat_template = template + "\n"  # compared stripped
        tok.save_pretrained(models[name])
    assert merged_template(models, tmp_path / "out", "auto") == two


def test_auto_without_templates_keeps_the_donor_files(llama_models, tmp_path):
    out = tmp_path / "out"
    assert merged_template(llama_models, out, "auto") is None
    assert (out / "tokenizer.json").read_bytes() == (llama_models["base"] / "tokenizer.json").read_bytes()


def test_no_copy_tokenizer_writes_no_tokenizer(llama_models, tmp_path):
    config = parse_config({"merge_method": "linear", "models": [{"model": str(llama_models["base"]), "parameters": {"weight": 1.0}}],
                           "chat_template": "chatml"})
    out = tmp_path / "out"
    run_merge(config, out, MergeOptions(quiet=True, copy_tokenizer=False))
    assert not (out / "tokenizer.json").exists() and not (out / "chat_template.jinja").exists()
