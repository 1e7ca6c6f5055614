"""`kind: layer_path` (search_spaces.layer_path.LayerPathGenome): a frankenmerge genome that picks,
for each output position, a model and one of its layers (each input layer at most `max_repeats`
times) and optionally a scale, decoded to a `passthrough` recipe with `slices`.

Layout, decoding and the repeats bound need no model files. The merged numbers are checked on the
tiny llama models (fixture `llama_models`: base + fine-tunes a, b; float32, 4 layers): the
`mergekit-yaml` CLI's output, the resident executor's live model (as a search worker builds it)
and an independent per-tensor computation must agree bit for bit, and the output must load with
transformers. Re-pointing (the resident executor's zero-copy path for unscaled layers) is checked
against the streaming engine over a sequence of candidates, with its storage sharing counted byte
for byte; PS+DFS runs two real searches, the second over the first's final_model.
"""

from __future__ import annotations

import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from evolve.config import parse_search_config
from merge_engine.config import parse_config
from merge_engine.errors import ConfigError
from search_spaces.layer_path import LayerPathGenome

A, B, C = "/m/ft_a", "/m/ft_b", "/m/ft_c"
REPO = Path(__file__).resolve().parents[1]
_VENV_CLI = Path(sys.executable).parent / "mergekit-yaml"
MERGEKIT_YAML = str(_VENV_CLI if _VENV_CLI.exists() else REPO / ".venv" / "bin" / "mergekit-yaml")


def definition(**genome):
    genome.setdefault("models", [A, B])
    return parse_search_config({"genome": {"kind": "layer_path", **genome}, "tasks": ["t"]}).genome


def make(counts, **genome) -> LayerPathGenome:
    return LayerPathGenome(definition(**genome), counts)


def random_x(g, rng: random.Random, spill: float = 0.0) -> list[float]:
    """Uniform in the box, widened by `spill` of each width on both sides (clipping is tested too)."""
    return [rng.uniform(d.low - spill * (d.high - d.low), d.high + spill * (d.high - d.low)) for d in g.dimensions]


def genes(g, path) -> list[float]:
    """A genotype asking for [(model, layer, scale)] exactly (model gene at its bin's centre)."""
    x = []
    for m, layer, scale in path:
        if len(g.models) > 1:
            x.append(m + 0.5)
        x.append((layer + 0.5) / g.layer_counts[m])
        if g.scale_filters:
            x.append(scale)
    return x


def sources(cfg) -> list[tuple[str, tuple[int, int]]]:
    return [(str(s.sources[0].model), s.sources[0].layer_range) for s in cfg.slices]


# ----------------------------------------------------------------------------------------------
# layout and the starting point


@pytest.mark.parametrize("models,scale,per", [([A], False, 1), ([A], True, 2), ([A, B], False, 2),
                                              ([A, B, C], True, 3)])
def test_layout_per_position(models, scale, per):
    g = make([4] * len(models), models=models, scale=scale, scale_range=[0.25, 2.0])
    assert g.num_layers == 4 and g.per_position == per and g.size == 4 * per
    for i in range(4):
        dims = g.dimensions[i * per : (i + 1) * per]
        expected = []
        if len(models) > 1:
            expected.append((f"p{i}.model", 0.0, float(len(models)), 0.5))
        expected.append((f"p{i}.layer", 0.0, 1.0, (i + 0.5) / 4))
        if scale:
            expected.append((f"p{i}.scale", 0.25, 2.0, 1.0))
        assert [(d.name, d.low, d.high, d.initial) for d in dims] == expected


@pytest.mark.parametrize("scale", [False, True])
def test_identity_start_and_round_trip(scale):
    g = make([4, 6], scale=scale, dtype="float32")
    cfg = g.decode(g.initial())
    assert cfg.merge_method == "passthrough" and cfg.dtype == "float32" and cfg.models is None
    assert sources(cfg) == [(A, (0, 4))]  # model 0's layers in order: one slice
    params = cfg.slices[0].sources[0].parameters
    if scale:
        assert [(c.filter, c.value) for c in params["scale"]] == [("o_proj", 1.0), ("down_proj", 1.0), (None, 1.0)]
    else:
        assert params is None
    identity = parse_config({"merge_method": "passthrough", "dtype": "float32",
                             "slices": [{"sources": [{"model": A, "layer_range": [0, 4]}]}]})
    assert g.encode(identity) == g.initial()
    assert g.decode(g.encode(identity)).slices[0].sources[0].layer_range == (0, 4)
    assert g.decode(g.encode(cfg)) == cfg
    # the `models:` form of the identity encodes the same
    assert g.encode(parse_config({"merge_method": "passthrough", "models": [{"model": A}]})) == g.initial()


