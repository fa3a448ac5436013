"""Shared pieces of the Hugging Face integration tests (also imported by the distributed worker): the
examples, the collator, the hand-written loss, and the trainer arguments of one exact SGD step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from helpers.configs import decision_point_only
from str_hooks.testing import make_batch, make_lora, make_model, pad_rows

COEF = 0.7
# The decision-point methods on top of any anchor config: the coarse KL, 3-token openings, benign anchors.
DECISION_POINT: dict[str, Any] = {"penalty": {"form": "kl"}, "anchor_tokens": 3, "benign_weight": 0.5}


def anchor_config(placement: str, decision_point: bool = False, batch_size: int = 4) -> dict[str, Any]:
    """`{"coef": COEF, "reference": {...anchors...}}`: the decision point alone (mse, one position per
    anchor, no benign anchors), or with the decision-point methods when asked; every setting explicit."""
    cfg = decision_point_only(
        {"coef": COEF, "reference": {"anchor_batch_size": batch_size, "anchor_placement": placement}}
    )
    if decision_point:
        cfg["penalty"] = dict(DECISION_POINT["penalty"])
        cfg["reference"].update({k: v for k, v in DECISION_POINT.items() if k != "penalty"})
    return cfg


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
        return pad_rows(rows, self.pad_token_id)


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


def common_args(tmp_path: Path, batch: int, ga: int, steps: int = 1, **extra: Any) -> dict[str, Any]:
    return dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=ga,
        max_steps=steps,
        learning_rate=1.0,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
        remove_unused_columns=False,
        # TRL's SFTConfig turns bf16 on by default; exact comparisons need fp32 on both trainers.
        bf16=False,
        **extra,
    )


def make_trainer(
    kind: str, model: Any, tokenizer: Any, rows: list[dict[str, Any]], args: dict[str, Any]
) -> Any:
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments
    from trl import SFTConfig, SFTTrainer

    if kind == "trainer":
        return Trainer(
            model=model,
            args=TrainingArguments(**args),
            train_dataset=rows,
            data_collator=PadCollator(tokenizer.pad_token_id),
        )
    dataset = Dataset.from_list(
        [{"input_ids": r["input_ids"], "completion_mask": r["completion_mask"]} for r in rows]
    )
    return SFTTrainer(
        model=model,
        args=SFTConfig(**args, completion_only_loss=True, max_length=None, dataset_num_proc=None),
        train_dataset=dataset,
        processing_class=tokenizer,
    )


def one_big_batch_lora_gradient(tokenizer: Any, tokens: Any) -> dict[str, torch.Tensor]:
    """One process, the whole batch of `examples`, by hand: the LoRA gradient of CE + the mse penalty at
    training positions (per-token mean), what the 2-process runs' one SGD step (lr 1) must equal."""
    torch.manual_seed(0)
    model = make_lora(make_model("llama"))
    batch = PadCollator(tokenizer.pad_token_id)(examples(tokenizer))
    hand_written_loss(model, batch, tokens.ids, tokens.weights, per_token=True).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def zero_config(stage: int, offload: bool) -> dict[str, Any]:
    """DeepSpeed's JSON for ZeRO `stage` (with the optimizer state offloaded to the CPU when `offload`): the
    Trainer's own optimizer (a client optimizer) and fp32 everywhere, "auto" where the Trainer fills it in."""
    zero: dict[str, Any] = {"stage": stage}
    if (
        stage == 3
    ):  # partition every parameter: by default ZeRO-3 keeps small ones (all of a tiny model) whole
        zero["stage3_param_persistence_threshold"] = 0
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
    }
