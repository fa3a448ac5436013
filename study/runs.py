"""Run bookkeeping shared by the studies: runs.jsonl (read, append, rewrite), the stamp every recorded run
carries, and the command and machine lines of the reports."""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch


def load_runs(path: Path, fingerprint: str) -> list[dict[str, Any]]:
    """The runs of `path` (runs.jsonl) made on the model with this fingerprint; when it holds others, the file
    is rewritten with only these, so that a resumed study appends to a consistent file. Otherwise it is only
    read: a `--report` beside a running study must not rewrite the file the study appends to."""
    runs: list[dict[str, Any]] = []
    lines = path.read_text().splitlines() if path.is_file() else []
    for line in lines:
        record = json.loads(line)
        if record.get("aligned_fingerprint") == fingerprint:
            runs.append(record)
    if len(runs) != len(lines):
        write_runs(path, runs)
    return runs


def write_runs(path: Path, runs: list[dict[str, Any]]) -> None:
    """`path` rewritten with `runs`, one JSON line each."""
    path.write_text("".join(json.dumps(r) + "\n" for r in runs))


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every JSON line of `path` (a benchmark's records, whatever model they ran on)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def append_run(path: Path, record: dict[str, Any]) -> None:
    """One JSON line appended to `path` as soon as a run finishes (what makes a study resumable)."""
    with path.open("a") as fh:
        fh.write(json.dumps(record) + "\n")


def stamp_run(result: dict[str, Any], fingerprint: str, started: float) -> dict[str, Any]:
    """`result` stamped with the subject it fine-tuned (what `load_runs` keeps runs by), its wall time since
    `started` (a `time.perf_counter()` reading) and the torch threads it had, in that order."""
    result["aligned_fingerprint"] = fingerprint
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    # Step times depend on the threads a run had (and on a second worker sharing the cores).
    result["torch_threads"] = torch.get_num_threads()
    return result


def study_command(argv: list[str] | None) -> str:
    """The command that runs the plan (a `--report` rewrite names the run, not itself)."""
    return "python -m study " + " ".join(
        a for a in (sys.argv[1:] if argv is None else argv) if a != "--report"
    )


def machine() -> str:
    """The machine line of a report: architecture, torch threads, Python and torch versions."""
    return (
        f"{platform.machine()}, {torch.get_num_threads()} torch threads, Python {platform.python_version()}, "
        f"torch {torch.__version__}"
    )
