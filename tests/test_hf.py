"""Hugging Face Trainer and TRL SFTTrainer integration."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset
from helpers.configs import training_positions
from helpers.factory import make_lora, make_model
from helpers.hf import (
    COEF,
    PadCollator,
    anchor_config,
    common_args,
    examples,
    hand_written_loss,
    make_trainer,
    trainable_snapshot,
)
from helpers.losses import assert_grads_close
from transformers import Trainer, TrainingArguments
from trl import SFTConfig, SFTTrainer

from str_hooks import STRError
from str_hooks.integrations.hf import STATE_KEY, STRCallback, attach
from str_hooks.modules import unwrap_model


def fresh_model() -> Any:
    return make_lora(make_model("llama"))


def one_step_update(
    kind: str, tmp_path: Path, tokenizer: Any, tokens: Any, batch: int, ga: int, **extra: Any
) -> dict[str, torch.Tensor]:
    model = fresh_model()
    before = trainable_snapshot(model)
    trainer = make_trainer(
        kind, model, tokenizer, examples(tokenizer), common_args(tmp_path, batch, ga, **extra)
    )
    attach(trainer, training_positions({"coef": COEF}), tokens=tokens)
    trainer.train()
    after = trainable_snapshot(model)
    return {n: before[n] - after[n] for n in before}  # SGD, lr 1: the update is the gradient


@pytest.mark.parametrize("kind", ["trainer", "sft"])
def test_gradient_accumulation_invariance(kind: str, tmp_path: Path, tokenizer: Any, tokens: Any) -> None:
    """One optimizer step over the same 8 examples (unequal supervised counts) gives the same update at
    8 x 1, 4 x 2 and 2 x 4, equal to the gradient of a hand-written big-batch CE + penalty."""
    rows = examples(tokenizer)
    counts = [sum(r["completion_mask"][1:]) for r in rows]
    assert len(set(counts)) > 2
    updates = {ga: one_step_update(kind, tmp_path, tokenizer, tokens, 8 // ga, ga) for ga in (1, 2, 4)}
    model = fresh_model()
    collated = PadCollator(tokenizer.pad_token_id)(rows)
    hand_written_loss(model, collated, tokens.ids, tokens.weights, per_token=True).backward()
    expected = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for ga, update in updates.items():
        assert_grads_close(update, expected, rtol=1e-5, atol=1e-8, what=f"GA {ga}")


@pytest.mark.parametrize(
    ("kind", "ga", "decision_point"),
    [
        ("trainer", 1, False),
        ("trainer", 2, False),
        ("sft", 1, False),
        ("sft", 2, False),
        ("trainer", 2, True),
        ("sft", 2, True),
    ],
)
def test_folded_anchors_equal_a_separate_anchor_forward(
    kind: str, ga: int, decision_point: bool, tmp_path: Path, tokenizer: Any, tokens: Any
) -> None:
    """`anchor_placement: folded`: the wrapper folds the anchors into the step's first micro-batch (labels
    kept with `logits_to_keep` for the Trainer, extended with -100 for TRL's fused head); the update equals
    the one with a separate anchor forward, CE included; also with the decision-point methods (coarse KL
    over 3-token openings, benign anchors)."""
    updates = {}
    for placement in ("separate", "folded"):
        model = fresh_model()
        before = trainable_snapshot(model)
        trainer = make_trainer(
            kind, model, tokenizer, examples(tokenizer), common_args(tmp_path, 8 // ga, ga)
        )
        cfg = anchor_config(placement, decision_point=decision_point)
        callback = attach(trainer, cfg, tokens=tokens, tokenizer=tokenizer)
        trainer.train()
        updates[placement] = {n: before[n] - p for n, p in trainable_snapshot(model).items()}
        penalty = [
            e[f"{callback.config.logging.prefix}penalty"] for e in trainer.state.log_history if "loss" in e
        ]
        assert penalty and penalty[0] > 0
    assert_grads_close(updates["folded"], updates["separate"], rtol=2e-5)


def test_per_micro_batch_mean_mode(tmp_path: Path, tokenizer: Any, tokens: Any) -> None:
    """When the model takes no loss kwargs (Axolotl forces this), the CE is a per-micro-batch mean the
    Trainer divides by GA; the penalty must follow the same rule."""
    rows = examples(tokenizer)
    model = fresh_model()
    before = trainable_snapshot(model)
    trainer = make_trainer("trainer", model, tokenizer, rows, common_args(tmp_path, 4, 2))
    trainer.model_accepts_loss_kwargs = False
    attach(trainer, training_positions({"coef": COEF}), tokens=tokens)
    trainer.train()
    update = {n: before[n] - p for n, p in trainable_snapshot(model).items()}
    # Hand-written: mean over the two micro-batches (in the Trainer's sampling order, the seeded random
    # permutation) of their own means.
    reference = fresh_model()
    sampler_order = torch.randperm(8, generator=torch.Generator().manual_seed(0)).tolist()
    total = None
    for half in (sampler_order[:4], sampler_order[4:]):
        part = hand_written_loss(
            reference,
            PadCollator(tokenizer.pad_token_id)([rows[i] for i in half]),
            tokens.ids,
            tokens.weights,
            True,
        )
        total = part / 2 if total is None else total + part / 2
    assert total is not None
    total.backward()
    expected = {n: p.grad.detach().clone() for n, p in reference.named_parameters() if p.requires_grad}
    assert_grads_close(update, expected)


def test_penalty_reduces_drift(tmp_path: Path, tokenizer: Any, tokens: Any) -> None:
    rows = examples(tokenizer, n=8) * 4
    drift = {}
    for coef in (0.0, 20.0):
        model = fresh_model()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.zero_()
        args = common_args(tmp_path, 4, 1, steps=20)
        args.update(learning_rate=2e-2, optim="adamw_torch")
        trainer = make_trainer("trainer", model, tokenizer, rows, args)
        callback = attach(trainer, training_positions({"coef": coef}), tokens=tokens)
        trainer.train()
        logged = [e["str/abs_drift"] for e in trainer.state.log_history if "str/abs_drift" in e]
        assert len(logged) == 20 and callback.handle is None  # detached at train end
        drift[coef] = sum(logged[-5:]) / 5
    assert drift[0.0] > 0.5, drift
    assert drift[20.0] < 0.25 * drift[0.0], drift


def test_metrics_in_log_history_and_eval_loss_excludes_penalty(
    tmp_path: Path, tokenizer: Any, tokens: Any
) -> None:
    rows = examples(tokenizer)
    model = fresh_model()
    args = common_args(tmp_path, 4, 1, steps=2, per_device_eval_batch_size=8)
    trainer = make_trainer("trainer", model, tokenizer, rows, args)
    trainer.eval_dataset = rows
    plain_eval = trainer.evaluate()["eval_loss"]
    attach(
        trainer,
        training_positions({"coef": 5.0, "probe": {"every": 1, "n_prompts": 2, "max_new_tokens": 3}}),
        tokens=tokens,
        tokenizer=tokenizer,
    )
    trainer.train()
    train_logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(train_logs) == 2
    for entry in train_logs:
        assert {"str/penalty", "str/drift", "str/coef", "str/refusal_rate"} <= set(entry)
        assert entry["str/coef"] == 5.0 and entry["str/penalty"] > 0
        # Per-token drift of the 3 highest-weighted safety tokens (`logging.top_tokens`).
        top = sorted(range(tokens.k), key=lambda i: -tokens.weights[i])[:3]
        per_token = {k for k in entry if k.startswith("str/drift/")}
        assert per_token == {f"str/drift/{tokens.readable_names[i]}" for i in top}
    # Evaluate with the hook attached again (as during training): the eval loss is the plain CE.
    callback = trainer.callback_handler.callbacks[0]
    assert isinstance(callback, STRCallback)
    trainer.model.train()
    callback.on_train_begin(trainer.args, trainer.state, trainer.control)
    after_eval = trainer.evaluate()
    with torch.no_grad():
        trainer.model.eval()
        batch = PadCollator(tokenizer.pad_token_id)(rows)
        expected = float(trainer.model(**batch).loss)
    assert math.isclose(after_eval["eval_loss"], expected, rel_tol=1e-5)
    assert not math.isclose(after_eval["eval_loss"], plain_eval, rel_tol=1e-7)  # training changed the model
    callback.on_train_end(trainer.args, trainer.state, trainer.control)


@pytest.mark.parametrize("kind", ["trainer", "sft"])
def test_callback_alone_attaches_itself(kind: str, tmp_path: Path, tokenizer: Any, tokens: Any) -> None:
    """`callbacks=[STRCallback(cfg)]` works on both trainers (TRL's fused path ignores outputs.loss,
    so it must go through the compute_loss wrapper): the update equals attach()'s."""
    rows = examples(tokenizer)
    model = fresh_model()
    before = trainable_snapshot(model)
    args = common_args(tmp_path, 8, 1)
    if kind == "trainer":
        trainer = Trainer(
            model=model,
            args=TrainingArguments(**args),
            train_dataset=rows,
            data_collator=PadCollator(tokenizer.pad_token_id),
            callbacks=[STRCallback(training_positions({"coef": COEF}), tokens=tokens)],
        )
    else:
        dataset = Dataset.from_list(
            [{"input_ids": r["input_ids"], "completion_mask": r["completion_mask"]} for r in rows]
        )
        trainer = SFTTrainer(
            model=model,
            args=SFTConfig(**args, completion_only_loss=True, max_length=None),
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[STRCallback(training_positions({"coef": COEF}), tokens=tokens)],
        )
    trainer.train()
    update = {n: before[n] - p for n, p in trainable_snapshot(model).items()}
    assert_grads_close(update, one_step_update(kind, tmp_path, tokenizer, tokens, 8, 1))
    assert [e for e in trainer.state.log_history if "str/penalty" in e]


