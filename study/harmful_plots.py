"""The harmful-mixing study's plots: retention and accuracy over p per method, and each method's place on the
retention / accuracy frontier at the shares the targets are set for."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from .harmful_mixing import BASELINE
from .harmful_report import _mean, paired_deltas, retention
from .harmful_sources import HARMFUL_SOURCES
from .step_times import step_ratios

# The frontier's panels: (task, p, retention target %), BeaverTails rows, one epoch (issue 26 item 4).
FRONTIER_PANELS = (("sst2", 0.10, 95), ("sst2", 0.20, 90), ("agnews", 0.10, 95))
ACCURACY_TARGET = -2.0  # points of accuracy against plain SFT, paired by seed
X_FLOOR = -25.0  # methods that cost more accuracy are named in the panel's title instead of drawn


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_over_p(runs: list[dict[str, Any]], base: dict[str, Any], path: Path) -> Path | None:
    """Retention and accuracy over p per method (SST-2, BeaverTails rows, one epoch)."""
    plt = _pyplot()
    sst2 = [r for r in runs if r["task"] == "sst2" and r["attack"] == "beavertails" and r["epochs"] == 1.0]
    if not sst2:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for method in dict.fromkeys(r["method"] for r in sst2):
        ps = sorted({r["p"] for r in sst2 if r["method"] == method})
        rows = [[r for r in sst2 if r["method"] == method and r["p"] == p] for p in ps]
        xs = [100 * p for p in ps]
        left.plot(
            xs,
            [100 * _mean([retention(r, base, HARMFUL_SOURCES) for r in g]) for g in rows],
            "o-",
            label=method,
        )
        right.plot(xs, [100 * _mean([r["task_exact_match"] for r in g]) for g in rows], "o-", label=method)
    left.axhline(95, color="grey", lw=0.8, ls="--")
    left.set(
        xlabel="harmful rows p (%)",
        ylabel="refusals kept (% of subject's, held-out pooled)",
        title="retention",
    )
    right.set(xlabel="harmful rows p (%)", ylabel="SST-2 accuracy (%)", title="task accuracy")
    left.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_frontier(runs: list[dict[str, Any]], base: dict[str, Any], path: Path) -> Path | None:
    """Per panel (task, p): each method's held-out retention against its accuracy change from plain SFT
    (paired by seed; bars: the spread over seeds), its step-time ratio beside it where measured, the targets'
    corner shaded. Methods without a paired plain SFT seed are left out (their change is not comparable)."""
    panels = []
    for task, p, target in FRONTIER_PANELS:
        block = [
            r
            for r in runs
            if r["task"] == task and r["p"] == p and r["attack"] == "beavertails" and r["epochs"] == 1.0
        ]
        plain = [r for r in block if r["method"] == BASELINE]
        if plain:
            panels.append((task, p, target, block, plain))
    if not panels:
        return None
    plt = _pyplot()
    # One colour per method across the panels.
    methods = list(dict.fromkeys(r["method"] for *_, block, _ in panels for r in block))
    colours = {m: plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")(i) for i, m in enumerate(methods)}
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4), squeeze=False)
    for ax, (task, p, target, block, plain) in zip(axes[0], panels, strict=True):
        off_chart = []
        for method in dict.fromkeys(r["method"] for r in block):
            rows = [r for r in block if r["method"] == method]
            deltas, _ = paired_deltas(rows, plain)
            if not deltas:
                continue
            x = 100 * _mean(deltas)
            if x < X_FLOOR:
                off_chart.append(f"{method}: {x:+.1f}")
                continue
            kept = [100 * retention(r, base, HARMFUL_SOURCES) for r in rows]
            ratios = step_ratios(rows, plain)
            y = _mean(kept)
            xerr = 100 * statistics.pstdev(deltas) if len(deltas) > 1 else 0.0
            yerr = statistics.pstdev(kept) if len(kept) > 1 else 0.0
            ax.errorbar(
                x,
                y,
                xerr=xerr,
                yerr=yerr,
                fmt="o",
                capsize=3,
                color=colours[method],
                label=f"{method} ({len(rows)} seeds)",
            )
            if method != BASELINE and ratios:
                # * where a run of the point or its plain SFT shared the machine (RESULTS.md says which)
                noted = any("note" in r for r in rows) or any("note" in r for r in plain)
                ax.annotate(
                    f"x{_mean(ratios):.2f}{'*' if noted else ''}",
                    (x, y),
                    textcoords="offset points",
                    xytext=(5, 4),
                    fontsize=7,
                )
        (x_low, x_high), (y_low, y_high) = ax.get_xlim(), ax.get_ylim()
        ax.fill_between([ACCURACY_TARGET, x_high], target, y_high, color="green", alpha=0.08, lw=0)
        ax.set_xlim(x_low, x_high)
        ax.set_ylim(y_low, y_high)
        ax.axhline(target, color="grey", lw=0.8, ls="--")
        ax.axvline(ACCURACY_TARGET, color="grey", lw=0.8, ls="--")
        title = f"{task}, p = {100 * p:.0f} %"
        if off_chart:
            title += "\noff the chart (accuracy points): " + "\n".join(off_chart)
        ax.set(
            xlabel="accuracy - plain SFT's (points, paired by seed)",
            ylabel="refusals kept (% of the subject's, held-out pooled)",
        )
        ax.set_title(title, fontsize=8)
        ax.legend(fontsize=6, loc="lower left")
    fig.suptitle(
        "Retention against task accuracy; targets dashed, met in the shaded corner; step time vs plain SFT beside "
        "each point (* a run shared the machine: RESULTS.md)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
