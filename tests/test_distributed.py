"""Two CPU processes (gloo): DDP through the HF Trainer and TRL's SFTTrainer, and FSDP2 (`fully_shard`).

Each launches tests/dist_worker.py with torch.distributed.run and compares rank 0's result with the same
computation in one process over the whole batch.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.hf import (
    COEF,
    PadCollator,
    common_args,
    examples,
    make_trainer,
    one_big_batch_lora_gradient,
)
from helpers.launch import run_two_processes
from helpers.losses import assert_grads_close
from safetensors.torch import load_file

from str_hooks.testing import make_lora, make_model

WORKER = Path(__file__).parent / "dist_worker.py"


def launch(mode: str, out: Path) -> dict[str, torch.Tensor]:
    run_two_processes(WORKER, mode, str(out))
    return load_file(str(out / "result.safetensors"))


@pytest.mark.parametrize("mode", ["trainer", "sft"])
def test_ddp_two_processes_equal_one_big_batch(
    mode: str, tmp_path: Path, tokenizer: Any, tokens: Any
) -> None:
    update = launch(mode, tmp_path)
    assert_grads_close(update, one_big_batch_lora_gradient(tokenizer, tokens))


@pytest.mark.parametrize("decision_point", [False, True])
def test_ddp_folded_anchors_equal_one_process(
    decision_point: bool, tmp_path: Path, tokenizer: Any, tokens: Any
) -> None:
    """`anchor_placement: folded` under DDP (2 x 4): the update equals one process with all 8 rows and a
    separate anchor forward (CE normalized over both ranks' tokens, the anchor mean added once); also with
    the decision-point methods (coarse KL over 3-token openings, benign anchors)."""
    from helpers.hf import anchor_config, trainable_snapshot

    from str_hooks.integrations.hf import attach

    update = launch("trainer_folded_decision" if decision_point else "trainer_folded", tmp_path / "ddp")
    model = make_lora(make_model("llama"))
    before = trainable_snapshot(model)
    trainer = make_trainer("trainer", model, tokenizer, examples(tokenizer), common_args(tmp_path, 8, 1))
    cfg = anchor_config("separate", decision_point=decision_point)
    attach(trainer, cfg, tokens=tokens, tokenizer=tokenizer)
    trainer.train()
    expected = {n: before[n] - p for n, p in trainable_snapshot(model).items()}
    assert_grads_close(update, expected, rtol=2e-5)


def full_finetune_gradient(tokenizer: Any, tokens: Any, frozen_head: bool) -> dict[str, torch.Tensor]:
    """One process, whole batch, by hand: CE + COEF * mse penalty against a frozen copy, per-token mean."""
    model = make_model("llama")
    reference = copy.deepcopy(model).requires_grad_(False)
    torch.manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    if frozen_head:
        model.lm_head.weight.requires_grad_(False)
    batch = PadCollator(tokenizer.pad_token_id)(examples(tokenizer))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    logits = model(**inputs).logits.float()
    with torch.no_grad():
        ref = reference(**inputs).logits.float()
    shifted = batch["labels"][:, 1:]
    n = int((shifted != -100).sum())
    ce_sum = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=-100, reduction="sum"
    )
    where = torch.zeros_like(batch["labels"], dtype=torch.bool)
    where[:, :-1] = shifted != -100
    d = logits[where][:, tokens.ids] - ref[where][:, tokens.ids]
    pen_sum = (d.square() * torch.tensor(tokens.weights)).sum()
    ((ce_sum + COEF * pen_sum) / n).backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["fsdp2", "fsdp2_frozen_head"])
def test_fsdp2_two_processes_equal_one_big_batch(
    mode: str, tmp_path: Path, tokenizer: Any, tokens: Any
) -> None:
    """`fully_shard` on every layer and the root: the head is a sharded DTensor outside the forward."""
    grads = launch(mode, tmp_path)
    expected = full_finetune_gradient(tokenizer, tokens, frozen_head=mode == "fsdp2_frozen_head")
    assert ("lm_head.weight" in expected) == (mode == "fsdp2")
    assert_grads_close(grads, expected, rtol=2e-5)


def test_trainer_with_accelerate_fsdp2_plugin(tmp_path: Path, tokenizer: Any, tokens: Any) -> None:
    """The HF Trainer with accelerate's FSDP plugin (fsdp_version 2) on CPU, full fine-tuning."""
    update = launch("trainer_fsdp2", tmp_path)
    assert_grads_close(update, full_finetune_gradient(tokenizer, tokens, frozen_head=False), rtol=2e-5)
