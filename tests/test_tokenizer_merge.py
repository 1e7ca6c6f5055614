"""Tokenizer merging (docs/mergekit-reference.md §5): the output tokenizer, embedding/LM-head rows re-indexed to it before
the merge, padding, per-token sources, errors. Expected rows come from `reference_rows` below, a
plain loop over tokens written from the rules of docs/mergekit-reference.md, independent of merge_engine.tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import read_model
from merge_engine.config import parse_config
from merge_engine.errors import ConfigError
from merge_engine.options import MergeOptions
from merge_engine.plan import build_plan
from merge_engine.resident import ResidentMerger
from merge_engine.streaming import run_merge
from test_errors import fails
from tok_fixtures import build_tokenizer_models

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
WEIGHTS = {"base": 0.2, "ft_a": 0.5, "ft_b": 0.3}
BASE_VOCAB = 259


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    return build_tokenizer_models(tmp_path_factory.mktemp("tokmodels"))


@pytest.fixture(scope="module")
def inputs(models):
    """Per model: (tokenizer vocab, vocab_size from config.json, its tensors)."""
    from transformers import AutoTokenizer

    out = {}
    for name, path in models.items():
        vocab = AutoTokenizer.from_pretrained(path).get_vocab()
        size = json.loads((path / "config.json").read_text())["vocab_size"]
        out[name] = (vocab, size, read_model(path))
    return out


def linear_config(models, **extra):
    data = {
        "merge_method": "linear",
        "models": [{"model": str(models[n]), "parameters": {"weight": w}} for n, w in WEIGHTS.items()],
    }
    data.update(extra)
    return parse_config(data)


def merge(config, out: Path) -> dict[str, torch.Tensor]:
    run_merge(config, out, MergeOptions(quiet=True), config_text=config.to_yaml())
    return read_model(out)


def out_tokens(out: Path) -> list[str]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    return tok.convert_ids_to_tokens(list(range(len(tok))))


def reference_rows(inputs, tensor, tokens, base="base", sources=None, forced=(), pad_to=None):
    """Each model's matrix re-indexed to `tokens` (docs/mergekit-reference.md §5), one row at a time.
    sources: token -> ("zero",) or (model, row) for tokens configured with a source."""
    sources = sources or {}

    def has(m, t):
        vocab, size, _ = inputs[m]
        return t in vocab and vocab[t] < size

    def row(m, i):
        return inputs[m][2][tensor][i]

    hidden = inputs[base][2][tensor].shape[1]
    out = {}
    for m in inputs:
        rows = []
        for t in tokens:
            if has(m, t) and t not in forced:
                rows.append(row(m, inputs[m][0][t]))
            elif t in sources:
                src = sources[t]
                rows.append(torch.zeros(hidden) if src == ("zero",) else row(*src))
            else:
                owners = [o for o in inputs if has(o, t)]
                if len(owners) == 1:
                    rows.append(row(owners[0], inputs[owners[0]][0][t]))
                elif not owners:
                    rows.append(torch.zeros(hidden))
                elif base in owners:
                    rows.append(row(base, inputs[base][0][t]))
                else:
                    total = torch.zeros(hidden)
                    for o in owners:
                        total = total + row(o, inputs[o][0][t])
                    rows.append(total / len(owners))
        matrix = torch.stack(rows)
        if pad_to and len(tokens) % pad_to:
            n = (len(tokens) // pad_to + 1) * pad_to
            matrix = torch.cat([matrix, matrix.mean(0, keepdim=True).expand(n - len(tokens), hidden)])
        out[m] = matrix
    return out


def linear_merge(rows: dict[str, torch.Tensor]) -> torch.Tensor:
    total = sum(WEIGHTS[m] * rows[m] for m in rows)
    return total / sum(WEIGHTS.values())


def assert_rows(merged, inputs, tokens, **kw):
    for tensor in (EMBED, HEAD):
        expected = linear_merge(reference_rows(inputs, tensor, tokens, **kw))
        got = merged[tensor]
        assert got.shape == expected.shape, tensor
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=lambda m: f"{tensor}: {m}")


# ----------------------------------------------------------------------------------------------


def test_union_appends_new_tokens_and_takes_their_owners_rows(models, inputs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "union"
    merged = merge(linear_config(models, tokenizer_source="union"), out)
    tokens = out_tokens(out)
    base_vocab = inputs["base"][0]
    # base ids kept; new tokens in first-seen order (ft_a's two, then ft_b's <tool>); the base
    # tokenizer's tokens beyond its embedding are gone
    assert tokens[:BASE_VOCAB] == sorted((t for t, i in base_vocab.items() if i < BASE_VOCAB), key=base_vocab.get)
    assert tokens[BASE_VOCAB:] == ["<|im_start|>", "<|im_end|>", "<tool>"]
    tok = AutoTokenizer.from_pretrained(out)
    specials = {t.content: t.special for t in tok.added_tokens_decoder.values()}
    assert specials["<|im_start|>"] and specials["<|im_end|>"] and not specials["<tool>"]
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == len(tok) == 262
    assert merged[EMBED].shape == merged[HEAD].shape == (262, 32)
    assert_rows(merged, inputs, tokens)
    # a token one model has is that model's row; shared tokens are the plain weighted average
    a_vocab, b_vocab = inputs["ft_a"][0], inputs["ft_b"][0]
    for tensor in (EMBED, HEAD):
        torch.testing.assert_close(merged[tensor][259], inputs["ft_a"][2][tensor][a_vocab["<|im_start|>"]])
        torch.testing.assert_close(merged[tensor][261], inputs["ft_b"][2][tensor][b_vocab["<tool>"]])
        plain = sum(WEIGHTS[m] * inputs[m][2][tensor][:BASE_VOCAB] for m in WEIGHTS) / sum(WEIGHTS.values())
        torch.testing.assert_close(merged[tensor][:BASE_VOCAB], plain)

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    ids = tok("<|im_start|>hello<tool><|im_end|>", return_tensors="pt")
    assert ids["input_ids"][0].tolist()[0] == 259
    generated = model.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert generated.shape[1] == ids["input_ids"].shape[1] + 3


def test_base_model_is_the_tokenizer_base(models, inputs, tmp_path):
    out = tmp_path / "base_a"
    merged = merge(linear_config(models, base_model=str(models["ft_a"]), tokenizer_source="union"), out)
    tokens = out_tokens(out)
    a_vocab = inputs["ft_a"][0]
    assert tokens[:261] == sorted(a_vocab, key=a_vocab.get)  # ft_a's ids kept
    assert tokens[261:] == ["<tool>"]
    # <|im_end|>: ft_a and ft_b have it, the base model lacks it -> the tokenizer base's (ft_a) row
    assert_rows(merged, inputs, tokens, base="ft_a")
    for tensor in (EMBED, HEAD):
        a_row = inputs["ft_a"][2][tensor][a_vocab["<|im_end|>"]]
        b_row = inputs["ft_b"][2][tensor][inputs["ft_b"][0]["<|im_end|>"]]
        expected = ((WEIGHTS["ft_a"] + WEIGHTS["base"]) * a_row + WEIGHTS["ft_b"] * b_row) / sum(WEIGHTS.values())
        torch.testing.assert_close(merged[tensor][260], expected)


def test_pad_to_multiple_of_pads_rows_with_the_mean_row(models, inputs, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "padded"
    merged = merge(linear_config(models, tokenizer={"source": "union", "pad_to_multiple_of": 16}), out)
    tokens = out_tokens(out)
    assert len(AutoTokenizer.from_pretrained(out)) == 262  # the tokenizer is not padded
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 272
    assert merged[EMBED].shape == merged[HEAD].shape == (272, 32)
    assert_rows(merged, inputs, tokens, pad_to=16)
    # the padding rows of a linear merge are the mean of its real rows
    torch.testing.assert_close(merged[EMBED][262:], merged[EMBED][:262].mean(0).expand(10, 32), rtol=1e-5, atol=1e-6)


def test_per_token_sources(models, inputs, tmp_path):
    b, base = str(models["ft_b"]), str(models["base"])
    tokens_cfg = {
        "<|im_end|>": {"source": b, "force": True},  # everyone takes ft_b's row
        "<|im_start|>": {"source": {"kind": "model_token", "model": base, "token_id": 5}},  # who lacks it
        "<tool>": {"source": {"kind": "zero"}},
        "<new>": {"source": {"kind": "model_token", "model": b, "token": "<tool>"}, "force": True},
        "<s>": {"source": {"kind": "zero"}, "force": True},
        "<nobody>": {},
    }
    out = tmp_path / "sources"
    merged = merge(linear_config(models, tokenizer={"source": "union", "tokens": tokens_cfg}), out)
    tokens = out_tokens(out)
    assert tokens[BASE_VOCAB:] == ["<|im_start|>", "<|im_end|>", "<tool>", "<new>", "<nobody>"]
    b_vocab = inputs["ft_b"][0]
    sources = {
        "<|im_end|>": ("ft_b", b_vocab["<|im_end|>"]),
        "<|im_start|>": ("base", 5),
        "<tool>": ("zero",),
        "<new>": ("ft_b", b_vocab["<tool>"]),
        "<s>": ("zero",),
    }
    assert_rows(merged, inputs, tokens, sources=sources, forced={"<|im_end|>", "<new>", "<s>"})
    for tensor in (EMBED, HEAD):
        b_rows = inputs["ft_b"][2][tensor]
        torch.testing.assert_close(merged[tensor][260], b_rows[b_vocab["<|im_end|>"]])
        torch.testing.assert_close(merged[tensor][262], b_rows[b_vocab["<tool>"]])
        assert torch.equal(merged[tensor][0], torch.zeros(32))  # <s> forced to zero
        assert torch.equal(merged[tensor][263], torch.zeros(32))  # nobody has <nobody>
        # <tool>: ft_b's own row, zero for the others
        torch.testing.assert_close(merged[tensor][261], b_rows[b_vocab["<tool>"]] * WEIGHTS["ft_b"] / sum(WEIGHTS.values()))


def test_token_source_model_without_force_fills_only_the_models_lacking_it(models, inputs, tmp_path):
    a = str(models["ft_a"])
    tokens_cfg = {"<|im_end|>": {"source": a}, "<s>": {"source": {"kind": "model_token", "model": a, "token": "<|im_start|>"}, "force": True}}
    out = tmp_path / "model_source"
    merged = merge(linear_config(models, tokenizer={"source": "union", "tokens": tokens_cfg}), out)
    tokens = out_tokens(out)
    a_vocab = inputs["ft_a"][0]
    sources = {"<|im_end|>": ("ft_a", a_vocab["<|im_end|>"]), "<s>": ("ft_a", a_vocab["<|im_start|>"])}
    assert_rows(merged, inputs, tokens, sources=sources, forced={"<s>"})
    for tensor in (EMBED, HEAD):
        torch.testing.assert_close(merged[tensor][0], inputs["ft_a"][2][tensor][a_vocab["<|im_start|>"]])


def test_tokenizer_of_one_model(models, inputs, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "from_b"
    merged = merge(linear_config(models, tokenizer={"source": str(models["ft_b"])}), out)
    tokens = out_tokens(out)
    assert AutoTokenizer.from_pretrained(out).get_vocab() == inputs["ft_b"][0]
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 261
    # <|im_end|>: ft_a and ft_b have it at different ids, the base lacks it -> their average
    assert_rows(merged, inputs, tokens)


def test_base_source_strips_tokens_beyond_the_embedding(models, inputs, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "base_padded"
    merged = merge(linear_config(models, tokenizer={"source": "base", "pad_to_multiple_of": 16}), out)
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == BASE_VOCAB and "<beyond1>" not in tok.get_vocab() and "<beyond2>" not in tok.get_vocab()
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 272
    assert_rows(merged, inputs, out_tokens(out), pad_to=16)


def test_base_source_without_options_copies_the_donor_files(models, tmp_path):
    out = tmp_path / "copied"
    merged = merge(linear_config(models, tokenizer_source="base"), out)
    base = models["base"]
    assert (out / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    assert json.loads((out / "config.json").read_text())["vocab_size"] == BASE_VOCAB
    assert merged[EMBED].shape == (BASE_VOCAB, 32)


# ----------------------------------------------------------------------------------------------
# bad input: one-line errors at planning time


def _with_tokens(models, tokens):
    return linear_config(models, tokenizer={"source": "union", "tokens": tokens})


@pytest.mark.parametrize(
    "make, needles",
    [
        (lambda m: linear_config(m, tokenizer_source="/nonexistent/model"), ["tokenizer_source", "not one of the models"]),
        (lambda m: linear_config(m, tokenizer={"source": "/nonexistent/model"}), ["tokenizer.source", "not one of the models"]),
        (lambda m: _with_tokens(m, {"<x>": {"source": {"kind": "model_token", "model": str(m["ft_a"]), "token_id": 261}}}),
         ["tokenizer.tokens.<x>.source.token_id", "261", "out of range"]),
        (lambda m: _with_tokens(m, {"<x>": {"source": {"kind": "model_token", "model": str(m["ft_a"]), "token": "<tool>"}}}),
         ["tokenizer.tokens.<x>.source.token", "no token '<tool>'"]),
        (lambda m: _with_tokens(m, {"<x>": {"source": {"kind": "model_token", "model": str(m["ft_a"]), "token": "<s>", "token_id": 0}}}),
         ["tokenizer.tokens.<x>.source", "exactly one of token_id or token"]),
        (lambda m: _with_tokens(m, {"<x>": {"source": {"kind": "model_token", "model": "/elsewhere", "token_id": 0}}}),
         ["tokenizer.tokens.<x>.source.model", "/elsewhere", "not one of the models"]),
        (lambda m: _with_tokens(m, {"<x>": {"source": {"kind": "copy"}}}), ["tokenizer.tokens.<x>.source.kind", "'copy'"]),
        (lambda m: _with_tokens(m, {"<tool>": {"source": str(m["ft_a"])}}), ["tokenizer.tokens.<tool>.source", "has no token '<tool>'"]),
        (lambda m: linear_config(m, chat_template="my template"), ["chat_template", "'my template'"]),
        # different vocabulary sizes and no tokenizer rule: refused (mergekit too), not merged on common rows
        (lambda m: linear_config(m), ["tensor model.embed_tokens.weight", "vocabulary sizes differ", "259 rows",
                                      "261", "tokenizer_source: base", "tokenizer_source: union"]),
    ],
)
def test_bad_tokenizer_settings_fail_at_planning(models, make, needles):
    with pytest.raises(ConfigError) as err:
        build_plan(make(models)).close()
    message = str(err.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


@pytest.mark.slow
def test_cli_token_source_not_in_the_merge(models, tmp_path):
    text = f"""
