"""One benign fine-tuning run of the aligned model, through the HF Trainer, with one method:
plain SFT, STR (via `str_hooks.integrations.hf.attach`), KL-SFT, or refusal-data mixing."""

from __future__ import annotations

import copy
import random
import re
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback, TrainingArguments

from str_hooks import build_reference_cache, mine_safety_tokens
from str_hooks.integrations.hf import attach
from str_hooks.schemas import STRConfig

from .data import Example, StudyData
from .model import collate, encode_example, exact_match, refusal_flags, refusal_rate
from .subject import decision_point_mass


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # plain | str | kl | mix
    str_config: dict[str, Any] = field(default_factory=dict)
    kl_beta: float = 1.0
    grad_accum: int = 1  # micro-batches of 16 rows per optimizer step
    # As a user would write it: `str_config` reaches `attach` exactly (the package's defaults fill the rest,
    # its shipped anchors included, and it mines its own tokens), nothing pinned, no study anchors.
    as_shipped: bool = False

    def __post_init__(self) -> None:
        # A method's name must keep meaning what its runs in results/ measured: the settings that the
        # package's defaults changed for (issue 12) are pinned to their values before, unless a method sets them.
        if self.kind != "str" or self.as_shipped:
            return
        config = copy.deepcopy(self.str_config)
        config.setdefault("penalty", {}).setdefault("form", "mse")
        reference = config.setdefault("reference", {})
        reference.setdefault("source", "adapter")
        if reference["source"] == "anchors":
            reference.setdefault("anchor_tokens", 1)
            reference.setdefault("benign_weight", 0.0)
        object.__setattr__(self, "str_config", config)


def _decision_method(form: str, coef: float, opening: int = 4, benign: float = 1.0) -> Method:
    """Folded anchors with form `form`, `anchor_tokens: opening` and `benign_weight: benign`, named by them."""
    parts = [f"STR anchors {form}"]
    if opening > 1:
        parts.append(f"open{opening}")
    if benign > 0:
        parts.append("benign" if benign == 1.0 else f"benign{benign:g}")
    reference: dict[str, Any] = {"source": "anchors", "anchor_placement": "folded"}
    if opening > 1:
        reference["anchor_tokens"] = opening
    if benign > 0:
        reference["benign_weight"] = benign
    return Method(
        f"{' '.join(parts)} c{coef:g} folded",
        "str",
        {"coef": coef, "penalty": {"form": form}, "reference": reference},
    )


