"""Building a mixture of experts from dense models (docs/mergekit-reference.md §6): router vectors, the output
config, and the tensors in the transformers 5 layout (fused `experts.gate_up_proj` [E, 2I, H] and
`experts.down_proj` [E, H, I]), streamed one output tensor at a time into the sharded writer."""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Optional

import torch

from .. import __version__
from ..card import card_header, render_model
from ..threads import set_num_threads
from ..errors import ModelError
from ..io import OutputTensorSpec, atomic_model_output, copy_files, torch_dtype
from ..methods.common import tensor_seed
from ..options import MergeOptions
from ..sources import TOKENIZER_FILES, InputModel, close_models, open_models
from ..tokenizer import load_tokenizer
from .config import ARCH_CLASSES, RANDOM_GATES, Expert, MoEConfig, choose_architecture, validate

log = logging.getLogger(__name__)

_MLP = re.compile(r"^model\.layers\.(\d+)\.mlp\.(.+)$")
_PROJ = ("gate_proj", "up_proj", "down_proj")


def dense_mlp_name(layer: int, proj: str) -> str:
    return f"model.layers.{layer}.mlp.{proj}.weight"


# ----------------------------------------------------------------------------------------------
# Inputs


def _check_inputs(config: MoEConfig, models: dict, source: str) -> None:
    """Every expert must fit the base's MLP shapes and layer count."""
    base = models[config.base_model]
    keys = ("hidden_size", "num_hidden_layers", "intermediate_size")
    for ref, m in models.items():
        if ref == config.base_model:
            continue
        for key in keys:
            if m.config.get(key) != base.config.get(key):
                raise ModelError(
                    f"{source}: model {ref} has {key} {m.config.get(key)}, the base {config.base_model} has "
                    f"{base.config.get(key)}; experts must match the base"
                )
    layers = base.config.get("num_hidden_layers")
    if not isinstance(layers, int):
        raise ModelError(f"model {config.base_model}: config.json has no num_hidden_layers")
    H, I = base.config["hidden_size"], base.config["intermediate_size"]
    want = {"gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}
    for e in config.experts + (config.shared_experts or []):
        ckpt = models[e.source_model].checkpoint
        for i in range(layers):
            for proj, shape in want.items():
                name = dense_mlp_name(i, proj)
                if name not in ckpt:
                    raise ModelError(f"model {e.source_model}: tensor {name} not found (experts need a dense gated MLP)")
                if tuple(ckpt.tensors[name].shape) != shape:
                    raise ModelError(f"model {e.source_model}: tensor {name} has shape {list(ckpt.tensors[name].shape)}, expected {list(shape)}")


# ----------------------------------------------------------------------------------------------
# Router vectors


def _prompt_ids(tok, prompts: list[str], label: str) -> list[list[int]]:
    bos = tok.bos_token_id
    out = []
    for p in prompts:
        ids = ([bos] if bos is not None else []) + tok.encode(p, add_special_tokens=False)
        if not ids:
            raise ModelError(f"model {label}: prompt {p!r} tokenises to nothing")
        out.append(ids)
    return out


def _pad_left(batch: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(x) for x in batch)
    ids = torch.tensor([[pad] * (width - len(x)) + x for x in batch])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch])
    return ids, mask


def _normalize(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-8)


class _HiddenStates:
    """The hidden state entering each layer (output_hidden_states 0..L-1) of the base model."""

    def __init__(self, base: InputModel, device: str, mode: str, batch_size: int = 8):
        from transformers import AutoModelForCausalLM

        self.device = torch.device(device)
        dtype = torch.float32 if self.device.type == "cpu" else torch.bfloat16
        try:
            self.model = AutoModelForCausalLM.from_pretrained(
                str(base.directory), dtype=dtype, local_files_only=True, trust_remote_code=False
            ).to(self.device).eval()
        except Exception as err:  # transformers raises many types for a model it cannot load
            raise ModelError(f"model {base.ref}: cannot load it to compute hidden-state routers: {err}") from None
        self.layers = base.config["num_hidden_layers"]
        self.mode = mode
        self.batch_size = batch_size

    @torch.no_grad()
    def mean(self, ids: list[list[int]], pad: int) -> torch.Tensor:
        total = None
        for start in range(0, len(ids), self.batch_size):
            x, mask = _pad_left(ids[start : start + self.batch_size], pad)
            x, mask = x.to(self.device), mask.to(self.device)
            # positions count real tokens only, so a left-padded prompt sees what it would alone
            pos = (mask.cumsum(-1) - 1).clamp_min(0)
            out = self.model(input_ids=x, attention_mask=mask, position_ids=pos, output_hidden_states=True)
            hs = torch.stack(out.hidden_states[: self.layers]).float()  # [L, B, T, H]
            if self.mode == "hidden_avg":
                m = mask[None, :, :, None].float()
                v = (hs * m).sum(2) / m.sum(2)
            else:
                v = hs[:, :, -1, :]
            s = v.sum(1).cpu()
            total = s if total is None else total + s
        return total / len(ids)


