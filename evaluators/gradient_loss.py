"""A differentiable training loss over the items of lm-eval tasks.

What: `ItemLoss(evaluator).loss(items, objective)` is a 0-dim tensor, differentiable with respect to
the parameters of the model attached to an `LMEvalEvaluator`, computed on the same items (task,
document) a search scores every candidate on. A gradient optimiser of merge coefficients
(AdaMerging-style) backpropagates through it; which parameters require grad is the caller's choice.

Why a loss of its own: lm-eval scores requests under `torch.no_grad()` and returns Python floats;
accuracy is a step function anyway. The loss here rebuilds the log-likelihoods lm-eval computes for
the very same requests, as tensors with their autograd graph:

- "nll" (labels used): a multiple_choice item's cross-entropy of the gold choice under a softmax
  over the choices' log-likelihoods, -log_softmax(lls)[gold] (several golds: -log of their summed
  probability); a loglikelihood item's negative log-likelihood of its continuation per token.
- "entropy" (no labels, AdaMerging's objective): a multiple_choice item's entropy of the softmax
  over its choices' log-likelihoods; a loglikelihood item's mean, over the continuation's
  positions, of the entropy of the model's next-token distribution.

The total is sum_t |weight_t| * mean(item losses of task t) / sum_t |weight_t|, over the tasks that
have items among those given (TaskSpec.weight, its sign being the search's direction, not a size).

The lm-eval (0.4.x) facts relied on, checked against 0.4.13:
- `Task.build_all_requests(samples=..., apply_chat_template=, fewshot_as_multiturn=, chat_template=,
  tokenizer_name=)` builds the requests exactly as `lm_eval.evaluator.evaluate` does (the arguments
  are passed the way `evaluate` passes them); it leaves them in `task.instances`, one `Instance` per
  (context, continuation) with `doc_id` = the position of the document among the sorted `samples`
  and `idx` = the choice. A multiple_choice task's first len(doc_to_choice(doc)) requests are the
  choices (acc_mutual_info appends unconditional ones after them, not used here).
- Few-shot examples come from a stateful sampler (`task.sampler.rnd`), seeded by
  `task.set_fewshot_seed(seed)`; the evaluator reseeds it before every evaluation
  (LMEvalEvaluator.reseed_fewshot), and requests are built right after the same reseeding, so
  the loss sees the contexts every candidate is scored on.
- The gold index is found the way `ConfigurableTask.process_results` finds it: `doc_to_text(doc)`
  for multiple-input tasks, else `doc_to_target(doc)` (an int, a choice's text, or a list of them).
- Tokens are HFLM's for loglikelihood requests: `lm._encode_pair(context, continuation)`, an empty
  context replaced by `lm.prefix_token_id` (`TemplateLM.loglikelihood`), and the model input
  (context + continuation)[-(max_length + 1):][:-1] (`HFLM._loglikelihood_tokens`). lm-eval pads
  batches on the right without a mask; here the pad positions are masked as well.
- The model is `evaluator.lm.model` as it was when the loss was built (re-attaching the evaluator
  to another model needs a new ItemLoss). Where its forward takes transformers' `logits_to_keep`
  (a 1-D tensor of positions), only the scored positions get logits; otherwise all do.
"""

from __future__ import annotations

import inspect
import numbers
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .lm_eval_tasks import TaskError

OBJECTIVES = ("nll", "entropy")
DIFFERENTIABLE_OUTPUT_TYPES = ("multiple_choice", "loglikelihood")


class NotDifferentiable(TaskError):
    """A task whose score has no differentiable counterpart here (generated text, rolling
    log-likelihood)."""


def _output_type(task_obj) -> str:
    return getattr(task_obj, "OUTPUT_TYPE", None) or task_obj.get_config("output_type")


def check_differentiable(evaluator) -> None:
    """Raise NotDifferentiable (one line, naming the task) for the first task of `evaluator` that
    is neither multiple_choice nor loglikelihood. Needs no model attached."""
    for spec in evaluator.tasks:
        output_type = _output_type(evaluator.loaded["tasks"][spec.name])
        if output_type not in DIFFERENTIABLE_OUTPUT_TYPES:
            raise NotDifferentiable(
                f"optimizer gradient: task {spec.name} is {output_type}; only multiple_choice and "
                "loglikelihood tasks have a differentiable loss"
            )


