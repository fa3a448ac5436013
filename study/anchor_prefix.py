"""What running the anchors' shared prompt prefix once saves (str_hooks/prefix.py), on the real subject.

    python -m study anchor-prefix [--out results/harmful_mixing] [--repeats 7]

Attaches `{"reference": {"anchor_batch_size": 8}}` to the subject with LoRA r16 on every linear layer (the
harmful-mixing study's adapter), then times one anchor step's forward and backward (the `kl` values at the
anchors' points, summed and back-propagated) over the full rows and on the shared prefix's cache, at 2, 4 and
8 anchors, alternating the order every repeat; median seconds. Both paths' values are compared too. Appends
to anchor_prefix.jsonl and rewrites ANCHOR_PREFIX.md. Nothing else should run on the machine meanwhile.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

BATCH_SIZES = (2, 4, 8)


def run_anchor_prefix(out: Path, subject_dir: Path, repeats: int, argv: list[str] | None) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from str_hooks import register_str_hook
    from str_hooks.prefix import full_row_values, values_on_prefix

    tokenizer = AutoTokenizer.from_pretrained(subject_dir)
    model: Any = AutoModelForCausalLM.from_pretrained(subject_dir)
    model = get_peft_model(
        model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)
    )
    started = time.perf_counter()
    handle = register_str_hook(
        model, {"reference": {"anchor_batch_size": max(BATCH_SIZES)}}, tokenizer=tokenizer
    )
    anchors, tap = handle.anchors, handle.tap
    assert anchors is not None
    model.train()
    rows: list[dict[str, Any]] = []
    for size in BATCH_SIZES:
        anchors.batch_size = size
        anchors._built.clear()  # research code: rebuild the cursor-0 batch at this size
        split_was = anchors.share_prefix
        anchors.share_prefix = True
        batch = anchors.batch(0, tap.device())
        anchors.share_prefix = split_was
        assert batch.split is not None

        def full(batch: Any = batch) -> torch.Tensor:
            return full_row_values(tap, batch.input_ids, batch.attention_mask, batch.rows, batch.cols, "kl")

        def shared(batch: Any = batch) -> torch.Tensor:
            values = values_on_prefix(tap, batch.split, batch.rows, "kl")
            assert values is not None
            return values

        paths: dict[str, Callable[[], torch.Tensor]] = {"full rows": full, "shared prefix": shared}
        difference = float((full() - shared()).abs().max())
        times: dict[str, list[float]] = {name: [] for name in paths}
        for repeat in tqdm(range(repeats + 1), desc=f"{size} anchors", unit="round"):
            order = list(paths) if repeat % 2 == 0 else list(paths)[::-1]
            for name in order:
                begin = time.perf_counter()
                paths[name]().sum().backward()
                model.zero_grad(set_to_none=True)
                if repeat > 0:  # the first round warms up
                    times[name].append(time.perf_counter() - begin)
        tokens_full = int(batch.attention_mask.sum())
        prefix = anchors.prefix_length
        rows.append(
            {
                "anchors": size,
                "prefix_tokens": prefix,
                "tokens_full": tokens_full,
                "tokens_shared": tokens_full - (size - 1) * prefix,
                "full_s": statistics.median(times["full rows"]),
                "shared_s": statistics.median(times["shared prefix"]),
                "max_abs_difference": difference,
            }
        )
    handle.remove()
    record = {
        "command": "python -m study " + " ".join(argv or ["anchor-prefix"]),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_after": os.getloadavg()[0],
        "wall_s": time.perf_counter() - started,
        "repeats": repeats,
        "rows": rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    with (out / "anchor_prefix.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")
    return write_anchor_prefix_report(out)


def write_anchor_prefix_report(out: Path) -> Path:
    from str_hooks.prefix import worth_sharing

    cpu = torch.device("cpu")

    lines = [
        "# One anchor step's forward and backward: the full rows against the shared prefix run once",
        "",
        "The real subject (SmolLM2-135M-Instruct, safety-tuned), LoRA r16 on every linear layer, training mode, the",
        "package's anchors (its chat template's 24-token system prompt and role header is the prefix they all",
        "share); `kl` values at the anchors' 4-token openings, summed and back-propagated. Median seconds over the",
        "repeats, the two paths alternating; *diff* is the largest difference of their values.",
    ]
    for number, line in enumerate((out / "anchor_prefix.jsonl").read_text().splitlines(), start=1):
        record = json.loads(line)
        lines += [
            "",
            f"## Record {number}: {record['repeats']} repeats, {record['wall_s']:.0f} s wall, load after "
            f"{record['load_after']:.2f}",
            "",
            f"`{record['command']}`; torch {record['torch']}, {record['threads']} threads, {record['machine']}.",
            "",
            "| anchors | tokens full / shared | full rows (s) | shared prefix (s) | shared / full | diff | `auto` shares on the CPU |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in record["rows"]:
            lines.append(
                f"| {row['anchors']} | {row['tokens_full']} / {row['tokens_shared']} | {row['full_s']:.3f} | "
                f"{row['shared_s']:.3f} | x{row['shared_s'] / row['full_s']:.2f} | {row['max_abs_difference']:.1e} | "
                f"{'yes' if worth_sharing('auto', row['prefix_tokens'], row['anchors'], cpu) else 'no'} |"
            )
    path = out / "ANCHOR_PREFIX.md"
    path.write_text("\n".join(lines) + "\n")
    return path