def router_vectors(config: MoEConfig, base: InputModel, rows: list[Expert], options: MergeOptions) -> torch.Tensor:
    """G[layer, row, hidden] in float32 (docs/mergekit-reference.md §6)."""
    L, H = base.config["num_hidden_layers"], base.config["hidden_size"]
    mode = config.gate_mode
    if mode in RANDOM_GATES:
        gen = torch.Generator().manual_seed(options.random_seed)
        if mode == "random":
            return torch.randn(L, len(rows), H, generator=gen)
        return (torch.rand(L, len(rows), H, generator=gen) * 2 - 1) / math.sqrt(H)
    tok = load_tokenizer(base.directory, str(base.ref), required=True)
    pad = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if pad is None:
        pad = 0  # masked out anyway
    if mode == "cheap_embed":
        name = base.checkpoint.find(["model.embed_tokens.weight"])
        if name is None:
            raise ModelError(f"model {base.ref}: no model.embed_tokens.weight for cheap_embed routers")
        embed = base.checkpoint.read(name).float()

        def vector(prompts: list[str]) -> torch.Tensor:
            ids = torch.tensor([t for p in _prompt_ids(tok, prompts, str(base.ref)) for t in p])
            return _normalize(embed[ids].sum(0)).expand(L, H)

    else:
        hidden = _HiddenStates(base, options.resolved_device(), mode)

        def vector(prompts: list[str]) -> torch.Tensor:
            return hidden.mean(_prompt_ids(tok, prompts, str(base.ref)), pad)

    out = []
    for e in rows:
        v = vector(e.positive_prompts)
        if e.negative_prompts:
            v = v - vector(e.negative_prompts)
        out.append(_normalize(v))
    G = torch.stack(out, dim=1).contiguous()
    if len(rows) > 1:
        cond = torch.linalg.cond(G.double())
        bad = int((cond > 5).sum())
        if bad:
            log.warning("degenerate routing: the router rows of %d of %d layers are nearly dependent "
                        "(condition number > 5); make the experts' prompts more distinct", bad, L)
    return G


# ----------------------------------------------------------------------------------------------
# Output config


def output_config(arch: str, base_config: dict, n_experts: int, k: int, dtype_name: str):
    import transformers as T

    cls = {"mixtral": T.MixtralConfig, "qwen2_moe": T.Qwen2MoeConfig, "qwen3_moe": T.Qwen3MoeConfig}[arch]
    known = set(cls().to_dict())
    skip = {"model_type", "architectures", "transformers_version", "dtype", "torch_dtype", "_name_or_path", "layer_types"}
    fields = {key: v for key, v in base_config.items() if key in known and key not in skip}
    I = base_config["intermediate_size"]
    fields.update(sliding_window=None, num_experts_per_tok=k)
    if arch == "mixtral":
        fields.update(num_local_experts=n_experts)
    else:
        fields.update(
            num_experts=n_experts, decoder_sparse_step=1, norm_topk_prob=True, moe_intermediate_size=I,
            intermediate_size=I, mlp_only_layers=[], use_sliding_window=False,
        )
        if arch == "qwen2_moe":
            fields.update(shared_expert_intermediate_size=I, qkv_bias=True)
    cfg = cls(**fields)
    cfg.architectures = [ARCH_CLASSES[arch]]
    return cfg


