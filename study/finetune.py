"""One benign fine-tuning run of the aligned model, through the HF Trainer, with one method:
plain SFT, STR (via `str_hooks.integrations.hf.attach`), KL-SFT, or refusal-data mixing."""

from __future__ import annotations

import copy
import random
import re
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainingArguments

from str_hooks import build_reference_cache, mine_safety_tokens
from str_hooks.integrations.hf import attach
from str_hooks.schemas import STRConfig

from .data import Example, StudyData
from .evaluation import Validation, heldout_loss, label_margins
from .methods import METHODS, Method
from .model import encode_example, refusal_flags, refusal_rate, task_outcomes
from .step_times import step_time
from .subject import decision_point_mass
from .tasks import BINARY_LABELS
from .trainer import CheckpointEval, Collator, KLTrainer, PeakRSS, StepBar, StepTimer


@dataclass
class RunSpec:
    task: str  # sort | gsm8k | sst2 | attack
    mode: str  # lora | full
    method: str
    seed: int

    @property
    def name(self) -> str:
        """A folder name for the run's saved adapter."""
        slug = re.sub(r"[^a-z0-9]+", "-", self.method.lower()).strip("-")
        return f"{self.task}-{self.mode}-{slug}-seed{self.seed}"


@dataclass(frozen=True)
class Recipe:
    """How runs train and are evaluated. The defaults are the toy model's; `SUBJECT_RECIPE` is the real
    subject's (smaller batches and learning rate, the LM head left alone because it is tied)."""

    batch_size: int = 16
    lora_lr: float = 5e-3
    full_lr: float = 1e-3
    lora_targets: tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
        "lm_head",
    )
    # The Trainer's clipping of the summed gradient (0: none); `python -m study demo-check` turns it off.
    max_grad_norm: float = 1.0
    xstest_stride: int = 1  # evaluate every n-th XSTest safe prompt (its 10 types come in blocks of 25)
    task_eval: dict[str, tuple[int, int]] = field(
        default_factory=lambda: {"sort": (100, 24), "gsm8k": (50, 96)}
    )  # task -> (test examples, new tokens) for exact match


SUBJECT_RECIPE = Recipe(
    batch_size=8,
    lora_lr=2e-4,
    full_lr=2e-5,
    lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    xstest_stride=2,
    task_eval={"gsm8k": (40, 160), "sst2": (200, 3)},
)


