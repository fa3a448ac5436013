"""The step-cost benchmark's measurement of one shape and vocabulary: the modes timed round-robin (rotated
every round), then on CPU one live-bytes-tracked step per mode for its peak memory, summarized per mode as
times, ratios to plain SFT and memory deltas.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from benchlib import LiveBytes, storage_bytes, summarize
from step_cost_model import Bench, Shape
from step_cost_modes import MODES, Mode, make_mode


# -- running -----------------------------------------------------------------------------------------
def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def run_one(args: argparse.Namespace, shape: Shape, vocab: int, progress: bool) -> dict[str, Any]:
    from tqdm.auto import tqdm

    with tempfile.TemporaryDirectory(prefix="str-bench-") as tmp:
        b = Bench(args, shape, vocab, Path(tmp))
        modes = [make_mode(name) for name in args.modes]
        for mode in modes:
            try:
                mode.setup(b)
            except Exception as exc:
                if not _is_oom(exc):
                    raise
                mode.skip = f"out of memory at setup: {exc}"
        active = [m for m in modes if m.skip is None]
        times: dict[str, list[float]] = {m.name: [] for m in modes}
        # Process CPU time too: on a CPU shared with other jobs it counts the work, not the time this
        # process waited for a core (with one torch thread every op runs in this process).
        cpu_times: dict[str, list[float]] = {m.name: [] for m in modes}
        peaks: dict[str, int] = {}
        rounds = args.warmup + args.repeats
        total_steps = rounds * sum(1 for m in active)
        bar = tqdm(total=total_steps, desc=f"{shape.name} V={vocab}", unit="block", disable=not progress)
        for r in range(rounds):
            order = active[r % len(active) :] + active[: r % len(active)] if active else []
            for mode in order:
                if mode.skip is not None:
                    bar.update(1)
                    continue
                steps = 1 if r < args.warmup else mode.block
                b.rewind()  # every block sees the same batches, whatever the mode
                try:
                    mode.enter(b)
                    b.sync()
                    if b.device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    start, cpu_start = time.perf_counter(), time.process_time()
                    for _ in range(steps):
                        mode.step(b)
                    b.sync()
                    elapsed = time.perf_counter() - start
                    cpu_elapsed = time.process_time() - cpu_start
                    if b.device.type == "cuda":
                        peaks[mode.name] = max(peaks.get(mode.name, 0), torch.cuda.max_memory_allocated())
                except Exception as exc:
                    from str_hooks import STRAttachError

                    if isinstance(exc, STRAttachError):
                        # A mode the package refuses on this machine (e.g. folding that fails its check)
                        # is reported as such; the other modes still run.
                        mode.skip = f"refused to attach: {str(exc)[:300]}"
                    elif _is_oom(exc):
                        mode.skip = f"out of memory: {str(exc).splitlines()[0][:200]}"
                    else:
                        raise
                    b.optimizer.zero_grad(set_to_none=True)
                finally:
                    mode.exit(b)
                    if b.device.type == "cuda":
                        torch.cuda.empty_cache()
                if r >= args.warmup and mode.skip is None:
                    times[mode.name].append(elapsed / steps)
                    cpu_times[mode.name].append(cpu_elapsed / steps)
                bar.update(1)
        bar.close()
        base = b.base_resident()
        resident: dict[str, int] = {}
        transient: dict[str, int] = {}
        if b.device.type == "cpu":
            # One tracked step per mode, after the timing (the tracker costs a Python call per op).
            for mode in tqdm(active, desc="memory", disable=not progress):
                if mode.skip is not None:
                    continue
                mode.enter(b)
                b.rewind()
                try:
                    resident[mode.name] = storage_bytes(mode.resident())
                    gc.collect()
                    with LiveBytes() as tracker:
                        mode.step(b)
                        gc.collect()
                    transient[mode.name] = tracker.peak
                    peaks[mode.name] = base + resident[mode.name] + tracker.peak
                finally:
                    mode.exit(b)
        result = summarize_run(args, b, modes, times, cpu_times, peaks, base, resident, transient)
        del b
        gc.collect()
        return result


def summarize_run(
    args: argparse.Namespace,
    b: Bench,
    modes: list[Mode],
    times: dict[str, list[float]],
    cpu_times: dict[str, list[float]],
    peaks: dict[str, int],
    base: int,
    resident: dict[str, int],
    transient: dict[str, int],
) -> dict[str, Any]:
    shape = b.shape
    plain_median = statistics.median(times["plain"]) if times.get("plain") else None
    plain_peak = peaks.get("plain")
    kl_delta = None
    if "kl-sft" in peaks and plain_peak is not None:
        kl_delta = peaks["kl-sft"] - plain_peak
    rows: dict[str, Any] = {}
    for mode in modes:
        entry: dict[str, Any] = {"description": MODES[mode.name], "steps_per_repeat": mode.block}
        if mode.skip is not None or not times[mode.name]:
            entry["skipped"] = mode.skip or "no timed repeat"
            rows[mode.name] = entry
            continue
        stats = summarize(times[mode.name])
        entry.update(stats)
        entry["times_s"] = times[mode.name]
        entry["ratio"] = stats["median_s"] / plain_median if plain_median else None
        entry["ratio_min"] = stats["min_s"] / min(times["plain"]) if plain_median else None
        if b.device.type == "cpu" and cpu_times.get("plain"):
            entry["cpu_times_s"] = cpu_times[mode.name]
            entry["cpu_median_s"] = statistics.median(cpu_times[mode.name])
            entry["cpu_ratio"] = entry["cpu_median_s"] / statistics.median(cpu_times["plain"])
        entry["peak_bytes"] = peaks.get(mode.name)
        if plain_peak is not None and mode.name in peaks:
            delta = peaks[mode.name] - plain_peak
            entry["delta_bytes"] = delta
            entry["delta_frac"] = delta / plain_peak
            entry["delta_vs_kl"] = delta / kl_delta if kl_delta else None
        if mode.name in resident:
            entry["resident_bytes"] = resident[mode.name]
            entry["transient_peak_bytes"] = transient[mode.name]
        if mode.extra_tokens:
            entry["extra_tokens_frac"] = mode.extra_tokens
        rows[mode.name] = entry
    memory_method = (
        "torch.cuda.max_memory_allocated() over each timed block (reset after attach)"
        if b.device.type == "cuda"
        else "peak = persistent bytes (parameters, buffers, optimizer state) + the mode's resident tensors "
        "(reference copy, cache, anchor references) + the peak of live bytes allocated during one tracked "
        "step (LiveBytes dispatch-mode tracker)"
    )
    return {
        "shape": asdict(shape),
        "vocab": b.vocab,
        "device": str(b.device),
        "dtype": args.dtype,
        "attn": args.attn,
        "k": args.k,
        "batch": shape.batch,
        "seq": shape.seq,
        "tokens_per_step": shape.batch * shape.seq,
        "anchor_len": shape.anchor_len,
        "n_anchors": args.n_anchors,
        "gradient_checkpointing": b.gradient_checkpointing,
        "parameters": sum(p.numel() for p in b.model.parameters()),
        "trainable_parameters": sum(p.numel() for p in b.model.parameters() if p.requires_grad),
        "logits_bytes_fp32": shape.batch * shape.seq * b.vocab * 4,
        "base_resident_bytes": base,
        "memory_method": memory_method,
        "cache_build": b.cache_build,
        "modes": rows,
    }
