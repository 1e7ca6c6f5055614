"""mergekit-tokensurgeon on tiny real models and tokenizers trained in the test.

A model and a donor whose vocabularies overlap (the donor's BPE has more merges and one more
special token, so every shared token changes id; its hidden size differs). The donor's rows of
its new tokens are built as known sparse combinations of its shared tokens' rows; the same
coefficients over the model's shared rows are the "true" rows the model would have, against which
OMP and the baselines are measured."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from experiments.quickstart.build_models import train_tokenizer
from helpers import CORPUS, make_model, read_model, tiny_config
from merge_engine.tokensurgeon import main as surgeon_main

EXTRA_CORPUS = [
    "Tokenizers split words into pieces; bigger vocabularies keep more words whole.",
    "A transplanted tokenizer lets two models with different vocabularies be merged.",
    "Orthogonal matching pursuit picks a few shared tokens and fits their weights.",
] * 4
LINES = CORPUS + EXTRA_CORPUS
MODEL_VOCAB = 300
DONOR_VOCAB = 380
SPARSITY = 3  # nonzero coefficients of each new token's true row


def _set_rows(path: Path, rows: dict[str, torch.Tensor]) -> None:
    sd = load_file(path / "model.safetensors")
    sd.update(rows)
    from safetensors.torch import save_file

    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})


def _make(path: Path, tok_dir: Path, vocab: int, hidden: int, seed: int, tied: bool = False) -> Path:
    cfg = tiny_config("llama", layers=2, hidden=hidden, vocab=vocab, tie_word_embeddings=tied)
    make_model(path, cfg, seed=seed)
    for f in path.iterdir():  # make_model copies the shared test tokenizer: use ours
        if f.name.startswith(("tokenizer", "special_tokens")):
            f.unlink()
    for f in tok_dir.iterdir():
        shutil.copy(f, path / f.name)
    return path


def _shared(model_tok, donor_tok) -> list[tuple[int, int]]:
    mv = model_tok.get_vocab()
    return sorted((j, mv[t]) for t, j in donor_tok.get_vocab().items() if t in mv)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("surgeon")
    train_tokenizer(root / "tok_model", LINES, vocab_size=MODEL_VOCAB)
    train_tokenizer(root / "tok_donor", LINES, vocab_size=DONOR_VOCAB, extra_special=("<|sep|>",))
    mtok = AutoTokenizer.from_pretrained(root / "tok_model")
    dtok = AutoTokenizer.from_pretrained(root / "tok_donor")
    model = _make(root / "model", root / "tok_model", len(mtok), 32, seed=0)
    tied = _make(root / "tied", root / "tok_model", len(mtok), 32, seed=1, tied=True)
    donor = _make(root / "donor", root / "tok_donor", len(dtok), 48, seed=2)
    peer = _make(root / "peer", root / "tok_donor", len(dtok), 32, seed=3)  # merge partner of `model`

    shared = _shared(mtok, dtok)
    donor_shared_ids = torch.tensor([j for j, _ in shared])
    model_shared_ids = torch.tensor([i for _, i in shared])
    new_ids = sorted(set(dtok.get_vocab().values()) - {j for j, _ in shared})
    gen = torch.Generator().manual_seed(5)
    m_sd, d_sd = read_model(model), read_model(donor)
    t_sd = read_model(tied)
    truth = {}
    donor_rows = {}
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        # each new token: SPARSITY shared tokens with random weights in [0.5, 1.5] and random signs
        coef = torch.zeros(len(new_ids), len(shared), dtype=torch.float64)
        for r in range(len(new_ids)):
            pick = torch.randperm(len(shared), generator=gen)[:SPARSITY]
            sign = torch.randint(0, 2, (SPARSITY,), generator=gen) * 2 - 1
            coef[r, pick] = (0.5 + torch.rand(SPARSITY, generator=gen, dtype=torch.float64)) * sign
        d = d_sd[name].double()
        d[new_ids] = coef @ d[donor_shared_ids]
        donor_rows[name] = d.float()
        truth[name] = coef @ m_sd[name].double()[model_shared_ids]
        truth["tied:" + name] = coef @ t_sd["model.embed_tokens.weight"].double()[model_shared_ids]
    _set_rows(donor, donor_rows)

    # a second donor whose new tokens are the mean of their subword pieces (as the model's
    # tokenizer spells them): the case the subword baseline is exact for
    pieces_donor = root / "donor_pieces"
    shutil.copytree(donor, pieces_donor)
    to_donor = {i: j for j, i in shared}
    coef = torch.zeros(len(new_ids), len(shared), dtype=torch.float64)
    column = {j: c for c, (j, _) in enumerate(shared)}
    for r, j in enumerate(new_ids):
        text = dtok.convert_tokens_to_string([dtok.convert_ids_to_tokens(j)])
        pieces = mtok.encode(text, add_special_tokens=False)
        for i in pieces:
            coef[r, column[to_donor[i]]] += 1.0 / len(pieces)
    rows = {}
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        d = d_sd[name].double()
        d[new_ids] = coef @ d[donor_shared_ids]
        rows[name] = d.float()
        truth["pieces:" + name] = coef @ m_sd[name].double()[model_shared_ids]
    _set_rows(pieces_donor, rows)
    return {
        "root": root, "model": model, "tied": tied, "donor": donor, "mtok": mtok, "dtok": dtok,
        "shared": shared, "new_ids": new_ids, "truth": truth, "pieces_donor": pieces_donor, "peer": peer,
        "max_pieces": int((coef > 0).sum(1).max()),
    }


def run(*args: str):
    return CliRunner().invoke(surgeon_main, [*map(str, args), "--quiet"])


def ok(*args: str):
    result = run(*args)
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def test_world_is_what_the_tests_assume(world):
    # every shared token but <s> </s> <pad> changes id, and there are enough new tokens to measure
    assert all(j != i for j, i in world["shared"] if j > 2)
    assert len(world["shared"]) > 250 and len(world["new_ids"]) >= 30


def test_tokenizer_onto_itself_is_the_identity(world, tmp_path):
    out = tmp_path / "out"
    ok(world["model"], world["model"], out)
    before, after = read_model(world["model"]), read_model(out)
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name  # bitwise, including the embeddings
    cfg_in = json.loads((world["model"] / "config.json").read_text())
    cfg_out = json.loads((out / "config.json").read_text())
    assert cfg_in == cfg_out
    assert (out / "tokenizer.json").read_bytes() == (world["model"] / "tokenizer.json").read_bytes()


@pytest.fixture(scope="module")
def transplanted(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("omp") / "out"
    ok(world["model"], world["donor"], out, "--k", "8")
    return out


def test_shared_tokens_keep_their_exact_rows(world, transplanted):
    before, after = read_model(world["model"]), read_model(transplanted)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert after[name].shape == (len(world["dtok"]), 32)
        j = torch.tensor([j for j, _ in world["shared"]])
        i = torch.tensor([i for _, i in world["shared"]])
        assert torch.equal(after[name][j], before[name][i])
    for name in before:
        if name not in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(before[name], after[name]), name


def test_output_loads_with_the_donors_vocabulary(world, transplanted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(transplanted, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(transplanted)
    assert model.config.vocab_size == len(world["dtok"]) == len(tok)
    assert tok.get_vocab() == world["dtok"].get_vocab()
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (0, 1, 2)
    # on a sequence of shared tokens, the transplanted model computes exactly what the model did
    original = AutoModelForCausalLM.from_pretrained(world["model"], dtype=torch.float32)
    shared = world["shared"][3:40]
    donor_ids = torch.tensor([[j for j, _ in shared]])
    model_ids = torch.tensor([[i for _, i in shared]])
    cols_d = torch.tensor([j for j, _ in world["shared"]])
    cols_m = torch.tensor([i for _, i in world["shared"]])
    with torch.no_grad():
        a = model(donor_ids).logits[..., cols_d]
        b = original(model_ids).logits[..., cols_m]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def _errors(world, out: Path, name: str, key: str) -> tuple[float, float]:
    """(mean cosine similarity, mean relative error) of the new tokens' rows against the truth."""
    got = read_model(out)[name][world["new_ids"]].double()
    want = world["truth"][key]
    cos = torch.nn.functional.cosine_similarity(got, want, dim=1).mean().item()
    rel = ((got - want).norm(dim=1) / want.norm(dim=1)).mean().item()
    return cos, rel


