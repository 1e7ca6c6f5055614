"""Multiple-choice accuracy of a model on the quickstart skills (log-likelihood of each choice),
a dependency-free stand-in for the lm-eval tasks, used by the plain-merge demo."""

from __future__ import annotations

import torch

from experiments.quickstart.skills import arithmetic_items, fact_items, split


@torch.no_grad()
def choice_accuracy(model, tokenizer, items) -> float:
    correct = 0
    for question, answer, wrong in items:
        scores = []
        for choice in [answer] + list(wrong):
            prompt = tokenizer(tokenizer.bos_token + question, return_tensors="pt")["input_ids"]
            full = tokenizer(tokenizer.bos_token + question + " " + choice, return_tensors="pt")["input_ids"]
            logits = model(full).logits.log_softmax(-1)
            n = prompt.shape[1]
            targets = full[0, n:]
            scores.append(logits[0, n - 1 : -1].gather(-1, targets[:, None]).sum().item())
        correct += int(max(range(len(scores)), key=scores.__getitem__) == 0)
    return correct / len(items)


def held_out_scores(model, tokenizer) -> dict[str, float]:
    return {
        "arithmetic": choice_accuracy(model, tokenizer, split(arithmetic_items())[1]),
        "facts": choice_accuracy(model, tokenizer, split(fact_items())[1]),
    }
