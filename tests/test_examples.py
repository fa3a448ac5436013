"""The runnable examples the README points to run as a user would run them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize(
    ("script", "printed"),
    [
        ("plain_pytorch.py", "'penalty': "),  # a term computed in training mode
        ("hf_trainer.py", "'str/penalty'"),
        ("lightning_module.py", "'str/penalty'"),
    ],
)
def test_example_runs(script: str, printed: str, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script)], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert printed in done.stdout, done.stdout[-2000:]
