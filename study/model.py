"""The aligned test model: a small Llama with its own BPE tokenizer and chat template, trained on CPU in
minutes to refuse harmful requests (varied refusals) and answer benign ones, saved with save_pretrained.
Also the evaluation: greedy generation judged by the keyword rule, and exact match on checkable answers.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast

from str_hooks.probe import is_refusal
from str_hooks.prompts import encode_prompt
from str_hooks.testing import CHAT_TEMPLATE, pad_rows, train_bpe

from .data import Example, StudyData
from .tasks import task_correct


def build_tokenizer(texts: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = train_bpe(texts, vocab_size)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="<|end|>",
        pad_token="<pad>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|end|>"],
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def encode_example(tokenizer: Any, prompt: str, response: str, max_len: int) -> dict[str, list[int]]:
    """Chat-formatted ids with the prompt masked out of the labels (-100)."""
    prompt_ids = encode_prompt(tokenizer, prompt)
    response_ids = [*tokenizer(response, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    ids = (prompt_ids + response_ids)[:max_len]
    labels = ([-100] * len(prompt_ids) + response_ids)[:max_len]
    return {"input_ids": ids, "labels": labels}


def train_epochs(
    model: Any,
    encoded: Sequence[dict[str, list[int]]],
    pad_id: int,
    optimizer: torch.optim.Optimizer,
    schedule: Any,
    epochs: int,
    batch_size: int,
    seed: int,
    desc: str,
    state_path: Path | None = None,
    save_every: int = 50,
    head_on_labels: bool = False,
) -> int:
    """Plain supervised epochs over `encoded` rows in a seeded order, gradient norm clipped to 1.

    With `state_path`, the trainable parameters, optimizer and schedule are saved there every `save_every`
    steps, and a run that finds the file resumes after its step: the batches before it are skipped in the same
    seeded order, so a stopped and resumed run takes the same steps as one that was never stopped (a build of
    several CPU hours, such as the Gemma subject's, then spans sessions). Returns the step it resumed after
    (0 for a fresh run). `head_on_labels` projects to the vocabulary only where a label is predicted
    (`labelled_loss`): the same loss, at a fraction of the head's cost where the vocabulary is large (Gemma's
    262k)."""
    generator = torch.Generator().manual_seed(seed)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    done = 0
    if state_path is not None and state_path.is_file():
        state = torch.load(state_path, weights_only=True)
        with torch.no_grad():
            for name, value in state["trainable"].items():
                trainable[name].copy_(value)
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        done = int(state["step"])
        print(f"[train] {desc}: resuming after step {done} ({state_path})", flush=True)
    model.train()
    bar = tqdm(total=epochs * math.ceil(len(encoded) / batch_size), desc=desc, unit="step", initial=done)
    step = 0
    for _ in range(epochs):
        order = torch.randperm(len(encoded), generator=generator).tolist()
        for i in range(0, len(order), batch_size):
            step += 1
            if step <= done:
                continue
            batch = pad_rows([encoded[j] for j in order[i : i + batch_size]], pad_id)
            loss = labelled_loss(model, batch) if head_on_labels else model(**batch, use_cache=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
            if state_path is not None and step % save_every == 0:
                _save_training_state(state_path, step, trainable, optimizer, schedule)
    bar.close()
    return done


def labelled_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The causal LM loss (mean over labelled tokens, as `model(**batch).loss`), with logits computed only at
    the positions that predict a label (transformers' boolean `logits_to_keep`)."""
    labels = batch["labels"]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits.float(), labels[:, 1:][keep[:, :-1]])


