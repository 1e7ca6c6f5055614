"""The resident executor: merge candidates straight into a live model, for search.

Every input tensor is read once onto the merge device and kept; task-vector methods keep the task
vectors (`x - base`) instead of the raw fine-tunes. Each candidate recipe is planned (cheap: no
tensor data), and only output tensors whose inputs or resolved parameters changed since the last
candidate are recomputed and copied into the model. The maths goes through the same method
functions as the streaming executor, so a candidate's tensors equal `mergekit-yaml`'s bit for bit
(same device, dtype and seed).

Re-pointing: an output tensor that is one input unchanged (`passthrough` with no scale or scale 1,
a frankenmerge's layers) is not copied when the input already lies on the model's device in the
parameter's dtype: the parameter is re-pointed to the resident input (`param.data = input`), so a
layer used twice costs no memory at all. Such a parameter shares storage with an input, so it is
never written in place: a later candidate that computes that position (scaled, merged) first gives
the parameter a buffer of its own again. Parameters that share storage with another parameter of
the live model (ties by storage rather than by one Parameter object) are always copied into, as
are tensors whose input dtype or device differs from the parameter's.
"""

from __future__ import annotations

import logging
import time
import weakref
from dataclasses import dataclass, field
from typing import Optional

import torch

from .architecture import ArchitectureInfo, config_object, transformers_class
from .config import MergeConfig
from .errors import ModelError
from .methods.differentiable import SMOOTH_METHODS, inner_products, masked_weight_gradients, weight_gradients
from .methods.task_arithmetic import merge_task_vectors, task_vectors, variant_extras
from .options import MergeOptions
from .plan import MergePlan, TensorTask, donor_of, open_inputs, plan_merge
from .streaming import task_context
from .tokenizer import VocabPlan, permute_embeddings

log = logging.getLogger(__name__)


@dataclass
class ApplyStats:
    recomputed: int = 0
    unchanged: int = 0
    seconds: float = 0.0
    changed: list[str] = field(default_factory=list)


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every entry is finite. A finite sum proves it (one inf or NaN makes any sum inf or
    NaN) at the cost of a plain reduction, 20-35x faster on CPU than `isfinite(t).all()`, which
    writes a mask; only a non-finite sum (a NaN, an inf, or a sum of huge finite values that
    overflows) needs the entry-by-entry check."""
    if not tensor.is_floating_point() or bool(torch.isfinite(tensor.sum())):
        return True
    return bool(torch.isfinite(tensor).all())


def _task_key(task: TensorTask) -> tuple:
    """Everything that determines an output tensor's value."""
    return (
        task.method.name,
        tuple(sorted(task.params.items())),
        tuple(tuple(sorted(mp.items())) for mp in task.model_params),
        tuple((str(i.model), i.tensor_name) for i in task.inputs),
        task.base_index,
        task.math_dtype,
        task.out.dtype,
        task.out.shape,
        _vocab_context(task),
    )


def _vocab_context(task: TensorTask) -> tuple:
    """What an embedding's permuted inputs depend on besides the tensor itself."""
    if task.vocab is None:
        return ()
    return (task.vocab.key, tuple(str(i.model) for i in task.inputs), tuple((str(i.model), i.tensor_name) for i in task.aux_inputs))


