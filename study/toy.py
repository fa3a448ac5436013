"""The earlier study on a 2.9M-parameter toy model trained here from nothing (kept as a labelled toy).

python -m study run [--plan full|sweep|folded|demo] [--out results/study] [--source shared|embedded] [--seeds N]
"""

from __future__ import annotations

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
from .tasks import gsm8k_task, sort_task

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
PLANS = {"full": FULL_PLAN, "sweep": SWEEP_PLAN, "folded": FOLDED_PLAN, "demo": DEMO_PLAN}


def run_toy(out: Path, plan_name: str, source: str, seeds: int | None, argv: list[str] | None) -> None:
    """Train (or reuse) the toy aligned model, run the plan's missing runs, print RESULTS.md."""
    plan = PLANS[plan_name]
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    started = time.perf_counter()
    data = load_study_data(source)
    tasks = {"sort": sort_task(1000, 100, seed=0)}
    if any(block[0] == "gsm8k" for block in plan):
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
        for seed in range(seeds or block_seeds)
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
