"""What a run is measured by beyond refusals: held-out task loss, and the validation split settings are
chosen on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from str_hooks.testing import pad_rows

from .data import Example, StudyData
from .model import encode_example, exact_match, refusal_rate


def heldout_loss(model: Any, tokenizer: Any, examples: list[Example], max_len: int) -> float:
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), 32):
            rows = [encode_example(tokenizer, e.prompt, e.response, max_len) for e in examples[i : i + 32]]
            batch = pad_rows(rows, tokenizer.pad_token_id)
            logits = (
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                .logits[:, :-1]
                .float()
            )
            target = batch["labels"][:, 1:]
            keep = target != -100
            total += float(F.cross_entropy(logits[keep], target[keep], reduction="sum"))
            count += int(keep.sum())
    model.train(was_training)
    return total / max(count, 1)


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
