"""`python -m study demo-check`: why does `{}` cost the demo's task? Two hypotheses, each run on the demo's own
subject, task, settings and seed (study/demo.py):

- gradient clipping: `{}`'s median gradient norm before clipping is 4-5x plain SFT's, and the Trainer clips the
  summed gradient at norm 1. Plain SFT and `{}` with clipping off (`max_grad_norm: 0`) beside clipping on: if
  clipping takes the task's share, turning it off closes the gap. (Under AdamW a uniform rescaling of the
  gradient barely moves the update, which argues against it before any run.)
- the anchor term's sampling noise at 2 anchors a step (the harmful-mixing study's SST-2 reading): the same
  coef over 8 anchors a step (`{"coef": 30, "reference": {"anchor_batch_size": 8}}`), clipping on.

Resumable (runs.jsonl, keyed by setting, method and clipping); about 11 minutes alone on 2 cores, cached subject.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from .demo import DEMO_RECIPE, DEMO_STEPS, SETTINGS, TASK_EVAL, demo_run, demo_subject, subject_point
from .runs import append_run, load_runs, machine, stamp_run, study_command
from .subject import DEFAULT_CACHE

PLAIN = "plain SFT"
SHIPPED = "STR as shipped {}"
EIGHT_ANCHORS = "STR anchors b8 c30 (as written)"
# (method, max_grad_norm): the demo's two runs, the same without clipping, and 8 anchors a step.
GRID = ((PLAIN, 1.0), (SHIPPED, 1.0), (PLAIN, 0.0), (SHIPPED, 0.0), (EIGHT_ANCHORS, 1.0))


def run_demo_check(out: Path, cache: Path = DEFAULT_CACHE, argv: list[str] | None = None) -> str:
    """Run the grid on both demo settings (skipping what `out/runs.jsonl` holds), write RESULTS.md."""
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    subject_dir, info, data, _, _ = demo_subject(cache)
    start = subject_point(subject_dir, data, info["fingerprint"])
    path = out / "runs.jsonl"
    runs = load_runs(path, info["fingerprint"])
    done = {(r["setting"], r["method"], r["max_grad_norm"]) for r in runs}
    total = len(SETTINGS) * len(GRID)
    for i, ((setting, share), (method, clip)) in enumerate(((s, g) for s in SETTINGS for g in GRID), start=1):
        if (setting, method, clip) in done:
            continue
        run_started = time.perf_counter()
        recipe = replace(DEMO_RECIPE, max_grad_norm=clip)
        progress = f"[demo-check] run {i}/{total}: {setting}, {method}, clip {clip:g}"
        result = demo_run(method, setting, share, subject_dir, data, recipe, start, progress)
        result["max_grad_norm"] = clip
        append_run(path, stamp_run(result, info["fingerprint"], run_started))
        runs.append(result)
    text = demo_check_report(runs, start, study_command(argv), time.perf_counter() - started)
    (out / "RESULTS.md").write_text(text + "\n")
    return text


def demo_check_report(runs: list[dict[str, Any]], start: dict[str, Any], command: str, seconds: float) -> str:
    """One table: per setting, method and clipping, the refusals kept, exact match, held-out sort loss,
    median gradient norm before clipping and step time; then what the two hypotheses predicted."""
    subject_refusal = max(start["heldout_refusal"], 1e-9)
    lines = [
        "# Why `{}` costs the demo's task: clipping or the anchor term's noise?",
        "",
        f"Command: `{command}`. Machine: {machine()}. Wall time of this invocation {seconds:.0f} s "
        f"(runs already recorded are not rerun; each run's own is `wall_seconds` in runs.jsonl).",
        f"The demo's subject, task, settings and seed 0 (`make demo`): {DEMO_STEPS} LoRA steps of lr "
        f"{DEMO_RECIPE.lora_lr:g}, AdamW; sort exact match on {TASK_EVAL[0]} test examples, held-out sort loss on "
        "the same test rows. `clip` is the Trainer's `max_grad_norm` (0: off). One seed per cell: exact match on 50 "
        "moves by several points between seeds; the loss is the steadier measure.",
        "",
        "| setting | method | clip | refusals kept | sort exact match | held-out sort loss | "
        "median grad norm (before clipping) | median step (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    order = {key: i for i, key in enumerate(GRID)}
    settings = [s for s, _ in SETTINGS]
    ranked = sorted(
        runs, key=lambda r: (settings.index(r["setting"]), order[(r["method"], r["max_grad_norm"])])
    )
    for r in ranked:
        norm = r.get("grad_norm_median")
        lines.append(
            f"| {r['setting']} | {r['method']} | {r['max_grad_norm']:g} | "
            f"{100 * r['heldout_refusal'] / subject_refusal:.0f} % | {100 * r['task_exact_match']:.0f} % | "
            f"{r['task_heldout_loss']:.3f} | {'n/a' if norm is None else f'{norm:.1f}'} | "
            f"{r['step_time_median_s']:.2f} |"
        )
    lines += ["", *_readings(ranked)]
    return "\n".join(lines)


def _readings(runs: list[dict[str, Any]]) -> list[str]:
    """Per setting, the loss gap between `{}` and plain SFT with clipping on and off, and 8 anchors' gap."""
    by_key = {(r["setting"], r["method"], r["max_grad_norm"]): r for r in runs}
    out = []
    for setting, _ in SETTINGS:
        cells = {key: by_key[(setting, *key)] for key in GRID if (setting, *key) in by_key}
        if len(cells) < len(GRID):
            continue

        loss = {key: float(run["task_heldout_loss"]) for key, run in cells.items()}
        shipped_on, shipped_off = (
            loss[(SHIPPED, 1.0)] - loss[(PLAIN, 1.0)],
            loss[(SHIPPED, 0.0)] - loss[(PLAIN, 0.0)],
        )
        eight = loss[(EIGHT_ANCHORS, 1.0)] - loss[(PLAIN, 1.0)]
        out.append(
            f"- {setting}: `{{}}`'s held-out loss above plain SFT's {shipped_on:+.3f} with clipping, "
            f"{shipped_off:+.3f} without; 8 anchors a step (clipping on) {eight:+.3f}."
        )
    norms = [r["grad_norm_median"] for r in runs if r["method"] == SHIPPED and r.get("grad_norm_median")]
    if norms:
        out.append(f"- `{{}}`'s median gradient norm over its runs: {statistics.median(norms):.1f}.")
    return out
