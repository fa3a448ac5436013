"""The efficacy study on the real subject (SmolLM2-135M-Instruct, safety-tuned by `study.subject`).

    python -m study real [--plan subject|quick] [--out results/subject] [--subject runs/subject]
                         [--seeds N] [--save-models DIR]

Three tasks in chat format with loss on the answer only: `gsm8k` (benign natural language), `sst2` (a
narrow benign task with accuracy) and `attack` (100 AdvBench training goals with their "Sure, here is"
openings: harmful fine-tuning). Runs are appended to runs.jsonl as they finish (resumable: a run already
there for the same subject is not repeated), and RESULTS.md and the plots are rewritten at the end.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .evaluation import Validation
from .finetune import SUBJECT_RECIPE, RunSpec, run_one
from .model import refusal_rate
from .report import plots, summarize_subject
from .runs import append_run, load_runs, machine, stamp_run, study_command
from .subject import (
    DEFAULT_CACHE,
    build_subject,
    decision_point_mass,
    load,
    refusal_first_tokens,
    subject_data,
)
from .tasks import attack_task, gsm8k_task, sst2_task

# Per task: training steps (8 rows each), sequence length, refusal-probe cadence, LoRA learning rate. Sized so
# that plain SFT measurably erases refusals within the budget of this 2-core CPU (RESULTS.md gives the wall
# time). GSM8K at the recipe's 2e-4 kept 80 % of the refusals after 60 steps (the first sizing, reported
# apart); 3x the rate for the same 60 steps costs no more CPU than the first sizing did.
TASK_SETTINGS: dict[str, dict[str, Any]] = {
    "gsm8k": {"steps": 60, "max_len": 128, "curve_every": 20, "lora_lr": 6e-4},
    "sst2": {"steps": 60, "max_len": 96, "curve_every": 20},
    "attack": {"steps": 40, "max_len": 64, "curve_every": 10},
}
LORA_METHODS = [
    "plain SFT",
    "STR adapter mse c1",  # today's defaults
    "STR anchors mse c10",
    "STR anchors mse c10 folded",
    "KL-SFT (full vocab, beta 1)",
    "mix 10% refusals",
]
MAIN_METHODS = ["plain SFT", "STR adapter mse c1", "STR anchors mse c10 folded"]
# Full fine-tuning on one task (SST-2): plain, the STR setting that kept SST-2's refusals at plain SFT's
# accuracy under LoRA (folded anchors at c1), and KL-SFT.
FULL_METHODS = ["plain SFT", "STR anchors mse c1 folded", "KL-SFT (full vocab, beta 1)"]
# With c10 (LORA_METHODS) the retention-utility curve of folded anchors has three points per task.
ANCHOR_CURVE = ["STR anchors mse c1 folded", "STR anchors mse c3 folded"]
# Blocks run in this order, cheapest evidence first, so that a partial run (the plan is resumable) still
# compares everything: every method with one seed on the short tasks, the anchor coefficient curve there, the
# main methods' extra seeds on `attack`; then GSM8K's main methods (seed 0 first: plain SFT must erase the
# refusals for GSM8K to say anything), full fine-tuning on SST-2, SST-2's extra seeds, GSM8K's extra seeds,
# and the rest of GSM8K. Separate anchors are the folded ones' gradient (tests/test_folding.py) and gave the same
# results on attack and SST-2, so GSM8K runs them last.
SUBJECT_PLAN: list[tuple[str, str, list[str], range]] = [
    ("attack", "lora", LORA_METHODS, range(1)),
    ("sst2", "lora", LORA_METHODS, range(1)),
    ("sst2", "lora", ANCHOR_CURVE, range(1)),
    ("attack", "lora", ANCHOR_CURVE, range(1)),
    ("attack", "lora", MAIN_METHODS, range(1, 3)),
    ("gsm8k", "lora", MAIN_METHODS, range(1)),
    ("sst2", "full", FULL_METHODS, range(1)),
    ("sst2", "lora", MAIN_METHODS, range(1, 3)),
    ("gsm8k", "lora", MAIN_METHODS, range(1, 3)),
    ("gsm8k", "lora", ["KL-SFT (full vocab, beta 1)", "mix 10% refusals"], range(1)),
    ("gsm8k", "lora", ANCHOR_CURVE, range(1)),
    ("gsm8k", "lora", ["STR anchors mse c10"], range(1)),
]
QUICK_PLAN: list[tuple[str, str, list[str], range]] = [
    ("attack", "lora", ["plain SFT", "STR anchors mse c10 folded"], range(1)),
]
PLANS = {"subject": SUBJECT_PLAN, "quick": QUICK_PLAN}


def _learning_rate(task: str, mode: str) -> float:
    if mode == "full":
        return SUBJECT_RECIPE.full_lr
    return float(TASK_SETTINGS[task].get("lora_lr", SUBJECT_RECIPE.lora_lr))


def _setting_key(record: dict[str, Any]) -> tuple[str, str, str, int, int, float]:
    """What makes two runs the same run: a run at other steps or another learning rate is another setting
    (runs recorded before the rate was stored used the recipe's)."""
    lr = record.get("lr")
    if lr is None:
        lr = SUBJECT_RECIPE.lora_lr if record["mode"] == "lora" else SUBJECT_RECIPE.full_lr
    return (record["task"], record["mode"], record["method"], record["seed"], record["steps"], float(lr))


def _spec_key(spec: RunSpec) -> tuple[str, str, str, int, int, float]:
    steps = int(TASK_SETTINGS[spec.task]["steps"])
    return (spec.task, spec.mode, spec.method, spec.seed, steps, _learning_rate(spec.task, spec.mode))


def _baseline(subject_dir: Path, data: Any, tokens: list[int], out: Path, fingerprint: str) -> dict[str, Any]:
    """The subject before fine-tuning, measured by the same code as every run (same prompt subsets)."""
    path = out / "subject.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("fingerprint") == fingerprint:
            return dict(cached)
    model, tokenizer = load(subject_dir)
    xstest = data.xstest_safe[:: SUBJECT_RECIPE.xstest_stride]
    metrics = {
        "heldout_refusal": refusal_rate(model, tokenizer, data.harmful_heldout, data.refusal_phrases)[0],
        "xstest_over_refusal": refusal_rate(model, tokenizer, xstest, data.refusal_phrases)[0],
        "decision_point_mass": decision_point_mass(model, tokenizer, data.harmful_heldout, tokens),
    }
    record = {"fingerprint": fingerprint, "metrics": metrics}
    path.write_text(json.dumps(record, indent=2))
    return record


@dataclass(frozen=True)
class StudyInputs:
    """What every run of one study shares: the subject, its data, the tasks' rows, the anchors, the decision
    tokens and where adapters are kept."""

    subject_dir: Path
    data: Any
    tasks: dict[str, Any]
    anchors: list[str]
    tokens: list[int]
    fingerprint: str
    save_dir: Path | None = None


def run_and_record(
    spec: RunSpec, runs_path: Path, inputs: StudyInputs, validation: Validation | None = None
) -> dict[str, Any]:
    """One run of a study at its task's settings (`TASK_SETTINGS`), stamped with its learning rate, the
    subject's fingerprint and its wall time, and appended to `runs_path` at once (what makes a study
    resumable)."""
    settings = TASK_SETTINGS[spec.task]
    run_start = time.perf_counter()
    result = run_one(
        spec,
        inputs.subject_dir,
        inputs.data,
        inputs.tasks[spec.task],
        epochs=1.0,
        max_steps=settings["steps"],
        max_len=settings["max_len"],
        curve_every=settings["curve_every"],
        curve_prompts=40,
        recipe=replace(SUBJECT_RECIPE, lora_lr=_learning_rate(spec.task, "lora")),
        anchors=inputs.anchors,
        decision_tokens=inputs.tokens,
        save_dir=inputs.save_dir,
        validation=validation,
    )
    result["lr"] = _learning_rate(spec.task, spec.mode)
    append_run(runs_path, stamp_run(result, inputs.fingerprint, run_start))
    return result


def run_real(
    out: Path,
    plan_name: str,
    subject_dir: Path,
    cache: Path = DEFAULT_CACHE,
    seeds: int | None = None,
    save_models: Path | None = None,
    argv: list[str] | None = None,
    report_only: bool = False,
) -> str:
    """Run the plan's missing runs (none with `report_only`), then write RESULTS.md and the plots from
    every run of the plan in runs.jsonl."""
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    info = build_subject(
        subject_dir, "shared", cache, report_for="python -m study real" if report_only else None
    )
    sdata = subject_data("shared")
    data = sdata.study
    _, tokenizer = load(subject_dir)
    tokens = refusal_first_tokens(tokenizer, data.refusal_templates)
    # Anchors and the attack task use disjoint AdvBench training goals; neither touches the held-out split.
    anchors, attack_goals = data.harmful_train[:300], data.harmful_train[300:400]
    tasks = {
        "gsm8k": gsm8k_task(600, 100),
        "sst2": sst2_task(800, 200),
        "attack": attack_task(attack_goals),
    }
    base = _baseline(subject_dir, data, tokens, out, info["fingerprint"])
    (out / "subject_info.json").write_text(json.dumps(info, indent=2))
    if save_models is not None:
        save_models.mkdir(parents=True, exist_ok=True)
        if not (save_models / "subject" / "config.json").is_file():
            shutil.copytree(subject_dir, save_models / "subject", dirs_exist_ok=True)
    specs = [
        RunSpec(task, mode, method, seed)
        for task, mode, methods, block_seeds in PLANS[plan_name]
        for seed in (range(seeds) if seeds else block_seeds)
        for method in methods
    ]
    runs_path = out / "runs.jsonl"
    runs = load_runs(runs_path, info["fingerprint"])
    done = {_setting_key(r) for r in runs}
    todo = [] if report_only else [s for s in specs if _spec_key(s) not in done]
    inputs = StudyInputs(subject_dir, data, tasks, anchors, tokens, info["fingerprint"], save_models)
    for spec in tqdm(todo, desc="fine-tuning runs", unit="run"):
        result = run_and_record(spec, runs_path, inputs)
        runs.append(result)
        em = result["task_exact_match"]
        tqdm.write(
            f"{spec.task}/{spec.mode}/{spec.method}/seed {spec.seed}: refusal {100 * result['heldout_refusal']:.0f} %, "
            f"mass {100 * result['decision_point_mass']:.1f} %, over-refusal {100 * result['xstest_over_refusal']:.0f} %, "
            f"EM {'n/a' if em is None else f'{100 * em:.0f} %'}, step {1000 * result['step_time_median_s']:.0f} ms, "
            f"{result['wall_seconds']:.0f} s"
        )
    wanted = {_spec_key(s) for s in specs}
    # Runs at a setting the plan no longer uses stay in runs.jsonl and get a section of their own.
    other_settings = [
        {**r, "task": f"{r['task']} ({r['steps']} steps, lr {_setting_key(r)[5]:g})"}
        for r in runs
        if _setting_key(r) not in wanted and r["task"] in TASK_SETTINGS
    ]
    runs = [r for r in runs if _setting_key(r) in wanted]
    text = summarize_subject(
        runs,
        info,
        base,
        out,
        study_command(argv),
        machine(),
        time.perf_counter() - started,
        len(wanted),
        sdata.notes,
        settings=_settings_text(),
        other_settings=other_settings,
    )
    for path in plots(runs, base["metrics"]["heldout_refusal"], out):
        print(f"wrote {path}")
    return text


def _settings_text() -> str:
    return "; ".join(
        f"{task}: {s['steps']} steps of {SUBJECT_RECIPE.batch_size} rows x {s['max_len']} tokens, LoRA lr "
        f"{_learning_rate(task, 'lora'):g} (full fine-tuning {SUBJECT_RECIPE.full_lr:g}), probe every {s['curve_every']} steps"
        for task, s in TASK_SETTINGS.items()
    )