@dataclass(frozen=True)
class _Sequence:
    """One (context, continuation) request, tokenised and cut to the model's window."""

    model_input: tuple[int, ...]  # (context + continuation)[-(max_length + 1):][:-1]
    continuation: tuple[int, ...]  # the tokens scored: the last len(continuation) positions predict them


@dataclass(frozen=True)
class _Item:
    task: str
    doc: int
    output_type: str
    requests: tuple[tuple[str, str], ...]  # (context, continuation) per choice; one for loglikelihood
    gold: Optional[tuple[int, ...]]  # indices into requests; None: the label names no choice
    sequences: tuple[_Sequence, ...]


class ItemLoss:
    """The loss over an attached evaluator's search items; requests and tokens are built once."""

    def __init__(self, evaluator, batch_size: Optional[int] = None):
        if evaluator.lm is None:
            raise RuntimeError("attach a model to the evaluator first")
        check_differentiable(evaluator)
        self.lm = evaluator.lm
        self.model = evaluator.lm.model
        self.batch_size = int(batch_size or evaluator.batch_size or 1)
        self.weights = {spec.name: abs(float(spec.weight)) for spec in evaluator.tasks}
        self.task_order = [spec.name for spec in evaluator.tasks]
        pad = getattr(self.lm.tokenizer, "pad_token_id", None)
        self.pad_token_id = pad if pad is not None else 0  # masked out: any valid id does
        self._takes_logits_to_keep: Optional[bool] = None
        self._items: dict[tuple[str, int], _Item] = {}
        self.items: list[tuple[str, int]] = []
        for name in self.task_order:
            docs = evaluator.items(name)
            built = _build_items(evaluator, name, docs)
            for doc in docs:
                self._items[(name, doc)] = built[doc]
                self.items.append((name, doc))

    # -- public ------------------------------------------------------------------------------

    def choice_loglikelihoods(self, items: Sequence[tuple[str, int]]) -> list[torch.Tensor]:
        """Per item, a 1-D tensor: each choice's summed continuation log-probability given its
        context (one entry for a loglikelihood task); differentiable."""
        return [lls for lls, _ in self._score_items(self._resolve(items), with_entropy=False)]

    def loss(self, items: Sequence[tuple[str, int]], objective: str = "nll") -> torch.Tensor:
        """0-dim tensor: per task, the mean loss of its given items; those means averaged with
        weights |TaskSpec.weight| over the tasks present. `items` are (task, document) pairs of
        `self.items`; a pair given twice counts twice."""
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; known: {', '.join(OBJECTIVES)}")
        resolved = self._resolve(items)
        if not resolved:
            raise ValueError("no items to compute a loss on")
        if objective == "nll":
            for item in resolved:
                if item.output_type == "multiple_choice" and item.gold is None:
                    raise TaskError(f"task {item.task}, document {item.doc}: its label names none of its "
                                    "choices, so it has no nll loss (objective 'entropy' needs no label)")
        with_entropy = objective == "entropy" and any(i.output_type == "loglikelihood" for i in resolved)
        scored = self._score_items(resolved, with_entropy=with_entropy)
        per_task: dict[str, list[torch.Tensor]] = defaultdict(list)
        for item, (lls, entropies) in zip(resolved, scored):
            per_task[item.task].append(_item_loss(item, lls, entropies, objective))
        present = [name for name in self.task_order if name in per_task]
        total_weight = sum(self.weights[name] for name in present)
        if total_weight == 0:
            raise ValueError(f"the tasks of these items ({', '.join(present)}) all have weight 0")
        weighted = [self.weights[name] * torch.stack(per_task[name]).mean() for name in present]
        return torch.stack(weighted).sum() / total_weight

    # -- internals ---------------------------------------------------------------------------

    def _resolve(self, items: Sequence[tuple[str, int]]) -> list[_Item]:
        out = []
        for task, doc in items:
            key = (task, int(doc))
            if key not in self._items:
                raise KeyError(f"task {task}, document {doc} is not one of the search items")
            out.append(self._items[key])
        return out

    def _score_items(self, items: list[_Item], with_entropy: bool):
        """Per item: (1-D tensor of its requests' log-likelihoods, per request the 1-D tensor of
        next-token entropies over the continuation's positions, or None)."""
        flat = [seq for item in items for seq in item.sequences]
        scores = self._score_sequences(flat, with_entropy)
        out, start = [], 0
        for item in items:
            mine = scores[start:start + len(item.sequences)]
            start += len(item.sequences)
            out.append((torch.stack([ll for ll, _ in mine]), [e for _, e in mine] if with_entropy else None))
        return out

    def _score_sequences(self, sequences: list[_Sequence], with_entropy: bool):
        """(summed log-likelihood, entropies or None) per sequence, forward passes with gradients.
        Batches are right-padded with an attention mask: a causal model's logits at the real
        positions do not depend on padding that comes after them."""
        device = self.lm.device
        # longest first, as lm-eval does: batches of similar length pad little; the order is fixed
        order = sorted(range(len(sequences)), key=lambda i: (-len(sequences[i].model_input), i))
        results: list = [None] * len(sequences)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            width = max(len(sequences[i].model_input) for i in chunk)
            input_ids = torch.full((len(chunk), width), self.pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            spans = []  # per row: the positions whose logits predict the continuation
            for row, i in enumerate(chunk):
                n, k = len(sequences[i].model_input), len(sequences[i].continuation)
                input_ids[row, :n] = torch.tensor(sequences[i].model_input, dtype=torch.long)
                attention_mask[row, :n] = 1
                spans.append(range(n - k, n))
            logits, column = self._forward(input_ids.to(device), attention_mask.to(device), spans)
            for row, i in enumerate(chunk):
                scored = logits[row, [column[p] for p in spans[row]]]  # [k, vocab]
                # at least float32 (a bf16 model's log-probabilities are too coarse); float64 stays
                log_probs = scored.to(torch.promote_types(scored.dtype, torch.float32)).log_softmax(dim=-1)
                targets = torch.tensor(sequences[i].continuation, dtype=torch.long, device=log_probs.device)
                ll = log_probs.gather(-1, targets.unsqueeze(-1)).sum()
                entropy = -(log_probs.exp() * log_probs).sum(dim=-1) if with_entropy else None
                results[i] = (ll, entropy)
        return results

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, spans: list[range]):
        """(logits, {position: column of logits}). Where the model takes `logits_to_keep` (a 1-D
        tensor of positions, transformers' causal LMs), only the scored positions go through the
        output layer: a few-shot context's logits over a large vocabulary would otherwise be
        most of the memory the backward pass keeps."""
        if self._takes_logits_to_keep is None:
            self._takes_logits_to_keep = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        if self._takes_logits_to_keep:
            kept = sorted({p for span in spans for p in span})
            kwargs["logits_to_keep"] = torch.tensor(kept, dtype=torch.long, device=input_ids.device)
            return self.model(**kwargs).logits, {p: j for j, p in enumerate(kept)}
        return self.model(**kwargs).logits, range(input_ids.shape[1])