class ResidentMerger:
    """Holds the inputs of a family of recipes (same models) and materialises candidates."""

    def __init__(self, template: MergeConfig, options: Optional[MergeOptions] = None):
        self.options = options or MergeOptions(quiet=True)
        self.device = torch.device(self.options.resolved_device())
        self.template = template
        # the planner's own first step, kept for every candidate (see plan.MergeInputs)
        self.inputs = open_inputs(
            template,
            allow_crimes=self.options.allow_crimes,
            lazy_unpickle=self.options.lazy_unpickle,
            lora_merge_cache=self.options.lora_merge_cache,
            lora_merge_dtype=self.options.lora_merge_dtype,
        )
        self.donor = donor_of(template)
        self._inputs: dict[tuple, torch.Tensor] = {}
        self._deltas: dict[tuple, tuple] = {}
        self._last: dict[str, tuple] = {}
        self.model: Optional[torch.nn.Module] = None
        self._targets: dict[str, Optional[torch.Tensor]] = {}
        # False: copy every output tensor into the model (the behaviour before re-pointing; for
        # measurements such as bench/layer_path_resident.py)
        self.repoint = True

    @property
    def models(self):
        return self.inputs.models

    # -- planning -------------------------------------------------------------------------------

    def plan(self, config: MergeConfig) -> MergePlan:
        """The candidate's plan, from the same planner as `mergekit-yaml`'s (models it names that
        are not open yet are opened, with the same checks)."""
        return plan_merge(config, self.inputs, self.options.unsafe_truncate_embeddings)

    def vocab(self, config: MergeConfig) -> Optional[VocabPlan]:
        """The recipe's built tokenizer and permutations (None: the donor's tokenizer), built once
        per distinct tokenizer setting; `.tokenizer` is what the merged model must be run with."""
        return self.inputs.vocab(config)

    # -- the live model -------------------------------------------------------------------------

    def build_model(self, config: MergeConfig, dtype: Optional[torch.dtype] = None) -> torch.nn.Module:
        """An empty transformers model shaped like the recipe's output, on the merge device."""
        from transformers import AutoConfig, AutoModelForCausalLM

        plan = self.plan(config)
        cls = transformers_class(plan.out_config)  # a VLM, T5, an encoder; None: remote code
        dtype = dtype or plan.tasks[0].out.dtype
        with torch.device(self.device):
            if cls is None:
                cfg = dict(plan.out_config)
                hf_config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
                model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
            else:
                model = cls._from_config(config_object(cls, plan.out_config), dtype=dtype)
        model.eval()
        self.attach(model)
        return model

    def attach(self, model: torch.nn.Module) -> None:
        self.model = model
        self._targets = {}
        self._state: dict[str, torch.Tensor] = {}
        self._aliases: dict[str, tuple[str, ...]] = {}
        self._last = {}
        self._storage_shared: set[int] = set()  # ids of live tensors whose storage another one shares
        # inputs found finite, by id; weak, so an entry goes with its tensor (and its id with it)
        self._finite: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()
        self.repointed: set[str] = set()  # output names whose parameter IS a resident input now

    def _target(self, task: TensorTask, arch: ArchitectureInfo) -> Optional[torch.Tensor]:
        """The model parameter an output tensor goes to; None for an LM head tied to the
        embedding (named_parameters lists a shared tensor once, under the embedding's name)."""
        name = task.out.name
        if name not in self._targets:
            if not self._state:
                self._state = dict(self.model.named_parameters())
                self._state.update(dict(self.model.named_buffers()))
                owners: dict[int, list[torch.Tensor]] = {}
                for t in self._state.values():
                    if t.numel():
                        owners.setdefault(t.untyped_storage().data_ptr(), []).append(t)
                self._storage_shared = {id(t) for ts in owners.values() if len(ts) > 1 for t in ts}
                # saved names -> the module names the live model has (a VLM's language model is
                # `model.language_model.layers.N` in memory, `model.layers.N` in checkpoints)
                depth = max((len(m) for m in self.model.modules() if isinstance(m, torch.nn.ModuleList)), default=0)
                weights = list(arch.all_weights(depth))
                for module in arch.modules:
                    weights.extend(module.all_weights(depth))
                for w in weights:
                    for alias in w.aliases:
                        if alias not in self._aliases.get(w.name, ()):
                            self._aliases[w.name] = self._aliases.get(w.name, ()) + (alias,)
            found = next((self._state[n] for n in (name,) + self._aliases.get(name, ()) if n in self._state), None)
            if found is None and not task.is_embed:
                raise ModelError(f"resident model has no parameter for tensor {name}")
            self._targets[name] = found
        return self._targets[name]

    # -- inputs ---------------------------------------------------------------------------------

    def _input_key(self, task: TensorTask, i: int) -> tuple:
        inp = task.inputs[i]
        return (inp.model, inp.tensor_name, task.math_dtype, _vocab_context(task), task.rows)

    def _read(self, task: TensorTask, inp) -> torch.Tensor:
        x = self.models[inp.model].checkpoint.read(inp.tensor_name)
        return (x if task.rows is None else x[: task.rows]).to(device=self.device, dtype=task.math_dtype)

    def _input(self, task: TensorTask, i: int) -> torch.Tensor:
        key = self._input_key(task, i)
        tensor = self._inputs.get(key)
        if tensor is None:
            if task.vocab is None:
                tensor = self._inputs[key] = self._read(task, task.inputs[i])
            else:
                # permuted once when read, with the streaming executor's function
                raw = [self._read(task, inp) for inp in task.inputs]
                extra = {inp.model: self._read(task, inp) for inp in task.aux_inputs}
                permuted = permute_embeddings(task.vocab, task.out.name, [x.model for x in task.inputs], raw, extra)
                for j, t in enumerate(permuted):
                    self._inputs[self._input_key(task, j)] = t
                tensor = permuted[i]
        return tensor

    def _task_vectors(self, task: TensorTask):
        key = (tuple((i.model, i.tensor_name) for i in task.inputs), task.base_index, task.math_dtype, task.out.name, _vocab_context(task))
        cached = self._deltas.get(key)
        if cached is None:
            tensors = [self._input(task, i) for i in range(len(task.inputs))]
            base, deltas, positions = task_vectors(tensors, task.base_index, task_context(task, self.options.random_seed))
            cached = self._deltas[key] = (base, deltas, positions, {})  # {} : magnitude histograms
            # the raw fine-tunes are no longer needed once their task vectors exist
            for i in range(len(task.inputs)):
                if i != task.base_index:
                    self._inputs.pop(self._input_key(task, i), None)
        return cached

    def _unchanged_input(self, task: TensorTask, target: torch.Tensor) -> Optional[torch.Tensor]:
        """The resident input the output tensor equals bit for bit, when `target` may be re-pointed
        to it (see the module docstring); None: compute and copy."""
        if (
            not self.repoint
            or task.method.name != "passthrough"
            or len(task.inputs) != 1
            or task.model_params[0].get("scale") not in (None, 1.0)  # x * 1.0 == x exactly
            or not task.math_dtype == task.out.dtype == target.dtype
            or id(target) in self._storage_shared
        ):
            return None
        tensor = self._input(task, 0)
        if tensor.device != target.device or tuple(tensor.shape) != tuple(target.shape):
            return None  # a shape mismatch gets apply()'s error through the copy path
        return tensor

    def compute(self, task: TensorTask, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One output tensor, exactly as the streaming executor computes it; methods that can
        write straight into `out` (the live parameter) do so."""
        ctx = task_context(task, self.options.random_seed)
        if out is not None and task.math_dtype == task.out.dtype:
            ctx.out = out
        variant = task.method.task_vector
        if variant is not None:
            base, deltas, positions, histograms = self._task_vectors(task)
            result = merge_task_vectors(
                base,
                deltas,
                [task.model_params[i]["weight"] for i in positions],
                [task.model_params[i]["density"] for i in positions],
                task.params,
                variant,
                ctx,
                histograms,
                extras=variant_extras(variant, task.model_params, positions),
                positions=positions,
            )
        else:
            tensors = [self._input(task, i) for i in range(len(task.inputs))]
            result = task.method.function(tensors, task.base_index, task.params, task.model_params, ctx)
        return result.to(task.out.dtype)

    # -- candidates -----------------------------------------------------------------------------

    def apply(self, config: MergeConfig, check_finite: bool = False) -> ApplyStats:
        """Write the recipe's merged tensors into the attached model; unchanged ones are skipped.
        With `check_finite`, a merged tensor holding inf/NaN raises ModelError naming it."""
        return self.apply_plan(self.plan(config), check_finite)

    @torch.no_grad()
    def apply_plan(self, plan: MergePlan, check_finite: bool = False) -> ApplyStats:
        """`apply` for a plan already made (a gradient step changes only its tasks' weights)."""
        if self.model is None:
            raise RuntimeError("no model attached: call build_model() or attach() first")
        start = time.perf_counter()
        stats = ApplyStats()
        for task in plan.tasks:
            key = _task_key(task)
            if self._last.get(task.out.name) == key:
                stats.unchanged += 1
                continue
            target = self._target(task, plan.architecture)
            if target is not None and (shared := self._unchanged_input(task, target)) is not None:
                # an input's values never change: check each once, not once per candidate
                if check_finite and id(shared) not in self._finite:
                    if not all_finite(shared):
                        raise ModelError(f"merged tensor {task.out.name} has non-finite values")
                    self._finite[id(shared)] = shared
                target.data = shared  # re-pointed: no copy, and the old buffer is freed
                self.repointed.add(task.out.name)
            elif target is not None:
                if task.out.name in self.repointed:
                    # the parameter is an input's storage: never write into it, give it its own again
                    target.data = torch.empty_like(target)
                    self.repointed.discard(task.out.name)
                result = self.compute(task, out=target)
                if check_finite and not all_finite(result):
                    self._last.pop(task.out.name, None)  # the model now holds it: recompute next time
                    raise ModelError(f"merged tensor {task.out.name} has non-finite values")
                if tuple(target.shape) != tuple(result.shape):
                    raise ModelError(
                        f"tensor {task.out.name}: merged shape {list(result.shape)} does not fit the model's {list(target.shape)}"
                    )
                if result.data_ptr() != target.data_ptr():
                    target.copy_(result)
            self._last[task.out.name] = key
            stats.recomputed += 1
            stats.changed.append(task.out.name)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        stats.seconds = time.perf_counter() - start
        return stats

    def parameter(self, task: TensorTask, plan: MergePlan) -> Optional[torch.Tensor]:
        """The live model's parameter that output tensor `task` is written to (None: an LM head
        tied to the embedding, which the embedding's parameter stands for)."""
        return self._target(task, plan.architecture)

    def weight_gradients(self, task: TensorTask, grad: torch.Tensor) -> list[float]:
        """dL/d(weight of each input) of output tensor `task` (0 for the base), given `grad` =
        dL/d(the merged tensor): exact for linear and task_arithmetic, with the masks held fixed
        at the current weights for the rest of the task-vector family (methods.differentiable)."""
        method = task.method.name
        variant = task.method.task_vector
        if variant is not None:
            base, vectors, positions, histograms = self._task_vectors(task)
        else:
            positions = list(range(len(task.inputs)))
            vectors = [self._input(task, i) for i in positions]
        weights = [task.model_params[i]["weight"] for i in positions]
        if variant is None or method in SMOOTH_METHODS:
            per_vector = weight_gradients(method, task.params, weights, inner_products(grad, vectors))
        else:
            # each model's sparsified vector times lambda: the engine's merge with its weight 1 and
            # the others 0, onto a zero base (so no rounding of the base enters it); the masks do
            # not depend on the weights, and with one model every kept entry agrees with itself
            ctx = task_context(task, self.options.random_seed)
            zero = torch.zeros_like(base)
            densities = [task.model_params[i]["density"] for i in positions]
            extras = variant_extras(variant, task.model_params, positions)
            parts = [merge_task_vectors(zero, vectors, [float(i == j) for i in range(len(vectors))], densities,
                                        task.params, variant, ctx, histograms, extras=extras, positions=positions)
                     for j in range(len(vectors))]
            per_vector = masked_weight_gradients(grad, parts, weights, variant.consensus, bool(task.params.get("normalize")))
        out = [0.0] * len(task.inputs)
        for i, g in zip(positions, per_vector):
            out[i] = g
        return out

    def merged_tensors(self, config: MergeConfig) -> dict[str, torch.Tensor]:
        """Every output tensor of the recipe (for tests and export checks), without a model."""
        return {task.out.name: self.compute(task) for task in self.plan(config).tasks}

    def close(self) -> None:
        self.inputs.close()
