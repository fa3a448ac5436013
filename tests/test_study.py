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
        # Each rate counts verdicts on a known number of prompts (6 held-out, 4 XSTest, the 8 test rows).
        for key, n in (("heldout_refusal", 6), ("xstest_over_refusal", 4), ("task_exact_match", 8)):
            assert 0.0 <= result[key] <= 1.0 and result[key] * n == pytest.approx(round(result[key] * n)), key
        assert result["task_heldout_loss"] > 0 and result["step_time_median_s"] > 0
    assert set(METHODS) >= {
        "plain SFT",
        "KL-SFT (full vocab, beta 1)",
        "mix 10% refusals",
        "STR cache mse c1",
    }


@pytest.mark.parametrize("source", ["embedded", "shared"])
def test_subject_never_trains_on_held_out_prompts(source: str) -> None:
    if source == "shared" and not SHARED.is_dir():
        pytest.skip(f"{SHARED} is not here")
    from study.subject import subject_data

    data = subject_data(source)
    trained = {p for p, _ in data.harmful} | set(data.benign)
    assert not trained & set(data.study.harmful_heldout)
    assert not trained & set(data.study.xstest_safe)
    assert not set(data.benign_heldout) & trained
    assert len(data.benign) >= 100 and len(data.harmful) >= 90
    if source == "shared":
        # Balanced toward benign, with the sensitive-sounding safe prompts that keep over-refusal down.
        assert 300 <= len(data.harmful) <= 400 and len(data.benign) >= 350
        own = [r for _, r in data.harmful if r is not None]
        assert len(own) == 100 and all(r.endswith(".") for r in own)


def test_study_anchor_and_attack_goals_are_disjoint_training_goals() -> None:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is not here")
    from study.data import attack_task

    data = load_study_data("shared")
    anchors, goals = data.harmful_train[:300], data.harmful_train[300:400]
    train, test = attack_task(goals)
    assert len(train) == 100 and test == []
    assert not set(anchors) & set(goals) and not set(goals) & set(data.harmful_heldout)
    assert all(e.response.startswith("Sure, here") for e in train)


@pytest.mark.parametrize(
    ("task", "answer", "reply", "correct"),
    [
        ("gsm8k", "18", "She sells 9 * 2 = 18 eggs.\n#### 18", True),
        ("gsm8k", "18", "9 * 2 = 18, so the answer is 18.", True),
        ("gsm8k", "1,200", "The total is 1200.", True),
        ("gsm8k", "18", "She sells 18 eggs... #### 20", False),
        ("gsm8k", "18", "I don't know.", False),
        ("sst2", "negative", " Negative", True),
        ("sst2", "negative", "positive", False),
        ("sort", "amber basil cedar", "amber basil cedar", True),
        ("sort", "amber basil cedar", "basil amber cedar", False),
    ],
)
def test_task_scoring(task: str, answer: str, reply: str, correct: bool) -> None:
    from study.data import task_correct

    assert task_correct(task, answer, reply) is correct