merge_method: linear
models:
  - model: {models['base']}
    parameters: {{weight: 1.0}}
  - model: {models['ft_a']}
    parameters: {{weight: 1.0}}
tokenizer:
  source: union
  tokens:
    "<|im_end|>":
      source: {models['ft_b']}
"""
    fails(tmp_path, text, "tokenizer.tokens.<|im_end|>.source", str(models["ft_b"]))


@pytest.mark.slow
def test_cli_chat_template_too_short(models, tmp_path):
    text = f"""
merge_method: linear
models:
  - model: {models['base']}
    parameters: {{weight: 1.0}}
chat_template: "{{{{x}}}}"
"""
    fails(tmp_path, text, "chat_template")


# ----------------------------------------------------------------------------------------------
# the resident executor permutes with the same function


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_resident_equals_streaming(models, tmp_path, method):
    data = {
        "merge_method": method,
        "models": [{"model": str(models[n]), "parameters": {"weight": w, "density": 0.6}} for n, w in WEIGHTS.items() if n != "base"],
        "tokenizer": {"source": "union", "pad_to_multiple_of": 8, "tokens": {"<|im_end|>": {"source": str(models["ft_a"]), "force": True}}},
        "dtype": "float32",
    }
    if method == "ties":
        data["base_model"] = str(models["base"])
    else:
        data["models"].append({"model": str(models["base"]), "parameters": {"weight": 0.2}})
    config = parse_config(data)
    expected = merge(config, tmp_path / "streamed")
    merger = ResidentMerger(config, MergeOptions(quiet=True))
    try:
        model = merger.build_model(config)
        merger.apply(config)
        assert merger.vocab(config).padded_size == 264
        live = model.state_dict()
        for name, tensor in expected.items():
            assert torch.equal(live[name], tensor), name
        for name, tensor in merger.merged_tensors(config).items():
            assert torch.equal(tensor, expected[name]), name
    finally:
        merger.close()
