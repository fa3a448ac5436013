"""The step-cost benchmark's report: how each mode's extra memory grows with the vocabulary across runs,
the Markdown tables (`STEM.md`) and the step-time ratio plot (`STEM_step_ratio.png`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchlib import fmt_bytes, markdown_table
from step_cost_modes import MODES


def vocab_growth(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each shape run at two or more vocabularies: how each mode's extra memory grows with V, in
    units of one fp32 [B, T, delta V] tensor (0 = independent of V)."""
    out: list[dict[str, Any]] = []
    by_shape: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_shape.setdefault(run["shape"]["name"], []).append(run)
    for name, group in by_shape.items():
        group = sorted(group, key=lambda r: r["vocab"])
        if len(group) < 2:
            continue
        lo, hi = group[0], group[-1]
        unit = lo["batch"] * lo["seq"] * (hi["vocab"] - lo["vocab"]) * 4
        for mode, entry in lo["modes"].items():
            other = hi["modes"].get(mode, {})
            if "delta_bytes" not in entry or "delta_bytes" not in other:
                continue
            growth = other["delta_bytes"] - entry["delta_bytes"]
            transient = None
            plain_lo, plain_hi = lo["modes"].get("plain", {}), hi["modes"].get("plain", {})
            if "transient_peak_bytes" in entry and "transient_peak_bytes" in other:
                transient = (other["transient_peak_bytes"] - plain_hi["transient_peak_bytes"]) - (
                    entry["transient_peak_bytes"] - plain_lo["transient_peak_bytes"]
                )
            out.append(
                {
                    "shape": name,
                    "mode": mode,
                    "vocab_lo": lo["vocab"],
                    "vocab_hi": hi["vocab"],
                    "delta_bytes_lo": entry["delta_bytes"],
                    "delta_bytes_hi": other["delta_bytes"],
                    "growth_bytes": growth,
                    "growth_in_fp32_BTdV": growth / unit,
                    "step_growth_bytes": transient,
                    "step_growth_in_fp32_BTdV": None if transient is None else transient / unit,
                }
            )
    return out