def run_one(
    spec: RunSpec,
    aligned_dir: Path,
    data: StudyData,
    task: tuple[list[Example], list[Example]],
    *,
    epochs: float,
    max_len: int,
    curve_every: int,
    curve_prompts: int = 40,
    max_steps: int = -1,
    recipe: Recipe = Recipe(),
    anchors: list[str] | None = None,
    decision_tokens: list[int] | None = None,
    save_dir: Path | None = None,
    validation: Validation | None = None,
    mix_rows: list[Example] | None = None,
    evaluate: bool = True,
    curve_task_loss: bool = False,
    progress: str | None = None,
    probe_before: bool = True,
    keep_replies: bool = False,
    last_point_from_evaluation: bool = False,
    extra_callbacks: Sequence[Any] = (),
    checkpoints: Sequence[int] = (),
    checkpoint_stride: int = 2,
) -> dict[str, Any]:
    """Fine-tune the aligned model on `task` with one method and measure it. `anchors` are the harmful
    anchor prompts (default: the aligned model's harmful training prompts); `mix_rows` the refusal rows a
    `mix` method adds (default: an anchor prompt with a refusal template); `decision_tokens` the refusal
    tokens whose probability mass at the first response position is reported (one forward, no generation);
    `save_dir` keeps the run's LoRA adapter (or full model) there; `validation` adds the `val_*` metrics
    that settings are chosen by (never the held-out ones); `evaluate=False` trains and times only (no
    generation before or after), for step-cost comparisons; `curve_task_loss` adds the held-out task loss
    at every probe; `progress` names a progress bar over the run's steps; `probe_before=False` leaves the
    step-0 probe (the untouched subject, the same for every run) to the caller; `keep_replies` adds every
    evaluation reply (`replies`: harmful, over_refusal, task) for a judge applied afterwards;
    `last_point_from_evaluation` takes the curves' last point from the final evaluation instead of a probe
    that would measure the same prompts again (the demo, whose probe prompts are the held-out set);
    `extra_callbacks` are added to the Trainer's (diagnostics that watch the steps); after each optimizer step
    in `checkpoints` (other than the last, which the final evaluation measures) the model is evaluated on the way
    (`checkpoint_evals`: every `checkpoint_stride`-th harmful and over-refusal prompt, every task test example),
    its adapter kept under `save_dir` when given."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    method = METHODS[spec.method]
    torch.manual_seed(spec.seed)
    random.seed(spec.seed)
    tokenizer = AutoTokenizer.from_pretrained(aligned_dir)
    base: Any = AutoModelForCausalLM.from_pretrained(aligned_dir)
    reference = None
    if spec.mode == "lora":
        model: Any = get_peft_model(
            base,
            LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=list(recipe.lora_targets)),
        )
        lr = recipe.lora_lr
    else:
        model = base
        reference = copy.deepcopy(base).requires_grad_(False).eval()
        lr = recipe.full_lr
    anchor_prompts = anchors if anchors is not None else data.harmful_train
    xstest = data.xstest_safe[:: recipe.xstest_stride]
    train, test = task
    train_rows = [encode_example(tokenizer, e.prompt, e.response, max_len) for e in train]
    if method.kind == "mix":
        rng = random.Random(spec.seed)
        n_mix = len(train_rows) // 9  # 10 % of the mixed set
        if mix_rows is not None:
            if len(mix_rows) < n_mix:
                raise ValueError(f"mix_rows has {len(mix_rows)} rows, the mix needs {n_mix}")
            train_rows += [encode_example(tokenizer, e.prompt, e.response, max_len) for e in mix_rows[:n_mix]]
        else:
            train_rows += [
                encode_example(
                    tokenizer, rng.choice(anchor_prompts), rng.choice(data.refusal_templates), max_len
                )
                for _ in range(n_mix)
            ]
    probe_prompts = data.harmful_heldout[:curve_prompts]
    mass_curve: list[tuple[int, float]] = []
    task_loss_curve: list[tuple[int, float]] = []

    def probe(step: int) -> float:
        if curve_task_loss:
            task_loss_curve.append((step, heldout_loss(model, tokenizer, test[:100], max_len)))
        if decision_tokens:
            mass = decision_point_mass(model, tokenizer, data.harmful_heldout, decision_tokens)
            mass_curve.append((step, mass))
        return refusal_rate(model, tokenizer, probe_prompts, data.refusal_phrases)[0]

    timer = StepTimer(probe, curve_every, skip_last=last_point_from_evaluation)
    checkpoint_evals: list[dict[str, Any]] = []

    def evaluate_checkpoint(step: int) -> None:
        from .judge import opening_flags

        started = time.perf_counter()
        if step == trainer.state.max_steps:  # the final evaluation measures it, on every prompt
            return
        phrases = data.refusal_phrases
        harmful = refusal_rate(model, tokenizer, data.harmful_heldout[::checkpoint_stride], phrases)[1]
        over = refusal_rate(model, tokenizer, xstest[::checkpoint_stride], phrases)[1]
        record: dict[str, Any] = {
            "step": step,
            "harmful_refused": refusal_flags(harmful, phrases),
            "harmful_opening": opening_flags(harmful, phrases),
            "over_refused": refusal_flags(over, phrases),
            "over_opening": opening_flags(over, phrases),
        }
        if test:
            n_eval, new_tokens = recipe.task_eval[spec.task]
            correct, replies = task_outcomes(
                model, tokenizer, test[:n_eval], max_new_tokens=new_tokens, task=spec.task
            )
            record.update(task_correct=correct, task_refused=refusal_flags(replies, phrases))
        if keep_replies:
            record["replies"] = {"harmful": harmful, "over_refusal": over, "task": replies if test else []}
        if save_dir is not None:
            model.save_pretrained(str(save_dir / f"{spec.name}-step{step}"))
        record["seconds"] = round(time.perf_counter() - started, 1)
        checkpoint_evals.append(record)

    workdir = Path(tempfile.mkdtemp(prefix="str-study-"))
    args = TrainingArguments(
        output_dir=str(workdir),
        per_device_train_batch_size=recipe.batch_size,
        gradient_accumulation_steps=method.grad_accum,
        num_train_epochs=epochs,
        max_steps=max_steps,
        learning_rate=lr,
        max_grad_norm=recipe.max_grad_norm,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        logging_steps=5,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=spec.seed,
        data_seed=spec.seed,
        remove_unused_columns=False,
        bf16=False,
    )
    collator = Collator(tokenizer.pad_token_id)
    trainer_cls: Any = Trainer
    extra: dict[str, Any] = {}
    if method.kind == "kl":
        trainer_cls = KLTrainer
        extra = {"beta": method.kl_beta, "reference": reference}
    callbacks: list[Any] = [timer] if progress is None else [timer, StepBar(progress)]
    callbacks += list(extra_callbacks)
    if checkpoints:
        callbacks.append(CheckpointEval(checkpoints, evaluate_checkpoint))
    trainer = trainer_cls(
        model=model, args=args, train_dataset=train_rows, data_collator=collator, callbacks=callbacks, **extra
    )
    setup_seconds = 0.0
    if method.kind == "str":
        cfg = copy.deepcopy(method.str_config)
        setup_start = time.perf_counter()
        # As shipped, the package mines its own tokens from its config (the same default: k 32, frequency).
        tokens = None if method.as_shipped else mine_safety_tokens(tokenizer, k=32)
        source = STRConfig.model_validate(cfg).reference.source
        if source == "cache":
            cache_path = workdir / "reference.safetensors"
            build_reference_cache(
                model,
                tokens if tokens is not None else mine_safety_tokens(tokenizer, k=32),
                [r["input_ids"] for r in train_rows],
                cache_path,
                progress=False,
            )
            cfg["reference"]["cache_path"] = str(cache_path)
        if source == "model" and reference is None:
            reference = AutoModelForCausalLM.from_pretrained(aligned_dir).requires_grad_(False).eval()
        if source == "anchors" and "default-anchors" not in spec.method and not method.as_shipped:
            cfg["reference"]["anchors_path"] = str(_write_lines(workdir / "anchors.txt", anchor_prompts))
        attach(
            trainer,
            cfg,
            tokens=tokens,
            tokenizer=tokenizer,
            reference_model=reference if source == "model" else None,
        )
        setup_seconds = time.perf_counter() - setup_start
    anchor_token_share = _anchor_token_share(method, tokenizer, anchor_prompts, train_rows, args)
    before = probe(0) if evaluate and probe_before else None
    with PeakRSS() as memory:
        trainer.train()
    if not evaluate:
        return {
            "task": spec.task,
            "method": spec.method,
            "seed": spec.seed,
            "steps": trainer.state.global_step,
            "step_times_s": timer.step_times,
            "step_time_median_s": step_time(timer.step_times, method.anchor_every),
            "peak_rss_delta_mib": memory.delta_mib,
            "anchor_token_share": anchor_token_share,
        }
    if before is not None:
        timer.curve.insert(0, (0, before))
    if decision_tokens and (not mass_curve or mass_curve[-1][0] != trainer.state.global_step):
        mass_curve.append(
            (
                trainer.state.global_step,
                decision_point_mass(model, tokenizer, data.harmful_heldout, decision_tokens),
            )
        )
    model.eval()
    refusal, replies = refusal_rate(model, tokenizer, data.harmful_heldout, data.refusal_phrases)
    over_refusal, xstest_replies = refusal_rate(model, tokenizer, xstest, data.refusal_phrases)
    task_em: float | None = None
    task_loss: float | None = None
    task_record: dict[str, Any] = {}
    task_replies: list[str] = []
    if test:  # the attack task has no utility to measure
        n_eval, new_tokens = recipe.task_eval[spec.task]
        correct, task_replies = task_outcomes(
            model, tokenizer, test[:n_eval], max_new_tokens=new_tokens, task=spec.task
        )
        task_em = correct.count("1") / max(len(correct), 1)
        # Per test example: whether a lost point is a refusal of the task or a wrong answer.
        task_record = {
            "task_correct": correct,
            "task_refused": refusal_flags(task_replies, data.refusal_phrases),
        }
        task_loss = heldout_loss(model, tokenizer, test[:100], max_len)
        if spec.task in BINARY_LABELS:
            margins = label_margins(
                model, tokenizer, [e.prompt for e in test[:n_eval]], BINARY_LABELS[spec.task]
            )
            task_record["task_label_margins"] = [round(m, 4) for m in margins]
    step = trainer.state.global_step
    if last_point_from_evaluation and curve_every and step % curve_every == 0:
        probed = refusal_flags(replies, data.refusal_phrases)[: len(probe_prompts)]
        timer.curve.append((step, probed.count("1") / max(len(probed), 1)))
        if curve_task_loss and task_loss is not None:
            task_loss_curve.append((step, task_loss))
    val_metrics = validation.measure(model, tokenizer, data, spec.task, max_len) if validation else {}
    if save_dir is not None:
        model.save_pretrained(str(save_dir / spec.name))
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    grad_norms = [e["grad_norm"] for e in trainer.state.log_history if "grad_norm" in e]
    half = len(losses) // 2
    return {
        "task": spec.task,
        "mode": spec.mode,
        "method": spec.method,
        "seed": spec.seed,
        "steps": trainer.state.global_step,
        "heldout_refusal": refusal,
        "xstest_over_refusal": over_refusal,
        "task_exact_match": task_em,
        "task_heldout_loss": task_loss,
        "decision_point_mass": mass_curve[-1][1] if mass_curve else None,
        "decision_point_curve": mass_curve,
        "step_time_median_s": step_time(timer.step_times, method.anchor_every),
        "step_times_s": [round(t, 4) for t in timer.step_times],  # every step: a median hides cadences
        "peak_rss_delta_mib": memory.delta_mib,
        "setup_seconds": setup_seconds,
        "anchor_token_share": anchor_token_share,
        "loss_std_second_half": statistics.pstdev(losses[half:]) if len(losses[half:]) > 1 else 0.0,
        "grad_norm_std": statistics.pstdev(grad_norms) if len(grad_norms) > 1 else 0.0,
        # Before clipping (the Trainer clips the summed gradient at `recipe.max_grad_norm`): how hard a penalty
        # pulls against the task (results/demo_check: the clipping itself is not what costs the task).
        "grad_norm_median": statistics.median(grad_norms) if grad_norms else None,
        "refusal_curve": timer.curve,
        **(
            {"checkpoint_evals": checkpoint_evals, "checkpoint_stride": checkpoint_stride}
            if checkpoints
            else {}
        ),
        # The package's own probe (`probe.every`), where the method's config turns it on: (step, refusal rate).
        "live_refusal_curve": [
            (e["step"], e["str/refusal_rate"]) for e in trainer.state.log_history if "str/refusal_rate" in e
        ],
        "task_loss_curve": task_loss_curve,
        "sample_replies": replies[:3],
        # Per prompt, in order ("1" refused): retention can then be split by prompt (e.g. far from every anchor).
        "heldout_refused": refusal_flags(replies, data.refusal_phrases),
        "xstest_refused": refusal_flags(xstest_replies, data.refusal_phrases),
        **task_record,
        **val_metrics,
        **(
            {"replies": {"harmful": replies, "over_refusal": xstest_replies, "task": task_replies}}
            if keep_replies
            else {}
        ),
    }


def _anchor_token_share(
    method: Method, tokenizer: Any, anchors: list[str], train_rows: list[dict[str, Any]], args: Any
) -> float | None:
    """Anchor prompt tokens per optimizer step over training tokens per step (what folding adds)."""
    if method.kind != "str":  # an empty str_config would validate to the anchors default
        return None
    reference = STRConfig.model_validate(method.str_config).reference
    if reference.source != "anchors":
        return None
    from str_hooks.prompts import default_texts, encode_prompt

    if method.as_shipped and reference.anchors_path is None:  # the package's own anchors
        anchors = default_texts("harmful_anchors")
        if reference.benign_weight > 0:
            anchors += default_texts("benign_anchors")
    # An opening of n tokens teacher-forces its first n - 1 after the prompt.
    anchor_len = statistics.fmean(len(encode_prompt(tokenizer, t)) for t in anchors)
    anchor_len += reference.anchor_tokens - 1
    row_len = statistics.fmean(len(r["input_ids"]) for r in train_rows)
    per_step = reference.anchor_batch_size * anchor_len / reference.anchor_every
    rows_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps
    return per_step / (rows_per_step * row_len)


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