METHODS = {
    "omp": ("--k", "8"),
    "subword": ("-a", "subword"),
    "common_interpolation": ("-a", "common_interpolation", "--k", "8", "--weight-scheme", "least_squares"),
    "landmark_pca": ("-a", "landmark_pca"),
    "mean": ("-a", "mean"),
}


def _scores(world, tmp_path, donor: Path, truth_prefix: str) -> dict:
    scores = {}
    for method, args in METHODS.items():
        out = tmp_path / method
        ok(world["model"], donor, out, *args)
        scores[method] = {n: _errors(world, out, n, truth_prefix + n) for n in ("model.embed_tokens.weight", "lm_head.weight")}
    return scores


def _report(title: str, scores: dict, capsys) -> None:
    with capsys.disabled():
        print(f"\n{title}: new-token rows vs truth (mean cosine, mean relative error), embed | lm_head:")
        for method, s in scores.items():
            e, h = s["model.embed_tokens.weight"], s["lm_head.weight"]
            print(f"  {method:22s} {e[0]:.4f} {e[1]:.2e} | {h[0]:.4f} {h[1]:.2e}")


@pytest.mark.slow
def test_omp_recovers_sparse_rows_the_baselines_miss(world, tmp_path, capsys):
    """True rows: 3 random shared tokens each. OMP finds them from the donor's rows."""
    scores = _scores(world, tmp_path, world["donor"], "")
    _report(f"sparse combinations of {SPARSITY} shared tokens", scores, capsys)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        cos, rel = scores["omp"][name]
        assert cos > 0.9999 and rel < 1e-3, (name, cos, rel)
        for method in ("subword", "mean", "landmark_pca", "common_interpolation"):
            assert scores[method][name][1] > 0.5, (method, name, scores[method][name])


