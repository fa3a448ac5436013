"""What a run is measured by beyond refusals: held-out task loss, and the validation split settings are
chosen on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from str_hooks.testing import pad_rows

from .data import Example, StudyData
from .model import encode_example, exact_match, labelled_loss, refusal_rate


def heldout_loss(model: Any, tokenizer: Any, examples: list[Example], max_len: int) -> float:
    """Mean cross-entropy over the examples' response tokens, the head projected only where one is predicted
    (`labelled_loss`; the body's forward over the prompts is most of the call's cost)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), 32):
            rows = [encode_example(tokenizer, e.prompt, e.response, max_len) for e in examples[i : i + 32]]
            batch = pad_rows(rows, tokenizer.pad_token_id)
            labelled = int((batch["labels"][:, 1:] != -100).sum())
            total += float(labelled_loss(model, batch)) * labelled
            count += labelled
    model.train(was_training)
    return total / max(count, 1)


def label_margins(model: Any, tokenizer: Any, prompts: list[str], labels: tuple[str, str]) -> list[float]:
    """Per prompt, log p(labels[1]) - log p(labels[0]) for the reply's first token (each label's first
    token): a threshold-free score of a binary task (its AUC does not move with where the label threshold
    lands, which moves exact match by several points between runs)."""
    from .model import left_padded_prompts

    first = [tokenizer(label, add_special_tokens=False)["input_ids"][0] for label in labels]
    was_training = model.training
    model.eval()
    margins: list[float] = []
    with torch.no_grad():
        for i in range(0, len(prompts), 32):
            ids, mask = left_padded_prompts(tokenizer, prompts[i : i + 32])
            logprobs = torch.log_softmax(
                model(input_ids=ids, attention_mask=mask).logits[:, -1].float(), dim=-1
            )
            margins += (logprobs[:, first[1]] - logprobs[:, first[0]]).tolist()
    model.train(was_training)
    return margins


def auc(scores: list[float], positive: list[bool]) -> float:
    """The probability that a random positive example scores above a random negative one (ties count half)."""
    pos = [s for s, y in zip(scores, positive, strict=True) if y]
    neg = [s for s, y in zip(scores, positive, strict=True) if not y]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / max(len(pos) * len(neg), 1)


@dataclass(frozen=True)
class Validation:
    """The validation split settings are chosen on: harmful training prompts that are neither anchors nor
    attack goals, XSTest safe prompts the held-out measure does not use, and task examples never trained on."""

    harmful: list[str]
    over_refusal: list[str]
    task: list[Example]
    harmful_goals: tuple[str, ...] = ()  # a second harmful validation set, measured where given

    def measure(self, model: Any, tokenizer: Any, data: StudyData, task: str, max_len: int) -> dict[str, Any]:
        model.eval()
        out: dict[str, Any] = {
            "val_refusal": refusal_rate(model, tokenizer, self.harmful, data.refusal_phrases)[0],
            "val_over_refusal": refusal_rate(model, tokenizer, self.over_refusal, data.refusal_phrases)[0],
            "val_task_loss": heldout_loss(model, tokenizer, self.task, max_len) if self.task else None,
            # Accuracy only where it is cheap (SST-2: three new tokens); GSM8K's is chosen by loss.
            "val_task_accuracy": (
                exact_match(model, tokenizer, self.task, max_new_tokens=3, task=task)
                if task == "sst2"
                else None
            ),
        }
        if self.harmful_goals:
            out["val_refusal_goals"] = refusal_rate(
                model, tokenizer, list(self.harmful_goals), data.refusal_phrases
            )[0]
        return out
