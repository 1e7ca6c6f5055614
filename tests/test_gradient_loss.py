"""evaluators.gradient_loss: the differentiable loss over lm-eval items, checked against lm-eval's own
scores, against an independent float64 computation, and against finite differences. Real parts only:
a randomly initialised tiny llama, the quickstart's multiple_choice tasks and local task folders."""

from __future__ import annotations

import json
import math

import pytest
import torch

from evaluators.gradient_loss import OBJECTIVES, ItemLoss, NotDifferentiable, check_differentiable
from evaluators.lm_eval_tasks import LMEvalEvaluator, TaskError, TaskSpec
from helpers import make_model, tiny_config

CONTINUATIONS = [  # a loglikelihood task: continuations of several tokens, some long contexts
    ("one plus one is", " two"),
    ("the capital of France is", " Paris"),
    ("the quick brown", " fox jumps over the lazy dog"),
    ("two plus two is", " four"),
    ("merging models", " combines what each fine-tune learned"),
]

TASK_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: {output_type}
doc_to_text: "{{{{q}}}}"
doc_to_target: "{{{{a}}}}"
{extra}metric_list:
  - metric: {metric}
metadata:
  version: 1
"""


def write_task(folder, name: str, output_type: str, metric: str, rows, extra: str = "") -> None:
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps({"q": q, "a": a}) + "\n" for q, a in rows))
    (folder / f"{name}.yaml").write_text(
        TASK_YAML.format(name=name, data=data.resolve(), output_type=output_type, metric=metric, extra=extra))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A task folder (the quickstart's two multiple_choice tasks, a loglikelihood task, a
    generate_until task) and a random tiny llama (initialised wide enough that its next-token
    distributions are far from uniform)."""
    from experiments.quickstart.skills import write_lm_eval_tasks

    root = tmp_path_factory.mktemp("gradient_loss")
    tasks = root / "tasks"
    write_lm_eval_tasks(tasks)
    write_task(tasks, "gl_continue", "loglikelihood", "acc", CONTINUATIONS)
    write_task(tasks, "gl_generate", "generate_until", "exact_match", CONTINUATIONS,
               extra="generation_kwargs:\n  until: ['\\n']\n")
    model = make_model(root / "model", tiny_config("llama", initializer_range=0.2), seed=0)
    return {"tasks": tasks, "model": model}


SPECS = [TaskSpec("qs_arithmetic"), TaskSpec("qs_facts", weight=-2.0), TaskSpec("gl_continue", weight=0.5)]


def evaluator(setup, dtype=torch.float32, specs=SPECS, **options) -> LMEvalEvaluator:
    """Seeded subsets of 4 items per task, one few-shot example each (so contexts differ per item
    and depend on the few-shot seed); attached to the tiny model in `dtype`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    options = {"limit": 4, "shuffle": True, "seed": 3, "num_fewshot": 1, **options}
    ev = LMEvalEvaluator(specs, include_paths=[str(setup["tasks"])], **options)
    ev.attach(AutoModelForCausalLM.from_pretrained(setup["model"], dtype=dtype), AutoTokenizer.from_pretrained(setup["model"]))
    return ev


def gold_of(ev, task: str, doc: int) -> int:
    return int(ev.loaded["tasks"][task].eval_docs[doc]["answer"])


def test_loglikelihoods_equal_lm_evals_own(setup):
    """Contexts (few-shot examples included) and log-likelihoods are exactly what an lm-eval
    evaluation of the same items requests and computes; batched equals unbatched; building the
    requests leaves the evaluator's few-shot sampler where it was."""
    ev = evaluator(setup)
    batched = ItemLoss(ev)  # built before lm-eval's run: it must not move the few-shot sampler
    assert batched.items == [(t.name, d) for t in SPECS for d in ev.items(t.name)]
    assert len(batched.items) == 12
    lls = batched.choice_loglikelihoods(batched.items)
    assert all(ll.requires_grad for ll in lls)

    results = ev._run(ev.samples, per_item=True)  # lm-eval's evaluate: lm.loglikelihood over its requests
    for (task, doc), mine in zip(batched.items, lls):
        (row,) = [r for r in results["samples"][task] if r["doc_id"] == doc]
        assert [tuple(a) for a in row["arguments"]] == list(batched._items[(task, doc)].requests)
        theirs = torch.tensor([ll for ll, _greedy in row["filtered_resps"]], dtype=torch.float64)
        expected_choices = 1 if task == "gl_continue" else 4
        assert mine.shape == (expected_choices,)
        assert torch.allclose(mine.detach().double(), theirs, atol=1e-4, rtol=0)

    one_by_one = ItemLoss(ev, batch_size=1).choice_loglikelihoods(batched.items)
    for a, b in zip(lls, one_by_one):
        assert torch.allclose(a.detach(), b.detach(), atol=1e-5, rtol=0)
    # the output layer over every position (models without logits_to_keep) gives the same
    whole = ItemLoss(ev)
    whole._takes_logits_to_keep = False
    for a, b in zip(lls, whole.choice_loglikelihoods(batched.items)):
        assert torch.allclose(a.detach(), b.detach(), atol=1e-5, rtol=0)
    # and the direct call with lm-eval's request objects, on the requests as cached
    from lm_eval.api.instance import Instance

    requests = [Instance(request_type="loglikelihood", doc={}, arguments=r, idx=i)
                for item in batched.items for i, r in enumerate(batched._items[item].requests)]
    direct = torch.tensor([ll for ll, _ in ev.lm.loglikelihood(requests)], dtype=torch.float64)
    assert torch.allclose(torch.cat(lls).detach().double(), direct, atol=1e-4, rtol=0)


