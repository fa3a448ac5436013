"""How far each method moves the model per step, and what AdamW's second moment holds (a diagnostic).

    python -m study update-size [--out results/harmful_mixing] [--steps 40] [--methods ...]
                                [--cost-task sst2] [--attack advbench]

The hypothesis it tests (stop 43): at 2 anchors a step the anchor term's gradient is large and noisy (median
norm 11-14 against plain SFT's 2.5 on the demo; results/demo_check). AdamW divides each coordinate's update by
the root of its running squared gradient, so that noise would shrink every update in the coordinates the
anchor term touches, the task's and the attack rows' alike: a brake that keeps refusals and costs accuracy. 8
anchors a step (less noise) would brake less, which would fit what the study measured: less accuracy lost on
SST-2 with BeaverTails rows, and fewer refusals kept under the second attack (82 % against `{}`'s 102 %).

Each method trains `--steps` optimizer steps of the task's p = 10 % block (seed 0, the same rows in the same
order for every method, nothing evaluated) and records, per step, the L2 norm of the change of the trainable
(LoRA) parameters and the gradient norm before clipping; at the end, the mean of sqrt(AdamW's second moment)
over all trainable coordinates and the distance from the start. Deterministic: it may share the machine.
Appends to update_size.jsonl and rewrites UPDATE_SIZE.md.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback

from .harmful_mixing import BASELINE, SHIPPED
from .methods import METHODS
from .runs import append_run, machine, read_records
from .step_cost import cost_rows, train_only

DEFAULT_METHODS = [BASELINE, SHIPPED, "STR anchors b8 c30 (as written)"]
SKIP_STEPS = 3  # AdamW's first steps are sign-like whatever the gradient's size


class UpdateMeter(TrainerCallback):
    """Per optimizer step, the L2 norm of the trainable parameters' change; at the end, AdamW's state."""

    def __init__(self) -> None:
        self.before: list[torch.Tensor] = []
        self.start: list[torch.Tensor] = []
        self.norms: list[float] = []
        self.sqrt_v_mean: float | None = None
        self.distance: float | None = None

    @staticmethod
    def _trainable(model: Any) -> list[torch.Tensor]:
        return [p for p in model.parameters() if p.requires_grad]

    def on_step_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.before = [p.detach().clone() for p in self._trainable(model)]
        if not self.start:
            self.start = [t.clone() for t in self.before]

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        squared = sum(
            float((p.detach() - b).pow(2).sum())
            for p, b in zip(self._trainable(model), self.before, strict=True)
        )
        self.norms.append(squared**0.5)

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        params = self._trainable(model)
        self.distance = (
            sum(float((p.detach() - s).pow(2).sum()) for p, s in zip(params, self.start, strict=True)) ** 0.5
        )
        optimizer = kwargs.get("optimizer")
        total, count = 0.0, 0
        for p in params:
            v = optimizer.state.get(p, {}).get("exp_avg_sq") if optimizer is not None else None
            if v is not None:
                total += float(v.sqrt().sum())
                count += v.numel()
        self.sqrt_v_mean = total / count if count else None


def run_update_size(
    out: Path,
    subject_dir: Path,
    methods: list[str],
    steps: int,
    argv: list[str],
    task: str = "sst2",
    attack: str = "advbench",
) -> Path:
    from .subject import subject_data

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; known: {sorted(METHODS)}")
    out.mkdir(parents=True, exist_ok=True)
    rows = cost_rows(task, attack)
    data = subject_data("shared").study
    started = time.perf_counter()
    per_method: dict[str, dict[str, Any]] = {}
    for method in tqdm(methods, desc="update-size", unit="run"):
        meter = UpdateMeter()
        result = train_only(method, task, rows, subject_dir, data, steps, extra_callbacks=[meter])
        per_method[method] = {
            "update_norms": [round(n, 6) for n in meter.norms],
            "update_norm_median": statistics.median(meter.norms[SKIP_STEPS:]),
            "distance_from_start": meter.distance,
            "sqrt_v_mean": meter.sqrt_v_mean,
            "steps": result["steps"],
        }
    record = {
        "task": task,
        "attack": attack,
        "steps": steps,
        "methods": per_method,
        "configs": {m: METHODS[m].recorded_config for m in methods},
        "wall_seconds": round(time.perf_counter() - started, 1),
        "machine": machine(),
        "command": "python -m study " + " ".join(argv),
    }
    append_run(out / "update_size.jsonl", record)
    return write_update_size_report(out)


def write_update_size_report(out: Path) -> Path:
    records = read_records(out / "update_size.jsonl")
    lines = [
        "# How far each method moves the model per step (AdamW, LoRA)",
        "",
        "`python -m study update-size` (study/update_size.py says what it tests). Seed 0, the task's p = 10 % rows,",
        f"nothing evaluated. Update = L2 norm of the trainable parameters' change in one optimizer step (median "
        f"over the steps after the first {SKIP_STEPS}); sqrt(v) = mean over every trainable coordinate of the root of "
        "AdamW's second moment after the last step; distance = L2 norm of the change since the start.",
    ]
    for i, r in enumerate(records):
        base = r["methods"].get(BASELINE)
        lines += [
            "",
            f"## Record {i + 1}: {r['task']} with {r['attack']} rows, {r['steps']} steps, {r['wall_seconds']:.0f} s",
            "",
            f"`{r['command']}`; {r['machine']}.",
            "",
            "| method | config | update (median) | x plain | distance from start | mean sqrt(v) | x plain |",
            "|---|---|---|---|---|---|---|",
        ]
        for m, stats in r["methods"].items():
            config = r["configs"].get(m)
            shown = "-" if config is None else f"`{json.dumps(config)}`"
            ratio = f"x{stats['update_norm_median'] / base['update_norm_median']:.2f}" if base else "-"
            v_ratio = (
                f"x{stats['sqrt_v_mean'] / base['sqrt_v_mean']:.2f}"
                if base and stats["sqrt_v_mean"] and base["sqrt_v_mean"]
                else "-"
            )
            v = "n/a" if stats["sqrt_v_mean"] is None else f"{stats['sqrt_v_mean']:.3g}"
            lines.append(
                f"| {m} | {shown} | {stats['update_norm_median']:.4f} | {ratio} | "
                f"{stats['distance_from_start']:.4f} | {v} | {v_ratio} |"
            )
    path = out / "UPDATE_SIZE.md"
    path.write_text("\n".join(lines) + "\n")
    return path
