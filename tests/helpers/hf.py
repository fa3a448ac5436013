"""Shared pieces of the Hugging Face integration tests (also imported by the distributed worker)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from str_hooks.testing import make_batch

COEF = 0.7


def examples(tokenizer: Any, n: int = 8, seed: int = 3) -> list[dict[str, list[int]]]:
    """Unpadded chat examples with unequal completion lengths: input_ids, completion_mask, labels."""
    batch = make_batch(tokenizer, n=n, seed=seed)
    rows = []
    for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"], strict=True):
        keep = mask.bool()
        rows.append(
            {
                "input_ids": ids[keep].tolist(),
                "completion_mask": (labels[keep] != -100).long().tolist(),
                "labels": labels[keep].tolist(),
            }
        )
    return rows


class PadCollator:
    """Right-pads input_ids (pad id), attention_mask (0) and labels (-100)."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            mask[i, :n] = 1
            labels[i, :n] = torch.tensor(r["labels"])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def hand_written_loss(
    model: Any, batch: dict[str, torch.Tensor], token_ids: list[int], weights: list[float], per_token: bool
) -> torch.Tensor:
    """CE + COEF * mse penalty at supervised positions, from full logits, reference from disable_adapter.
    per_token=True: both normalized by the batch's supervised-token count (one big batch)."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    logits = model(**inputs).logits.float()
    with torch.no_grad(), model.disable_adapter():
        ref = model(**inputs).logits.float()
    labels = batch["labels"]
    shifted = labels[:, 1:]
    n = int((shifted != -100).sum())
    ce_sum = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=-100, reduction="sum"
    )
    where = torch.zeros_like(labels, dtype=torch.bool)
    where[:, :-1] = shifted != -100
    d = logits[where][:, token_ids] - ref[where][:, token_ids]
    pen_sum = (d.square() * torch.tensor(weights)).sum()
    assert per_token
    return (ce_sum + COEF * pen_sum) / n


def trainable_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
