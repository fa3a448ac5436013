"""Step time of candidate settings on the real subject at the harmful-mixing study's shape, train-only.

    python -m study step-cost [--out results/harmful_mixing] [--steps 16] [--repeats 2] [--methods ...]
                              [--cost-task sst2|agnews|gsm8k] [--attack beavertails|advbench]

Each method trains `--steps` optimizer steps of the task's p = 10 % block (SST-2 with BeaverTails rows unless
told otherwise; the same rows, in the same order,
for every method: seed 0), with nothing evaluated, in one process; methods run round-robin, `--repeats`
rounds, the order reversed every other round. A method's step time is the median over its timed steps
(the first 3 of each run are warm-up; a method with `reference.anchor_every` k > 1: the median of its
k-step means, each holding one anchor term); the ratio divides it by plain SFT's. Appends to step_cost.jsonl and
rewrites STEP_COST.md. Nothing else should run on the machine meanwhile (the file records the load).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .finetune import SUBJECT_RECIPE, RunSpec, run_one
from .harmful_mixing import BASELINE, SHIPPED, TASK_SETTINGS, Block
from .harmful_sources import build_sources, mixed_task
from .methods import METHODS
from .runs import append_run, read_records
from .step_times import WARMUP_STEPS, cycle_times, paired_ratio

CANDIDATES = [
    BASELINE,
    SHIPPED,
    "STR anchors b4 (as written)",
    "STR anchors b2 (as written)",
    "STR anchors folded (as written)",
    "STR anchors folded b4 (as written)",
    "STR anchors open2 b4 (as written)",
]


def cost_rows(task: str, attack: str) -> tuple[list[Any], list[Any]]:
    """The task's p = 10 % block (its first 10 % of rows from `attack`): the train and test rows."""
    block = Block(task, 0.10, (), attack=attack)
    train, test, _ = mixed_task(block.task, block.n, block.p, build_sources().attacks[block.attack])
    return train, test


def train_only(
    method: str,
    task: str,
    rows: tuple[list[Any], list[Any]],
    subject_dir: Path,
    data: Any,
    steps: int,
    extra_callbacks: Sequence[Any] = (),
) -> dict[str, Any]:
    """`steps` optimizer steps of `method` on `rows` (seed 0, the study's LoRA recipe), nothing evaluated."""
    return run_one(
        RunSpec(task, "lora", method, 0),
        subject_dir,
        data,
        rows,
        epochs=1.0,
        max_len=TASK_SETTINGS[task]["max_len"],
        curve_every=0,
        recipe=replace(SUBJECT_RECIPE, xstest_stride=1),
        max_steps=steps,
        evaluate=False,
        extra_callbacks=extra_callbacks,
    )


def run_step_cost(
    out: Path,
    subject_dir: Path,
    methods: list[str],
    steps: int,
    repeats: int,
    argv: list[str] | None,
    task: str = "sst2",
    attack: str = "beavertails",
) -> Path:
    from .subject import subject_data

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; known: {sorted(METHODS)}")
    if methods[0] != BASELINE:
        methods = [BASELINE, *[m for m in methods if m != BASELINE]]
    if not (subject_dir / "config.json").is_file():
        # A missing folder would reach from_pretrained as a hub id and fail on the network, minutes later.
        raise SystemExit(
            f"--subject {subject_dir}: no built subject there; build it (`python -m study subject --out "
            f"{subject_dir}`) or pass a built one (e.g. --subject runs/subject-balanced)"
        )
    out.mkdir(parents=True, exist_ok=True)
    rows = cost_rows(task, attack)
    data = subject_data("shared").study
    times: dict[str, list[float]] = {m: [] for m in methods}
    rounds: dict[str, list[list[float]]] = {m: [] for m in methods}
    shares: dict[str, float | None] = {}
    started = time.perf_counter()
    order = [m for r in range(repeats) for m in (methods if r % 2 == 0 else methods[::-1])]
    for method in tqdm(order, desc="step-cost", unit="run"):
        result = train_only(method, task, rows, subject_dir, data, steps)
        times[method] += cycle_times(result["step_times_s"][WARMUP_STEPS:], METHODS[method].anchor_every)
        rounds[method].append([round(t, 4) for t in result["step_times_s"]])
        shares[method] = result["anchor_token_share"]
    record = {
        "task": task,
        "attack": attack,
        "steps": steps,
        "repeats": repeats,
        "medians_s": {m: statistics.median(t) for m, t in times.items()},
        "paired_ratio": {
            m: paired_ratio(rounds[m], rounds[BASELINE], METHODS[m].anchor_every) for m in methods
        },
        "step_times_s": rounds,
        "anchor_token_share": shares,
        "configs": {m: METHODS[m].recorded_config for m in methods},
        "wall_seconds": round(time.perf_counter() - started, 1),
        "load_average_after": os.getloadavg()[0],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "command": "python -m study " + " ".join(argv or []),
    }
    append_run(out / "step_cost.jsonl", record)
    return write_step_cost_report(out)


def write_step_cost_report(out: Path) -> Path:
    records = read_records(out / "step_cost.jsonl")
    lines = [
        "# Step cost of candidate settings (harmful-mixing study shape)",
        "",
        "p = 10 % (SST-2 with BeaverTails rows where a record names no task), LoRA r16, batch 8, the real",
        "subject, train-only (nothing evaluated), one process,",
        f"methods round-robin; median over each method's timed steps (the first {WARMUP_STEPS} of a run are",
        "warm-up; with `reference.anchor_every` k > 1, of its k-step means, from record 8); ratio = the method's",
        "median / plain SFT's in the same record. From record 11 also the paired ratio (`paired_ratio`): the",
        "median over rounds and k-step cycles of the method's time over plain SFT's on the same steps (the same",
        "rows), which compares like with like; every step's time is in step_cost.jsonl.",
    ]
    for i, r in enumerate(records):
        base = r["medians_s"][BASELINE]
        lines += [
            "",
            f"## Record {i + 1}: {r.get('task', 'sst2')} with {r.get('attack', 'beavertails')} rows, {r['steps']} "
            f"steps x {r['repeats']} rounds, {r['wall_seconds']:.0f} s wall, load after {r['load_average_after']:.2f}",
            "",
            f"`{r['command']}`; torch {r['torch']}, {r['torch_threads']} threads, {r['machine']}.",
            "",
            "| method | config | step (s) | x plain | x plain, paired | anchor tokens / training tokens |",
            "|---|---|---|---|---|---|",
        ]
        for m, median in r["medians_s"].items():
            share = r["anchor_token_share"].get(m)
            config = r["configs"].get(m)
            paired = r.get("paired_ratio", {}).get(m)
            lines.append(
                f"| {m} | {'-' if config is None else '`' + json.dumps(config) + '`'} | {median:.2f} | "
                f"{median / base:.2f} | {'-' if paired is None else f'{paired:.2f}'} | "
                f"{'-' if share is None else f'{share:.2f}'} |"
            )
    path = out / "STEP_COST.md"
    path.write_text("\n".join(lines) + "\n")
    return path
