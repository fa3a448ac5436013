"""The efficacy study and the demo.

    python -m study subject --out DIR [--source shared|embedded] [--cache DIR]
    python -m study real [--plan subject|quick] [--out results/subject] [--subject DIR] [--save-models DIR]
    python -m study decision [--plan decision|default-first|quick] [--out results/decision] [--subject DIR] [--save-models DIR]
    python -m study harmful-mixing [--plan protocol|quick] [--out results/harmful_mixing] [--subject DIR] [--report]
    python -m study step-cost [--out results/harmful_mixing] [--steps 16] [--repeats 2] [--methods ...]
    python -m study demo [--out runs/demo] [--cache DIR]
    python -m study run  [--plan full|sweep|folded] [--out results/study]   (the toy model)

`subject` builds the real aligned subject (SmolLM2-135M-Instruct, safety-tuned; study/subject.py).
`real` is the efficacy study on it (study/real.py): fine-tunes it on GSM8K, SST-2 and harmful data with
every method and seed, and writes runs.jsonl, RESULTS.md and two plots. `decision` is issue 12's study on
the same subject (study/decision.py): coefficient curves of the decision-point forms against training-position
STR, settings chosen on a validation split, held-out numbers reported. `demo` is the small version on
the project's own embedded texts only (nothing from ../shared), for `make demo`. `run` is the earlier
study on a 2.9M-parameter toy model trained here from nothing (kept as a labelled toy).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data import load_study_data
from .finetune import RunSpec, run_one
from .model import evaluate_aligned, train_aligned
from .report import plots, summarize
from .runs import append_run, load_runs
from .tasks import sort_task

# (task, mode, methods, seeds). Sized for about an hour on 2 CPU cores: the main comparison on the sort
# task with LoRA gets 3 seeds, the GSM8K and full fine-tuning checks 2.
FULL_PLAN: list[tuple[str, str, list[str], int]] = [
    (
        "sort",
        "lora",
        [
            "plain SFT",
            "mix 10% refusals",
            "KL-SFT (full vocab, beta 1)",
            "STR adapter mse c1",
            "STR adapter hinge c1",
            "STR cache mse c1",
            "STR anchors mse c10",
            "STR anchors mse c10 every 8",
            "STR anchors hinge c10",
            "STR default-anchors mse c10",
        ],
        3,
    ),
    ("sort", "full", ["plain SFT", "STR cache mse c1", "STR anchors mse c10"], 2),
    ("gsm8k", "lora", ["plain SFT", "mix 10% refusals", "STR adapter mse c1", "STR anchors mse c10"], 2),
]
SWEEP_PLAN: list[tuple[str, str, list[str], int]] = [
    (
        "sort",
        "lora",
        [
            "plain SFT",
            "STR adapter mse c10",
            "STR adapter mse c100",
            "STR anchors mse c3",
            "STR anchors mse c30 every 4",
            "STR anchors mse c100 every 8",
        ],
        1,
    ),
]
# Issue 7: anchors folded into the training forward, and how few anchors per step keep the refusals.
FOLDED_PLAN: list[tuple[str, str, list[str], int]] = [
    (
        "sort",
        "lora",
        [
            "plain SFT",
            "STR anchors mse c10",
            "STR anchors mse c10 folded",
            "STR anchors mse c10 folded, 2 per step",
            "STR anchors mse c10 folded, 1 per step",
            "STR anchors mse c40 folded, 2 per step",
            "plain SFT, GA 4",
            "STR anchors mse c10 folded, GA 4",
        ],
        3,
    ),
]
DEMO_PLAN: list[tuple[str, str, list[str], int]] = [
    ("sort", "lora", ["plain SFT", "STR adapter mse c1", "STR anchors mse c10"], 1),
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m study", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "command", choices=["run", "demo", "subject", "real", "decision", "harmful-mixing", "step-cost"]
    )
    parser.add_argument("--source", choices=["shared", "embedded"], default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--seeds", type=int, default=None, help="override the plan's seeds per block")
    parser.add_argument(
        "--plan",
        choices=[
            "full",
            "sweep",
            "folded",
            "demo",
            "subject",
            "quick",
            "decision",
            "default-first",
            "protocol",
        ],
        default=None,
    )
    parser.add_argument(
        "--subject", default="runs/subject", help="the aligned subject's folder (built if absent)"
    )
    parser.add_argument(
        "--report",
        action="store_true",
        help="real, decision: only rewrite RESULTS.md and the plots from runs.jsonl",
    )
    parser.add_argument("--save-models", default=None, help="keep the subject and each run's adapter here")
    parser.add_argument("--cache", default=None, help="folder for the dequantized shipped model")
    parser.add_argument("--steps", type=int, default=16, help="step-cost: optimizer steps per run")
    parser.add_argument("--repeats", type=int, default=2, help="step-cost: round-robin rounds")
    parser.add_argument("--methods", nargs="+", default=None, help="step-cost: methods (plain SFT first)")
    args = parser.parse_args(argv)
    if args.command == "step-cost":
        from .step_cost import CANDIDATES, run_step_cost

        print(
            run_step_cost(
                Path(args.out or "results/harmful_mixing"),
                Path(args.subject),
                args.methods or CANDIDATES,
                args.steps,
                args.repeats,
                argv if argv is not None else sys.argv[1:],
            ).read_text()
        )
        return
    if args.command == "subject":
        from .subject import DEFAULT_CACHE, build_subject

        info = build_subject(
            Path(args.out or "runs/subject"), args.source or "shared", Path(args.cache or DEFAULT_CACHE)
        )
        print(json.dumps(info, indent=2))
        return
    if args.command == "demo":
        from .real import run_demo
        from .subject import DEFAULT_CACHE

        print(run_demo(Path(args.out or "runs/demo"), Path(args.cache or DEFAULT_CACHE)))
        return
    if args.command == "real":
        from .real import run_real
        from .subject import DEFAULT_CACHE

        print(
            run_real(
                Path(args.out or "results/subject"),
                args.plan or "subject",
                Path(args.subject),
                Path(args.cache or DEFAULT_CACHE),
                seeds=args.seeds,
                save_models=Path(args.save_models) if args.save_models else None,
                argv=argv,
                report_only=args.report,
            )
        )
        return
    if args.command == "decision":
        from .decision import PLANS
        from .decision_run import run_decision
        from .subject import DEFAULT_CACHE

        if (args.plan or "decision") not in PLANS:
            parser.error(f"--plan {args.plan} is not a plan of `decision`: use {', '.join(PLANS)}")
        print(
            run_decision(
                Path(args.out or "results/decision"),
                args.plan or "decision",
                Path(args.subject),
                Path(args.cache or DEFAULT_CACHE),
                save_models=Path(args.save_models) if args.save_models else None,
                argv=argv,
                report_only=args.report,
            )
        )
        return
    if args.command == "harmful-mixing":
        from .harmful_mixing import PLANS as MIXING_PLANS
        from .harmful_run import run_harmful_mixing
        from .subject import DEFAULT_CACHE

        if (args.plan or "protocol") not in MIXING_PLANS:
            parser.error(
                f"--plan {args.plan} is not a plan of `harmful-mixing`: use {', '.join(MIXING_PLANS)}"
            )
        print(
            run_harmful_mixing(
                Path(args.out or "results/harmful_mixing"),
                args.plan or "protocol",
                Path(args.subject),
                Path(args.cache or DEFAULT_CACHE),
                argv=argv,
                report_only=args.report,
            )
        )
        return
    source = args.source or "shared"
    out = Path(args.out or "results/study")
    toy_plans = {"full": FULL_PLAN, "sweep": SWEEP_PLAN, "folded": FOLDED_PLAN, "demo": DEMO_PLAN}
    if (args.plan or "full") not in toy_plans:
        parser.error(
            f"--plan {args.plan} is a plan of `real`; `run` (the toy model) takes {', '.join(toy_plans)}"
        )
    plan = toy_plans[args.plan or "full"]
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    started = time.perf_counter()
    data = load_study_data(source)
    tasks = {"sort": sort_task(1000, 100, seed=0)}
    if any(block[0] == "gsm8k" for block in plan):
        from .tasks import gsm8k_task

        tasks["gsm8k"] = gsm8k_task(600, 100)
    task_texts = [e.prompt + " " + e.response for split in tasks.values() for part in split for e in part]
    aligned_dir = out / "aligned-model"
    model, tokenizer, info = train_aligned(data, aligned_dir, task_texts, epochs=6)
    metrics = evaluate_aligned(model, tokenizer, data)
    aligned = {"info": info, "metrics": metrics, "notes": data.notes}
    (out / "aligned.json").write_text(json.dumps(aligned, indent=2))
    print(f"aligned model: {json.dumps(metrics)}", flush=True)
    specs = [
        RunSpec(task, mode, method, seed)
        for task, mode, methods, block_seeds in plan
        for seed in range(args.seeds or block_seeds)
        for method in methods
    ]
    # Resumable: runs already in runs.jsonl for this aligned model are kept, not repeated.
    runs_path = out / "runs.jsonl"
    runs = load_runs(runs_path, info["fingerprint"])
    done = {(r["task"], r["mode"], r["method"], r["seed"]) for r in runs}
    todo = [s for s in specs if (s.task, s.mode, s.method, s.seed) not in done]
    for spec in tqdm(todo, desc="fine-tuning runs", unit="run"):
        epochs = 2.0 if spec.task == "sort" else 1.0
        result = run_one(
            spec, aligned_dir, data, tasks[spec.task], epochs=epochs, max_len=192, curve_every=25
        )
        result["aligned_fingerprint"] = info["fingerprint"]
        runs.append(result)
        append_run(runs_path, result)
        tqdm.write(
            f"{spec.task}/{spec.mode}/{spec.method}/seed {spec.seed}: refusal {100 * result['heldout_refusal']:.0f} %, "
            f"over-refusal {100 * result['xstest_over_refusal']:.0f} %, EM {100 * result['task_exact_match']:.0f} %, "
            f"loss {result['task_heldout_loss']:.3f}, step {1000 * result['step_time_median_s']:.0f} ms"
        )
    command = "python -m study " + " ".join(sys.argv[1:] if argv is None else argv)
    wanted = {(s.task, s.mode, s.method, s.seed) for s in specs}
    runs = [r for r in runs if (r["task"], r["mode"], r["method"], r["seed"]) in wanted]
    text = summarize(runs, aligned, out, command, time.perf_counter() - started)
    for path in plots(runs, metrics["heldout_refusal"], out):
        print(f"wrote {path}")
    print(text)


if __name__ == "__main__":
    main()