def _item_loss(item: _Item, lls: torch.Tensor, entropies, objective: str) -> torch.Tensor:
    if item.output_type == "multiple_choice":
        log_p = lls.log_softmax(dim=0)
        if objective == "nll":
            return -torch.logsumexp(log_p[list(item.gold)], dim=0)
        return -(log_p.exp() * log_p).sum()
    if objective == "nll":  # loglikelihood: per token, so long and short continuations weigh alike
        return -lls[0] / len(item.sequences[0].continuation)
    return entropies[0].mean()


def _build_items(evaluator, name: str, docs: Sequence[int]) -> dict[int, _Item]:
    """{document: _Item} for the given documents of task `name`, requests built by lm-eval."""
    task_obj = evaluator.loaded["tasks"][name]
    lm = evaluator.lm
    output_type = _output_type(task_obj)
    n_docs = len(task_obj.eval_docs)
    ordered = sorted(set(docs))
    # lm-eval yields the sampled documents in their dataset order, numbered from 0 (doc_id);
    # with every document, samples=None is what the evaluator itself passes
    samples = None if ordered == list(range(n_docs)) else ordered
    by_position: dict[int, list] = defaultdict(list)
    if ordered:
        for instance in _instances(evaluator, task_obj, samples):
            by_position[instance.doc_id].append(instance)
    out = {}
    max_length = lm.max_length
    for position, doc in enumerate(ordered):
        instances = sorted(by_position[position], key=lambda inst: inst.idx)
        if not instances:
            raise TaskError(f"task {name}: lm-eval built no request for document {doc}")
        doc_obj = instances[0].doc
        if output_type == "multiple_choice":
            choices = list(task_obj.doc_to_choice(doc_obj))
            instances = instances[:len(choices)]  # acc_mutual_info's unconditional requests follow
            gold = _gold_indices(task_obj, doc_obj, choices)
        else:
            instances = instances[:1]
            gold = (0,)
        requests = tuple((inst.args[0], inst.args[1]) for inst in instances)
        sequences = tuple(_tokenise(lm, context, continuation, max_length, name, doc)
                          for context, continuation in requests)
        out[doc] = _Item(name, doc, output_type, requests, gold, sequences)
    return out