def _save_training_state(
    path: Path, step: int, trainable: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, schedule: Any
) -> None:
    """Write the resumable state whole or not at all (a run stopped mid-write keeps the previous one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".writing")
    state = {
        "step": step,
        "trainable": {name: p.detach().clone() for name, p in trainable.items()},
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
    }
    torch.save(state, partial)
    partial.replace(path)


def _fingerprint(data: StudyData, extra: dict[str, Any]) -> str:
    h = hashlib.sha256()
    for e in data.aligned_train:
        h.update(f"{e.prompt}\x00{e.response}\x01".encode())
    h.update(json.dumps(extra, sort_keys=True).encode())
    return h.hexdigest()[:16]


def train_aligned(
    data: StudyData,
    out: Path,
    task_texts: Sequence[str],
    *,
    hidden: int = 192,
    layers: int = 4,
    vocab_size: int = 3000,
    epochs: int = 4,
    lr: float = 3e-3,
    batch_size: int = 32,
    seed: int = 0,
) -> tuple[Any, Any, dict[str, Any]]:
    """Train (or load, when `out` holds a model built from the same data and settings) the aligned model."""
    settings = {
        "hidden": hidden,
        "layers": layers,
        "vocab": vocab_size,
        "epochs": epochs,
        "lr": lr,
        "bs": batch_size,
        "seed": seed,
    }
    fingerprint = _fingerprint(data, settings)
    info_path = out / "aligned_info.json"
    if info_path.is_file() and json.loads(info_path.read_text()).get("fingerprint") == fingerprint:
        info = json.loads(info_path.read_text())
        return AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out), info
    # The tokenizer sees every text the study uses (vocabulary only; no model is trained on held-out text).
    corpus = [e.prompt for e in data.aligned_train] + [e.response for e in data.aligned_train]
    corpus += data.harmful_heldout + data.xstest_safe + list(data.refusal_templates) + list(task_texts)
    tokenizer = build_tokenizer(corpus, vocab_size)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3 // 16 * 16,
        num_hidden_layers=layers,
        num_attention_heads=max(hidden // 32, 1),
        num_key_value_heads=max(hidden // 32, 1),
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    encoded = [encode_example(tokenizer, e.prompt, e.response, 96) for e in data.aligned_train]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps = epochs * math.ceil(len(encoded) / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    start = time.perf_counter()
    train_epochs(
        model, encoded, tokenizer.pad_token_id, optimizer, schedule, epochs, batch_size, seed, "aligned model"
    )
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    info = {
        "fingerprint": fingerprint,
        "settings": settings,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_examples": len(encoded),
        "train_seconds": round(time.perf_counter() - start, 1),
    }
    info_path.write_text(json.dumps(info, indent=2))
    return AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out), info


def left_padded_prompts(tokenizer: Any, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Chat-formatted prompts as one left-padded batch: (input_ids, attention_mask)."""
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, e in enumerate(encoded):
        ids[row, width - len(e) :] = torch.tensor(e)
        mask[row, width - len(e) :] = 1
    return ids, mask


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 14,
    batch_size: int = 64,
    desc: str | None = None,
) -> list[str]:
    """Greedy replies, left-padded batches; the model's train/eval flags are restored. `desc` shows a
    progress bar over the batches."""
    was_training = model.training
    model.eval()
    replies: list[str] = []
    starts = range(0, len(prompts), batch_size)
    try:
        for start in starts if desc is None else tqdm(starts, desc=desc, unit="batch"):
            ids, mask = left_padded_prompts(tokenizer, prompts[start : start + batch_size])
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            replies += [
                tokenizer.decode(out[r, ids.shape[1] :], skip_special_tokens=True) for r in range(len(ids))
            ]
    finally:
        model.train(was_training)
    return replies


def refusal_rate(
    model: Any, tokenizer: Any, prompts: Sequence[str], phrases: Sequence[str]
) -> tuple[float, list[str]]:
    replies = generate(model, tokenizer, prompts)
    return sum(is_refusal(r, phrases) for r in replies) / max(len(replies), 1), replies


def refusal_flags(replies: Sequence[str], phrases: Sequence[str]) -> str:
    """One character per reply, "1" where it is a refusal: a compact per-prompt record."""
    return "".join("1" if is_refusal(r, phrases) else "0" for r in replies)


def task_outcomes(
    model: Any, tokenizer: Any, examples: Sequence[Example], max_new_tokens: int = 14, task: str = "sort"
) -> tuple[str, list[str]]:
    """Per example, in order, "1" where the reply solves it (`study.data.task_correct`; for checkable
    benign prompts, the answer after 'The answer is'), with the replies: a wrong answer can then be told
    from a refusal."""
    replies = generate(model, tokenizer, [e.prompt for e in examples], max_new_tokens=max_new_tokens)
    flags = []
    for example, reply in zip(examples, replies, strict=True):
        assert example.answer is not None
        flags.append("1" if task_correct(task, example.answer, reply) else "0")
    return "".join(flags), replies


def exact_match(
    model: Any, tokenizer: Any, examples: Sequence[Example], max_new_tokens: int = 14, task: str = "sort"
) -> float:
    """Fraction of replies that solve the example (see `task_outcomes`)."""
    flags, _ = task_outcomes(model, tokenizer, examples, max_new_tokens, task)
    return flags.count("1") / max(len(examples), 1)


def evaluate_aligned(model: Any, tokenizer: Any, data: StudyData) -> dict[str, float]:
    harmful, _ = refusal_rate(model, tokenizer, data.harmful_heldout, data.refusal_phrases)
    xstest, _ = refusal_rate(model, tokenizer, data.xstest_safe, data.refusal_phrases)
    benign_acc = exact_match(model, tokenizer, data.benign_check_heldout)
    benign_refusal, _ = refusal_rate(
        model, tokenizer, [e.prompt for e in data.benign_check_heldout], data.refusal_phrases
    )
    return {
        "heldout_refusal": harmful,
        "xstest_over_refusal": xstest,
        "benign_accuracy": benign_acc,
        "benign_refusal": benign_refusal,
    }
