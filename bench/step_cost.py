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
from typing import Any

import torch
from benchlib import (
    check_writable,
    load_average,
    machine_info,
    output_stem,
    write_json,
)
from step_cost_model import SHAPES, Shape, count_parameters
from step_cost_modes import DEFAULT_MODES, MODES
from step_cost_report import plot_ratios, render_markdown, vocab_growth
from step_cost_run import run_one

# This file is the entry and its command line; the benchmark itself lives beside it: step_cost_model (shapes,
# batches, the Bench context), step_cost_modes (the mode table), step_cost_run (timing loop and memory),
# step_cost_report (vocabulary growth, Markdown, plot). The docstring above is --help's text.


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