# -- reports -----------------------------------------------------------------------------------------
def render_markdown(report: dict[str, Any]) -> str:
    meta = report["meta"]
    lines = [
        "# STR step cost",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Machine: {meta['platform']}, {meta['processor']}, {meta['cpu_count']} CPUs"
        + (
            f", GPU {meta['gpu']} ({meta['gpu_memory_gib']} GiB), CUDA {meta['cuda']}"
            if "gpu" in meta
            else ""
        )
        + f"; torch {meta['torch']}, transformers {meta['transformers']}, peft {meta['peft']}, Python "
        f"{meta['python']}; torch threads {meta['torch_threads']}; {meta['date_utc']} UTC.",
        "",
        f"Load average (1, 5, 15 min) before: {report['load_before']}, after: {report['load_after']}.",
    ]
    if report.get("note"):
        lines += ["", report["note"]]
    for run in report["runs"]:
        shape = run["shape"]
        lines += [
            "",
            f"## {shape['name']}, vocab {run['vocab']}: {run['batch']} x {run['seq']} tokens, hidden "
            f"{shape['hidden']}, {shape['layers']} layers, {run['device']} {run['dtype']}, k={run['k']}, "
            f"gradient checkpointing {'on' if run['gradient_checkpointing'] else 'off'}",
            "",
            f"{run['parameters'] / 1e6:.1f} M parameters ({run['trainable_parameters'] / 1e6:.2f} M trainable, "
            f"LoRA r=16 on all linear layers), anchors {run['n_anchors']} x {run['anchor_len']} tokens; one fp32 "
            f"[B, T, V] tensor is {fmt_bytes(run['logits_bytes_fp32'])}. Memory: {run['memory_method']}.",
        ]
        if run["cache_build"]:
            cb = run["cache_build"]
            lines += [
                "",
                f"Reference cache build (not in the step times): {cb['sequences']} sequences, {cb['tokens']} "
                f"tokens in {cb['seconds']:.2f} s ({cb['tokens_per_s']:.0f} tokens/s), file "
                f"{fmt_bytes(cb['file_bytes'])}.",
            ]
        table = []
        for name, e in run["modes"].items():
            if "skipped" in e:
                table.append([f"`{name}`", "skipped: " + e["skipped"], *[""] * 8])
                continue
            ratio = f"x{e['ratio']:.3f}" if e.get("ratio") else "-"
            delta = e.get("delta_bytes")
            table.append(
                [
                    f"`{name}`",
                    f"{e['median_s'] * 1e3:.1f}",
                    f"{e['min_s'] * 1e3:.1f} / {e['max_s'] * 1e3:.1f}",
                    ratio
                    + (
                        f" (+{100 * e['extra_tokens_frac']:.1f} % tokens)"
                        if e.get("extra_tokens_frac")
                        else ""
                    ),
                    f"x{e['ratio_min']:.3f}" if e.get("ratio_min") else "-",
                    f"x{e['cpu_ratio']:.3f}" if e.get("cpu_ratio") else "-",
                    fmt_bytes(e.get("peak_bytes")),
                    ("+" if (delta or 0) >= 0 else "") + fmt_bytes(delta) if delta is not None else "-",
                    f"{100 * e['delta_frac']:+.2f} %" if e.get("delta_frac") is not None else "-",
                    f"{e['delta_vs_kl']:.3f}" if e.get("delta_vs_kl") is not None else "-",
                ]
            )
        lines += [
            "",
            markdown_table(
                [
                    "mode",
                    "median ms/step",
                    "min / max",
                    "step time vs plain (medians)",
                    "min vs min",
                    "CPU time vs plain (medians)",
                    "peak memory",
                    "delta",
                    "delta %",
                    "delta / KL-SFT delta",
                ],
                table,
            ),
        ]
    if report["vocab_growth"]:
        lines += [
            "",
            "## Extra memory versus vocabulary size",
            "",
            "Growth = (delta vs plain at the larger V) - (delta at the smaller V), in units of one fp32 "
            "[B, T, delta V] tensor: 0 means the mode's extra memory does not depend on the vocabulary. "
            "'Of which in the step' leaves out what a mode keeps between steps (the reference copy of "
            "`str-model-mse` is a whole model: its embedding and head grow with V like any weights).",
            "",
            markdown_table(
                [
                    "shape",
                    "mode",
                    "delta at V lo",
                    "delta at V hi",
                    "growth",
                    "growth in fp32 [B,T,dV]",
                    "of which in the step",
                ],
                [
                    [
                        g["shape"],
                        f"`{g['mode']}`",
                        f"{fmt_bytes(g['delta_bytes_lo'])} (V={g['vocab_lo']})",
                        f"{fmt_bytes(g['delta_bytes_hi'])} (V={g['vocab_hi']})",
                        fmt_bytes(g["growth_bytes"]),
                        f"{g['growth_in_fp32_BTdV']:.2f}",
                        "-"
                        if g["step_growth_in_fp32_BTdV"] is None
                        else f"{g['step_growth_in_fp32_BTdV']:.2f}",
                    ]
                    for g in report["vocab_growth"]
                ],
            ),
        ]
    lines += ["", "Modes:", ""] + [f"- `{name}`: {text}" for name, text in MODES.items()]
    return "\n".join(lines) + "\n"


def plot_ratios(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    names = [m for m in MODES if any(m in r["modes"] and "ratio" in r["modes"][m] for r in runs)]
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(names)), 4.5))
    width = 0.8 / max(len(runs), 1)
    for i, run in enumerate(runs):
        values = [run["modes"].get(m, {}).get("ratio") or 0.0 for m in names]
        xs = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(names))]
        ax.bar(xs, values, width, label=f"{run['shape']['name']} V={run['vocab']}")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axhline(1.02, color="gray", linewidth=0.8, linestyle="--", label="x1.02")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("median step time / plain SFT")
    device = runs[0]["device"] if runs else ""
    ax.set_title(
        f"STR step-time ratio per mode ({device}; {report['meta'].get('gpu', report['meta']['processor'])})"
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