def _config_json(cfg, dtype_name: str) -> str:
    data = cfg.to_dict()
    data["dtype"] = dtype_name
    if cfg.model_type == "qwen3_moe":
        # transformers 5 stores it as num_local_experts; older readers (v4, llama.cpp) look for num_experts
        data.setdefault("num_experts", cfg.num_experts)
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


# ----------------------------------------------------------------------------------------------
# Tensors


class _TensorSource:
    def __init__(self, config: MoEConfig, models: dict, arch: str, G: torch.Tensor, dtype: torch.dtype, seed: int):
        self.config, self.models, self.arch, self.G, self.dtype, self.seed = config, models, arch, G, dtype, seed
        self.base = models[config.base_model]
        self.used: set[str] = set()

    def expert_weight(self, expert: Expert, key: str, layer: int, proj: str) -> torch.Tensor:
        """One dense MLP weight of an expert, with its noise and residual scale (docs/mergekit-reference.md §6)."""
        name = dense_mlp_name(layer, proj)
        t = self.models[expert.source_model].checkpoint.map(name)
        if expert.noise_scale:
            gen = torch.Generator().manual_seed(tensor_seed(self.seed, f"{key}/{name}"))
            t = t.float() + torch.randn(t.shape, generator=gen) * expert.noise_scale
        if expert.residual_scale is not None and proj == "down_proj":
            t = t.float() * expert.residual_scale
        return t.to(self.dtype)

    def tensor(self, name: str, shape: tuple[int, ...]) -> Optional[torch.Tensor]:
        m = _MLP.match(name)
        if m:
            return self._mlp(int(m.group(1)), m.group(2), name)
        ckpt = self.base.checkpoint
        if name in ckpt:
            self.used.add(name)
            t = ckpt.map(name)
            if tuple(t.shape) != shape:
                raise ModelError(f"model {self.config.base_model}: tensor {name} has shape {list(t.shape)}, the {self.arch} output needs {list(shape)}")
            return t.to(self.dtype)
        if self.arch == "qwen2_moe" and re.search(r"\.self_attn\.[qkv]_proj\.bias$", name):
            return torch.zeros(shape, dtype=self.dtype)  # qwen2_moe attention has biases; llama/mistral none
        raise ModelError(f"model {self.config.base_model}: tensor {name} (needed by the {self.arch} output) not found")

    def _mlp(self, layer: int, part: str, name: str) -> torch.Tensor:
        experts = self.config.experts
        n = len(experts)
        if part == "gate.weight":
            return self.G[layer, :n].to(self.dtype)
        if part == "experts.gate_up_proj":
            return torch.stack([
                torch.cat([self.expert_weight(e, f"expert{j}", layer, "gate_proj"), self.expert_weight(e, f"expert{j}", layer, "up_proj")])
                for j, e in enumerate(experts)
            ])
        if part == "experts.down_proj":
            return torch.stack([self.expert_weight(e, f"expert{j}", layer, "down_proj") for j, e in enumerate(experts)])
        shared = self.config.shared_experts or []
        m = re.match(r"^shared_expert\.(gate_proj|up_proj|down_proj)\.weight$", part)
        if m and len(shared) == 1:
            return self.expert_weight(shared[0], "shared0", layer, m.group(1))
        if part == "shared_expert_gate.weight" and len(shared) == 1:
            return self.G[layer, n : n + 1].to(self.dtype)
        raise ModelError(f"the {self.arch} output needs tensor {name}, which this builder does not produce")


# ----------------------------------------------------------------------------------------------
# Card


