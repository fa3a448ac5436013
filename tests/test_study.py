"""The efficacy study's data and pipeline (the full study is `make study`; this checks its parts)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from study.data import SHARED, load_study_data, sort_task
from study.finetune import METHODS, RunSpec, run_one
from study.model import train_aligned


@pytest.mark.parametrize("source", ["embedded", "shared"])
def test_held_out_prompts_are_never_trained_on(source: str) -> None:
    if source == "shared" and not SHARED.is_dir():
        pytest.skip(f"{SHARED} is not here")
    data = load_study_data(source)
    trained = {e.prompt for e in data.aligned_train}
    assert not trained & set(data.harmful_heldout)
    assert not trained & {e.prompt for e in data.benign_check_heldout}
    assert not trained & set(data.xstest_safe)
    assert set(data.harmful_train) & trained == set(data.harmful_train)
    benign = {e.prompt for e in data.aligned_train if e.kind != "harmful"} | {
        e.prompt for e in data.benign_check_heldout
    }
    assert len(benign) >= 900
    if source == "shared":
        assert len(data.harmful_heldout) == 120 and len(data.harmful_train) == 400
        assert len(benign) >= 1000
    # The benign side uses the harmful side's imperative verbs.
    for verb in ("Write", "Develop", "Create", "Explain", "Provide"):
        assert any(p.startswith(verb) for p in benign)


def test_sort_task_is_exact_and_disjoint() -> None:
    train, test = sort_task(50, 10, seed=0)
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    for e in train + test:
        words = e.prompt.split(": ")[1].split()
        assert e.answer == " ".join(sorted(words))


def test_one_run_end_to_end(tmp_path: Path) -> None:
    """A tiny aligned model (seconds to train) and one STR run through the HF integration."""
    data = load_study_data("embedded")
    data.aligned_train = data.aligned_train[:200]
    data.harmful_heldout = data.harmful_heldout[:6]
    data.xstest_safe = data.xstest_safe[:4]
    task = sort_task(32, 8, seed=0)
    texts = [e.prompt + " " + e.response for part in task for e in part]
    train_aligned(data, tmp_path / "aligned", texts, hidden=32, layers=1, vocab_size=600, epochs=1)
    assert (tmp_path / "aligned" / "config.json").is_file()
    for method in ("plain SFT", "STR anchors mse c10"):
        result = run_one(
            RunSpec("sort", "lora", method, 0),
            tmp_path / "aligned",
            data,
            task,
            epochs=1.0,
            max_len=64,
            curve_every=1,
        )
        assert result["steps"] == 2 and len(result["refusal_curve"]) == 3
        for key in ("heldout_refusal", "xstest_over_refusal", "task_exact_match"):
            assert 0.0 <= result[key] <= 1.0
        assert result["task_heldout_loss"] > 0 and result["step_time_median_s"] > 0
    assert set(METHODS) >= {
        "plain SFT",
        "KL-SFT (full vocab, beta 1)",
        "mix 10% refusals",
        "STR cache mse c1",
    }