def test_callback_without_a_trainer_raises(tokens: Any) -> None:
    callback = STRCallback({"coef": 0.1}, tokens=tokens)
    with pytest.raises(STRError, match=r"attach\(trainer, cfg\)"):
        callback.on_train_begin(None, None, None)


def test_attach_twice_and_bad_config(tmp_path: Path, tokenizer: Any, tokens: Any) -> None:
    trainer = make_trainer(
        "trainer", fresh_model(), tokenizer, examples(tokenizer), common_args(tmp_path, 8, 1)
    )
    callback = attach(trainer, {"coef": 0.1}, tokens=tokens)
    assert attach(trainer) is callback
    with pytest.raises(STRError, match="already has an STRCallback"):
        attach(trainer, {"coef": 0.2})
    with pytest.raises(Exception, match="coef"):
        STRCallback({"coef": -1})


def test_resume_logs_the_same_penalties(tmp_path: Path, tokenizer: Any, tokens: Any) -> None:
    """An interrupted and resumed run logs the same penalty per step as an uninterrupted one (warm-up
    position restored from the checkpoint)."""
    rows = examples(tokenizer) * 2
    cfg = training_positions({"coef": 3.0, "warmup_steps": 4})

    def run(steps: int, out: Path, resume: bool = False, save: bool = False) -> list[dict[str, Any]]:
        model = fresh_model()
        args = common_args(out, 4, 1, steps=steps)
        args.update(learning_rate=1e-2, optim="adamw_torch", output_dir=str(out))
        if save:
            args.update(save_strategy="steps", save_steps=3)
        trainer = make_trainer("trainer", model, tokenizer, rows, args)
        attach(trainer, cfg, tokens=tokens)
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-3") if resume else None)
        return [e for e in trainer.state.log_history if "str/penalty" in e]

    full = run(6, tmp_path / "full")
    run(3, tmp_path / "part", save=True)
    state = json.loads((tmp_path / "part" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["stateful_callbacks"][STATE_KEY]["step"] == 3
    resumed = run(6, tmp_path / "part", resume=True)
    tail = [(e["step"], e["str/penalty"], e["str/coef"]) for e in resumed if e["step"] > 3]
    expected = [(e["step"], e["str/penalty"], e["str/coef"]) for e in full if e["step"] > 3]
    assert [t[0] for t in tail] == [4, 5, 6]
    for (step, pen, coef), (step_e, pen_e, coef_e) in zip(tail, expected, strict=True):
        assert step == step_e and coef == coef_e
        assert math.isclose(pen, pen_e, rel_tol=1e-4), (step, pen, pen_e)
    assert [e["str/coef"] for e in full] == [0.0, 0.75, 1.5, 2.25, 3.0, 3.0]


def test_gradient_checkpointing_and_bf16(tmp_path: Path, tokenizer: Any, tokens: Any) -> None:
    rows = examples(tokenizer)
    args = common_args(tmp_path, 4, 2, steps=2, gradient_checkpointing=True)
    args["bf16"] = True
    args.update(learning_rate=1e-3)
    model = fresh_model()
    trainer = make_trainer("sft", model, tokenizer, rows, args)
    attach(trainer, training_positions({"coef": 1.0}), tokens=tokens)
    trainer.train()
    logged = [e for e in trainer.state.log_history if "str/penalty" in e]
    assert len(logged) == 2 and all(math.isfinite(e["str/penalty"]) for e in logged)
    assert not hasattr(unwrap_model(model), "_str_hooks_handle")


def test_reference_model_source_full_finetune(tmp_path: Path, tokenizer: Any, tokens: Any) -> None:
    """Full fine-tuning with a frozen reference copy: the Trainer path equals the hand-written loss."""
    rows = examples(tokenizer)
    model = make_model("qwen2")
    reference = copy.deepcopy(model).requires_grad_(False)
    before = trainable_snapshot(model)
    trainer = make_trainer("trainer", model, tokenizer, rows, common_args(tmp_path, 4, 2))
    attach(
        trainer,
        training_positions({"coef": COEF, "reference": {"source": "model"}}),
        tokens=tokens,
        reference_model=reference,
    )
    trainer.train()
    update = {n: before[n] - p for n, p in trainable_snapshot(model).items()}
    # After one step of SGD the update is the gradient at the start, where policy == reference: the
    # penalty gradient is zero, so this equals the CE gradient alone; check the penalty was applied by
    # a second check on drift instead.
    fresh = copy.deepcopy(reference).requires_grad_(True)
    batch = PadCollator(tokenizer.pad_token_id)(rows)
    fresh(**batch).loss.backward()
    expected = {n: p.grad.detach().clone() for n, p in fresh.named_parameters()}
    assert_grads_close(update, expected, rtol=1e-4)


def test_sft_assistant_only_loss_on_conversations(tmp_path: Path, tokenizer: Any, tokens: Any) -> None:
    """TRL's assistant-only masking (chat template with generation tags) on a conversational dataset:
    the update equals the hand-written loss on the very batch TRL's collator builds."""
    from str_hooks.prompts import default_texts

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}<|end|>"
        "{% else %}<|assistant|>{% generation %}{{ m['content'] }}<|end|>{% endgeneration %}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    prompts, answers = default_texts("benign_prompts"), default_texts("benign_contrast")
    conversations = [
        {
            "messages": [
                {"role": "user", "content": prompts[i]},
                {"role": "assistant", "content": answers[i][: 20 + 9 * i]},
            ]
        }
        for i in range(8)
    ]
    model = fresh_model()
    before = trainable_snapshot(model)
    args = common_args(tmp_path, 8, 1)
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(**args, assistant_only_loss=True, max_length=None),
        train_dataset=Dataset.from_list(conversations),
        processing_class=tok,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    assert (batch["labels"] == -100).any() and (batch["labels"] != -100).any()
    attach(trainer, training_positions({"coef": COEF}), tokens=tokens)
    trainer.train()
    update = {n: before[n] - p for n, p in trainable_snapshot(model).items()}
    reference = fresh_model()
    hand_written_loss(reference, batch, tokens.ids, tokens.weights, per_token=True).backward()
    assert_grads_close(
        update, {n: p.grad.detach().clone() for n, p in reference.named_parameters() if p.requires_grad}
    )


def test_reporting_callbacks_see_the_metrics(tmp_path: Path, tokenizer: Any, tokens: Any) -> None:
    """A reporting callback listed before STRCallback still receives str/* in on_log (the STR callback
    moves itself first, so its on_log runs before every reporter)."""
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        def __init__(self) -> None:
            self.seen: list[dict[str, float]] = []

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            self.seen.append(dict(logs or {}))

    recorder = Recorder()
    rows = examples(tokenizer)
    trainer = Trainer(
        model=fresh_model(),
        args=TrainingArguments(**common_args(tmp_path, 4, 1, steps=2)),
        train_dataset=rows,
        data_collator=PadCollator(tokenizer.pad_token_id),
        callbacks=[recorder, STRCallback(training_positions({"coef": 1.0}), tokens=tokens)],
    )
    trainer.train()
    train_logs = [logs for logs in recorder.seen if "loss" in logs]
    assert len(train_logs) == 2 and all("str/penalty" in logs for logs in train_logs)


def middle_gate(tokenizer: Any, tokens: Any) -> float:
    """A `min_reference_mass` that half of the examples' supervised positions pass on the fresh model (a tiny
    random model never "refuses"; midway between two masses so that rounding cannot move one across)."""
    batch = PadCollator(tokenizer.pad_token_id)(examples(tokenizer))
    model = fresh_model()
    with torch.no_grad(), model.disable_adapter():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    supervised = torch.zeros(batch["labels"].shape, dtype=torch.bool)
    supervised[:, :-1] = batch["labels"][:, 1:] != -100
    ordered = torch.softmax(logits, -1)[..., tokens.ids].sum(-1)[supervised].sort().values
    middle = len(ordered) // 2
    return float(ordered[middle - 1] + ordered[middle]) / 2


def test_rows_beside_anchors_add_up_and_accumulate(tmp_path: Path, tokenizer: Any, tokens: Any) -> None:
    """`reference.rows: adapter` through the HF Trainer (TRL's trainers score positions with a fused head that
    builds no logits, which the rows' coarse KL needs: refused there, like every coarse form at training
    positions): one step's update (SGD, lr 1: the gradient) is the
    anchors-only update plus the gated rows-only update (source `adapter`, the same gate) minus plain SFT's
    (the CE counted once), and the same at 8 x 1 and 4 x 2 (the anchors once per step, the rows normalized
    like the Trainer's token-summed CE)."""
    gate = middle_gate(tokenizer, tokens)
    anchors = anchor_config("separate", decision_point=True)
    with_rows = copy.deepcopy(anchors)
    with_rows["reference"]["rows"] = "adapter"
    with_rows["penalty"]["min_reference_mass"] = gate
    rows_only = {
        "coef": COEF,
        "penalty": {"form": "kl", "min_reference_mass": gate},
        "reference": {"source": "adapter"},
    }

    logged: dict[str, float] = {}

    def update(cfg: dict[str, Any] | None, ga: int) -> dict[str, torch.Tensor]:
        model = fresh_model()
        before = trainable_snapshot(model)
        trainer = make_trainer(
            "trainer", model, tokenizer, examples(tokenizer), common_args(tmp_path, 8 // ga, ga)
        )
        if cfg is not None:
            attach(trainer, cfg, tokens=tokens, tokenizer=tokenizer)
        trainer.train()
        logged.clear()
        logged.update(next(e for e in trainer.state.log_history if "loss" in e))
        return {n: before[n] - p for n, p in trainable_snapshot(model).items()}

    combined = {ga: update(with_rows, ga) for ga in (1, 2)}
    # The rows' own term and drift are logged beside the step's total penalty (prefix `str/`).
    assert logged["str/rows/penalty"] > 0 and "str/rows/drift" in logged
    assert 0 < logged["str/rows/gated"] < 1  # the gate between the two middle masses
    assert logged["str/penalty"] > logged["str/rows/penalty"]
    anchor_part, rows_part, plain = update(anchors, 1), update(rows_only, 1), update(None, 1)
    expected = {n: anchor_part[n] + rows_part[n] - plain[n] for n in plain}
    rows_effect = max(float((rows_part[n] - plain[n]).abs().max()) for n in plain)
    assert rows_effect > 1e-6  # the gated rows moved the update: the decomposition is not vacuous
    assert_grads_close(combined[1], expected, rtol=1e-4, atol=1e-7, what="anchors + rows")
    assert_grads_close(combined[2], combined[1], rtol=1e-4, atol=1e-7, what="GA 2 vs 1")
