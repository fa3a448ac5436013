"""Step time and peak memory of one LoRA SFT step: plain SFT vs STR (every reference source and form) vs
gathering safety logits from full logits vs KL-SFT, all in one process, modes interleaved round-robin.

    python bench/step_cost.py --shape tiny small --vocab 16384 65536 --out bench/results/cpu
    python bench/step_cost.py --shape llama3-8b --device cuda --dtype bf16 --out bench/results/gpu_llama3-8b
    python bench/step_cost.py --shape llama3-8b qwen2.5-1.5b --device cuda --dry-run   # prints the plan only

Models are randomly initialized from config (no download). See bench/README.md for what each mode is and
how memory is measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from benchlib import (
    check_writable,
    fmt_bytes,
    load_average,
    machine_info,
    markdown_table,
    output_stem,
    write_json,
)
from step_cost_model import SHAPES, Shape, count_parameters
from step_cost_modes import DEFAULT_MODES, MODES
from step_cost_run import run_one


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


# -- command line ------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", nargs="+", default=["tiny"], choices=list(SHAPES))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="default: bf16 on cuda, fp32 on cpu"
    )
    parser.add_argument("--batch", type=int, default=None, help="override the shape's batch size")
    parser.add_argument("--seq", type=int, default=None, help="override the shape's sequence length")
    parser.add_argument("--vocab", type=int, nargs="+", default=None, help="vocabulary sizes (one run each)")
    parser.add_argument("--k", type=int, default=64, help="number of safety tokens")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed repeats per mode (default 5 cpu, 3 cuda)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before the timed ones")
    parser.add_argument("--modes", nargs="+", default=DEFAULT_MODES, choices=list(MODES))
    parser.add_argument("--n-batches", type=int, default=4, help="distinct batches cycled through")
    parser.add_argument("--n-anchors", type=int, default=16, help="anchor prompts in the anchor set")
    parser.add_argument(
        "--gc",
        default="auto",
        choices=["auto", "on", "off"],
        help="gradient checkpointing (auto: on for GPU shapes)",
    )
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1 on cpu)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--note", default="", help="a line written into the report (e.g. what else ran)")
    parser.add_argument(
        "--out", default=None, help="output stem: writes STEM.json, STEM.md, STEM_step_ratio.png"
    )
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit (touches no device)")
    args = parser.parse_args(argv)
    if args.dtype is None:
        args.dtype = "bf16" if args.device == "cuda" else "fp32"
    if args.repeats is None:
        args.repeats = 3 if args.device == "cuda" else 5
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    if args.k < 1:
        parser.error("--k must be >= 1")
    if args.modes and "plain" not in args.modes:
        args.modes = ["plain", *args.modes]  # every ratio is to plain SFT
    return args


def shapes_of(args: argparse.Namespace) -> list[tuple[Shape, int]]:
    plan = []
    for name in args.shape:
        shape = SHAPES[name]
        overrides = {k: v for k, v in (("batch", args.batch), ("seq", args.seq)) if v is not None}
        shape = Shape(**{**asdict(shape), **overrides})
        for vocab in args.vocab or [shape.vocab]:
            plan.append((shape, vocab))
    return plan


def dry_run(args: argparse.Namespace) -> dict[str, Any]:
    runs = []
    for shape, vocab in shapes_of(args):
        params = count_parameters(shape, vocab)
        elem = 2 if args.dtype in ("bf16", "fp16") else 4
        blocks = sum(1 if not m.endswith("-every8") else 8 for m in args.modes)
        runs.append(
            {
                "shape": asdict(shape),
                "vocab": vocab,
                "device": args.device,
                "dtype": args.dtype,
                "parameters": params,
                "weights_bytes": params * elem,
                "tokens_per_step": shape.batch * shape.seq,
                "logits_bytes": shape.batch * shape.seq * vocab * elem,
                "logits_bytes_fp32": shape.batch * shape.seq * vocab * 4,
                "gradient_checkpointing": args.gc == "on" or (args.gc == "auto" and shape.gpu),
                "modes": args.modes,
                "timed_steps": args.repeats * blocks,
                "warmup_steps": args.warmup * len(args.modes),
                "str-model-mse": "skipped at run time if 2 x weights + 16 GiB exceed the GPU memory"
                if args.device == "cuda"
                else "runs",
            }
        )
    return {"dry_run": True, "args": vars(args), "runs": runs}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    stem = output_stem(args.out) if args.out else None
    if stem is not None:
        check_writable(stem, (".json", ".md"), args.overwrite)
    if args.dry_run:
        plan = dry_run(args)
        print(json.dumps(plan, indent=2))
        return plan
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "--device cuda but torch sees no CUDA device (use --dry-run to only print the plan)."
        )
    if args.threads is not None or args.device == "cpu":
        torch.set_num_threads(args.threads or 1)
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    load_before = load_average()
    shapes = shapes_of(args)
    runs: list[dict[str, Any]] = []
    report: dict[str, Any] = {}
    for shape, vocab in shapes:
        runs.append(run_one(args, shape, vocab, progress=not args.no_progress))
        report = {
            "meta": machine_info(args.device),
            "load_before": load_before,
            "load_after": load_average(),
            "note": args.note,
            "complete": len(runs) == len(shapes),
            "args": vars(args),
            "runs": runs,
            "vocab_growth": vocab_growth(runs),
        }
        if stem is not None:  # written after every run, so a crash or a kill keeps what was measured
            write_json(stem.with_name(stem.name + ".json"), report)
            stem.with_name(stem.name + ".md").write_text(render_markdown(report))
    if stem is None:
        print(render_markdown(report))
    elif not args.no_plot:
        try:
            plot_ratios(report, stem.with_name(stem.name + "_step_ratio.png"))
        except ImportError:
            print("matplotlib is not installed: no plot written", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