def test_more_output_layers_than_model_0_starts_evenly_spread():
    g = make([4, 4], num_layers=6)
    # position i takes layer floor((i + 0.5) / 6 * 4)
    assert [layer for _, layer, _ in g.path(g.initial())] == [0, 1, 1, 2, 3, 3]
    assert sources(g.decode(g.initial())) == [(A, (0, 2)), (A, (1, 4)), (A, (3, 4))]


# ----------------------------------------------------------------------------------------------
# decoding


def test_decode_merges_exact_runs_only():
    g = make([4, 4], num_layers=7, scale=True)
    path = [(0, 0, 1.0), (0, 1, 1.0), (1, 2, 1.0), (1, 3, 1.0), (1, 3, 1.0), (0, 2, 0.7), (0, 3, 0.8)]
    x = genes(g, path)
    assert g.path(x) == path
    cfg = g.decode(x)
    assert sources(cfg) == [(A, (0, 2)), (B, (2, 4)), (B, (3, 4)), (A, (2, 3)), (A, (3, 4))]
    scales = [s.sources[0].parameters["scale"][0].value for s in cfg.slices]
    assert scales == [1.0, 1.0, 1.0, 0.7, 0.8]
    assert g.encode(cfg) == pytest.approx(x, abs=1e-12) and g.decode(g.encode(cfg)) == cfg
    # the decoded recipe is plain mergekit YAML
    import yaml

    assert parse_config(yaml.safe_load(cfg.to_yaml())) == cfg


def test_relative_depth_maps_onto_each_models_layer_count():
    g = make([4, 8], num_layers=2)
    # depth 0.6: layer 2 of a 4-layer model, layer 4 of an 8-layer one; depth 1.0 is the last layer
    assert g.path([0.5, 0.6, 1.5, 0.6]) == [(0, 2, 1.0), (1, 4, 1.0)]
    assert g.path([0.5, 1.0, 2.0, 1.0]) == [(0, 3, 1.0), (1, 7, 1.0)]


def test_used_up_layers_go_to_the_nearest_free_one_deterministically():
    g = make([4], models=[A], max_repeats=2)
    assert [layer for _, layer, _ in g.path([0.3] * 4)] == [1, 1, 0, 0]  # the shallower of 0 and 2 first
    assert [layer for _, layer, _ in g.path([0.3, 0.3, 0.0, 0.3])] == [1, 1, 0, 0]
    g = make([4], models=[A], max_repeats=1)
    assert [layer for _, layer, _ in g.path([0.9] * 4)] == [3, 2, 1, 0]
    # a model with no free layer left: the next model, at the same relative depth
    g = make([2, 4], max_repeats=1, num_layers=4)
    assert [(m, layer) for m, layer, _ in g.path([0.5, 0.9] * 4)] == [(0, 1), (0, 0), (1, 3), (1, 2)]
    g = make([2, 4, 4], models=[A, B, C], max_repeats=1, num_layers=6)
    x = [1.5, 0.1] * 6  # all ask for B's layer 0
    assert [(m, layer) for m, layer, _ in g.path(x)] == [(1, 0), (1, 1), (1, 2), (1, 3), (2, 0), (2, 1)]


@pytest.mark.parametrize("counts,repeats,num_layers,scale", [
    ([4], 1, None, False), ([4], 2, 8, True), ([4, 4], 2, None, False), ([3, 5], 1, 8, True),
    ([4, 4, 4], 2, 20, False), ([6, 2], 3, 12, True),
])
def test_repeats_bound_holds_for_random_genotypes(counts, repeats, num_layers, scale):
    models = [A, B, C][: len(counts)]
    g = make(counts, models=models, max_repeats=repeats, num_layers=num_layers, scale=scale)
    n = num_layers or counts[0]
    rng = random.Random(sum(counts) * 100 + repeats)
    for trial in range(300):
        x = random_x(g, rng, spill=0.1 if trial % 2 else 0.0)
        path = g.path(g._check(x))
        assert len(path) == n
        used = Counter((m, layer) for m, layer, _ in path)
        assert max(used.values()) <= repeats
        assert all(0 <= layer < counts[m] for m, layer, _ in path)
        cfg = g.decode(x)
        assert g.decode(x) == cfg  # deterministic
        # the slices spell out the path exactly, and no two neighbouring slices could be one
        spelled = [(models.index(str(s.sources[0].model)), layer) for s in cfg.slices
                   for layer in range(*s.sources[0].layer_range)]
        assert spelled == [(m, layer) for m, layer, _ in path]
        for s1, s2 in zip(cfg.slices, cfg.slices[1:]):
            a, b = s1.sources[0], s2.sources[0]
            assert not (a.model == b.model and a.layer_range[1] == b.layer_range[0] and a.parameters == b.parameters)
        assert g.decode(g.encode(cfg)) == cfg