def _instances(evaluator, task_obj, samples: Optional[list[int]]) -> list:
    """lm-eval's requests for `samples`, built as `lm_eval.evaluator.evaluate` builds them, with
    the few-shot sampler seeded as before every evaluation (LMEvalEvaluator.reseed_fewshot); the
    task's instances are left as they were."""
    lm = evaluator.lm
    saved = getattr(task_obj, "_instances", None)
    chat = bool(evaluator.apply_chat_template)
    try:
        evaluator.reseed_fewshot()
        task_obj.build_all_requests(
            samples=samples,
            rank=0,
            world_size=1,
            cache_requests=False,
            system_instruction=None,
            apply_chat_template=chat,
            fewshot_as_multiturn=evaluator.fewshot_as_multiturn,
            chat_template=getattr(lm, "apply_chat_template", None) if chat else None,
            tokenizer_name=getattr(lm, "tokenizer_name", "") if chat else "",
        )
        return list(task_obj.instances)
    finally:
        task_obj._instances = saved


def _gold_indices(task_obj, doc, choices: list[str]) -> Optional[tuple[int, ...]]:
    """The gold choices as ConfigurableTask.process_results finds them; None when a label names
    no choice (lm-eval then scores the item 0)."""
    gold = task_obj.doc_to_text(doc) if getattr(task_obj, "multiple_input", 0) else task_obj.doc_to_target(doc)
    out = []
    for g in gold if isinstance(gold, (list, tuple)) else [gold]:
        if isinstance(g, str):
            g = choices.index(g) if g in choices else -1
        if not isinstance(g, numbers.Integral) or not 0 <= int(g) < len(choices):
            return None
        out.append(int(g))
    return tuple(out) or None


def _tokenise(lm, context: str, continuation: str, max_length: int, task: str, doc: int) -> _Sequence:
    if context == "":
        # TemplateLM.loglikelihood: an empty context is the prefix token (BOS, else EOS), unless
        # the continuation already starts with it
        cont = lm.tok_encode(continuation, add_special_tokens=False)
        if not cont:
            raise TaskError(f"task {task}, document {doc}: the continuation {continuation!r} has no tokens to score")
        context_enc, cont_enc = ([lm.prefix_token_id], cont) if lm.prefix_token_id != cont[0] else (cont[:1], cont[1:])
    else:
        context_enc, cont_enc = lm._encode_pair(context, continuation)
    if not cont_enc or not context_enc:
        raise TaskError(f"task {task}, document {doc}: the continuation {continuation!r} has no tokens to score")
    if len(cont_enc) > max_length:
        raise TaskError(f"task {task}, document {doc}: the continuation has {len(cont_enc)} tokens, "
                        f"more than the model's {max_length}")
    window = (list(context_enc) + list(cont_enc))[-(max_length + 1):]  # truncated from the left, as HFLM does
    return _Sequence(model_input=tuple(window[:-1]), continuation=tuple(cont_enc))