METHODS = {
    m.name: m
    for m in [
        Method("plain SFT", "plain"),
        Method("mix 10% refusals", "mix"),
        Method("KL-SFT (full vocab, beta 1)", "kl"),
        Method("STR adapter mse c1", "str", {"coef": 1.0, "reference": {"source": "adapter"}}),
        Method(
            "STR adapter hinge c1",
            "str",
            {"coef": 1.0, "penalty": {"form": "hinge"}, "reference": {"source": "adapter"}},
        ),
        Method("STR model mse c1", "str", {"coef": 1.0, "reference": {"source": "model"}}),
        Method("STR cache mse c1", "str", {"coef": 1.0, "reference": {"source": "cache"}}),
        Method("STR anchors mse c10", "str", {"coef": 10.0, "reference": {"source": "anchors"}}),
        Method(
            "STR anchors mse c10 every 8",
            "str",
            {"coef": 10.0, "reference": {"source": "anchors", "anchor_every": 8}},
        ),
        Method(
            "STR anchors hinge c10",
            "str",
            {"coef": 10.0, "penalty": {"form": "hinge"}, "reference": {"source": "anchors"}},
        ),
        # The coefficient sweep that followed the main plan (see RESULTS.md).
        Method("STR adapter mse c10", "str", {"coef": 10.0, "reference": {"source": "adapter"}}),
        Method("STR adapter mse c100", "str", {"coef": 100.0, "reference": {"source": "adapter"}}),
        Method("STR anchors mse c3", "str", {"coef": 3.0, "reference": {"source": "anchors"}}),
        Method(
            "STR anchors mse c30 every 4",
            "str",
            {"coef": 30.0, "reference": {"source": "anchors", "anchor_every": 4}},
        ),
        Method(
            "STR anchors mse c100 every 8",
            "str",
            {"coef": 100.0, "reference": {"source": "anchors", "anchor_every": 8}},
        ),
        # Anchors folded into the training forward (issue 7): the same objective as a separate anchor
        # forward, then fewer anchors per step, to find how few tokens per step still keep the refusals.
        Method(
            "STR anchors mse c10 folded",
            "str",
            {"coef": 10.0, "reference": {"source": "anchors", "anchor_placement": "folded"}},
        ),
        # The coefficient curve of folded anchors on the real subject (c10 is the toy study's setting).
        Method(
            "STR anchors mse c1 folded",
            "str",
            {"coef": 1.0, "reference": {"source": "anchors", "anchor_placement": "folded"}},
        ),
        Method(
            "STR anchors mse c3 folded",
            "str",
            {"coef": 3.0, "reference": {"source": "anchors", "anchor_placement": "folded"}},
        ),
        Method(
            "STR anchors mse c10 folded, 2 per step",
            "str",
            {
                "coef": 10.0,
                "reference": {"source": "anchors", "anchor_placement": "folded", "anchor_batch_size": 2},
            },
        ),
        # The anchor term is a mean over the anchor batch: c40 on 2 anchors weighs each anchor as c10 on 8 does.
        Method(
            "STR anchors mse c40 folded, 2 per step",
            "str",
            {
                "coef": 40.0,
                "reference": {"source": "anchors", "anchor_placement": "folded", "anchor_batch_size": 2},
            },
        ),
        Method(
            "STR anchors mse c10 folded, 1 per step",
            "str",
            {
                "coef": 10.0,
                "reference": {"source": "anchors", "anchor_placement": "folded", "anchor_batch_size": 1},
            },
        ),
        # 4x the rows per optimizer step (gradient accumulation 4): the 8 folded anchors per step are then a
        # quarter of the share of the step's tokens. Compared with plain SFT at the same accumulation.
        Method("plain SFT, GA 4", "plain", grad_accum=4),
        Method(
            "STR anchors mse c10 folded, GA 4",
            "str",
            {"coef": 10.0, "reference": {"source": "anchors", "anchor_placement": "folded"}},
            grad_accum=4,
        ),
        # The decision-point methods (issue 12), each over a coefficient curve (study/decision.py): the coarse
        # KL and the log-probs at folded anchors over the aligned model's 4-token openings, with the package's
        # benign anchors at weight 1; their ablations; training-position STR at the answer's first 4 tokens.
        *[_decision_method("kl", coef) for coef in (1.0, 10.0, 100.0)],
        *[_decision_method("logprob", coef) for coef in (1.0, 3.0, 10.0)],
        _decision_method("kl", 10.0, opening=1, benign=0.0),
        _decision_method("kl", 10.0, opening=4, benign=0.0),
        *[
            Method(
                f"STR adapter mse first4 c{coef:g}",
                "str",
                {
                    "coef": coef,
                    "penalty": {"positions": "first_n", "first_n": 4},
                    "reference": {"source": "adapter"},
                },
            )
            for coef in (1.0, 10.0, 100.0)
        ],
        # The package's own anchor prompts, as a user without alignment data would run it.
        Method(
            "STR default-anchors mse c10",
            "str",
            {"coef": 10.0, "reference": {"source": "anchors"}},
            kl_beta=0.0,
        ),
        # Issue 26 (study/harmful_mixing.py): configs exactly as a user writes them, the package's defaults
        # filling the rest. `{}` is what every user gets.
        Method("STR as shipped {}", "str", {}, as_shipped=True),
        *[
            Method(
                f"STR adapter kl c{coef:g} (as written)",
                "str",
                {"coef": coef, "penalty": {"form": "kl"}, "reference": {"source": "adapter"}},
                as_shipped=True,
            )
            for coef in (1.0, 10.0)
        ],
        # Cheaper anchor steps (issue 26 item 4, issue 29 item 3): fewer anchors per step (the penalty is a
        # mean over points, so its expectation is unchanged), or the anchors folded into the training forward.
        *[
            Method(f"STR anchors {name} (as written)", "str", {"reference": reference}, as_shipped=True)
            for name, reference in (
                ("b8", {"anchor_batch_size": 8}),
                ("b4", {"anchor_batch_size": 4}),
                ("b2", {"anchor_batch_size": 2}),
                ("folded", {"anchor_placement": "folded"}),
                ("folded b4", {"anchor_placement": "folded", "anchor_batch_size": 4}),
                ("open2 b4", {"anchor_tokens": 2, "anchor_batch_size": 4}),
            )
        ],
        Method(
            "STR adapter kl first4 c10 (as written)",
            "str",
            {
                "coef": 10.0,
                "penalty": {"form": "kl", "positions": "first_n", "first_n": 4},
                "reference": {"source": "adapter"},
            },
            as_shipped=True,
        ),
    ]
}


@dataclass(frozen=True)
class Validation:
    """The validation split settings are chosen on: harmful training prompts that are neither anchors nor
    attack goals, XSTest safe prompts the held-out measure does not use, and task examples never trained on."""

    harmful: list[str]
    over_refusal: list[str]
    task: list[Example]

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
        return out


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


class _StepTimer(TrainerCallback):
    """Wall time of each optimizer step, and the refusal rate every `every` steps (not timed)."""

    def __init__(self, probe: Any, every: int) -> None:
        self.step_times: list[float] = []
        self.curve: list[tuple[int, float]] = []
        self.probe = probe
        self.every = every
        self._start = 0.0

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._start = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.step_times.append(time.perf_counter() - self._start)
        if self.every and state.global_step % self.every == 0:
            self.curve.append((state.global_step, self.probe(state.global_step)))


