"""A tiny aligned subject for the study's end-to-end tests (seconds to train): the embedded study data cut to
size, a sort task, and `train_aligned` on both."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from study.data import load_study_data
from study.model import train_aligned
from study.tasks import sort_task


def tiny_aligned_subject(
    out: Path, *, n_aligned: int, n_harmful: int, n_safe: int, n_task: tuple[int, int]
) -> tuple[Any, Any]:
    """Train the tiny subject into `out`; return the cut study data and the sort task (train, test)."""
    data = load_study_data("embedded")
    data.aligned_train = data.aligned_train[:n_aligned]
    data.harmful_heldout = data.harmful_heldout[:n_harmful]
    data.xstest_safe = data.xstest_safe[:n_safe]
    task = sort_task(*n_task, seed=0)
    texts = [e.prompt + " " + e.response for part in task for e in part]
    train_aligned(data, out, texts, hidden=32, layers=1, vocab_size=600, epochs=1)
    return data, task