def test_omp_also_recovers_mean_of_pieces_rows(world, tmp_path, capsys):
    """True rows: the mean of the token's subword pieces. The subword baseline is exact by
    construction; OMP (k = 8 >= the most pieces of any token) recovers the same rows."""
    assert world["max_pieces"] <= 8
    scores = _scores(world, tmp_path, world["pieces_donor"], "pieces:")
    _report("mean of subword pieces", scores, capsys)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert scores["subword"][name][1] < 1e-6
        cos, rel = scores["omp"][name]
        assert cos > 0.9999 and rel < 1e-3, (name, cos, rel)
        assert scores["mean"][name][1] > 0.5


def test_tied_model_stays_tied(world, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    ok(world["tied"], world["donor"], out, "--k", "8")
    sd = read_model(out)
    assert "lm_head.weight" not in sd
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    # the tied matrix is approximated from the donor's input embeddings
    cos, rel = _errors(world, out, "model.embed_tokens.weight", "tied:model.embed_tokens.weight")
    assert rel < 1e-3


def test_subword_needs_only_the_donors_tokenizer(world, tmp_path):
    tok_only = world["root"] / "tok_donor"
    out = tmp_path / "out"
    ok(world["model"], tok_only, out, "-a", "subword")
    sd, before = read_model(out), read_model(world["model"])
    # a new token's row is the mean of its pieces' rows in the model
    mtok, dtok = world["mtok"], world["dtok"]
    j = world["new_ids"][-1]
    text = dtok.convert_tokens_to_string([dtok.convert_ids_to_tokens(j)])
    pieces = mtok.encode(text, add_special_tokens=False)
    assert len(pieces) >= 2
    want = before["model.embed_tokens.weight"][pieces].mean(0)
    torch.testing.assert_close(sd["model.embed_tokens.weight"][j], want, rtol=0, atol=1e-6)


def test_byte_match_reuses_rows_across_tokenizer_families(world, tmp_path):
    """A SentencePiece-style donor (▁ for spaces) shares almost no spelling with a byte-level BPE
    (Ġ for spaces), but many tokens stand for the same bytes: --byte-match keeps their rows."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<s>", "</s>", "<pad>"])
    tok.train_from_iterator(LINES, trainer)
    sp_dir = tmp_path / "sp"
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>").save_pretrained(sp_dir)

    plain, matched = tmp_path / "plain", tmp_path / "bytes"
    ok(world["model"], sp_dir, plain, "-a", "zero")
    ok(world["model"], sp_dir, matched, "-a", "zero", "--byte-match")
    before = read_model(world["model"])["model.embed_tokens.weight"]
    p, m = read_model(plain)["model.embed_tokens.weight"], read_model(matched)["model.embed_tokens.weight"]
    sp_vocab = json.loads((sp_dir / "tokenizer.json").read_text())["model"]["vocab"]
    mvocab = world["mtok"].get_vocab()
    # the expected matches, through transformers' own decoding of the model's tokens
    model_text = {}
    for t, i in sorted(mvocab.items(), key=lambda kv: kv[1]):
        text = world["mtok"].convert_tokens_to_string([t])
        if "\ufffd" not in text:
            model_text.setdefault(text, i)
    by_bytes = 0
    for t, j in sp_vocab.items():
        if t in mvocab:  # the same spelling: kept either way
            assert torch.equal(p[j], before[mvocab[t]]) and torch.equal(m[j], before[mvocab[t]])
        elif t.replace("\u2581", " ") in model_text:  # SentencePiece's "▁is" is byte-level's "Ġis"
            assert torch.equal(m[j], before[model_text[t.replace("\u2581", " ")]]), t
            assert torch.equal(p[j], torch.zeros(32))
            by_bytes += 1
        else:
            assert torch.equal(m[j], torch.zeros(32)), t
    assert by_bytes >= 8


@pytest.mark.parametrize("case", ["missing_model", "donor_without_tokenizer", "stb", "omp_without_donor_weights", "prefix"])
def test_bad_input_fails_cleanly(world, tmp_path, case):
    out = tmp_path / "out"
    model, donor, extra = world["model"], world["donor"], []
    if case == "missing_model":
        model, expected = tmp_path / "nowhere", "directory not found"
    elif case == "donor_without_tokenizer":
        donor = tmp_path / "bare"
        shutil.copytree(world["donor"], donor)
        for f in donor.glob("tokenizer*"):
            f.unlink()
        expected = "tokenizer"
    elif case == "stb":
        extra, expected = ["-a", "stb"], "--approximation-method stb"
    elif case == "prefix":
        extra, expected = ["--prefix-match"], "--prefix-match"
    else:
        donor, expected = world["root"] / "tok_donor", "reads the donor's embeddings"
    result = run(model, donor, out, *extra)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


@pytest.mark.parametrize(
    "args",
    [
        ("-a", "zero"),
        ("-a", "randn"),
        ("-a", "john_hewitt"),
        ("-a", "common_interpolation", "--weight-scheme", "barycentric", "-c"),
        ("-a", "common_interpolation", "--barycentric"),
        ("-a", "subword", "--subword-method", "weighted_mean"),
        ("-a", "subword", "--subword-method", "first_last"),
        ("-a", "subword", "--subword-method", "sum"),
        ("--knn",),
    ],
)
def test_every_method_keeps_shared_rows_and_is_deterministic(world, tmp_path, args):
    a, b = tmp_path / "a", tmp_path / "b"
    ok(world["model"], world["donor"], a, *args)
    ok(world["model"], world["donor"], b, *args)
    before, sa, sb = read_model(world["model"]), read_model(a), read_model(b)
    j = torch.tensor([j for j, _ in world["shared"]])
    i = torch.tensor([i for _, i in world["shared"]])
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(sa[name][j], before[name][i])
        assert torch.isfinite(sa[name]).all()
        assert torch.equal(sa[name], sb[name])


def test_interpolation_weights_against_direct_computation():
    from merge_engine.tokensurgeon import interpolation

    gen = torch.Generator().manual_seed(0)
    atoms = torch.randn(40, 6, generator=gen, dtype=torch.float64)
    targets = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    idx, w = interpolation(targets, atoms, 4, "distance_proportional", False)
    dist = torch.cdist(targets, atoms)
    for r in range(5):
        near = dist[r].argsort()[:4]
        assert set(idx[r].tolist()) == set(near.tolist())
        inv = 1 / dist[r, idx[r]]
        torch.testing.assert_close(w[r], inv / inv.sum())
    # 12 neighbours in 6 dimensions: both fits are exact; barycentric weights sum to 1
    for scheme in ("least_squares", "barycentric"):
        idx, w = interpolation(targets, atoms, 12, scheme, False)
        recon = (w.unsqueeze(-1) * atoms[idx]).sum(1)
        torch.testing.assert_close(recon, targets, rtol=0, atol=1e-6)
    torch.testing.assert_close(w.sum(1), torch.ones(5, dtype=torch.float64))


@pytest.mark.slow
def test_transplant_then_merge(world, tmp_path):
    """Two models with different tokenizers: give one the other's, then merge them linearly."""
    import yaml
    from transformers import AutoModelForCausalLM

    from merge_engine.config import load_config
    from merge_engine.options import MergeOptions
    from merge_engine.streaming import run_merge

    moved = tmp_path / "moved"
    ok(world["model"], world["peer"], moved)
    recipe = tmp_path / "merge.yml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "linear",
        "models": [{"model": str(moved), "parameters": {"weight": 0.5}}, {"model": str(world["peer"]), "parameters": {"weight": 0.5}}],
        "dtype": "float32",
    }))
    config, text = load_config(recipe)
    out = tmp_path / "merged"
    run_merge(config, out, MergeOptions(quiet=True), config_text=text)
    merged, a, b = read_model(out), read_model(world["model"]), read_model(world["peer"])
    j = torch.tensor([j for j, _ in world["shared"]])
    i = torch.tensor([i for _, i in world["shared"]])
    name = "model.embed_tokens.weight"
    # a shared token's merged row averages the model's row for it (moved to the peer's id) and the peer's
    torch.testing.assert_close(merged[name][j], (a[name][i] + b[name][j]) / 2, rtol=0, atol=1e-6)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert model.config.vocab_size == len(world["dtok"])


def test_special_ids_follow_the_donor(world, tmp_path):
    donor = tmp_path / "donor"
    shutil.copytree(world["donor"], donor)
    cfg = json.loads((donor / "config.json").read_text())
    cfg["eos_token_id"] = 3  # the donor's <|sep|>
    (donor / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    ok(world["model"], donor, out, "-a", "zero")
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == 3
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 3


def test_tokenizer_tokens_beyond_the_embedding(tmp_path, caplog):
    """The donor's tokenizer has two tokens beyond its 259 embedding rows (tok_fixtures' base):
    the output has rows for them, approximated from their subword pieces; the model's two added
    tokens, unknown to the donor, are dropped."""
    from tok_fixtures import build_tokenizer_models

    models = build_tokenizer_models(tmp_path / "m")
    out = tmp_path / "out"
    with caplog.at_level("WARNING"):
        ok(models["ft_a"], models["base"], out)
    sd, before = read_model(out), read_model(models["ft_a"])
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert sd[name].shape[0] == 261 and before[name].shape[0] == 261
        assert torch.equal(sd[name][:259], before[name][:259])
        assert not torch.equal(sd[name][259:], before[name][259:])
    assert "no row in the donor's embeddings" in caplog.text