# ----------------------------------------------------------------------------------------------
# configuration errors


@pytest.mark.parametrize("genome,words", [
    (dict(merge_method="linear"), ["merge_method", "layer_path"]),
    (dict(base_model=A), ["base_model", "layer_path"]),
    (dict(layer_granularity=2), ["layer_granularity"]),
    (dict(model_switch=True), ["model_switch"]),
    (dict(scale_range=[1.2, 2.0]), ["scale_range", "contain 1"]),
    (dict(scale_range=[-1, 2.0]), ["scale_range"]),
    (dict(max_repeats=0), ["genome.max_repeats"]),
    (dict(num_layers=0), ["genome.num_layers"]),
    (dict(scale_filters=[]), ["genome.scale_filters"]),
    (dict(models=[A, A]), ["twice"]),
    (dict(kind="data_flow"), ["genome.kind"]),
])
def test_config_errors_name_the_key(genome, words):
    with pytest.raises(ConfigError) as info:
        definition(**genome)
    msg = str(info.value)
    assert msg.startswith("search.yml: genome"), msg
    for w in words:
        assert w in msg, msg


def test_too_many_output_layers_for_the_repeats_bound():
    with pytest.raises(ConfigError, match=r"genome.num_layers: 9 output layers.*at most 8"):
        make([4], models=[A], num_layers=9, max_repeats=2)
    assert make([4], models=[A], num_layers=8, max_repeats=2).size == 8


def test_build_genome_and_dry_run(llama_models, tmp_path):
    from evolve.build import build_genome
    from evolve.dry_run import dry_run_report

    config = parse_search_config({"genome": {"kind": "layer_path", "models": [str(llama_models["a"]), str(llama_models["b"])],
                                             "num_layers": 6, "scale": True}, "tasks": ["t"]})
    g = build_genome(config)
    assert isinstance(g, LayerPathGenome) and g.layer_counts == [4, 4] and g.size == 18
    report = dry_run_report(config)
    assert "genome: 18 dimensions (6 output position(s) x 3 gene(s)); layer path, passthrough" in report
    assert "layer-path position genes: 6 position(s) x 3" in report
    assert "scale in [0.5, 1.5] of o_proj, down_proj" in report
    assert "ft_a (4 layers), ft_b (4 layers)" in report and "at most 2 time(s)" in report
    assert "starting point: the identity path of ft_a (its layers spread evenly, scale 1)" in report


# ----------------------------------------------------------------------------------------------
# the merged numbers (tiny llama models)

LAYER_PARTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")


def expected_tensors(path, inputs: list[dict], scaled=("o_proj", "down_proj")) -> dict[str, torch.Tensor]:
    """Output layer i = the chosen source layer's tensors, `o_proj` and `down_proj` times the
    position's scale; embeddings from the first position's model, norm and head from the last's."""
    out = {}
    for i, (m, layer, scale) in enumerate(path):
        for part in LAYER_PARTS:
            src = inputs[m][f"model.layers.{layer}.{part}.weight"]
            out[f"model.layers.{i}.{part}.weight"] = src * scale if any(f in part for f in scaled) else src
    out["model.embed_tokens.weight"] = inputs[path[0][0]]["model.embed_tokens.weight"]
    for name in ("model.norm.weight", "lm_head.weight"):
        out[name] = inputs[path[-1][0]][name]
    return out


