"""Running the decision-point study (study/decision.py): the subject's baseline, the plan resolved again after
every run (resumable through runs.jsonl), then the report."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .decision import CURVE_METHODS, PLANS, _specs, current_runs, splits
from .decision_report import curves_plot, report
from .distances import far_from_anchors
from .evaluation import Validation
from .finetune import SUBJECT_RECIPE
from .model import refusal_flags, refusal_rate
from .real import TASK_SETTINGS, StudyInputs, _setting_key, _spec_key, run_and_record
from .runs import load_runs, machine, study_command
from .subject import DEFAULT_CACHE, build_subject, load, refusal_first_tokens, subject_data


def _baseline(
    subject_dir: Path, data: Any, validation: Validation, out: Path, fingerprint: str
) -> dict[str, Any]:
    """The subject's refusal on the validation prompts (retention's denominator for selection) and on the
    held-out ones, measured by the runs' own code."""
    path = out / "subject.json"
    cached = json.loads(path.read_text()) if path.is_file() else {}
    if cached.get("fingerprint") == fingerprint and "heldout_refused" in cached:
        return dict(cached)
    model, tokenizer = load(subject_dir)
    heldout, replies = refusal_rate(model, tokenizer, data.harmful_heldout, data.refusal_phrases)
    if cached.get("fingerprint") == fingerprint:
        # A cache from before per-prompt refusals were recorded: add them, keep the numbers runs were
        # selected by (the flags' mean is stored beside them, to show whether generation reproduced them).
        record = {
            **cached,
            "heldout_refused": refusal_flags(replies, data.refusal_phrases),
            "heldout_refusal_now": heldout,
        }
        path.write_text(json.dumps(record, indent=2))
        return record
    record = {
        "fingerprint": fingerprint,
        "val_refusal": refusal_rate(model, tokenizer, validation.harmful, data.refusal_phrases)[0],
        "val_over_refusal": refusal_rate(model, tokenizer, validation.over_refusal, data.refusal_phrases)[0],
        "heldout_refusal": heldout,
        "heldout_refused": refusal_flags(replies, data.refusal_phrases),
        "xstest_over_refusal": refusal_rate(
            model, tokenizer, data.xstest_safe[:: SUBJECT_RECIPE.xstest_stride], data.refusal_phrases
        )[0],
    }
    path.write_text(json.dumps(record, indent=2))
    return record


def run_decision(
    out: Path,
    plan_name: str,
    subject_dir: Path,
    cache: Path = DEFAULT_CACHE,
    save_models: Path | None = None,
    argv: list[str] | None = None,
    report_only: bool = False,
) -> str:
    """Run what is left of the plan, then rewrite the report from every recorded run."""
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    info = build_subject(
        subject_dir, "shared", cache, report_for="python -m study decision" if report_only else None
    )
    data = subject_data("shared").study
    _, tokenizer = load(subject_dir)
    tokens = refusal_first_tokens(tokenizer, data.refusal_templates)
    anchors, tasks, validation = splits(data)
    base = _baseline(subject_dir, data, validation["attack"], out, info["fingerprint"])
    runs_path = out / "runs.jsonl"
    recorded = load_runs(runs_path, info["fingerprint"])
    # Selection and the report compare runs by method name: only runs at today's task settings take part
    # (runs at other steps or rates stay in runs.jsonl and are counted in the report).
    runs = current_runs(recorded)
    other_settings = len(recorded) - len(runs)
    plan = PLANS[plan_name]
    inputs = StudyInputs(subject_dir, data, tasks, anchors, tokens, info["fingerprint"], save_models)
    while not report_only:
        # Resolve the plan again after every run: a finished curve unlocks its family's extra seeds (and every
        # task's curves, the default's).
        specs, _ = _specs(plan, runs, base)
        done = {_setting_key(r) for r in runs}
        todo = [s for s in specs if _spec_key(s) not in done]
        if not todo:
            break
        spec = todo[0]
        tqdm.write(f"[{len(done)} done, {len(todo)} to go in the resolved plan] {spec.name}")
        result = run_and_record(spec, runs_path, inputs, validation[spec.task])
        runs.append(result)
        tqdm.write(
            f"{spec.task}/{spec.method}/seed {spec.seed}: val refusal {100 * result['val_refusal']:.0f} %, held-out "
            f"{100 * result['heldout_refusal']:.0f} %, {result['wall_seconds']:.0f} s"
        )
    specs, notes = _specs(plan, runs, base)
    wanted = {_spec_key(s) for s in specs} | {
        _setting_key(r) for r in runs if r["method"] in CURVE_METHODS or r["seed"] > 0
    }
    runs = [r for r in runs if _setting_key(r) in wanted and r["task"] in TASK_SETTINGS]
    if other_settings:
        notes.append(f"{other_settings} runs in runs.jsonl at other task settings are left out")
    far = far_from_anchors(data.harmful_heldout, anchors)
    text = report(
        runs, base, out, study_command(argv), machine(), len(specs), notes, time.perf_counter() - started, far
    )
    path = curves_plot(runs, base, out / "retention_utility_curves.png")
    if path is not None:
        print(f"wrote {path}")
    return text