def test_every_evaluation_sees_the_same_few_shot_examples(setup):
    """lm-eval's few-shot sampler is stateful; the evaluator reseeds it before each evaluation, so
    the second candidate is asked exactly what the first was (and what the loss is built from)."""
    ev = evaluator(setup)
    first, second = (ev._run(ev.samples, per_item=True)["samples"] for _ in range(2))
    contexts = [[tuple(r["arguments"][0]) for r in first[t.name]] for t in SPECS]
    assert contexts == [[tuple(r["arguments"][0]) for r in second[t.name]] for t in SPECS]
    loss = ItemLoss(ev)
    assert [loss._items[(t.name, r["doc_id"])].requests[0] for t in SPECS for r in first[t.name]] == [
        tuple(r["arguments"][0]) for t in SPECS for r in first[t.name]]


def test_chat_template_contexts_equal_lm_evals(setup):
    """With apply_chat_template (few-shot examples as turns), the requests and log-likelihoods are
    still those of lm-eval's own evaluation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(setup["model"])
    tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    ev = LMEvalEvaluator([TaskSpec("qs_facts"), TaskSpec("gl_continue")], include_paths=[str(setup["tasks"])],
                         limit=3, num_fewshot=1, seed=5, apply_chat_template=True, fewshot_as_multiturn=True)
    ev.attach(AutoModelForCausalLM.from_pretrained(setup["model"], dtype=torch.float32), tokenizer)
    assert ev.apply_chat_template
    loss = ItemLoss(ev)
    lls = loss.choice_loglikelihoods(loss.items)
    results = ev._run(ev.samples, per_item=True)
    for (task, doc), mine in zip(loss.items, lls):
        (row,) = [r for r in results["samples"][task] if r["doc_id"] == doc]
        requests = loss._items[(task, doc)].requests
        assert [tuple(a) for a in row["arguments"]] == list(requests)
        assert "<assistant>" in requests[0][0] and "<user>" in requests[0][0]
        theirs = torch.tensor([ll for ll, _ in row["filtered_resps"]], dtype=torch.float64)
        assert torch.allclose(mine.detach().double(), theirs, atol=1e-4, rtol=0)


def reference_token_entropies(model, tokenizer, context: str, continuation: str) -> torch.Tensor:
    """Float64, unbatched, no padding: the entropy of the next-token distribution at each
    position that predicts a continuation token (context + continuation)[:-1]."""
    context_ids = tokenizer.encode(context)
    whole = tokenizer.encode(context + continuation)
    n_cont = len(whole) - len(context_ids)
    with torch.no_grad():
        logits = model(torch.tensor([whole[:-1]])).logits[0].double()
    log_p = logits[-n_cont:].log_softmax(-1)
    return -(log_p.exp() * log_p).sum(-1)


def test_loss_equals_an_independent_float64_computation(setup):
    """nll and entropy, per task then weighted by |weight|: recomputed in float64 from the
    log-likelihoods, the gold answers in the data, and (entropy of a loglikelihood item) the
    model's own full distributions."""
    ev = evaluator(setup)
    loss = ItemLoss(ev)
    lls = {item: ll.detach().double() for item, ll in zip(loss.items, loss.choice_loglikelihoods(loss.items))}
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(setup["model"], dtype=torch.float64)
    tokenizer = ev.lm.tokenizer
    weights = {"qs_arithmetic": 1.0, "qs_facts": 2.0, "gl_continue": 0.5}

    def per_item(task, doc, objective):
        ll = lls[(task, doc)]
        if task == "gl_continue":
            ((context, continuation),) = loss._items[(task, doc)].requests
            if objective == "nll":
                n_tokens = len(tokenizer.encode(context + continuation)) - len(tokenizer.encode(context))
                return -float(ll[0]) / n_tokens
            return float(reference_token_entropies(model, tokenizer, context, continuation).mean())
        p = [math.exp(x) for x in ll.tolist()]
        p = [x / sum(p) for x in p]
        if objective == "nll":
            return -math.log(p[gold_of(ev, task, doc)])
        return -sum(x * math.log(x) for x in p)

    def expected(items, objective):
        tasks = [t for t in weights if any(i[0] == t for i in items)]
        means = {t: sum(per_item(*i, objective) for i in items if i[0] == t) / sum(i[0] == t for i in items) for t in tasks}
        return sum(weights[t] * means[t] for t in tasks) / sum(weights[t] for t in tasks)

    for task, doc in loss.items[:8]:  # the gold index as lm-eval reads the label
        assert loss._items[(task, doc)].gold == (gold_of(ev, task, doc),)
    subset = [loss.items[0], loss.items[2], loss.items[5]]  # two tasks only: their weights alone
    for objective in OBJECTIVES:
        for items in (loss.items, subset):
            value = loss.loss(items, objective)
            assert value.dim() == 0 and value.requires_grad
            assert float(value.detach()) == pytest.approx(expected(items, objective), abs=2e-5)
    # the loglikelihood task's entropy is not that of a uniform distribution (the check has teeth)
    assert float(loss.loss(loss.items[-4:], "entropy").detach()) < math.log(ev.lm.model.config.vocab_size) - 0.5