@pytest.mark.slow
def test_layer_path_merge_cli_resident_and_independent_agree(llama_models, tmp_path):
    from transformers import AutoModelForCausalLM

    from helpers import read_model
    from merge_engine.options import MergeOptions
    from merge_engine.resident import ResidentMerger

    order = ("b", "a", "base")
    paths = [str(llama_models[k]) for k in order]
    g = LayerPathGenome(definition(models=paths, num_layers=6, scale=True, scale_range=[0.5, 1.5], dtype="float32"),
                        [4, 4, 4])
    path = [(1, 0, 1.0), (1, 1, 1.0), (0, 1, 0.75), (0, 1, 1.25), (2, 3, 0.5), (1, 3, 1.5)]
    x = genes(g, path)
    cfg = g.decode(x)
    assert g.path(g._check(x)) == path
    assert sources(cfg) == [(paths[1], (0, 2)), (paths[0], (1, 2)), (paths[0], (1, 2)), (paths[2], (3, 4)),
                            (paths[1], (3, 4))]
    recipe = tmp_path / "path.yml"
    recipe.write_text(cfg.to_yaml())
    out = tmp_path / "out"
    proc = subprocess.run([MERGEKIT_YAML, str(recipe), str(out), "--quiet"], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    written = read_model(out)

    inputs = [read_model(p) for p in paths]
    expected = expected_tensors(path, inputs)
    assert set(written) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(written[name], tensor), name

    # a search worker: a live model built from the starting point, then the candidate applied
    template = g.decode(g.initial())
    merger = ResidentMerger(template, MergeOptions(quiet=True))
    try:
        live = merger.build_model(template, dtype=torch.float32)
        merger.apply(template)
        assert torch.equal(live.state_dict()["model.layers.5.mlp.up_proj.weight"],
                           inputs[0]["model.layers.3.mlp.up_proj.weight"])  # identity: 6 layers spread over b's 4
        stats = merger.apply(cfg, check_finite=True)
        state = live.state_dict()
        for name, tensor in written.items():
            assert torch.equal(state[name], tensor), name
        # a second candidate recomputes only the positions that changed
        path2 = list(path)
        path2[4] = (2, 2, 0.5)
        stats = merger.apply(g.decode(genes(g, path2)))
        assert sorted(stats.changed) == sorted(f"model.layers.4.{p}.weight" for p in LAYER_PARTS)
        assert torch.equal(live.state_dict()["model.layers.4.mlp.down_proj.weight"],
                           inputs[2]["model.layers.2.mlp.down_proj.weight"] * 0.5)
        live_logits = None
        merger.apply(cfg)
        ids = torch.tensor([[5, 17, 42, 3, 9, 60]])
        with torch.no_grad():
            live_logits = live(ids).logits
    finally:
        merger.close()

    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert loaded.config.num_hidden_layers == 6 and len(loaded.model.layers) == 6
    with torch.no_grad():
        logits = loaded(ids).logits
    assert torch.equal(logits, live_logits)
    # and it is a different model from any input
    assert not torch.allclose(logits, AutoModelForCausalLM.from_pretrained(paths[0], dtype=torch.float32)(ids).logits[:, :, :])


# ----------------------------------------------------------------------------------------------
# end to end: mergekit-evolve with the new genomes (real Ray workers, lm-eval tasks, SQLite study)


@pytest.mark.ray
@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("genome", ["layer_path", "method_list"])
def test_search_with_the_new_genomes(quickstart, tmp_path, genome):
    import yaml
    from transformers import AutoConfig

    from test_search import run_evolve, search_yaml, trials

    cfg = search_yaml(quickstart, tmp_path / "search.yml", budget=6, popsize=4)
    data = yaml.safe_load(cfg.read_text())
    m = quickstart["models"]
    if genome == "layer_path":
        data["genome"] = {"kind": "layer_path", "models": [str(m["expert_arithmetic"]), str(m["expert_facts"])],
                          "num_layers": 5, "scale": True, "dtype": "float32"}
    else:
        data["genome"].update(merge_method=["task_arithmetic", "ties"], model_switch=True)
    cfg.write_text(yaml.safe_dump(data))
    storage = tmp_path / "run"
    proc = run_evolve(cfg, storage, quickstart["tasks"], "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = trials(storage)
    assert len(rows) == 6 and all(r["state"] == "COMPLETE" for r in rows)
    assert len({r["recipe_hash"] for r in rows}) == 6  # six different recipes really merged and scored
    recipe = yaml.safe_load((storage / "best_config.yaml").read_text())
    final = storage / "final_model"
    if genome == "layer_path":
        assert recipe["merge_method"] == "passthrough"
        assert sum(s["sources"][0]["layer_range"][1] - s["sources"][0]["layer_range"][0] for s in recipe["slices"]) == 5
        assert AutoConfig.from_pretrained(final).num_hidden_layers == 5
    else:
        assert recipe["merge_method"] in ("task_arithmetic", "ties")
        assert AutoConfig.from_pretrained(final).num_hidden_layers == 4
    assert (final / "model.safetensors").is_file()


# ----------------------------------------------------------------------------------------------
# re-pointing: a layer taken unscaled is the resident input itself, not a copy


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (what they really hold in memory)."""
    seen = {}
    for t in tensors:
        if t.numel():
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _streamed(cfg, out: Path) -> dict[str, torch.Tensor]:
    from helpers import read_model
    from merge_engine.options import MergeOptions
    from merge_engine.streaming import run_merge

    run_merge(cfg, out, MergeOptions(quiet=True))
    return read_model(out)


def test_repointed_layers_share_the_inputs_and_are_never_written_into(llama_models, tmp_path):
    """Candidates re-pointed, then scaled (the same positions), then re-pointed again: after each,
    the live model equals the streaming engine's output bit for bit, and no resident input (nor
    the checkpoints) changed. Re-pointed parameters ARE the inputs (same storage, repeated layers
    share one), so the model plus the inputs hold no bytes for them."""
    from helpers import read_model
    from merge_engine.options import MergeOptions
    from merge_engine.resident import ResidentMerger

    paths = [str(llama_models[k]) for k in ("b", "a")]
    g = LayerPathGenome(definition(models=paths, num_layers=6, scale=True, dtype="float32"), [4, 4])
    on_disk = [read_model(p) for p in paths]
    repeated = [(0, 0, 1.0), (0, 1, 1.0), (1, 1, 1.0), (1, 1, 1.0), (0, 3, 1.0), (0, 3, 1.0)]
    scaled = [(0, 0, 1.0), (0, 1, 0.75), (1, 1, 1.25), (1, 1, 1.0), (0, 3, 0.5), (1, 2, 1.0)]
    template = g.decode(g.initial())
    merger = ResidentMerger(template, MergeOptions(quiet=True))
    try:
        live = merger.build_model(template, dtype=torch.float32)
        merger.apply(template)
        params = dict(live.named_parameters())
        for step, path in enumerate([repeated, scaled, repeated]):
            cfg = g.decode(genes(g, path))
            merger.apply(cfg, check_finite=True)
            streamed = _streamed(cfg, tmp_path / f"out{step}")
            state = live.state_dict()
            assert set(streamed) == set(state)
            for name, tensor in streamed.items():
                assert torch.equal(state[name], tensor), (step, name)
            # the inputs the merger holds are still the checkpoints' tensors
            for (model, tensor_name, *_), held in merger._inputs.items():
                assert torch.equal(held, on_disk[paths.index(str(model))][tensor_name]), (step, tensor_name)
            held_ptrs = {t.data_ptr(): key for key, t in merger._inputs.items()}
            for i, (m, layer, scale) in enumerate(path):
                for part in LAYER_PARTS:
                    name = f"model.layers.{i}.{part}.weight"
                    is_input = held_ptrs.get(params[name].data_ptr())
                    if scale == 1.0 or not any(f in part for f in ("o_proj", "down_proj")):
                        assert is_input is not None, (step, name)
                        assert (str(is_input[0]), is_input[1]) == (paths[m], f"model.layers.{layer}.{part}.weight"), (step, name)
                        assert name in merger.repointed
                    else:
                        assert is_input is None and name not in merger.repointed, (step, name)
            if path is repeated:
                # positions 2 and 3 (and 4 and 5) are one input layer: one storage
                assert params["model.layers.2.mlp.up_proj.weight"].data_ptr() == params["model.layers.3.mlp.up_proj.weight"].data_ptr()
                assert params["model.layers.4.mlp.down_proj.weight"].data_ptr() == params["model.layers.5.mlp.down_proj.weight"].data_ptr()
                # every tensor of the model is an input here: the model costs nothing beyond them
                everything = list(live.parameters()) + list(merger._inputs.values())
                assert _storage_bytes(everything) == _storage_bytes(merger._inputs.values())
                assert len(merger.repointed) == len(params)
            else:
                own = [p for n, p in params.items() if n not in merger.repointed]
                assert len(own) == 3 * 2  # o_proj, down_proj at the three positions scaled != 1
                everything = list(live.parameters()) + list(merger._inputs.values())
                assert _storage_bytes(everything) == _storage_bytes(merger._inputs.values()) + sum(
                    p.numel() * p.element_size() for p in own)
        ids = torch.tensor([[5, 17, 42, 3, 9, 60]])
        with torch.no_grad():
            live_logits = live(ids).logits
    finally:
        merger.close()
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out2", dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, live_logits)


def test_copy_instead_of_repointing_when_dtype_differs_or_disabled(llama_models, tmp_path):
    """A float32 recipe in a bfloat16 model, and `repoint = False`: every tensor is copied into a
    buffer of the model's own, with the same values as before re-pointing existed."""
    from merge_engine.options import MergeOptions
    from merge_engine.resident import ResidentMerger

    paths = [str(llama_models[k]) for k in ("a", "b")]
    g = LayerPathGenome(definition(models=paths, num_layers=5, dtype="float32"), [4, 4])
    cfg = g.decode(genes(g, [(0, 0, 1.0), (1, 1, 1.0), (1, 1, 1.0), (0, 2, 1.0), (1, 3, 1.0)]))
    streamed = _streamed(cfg, tmp_path / "out")
    for dtype, repoint in ((torch.bfloat16, True), (torch.float32, False)):
        merger = ResidentMerger(cfg, MergeOptions(quiet=True))
        merger.repoint = repoint
        try:
            live = merger.build_model(cfg, dtype=dtype)
            merger.apply(cfg)
            held = {t.untyped_storage().data_ptr() for t in merger._inputs.values()}
            assert not merger.repointed
            assert not any(p.untyped_storage().data_ptr() in held for p in live.parameters())
            state = live.state_dict()
            for name, tensor in streamed.items():
                assert torch.equal(state[name], tensor.to(dtype)), name
        finally:
            merger.close()


@pytest.mark.slow
def test_repointing_a_tied_embedding_moves_the_head_with_it(tmp_path):
    """Tied embeddings (one Parameter for the embedding and the head): re-pointing the embedding
    re-points the head too, and the live model's logits equal the merged checkpoint's."""
    from helpers import make_model, tiny_config
    from merge_engine.options import MergeOptions
    from merge_engine.resident import ResidentMerger
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("llama", tie_word_embeddings=True)
    base = make_model(tmp_path / "base", cfg, seed=0)
    ft = make_model(tmp_path / "ft", cfg, seed=1, base=base)
    paths = [str(ft), str(base)]
    g = LayerPathGenome(definition(models=paths, num_layers=5, scale=True, dtype="float32"), [4, 4])
    merger = ResidentMerger(g.decode(g.initial()), MergeOptions(quiet=True))
    try:
        live = merger.build_model(g.decode(g.initial()), dtype=torch.float32)
        assert live.lm_head.weight is live.model.embed_tokens.weight
        ids = torch.tensor([[5, 17, 42, 3, 9, 60]])
        for step, path in enumerate([[(1, 0, 1.0), (0, 1, 1.0), (0, 1, 1.0), (1, 2, 1.0), (0, 3, 1.0)],
                                     [(0, 0, 1.0), (0, 1, 0.5), (0, 1, 1.0), (1, 2, 1.5), (1, 3, 1.0)]]):
            recipe = g.decode(genes(g, path))
            merger.apply(recipe)
            assert live.lm_head.weight is live.model.embed_tokens.weight
            assert "model.embed_tokens.weight" in merger.repointed
            out = tmp_path / f"out{step}"
            _streamed(recipe, out)
            with torch.no_grad():
                expected = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(ids).logits
                assert torch.equal(live(ids).logits, expected), step
    finally:
        merger.close()


# ----------------------------------------------------------------------------------------------
# PS + DFS: a finished parameter-space search's final_model as a layer source


@pytest.mark.ray
@pytest.mark.e2e
@pytest.mark.slow
def test_layer_path_over_a_finished_parameter_space_search(quickstart, tmp_path):
    """Stage 1, a parameter-space search, exports DIR/final_model; stage 2, a layer-path search,
    lists that folder first among its models. Its starting point (the identity path of model 0) is
    the stage-1 model itself, so its first candidate scores exactly stage 1's best; its exported
    recipe names the folder and merges with mergekit-yaml. Pointing at the experiment directory,
    or at a final_model that was never exported, is a one-line error naming the key."""
    import yaml

    from evolve.build import build_genome
    from test_search import run_evolve, search_yaml, trials

    m = quickstart["models"]
    ps_cfg = search_yaml(quickstart, tmp_path / "ps.yml", budget=4, popsize=4)
    ps = tmp_path / "ps"
    proc = run_evolve(ps_cfg, ps, quickstart["tasks"], "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ps_best = max(r["value"] for r in trials(ps))

    data = yaml.safe_load(ps_cfg.read_text())
    data["genome"] = {"kind": "layer_path", "models": [str(ps / "final_model"), str(m["expert_arithmetic"]),
                                                       str(m["expert_facts"])], "dtype": "float32"}
    data["optimizer"] = {"name": "tpe", "seed": 1}
    cfg = tmp_path / "dfs.yml"
    cfg.write_text(yaml.safe_dump(data))

    # the two mistakes: the experiment folder itself, and a search that has not exported yet
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "manifest.json").write_text("{}")
    for ref, words in ((ps, ["genome.models[0]", "experiment directory", str(ps / "final_model")]),
                       (unfinished / "final_model", ["genome.models[0]", "has not exported", "--resume"])):
        bad = dict(data, genome=dict(data["genome"], models=[str(ref)] + data["genome"]["models"][1:]))
        with pytest.raises(ConfigError) as info:
            build_genome(parse_search_config(bad))
        assert all(w in str(info.value) for w in words) and "\n" not in str(info.value), str(info.value)
        (tmp_path / "bad.yml").write_text(yaml.safe_dump(bad))
        proc = run_evolve(tmp_path / "bad.yml", tmp_path / "bad-run", quickstart["tasks"], "--quiet")
        assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
        assert words[1] in proc.stderr and not (tmp_path / "bad-run").exists()

    dfs = tmp_path / "dfs"
    proc = run_evolve(cfg, dfs, quickstart["tasks"], "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = trials(dfs)
    assert len(rows) == 4 and rows[0]["generation"] == -1
    assert rows[0]["value"] == ps_best  # the identity path over the stage-1 model is that model
    recipe = yaml.safe_load((dfs / "best_config.yaml").read_text())
    assert recipe["merge_method"] == "passthrough"
    named = {s["sources"][0]["model"] for s in recipe["slices"]}
    assert named <= {str(ps / "final_model"), str(m["expert_arithmetic"]), str(m["expert_facts"])}
    out = tmp_path / "again"
    (tmp_path / "best.yml").write_text(yaml.safe_dump(recipe))
    proc = subprocess.run([MERGEKIT_YAML, str(tmp_path / "best.yml"), str(out), "--quiet"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    from helpers import read_model

    again, exported = read_model(out), read_model(dfs / "final_model")
    assert set(again) == set(exported) and all(torch.equal(again[k], exported[k]) for k in again)


def test_a_non_finite_input_fails_the_repointed_candidate(llama_models, tmp_path):
    """check_finite (what a search worker passes) also covers re-pointed tensors: the candidate
    fails naming the tensor, and the live model keeps what it had."""
    from safetensors.torch import load_file, save_file

    from merge_engine.errors import ModelError
    from merge_engine.options import MergeOptions
    from merge_engine.resident import ResidentMerger

    bad = tmp_path / "bad"
    subprocess.run(["cp", "-r", str(llama_models["b"]), str(bad)], check=True)
    tensors = load_file(bad / "model.safetensors")
    tensors["model.layers.2.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    paths = [str(llama_models["a"]), str(bad)]
    g = LayerPathGenome(definition(models=paths, dtype="float32"), [4, 4])
    merger = ResidentMerger(g.decode(g.initial()), MergeOptions(quiet=True))
    try:
        live = merger.build_model(g.decode(g.initial()), dtype=torch.float32)
        merger.apply(g.decode(g.initial()), check_finite=True)
        before = live.state_dict()["model.layers.1.mlp.up_proj.weight"].clone()
        with pytest.raises(ModelError, match=r"model\.layers\.1\.mlp\.up_proj\.weight has non-finite"):
            merger.apply(g.decode(genes(g, [(0, 0, 1.0), (1, 2, 1.0), (0, 2, 1.0), (0, 3, 1.0)])), check_finite=True)
        assert torch.equal(live.state_dict()["model.layers.1.mlp.up_proj.weight"], before)
        assert torch.isfinite(live.state_dict()["model.layers.1.mlp.up_proj.weight"]).all()
    finally:
        merger.close()
