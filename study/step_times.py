"""Step times and step-time ratios, one rule for every study report.

A run's step time is a median after a short warm-up. A method with an anchor term every k steps
(`reference.anchor_every`) pays it on one step in k, so its time is the median of k-step means; against plain
SFT's median of single steps that is not like with like (the spread of row lengths biases it). Runs of one
block and seed train the same rows in the same order, so where both recorded every step the ratio is taken
step by step (`paired_ratio`).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

WARMUP_STEPS = 3  # a run's first optimizer steps, left out of its step time


def cycle_times(step_times: Sequence[float], every: int) -> list[float]:
    """The mean step time of each run of `every` consecutive steps: one anchor term falls in each when
    `reference.anchor_every` is `every` (whichever step starts it), so each mean is one step's cost."""
    return [statistics.fmean(step_times[i : i + every]) for i in range(0, len(step_times) - every + 1, every)]


def step_time(step_times: Sequence[float], every: int = 1) -> float:
    """A run's step time: the median over its steps after the warm-up, or with an anchor term every `every`
    steps the median of `cycle_times` (a median of single steps would be the steps without it)."""
    timed = step_times[WARMUP_STEPS:] or step_times
    return statistics.median(cycle_times(timed, every) or [statistics.fmean(timed)])


def paired_ratio(
    method_runs: Sequence[Sequence[float]], base_runs: Sequence[Sequence[float]], every: int
) -> float:
    """The method's step time over plain SFT's, step by step: every run trains the same rows in the same
    order, so the median over (round, k-step cycle) of the method's cycle mean over plain SFT's mean on the
    same steps of the same round. Unlike a ratio of medians it compares like with like when `anchor_every`
    k > 1 (a median of k-step means against a median of single steps is biased by the spread of row lengths)."""
    ratios = [
        m / b
        for method_times, base_times in zip(method_runs, base_runs, strict=True)
        for m, b in zip(
            cycle_times(method_times[WARMUP_STEPS:], every),
            cycle_times(base_times[WARMUP_STEPS:], every),
            strict=True,
        )
    ]
    return statistics.median(ratios)


def anchor_every(record: Mapping[str, Any]) -> int:
    """The recorded run's steps per anchor term: its method's (1 for a method no longer declared)."""
    from .methods import METHODS

    method = METHODS.get(record.get("method", ""))
    return method.anchor_every if method is not None else 1


def step_ratio(record: Mapping[str, Any], plain: Mapping[str, Any]) -> float:
    """`record`'s step time over plain SFT's run `plain` of the same block and seed: paired step by step when
    both kept every step's time over the same number of steps, else (records from before every step was kept,
    runs of different lengths) the ratio of their step times."""
    every = anchor_every(record)
    times, base = record.get("step_times_s"), plain.get("step_times_s")
    if times and base and len(times) == len(base) and len(times) >= WARMUP_STEPS + every:
        return paired_ratio([times], [base], every)
    return float(record["step_time_median_s"]) / float(plain["step_time_median_s"])


def step_ratios(
    rows: Sequence[Mapping[str, Any]],
    plain: Sequence[Mapping[str, Any]],
    pair_key: Callable[[Mapping[str, Any]], Hashable] = lambda r: r["seed"],
) -> list[float]:
    """`step_ratio` of each run in `rows` against the plain SFT run with the same `pair_key` (the seed), for
    the runs that have one; runs without a recorded step time are left out."""
    plain_by_key = {pair_key(r): r for r in plain if r.get("step_time_median_s")}
    return [
        step_ratio(r, plain_by_key[pair_key(r)])
        for r in rows
        if r.get("step_time_median_s") and pair_key(r) in plain_by_key
    ]