def test_gradient_is_real(setup):
    """Backward reaches the parameters, and d loss / d (one weight entry) matches a central
    finite difference of a float64 model, for both objectives."""
    ev = evaluator(setup)
    loss = ItemLoss(ev)
    loss.loss(loss.items, "nll").backward()
    grads = {n: p.grad for n, p in ev.lm.model.named_parameters()}
    assert all(g is not None for g in grads.values())
    nonzero = [n for n, g in grads.items() if g.abs().max() > 0]
    assert len(nonzero) >= len(grads) - 1  # every weight matrix (a norm weight at worst may be 0)
    assert any("layers.0." in n for n in nonzero) and any("embed_tokens" in n for n in nonzero)

    ev64 = evaluator(setup, dtype=torch.float64)
    loss64 = ItemLoss(ev64)
    model = ev64.lm.model
    entries = [(model.model.layers[1].mlp.down_proj.weight, (3, 5)),
               (model.model.layers[0].self_attn.q_proj.weight, (7, 2))]
    for objective in OBJECTIVES:
        for weight, at in entries:
            model.zero_grad()
            loss64.loss(loss64.items, objective).backward()
            analytic = float(weight.grad[at])
            # Llama's RMSNorm computes in float32 even in a float64 model: a step of 1e-2 keeps
            # that rounding (~1e-7 of the loss) small next to the difference; the curvature
            # error at this step is ~3e-4 relative (measured)
            eps, original = 1e-2, float(weight.data[at])
            with torch.no_grad():
                weight.data[at] = original + eps
                up = float(loss64.loss(loss64.items, objective))
                weight.data[at] = original - eps
                down = float(loss64.loss(loss64.items, objective))
                weight.data[at] = original
            numeric = (up - down) / (2 * eps)
            assert abs(analytic) > 1e-6, (objective, at)
            assert analytic == pytest.approx(numeric, rel=5e-3), (objective, at)


def test_generate_until_is_not_differentiable(setup):
    ev = LMEvalEvaluator([TaskSpec("qs_facts"), TaskSpec("gl_generate", metric="exact_match,none")],
                         include_paths=[str(setup["tasks"])], limit=2)
    with pytest.raises(NotDifferentiable) as info:
        check_differentiable(ev)  # no model attached
    message = str(info.value)
    assert isinstance(info.value, TaskError)
    assert "\n" not in message and "gl_generate" in message and "generate_until" in message
    assert "qs_facts" not in message
    check_differentiable(evaluator(setup))  # the differentiable tasks pass


def test_unknown_objective_and_items(setup):
    ev = evaluator(setup, specs=[TaskSpec("qs_facts")], limit=2)
    loss = ItemLoss(ev)
    with pytest.raises(ValueError, match="nll, entropy"):
        loss.loss(loss.items, "accuracy")
    with pytest.raises(KeyError, match="not one of the search items"):
        loss.loss([("qs_facts", 19)], "nll")
    with pytest.raises(ValueError):
        loss.loss([], "nll")
