"""Where a binary task's accuracy is lost: per run, its errors on each gold label and the label bias they
add up to (recorded per test example since stop 39: `task_correct`)."""

from __future__ import annotations

import statistics
from typing import Any

from .evaluation import auc
from .harmful_sources import mixed_task


def gold_labels(task: str, n_eval: int) -> list[str]:
    """The gold answers of the test examples every run of `task` is scored on, in order."""
    return [str(e.answer) for e in mixed_task(task, 1000, 0.0, [])[1][:n_eval]]


def label_errors(correct: str, gold: list[str], labels: tuple[str, str]) -> tuple[int, int, float]:
    """(errors on gold `labels[0]`, errors on gold `labels[1]`, predicted share of `labels[1]` minus its gold
    share): a binary task's wrong answers name the other label (the runs refuse none: `task refused`)."""
    first = sum(1 for g, c in zip(gold, correct, strict=True) if g == labels[0] and c == "0")
    second = sum(1 for g, c in zip(gold, correct, strict=True) if g == labels[1] and c == "0")
    return first, second, (first - second) / len(gold)


def label_bias_lines(
    runs: list[dict[str, Any]], task: str = "sst2", labels: tuple[str, str] = ("negative", "positive")
) -> list[str]:
    """A section: every run of `task` that recorded per-example correctness, its errors by gold label and
    the bias toward `labels[1]` they add up to, and how far plain SFT's own runs move."""
    scored = [r for r in runs if r["task"] == task and r.get("task_correct")]
    if not scored:
        return []
    gold = gold_labels(task, len(scored[0]["task_correct"]))
    counts = {label: gold.count(label) for label in labels}
    lines = [
        f"## Where {task} accuracy is lost",
        "",
        f"Every wrong answer names the other label (no run refuses the test prompts), so a run's errors split into "
        f"errors on gold `{labels[0]}` ({counts[labels[0]]} of {len(gold)}) and on gold `{labels[1]}` "
        f"({counts[labels[1]]}); their difference is the run's bias toward `{labels[1]}` (its predicted share minus "
        "the gold share). *AUC* is threshold-free: how often a gold `"
        + labels[1]
        + "` example's margin log p("
        + labels[1]
        + ") - log p("
        + labels[0]
        + ") at the reply's first token exceeds a gold `"
        + labels[0]
        + "` example's (recorded from stop 42). A one-epoch run's bias lands on either side by chance, plain SFT's included: much of a "
        "few points' accuracy difference between two runs is where the label threshold landed, not what was learned.",
        "",
        f"| method | p | attack | epochs | seed | accuracy | errors on {labels[0]} | errors on {labels[1]} | "
        f"bias toward {labels[1]} | AUC |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    biases: dict[str, list[float]] = {}
    for r in sorted(scored, key=lambda r: (r["method"], r["p"], r["attack"], r["epochs"], r["seed"])):
        first, second, bias = label_errors(r["task_correct"], gold, labels)
        biases.setdefault(r["method"], []).append(bias)
        lines.append(
            f"| {r['method']} | {100 * r['p']:.0f} % | {r['attack']} | {r['epochs']:g} | {r['seed']} | "
            f"{100 * r['task_exact_match']:.1f} % | {first} | {second} | {100 * bias:+.1f} points | {_auc(r, gold, labels)} |"
        )
    spread = [
        f"{method}: {min(b) * 100:+.0f} to {max(b) * 100:+.0f} points over {len(b)} runs"
        for method, b in biases.items()
        if len(b) > 1
    ]
    if spread:
        lines += ["", "Bias range per method: " + "; ".join(spread) + "."]
    mean_abs = statistics.fmean(abs(b) for bs in biases.values() for b in bs)
    lines += [f"Mean absolute bias over these runs: {100 * mean_abs:.1f} points.", ""]
    return lines


def _auc(run: dict[str, Any], gold: list[str], labels: tuple[str, str]) -> str:
    margins = run.get("task_label_margins")
    if not margins:
        return "n/a"
    return f"{auc(margins, [g == labels[1] for g in gold]):.3f}"