class _KLTrainer(Trainer):
    """KL-regularized SFT: CE + beta * KL(p_ref || p_theta) over the full vocabulary at supervised positions."""

    def __init__(self, *args: Any, beta: float, reference: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.beta = beta
        self.reference = reference

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        labels = inputs["labels"]
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        logits = outputs.logits[:, :-1].float()
        target = labels[:, 1:]
        keep = target != -100
        ce = F.cross_entropy(logits[keep], target[keep])
        with torch.no_grad():
            if self.reference is None:
                with model.disable_adapter():
                    ref = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
            else:
                ref = self.reference(
                    input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
                ).logits
            ref_logp = torch.log_softmax(ref[:, :-1].float()[keep], dim=-1)
        logp = torch.log_softmax(logits[keep], dim=-1)
        kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean()
        loss = ce + self.beta * kl
        return (loss, outputs) if return_outputs else loss


class _PeakRSS:
    """Peak resident memory above the level at start, sampled every 5 ms (CPU runs have no allocator
    statistics like torch.cuda.max_memory_allocated; this is coarse)."""

    def __enter__(self) -> _PeakRSS:
        self.process = psutil.Process()
        self.base = self.process.memory_info().rss
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def delta_mib(self) -> float:
        return (self.peak - self.base) / 2**20


def heldout_loss(model: Any, tokenizer: Any, examples: list[Example], max_len: int) -> float:
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), 32):
            rows = [encode_example(tokenizer, e.prompt, e.response, max_len) for e in examples[i : i + 32]]
            batch = collate(rows, tokenizer.pad_token_id)
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
) -> dict[str, Any]:
    """Fine-tune the aligned model on `task` with one method and measure it. `anchors` are the harmful
    anchor prompts (default: the aligned model's harmful training prompts); `mix_rows` the refusal rows a
    `mix` method adds (default: an anchor prompt with a refusal template); `decision_tokens` the refusal
    tokens whose probability mass at the first response position is reported (one forward, no generation);
    `save_dir` keeps the run's LoRA adapter (or full model) there; `validation` adds the `val_*` metrics
    that settings are chosen by (never the held-out ones); `evaluate=False` trains and times only (no
    generation before or after), for step-cost comparisons."""
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

    def probe(step: int) -> float:
        if decision_tokens:
            mass = decision_point_mass(model, tokenizer, data.harmful_heldout, decision_tokens)
            mass_curve.append((step, mass))
        return refusal_rate(model, tokenizer, probe_prompts, data.refusal_phrases)[0]

    timer = _StepTimer(probe, curve_every)
    workdir = Path(tempfile.mkdtemp(prefix="str-study-"))
    args = TrainingArguments(
        output_dir=str(workdir),
        per_device_train_batch_size=recipe.batch_size,
        gradient_accumulation_steps=method.grad_accum,
        num_train_epochs=epochs,
        max_steps=max_steps,
        learning_rate=lr,
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
    collator = _Collator(tokenizer.pad_token_id)
    trainer_cls: Any = Trainer
    extra: dict[str, Any] = {}
    if method.kind == "kl":
        trainer_cls = _KLTrainer
        extra = {"beta": method.kl_beta, "reference": reference}
    trainer = trainer_cls(
        model=model, args=args, train_dataset=train_rows, data_collator=collator, callbacks=[timer], **extra
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
    before = probe(0) if evaluate else 0.0
    with _PeakRSS() as memory:
        trainer.train()
    if not evaluate:
        return {
            "task": spec.task,
            "method": spec.method,
            "seed": spec.seed,
            "steps": trainer.state.global_step,
            "step_times_s": timer.step_times,
            "step_time_median_s": statistics.median(timer.step_times[3:] or timer.step_times),
            "peak_rss_delta_mib": memory.delta_mib,
            "anchor_token_share": anchor_token_share,
        }
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
    if test:  # the attack task has no utility to measure
        n_eval, new_tokens = recipe.task_eval[spec.task]
        task_em = exact_match(model, tokenizer, test[:n_eval], max_new_tokens=new_tokens, task=spec.task)
        task_loss = heldout_loss(model, tokenizer, test[:100], max_len)
    val_metrics = validation.measure(model, tokenizer, data, spec.task, max_len) if validation else {}
    if save_dir is not None:
        model.save_pretrained(str(save_dir / spec.name))
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    grad_norms = [e["grad_norm"] for e in trainer.state.log_history if "grad_norm" in e]
    half = len(losses) // 2
    times = timer.step_times[3:] or timer.step_times
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
        "step_time_median_s": statistics.median(times),
        "peak_rss_delta_mib": memory.delta_mib,
        "setup_seconds": setup_seconds,
        "anchor_token_share": anchor_token_share,
        "loss_std_second_half": statistics.pstdev(losses[half:]) if len(losses[half:]) > 1 else 0.0,
        "grad_norm_std": statistics.pstdev(grad_norms) if len(grad_norms) > 1 else 0.0,
        "refusal_curve": timer.curve,
        "sample_replies": replies[:3],
        # Per prompt, in order ("1" refused): retention can then be split by prompt (e.g. far from every anchor).
        "heldout_refused": refusal_flags(replies, data.refusal_phrases),
        "xstest_refused": refusal_flags(xstest_replies, data.refusal_phrases),
        **val_metrics,
    }


class _Collator:
    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        return collate(rows, self.pad_id)


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