def render_moe_card(config: MoEConfig, arch: str, config_text: str, out_dir: Path) -> str:
    experts = [f"* {render_model(e.source_model)}" for e in config.experts]
    shared = [f"* {render_model(e.source_model)} (shared)" for e in config.shared_experts or []]
    lines = [
        *card_header(config.referenced_models(), "transformers", ["mergekit", "merge", "moe", "evomerge"], out_dir),
        "This is a mixture of experts built from pre-trained language models with evomerge's `mergekit-moe` "
        "(compatible with [mergekit](https://github.com/arcee-ai/mergekit) MoE recipes).", "",
        "## Details", "",
        f"Output architecture: {ARCH_CLASSES[arch]}, {len(config.experts)} experts, "
        f"{config.experts_per_token} per token, routers initialised with gate_mode `{config.gate_mode}`, "
        f"using {render_model(config.base_model)} as the base (attention, norms, embeddings).", "",
        "### Experts", "", *experts, *shared, "",
        "### Configuration", "", "The following YAML configuration was used to produce this model:", "",
        "```yaml", config_text.rstrip(), "```", "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The whole build


def build_moe(config: MoEConfig, config_text: str, out_path: Path, options: MergeOptions, source: str, understood: bool) -> Path:
    validate(config, source, understood)
    target = Path(out_path)
    if not options.overwrite and target.is_dir() and any(target.iterdir()):
        # refused before the routers are computed (minutes for hidden-state routers of a big base)
        raise ModelError(
            f"output directory {out_path} already exists and is not empty "
            "(choose a new path, or pass --overwrite to replace it once the merge completes)"
        )
    set_num_threads(options.num_threads)
    models = open_models(
        config.referenced_models(),
        lazy_unpickle=options.lazy_unpickle,
        lora_merge_cache=options.lora_merge_cache,
        lora_merge_dtype=options.lora_merge_dtype,
    )
    try:
        types = [str(models[r].config.get("model_type")) for r in config.referenced_models()]
        arch = choose_architecture(config, types, source)
        _check_inputs(config, models, source)
        base = models[config.base_model]
        dtype_name = config.dtype or base.config.get("dtype") or base.config.get("torch_dtype") or "float32"
        dtype_name = str(dtype_name).replace("torch.", "")
        dtype = torch_dtype(dtype_name) if dtype_name in ("bfloat16", "float16", "float32") else None
        if dtype is None:
            raise ModelError(f"model {config.base_model}: dtype {dtype_name} is not a floating-point output dtype; set `dtype` in {source}")
        n = len(config.experts)
        if n & (n - 1):
            log.warning("%d experts is not a power of two; some runtimes (llama.cpp) expect one", n)
        cfg = output_config(arch, base.config, n, config.experts_per_token, dtype_name)
        rows = list(config.experts) + (list(config.shared_experts or []) if arch == "qwen2_moe" else [])
        G = router_vectors(config, base, rows, options)

        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(cfg)
        expected = [(k, tuple(v.shape)) for k, v in skeleton.state_dict().items()]
        del skeleton
        if getattr(cfg, "tie_word_embeddings", False) and "lm_head.weight" not in base.checkpoint:
            expected = [(k, s) for k, s in expected if k != "lm_head.weight"]
        specs = [OutputTensorSpec(k, s, dtype) for k, s in expected]
        src = _TensorSource(config, models, arch, G, dtype, options.random_seed)
        with atomic_model_output(out_path, options.overwrite, specs, options.out_shard_size, options.safe_serialization) as (folder, writer):
            progress = None
            if not options.quiet:
                from tqdm import tqdm

                progress = tqdm(total=len(specs), unit="tensor", desc="building MoE")
            for spec in specs:
                writer.write(spec.name, src.tensor(spec.name, spec.shape).contiguous())
                if progress is not None:
                    progress.update(1)
            if progress is not None:
                progress.close()
            unused = [k for k in base.checkpoint.tensors if not _MLP.match(k) and k not in src.used and k != "lm_head.weight"]
            if unused:
                raise ModelError(
                    f"model {config.base_model}: tensor {unused[0]} has no place in the {ARCH_CLASSES[arch]} output"
                    + (f" (and {len(unused) - 1} more)" if len(unused) > 1 else "")
                )
            writer.finish(__version__)
            (folder / "config.json").write_text(_config_json(cfg, dtype_name))
            if options.copy_tokenizer:
                copy_files(base.directory, folder, TOKENIZER_FILES)
            if options.write_model_card:
                (folder / "mergekit_moe_config.yml").write_text(config_text)
                (folder / "README.md").write_text(render_moe_card(config, arch, config_text, Path(out_path)))
    finally:
        close_models(models)
    log.info("mixture of experts (%s) written to %s", ARCH_CLASSES[arch], out_path)
    return Path(out_path)
